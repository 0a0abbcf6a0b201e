"""The offload scheduler and placement on hand-built profiles and real model shapes: ranges partition the slots,
chunks tile the recompute range, auto picks the fastest simulated split, manual splits pass through, floors and
the paper's rule match hand arithmetic, and plans hold no tensors. Pure Python: no model, no measurement."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from engine.adapters import ModelSpec
from engine.errors import OutOfMemoryError
from engine.offload.placement import plan_for, prefill_working_bytes, resident_tokens, staging_bytes
from engine.offload.profiler import GemmCurve, HardwareProfile, Point
from engine.offload.scheduler import (
    PAPER_PCIE_GB_S,
    PAPER_TFLOP_S,
    CostModel,
    RunPlan,
    StepPlan,
    paper_split,
    pcie_floor_ms,
    plan_run,
    plan_step,
    simulate_step,
)
from engine.settings import OffloadSettings

MiB = 1 << 20
GiB = 1 << 30
GEMM_ROWS = (512, 2048, 8192, 32768, 131072)


def h100_like(*, h2d_scale: float = 1.0, gemm_scale: float = 1.0) -> HardwareProfile:
    """H2D 48 GB/s at 1 MiB rising to 54.8 GB/s at 256 MiB; HBM copy 2990 GB/s; attention 2900 GB/s;
    GEMMs 450 -> 780 TFLOP/s over 512..131072 rows; 8 us per launch."""
    h2d = (Point(size=MiB, rate=48.0 * h2d_scale), Point(size=16 * MiB, rate=52.0 * h2d_scale),
           Point(size=256 * MiB, rate=54.8 * h2d_scale))
    rates = [450 + (780 - 450) * i / (len(GEMM_ROWS) - 1) for i in range(len(GEMM_ROWS))]
    gemm = tuple(GemmCurve(hidden=h, out_features=n,
                           points=tuple(Point(size=r, rate=t * gemm_scale) for r, t in zip(GEMM_ROWS, rates)))
                 for h, n in ((4096, 8192), (5120, 10240), (4096, 2048)))
    return HardwareProfile(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", driver="550.54.15",
                           torch_version="2.5.1", measured_at="2025-01-01T00:00:00+00:00", h2d=h2d, d2h=h2d,
                           bidirectional_gb_s=95.0, hbm_copy_gb_s=2990.0, attention_gb_s=2900.0, gemm=gemm,
                           launch_us=8.0)


def _spec(**kw) -> ModelSpec:
    base = dict(family="llama", model_type="llama", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
                head_dim=128, intermediate_size=11008, vocab_size=32000, max_positions=4096, positional="rope",
                sliding_window=None, qkv_bias=False, qk_norm=False, num_params=6_740_000_000, dtype_bytes=2)
    return ModelSpec(**(base | kw))


LLAMA2_7B = _spec()  # MHA
LLAMA3_8B = _spec(num_kv_heads=8, intermediate_size=14336, vocab_size=128256, max_positions=8192,
                  num_params=8_030_000_000)  # GQA, group 4
OPT_6_7B = _spec(family="opt", model_type="opt", intermediate_size=16384, vocab_size=50272, max_positions=2048,
                 positional="learned", qkv_bias=True, num_params=6_700_000_000)  # MHA, learned positions
SPECS = {"llama-2-7b": LLAMA2_7B, "llama-3-8b": LLAMA3_8B, "opt-6.7b": OPT_6_7B}
PROFILE = h100_like()


def _run(spec=LLAMA2_7B, *, placement="cpu", batch=2, prompt_tokens=97, new_tokens=6, resident=0, split=None,
         chunk_tokens=32, profile=PROFILE) -> RunPlan:
    return plan_run(spec, profile, placement=placement, batch=batch, prompt_tokens=prompt_tokens,
                    new_tokens=new_tokens, resident_tokens=resident, split=split, chunk_tokens=chunk_tokens)


def _length(r: tuple[int, int]) -> int:
    assert r[0] <= r[1], f"range {r} runs backwards"
    return r[1] - r[0]


# -- ranges ---------------------------------------------------------------------------------------------
RANGE_CASES = [  # (spec, placement, batch, prompt, new, resident, split, chunk)
    ("llama-2-7b", "cpu", 1, 1, 5, 0, None, 7),
    ("llama-2-7b", "cpu", 3, 54, 4, 0, 0.37, 7),
    ("llama-2-7b", "cpu", 8, 97, 3, 0, 1.0, 32),
    ("llama-2-7b", "hybrid", 2, 97, 9, 40, 0.5, 16),
    ("llama-2-7b", "hybrid", 2, 97, 9, 100, 0.5, 16),  # the resident budget ends among the new tokens
    ("llama-2-7b", "hybrid", 8, 2048, 2, 300, None, 512),
    ("llama-3-8b", "cpu", 4, 97, 3, 0, None, 32),
    ("llama-3-8b", "hybrid", 4, 54, 3, 20, 0.8, 5),
    ("opt-6.7b", "cpu", 5, 97, 3, 0, 0.25, 10),
    ("opt-6.7b", "gpu", 2, 54, 3, 0, None, 8),
]


@pytest.mark.parametrize("case", RANGE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_step_ranges_partition_the_old_slots(case):
    name, placement, batch, prompt, new, resident, split, chunk = case
    plan = _run(SPECS[name], placement=placement, batch=batch, prompt_tokens=prompt, new_tokens=new,
                resident=resident, split=split, chunk_tokens=chunk)
    assert len(plan.steps) == new
    for i, step in enumerate(plan.steps):
        old = step.seq_len - 1
        assert step.seq_len == prompt + 1 + i
        res, rec, tra = step.resident_range, step.recompute_range, step.transfer_range
        assert res[0] == 0
        resident_old = min(res[1], old)  # a budget past the new slot also covers it; count old slots only
        assert resident_old + _length(rec) + _length(tra) == old
        assert step.recompute_tokens == _length(rec) and step.transfer_tokens == _length(tra)
        assert step.offloaded_tokens == old - resident_old
        if step.resident_tokens < old:  # contiguous and ordered: resident | recompute | transfer
            assert res[1] == rec[0] and rec[1] == tra[0] and tra[1] == old
        else:
            assert _length(rec) == _length(tra) == 0
            assert "resident" in step.reason


CHUNK_CASES = [  # (offloaded, split, chunk): r = round(split * offloaded)
    (100, 0.96, 32),  # r 96: 32 divides it
    (100, 0.96, 7),  # r 96: 7 does not
    (100, 0.96, 96),  # one chunk exactly
    (100, 0.96, 500),  # chunk larger than the range: one short chunk
    (97, 1.0, 10),
    (97, 0.5, 1),  # r 48 (round half to even) in chunks of one slot
    (54, 0.0, 8),  # nothing recomputed: no chunks
]


@pytest.mark.parametrize("offloaded,split,chunk", CHUNK_CASES)
@pytest.mark.parametrize("resident", [0, 13])
def test_chunks_tile_the_recompute_range(offloaded, split, chunk, resident):
    cost = CostModel(spec=LLAMA2_7B, profile=PROFILE, batch=2)
    step = plan_step(cost, seq_len=resident + offloaded + 1, resident=resident, chunk_tokens=chunk, split=split)
    r = round(split * offloaded)
    assert step.recompute_tokens == r
    chunks = step.chunks
    assert len(chunks) == math.ceil(r / chunk)
    if r == 0:
        assert chunks == ()
        return
    assert chunks[0][0] == resident and chunks[-1][1] == resident + r
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])), chunks
    sizes = [hi - lo for lo, hi in chunks]
    assert all(s == chunk for s in sizes[:-1]), sizes
    assert 0 < sizes[-1] <= chunk and sum(sizes) == r
    assert (sizes[-1] == chunk) == (r % chunk == 0)


# -- auto split -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,prompt", [(1, 97), (8, 2048), (32, 4096)])
def test_gqa_auto_never_recomputes_and_says_why(batch, prompt):
    plan = _run(LLAMA3_8B, batch=batch, prompt_tokens=prompt, new_tokens=3, chunk_tokens=256)
    assert all(s.recompute_tokens == 0 for s in plan.steps)
    assert not plan.recompute_enabled and plan.act_range[0] == plan.act_range[1]
    for text in (plan.reason, plan.steps[-1].reason):
        assert "GQA" in text and "recompute off" in text
        assert "2.00x" in text  # h 4096 against 2 * 8 * 128 per token


def test_mha_reason_quotes_its_ratio():
    assert "MHA" in _run(LLAMA2_7B).reason and "0.50x" in _run(LLAMA2_7B).reason  # 4096 / (2 * 32 * 128)


def _brute_force_best(cost: CostModel, *, seq_len: int, resident: int, chunk: int, step: int) -> tuple[float, int]:
    offloaded = seq_len - 1 - resident
    rs = sorted({*range(0, offloaded + 1, step), offloaded})
    return min((simulate_step(cost, seq_len=seq_len, resident=resident, recompute=r, chunk_tokens=chunk)[0], r)
               for r in rs)


def test_mha_7b_auto_recomputes_and_beats_copying_all_kv():
    cost = CostModel(spec=LLAMA2_7B, profile=PROFILE, batch=8)
    seq_len, chunk = 2049, 512
    auto = plan_step(cost, seq_len=seq_len, resident=0, chunk_tokens=chunk, split=None)
    copy_all = plan_step(cost, seq_len=seq_len, resident=0, chunk_tokens=chunk, split=0.0)
    assert auto.recompute_tokens > 0
    assert auto.predicted_ms < copy_all.predicted_ms
    assert f"{auto.predicted_ms:.1f} ms" in auto.reason and f"{copy_all.predicted_ms:.1f} ms" in auto.reason
    # The prediction is what the simulator says for the chosen r (no separate formula).
    assert auto.predicted_ms == simulate_step(cost, seq_len=seq_len, resident=0, recompute=auto.recompute_tokens,
                                              chunk_tokens=chunk)[0]
    for grid in (chunk, 64):  # every chunk multiple, then a finer grid the planner does not search
        best_ms, best_r = _brute_force_best(cost, seq_len=seq_len, resident=0, chunk=chunk, step=grid)
        assert best_ms - 1e-9 <= auto.predicted_ms <= 1.05 * best_ms, (grid, best_r, auto.recompute_tokens)


@pytest.mark.parametrize("batch,prompt,resident,chunk", [(1, 97, 0, 32), (4, 1000, 0, 128), (2, 2000, 0, 512),
                                                         (8, 1500, 700, 256), (16, 4096, 0, 512)])
def test_auto_is_within_5_percent_of_the_chunk_grid_brute_force(batch, prompt, resident, chunk):
    cost = CostModel(spec=LLAMA2_7B, profile=PROFILE, batch=batch)
    auto = plan_step(cost, seq_len=prompt + 1, resident=resident, chunk_tokens=chunk, split=None)
    best_ms, _ = _brute_force_best(cost, seq_len=prompt + 1, resident=resident, chunk=chunk, step=chunk)
    assert best_ms - 1e-9 <= auto.predicted_ms <= 1.05 * best_ms


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("split", [0.0, 0.1, 0.25, 0.5, 0.73, 1.0])
def test_manual_split_fixes_r(name, split):
    plan = _run(SPECS[name], batch=4, prompt_tokens=97, new_tokens=5, resident=9, split=split, chunk_tokens=16,
                placement="hybrid")
    for step in plan.steps:
        assert step.recompute_tokens == round(split * step.offloaded_tokens)
        assert f"manual split {split:g}" in step.reason
    assert plan.reason == plan.steps[0].reason  # a fixed split is not re-chosen
    assert plan.recompute_enabled == (split > 0)


# -- predictions and floors -----------------------------------------------------------------------------
@pytest.mark.parametrize("batch,prompt", [(1, 97), (8, 2048), (16, 4096)])
def test_split_0_prediction_is_at_least_the_pcie_floor(batch, prompt):
    cost = CostModel(spec=LLAMA2_7B, profile=PROFILE, batch=batch)
    step = plan_step(cost, seq_len=prompt + 1, resident=0, chunk_tokens=512, split=0.0)
    kv_bytes = 32 * prompt * batch * 2 * 32 * 128 * 2  # layers x slots x K/V bytes of one slot of every sequence
    assert step.h2d_bytes == kv_bytes
    assert step.pcie_floor_ms == pytest.approx(kv_bytes / 54.8e9 * 1e3, rel=1e-12)
    assert step.pcie_floor_ms == pytest.approx(
        pcie_floor_ms(LLAMA2_7B, PROFILE, batch=batch, offloaded_tokens=prompt), rel=1e-12)
    assert step.predicted_ms >= step.pcie_floor_ms
    if kv_bytes // 32 >= 64 * MiB:  # a layer's K/V is a large copy: PCIe-bound, within a few % of the floor
        assert step.predicted_ms <= 1.03 * step.pcie_floor_ms


def test_pcie_floor_by_hand():
    # llama-3-8b, batch 4, 1000 offloaded tokens: 32 layers x 1000 x 4 x (2 x 8 x 128 x 2 B) at 54.8 GB/s
    expected = 32 * 1000 * 4 * 4096 / 54.8e9 * 1e3
    assert pcie_floor_ms(LLAMA3_8B, PROFILE, batch=4, offloaded_tokens=1000) == pytest.approx(expected, rel=1e-12)
    assert pcie_floor_ms(LLAMA3_8B, PROFILE, batch=4, offloaded_tokens=0) == 0.0


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b"])
@pytest.mark.parametrize("batch,recompute,chunk", [(1, 0, 32), (4, 64, 32), (8, 512, 128), (8, 37, 5)])
def test_more_transferred_tokens_are_never_faster(name, batch, recompute, chunk):
    cost = CostModel(spec=SPECS[name], profile=PROFILE, batch=batch)
    times = [simulate_step(cost, seq_len=s, resident=0, recompute=recompute, chunk_tokens=chunk)[0]
             for s in range(recompute + 1, recompute + 3000, 97)]
    assert all(a <= b for a, b in zip(times, times[1:])), times


@pytest.mark.parametrize("batch,seq_len,resident", [(1, 98, 0), (8, 2049, 0), (8, 2049, 1000), (32, 4097, 0)])
def test_faster_links_and_gemms_are_never_slower(batch, seq_len, resident):
    slow, fast_link, fast_gemm = (CostModel(spec=LLAMA2_7B, profile=p, batch=batch)
                                  for p in (PROFILE, h100_like(h2d_scale=2.0), h100_like(gemm_scale=2.0)))
    offloaded = seq_len - 1 - resident
    for r in sorted({0, 1, offloaded // 3, offloaded // 2, offloaded}):
        base = simulate_step(slow, seq_len=seq_len, resident=resident, recompute=r, chunk_tokens=128)[0]
        for fast in (fast_link, fast_gemm):
            assert simulate_step(fast, seq_len=seq_len, resident=resident, recompute=r, chunk_tokens=128)[0] <= base
    auto = {id(c): plan_step(c, seq_len=seq_len, resident=resident, chunk_tokens=128, split=None).predicted_ms
            for c in (slow, fast_link)}
    assert auto[id(fast_link)] <= auto[id(slow)]


def test_layer_times_add_up_and_follow_the_bytes():
    cost = CostModel(spec=LLAMA2_7B, profile=PROFILE, batch=8)
    _, layer = simulate_step(cost, seq_len=2049, resident=0, recompute=1024, chunk_tokens=256)
    assert layer.copy_ms == layer.act_copy_ms + layer.kv_copy_ms
    assert layer.compute_ms == layer.recompute_ms + layer.attention_ms + layer.other_ms
    # 1024 slots of K/V (128 MiB per layer) at the 16..256 MiB interpolated rate; activations are half the bytes.
    kv_bytes = 1024 * 8 * 2 * 32 * 128 * 2
    assert layer.kv_copy_ms == pytest.approx(kv_bytes / (PROFILE.h2d_gb_s(kv_bytes) * 1e9) * 1e3)
    assert layer.act_copy_ms == pytest.approx(4 * cost.copy_ms(kv_bytes / 2 / 4))  # four chunks of 256 slots
    for v in dataclasses.astuple(layer):
        assert v > 0 and math.isfinite(v)


# -- whole runs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", RANGE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_run_store_ranges_cover_every_step(case):
    name, placement, batch, prompt, new, resident, split, chunk = case
    plan = _run(SPECS[name], placement=placement, batch=batch, prompt_tokens=prompt, new_tokens=new,
                resident=resident, split=split, chunk_tokens=chunk)
    g = plan.resident_tokens
    assert plan.max_tokens == prompt + new
    assert plan.act_range[0] == g and plan.kv_range[1] == plan.max_tokens
    assert g <= plan.kv_range[0] <= plan.kv_range[1]
    for step in plan.steps:
        for lo, hi in [step.recompute_range] if step.recompute_tokens else []:
            assert plan.act_range[0] <= lo and hi <= plan.act_range[1], (step.recompute_range, plan.act_range)
        if step.transfer_tokens:
            lo, hi = step.transfer_range
            assert plan.kv_range[0] <= lo and hi <= plan.kv_range[1], (step.transfer_range, plan.kv_range)
        new_slot = step.seq_len - 1  # written back after the step unless it is resident
        if new_slot >= g:
            assert plan.kv_range[0] <= new_slot < plan.kv_range[1]
    assert plan.recompute_enabled == any(s.recompute_tokens for s in plan.steps)


@pytest.mark.parametrize("resident", [0, 40, 97, 100, 103, 500])
def test_hybrid_resident_tokens_are_respected(resident):
    plan = _run(LLAMA2_7B, placement="hybrid", prompt_tokens=97, new_tokens=6, resident=resident, split=0.5)
    g = min(resident, 103)
    assert plan.resident_tokens == g
    for step in plan.steps:
        assert step.resident_tokens == g
        assert step.offloaded_tokens == max(0, step.seq_len - 1 - g)
        assert step.recompute_range[0] == g
    assert plan.act_range[0] == g and plan.kv_range[0] >= g


def test_gpu_placement_makes_everything_resident():
    plan = _run(LLAMA2_7B, placement="gpu", prompt_tokens=97, new_tokens=6, resident=0, split=0.5)
    assert plan.resident_tokens == plan.max_tokens == 103
    assert not plan.recompute_enabled
    assert plan.kv_range == (103, 103) and plan.act_range == (103, 103)
    for step in plan.steps:
        assert step.offloaded_tokens == step.recompute_tokens == step.transfer_tokens == 0
        assert step.h2d_bytes == 0 and step.pcie_floor_ms == 0.0
        assert step.resident_range == (0, step.seq_len)
        assert "every token is resident" in step.reason


@pytest.mark.parametrize("placement,spec", [("gpu", LLAMA2_7B), ("cpu", LLAMA3_8B)], ids=["gpu-mha", "cpu-gqa"])
def test_d2h_bytes_count_only_what_is_written_back(placement, spec):
    batch = 2
    plan = _run(spec, placement=placement, batch=batch, prompt_tokens=54, new_tokens=3)
    kv_slot = spec.num_layers * batch * 2 * spec.num_kv_heads * spec.head_dim * spec.dtype_bytes
    act_slot = spec.num_layers * batch * spec.hidden_size * spec.dtype_bytes
    for step in plan.steps:
        slot = step.seq_len - 1
        expected = (kv_slot if plan.kv_range[0] <= slot < plan.kv_range[1] else 0) + \
            (act_slot if plan.act_range[0] <= slot < plan.act_range[1] else 0)
        assert step.d2h_bytes == expected


def _walk(value, path="plan"):
    """Yield (path, value) for every value reachable through dataclass fields, tuples, lists and dicts."""
    yield path, value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _walk(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, item in value.items():
            yield from _walk(item, f"{path}[{k!r}]")


@pytest.mark.parametrize("split", [None, 0.5])
def test_plans_hold_no_tensors(split):
    plan = _run(LLAMA2_7B, placement="hybrid", resident=20, split=split)
    seen = list(_walk(plan))
    assert any(isinstance(v, StepPlan) for _, v in seen)  # the walk reaches the steps
    bad = [p for p, v in seen if isinstance(v, torch.Tensor)]
    assert not bad, bad
    allowed = (str, int, float, bool, type(None), tuple, RunPlan, StepPlan)
    assert all(isinstance(v, allowed) or dataclasses.is_dataclass(v) for _, v in seen)


def test_run_plan_step_lookup():
    plan = _run(LLAMA2_7B, prompt_tokens=97, new_tokens=6)
    for i in range(6):
        assert plan.step(98 + i) is plan.steps[i] and plan.step(98 + i).seq_len == 98 + i
    for bad in (97, 0, -3, 104, 1000):
        with pytest.raises(IndexError, match=f"seq_len {bad}.*98..103"):
            plan.step(bad)


# -- the paper's rule ---------------------------------------------------------------------------------
def test_paper_split_by_hand():
    assert PAPER_PCIE_GB_S == 32.0 and PAPER_TFLOP_S == 312.0
    # llama-2-7b, per token and layer: K/V 2*32*128*2 B = 16384 B over 32 GB/s; rebuilding them from h = 4096
    # takes 2 * 4096 * 8192 FLOPs at 312 TFLOP/s.
    kv_s = 16384 / 32e9
    rec_s = 2 * 4096 * 8192 / 312e12
    expected = kv_s / (rec_s + kv_s)
    assert paper_split(LLAMA2_7B, batch=8) == pytest.approx(expected, rel=1e-12)
    assert paper_split(LLAMA2_7B, batch=8) == pytest.approx(1 / (1 + 4096 * 32e9 / 312e12), rel=1e-12)
    assert 0.70 < expected < 0.71
    assert paper_split(OPT_6_7B, batch=1) == pytest.approx(expected, rel=1e-12)  # same shapes
    assert paper_split(LLAMA3_8B, batch=8) == 0.0  # GQA: activations outweigh K/V


# -- placement ------------------------------------------------------------------------------------------
CPU = torch.device("cpu")


def test_resident_tokens_by_placement():
    kw = dict(device=CPU, batch=8, prompt_tokens=2048, new_tokens=128)
    assert resident_tokens(LLAMA2_7B, OffloadSettings(placement="cpu"), **kw)[0] == 0
    assert resident_tokens(LLAMA2_7B, OffloadSettings(placement="gpu"), **kw)[0] == 2176
    # One slot of every sequence, all layers: 32 x 2 x 8 x 32 x 128 x 2 B = 4 MiB; 1.3 GiB holds 332.8 of them.
    tokens, note = resident_tokens(LLAMA2_7B, OffloadSettings(placement="hybrid", gpu_kv_budget_gib=1.3), **kw)
    assert tokens == int(1.3 * GiB) // (4 * MiB) == 332
    assert "1.3 GiB" in note and "332 of 2176" in note
    tokens, _ = resident_tokens(LLAMA2_7B, OffloadSettings(placement="hybrid", gpu_kv_budget_gib=100.0), **kw)
    assert tokens == 2176  # capped at the run's slots
    tokens, _ = resident_tokens(LLAMA2_7B, OffloadSettings(placement="hybrid", gpu_kv_budget_gib=0.0), **kw)
    assert tokens == 0
    # GQA: a quarter of the bytes per slot (1 MiB), four times the slots.
    tokens, _ = resident_tokens(LLAMA3_8B, OffloadSettings(placement="hybrid", gpu_kv_budget_gib=1.3), **kw)
    assert tokens == int(1.3 * GiB) // MiB
    tokens, note = resident_tokens(LLAMA2_7B, OffloadSettings(placement="hybrid"), **kw)
    assert tokens == 1088 and "no GPU" in note  # no GPU and no budget: half of the slots


def test_working_and_staging_bytes_by_hand():
    # llama-2-7b, batch 8, prompt 2048 (one group of 8 x 2048 = 16384 tokens): the batch's hidden state; the group's
    # X, Q, K, V and two attention outputs (h + 3 Hq D + 2 Hkv D bf16 values per token); one slice of 16384 tokens of
    # 3 bf16 MLP intermediates and 3 fp32 hidden-wide norm temporaries; RoPE tables (cos, sin in bf16 and six fp32
    # intermediates of D values per position); fp32 + bf16 logits of the batch.
    tokens = 8 * 2048
    hidden = tokens * 4096 * 2
    group = tokens * (4096 + 3 * 4096 + 2 * 4096) * 2
    per_slice = 16384 * (3 * 11008 * 2 + 3 * 4096 * 4)
    rope = 2048 * 128 * (2 * 2 + 6 * 4)
    logits = 8 * 32000 * (4 + 2)
    assert prefill_working_bytes(LLAMA2_7B, batch=8, prompt_tokens=2048) == \
        hidden + group + per_slice + rope + logits == 2_835_836_928
    # An offloaded run also assembles each layer's host-bound K/V (and activations) of all sequences before one DMA.
    assert prefill_working_bytes(LLAMA2_7B, batch=8, prompt_tokens=2048, host_kv_tokens=2048, host_act_tokens=1000) \
        - prefill_working_bytes(LLAMA2_7B, batch=8, prompt_tokens=2048) == 8 * (2048 * 2 * 4096 + 1000 * 4096) * 2
    # 128K-token prompts run one sequence at a time: the hidden state is the batch's, the rest one sequence's.
    long = prefill_working_bytes(LLAMA2_7B, batch=4, prompt_tokens=131072)
    assert long - prefill_working_bytes(LLAMA2_7B, batch=1, prompt_tokens=131072) == 3 * 131072 * 4096 * 2 \
        + 3 * 32000 * 6
    # Two layers of staging K/V over the 2176 - 1000 offloaded slots, two of activations over 500 recomputed slots,
    # one write-back slot of K/V and activations per layer, and the [W_k; W_v] recompute weight.
    kv_slot, act_slot = 8 * 2 * 32 * 128 * 2, 8 * 4096 * 2
    assert staging_bytes(LLAMA2_7B, batch=8, staged_tokens=1176, act_tokens=500) == \
        2 * 1176 * kv_slot + 2 * 500 * act_slot + 32 * (kv_slot + act_slot) + 2 * 4096 * 4096 * 2


def test_run_that_fits_neither_memory_is_refused_naming_both_and_what_fits(monkeypatch):
    """A 128K-token llama-2-7b batch that needs more GPU and host memory than there is: refused before anything is
    allocated, naming both memories, the largest batch at that context and the longest prompt at that batch."""
    from engine import memory
    from engine.offload import placement

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (120 * GiB, 139 * GiB))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 110 * GiB)
    kw = dict(device=torch.device("cuda"), batch=16, prompt_tokens=131072 - 64, new_tokens=64)
    with pytest.raises(OutOfMemoryError) as refused:
        placement.plan_for(LLAMA2_7B, OffloadSettings(placement="hybrid"), profile=PROFILE, **kw)
    text = str(refused.value)
    assert "K/V for batch 16 x 131,072 tokens is 1024.0 GiB" in text and "split between the GPU and host" in text
    assert "GiB of GPU memory (108.0 GiB free on cuda) and " in text and "of host memory (99.0 GiB available)" in text
    assert "At 131,072 tokens batch 2 would fit; at batch 16, prompts of " in text
    # The same shape all on the CPU names host memory; on the GPU alone, GPU memory.
    with pytest.raises(OutOfMemoryError, match=r"all in host memory.*of host memory \(99.0 GiB available\)"):
        placement.plan_for(LLAMA2_7B, OffloadSettings(placement="cpu"), profile=PROFILE, **kw)
    with pytest.raises(OutOfMemoryError, match=r"all on the GPU.*of GPU memory \(108.0 GiB free on cuda\)"):
        placement.check_run_fits(LLAMA2_7B, OffloadSettings(), resident=131072, **kw)
    # A batch that fits both memories together passes (the plan's own ranges are checked: batch 3 fits too).
    small = dict(kw, batch=3)
    plan = placement.plan_for(LLAMA2_7B, OffloadSettings(placement="hybrid"), profile=PROFILE, **small)
    assert 0 < plan.resident_tokens < 131072


def test_memory_fit_says_what_each_placement_holds_on_this_machine(monkeypatch):
    """The Model card's line: K/V per sequence, and the largest batch each placement fits beside the weights."""
    from engine import memory
    from engine.offload import placement

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (120 * GiB, 139 * GiB))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 110 * GiB)
    line = placement.memory_fit(LLAMA2_7B, device=torch.device("cuda"), context=32768)
    assert line.startswith("K/V 16.0 GiB per sequence at 32,768 tokens. With 120.0 GiB free on the GPU and 110.0 GiB")
    # 108 GiB usable GPU holds 6 sequences of 16 GiB beside prefill's temporaries; 99 GiB of host, 6; both, 11.
    assert "all K/V on the GPU fits batch 6, all in host memory batch 6, hybrid (auto budget) batch 11" in line
    assert "slots per sequence on the GPU" in line
    cpu = placement.memory_fit(LLAMA2_7B, device=CPU, context=4096)
    assert "no GPU" in cpu and "holds batch" in cpu


