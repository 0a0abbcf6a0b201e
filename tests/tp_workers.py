"""The ranks of the tensor-parallel tests (tests/test_tensor_parallel.py): one process per rank, gloo on the CPU.

`run_world` starts one process group and runs a whole plan on it (every preset, every placement, the refusals, a
failure at the end), so a world size costs one start-up. Rank 0 writes what it saw to out_dir as it goes; every
rank writes its own status (what follow() returned, the bytes it held around the failure) at the end.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class WorldPlan:
    world_size: int
    presets: tuple[str, ...]
    prompts: dict  # preset -> token-id prompts
    cases: dict  # case name -> GenerationSettings
    cases_for: dict  # preset -> the names of the cases it runs
    refuse_on: int  # the rank that refuses one run before the gate (the engine must stay usable)
    fail_on: int  # the rank that raises mid-run at the end
    fail_stage: str  # Generator.stage at which it raises
    timeout_s: float = 30.0
    extra_presets: dict = field(default_factory=dict)  # name -> preset kwargs registered on every rank
    sharded_presets: tuple[str, ...] = ()  # loaded with materialize="sharded" (random weights drawn per rank)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_world(plan: WorldPlan, out_dir: Path):
    """-> the rank processes (spawned, running)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=run_world, args=(rank, plan, port, str(out_dir)), daemon=True)
             for rank in range(plan.world_size)]
    for proc in procs:
        proc.start()
    return procs


def join_world(procs, *, timeout_s: float) -> list[int | None]:
    """Exit codes (None: still running past the deadline, then killed)."""
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
    codes = [proc.exitcode for proc in procs]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    return codes


