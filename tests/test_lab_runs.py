"""The lab's engine side on the CPU: profiling runs and their records, the live view, stopping a run, the scheduler
explorer, run comparison and exports (tiny models, tiny shapes)."""

from __future__ import annotations

import csv
import json
import statistics
from collections import Counter

import pytest

from engine.errors import InvalidSettingsError, PromptTooLongError
from engine.lab.runs import flat_settings, random_prompts
from engine.lab.session import LabSession
from engine.settings import GenerationSettings, OffloadSettings, RunShape
from engine.telemetry import COUNTER_PAYLOAD, read_trace, spans_from_trace

pytestmark = pytest.mark.usefixtures("one_thread", "profile_cache")

NEW_TOKENS = 8


def _settings(placement: str = "cpu", split="auto", **offload) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=NEW_TOKENS, offload=OffloadSettings(placement=placement, split=split,
                                                                                 chunk_tokens=16, **offload))


@pytest.fixture(scope="module")
def session(tiny):
    lab = LabSession()
    lab.model = tiny
    return lab


@pytest.fixture(scope="module")
def auto_run(session):
    updates = list(session.profile(_settings(), batch=2, prompt_tokens=32, seed=0))
    return updates, updates[-1].record


def test_a_profile_streams_one_update_per_step_and_keeps_a_consistent_record(session, auto_run):
    updates, record = auto_run
    assert record is not None and session.runs[-1] is record
    assert all(u.record is None for u in updates[:-1])
    steps = [u.step for u in updates]
    assert steps == sorted(steps) and steps[-1] == NEW_TOKENS - 1 == len(record.steps)
    # What the updates streamed is exactly what the record keeps.
    assert [s for u in updates for s in u.new_spans] == list(record.spans)
    assert [s for u in updates for s in u.new_steps] == list(record.steps)
    assert {s.lane for s in record.spans} >= {"h2d_kv", "attention", "compute", "d2h_writeback"}
    assert [s.metrics.step for s in record.steps] == list(range(1, NEW_TOKENS))
    steady = record.steps[record.warmup_steps:]  # tokens/s leaves out the warm-up steps (none to a few)
    decode_s = sum(s.metrics.step_ms for s in steady) / 1e3
    assert record.tokens_per_s == pytest.approx(2 * len(steady) / decode_s)
    assert record.median_step_ms == pytest.approx(statistics.median(s.metrics.step_ms for s in record.steps))
    # Everything offloaded: every step has a prediction and a PCIe floor from the run's plan.
    assert all(s.predicted_ms > 0 and s.pcie_floor_ms > 0 for s in record.steps)
    assert record.pct_of_floor == pytest.approx(100 * record.pcie_floor_ms / record.median_step_ms)
    assert record.settings["offload.placement"] == "cpu" and record.settings["ignore_eos"] is True
    assert "MHA" in record.plan_reason and "CPU" in record.link_note and "decode_attention_ncu_h200.md" in record.l2_note
    assert all(u.payload_gb_s["h2d"] > 0 for u in updates if u.step)
    view = session.live()
    assert view.status == "done" and view.record is record and len(view.spans) == len(record.spans)


def test_the_same_seed_gives_the_same_prompts():
    shape = RunShape(batch=3, prompt_tokens=5, seed=4)
    assert random_prompts(384, shape) == random_prompts(384, shape)
    assert random_prompts(384, shape) != random_prompts(384, RunShape(batch=3, prompt_tokens=5, seed=5))
    assert all(0 <= t < 384 for p in random_prompts(384, shape) for t in p)


def test_a_gpu_resident_run_is_predicted_by_the_cost_model_and_has_no_floor(session):
    record = list(session.profile(_settings(placement="gpu"), batch=1, prompt_tokens=8))[-1].record
    assert record.predicted_ms > 0 and record.pcie_floor_ms is None and record.pct_of_floor is None
    assert record.split is None and len(record.steps) == NEW_TOKENS - 1
    # A timeline like every run's: per-layer attention and compute (nothing crosses PCIe), none dropped.
    assert {s.lane for s in record.spans} <= {"attention", "compute"}
    assert {s.step for s in record.spans} == set(range(1, NEW_TOKENS))
    assert not any("no GPU" in note and "on the GPU" in note for note in record.notes)  # truthful on a CPU


