"""The pipeline depth as a launch parameter, the study's variant grid and the measured tuning table (kernels/tuning.py),
on CPU: a recorded table decides prefetch="auto" and an unset num_stages for shapes in its classes, the rules decide
outside them, asked settings beat both; the study bench runs tiny shapes under the interpreter and writes a table
the planner then reads."""

import os

# triton.jit picks the interpreter when a kernel module is imported: set this before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.decode_attention import (  # noqa: E402
    DecodeAttentionConfig,
    _interpreting,
    choose_launch,
    plan_segments,
    variant_grid,
)
from kernels.segments import KVSegment  # noqa: E402
from kernels.tuning import (  # noqa: E402
    TunedVariant,
    TuningTable,
    device_table,
    load_table,
    shape_class,
    table_path,
    write_table,
)

_NUM_SMS = 132


def _segment(batch, num_kv_heads, num_slots, head_dim, dtype=torch.bfloat16, start=0):
    k = torch.empty(batch, num_kv_heads, num_slots, head_dim, dtype=dtype)  # planning reads shapes and strides only
    return KVSegment(k, torch.empty_like(k), start)


def _table(**entries) -> TuningTable:
    return TuningTable(device="test-gpu", measured_at="2026-12-02T00:00:00+00:00", entries=entries)


# B1 Hkv8 S32768 D128 bf16: the under-occupied shape of the bench, in class rows<=8 keys<=32768 d128 bfloat16
TUNED_CLASS = shape_class(8, 32768, 128, "bfloat16")
TUNED = TunedVariant(num_stages=2, prefetch=True, prefetch_distance=2, gb_s=3400.0, measured_shape=(1, 32, 8, 32768))


@pytest.mark.parametrize("value", [0, 4, True, 2.0, "3"])
def test_num_stages_is_validated(value):
    with pytest.raises(ValueError, match="num_stages must be None"):
        DecodeAttentionConfig(num_stages=value)


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_choose_launch_honours_num_stages_and_says_so(num_stages):
    plan = choose_launch(1, 8, 32768, 128, _NUM_SMS, DecodeAttentionConfig(num_stages=num_stages))
    assert plan.num_stages == num_stages
    assert f"{num_stages} stage{'s' if num_stages > 1 else ''} (asked)" in plan.why
    assert "(rule)" in choose_launch(1, 8, 32768, 128, _NUM_SMS).why


def test_asked_stages_that_overflow_shared_memory_shrink_the_tile():
    # fp32 D=256 with 128-key tiles 3 stages deep wants ~800 KiB: the tile halves until 3 stages fit
    plan = choose_launch(1, 8, 4096, 256, _NUM_SMS, DecodeAttentionConfig(num_stages=3, block_n=128), element_bytes=4)
    assert plan.num_stages == 3 and plan.block_n < 128 and plan.shared_memory_bytes <= 227 * 1024
    assert "128-key tiles 3 stages deep overflow" in plan.why


def test_variant_grid_covers_stages_by_prefetch_by_distance():
    variants = variant_grid(1, 8, 32768, 128, _NUM_SMS)
    assert len(variants) == 9 and len({v.name for v in variants}) == 9
    settings = {(v.plan.num_stages, v.plan.prefetch, v.plan.prefetch_distance if v.plan.prefetch else None) for v in variants}
    assert settings == {(s, p, d) for s in (1, 2, 3) for p, d in ((False, None), (True, 1), (True, 2))}
    base = choose_launch(1, 8, 32768, 128, _NUM_SMS)
    assert all((v.plan.num_splits, v.plan.block_n) == (base.num_splits, base.block_n) for v in variants)
    assert not any(v.plan.prefetch for v in variant_grid(1, 8, 4096, 128, _NUM_SMS, interpret=True))


def test_auto_picks_the_tables_variant_inside_its_class():
    table = _table(**{TUNED_CLASS: TUNED})
    for batch, num_kv_heads, slots in ((1, 8, 32768), (1, 5, 20000), (2, 4, 16385)):  # all in the class
        plan, = plan_segments([_segment(batch, num_kv_heads, slots, 128)], num_sms=_NUM_SMS, interpret=False, tuning=table)
        assert (plan.num_stages, plan.prefetch, plan.prefetch_distance) == (2, True, 2), plan.why
        assert f"class {TUNED_CLASS} tuned" in plan.why and "auto, tuned" in plan.why and "(tuned)" in plan.why