def run_world(rank: int, plan: WorldPlan, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    from dataclasses import replace

    from engine import presets
    from engine.errors import KVLabError, TensorParallelError
    from engine.memory import held_bytes
    from engine.parallel import LaunchSettings, TPGroup, launch_engine

    out = Path(out_dir)
    presets.PRESETS.update(plan.extra_presets)
    status: dict = {"rank": rank, "refusals": {}}
    group = TPGroup(LaunchSettings(rank=rank, world_size=plan.world_size, local_rank=rank, master_port=port,
                                   device="cpu", timeout_s=plan.timeout_s))

    def save(name: str, obj) -> None:
        torch.save(obj, out / f"{name}.pt")

    # Refused before the run: a shape that does not split, on every rank.
    for name in plan.extra_presets:
        try:
            launch_engine(f"synthetic:{name}", group=group, dtype="float32", profile=None)
            status["refusals"][name] = "launched"
        except KVLabError as exc:
            status["refusals"][name] = f"{type(exc).__name__}: {exc}"

    for preset in plan.presets:
        engine = launch_engine(f"synthetic:{preset}", group=group, dtype="float32", profile="measure")
        if rank:
            engine.follow()
            continue
        save(f"spec-{preset}", engine.model.spec.as_dict())
        for case in plan.cases_for[preset]:
            settings = plan.cases[case]
            result = engine.generate(plan.prompts[preset], settings, keep_logits=True)
            plan_bytes = None if engine.generator.plan is None or not settings.offload.offloaded else \
                [s.h2d_bytes for s in engine.generator.plan.steps]
            save(f"run-{preset}-{case}", {"tokens": result.token_ids, "logits": torch.stack(result.logits),
                                          "h2d_bytes": plan_bytes})
            engine.generator.plan = None
        engine.close()

    # Sharded before the weights exist (how the 70B presets load): each rank draws its own part, the replicated
    # tensors come from rank 0.
    status["sharded"] = {}
    for preset in plan.sharded_presets:
        engine = launch_engine(f"synthetic:{preset}", group=group, dtype="float32", profile=None, materialize="sharded")
        model = engine.model.hf_model
        own_name, own = next((n, p) for n, p in model.named_parameters() if n.endswith("q_proj.weight")
                             or n.endswith("qkv_proj.weight"))
        facts = {"replicated": [float(p.double().sum()) for n, p in model.named_parameters()
                                if "embed" in n or "norm" in n],
                 "own": float(own.double().sum()), "num_kv_heads": engine.model.spec.num_kv_heads}
        if rank:
            engine.follow()
            facts["tokens"] = engine.last_result.token_ids
        else:
            result = engine.generate(plan.prompts[preset], plan.cases["cpu split 0.5"], keep_logits=True)
            facts["tokens"] = result.token_ids
            facts["finite"] = bool(torch.stack(result.logits).isfinite().all())
            engine.close()
        status["sharded"][preset] = facts

    # The last preset again for the rest: refusals that keep the engine usable, sampling, then a failure.
    preset = plan.presets[0]
    engine = launch_engine(f"synthetic:{preset}", group=group, dtype="float32", profile="measure")
    greedy = next(iter(plan.cases.values()))
    if rank == plan.refuse_on:  # this rank refuses the first run, before the gate, as a full GPU would
        import engine.generator as generator_module

        real = generator_module.check_run_fits

        def refuse_once(*args, **kwargs):
            generator_module.check_run_fits = real
            from engine.errors import OutOfMemoryError

            raise OutOfMemoryError(f"injected: no room for the K/V on rank {rank}")

        generator_module.check_run_fits = refuse_once
    if rank == plan.fail_on:  # and raises mid-run in the run after the sampling ones
        adapter, generator = engine.model.adapter, engine.generator
        real_mlp = adapter.mlp_block
        armed = {"on": False}

        def failing_mlp(layer, hidden):
            if armed["on"] and generator.stage == plan.fail_stage:
                raise RuntimeError(f"injected fault on rank {rank} at {generator.stage}")
            return real_mlp(layer, hidden)

        adapter.mlp_block = failing_mlp
        real_generate = generator.generate

        def generate(prompts, settings, **kwargs):
            armed["on"] = settings.max_new_tokens == 6  # the failing run asks for 6 tokens
            return real_generate(prompts, settings, **kwargs)

        generator.generate = generate
    prompts = plan.prompts[preset]
    if rank == 0:
        events = {}
        for name, call in (
                ("refused", lambda: engine.generate(prompts, greedy)),
                ("after refusal", lambda: engine.generate(prompts, greedy, keep_logits=True)),
                ("fused", lambda: engine.generate(prompts, replace(greedy, fused=True))),
                ("compile", lambda: engine.generate(prompts, replace(greedy, compile=True))),
                ("bad prompt", lambda: engine.generate([[]], greedy)),
                ("too long", lambda: engine.generate(prompts, replace(greedy, max_new_tokens=100000))),
                ("seeded", lambda: engine.generate(prompts, _sampled(greedy, seed=7))),
                ("unseeded", lambda: engine.generate(prompts, _sampled(greedy, seed=None)))):
            try:
                result = call()
                events[name] = {"tokens": result.token_ids,
                                "logits": torch.stack(result.logits) if result.logits else None}
            except KVLabError as exc:
                events[name] = {"error": f"{type(exc).__name__}: {exc}"}
        save("events", events)
        status["unseeded"] = engine.last_result.token_ids
        held = held_bytes("cpu")
        failing = replace(greedy, max_new_tokens=6, offload=replace(greedy.offload, placement="cpu", split=0.5,
                                                                    chunk_tokens=2))
        started = time.monotonic()
        try:
            engine.generate(prompts, failing)
            status["failure"] = "no error"
        except TensorParallelError as exc:
            status["failure"] = str(exc)
        status["failure_s"] = time.monotonic() - started
        status["held_growth"] = held_bytes("cpu") - held
        try:
            engine.generate(prompts, greedy)
            status["after_failure"] = "ran"
        except KVLabError as exc:
            status["after_failure"] = f"{type(exc).__name__}: {exc}"
    else:
        held = held_bytes("cpu")
        status["follow"] = engine.follow()
        status["held_growth"] = held_bytes("cpu") - held
        status["unseeded"] = engine.last_result.token_ids if engine.last_result is not None else None
    status["group_closed"] = group.closed
    (out / f"status-{rank}.json").write_text(json.dumps(status))


def _sampled(settings, *, seed):
    from dataclasses import replace

    from engine.settings import SamplingSettings

    return replace(settings, sampling=SamplingSettings(temperature=0.9, top_k=50, top_p=0.95, seed=seed))


def prompts_for(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


os.environ.setdefault("TRITON_INTERPRET", "1")