@pytest.mark.parametrize("split", [0.0, 0.3, 1.0])
def test_plan_for_passes_the_manual_split_through(split):
    offload = OffloadSettings(placement="cpu", split=split, chunk_tokens=16)
    plan = plan_for(LLAMA2_7B, offload, device=CPU, batch=2, prompt_tokens=97, new_tokens=4, profile=PROFILE)
    assert plan.placement == "cpu" and plan.resident_tokens == 0 and plan.gpu_budget_note == "all K/V in host memory"
    for step in plan.steps:
        assert step.chunk_tokens == 16
        assert step.recompute_tokens == round(split * step.offloaded_tokens)
        assert f"manual split {split:g}" in step.reason


def test_plan_for_auto_and_hybrid_budget():
    offload = OffloadSettings(placement="hybrid", gpu_kv_budget_gib=0.5)
    plan = plan_for(LLAMA3_8B, offload, device=CPU, batch=8, prompt_tokens=2048, new_tokens=4, profile=PROFILE)
    assert plan.resident_tokens == (GiB // 2) // MiB == 512  # 1 MiB per slot of every sequence
    assert "GPU KV budget 0.5 GiB (given)" in plan.gpu_budget_note
    assert all(s.recompute_tokens == 0 and "recompute off" in s.reason for s in plan.steps)  # auto, GQA


def test_a_gpu_plan_says_where_its_gemm_times_come_from_and_uses_measured_ones(monkeypatch):
    """On a GPU the plan takes a fast-adapter run's projection GEMMs from the device's measured GEMM plan when it
    has them (faster predicted steps here, since they beat the bandwidth estimate), and says which it used."""
    from engine import memory
    from engine.offload import placement
    from engine.offload.scheduler import ProjectionTimes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (120 * GiB, 139 * GiB))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 110 * GiB)
    kw = dict(device=torch.device("cuda"), batch=4, prompt_tokens=4096, new_tokens=8, profile=PROFILE)
    estimated = placement.plan_for(LLAMA2_7B, OffloadSettings(placement="cpu"), **kw)
    assert "estimated from the copy bandwidth (no GEMM plan measured at batch 4" in estimated.gemm_note
    plain = placement.plan_for(LLAMA2_7B, OffloadSettings(placement="cpu"), fused=False, **kw)
    assert plain.gemm_note.endswith("(the plain adapter runs)")
    fast = ProjectionTimes(layer_ms=0.05, head_ms=0.02)  # ~8 TB/s: far faster than the copy-bandwidth estimate
    monkeypatch.setattr(placement, "measured_projections", lambda spec, device, batch, fused: fast if fused else None)
    measured = placement.plan_for(LLAMA2_7B, OffloadSettings(placement="cpu"), **kw)
    assert measured.gemm_note == "predicted steps: projection GEMMs from this GPU's measured GEMM plan at batch 4"
    assert all(m.predicted_ms < e.predicted_ms for m, e in zip(measured.steps, estimated.steps))
    cpu = placement.plan_for(LLAMA2_7B, OffloadSettings(placement="cpu"), **dict(kw, device=torch.device("cpu")))
    assert cpu.gemm_note == ""  # no GPU: the predictions say so elsewhere
