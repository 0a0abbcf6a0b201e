"""The Kernels tab on the CPU: the variant table and plans, `auto` from a recorded tuning cache (the study's path and
the engine's own), committed GPU figures shown in place of timings, and the panel built and driven through
gradio_client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import InvalidSettingsError
from engine.lab.kernel_study import (ALL_ROWS, AUTO, PEER, VARIANT_NAMES, KernelStudy, StudyResult, StudyShape,
                                     VariantRow, committed_rows, pick)
from kernels.tuning import TunedVariant, TuningTable, device_key, now_iso, shape_class, table_path, write_table

SHAPE = StudyShape(batch=1, num_heads=32, num_kv_heads=8, seq_len=32768, head_dim=128)


def test_the_variant_grid_is_three_depths_by_three_prefetch_settings_then_auto_and_the_peer():
    assert len(VARIANT_NAMES) == 10 and VARIANT_NAMES[-1] == AUTO and ALL_ROWS == (*VARIANT_NAMES, PEER)
    assert VARIANT_NAMES[:3] == ("stages=1 prefetch=off", "stages=1 prefetch=d1", "stages=1 prefetch=d2")
    plans = KernelStudy("cpu").plans(SHAPE)
    assert [(p.num_stages, p.prefetch, p.prefetch_distance) for n, p in plans.items() if n != AUTO] == \
        [(s, pf, d) for s in (1, 2, 3) for pf, d in ((False, 1), (True, 1), (True, 2))]
    assert {p.num_splits for p in plans.values()} == {plans[AUTO].num_splits}  # one grid: only the pipeline differs
    assert pick(None) == ALL_ROWS and pick([PEER, "stages=2 prefetch=d1"]) == ("stages=2 prefetch=d1", PEER)
    with pytest.raises(InvalidSettingsError, match="Unknown variant"):
        pick(["stages=4 prefetch=off"])


@pytest.mark.parametrize("kwargs, message", [(dict(num_heads=30, num_kv_heads=8), "evenly"),
                                             (dict(head_dim=512), "head dims up to 256"),
                                             (dict(batch=0), "positive"),
                                             (dict(batch=64, seq_len=1 << 20), "GiB of K/V")])
def test_shapes_are_checked(kwargs, message):
    with pytest.raises(InvalidSettingsError, match=message):
        StudyShape(**kwargs)


def _tuned_table(device: str, *, rows: int, keys: int, head_dim: int, dtype: str, stages: int, prefetch: bool):
    cls = shape_class(rows, keys, head_dim, dtype)
    table = TuningTable(device=device_key(device), measured_at=now_iso(), entries={cls: TunedVariant(
        num_stages=stages, prefetch=prefetch, prefetch_distance=2, gb_s=3300.0, measured_shape=(1, 32, 8, keys))})
    return write_table(table, table_path(device), merge=False)


def test_auto_follows_this_devices_recorded_tuning_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    # No committed GPU figures (they would fill the rows with the plans that ran on that GPU): this CPU's plans only.
    study = KernelStudy("cpu", results_dir=tmp_path / "no-results")
    rules = study.plans(SHAPE)[AUTO]
    assert "not in the tuning table" not in rules.why and rules.num_stages == 3 and not rules.prefetch
    _tuned_table("cpu", rows=8, keys=32768, head_dim=128, dtype="bfloat16", stages=2, prefetch=True)
    tuned = study.plans(SHAPE)[AUTO]
    assert (tuned.num_stages, tuned.prefetch, tuned.prefetch_distance) == (2, True, 2)
    assert "tuned" in tuned.why and "3300 GB/s" in tuned.why
    row = next(r for r in study.run(SHAPE, [AUTO]).rows if r.name == AUTO)
    assert "2 stages, prefetch d2" in row.plan and "auto, tuned" in row.plan
    other = study.plans(StudyShape(batch=64, num_heads=32, num_kv_heads=8, seq_len=4096))[AUTO]
    assert "not in the tuning table" in other.why  # outside the measured class the rules decide


def test_the_engine_reads_the_same_tuning_cache_for_its_decode_attention(tmp_path, monkeypatch, tiny, one_thread):
    """A decode run with the Triton kernel (interpreter) plans every launch through the device's tuning table: each
    plan of the run's decode steps is the tuned depth of its class."""
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    import kernels.decode_attention as kda
    from engine.generator import Generator
    from engine.settings import GenerationSettings

    spec = tiny.spec
    prompt = [[1, 2, 3, 4, 5]]
    settings = GenerationSettings(max_new_tokens=2, attention="triton", ignore_eos=True)
    _tuned_table("cpu", rows=len(prompt) * spec.num_kv_heads, keys=len(prompt[0]) + settings.max_new_tokens,
                 head_dim=spec.head_dim, dtype="float32", stages=2, prefetch=False)
    planned = []
    real = kda.choose_launch

    def choose_launch(*args, **kwargs):
        plan = real(*args, **kwargs)
        planned.append((kwargs.get("tuned"), plan))
        return plan

    monkeypatch.setattr(kda, "choose_launch", choose_launch)
    Generator(tiny).generate(prompt, settings)
    assert planned and all(tuned is not None and tuned.num_stages == 2 and plan.num_stages == 2
                           for tuned, plan in planned)
    assert all("2 stages (tuned)" in plan.why for _, plan in planned)


