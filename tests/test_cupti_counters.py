"""CUPTI counter tracks in run records: every role's series on the recorder's axis with its label, through the
record's summary, the exported trace and back (engine/lab/runs.py), and the recorded H100 run's PM series aligned
with its own steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cupti_fake import FakeCupti
from engine.lab.runs import _stop_l2, record_from_trace, trace_spans
from engine.telemetry import CuptiPmSampler, CuptiSample, build_trace, read_trace, step_counters
from engine.telemetry.cupti_calibration import L2Calibration
from engine.telemetry.pm_metrics import (COUNTER_L2, COUNTER_PM_DRAM, COUNTER_PM_DRAM_PCT, COUNTER_PM_L2_ALL,
                                         COUNTER_PM_L2_SECTORS, COUNTER_PM_PCIE, COUNTER_PM_STALL, PM_TRACKS,
                                         cupti_counters)

REPO = Path(__file__).resolve().parent.parent
H100_RUN = REPO / "bench" / "results" / "runs" / "h100_session_profile_run.trace.json.gz"
ORIGIN = 1_795_580_768_000_000_000
L2_SM = "LTS.TriageCompute.lts__average_t_sector_hit_rate_srcunit_tex_realtime.pct"
L2_ALL = "LTS.TriageCompute.lts__average_t_sector_hit_rate_realtime.pct"


def test_every_role_lands_on_its_track_at_its_samples_start():
    values = {L2_SM: 47.5, L2_ALL: 45.0, "pcie__read_bytes.sum": 5e6, "pcie__write_bytes.sum": 1e6,
              "dramc__read_throughput.avg.pct_of_peak_sustained_elapsed": 61.0,
              "smsp__warps_issue_stalled_long_scoreboard.avg.per_cycle_active": 3.5,
              "lts__t_sectors_srcunit_tex.sum": 1e6 / 32 * 100}
    samples = [CuptiSample(ORIGIN + 7_000_000, ORIGIN + 8_000_000, values, l2_hit_pct=47.5),
               CuptiSample(ORIGIN + 8_000_000, ORIGIN + 9_000_000, {**values, L2_SM: math.nan}, l2_hit_pct=None)]
    tracks = cupti_counters(samples, origin_wall_ns=ORIGIN)
    assert tracks[COUNTER_L2] == [(7000.0, {"L2 hit %": 47.5})]  # the NaN reading is not drawn as a point
    assert tracks[COUNTER_PM_L2_ALL] == [(7000.0, {"all requests": 45.0})]
    assert tracks[COUNTER_PM_PCIE][0] == (7000.0, {"read": 5.0, "write": 1.0})  # 5 MB in 1 ms: 5 GB/s
    assert tracks[COUNTER_PM_DRAM_PCT][1] == (8000.0, {"read": 61.0})
    assert tracks[COUNTER_PM_STALL][0] == (7000.0, {"warps per SMSP-cycle": 3.5})
    assert tracks[COUNTER_PM_L2_SECTORS][0][1]["requested"] == pytest.approx(100.0)
    assert set(tracks) <= set(PM_TRACKS) and COUNTER_PM_DRAM not in tracks


def test_the_l2_of_all_requests_is_not_doubled_when_it_is_the_shown_one():
    only_all = CuptiSample(ORIGIN, ORIGIN + 1_000_000, {L2_ALL: 45.0}, l2_hit_pct=45.0)
    tracks = cupti_counters([only_all], origin_wall_ns=ORIGIN)
    assert tracks == {COUNTER_L2: [(0.0, {"L2 hit %": 45.0})]}


def test_a_record_keeps_the_series_and_labels_through_its_trace(tmp_path):
    fake = FakeCupti()
    sampler = CuptiPmSampler(importer=fake.importer, cuda_available=lambda: True, calibrate=False)
    sampler._calibration = L2Calibration(device="NVIDIA H200", chip="GH100", measured_at="2026-12-01T10:00:00+00:00",
                                         interval_us=5000, values={L2_SM: (48.0, 25.0), L2_ALL: (47.0, 24.0)})
    origin = fake.now_ns
    sampler.start()
    fake.advance_ms(40)
    l2_pct, note, counters, labels = _stop_l2(sampler, origin_wall_ns=origin)  # what profile_run keeps
    assert l2_pct == pytest.approx(40.0) and "all-hit (L2-resident) loop reads 48 % here" in note
    assert set(counters) == set(labels) >= {COUNTER_L2, COUNTER_PM_L2_ALL, COUNTER_PM_PCIE, COUNTER_PM_DRAM_PCT,
                                            COUNTER_PM_STALL, COUNTER_PM_L2_SECTORS}

    trace = read_trace(H100_RUN)
    base = record_from_trace(trace, run_id=1)
    from dataclasses import replace

    record = replace(base, pm_counters=counters, pm_labels=labels, l2_hit_pct=l2_pct, l2_note=note)
    assert record.summary()["pm_labels"] == labels
    spans, _ = trace_spans(record)
    written = build_trace(spans, counters=step_counters(s.metrics for s in record.steps) | record.pm_counters,
                          metadata=record.summary(with_steps=True))
    again = record_from_trace(written, run_id=2)
    assert again.pm_labels == labels and again.l2_hit_pct == pytest.approx(l2_pct)
    assert {k: [(t, dict(v)) for t, v in track] for k, track in again.pm_counters.items()} == \
        {k: [(t, dict(v)) for t, v in track] for k, track in counters.items()}


def test_the_recorded_h100_runs_pm_series_lines_up_with_its_steps():
    """The H100 run (PM sampling every 1 ms, no L2 counter then): within each steady decode step the CUPTI PCIe read
    rate averages to the engine's own payload rate over the step, so the PM axis is the spans' axis."""
    record = record_from_trace(read_trace(H100_RUN), run_id=1)
    assert set(record.pm_counters) == {COUNTER_PM_PCIE, COUNTER_PM_DRAM}
    pcie = record.pm_counters[COUNTER_PM_PCIE]
    checked = 0
    for step in record.steps[record.warmup_steps + 1:]:
        m = step.metrics
        inside = [v["read"] for t, v in pcie if m.start_us <= t and t + 1000 <= m.end_us]
        busy_s = m.pcie_busy_ms["h2d"] / 1e3
        h2d_bytes = m.payload_gb_s["h2d"] * 1e9 * busy_s
        pm_bytes = sum(inside) * 1e9 * 1e-3  # GB/s over 1 ms samples
        wall_s = len(inside) * 1e-3
        assert pm_bytes == pytest.approx(h2d_bytes * wall_s / (m.step_ms / 1e3), rel=0.2)
        checked += 1
    assert checked >= 5
    # Before the first decode step (prefill, nothing offloaded yet) the PCIe read series is quiet.
    first = record.steps[0].metrics.start_us
    before = [v["read"] for t, v in pcie if t < first - 50_000]
    assert before and max(before) < 5.0
