"""bench/cupti_probe.py's parts on the CPU: the interleaved decode arms, the overhead headline, the trace it saves and
the kernel study it records, run on the tiny model (CUPTI samples nothing here; the harness is what is checked)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))


def test_the_probes_decode_and_kernel_parts_write_their_record(tmp_path, profile_cache, one_thread):
    import cupti_probe
    from engine.telemetry import CuptiPmSampler, read_trace

    args = argparse.Namespace(out=tmp_path, model="synthetic:tiny-llama", batch=1, prompt_len=24, new_tokens=6,
                              intervals_ms="5,1", kernel_shape="1,32,8,32768", budget_s=600.0, device="cpu")
    probe = cupti_probe.Probe(args)
    sampler = CuptiPmSampler(0, calibrate=False)
    probe.part("decode", lambda: cupti_probe._decode(probe, sampler, [5000, 1000]))
    probe.part("kernel_study", lambda: cupti_probe._kernels(probe, sampler))
    assert "errors" not in probe.details, probe.details.get("errors")
    runs = probe.details["decode_runs"]
    assert {k: len(v) for k, v in runs.items()} == {"off": 2, "5000": 2, "1000": 2}
    assert set(probe.details["overhead_ratio_by_interval_us"]) == {"5000", "1000"}
    headline, = [h for h in probe.headlines if h.key == "cupti_overhead_ratio"]
    assert headline.value > 0 and "every 5 ms" in headline.unit
    trace = read_trace(tmp_path / "cupti_live_run.trace.json.gz")
    assert trace["metadata"]["model"] and any(e["ph"] == "X" for e in trace["traceEvents"])
    assert probe.details["kernel_study"]["measured"] is False and len(probe.details["kernel_study"]["rows"]) == 11
    probe.write()
    assert (tmp_path / "cupti_live.json").is_file() and (tmp_path / "cupti_live.md").is_file()


def test_the_probe_on_a_fake_gh100_lists_sets_chooses_counters_and_survives_failing_parts(tmp_path, monkeypatch):
    """main() with cupti-python faked (GH100's sets) and no GPU behind it: the sets, the choice and the L2 headline
    are written; the parts that need the GPU fail, each saying so, and the probe still exits 0."""
    import functools
    import json

    import torch

    import cupti_probe
    import engine.telemetry
    from cupti_fake import FakeCupti

    fake = FakeCupti()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    monkeypatch.setattr(engine.telemetry, "CuptiPmSampler",
                        functools.partial(engine.telemetry.CuptiPmSampler, cuda_available=lambda: True))
    assert cupti_probe.main(["--out", str(tmp_path), "--kernel-shape", "", "--budget-s", "600"]) == 0
    doc = json.loads((tmp_path / "cupti_live.json").read_text())
    details = doc["details"]
    assert details["chip"] == "GH100" and details["single_pass_sets"]["TriageCompute"][0].startswith("LTS.")
    assert details["metrics"][0].endswith("srcunit_tex_realtime.pct") and details["set_name"] == "TriageCompute"
    assert {h["key"]: h["value"] for h in doc["headlines"]} == {"l2_live_available": 1.0}
    assert "decode" in details["errors"] and any(n.startswith("decode failed") for n in doc["notes"])
    assert any("calibration" in n for n in doc["notes"])