def _lock_is_free(session: LabSession) -> bool:
    free = session._lock.acquire(timeout=1)
    if free:
        session._lock.release()
    return free


def test_stopping_a_profile_frees_the_session_and_keeps_no_record(session):
    before = len(session.runs)
    assert session.stop_profile() is False  # nothing running
    updates = session.profile(_settings(), batch=2, prompt_tokens=32)
    next(updates)
    assert session.live().status == "running"
    updates.close()  # a stream that is cancelled
    assert session.live().status == "stopped" and len(session.runs) == before and _lock_is_free(session)

    updates = session.profile(GenerationSettings(max_new_tokens=40, offload=OffloadSettings(placement="cpu")),
                              batch=2, prompt_tokens=32)
    first = next(updates)
    assert session.stop_profile() is True  # the Stop button, from any thread
    assert session.live_run().stage().stage == "stopping after the current step"  # what its watchers read meanwhile
    rest = list(updates)
    assert len(rest) <= 1 and all(u.record is None for u in rest) and first.num_steps == 39
    view = session.live()
    assert view.status == "stopped" and view.step < 39 and len(session.runs) == before and _lock_is_free(session)
    assert list(session.profile(_settings(), batch=1, prompt_tokens=8))[-1].record is not None  # not stuck stopping


def test_a_failed_profile_reports_and_the_session_keeps_working(session):
    with pytest.raises(PromptTooLongError):
        list(session.profile(_settings(), batch=1, prompt_tokens=600))
    assert session.live().status.startswith("failed") and "context" in session.live().status
    with pytest.raises(InvalidSettingsError, match="batch=0"):
        list(session.profile(_settings(), batch=0, prompt_tokens=8))
    with pytest.raises(InvalidSettingsError, match="at least 2 new tokens"):
        list(session.profile(GenerationSettings(max_new_tokens=1), batch=1, prompt_tokens=8))
    assert list(session.profile(_settings(), batch=1, prompt_tokens=8))[-1].record is not None


def test_explorer_curve_auto_point_and_measured_points(session, auto_run):
    _, record = auto_run
    result = session.explore(_settings(), batch=2, prompt_tokens=32, splits=(0.0, 0.5, 1.0))
    assert result.splits == (0.0, 0.5, 1.0) and len(result.predicted_ms) == 3
    assert all(ms > 0 for ms in result.predicted_ms) and result.floor_ms[0] > result.floor_ms[2]  # activations: 0.5x KV
    assert 0.0 <= result.auto_split <= 1.0 and result.auto_ms <= max(result.predicted_ms)
    assert result.offloaded_tokens == 32 and result.note == ""
    assert record.run_id in {p.run_id for p in result.measured}
    other_shape = session.explore(_settings(), batch=4, prompt_tokens=32)
    assert other_shape.measured == ()
    on_gpu = session.explore(_settings(placement="gpu"), batch=2, prompt_tokens=32)
    assert on_gpu.placement == "cpu" and "placement 'cpu'" in on_gpu.note
    with pytest.raises(InvalidSettingsError, match="fractions"):
        session.explore(_settings(), batch=2, prompt_tokens=32, splits=(1.5,))
    with pytest.raises(PromptTooLongError):
        session.explore(_settings(), batch=2, prompt_tokens=600)


def test_gqa_models_never_choose_to_recompute(profile_cache):
    from engine import load_model
    from engine.lab.explorer import explore_splits

    model = load_model("synthetic:tiny-llama3", device="cpu", dtype="float32")
    result = explore_splits(model.spec, OffloadSettings(placement="cpu", chunk_tokens=16), device=model.device,
                            profile=profile_cache, batch=2, prompt_tokens=32, new_tokens=4)
    assert result.auto_split == 0.0 and "GQA" in result.auto_reason and "recompute off" in result.auto_reason