def _write_committed(results: Path) -> None:
    results.mkdir()
    study = {"suite": "decode_attention_study", "device": "NVIDIA H200 (132 SMs, torch 2.11.0+cu130)",
             "date": "2026-12-01 10:00 UTC", "details": {"head_dim": 128},
             "rows": [{"case": "B1 Hq32 Hkv8 S32768 · stages=3 prefetch=off", "ms": 0.041, "gb_s": 3270.0,
                       "extra": {"shape": [1, 32, 8, 32768], "variant": "stages=3 prefetch=off", "rel_err": 1e-3,
                                 "ran": {"num_stages": 3, "prefetch": False, "block_n": 64, "num_splits": 16}}},
                      {"case": "B1 Hq32 Hkv8 S32768 · stages=1 prefetch=d1", "ms": 0.052, "gb_s": 2580.0,
                       "extra": {"shape": [1, 32, 8, 32768], "variant": "stages=1 prefetch=d1",
                                 "ran": {"num_stages": 1, "prefetch": True, "block_n": 64, "num_splits": 16}}},
                      {"case": "B32 Hq32 Hkv32 S4096 · stages=3 prefetch=off", "ms": 0.3, "gb_s": 4000.0,
                       "extra": {"shape": [32, 32, 32, 4096], "variant": "stages=3 prefetch=off"}}]}
    (results / "decode_attention_study.json").write_text(json.dumps(study))
    live = {"suite": "cupti_live", "device": "NVIDIA H200 (132 SMs, torch 2.11.0+cu130)", "date": "2026-12-01 11:00 UTC",
            "details": {"kernel_study": StudyResult(shape=SHAPE, device="NVIDIA H200", measured=True, rows=(
                VariantRow(name="stages=1 prefetch=d1", plan="16 splits", ms=0.05, gb_s=2684.0, l2_hit_pct=31.5,
                           source="measured here"),
                VariantRow(name=PEER, plan="sdpa", ms=0.043, gb_s=3120.0, l2_hit_pct=24.0, source="measured here")),
                note="", l2_label="L2 hit rate of the SMs' requests, partition-averaged").as_dict()}}
    (results / "cupti_live.json").write_text(json.dumps(live))


def test_on_the_cpu_the_committed_gpu_figures_stand_in_for_timings(tmp_path):
    _write_committed(tmp_path / "results")
    study = KernelStudy("cpu", results_dir=tmp_path / "results")
    result = study.run(SHAPE)
    assert not result.measured and "No GPU here: timings need one" in result.note
    rows = {r.name: r for r in result.rows}
    # The prefetch study (GPU-clock times) first; the probe's study (do_bench times) adds only the L2 it lacks.
    d1 = rows["stages=1 prefetch=d1"]
    assert d1.ms == 0.052 and d1.l2_hit_pct == 31.5 and d1.source.startswith("committed: NVIDIA H200")
    assert "10:00" in d1.source and "L2 committed" in d1.source and "11:00" in d1.source
    assert rows["stages=3 prefetch=off"].ms == 0.041 and rows["stages=3 prefetch=off"].l2_hit_pct is None
    assert rows[PEER].ms is None and rows[PEER].l2_hit_pct == 24.0 and "(L2 only)" in rows[PEER].source
    assert rows["stages=2 prefetch=off"].source == "planned" and rows["stages=2 prefetch=off"].ms is None
    assert result.fastest.name == "stages=3 prefetch=off"  # the peer is not a variant
    assert result.l2_label == "L2 hit rate of the SMs' requests, partition-averaged"
    headers, table = result.table()
    assert headers[:5] == ["variant", "ms", "GB/s", "L2 hit %", "vs fastest"]
    assert dict((r[0], r[4]) for r in table)["stages=1 prefetch=d1"] == pytest.approx(0.052 / 0.041, abs=1e-3)
    other = study.run(StudyShape(batch=2, num_heads=32, num_kv_heads=8, seq_len=1024))
    assert all(r.source == "planned" for r in other.rows) and "B1 Hq32 Hkv8 S32768 D128" in other.note
    _, notes, _ = committed_rows(SHAPE, results_dir=tmp_path / "nothing")
    assert notes == []


def test_the_panel_shows_the_table_and_the_bars(tmp_path):
    from panels.kernel_panel import run_study, study_figure

    _write_committed(tmp_path / "results")

    class Session:  # what the panel asks of a LabSession
        def kernel_study(self):
            return KernelStudy("cpu", results_dir=tmp_path / "results")

    text, rows, figure = run_study(Session(), 1, 32, 8, 32768, 128, [], True)
    assert text.startswith("**Fastest: stages=3 prefetch=off**") and "timings need one" in text
    assert len(rows) == len(ALL_ROWS)
    bars = [trace for trace in figure.data if trace.type == "bar"]
    assert len(bars) == 3 and list(bars[2].y)[list(bars[2].x).index("stages=1 prefetch=d1")] == 31.5
    text, rows, figure = run_study(Session(), 1, 30, 8, 32768, 128, [], True)
    assert text.startswith("**Error:**") and "evenly" in text and rows == [] and figure is None
    empty = study_figure(KernelStudy("cpu", results_dir=tmp_path / "none").run(SHAPE))
    assert "no figures here" in empty.layout.title.text


