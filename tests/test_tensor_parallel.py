"""Tensor parallel on the CPU (gloo), 2 and 4 processes: the same tokens and logits as one process for every family
and placement; the rank-local shapes the offload scheduler plans with; refusals before a run that keep the engine
usable; a rank failing mid-run named on rank 0, with every rank's memory back and no process left hanging.

Each world size starts its processes once (tests/tp_workers.py runs the whole plan on one process group); the tests
then read what the ranks wrote.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from engine import GenerationSettings, Generator, load_model
from engine.adapters import ModelSpec
from engine.parallel import RankSlice, shard_refusal
from engine.settings import OffloadSettings
from tp_workers import WorldPlan, free_port, join_world, prompts_for, start_world

pytestmark = pytest.mark.usefixtures("one_thread", "profile_cache")  # conftest.py

FAMILIES = ("tiny-llama-tp", "tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3",
            "tiny-phi3", "tiny-opt")
LENGTHS = [7, 3, 12]  # mixed lengths, shorter than Phi-3's 64-position original context with the new tokens
NEW_TOKENS = 5
GREEDY = GenerationSettings(max_new_tokens=NEW_TOKENS, ignore_eos=True)
CASES = {
    "gpu": GREEDY,
    "cpu split 0": replace(GREEDY, offload=OffloadSettings(placement="cpu", split=0.0, chunk_tokens=3)),
    "cpu split 0.5": replace(GREEDY, offload=OffloadSettings(placement="cpu", split=0.5, chunk_tokens=2)),
    "cpu split 1": replace(GREEDY, offload=OffloadSettings(placement="cpu", split=1.0, chunk_tokens=3)),
    "cpu auto": replace(GREEDY, offload=OffloadSettings(placement="cpu")),
    "hybrid split 0.3": replace(GREEDY, offload=OffloadSettings(placement="hybrid", split=0.3, chunk_tokens=2)),
}
# Shapes that do not split: refused on every rank before anything runs.
UNSPLITTABLE = {
    "tiny-llama-3heads": dict(model_type="llama", hidden_size=48, intermediate_size=160, num_hidden_layers=2,
                              num_attention_heads=3, num_key_value_heads=3, vocab_size=384,
                              max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0),
}
# 2 ranks run every family in every placement; 4 ranks every placement for the presets whose K/V heads replicate
# (fewer than 4) and for tiny-llama-tp, the resident, a recomputing and the hybrid placement for the rest.
FULL_AT_4 = ("tiny-llama-tp", "tiny-llama3", "tiny-gemma3")
SOME = ("gpu", "cpu split 0.5", "hybrid split 0.3")
SHARDED = ("tiny-gemma2", "tiny-phi3")  # a tied LM head; LongRoPE, fused projections and an untied head
WORLDS = {
    2: dict(refuse_on=1, fail_on=1, fail_stage="decode step 2"),
    4: dict(refuse_on=3, fail_on=2, fail_stage="decode step 1"),
}
RUN_TIMEOUT_S = 240  # the whole plan of one world; a hang fails the test instead of the suite


def _prompts(name: str) -> list[list[int]]:
    from engine.presets import PRESETS

    return prompts_for(PRESETS[name]["vocab_size"], LENGTHS, seed=len(name))


@pytest.fixture(scope="module")
def references():
    """The single-process runs every tensor-parallel run must equal."""
    out = {}
    for name in FAMILIES:
        model = load_model(f"synthetic:{name}", device="cpu", dtype="float32")
        for case, settings in CASES.items():
            result = Generator(model).generate(_prompts(name), settings, keep_logits=True)
            out[name, case] = (result.token_ids, torch.stack(result.logits))
        out[name, "spec"] = model.spec
    model = load_model(f"synthetic:{FAMILIES[0]}", device="cpu", dtype="float32")
    sampled = replace(GREEDY, sampling=replace(GREEDY.sampling, temperature=0.9, top_k=50, top_p=0.95, seed=7))
    out["seeded"] = Generator(model).generate(_prompts(FAMILIES[0]), sampled).token_ids
    return out


def _cases_for(size: int, preset: str) -> tuple[str, ...]:
    return tuple(CASES) if size == 2 or preset in FULL_AT_4 else SOME


_WORLDS: dict[int, dict] = {}  # each world size starts once per test session


def _world(size: int, tmp_path_factory, references) -> dict:
    if size not in _WORLDS:
        out = tmp_path_factory.mktemp(f"tp{size}")
        plan = WorldPlan(world_size=size, presets=FAMILIES, prompts={n: _prompts(n) for n in FAMILIES}, cases=CASES,
                         cases_for={n: _cases_for(size, n) for n in FAMILIES}, extra_presets=UNSPLITTABLE,
                         sharded_presets=SHARDED, **WORLDS[size])
        codes = join_world(start_world(plan, out), timeout_s=RUN_TIMEOUT_S)
        statuses = {}
        for rank in range(size):
            path = out / f"status-{rank}.json"
            statuses[rank] = json.loads(path.read_text()) if path.exists() else None
        _WORLDS[size] = {"size": size, "dir": out, "codes": codes, "status": statuses, "plan": plan}
    return _WORLDS[size]


@pytest.fixture(scope="module", params=sorted(WORLDS), ids=lambda n: f"{n} ranks")
def world(request, tmp_path_factory, references):
    return _world(request.param, tmp_path_factory, references)


def _load(world, name: str):
    path = world["dir"] / f"{name}.pt"
    assert path.exists(), f"rank 0 of {world['size']} wrote no {name} (exit codes {world['codes']})"
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize(("size", "preset", "case"),
                         [(size, preset, case) for size in sorted(WORLDS) for preset in FAMILIES
                          for case in _cases_for(size, preset)])
def test_tokens_and_logits_equal_one_process(tmp_path_factory, references, size, preset, case):
    world = _world(size, tmp_path_factory, references)
    run = _load(world, f"run-{preset}-{case}")
    tokens, logits = references[preset, case]
    assert run["tokens"] == tokens
    worst = float((run["logits"] - logits).abs().max())
    assert worst < 1e-4, f"logits differ by {worst} over {world['size']} ranks"


@pytest.mark.parametrize("preset", FAMILIES)
def test_each_rank_plans_with_its_own_kv_and_full_activations(world, references, preset):
    """The rank's spec: its query and K/V heads (K/V heads replicated when fewer than ranks), its MLP slice, the full
    hidden size; so its K/V bytes per token are its heads' and its activation bytes the full hidden state's."""
    whole: ModelSpec = references[preset, "spec"]
    local = _load(world, f"spec-{preset}")
    size = world["size"]
    assert local["num_heads"] == whole.num_heads // size
    assert local["num_kv_heads"] == max(1, whole.num_kv_heads // size)
    assert local["intermediate_size"] == whole.intermediate_size // size
    assert (local["hidden_size"], local["head_dim"], local["vocab_size"]) == \
        (whole.hidden_size, whole.head_dim, whole.vocab_size)
    assert local["kv_bytes_per_token"] == whole.kv_bytes_per_token * local["num_kv_heads"] // whole.num_kv_heads
    assert local["act_bytes_per_token"] == whole.act_bytes_per_token
    assert local["num_params"] < whole.num_params


def test_offloaded_plans_move_rank_local_kv_and_full_activations(world, references):
    """What the plans of rank 0 ship per step: split 0 copies its own K/V heads, split 1 the full activations."""
    preset = FAMILIES[0]
    whole: ModelSpec = references[preset, "spec"]
    local = _load(world, f"spec-{preset}")
    batch = len(LENGTHS)
    copy, recompute = _load(world, f"run-{preset}-cpu split 0"), _load(world, f"run-{preset}-cpu split 1")
    for step, (copied, rebuilt) in enumerate(zip(copy["h2d_bytes"], recompute["h2d_bytes"])):
        offloaded = max(LENGTHS) + step  # slots before the new token, all in host memory
        assert copied == offloaded * batch * local["kv_bytes_per_token"]
        assert rebuilt == offloaded * batch * whole.act_bytes_per_token


def test_a_refusing_rank_is_named_and_the_engine_stays_usable(world, references):
    events = _load(world, "events")
    rank = world["plan"].refuse_on
    assert events["refused"]["error"].startswith("OutOfMemoryError: rank"), events["refused"]
    assert f"rank {rank} refused the run" in events["refused"]["error"]
    assert "injected: no room" in events["refused"]["error"]
    assert events["after refusal"]["tokens"] == references[FAMILIES[0], "gpu"][0]


def test_unsupported_settings_and_bad_input_are_refused_on_rank_0(world):
    events = _load(world, "events")
    assert events["fused"]["error"].startswith("InvalidSettingsError: fused=True is not supported under tensor")
    assert events["compile"]["error"].startswith("InvalidSettingsError: compile=True is not supported")
    assert events["bad prompt"]["error"].startswith("InvalidSettingsError: prompt 0 is empty")
    assert events["too long"]["error"].startswith("PromptTooLongError:")  # every rank refused it at once


def test_sampling_agrees_across_ranks_and_with_one_process(world, references):
    events = _load(world, "events")
    assert events["seeded"]["tokens"] == references["seeded"]
    unseeded = [world["status"][rank]["unseeded"] for rank in range(world["size"])]
    assert unseeded[0] == events["unseeded"]["tokens"]
    assert all(tokens == unseeded[0] for tokens in unseeded), unseeded


def test_heads_that_do_not_split_are_refused_on_every_rank(world):
    size = world["size"]
    for rank in range(size):
        message = world["status"][rank]["refusals"]["tiny-llama-3heads"]
        assert message.startswith(f"UnsupportedArchitectureError: Tensor parallel over {size} ranks refused"), message
        assert f"3 query heads do not split over {size} ranks" in message and "(1, 3)" in message, message


@pytest.mark.parametrize("preset", SHARDED)
def test_a_model_sharded_before_its_weights_exist_is_one_model_on_every_rank(world, references, preset):
    """materialize='sharded' (the 70B presets' way): replicated tensors equal on every rank, each rank's own part its
    own draw, and every rank decodes the same tokens from finite logits."""
    facts = [world["status"][rank]["sharded"][preset] for rank in range(world["size"])]
    assert facts[0]["finite"]
    assert all(f["replicated"] == facts[0]["replicated"] for f in facts)
    assert len({f["own"] for f in facts}) == world["size"], "ranks drew the same part"
    assert all(f["tokens"] == facts[0]["tokens"] for f in facts)
    assert facts[0]["num_kv_heads"] == max(1, references[preset, "spec"].num_kv_heads // world["size"])


def test_a_rank_failing_mid_run_is_named_and_every_rank_lets_go(world):
    plan, status, codes = world["plan"], world["status"], world["codes"]
    assert codes == [0] * world["size"], f"exit codes {codes}: a rank hung or crashed"
    failure = status[0]["failure"]
    assert f"rank {plan.fail_on} failed during {plan.fail_stage}" in failure, failure
    assert f"injected fault on rank {plan.fail_on}" in failure
    assert "every rank left the process group and released its run's memory" in failure
    assert status[0]["failure_s"] < 20, "rank 0 waited for a timeout instead of hearing of the failure"
    assert status[0]["after_failure"].startswith("TensorParallelError: The tensor-parallel engine is not running")
    for rank in range(world["size"]):
        # Nothing kept. Fewer bytes than before is fine: leaving the group frees what torch.distributed still held
        # from earlier collectives (a few hundred bytes of pickled-object buffers, seen on one run in several).
        assert status[rank]["held_growth"] <= 0, f"rank {rank} kept {status[rank]['held_growth']} bytes"
        assert status[rank]["group_closed"], f"rank {rank} is still in the process group"
        if rank:
            assert status[rank]["follow"].startswith("Tensor-parallel run over"), status[rank]["follow"]


@pytest.mark.parametrize(("heads", "kv_heads", "intermediate", "world_size", "needle"), [
    (6, 6, 160, 4, "6 query heads do not split over 4 ranks"),
    (8, 6, 160, 4, "6 K/V heads do not split over 4 ranks"),
    (6, 2, 162, 3, "2 K/V heads cannot be replicated evenly onto 3 ranks"),
    (8, 4, 161, 2, "the MLP's 161 intermediate features do not split over 2 ranks"),
])
def test_unsplittable_shapes_are_refused_with_counts_and_the_fix(heads, kv_heads, intermediate, world_size, needle):
    spec = _spec(num_heads=heads, num_kv_heads=kv_heads, intermediate_size=intermediate)
    why = shard_refusal(spec, world_size)
    assert why is not None and needle in why and "launch a world size" in why


@pytest.mark.parametrize("world_size", [2, 4, 8, 16])
def test_kv_heads_split_or_replicate_so_each_rank_reads_its_query_heads_group(world_size):
    """Rank r's query heads all belong to the K/V heads it holds (query head h reads K/V head h // group)."""
    spec = _spec(num_heads=16, num_kv_heads=4, intermediate_size=64)
    assert shard_refusal(spec, world_size) is None
    seen = set()
    for rank in range(world_size):
        part = RankSlice(spec=spec, rank=rank, world_size=world_size)
        kv_lo, kv_hi = part.kv_heads
        needed = {h // spec.gqa_group for h in range(*part.heads)}
        assert needed == set(range(kv_lo, kv_hi)), (rank, needed, part.kv_heads)
        seen.update(range(*part.heads))
    assert seen == set(range(spec.num_heads))


def test_70b_rank_specs_plan_their_own_kv_and_full_activations():
    """llama-3-70b over 2, 4 and 8 ranks (shapes only, on the meta device): K/V per token shrinks with the ranks,
    the activations that KV recomputation ships stay the full hidden state's, so recomputation pays less per rank."""
    from transformers import AutoModelForCausalLM

    from engine.adapters import adapter_for
    from engine.presets import preset_config

    with torch.device("meta"):
        whole = adapter_for(AutoModelForCausalLM.from_config(preset_config("llama-3-70b"), dtype=torch.bfloat16)).spec
    assert (whole.hidden_size, whole.num_heads, whole.num_kv_heads, whole.num_layers, whole.vocab_size) == \
        (8192, 64, 8, 80, 128256)
    ratios = []
    for world_size in (2, 4, 8):
        local = replace(whole, **RankSlice(spec=whole, rank=0, world_size=world_size).local_spec_fields())
        assert local.kv_bytes_per_token * world_size == whole.kv_bytes_per_token
        assert local.act_bytes_per_token == whole.act_bytes_per_token
        ratios.append(local.act_to_kv_ratio)
    assert ratios == [whole.act_to_kv_ratio * n for n in (2, 4, 8)]


def _spec(**shape) -> ModelSpec:
    base = dict(family="llama", model_type="llama", num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=4,
                head_dim=8, intermediate_size=160, vocab_size=384, max_positions=512, positional="rope",
                sliding_window=None, qkv_bias=False, qk_norm=False, num_params=1, dtype_bytes=4)
    return ModelSpec(**(base | shape))


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory):
    """`torchrun -m bench tp --quick` on 2, then 4 ranks (CPU, gloo), into one results folder."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    results = tmp_path_factory.mktemp("tp-bench")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    runs = {}
    for ranks in (2, 4):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                               "--master-port", str(free_port()), "-m", "bench", "tp", "--quick", "--repeat", "1",
                               "--results-dir", str(results)], cwd=root, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[ranks] = json.loads((results / f"tp{ranks}_quick.json").read_text())
    return runs


@pytest.mark.parametrize("ranks", [2, 4])
def test_bench_reports_per_rank_and_aggregate_pcie(bench_runs, references, ranks):
    run = bench_runs[ranks]
    whole: ModelSpec = references["tiny-llama-tp", "spec"]
    assert run["suite"] == f"tp{ranks}_quick" and run["details"]["world_size"] == ranks
    assert [r["case"] for r in run["rows"]] == [f"tiny-llama-tp B2 P48 N8 {p} TP{ranks}"
                                                 for p in ("gpu", "cpu auto", "cpu split 0", "hybrid auto")]
    for row in run["rows"]:
        extra = row["extra"]
        assert len(extra["per_rank_link_gb_s"]) == ranks and all(g > 0 for g in extra["per_rank_link_gb_s"])
        assert extra["sum_link_gb_s"] == pytest.approx(sum(extra["per_rank_link_gb_s"]))
        assert extra["per_rank_kv_bytes_per_token"] == [whole.kv_bytes_per_token // ranks] * ranks
        assert extra["act_bytes_per_token"] == whole.act_bytes_per_token
        assert row["ms"] > 0 and 0 < row["pct_roofline"] < 100
        if " gpu " in row["case"]:
            assert extra["per_rank_h2d_bytes"] == [0] * ranks
        else:
            assert all(b > 0 for b in extra["per_rank_h2d_bytes"])
            assert extra["aggregate_h2d_gb_s"] == pytest.approx(sum(extra["per_rank_h2d_gb_s"]))
    quick = run["details"]["quick_headlines"]
    assert quick["tp_offload_pct_aggregate_pcie"] > 0
    assert ("tp2_decode_pct_roofline" in quick) == (ranks == 2)
    assert ("tp4_vs_tp2_offload_speedup" in quick) == (ranks == 4)  # the 4-rank run reads the 2-rank one
    assert not run["headlines"]  # a quick run's figures never reach summary.json
