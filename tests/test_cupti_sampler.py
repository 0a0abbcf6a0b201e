"""CUPTI PM sampling without a GPU: counters chosen from recorded single-pass set lists (GH100's, and a chip without L2
counters), the probe and the sampler driven through a fake cupti-python, the L2 calibration and its cache, and the
unavailable paths on this machine."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cupti_fake import GH100_SETS, NO_L2_SETS, FakeCupti, gh100_accepts
from engine.telemetry import CuptiPmSampler, choose_counters
from engine.telemetry.cupti_calibration import L2Calibration, calibrate, calibration_path, load_calibration
from engine.telemetry.cupti_sampler import DEFAULT_INTERVAL_US, NCU_FALLBACK
from engine.telemetry.pm_metrics import (COUNTER_L2, DRAM_PCT, L2_ALL, L2_SM, L2_SM_SECTORS, PCIE_READ, STALL,
                                         role_of, split_name)

REPO = Path(__file__).resolve().parent.parent
L2_SM_METRIC = "LTS.TriageCompute.lts__average_t_sector_hit_rate_srcunit_tex_realtime.pct"
L2_ALL_METRIC = "LTS.TriageCompute.lts__average_t_sector_hit_rate_realtime.pct"
GPU = lambda: True  # noqa: E731


def sampler_on(fake: FakeCupti, **kwargs) -> CuptiPmSampler:
    kwargs.setdefault("calibrate", False)
    return CuptiPmSampler(importer=fake.importer, cuda_available=GPU, **kwargs)


# ---- names and roles -----------------------------------------------------------------------------------------

def test_names_split_into_prefix_base_and_submetric():
    assert split_name(L2_SM_METRIC) == ("LTS.TriageCompute.", "lts__average_t_sector_hit_rate_srcunit_tex_realtime",
                                        ".pct")
    assert split_name("pcie__read_bytes.sum") == ("", "pcie__read_bytes", ".sum")
    assert split_name("dramc__read_throughput") == ("", "dramc__read_throughput", "")
    assert role_of(L2_SM_METRIC) == L2_SM and role_of(L2_ALL_METRIC) == L2_ALL
    assert role_of("lts__t_sector_hit_rate.pct") == L2_ALL and role_of("l1tex__t_sector_hit_rate") is None
    assert role_of("lts__t_sectors_srcunit_tex.sum") == L2_SM_SECTORS
    assert role_of("lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum") is None  # refused on GH100; never chosen


# ---- the choice from recorded set lists ------------------------------------------------------------------------

def test_gh100_sets_give_the_l2_rates_pcie_dram_stalls_and_l2_sectors_in_one_pass():
    asked = []

    def accepts(metrics, set_name):
        asked.append(list(metrics))
        return gh100_accepts(metrics, set_name)

    choice = choose_counters("GH100", GH100_SETS, accepts)
    assert choice.sets == ("TriageCompute",) and choice.set_name == "TriageCompute" and not choice.use_set_name
    assert choice.roles[L2_SM] == L2_SM_METRIC and choice.roles[L2_ALL] == L2_ALL_METRIC
    assert choice.l2_metric == L2_SM_METRIC and choice.l2_role == L2_SM
    assert choice.roles[PCIE_READ] == "pcie__read_bytes.sum"
    assert choice.roles[DRAM_PCT] == "dramc__read_throughput.avg.pct_of_peak_sustained_elapsed"
    assert choice.roles[STALL] == "smsp__warps_issue_stalled_long_scoreboard.avg.per_cycle_active"
    assert choice.roles[L2_SM_SECTORS] == "lts__t_sectors_srcunit_tex.sum"
    assert choice.metrics == (L2_SM_METRIC, L2_ALL_METRIC, "pcie__read_bytes.sum", "pcie__write_bytes.sum",
                              "dramc__read_throughput.avg.pct_of_peak_sustained_elapsed",
                              "smsp__warps_issue_stalled_long_scoreboard.avg.per_cycle_active",
                              "lts__t_sectors_srcunit_tex.sum")
    assert gh100_accepts(choice.metrics) and not choice.missing
    # Only names the sets list (with sub-metrics) or the known PCIe/DRAM/sector names were ever asked about.
    bases = {split_name(m)[1] for ms in asked for m in ms}
    listed = {split_name(m)[1] for m in GH100_SETS["TriageCompute"]}
    assert bases <= listed | {"pcie__read_bytes", "pcie__write_bytes", "dram__bytes_read"}


def test_the_l2_pair_and_pcie_come_first_when_a_pass_holds_fewer():
    choice = choose_counters("GH100", GH100_SETS, lambda ms, s: gh100_accepts(ms, s, max_per_pass=4))
    assert choice.metrics == (L2_SM_METRIC, L2_ALL_METRIC, "pcie__read_bytes.sum", "pcie__write_bytes.sum")
    assert any(line.startswith(DRAM_PCT) and "refused" in line for line in choice.missing)


def test_the_chips_own_submetric_list_decides_the_suffix():
    offered = {"dramc__read_throughput": ["avg.pct_of_peak_sustained_elapsed", "max.pct_of_peak_sustained_elapsed"],
               "smsp__warps_issue_stalled_long_scoreboard": ["sum", "avg"]}
    choice = choose_counters("GH100", GH100_SETS, lambda ms, s: True, submetrics=offered.get)
    assert choice.roles[STALL] == "smsp__warps_issue_stalled_long_scoreboard.avg"  # .avg.per_cycle_* not offered
    assert choice.roles[DRAM_PCT] == "dramc__read_throughput.avg.pct_of_peak_sustained_elapsed"


def test_set_names_that_need_the_set_on_the_host_are_configured_with_it():
    needs_set = lambda ms, s: s == "TriageCompute" and gh100_accepts(ms, s)  # noqa: E731
    choice = choose_counters("GH100", GH100_SETS, needs_set)
    assert choice.use_set_name and choice.l2_metric == L2_SM_METRIC


def test_a_chip_without_l2_counters_says_which_sets_it_has_and_what_is_missing():
    plain = lambda ms, s: all(not m.startswith("LTS.") for m in ms)  # noqa: E731
    choice = choose_counters("GA100", NO_L2_SETS, plain)
    assert choice.l2_metric is None and choice.set_name is None
    line = next(m for m in choice.missing if m.startswith("L2 hit rate"))
    assert "no single-pass set of GA100 names one" in line
    assert "TriageCompute (3 metrics), Graphics (2 metrics)" in line
    assert "lts__average_t_sector_hit_rate_srcunit_tex_realtime" in line and "lts__average_t_sector_hit_rate_realtime" in line
    assert choice.metrics[:2] == ("pcie__read_bytes.sum", "pcie__write_bytes.sum")


def test_without_the_set_listing_api_no_l2_counter_is_guessed():
    choice = choose_counters("GH100", None, lambda ms, s: True)
    assert choice.l2_metric is None
    assert "cannot list GH100's single-pass sets" in choice.missing[0] and ">= 13.4" in choice.missing[0]
    assert all(role_of(m) not in (L2_SM, L2_ALL) for m in choice.metrics)


# ---- the probe through the fake --------------------------------------------------------------------------------

def test_probe_on_gh100_configures_the_choice_once_and_leaves_nothing_enabled():
    fake = FakeCupti()
    probe = sampler_on(fake).probe()
    assert probe.available and probe.l2_available and probe.chip == "GH100" and probe.fallback is None
    assert probe.metrics[0] == L2_SM_METRIC and "partition-averaged" in probe.l2_formula
    configure = [c[1] for c in fake.calls if isinstance(c, tuple) and c[0] == "configure"]
    assert len(configure) == 1 and configure[0]["sampling_interval"] == DEFAULT_INTERVAL_US * 1000
    assert "single_pass_metric_set_name" not in configure[0]
    assert fake.enabled == 0 and fake.calls[-1] == "disable"
    assert "every 5 ms" in probe.reason


def test_probe_reasons_when_it_cannot_sample():
    fake = FakeCupti(enable_error=PermissionError("CUPTI_ERROR_INSUFFICIENT_PRIVILEGES"))
    assert sampler_on(fake).why_unavailable.startswith("no permission for GPU performance counters")
    fake = FakeCupti(accepts=lambda ms, s: False)
    why = sampler_on(fake).why_unavailable
    assert why.startswith("counters refused on GH100") and NCU_FALLBACK in why and fake.enabled == 0
    no_l2 = sampler_on(FakeCupti(sets=NO_L2_SETS, accepts=lambda ms, s: "LTS." not in " ".join(ms))).probe()
    assert no_l2.available and not no_l2.l2_available and no_l2.l2_formula is None
    assert "L2 = not available" in no_l2.reason and "no single-pass set of GH100 names one" in no_l2.reason


def test_a_counter_configure_refuses_is_dropped_and_said():
    refuse_sectors = lambda metrics: ValueError("not supported") if "lts__t_sectors_srcunit_tex.sum" in metrics \
        else None  # noqa: E731
    probe = sampler_on(FakeCupti(configure_error=refuse_sectors)).probe()
    assert probe.available and "lts__t_sectors_srcunit_tex.sum" not in probe.metrics
    assert L2_SM_SECTORS not in probe.choice.roles and "configure refused lts__t_sectors_srcunit_tex.sum" in probe.reason


def test_interval_bounds():
    with pytest.raises(ValueError, match="100..100000"):
        CuptiPmSampler(interval_us=50)
    assert CuptiPmSampler(interval_us=10_000).interval_us == 10_000


# ---- sampling through the fake ---------------------------------------------------------------------------------

def test_samples_are_drained_on_the_samplers_thread_and_all_returned_at_stop():
    fake = FakeCupti()
    sampler = sampler_on(fake, interval_us=1000, decode_every_s=0.01, max_samples_per_decode=7)
    sampler.start()
    fake.workload["l2"] = 47.0
    fake.advance_ms(30.5)
    deadline = time.monotonic() + 5
    while sampler.samples()[1] < 29 and time.monotonic() < deadline:
        time.sleep(0.01)
    live, cursor = sampler.samples()
    assert cursor == 29 and len(live) == 29  # the first sample of the session has no start time: skipped
    assert all(s.l2_hit_pct == 47.0 for s in live) and sampler.poll() == live and sampler.poll() == []
    fake.workload["l2"] = 25.0
    fake.advance_ms(10)
    samples = sampler.stop()
    assert len(samples) == 39 and samples[-1].l2_hit_pct == 25.0
    assert sampler.samples(cursor)[0] == samples[29:]
    assert [s.end_ns - s.start_ns for s in samples] == [1_000_000] * 39
    assert samples[0].values[L2_ALL_METRIC] == 38.0 and samples[0].values["pcie__read_bytes.sum"] == 50.0 * 1e6
    assert sampler.stats.decodes >= 6 and sampler.stats.samples == 39 and sampler.stats.error is None
    assert fake.enabled == 0 and sampler.stop() == []


def test_a_run_result_carries_aligned_labelled_series():
    fake = FakeCupti()
    sampler = sampler_on(fake)
    sampler._calibration = L2Calibration(device="NVIDIA H200", chip="GH100", measured_at="2026-12-01T10:00:00+00:00",
                                         interval_us=5000, values={L2_SM_METRIC: (48.2, 25.1),
                                                                   L2_ALL_METRIC: (47.0, 24.0)})
    origin = fake.now_ns
    sampler.start()
    fake.advance_ms(52)
    samples = sampler.stop()
    run = sampler.run_result(samples, origin_wall_ns=origin)
    assert run.l2_hit_pct == pytest.approx(40.0)
    (t0, first), *_ = run.counters[COUNTER_L2]
    assert t0 == 5000.0 and first == {"L2 hit %": 40.0}  # the sample from 5 to 10 ms, on the recorder's µs axis
    assert [t for t, _ in run.counters[COUNTER_L2]] == [5000.0 * k for k in range(1, 10)]
    label = run.labels[COUNTER_L2]
    assert L2_SM_METRIC in label and "two partitions" in label and "every 5 ms" in label
    assert "an all-hit (L2-resident) loop reads 48 % here and a DRAM-streaming loop 25 %" in label
    assert set(run.labels) == set(run.counters)  # every track drawn has its label
    assert "L2 hit 40.0 % mean of 9 CUPTI PM samples" in run.note and "all-hit" in run.note


def test_a_run_without_l2_counters_says_why():
    fake = FakeCupti(sets=NO_L2_SETS, accepts=lambda ms, s: "LTS." not in " ".join(ms))
    sampler = sampler_on(fake)
    sampler.start()
    fake.advance_ms(20)
    run = sampler.run_result(sampler.stop(), origin_wall_ns=fake.now_ns)
    assert run.l2_hit_pct is None and "no single-pass set of GH100 names one" in run.note
    assert COUNTER_L2 not in run.counters and "PCIe GB/s (CUPTI PM sampling)" in run.counters


# ---- calibration ---------------------------------------------------------------------------------------------

def test_calibration_medians_of_both_loops_cached_per_device(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    fake = FakeCupti()
    sampler = sampler_on(fake, interval_us=1000)
    sampler.probe()

    def fake_loops(device, *, seconds):
        def loop(pct):
            def run():
                fake.workload.update(l2=pct, l2_all=pct - 1)
                fake.advance_ms(seconds * 1000)
            return run
        return loop(48.0), loop(25.0), lambda: None

    monkeypatch.setattr("engine.telemetry.cupti_calibration.loops", fake_loops)
    cal = calibrate(sampler.sample_during, device="cuda", device_name="NVIDIA H200", chip="GH100",
                    metrics=[L2_SM_METRIC, L2_ALL_METRIC], interval_us=1000)
    assert cal.figures(L2_SM_METRIC) == (48.0, 25.0) and cal.figures(L2_ALL_METRIC) == (47.0, 24.0)
    assert cal.num_samples[0] >= 12 and fake.enabled == 0
    path = calibration_path("NVIDIA H200", "cuda 13.0", "GH100")
    from engine.telemetry.cupti_calibration import save_calibration

    save_calibration(cal, path)
    assert load_calibration(path) == cal and path.parent == tmp_path / "hardware"
    path.write_text("{not json")
    assert load_calibration(path) is None


def test_the_sampler_reads_a_cached_calibration_without_measuring(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    import torch

    from engine.telemetry.cupti_calibration import save_calibration

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    cal = L2Calibration(device="NVIDIA H200", chip="GH100", measured_at="2026-12-01T10:00:00+00:00", interval_us=5000,
                        values={L2_SM_METRIC: (48.0, 25.0), L2_ALL_METRIC: (47.0, 24.0)})
    save_calibration(cal, calibration_path("NVIDIA H200", f"cuda {torch.version.cuda}", "GH100"))
    monkeypatch.setattr("engine.telemetry.cupti_sampler.calibrate",
                        lambda *a, **k: pytest.fail("measured although a calibration is cached"))
    sampler = sampler_on(FakeCupti(), calibrate=True)
    sampler.start()
    assert sampler.calibration() == cal
    sampler.stop()


def test_a_failed_calibration_leaves_the_run_sampling_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    sampler = sampler_on(FakeCupti(), calibrate=True)
    sampler.start()  # torch.cuda has no device here: the calibration fails, sampling starts anyway
    assert sampler.calibration_note.startswith("calibration failed")
    assert sampler.stop() == []
    assert "the all-hit reading of this device was not measured" in \
        sampler.run_result([], origin_wall_ns=0).labels[COUNTER_L2]


# ---- this machine ---------------------------------------------------------------------------------------------

def test_on_this_machine_the_probe_says_what_is_missing_and_points_to_ncu_results():
    try:
        import cupti  # noqa: F401

        pytest.skip("cupti-python is installed here")
    except ImportError:
        pass
    sampler = CuptiPmSampler()
    assert sampler.probe().available is False
    assert sampler.why_unavailable.startswith("cupti-python not installed")
    assert sampler.fallback == NCU_FALLBACK and (REPO / NCU_FALLBACK).is_file()
    with pytest.raises(RuntimeError, match="not installed"):
        sampler.start()
    assert sampler.poll() == [] and sampler.stop() == []
    no_gpu = CuptiPmSampler(importer=lambda name: object(), cuda_available=lambda: False)
    assert no_gpu.why_unavailable.startswith("no GPU")


def test_the_probe_bench_without_cupti_writes_why_and_exits_0(tmp_path):
    import json
    import subprocess
    import sys

    try:
        import cupti  # noqa: F401

        pytest.skip("cupti-python is installed here")
    except ImportError:
        pass
    done = subprocess.run([sys.executable, str(REPO / "bench" / "cupti_probe.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cupti-python not installed" in done.stdout
    doc = json.loads((tmp_path / "cupti_live.json").read_text())
    assert doc["suite"] == "cupti_live" and doc["details"]["available"] is False
    assert [h["key"] for h in doc["headlines"]] == ["l2_live_available"] and doc["headlines"][0]["value"] == 0.0
    assert json.loads((tmp_path / "summary.json").read_text())["l2_live_available"]["value"] == 0.0


def test_a_member_listed_without_its_set_prefix_is_tried_with_it():
    bare = {"TriageCompute": ["lts__average_t_sector_hit_rate_srcunit_tex_realtime", "dramc__read_throughput"]}
    choice = choose_counters("GH100", bare, lambda ms, s: gh100_accepts(ms, s))
    assert choice.l2_metric == L2_SM_METRIC  # the bare .pct/.ratio refused, LTS.TriageCompute.<name>.pct taken