def test_the_kernels_tab_through_gradio_client(served_demo_app):
    from gradio_client import Client

    demo, session = served_demo_app
    client = Client(demo.local_url, verbose=False)
    assert client.predict(api_name="/kernel_variants")["variants"] == list(ALL_ROWS)
    study = client.predict(batch=1, num_heads=32, num_kv_heads=8, seq_len=4096, head_dim=128,
                           variants="stages=3 prefetch=off, " + AUTO, sample_l2=True, api_name="/kernel_study")
    assert study["measured"] is False and [r["name"] for r in study["rows"]] == ["stages=3 prefetch=off", AUTO]
    assert "timings need one" in study["note"] and study["shape"]["seq_len"] == 4096
    with pytest.raises(Exception, match="Unknown variant"):
        client.predict(variants="stages=9", api_name="/kernel_study")


def test_the_gpu_path_runs_end_to_end_on_cpu_stand_ins(monkeypatch, tmp_path):
    """_measure with the interpreter for the kernel, a fixed GPU timer, a fake CUPTI for L2: every row checked
    against the reference, timed, and given the mean L2 of its own loop; a failing variant is a row saying so."""
    import types

    import torch

    import engine.gpu_timing as gpu_timing
    import kernels.decode_attention as kda
    from cupti_fake import FakeCupti
    from engine.telemetry import CuptiPmSampler

    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(L2_cache_size=1 << 16))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    calls = []

    def queued_median_ms(fn, *, num_sets, repeat):
        fn(0)
        calls.append(repeat)
        return 0.5

    monkeypatch.setattr(gpu_timing, "queued_median_ms", queued_median_ms)
    fake = FakeCupti()
    sampler = CuptiPmSampler(importer=fake.importer, cuda_available=lambda: True, calibrate=False, interval_us=1000)
    during = sampler.sample_during
    pcts = iter([30.0, 42.0, 50.0])

    def sample_during(fn):  # each row's loop: 20 fake ms at its own L2 reading
        def run():
            fn()
            fake.workload["l2"] = next(pcts)
            fake.advance_ms(20)
        return during(run)

    monkeypatch.setattr(sampler, "sample_during", sample_during)
    real = kda.decode_attention

    def decode_attention(q, k, v, lens, *, plan=None, **kw):
        if plan is not None and plan.num_stages == 2:
            raise RuntimeError("out of shared memory")
        return real(q, k, v, lens, plan=plan and plan.__class__(**{**plan.__dict__, "prefetch": False}), **kw)

    monkeypatch.setattr(kda, "decode_attention", decode_attention)
    study = KernelStudy("cpu", cupti=sampler)
    shape = StudyShape(batch=1, num_heads=4, num_kv_heads=2, seq_len=40, head_dim=16)
    result = study._measure(shape, ["stages=1 prefetch=off", "stages=2 prefetch=off", AUTO, PEER], sample_l2=True,
                            rep_ms=5.0, l2_ms=1.0)
    rows = {r.name: r for r in result.rows}
    assert result.measured and result.device == "Fake GPU" and "rotated" in result.note
    assert rows["stages=1 prefetch=off"].ms == 0.5 and rows["stages=1 prefetch=off"].rel_err < 1e-2
    assert rows["stages=1 prefetch=off"].gb_s == pytest.approx(shape.kv_bytes / 0.5e-3 / 1e9)
    assert rows["stages=2 prefetch=off"].error == "RuntimeError: out of shared memory"
    assert [rows[n].l2_hit_pct for n in ("stages=1 prefetch=off", AUTO, PEER)] == [30.0, 42.0, 50.0]
    assert "auto:" in rows[AUTO].plan and rows[PEER].rel_err < 1e-2
    assert "partition" in result.l2_label and fake.enabled == 0 and len(calls) == 3


def test_the_ab_views_plans_fit_the_devices_shared_memory(monkeypatch):
    """On a GPU with less shared memory per program than Hopper (an L4: 99 KiB), every variant and auto are planned
    to fit it, so each row launches rather than failing with out-of-resources."""
    import kernels.decode_attention as kda
    from engine.lab.kernel_study import KernelStudy, StudyShape

    monkeypatch.setattr(kda, "shared_memory_per_block", lambda device: 99 * 1024)
    plans = KernelStudy("cpu").plans(StudyShape(1, 32, 8, 32768, 128))
    assert plans and all(p.shared_memory_bytes <= 99 * 1024 for p in plans.values()), \
        {n: p.shared_memory_bytes for n, p in plans.items()}
    monkeypatch.undo()
    hopper = KernelStudy("cpu").plans(StudyShape(1, 32, 8, 32768, 128))
    assert any(p.shared_memory_bytes > 99 * 1024 for p in hopper.values())  # the same shape takes more on Hopper