@pytest.mark.parametrize("batch, num_kv_heads, slots, head_dim, dtype", [
    (1, 8, 8192, 128, torch.bfloat16),  # fewer keys: another class
    (4, 8, 32768, 128, torch.bfloat16),  # more rows
    (1, 8, 32768, 64, torch.bfloat16),  # another head dim
    (1, 8, 32768, 128, torch.float32),  # another dtype
])
def test_rules_decide_outside_the_tables_classes(batch, num_kv_heads, slots, head_dim, dtype):
    table = _table(**{TUNED_CLASS: TUNED})
    plan, = plan_segments([_segment(batch, num_kv_heads, slots, head_dim, dtype)], num_sms=_NUM_SMS, interpret=False,
                          tuning=table)
    rules, = plan_segments([_segment(batch, num_kv_heads, slots, head_dim, dtype)], num_sms=_NUM_SMS, interpret=False,
                           tuning=None)
    assert (plan.num_stages, plan.prefetch, plan.prefetch_distance) == (rules.num_stages, rules.prefetch, rules.prefetch_distance)
    assert "not in the tuning table" in plan.why and "auto:" in plan.why


def test_asked_settings_beat_the_table():
    table = _table(**{TUNED_CLASS: TUNED})
    seg = [_segment(1, 8, 32768, 128)]
    off, = plan_segments(seg, num_sms=_NUM_SMS, interpret=False, tuning=table, config=DecodeAttentionConfig(prefetch="off"))
    assert not off.prefetch and off.num_stages == 2  # the table still picks the depth
    deep, = plan_segments(seg, num_sms=_NUM_SMS, interpret=False, tuning=table, config=DecodeAttentionConfig(num_stages=3))
    assert deep.num_stages == 3 and deep.prefetch and deep.prefetch_distance == 2  # and prefetch stays tuned
    staging = torch.empty(32768, 1, 2, 8, 128, dtype=torch.bfloat16)  # (S, B, 2, Hkv, D), never touched
    strided = KVSegment(staging[:, :, 0].permute(1, 2, 0, 3), staging[:, :, 1].permute(1, 2, 0, 3))
    refused, = plan_segments([strided], num_sms=_NUM_SMS, interpret=False, tuning=table)
    assert not refused.prefetch and "strided" in refused.why  # the layout beats the table too


def test_table_round_trip_merge_and_bad_files(tmp_path):
    path = tmp_path / "t.json"
    first = _table(**{TUNED_CLASS: TUNED})
    write_table(first, path)
    assert load_table(path) == first
    other = shape_class(64, 4096, 128, "bfloat16")
    write_table(_table(**{other: TunedVariant(num_stages=3, prefetch=False, prefetch_distance=1, gb_s=4100.0)}), path)
    merged = load_table(path)
    assert set(merged.entries) == {TUNED_CLASS, other}  # the second study kept the first one's class
    raw = json.loads(path.read_text())
    assert raw["entries"][TUNED_CLASS]["num_stages"] == 2 and raw["version"] == 1
    path.write_text("{not json")
    assert load_table(path) is None  # unreadable: the rules decide
    assert load_table(tmp_path / "missing.json") is None


def test_plan_segments_reads_the_devices_table_from_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    assert device_table("cpu") is None
    path = table_path("cpu")
    assert path.parent == tmp_path / "hardware" and "triton" in path.name
    write_table(_table(**{TUNED_CLASS: TUNED}), path)
    plan, = plan_segments([_segment(1, 8, 32768, 128)], num_sms=_NUM_SMS, interpret=False)
    assert (plan.num_stages, plan.prefetch, plan.prefetch_distance) == (2, True, 2), plan.why


@pytest.mark.skipif(not _interpreting(), reason="triton was imported before TRITON_INTERPRET=1 was set")
def test_study_bench_smoke_under_the_interpreter(tmp_path, monkeypatch):
    from bench.suites.decode_attention_study import study

    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    shapes = [(2, 4, 2, 40), (1, 2, 1, 33)]
    notes: list[str] = []
    sampler = _StubSampler()
    rows, table, auto_rows = study(shapes, head_dim=32, dtype=torch.float32, device="cpu", notes=notes,
                                   sampler=sampler, counters_ms=1.0)
    assert len(rows) == (9 + 6) * len(shapes) and sampler.loops == len(rows)  # with the depth-1 16- and 32-key tiles
    for tile in (16, 32):
        assert sum(r.extra["tile"] == tile and r.extra["ran"]["block_n"] == tile for r in rows) == 3 * len(shapes)
    assert all(r.extra["l2_hit_pct"] == 40.0 and r.extra["stall_long_scoreboard"] == 2.5 for r in rows)
    assert "dram_pct" not in rows[0].extra  # the stub's chip has no DRAM counter
    assert [r.extra["shape"] for r in auto_rows] == [list(s) for s in shapes]
    assert all(r.ms and r.extra["rel_err"] < 1e-4 and "tuned" in r.extra["why"] for r in auto_rows)
    assert all(r.ms and r.gb_s and r.extra["rel_err"] < 1e-4 and "error" not in r.extra for r in rows), notes
    assert rows[0].bytes_moved == 2 * 2 * 2 * 40 * 32 * 4  # K and V bytes
    classes = {shape_class(4, 40, 32, "float32"), shape_class(1, 33, 32, "float32")}
    assert set(table.entries) == classes
    assert load_table(table_path("cpu")) == table  # written to this device's table
    tuned = table.entries[shape_class(4, 40, 32, "float32")]
    plan, = plan_segments([_segment(2, 2, 40, 32, torch.float32)], num_sms=8, interpret=False)
    assert plan.num_stages == tuned.num_stages and "tuned" in plan.why


