"""KV Lab on the peers' models and shapes: synthetic OPT (random weights, bf16 on a GPU), three placements.

- cpu0:   all K/V in pinned host memory, split 0 (every K/V copied each step) - the schedule FlexGen runs;
- cpu:    all K/V in pinned host memory, auto split (KVPR: the scheduler recomputes what pays) - KV Lab's figure
          against the peers (summary ratios);
- hybrid: half the run's K/V kept on the GPU (the budget a GPU of any size allows here), the rest offloaded, auto.
A run's step time is the median decode step after two warm steps (the engine's own per-step wall time), its bytes
the plan's host-to-device bytes per step, its floor those bytes at the best H2D bandwidth measured in this run.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from bench.peers.shapes import Shape
from engine import GenerationSettings, Generator, load_model
from engine.offload.placement import plan_for
from engine.settings import OffloadSettings

PLACEMENTS = ("cpu0", "cpu", "hybrid")
PLACEMENT_LABELS = {"cpu0": "K/V on the CPU, split 0 (all K/V copied)", "cpu": "K/V on the CPU, auto split",
                    "hybrid": "hybrid: half the K/V on the GPU, auto split"}


def offload_settings(placement: str, *, kv_gib: float) -> OffloadSettings:
    if placement == "cpu0":
        return OffloadSettings(placement="cpu", split=0.0)
    if placement == "cpu":
        return OffloadSettings(placement="cpu")
    if placement == "hybrid":
        return OffloadSettings(placement="hybrid", gpu_kv_budget_gib=kv_gib / 2)
    raise ValueError(f"unknown placement {placement!r}; choose from {', '.join(PLACEMENTS)}")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)  # pinned blocks torch's host allocator keeps
        if empty_host is not None:
            empty_host()


def prompts(vocab_size: int, shape: Shape, *, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (shape.batch, shape.prompt_tokens), generator=gen).tolist()


def measure(engine: Generator, ids: list[list[int]], settings: GenerationSettings, *, repeat: int) -> dict:
    """Median decode step (ms, median of the runs' medians) and the plan's figures for the same steps."""
    medians, result = [], None
    for _ in range(max(1, repeat)):
        result = engine.generate(ids, settings)
        steady = result.step_ms[2:] or result.step_ms
        medians.append(statistics.median(steady))
        free_memory()
    out = {"step_ms": statistics.median(medians), "run_medians_ms": medians, "prefill_ms": result.prefill_ms}
    plan = engine.plan if settings.offload.offloaded else None
    if plan is not None:
        steps = plan.steps[3: len(result.step_ms) + 1] or plan.steps
        out |= {"predicted_ms": statistics.median(s.predicted_ms for s in steps),
                "pcie_floor_ms": statistics.median(s.pcie_floor_ms for s in steps),
                "h2d_bytes_per_step": int(statistics.median(s.h2d_bytes for s in steps)),
                "split": statistics.median(s.split for s in steps), "reason": plan.steps[0].reason,
                "resident_tokens": plan.resident_tokens, "budget": plan.gpu_budget_note}
    return out


def estimate_s(model, offload: OffloadSettings, shape: Shape, *, repeat: int) -> float:
    """The run's wall time from its plan's predicted steps (the scheduler is within ~10 % on H100/H200), with room
    for the prefill, the store's allocation and graph capture."""
    try:
        plan = plan_for(model.spec, offload, device=model.device, batch=shape.batch,
                        prompt_tokens=shape.prompt_tokens, new_tokens=shape.new_tokens)
        decode_s = sum(s.predicted_ms for s in plan.steps) / 1e3
    except Exception:  # noqa: BLE001 - no estimate: the run itself will say what is wrong
        decode_s = 0.0
    return max(1, repeat) * (4.0 + 1.5 * decode_s)


def run_kvlab(source: str, *, model_name: str, shapes: list[Shape], placements: list[str], device: str, dtype: str,
              repeat: int, time_left_s) -> list[dict]:
    """Every (shape, placement) of one model, as run dicts (see bench.suites.peers); the model is freed after.
    `time_left_s()` says how long the suite may still run: a run that would not fit is skipped, and says so."""
    runs: list[dict] = []
    base = {"engine": "kvlab", "label": "KV Lab", "model": model_name, "source": source, "dtype": dtype}
    try:
        model = load_model(source, device=device, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - recorded for every run it would have made
        return [base | {"shape": s.name, "batch": s.batch, "prompt_tokens": s.prompt_tokens,
                        "new_tokens": s.new_tokens, "placement": p, "variant": PLACEMENT_LABELS[p],
                        "status": "failed", "error": f"load_model({source!r}): {type(exc).__name__}: {exc}"[:600]}
                for s in shapes for p in placements]
    engine = Generator(model)
    warmed = False
    for shape in shapes:
        ids = prompts(model.spec.vocab_size, shape)
        kv_gib = model.spec.kv_bytes_per_token * shape.batch * shape.max_tokens / 2**30
        for placement in placements:
            run = base | {"shape": shape.name, "batch": shape.batch, "prompt_tokens": shape.prompt_tokens,
                          "new_tokens": shape.new_tokens, "placement": placement,
                          "variant": PLACEMENT_LABELS[placement]}
            offload = offload_settings(placement, kv_gib=kv_gib)
            needed_s = estimate_s(model, offload, shape, repeat=repeat)
            if time_left_s() < needed_s:
                runs.append(run | {"status": "skipped", "error": f"the suite's time budget: {time_left_s():.0f} s "
                                                                 f"left, this run needs ~{needed_s:.0f} s"})
                continue
            run["settings"] = {"peer": "KV Lab", "offload.placement": offload.placement, "offload.split": offload.split,
                               "offload.gpu_kv_budget_gib": offload.gpu_kv_budget_gib,
                               "offload.chunk_tokens": offload.chunk_tokens, "peer.attention": "gpu",
                               "peer.dtype": dtype, "peer.weights": "random, on the GPU"}
            start = time.monotonic()
            try:
                if not warmed:  # cuBLAS handles, allocator, kernels: once per model
                    engine.generate(ids[:1], GenerationSettings(max_new_tokens=3, ignore_eos=True))
                    warmed = True
                m = measure(engine, ids, GenerationSettings(max_new_tokens=shape.new_tokens, ignore_eos=True,
                                                            offload=offload), repeat=repeat)
            except Exception as exc:  # noqa: BLE001 - one run's failure is recorded; the others still run
                runs.append(run | {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:600],
                                   "wall_s": time.monotonic() - start})
                free_memory()
                continue
            runs.append(run | m | {"status": "ok", "tok_s": shape.batch / (m["step_ms"] * 1e-3),
                                   "wall_s": time.monotonic() - start})
    del engine, model
    free_memory()
    return runs