def test_compare_diffs_settings_and_exports_csv_and_json(session, auto_run):
    _, base = auto_run
    manual = list(session.profile(_settings(split=0.5), batch=2, prompt_tokens=32))[-1].record
    assert {s.lane for s in manual.spans} >= {"h2d_act", "recompute"} and manual.split == pytest.approx(0.5, abs=0.05)
    table = session.compare([base.run_id, manual.run_id])
    assert table.differing == ("offload.split",) and table.baseline_run_id == base.run_id
    assert table.columns[:3] == ("run", "model", "offload.split") and len(table.rows) == 2
    row = dict(zip(table.columns, table.rows[1]))
    assert row["Δ tok/s %"] == pytest.approx(100 * (manual.tokens_per_s - base.tokens_per_s) / base.tokens_per_s, abs=0.01)
    csv_path = session.export_compare([base.run_id, manual.run_id], fmt="csv")
    json_path = session.export_compare([base.run_id, manual.run_id], fmt="json")
    assert csv_path.parent == json_path.parent == session.export_dir
    with csv_path.open() as f:
        assert next(csv.reader(f)) == list(table.columns)
    doc = json.loads(json_path.read_text())
    assert [r["run_id"] for r in doc["runs"]] == [base.run_id, manual.run_id]
    assert len(doc["runs"][1]["steps"]) == NEW_TOKENS - 1 and doc["runs"][1]["settings"]["offload.split"] == 0.5
    with pytest.raises(InvalidSettingsError, match="not among"):
        session.compare([base.run_id, 999])
    with pytest.raises(InvalidSettingsError, match="csv"):
        session.export_compare([base.run_id], fmt="xlsx")


def test_trace_export_holds_every_span_and_the_counters(session, auto_run):
    _, record = auto_run
    path = session.export_trace(record.run_id)
    assert path.parent == session.export_dir
    trace = read_trace(path)
    assert Counter(spans_from_trace(trace)) == Counter(record.spans)
    assert any(e["ph"] == "C" and e["name"] == COUNTER_PAYLOAD for e in trace["traceEvents"])
    assert trace["metadata"]["run_id"] == record.run_id and trace["metadata"]["plan_reason"] == record.plan_reason


def test_flat_settings_names_every_field_by_its_path():
    flat = flat_settings(_settings(split=0.25))
    assert flat["offload.split"] == 0.25 and flat["kernel.prefetch"] == "auto" and flat["sampling.temperature"] == 0.0
    assert flat["max_new_tokens"] == NEW_TOKENS and flat["stop_strings"] == []


def test_an_exported_run_imports_into_another_session_unchanged(session, auto_run, tmp_path):
    _, auto_run = auto_run
    path = session.export_trace(auto_run.run_id)
    other = LabSession(export_dir=tmp_path)
    imported = other.import_run(path, note="measured elsewhere")
    assert imported.run_id == 1 and other.runs == [imported]
    for name in ("model", "source", "batch", "prompt_tokens", "new_tokens", "settings", "median_step_ms",
                 "predicted_ms", "pcie_floor_ms", "split", "plan_reason", "tokens_per_s"):
        assert getattr(imported, name) == getattr(auto_run, name), name
    assert imported.spans == auto_run.spans
    assert [s.metrics for s in imported.steps] == [s.metrics for s in auto_run.steps]
    assert [s.predicted_ms for s in imported.steps] == [s.predicted_ms for s in auto_run.steps]
    assert imported.notes[-1] == "measured elsewhere"
    view = other.live()
    assert view.status == "imported" and view.record is imported and len(view.spans) == len(auto_run.spans)
    assert other.compare([1]).rows  # it takes part in Compare like a run of this session


def test_importing_something_that_is_not_a_run_says_so(tmp_path):
    other = LabSession(export_dir=tmp_path)
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    with pytest.raises(InvalidSettingsError, match="Could not read a trace from junk.json"):
        other.import_run(junk)
    plain = tmp_path / "plain.trace.json"
    plain.write_text(json.dumps({"traceEvents": [], "metadata": {}}))
    with pytest.raises(InvalidSettingsError, match="holds no KV Lab run record"):
        other.import_run(plain)
    assert other.runs == [] and other.live() is None