class _StubSampler:
    """A CUPTI sampler's surface for counter_means: every loop sampled as 7 samples, the first and last at the loop's
    edges (dropped), the rest at 40 % L2 hits and 2.5 stalled warps."""

    def __init__(self):
        import types

        from engine.telemetry.pm_metrics import L2_SM, STALL

        self.loops = 0
        self._choice = types.SimpleNamespace(roles={L2_SM: "l2_sm_metric", STALL: "stalls"})

    def probe(self):
        import types

        return types.SimpleNamespace(choice=self._choice)

    def sample_during(self, fn):
        import types

        fn()
        self.loops += 1
        edge = types.SimpleNamespace(l2_hit_pct=99.0, values={"stalls": 99.0})
        mid = types.SimpleNamespace(l2_hit_pct=40.0, values={"stalls": 2.5})
        return [edge, *[mid] * 5, edge]


def _row(shape, variant, ms, *, stages=1, per_sm=0.5, tile=None):
    from bench.report import Row

    return Row(case=f"{shape} {variant}", ms=ms, bytes_moved=1 << 20,
               extra={"shape": list(shape), "variant": variant, "num_stages": stages, "programs_per_sm": per_sm,
                      "prefetch": "prefetch=off" not in variant, "tile": tile})


def test_shallow_gain_takes_depth_one_on_under_occupied_grids_only():
    from bench.suites.decode_attention_study import shallow_gain

    small, full = (1, 8, 1, 4096), (64, 32, 8, 4096)
    rows = [_row(small, "stages=1 prefetch=off", 0.30), _row(small, "stages=1 prefetch=d1", 0.20),
            _row(small, "stages=1 prefetch=d2", 0.25), _row(small, "stages=3 prefetch=d1", 0.01, stages=3),
            # a full grid gains more, but is not under-occupied: left out
            _row(full, "stages=1 prefetch=off", 1.0, per_sm=7.8), _row(full, "stages=1 prefetch=d1", 0.1, per_sm=7.8)]
    gain, where = shallow_gain(rows)
    assert gain == pytest.approx(1.5) and "B1 Hq8 Hkv1 S4096" in where and "prefetch=d1" in where
    assert shallow_gain(rows[4:]) is None


def test_shallow_gain_compares_prefetch_on_and_off_of_the_same_tile():
    """The fixed small-tile family is paired with itself: its slow prefetch-off row is not set against the planned
    tile's prefetch-on row (that would count the tile's own speed as prefetch's), and the planned-tiles-only figure
    leaves it out."""
    from bench.suites.decode_attention_study import _pick_per_class, shallow_gain, shallow_gains

    shape = (1, 32, 8, 32768)
    rows = [_row(shape, "stages=1 prefetch=off", 0.074), _row(shape, "stages=1 prefetch=d1", 0.062),
            _row(shape, "stages=1 tile=32 prefetch=off", 0.300, tile=32),
            _row(shape, "stages=1 tile=32 prefetch=d2", 0.150, tile=32)]
    gains = shallow_gains(rows)
    assert set(gains) == {(shape, None), (shape, 32)}
    assert gains[(shape, None)][0] == pytest.approx(0.074 / 0.062) and gains[(shape, 32)][0] == pytest.approx(2.0)
    gain, where = shallow_gain(rows)
    assert gain == pytest.approx(2.0) and "tile=32 prefetch=d2 against stages=1 tile=32 prefetch=off" in where
    planned, _ = shallow_gain(rows, planned_tiles_only=True)
    assert planned == pytest.approx(0.074 / 0.062)
    for row in rows:
        row.extra["shape_class"] = "c"
    picked, _ = _pick_per_class(rows)["c"]
    assert picked.extra["tile"] is None  # the tuning table only learns from the launcher's own tiles


