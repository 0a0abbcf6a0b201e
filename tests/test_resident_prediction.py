"""The scheduler's GPU-resident step prediction against GPU-resident steps measured on an H200.

bench/results/decode_repeat5.json holds four measured cases (default path, medians of 5) and the hardware profile
measured in the same run. That profile (version 2) timed decode attention with the host's launches inside the
events and read 3.0 TB/s where the kernel reads 4.48-4.59 (bench/results/decode_attention.json, the same day, timed
on the GPU's clock as profile version 3 now times it). With the kernel's own rate the cost model must land within
10 % of every measured step; with the version-2 figure it did not. bench/results/decode.json is a later run with a
version-3 profile: its attention figure is the kernel's, and its recorded predictions are the cost model's.
"""

import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.suites.decode import TARGETS, predicted_step_ms
from engine.adapters import adapter_for
from engine.loader import meta_synthetic
from engine.offload.profiler import HardwareProfile

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _spec(source: str, prompt_len: int):
    model, _, _ = meta_synthetic(source.removeprefix("synthetic:"), dtype=torch.bfloat16,
                                 max_positions=max(4096, prompt_len + 65))
    return adapter_for(model).spec


def _errors(profile: HardwareProfile, run: dict) -> dict[str, float]:
    errors = {}
    for case in TARGETS:
        measured = statistics.median(run["details"]["cases"][case.label]["ours_auto_samples_ms"])
        predicted = predicted_step_ms(_spec(case.model, case.prompt_len), profile, case, 64)
        errors[case.label] = (predicted - measured) / measured
    return errors


def test_gpu_resident_predictions_land_within_10_pct_of_the_h200_steps():
    run = json.loads((RESULTS / "decode_repeat5.json").read_text())
    kernel = json.loads((RESULTS / "decode_attention.json").read_text())
    shape = kernel["details"]["shapes"]["B8 Hq32 Hkv32 S16384"]
    kernel_gb_s = shape["bytes_moved"] / (shape["ms"]["ours auto"] * 1e-3) / 1e9
    measured_profile = HardwareProfile.from_dict(run["details"]["profile"])
    assert measured_profile.version == 2 and measured_profile.attention_gb_s < 0.7 * kernel_gb_s

    errors = _errors(replace(measured_profile, attention_gb_s=kernel_gb_s), run)
    assert max(abs(e) for e in errors.values()) <= 0.10, errors
    before = _errors(measured_profile, run)  # the host-timed attention figure: 13-19 % slow on three cases
    assert max(before.values()) > 0.10 and min(before.values()) > 0, before
    # the committed run's own prediction is the version-2 one
    case = TARGETS[0]
    assert run["details"]["cases"][case.label]["predicted_step_ms"] == pytest.approx(
        predicted_step_ms(_spec(case.model, case.prompt_len), measured_profile, case, 64), rel=1e-6)


def test_the_version_3_profile_measures_attention_at_the_kernels_rate():
    run = json.loads((RESULTS / "decode.json").read_text())
    kernel = json.loads((RESULTS / "decode_attention.json").read_text())
    shape = kernel["details"]["shapes"]["B8 Hq32 Hkv32 S16384"]
    kernel_gb_s = shape["bytes_moved"] / (shape["ms"]["ours auto"] * 1e-3) / 1e9
    profile = HardwareProfile.from_dict(run["details"]["profile"])
    assert profile.version == 3 and abs(profile.attention_gb_s / kernel_gb_s - 1) < 0.10, (profile.attention_gb_s,
                                                                                          kernel_gb_s)
    errors = []
    for case in TARGETS:
        info = run["details"]["cases"][case.label]
        predicted = predicted_step_ms(_spec(case.model, case.prompt_len), profile, case, 64)
        assert info["predicted_step_ms"] == pytest.approx(predicted, rel=1e-6)  # what the run wrote is the model's
        measured = statistics.median(info["ours_auto_samples_ms"])
        errors.append(abs(predicted - measured) / measured)
    assert max(errors) < 0.13, errors  # the run's 11.2 % worst case (B1): the 10 % target is not yet met