def test_variant_grid_adds_the_shallow_tile_family_at_depth_one_only():
    from kernels.decode_plan import variant_grid

    base = variant_grid(1, 8, 32768, 128, 132)
    more = variant_grid(1, 8, 32768, 128, 132, shallow_tiles=(16, 32))
    assert [v.name for v in more[:len(base)]] == [v.name for v in base] and len(more) == len(base) + 6
    for tile, family in ((16, more[len(base):len(base) + 3]), (32, more[len(base) + 3:])):
        for v in family:
            assert v.plan.block_n == tile and v.plan.num_stages == 1
            assert v.name.startswith(f"stages=1 tile={tile} prefetch="), v.name
        assert [v.plan.prefetch for v in family] == [False, True, True]


def test_auto_vs_best_is_the_worst_shape_and_the_counters_table_shows_every_row():
    from bench.suites.decode_attention_study import auto_vs_best, counters_table

    a, b = (1, 32, 8, 32768), (8, 32, 32, 16384)
    rows = [_row(a, "stages=3 prefetch=off", 0.040), _row(a, "stages=1 prefetch=off", 0.080),
            _row(b, "stages=3 prefetch=off", 0.480)]
    rows[0].extra.update(l2_hit_pct=12.5, stall_long_scoreboard=3.25)
    autos = [_row(a, "auto", 0.044), _row(b, "auto", 0.480)]
    ratio, where = auto_vs_best(rows, autos)
    assert ratio == pytest.approx(0.040 / 0.044) and where == "B1 Hq32 Hkv8 S32768"
    table = counters_table(rows, autos).splitlines()
    assert len(table) == 2 + len(rows) + len(autos)
    assert "| 12.5 | 3.25 | - |" in table[2] and table[3].endswith("| - | - | - |")


def test_bulk_prefetch_is_refused_below_sm_90_with_the_reason(monkeypatch):
    """cp.async.bulk.prefetch.L2 exists from Hopper on: ptxas refuses it for an A100 (sm_80) or an L4 / RTX 4090
    (sm_89), so a CUDA segment there plans prefetch off, saying why, whatever was asked."""
    from kernels import decode_plan
    from kernels.decode_plan import capability_refusal, choose_launch, prefetch_refusal

    for cap in ((8, 0), (8, 6), (8, 9)):
        why = capability_refusal(cap)
        assert why is not None and f"sm_{cap[0]}{cap[1]}" in why and "sm_90" in why
    assert capability_refusal((9, 0)) is None and capability_refusal((10, 0)) is None
    assert capability_refusal((12, 0)) is None
    assert decode_plan.device_refusal("cpu") is None and decode_plan.device_refusal(torch.device("meta")) is None

    class FakeCudaKV:  # what prefetch_refusal reads of a CUDA tensor: contiguous, aligned rows
        is_cuda, shape, device = True, (1, 8, 4096, 128), "cuda:7"

        def stride(self, dim):
            return (8 * 4096 * 128, 4096 * 128, 128, 1)[dim]

        def element_size(self):
            return 2

        def data_ptr(self):
            return 1 << 20

    kv = FakeCudaKV()
    monkeypatch.setattr(decode_plan, "_device_capability", lambda device: (8, 0))
    why = prefetch_refusal(kv, kv)
    monkeypatch.setattr(decode_plan, "_device_capability", lambda device: (9, 0))
    assert prefetch_refusal(kv, kv) is None
    assert why is not None and "sm_80" in why
    plan = choose_launch(1, 8, 512, 128, 108, DecodeAttentionConfig(prefetch="on"), prefetch_refused=why)
    assert not plan.prefetch and "sm_80" in plan.why


def test_plans_fit_the_devices_shared_memory_not_hoppers(monkeypatch):
    """A GPU with less shared memory per program than Hopper's 227 KiB (99 KiB on an L4 or RTX 4090) gets tiles and
    pipeline depths that fit it, rather than a launch Triton refuses mid-run."""
    import kernels.decode_attention as kda

    k = torch.empty(1, 8, 32768, 128, dtype=torch.bfloat16)
    hopper, = kda.plan_segments([KVSegment(k, k, 0)], num_sms=132, interpret=False, tuning=None)
    assert hopper.shared_memory_bytes > 99 * 1024  # 128-key tiles 3 stages deep
    monkeypatch.setattr(kda, "shared_memory_per_block", lambda device: 99 * 1024)
    small, = kda.plan_segments([KVSegment(k, k, 0)], num_sms=58, interpret=False, tuning=None)
    assert small.shared_memory_bytes <= 99 * 1024, small.why
    monkeypatch.undo()
    assert kda.shared_memory_per_block(torch.device("cpu")) == kda.HOPPER_SHARED_MEMORY_BYTES  # the interpreter's
