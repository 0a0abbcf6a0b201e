"""The decode bench on CPU, every part: several cases, the plain and fused variants, a transformers peer, the
exactness checks (fused included), the per-step breakdown, the roofline ceiling and the summary headlines; the
streaming-read kernel behind the ceiling (interpreter); bench/profile_decode.py's command line."""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bench.__main__ import main  # noqa: E402
from bench.suites import decode  # noqa: E402
from kernels.decode_attention import _interpreting  # noqa: E402


def test_decode_suite_runs_every_part_on_cpu(tmp_path, capsys, one_thread):
    (tmp_path / "summary.json").write_text(json.dumps({"kept_key": {"value": 1.0, "unit": "x"}}))
    argv = ["decode", "--cases", "tiny-llama:2x12,tiny-qwen3:1x9,tiny-opt:2x6", "--new-tokens", "5", "--repeat", "1",
            "--exact-seqs", "2", "--exact-tokens", "4", "--ours", "auto,plain,fused,fused, eager (no graph)",
            "--results-dir", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    payload = json.loads((tmp_path / "decode.json").read_text())
    cases = [row["case"] for row in payload["rows"]]
    for label in ("tiny-llama B2 P12", "tiny-qwen3 B1 P9", "tiny-opt B2 P6"):
        assert f"ours, auto, no graph on CPU ({label})" in cases  # the default: on a CPU, the plain adapter
        assert f"ours, plain, no graph on CPU ({label})" in cases
        assert f"ours, fused, no graph on CPU ({label})" in cases
        assert f"ours, fused, eager (no graph) ({label})" in cases
    assert "transformers generate, dynamic cache (tiny-llama B2 P12)" in cases  # the peer runs on the first case
    assert not any("transformers" in c and "qwen3" in c for c in cases)
    details = payload["details"]
    assert details["ceiling_gb_s"] >= details["read_gb_s"] > 0
    assert all(row["pct_roofline"] <= 100.0 + 1e-9 for row in payload["rows"])  # never above the ceiling
    # fp32 on CPU: the fast adapter is exact, against the plain one and against transformers
    exact = details["exactness"][0]
    assert exact["fused_vs_ours"]["match_fraction"] == 1.0 and exact["fused_vs_ours"]["max_logits_rel_err"] == 0.0
    assert exact["fused_vs_transformers"]["match_fraction"] == 1.0
    assert details["cases"]["tiny-llama B2 P12"]["fused_vs_plain"]["match_fraction"] == 1.0
    assert "no fast adapter for the opt family" in printed  # OPT runs its plain adapter, and says so
    breakdown = details["cases"]["tiny-llama B2 P12"]["breakdown"]
    assert set(breakdown) == {"plain", "fused"} and breakdown["fused"]["kernels"] > 0
    assert "tiny-qwen3 B1 P9 · ours auto: " in printed  # each variant is printed as it is measured
    # the row's figure: each run's own steps (5 new tokens: 4 decode steps, the first 2 left out), for ours and for
    # transformers (its steps timestamped by a logits processor); the difference estimate kept beside it
    info = details["cases"]["tiny-llama B2 P12"]
    in_run = info["ours_auto_in_run_ms"]
    assert len(in_run) == 1 and in_run[0] > 0
    row = next(r for r in payload["rows"] if r["case"] == "ours, auto, no graph on CPU (tiny-llama B2 P12)")
    assert row["ms"] == pytest.approx(in_run[0])
    peer_in_run = info["transformers_dynamic_in_run_ms"]
    peer_row = next(r for r in payload["rows"] if r["case"] == "transformers generate, dynamic cache (tiny-llama B2 P12)")
    assert len(peer_in_run) == 1 and peer_row["ms"] == pytest.approx(peer_in_run[0])
    assert len(info["ours_auto_samples_ms"]) == 1
    assert "tiny-llama B2 P12: ours auto's step inside each run (the row's figure)" in " ".join(payload["notes"])
    assert not (tmp_path / "decode.partial.json").exists()  # the whole run replaced its partial results
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "kept_key" in summary
    for key in ("gpu_decode_pct_roofline", "gpu_decode_tok_s", "gpu_decode_case1_pct_roofline",
                "gpu_exact_tokens_match"):
        assert {"value", "unit", "device", "date", "command"} <= set(summary[key]), key
    assert "gpu_decode_vs_hf_static" not in summary  # no static peer ran on the CPU
    # the cost model's GPU-resident step beside each case's measurement, from the profile the run recorded
    from engine.loader import load_model
    from engine.offload.profiler import HardwareProfile

    profile = HardwareProfile.from_dict(details["profile"])
    errors = []
    for case in decode._cases(type("A", (), {"model": None, "batch": None, "prompt_len": None,
                                             "cases": "tiny-llama:2x12,tiny-qwen3:1x9,tiny-opt:2x6"})()):
        info = details["cases"][case.label]
        spec = load_model(case.model, device="cpu", dtype="float32").spec
        assert info["predicted_step_ms"] == pytest.approx(decode.predicted_step_ms(spec, profile, case, 5))
        measured = next(r["ms"] for r in payload["rows"] if r["case"] == f"ours, auto, no graph on CPU ({case.label})")
        assert info["prediction_err_pct"] == pytest.approx(100 * (info["predicted_step_ms"] - measured) / measured)
        assert isinstance(info["ours_auto_setup_ms"], float)
        errors.append(abs(info["prediction_err_pct"]))
    assert summary["gpu_resident_prediction_max_err_pct"]["value"] == pytest.approx(max(errors))


def test_a_step_is_timed_without_the_runs_setup(monkeypatch):
    """(t(N) - t(2)) / (N - 2): a run's once-only costs (prefill, a CUDA-graph capture for runs of more than one
    token) cancel and come back apart; (t(N) - t(1)) / (N - 1) would have spread the capture over the steps."""
    monkeypatch.setattr(decode, "_timed", lambda fn: (fn(), None))
    prefill_ms, capture_ms, step_ms = 50.0, 120.0, 7.0
    run = lambda n: prefill_ms + (capture_ms if n > 1 else 0.0) + step_ms * n  # noqa: E731
    median, samples, setup, in_run = decode._step_ms(run, 64, 3)
    assert median == pytest.approx(step_ms) and samples == pytest.approx([step_ms] * 3)
    assert setup == pytest.approx(capture_ms)
    assert in_run == []  # the run gave no result with steps of its own


def test_too_few_new_tokens_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="at least 3"):
        main(["decode", "--cases", "tiny-llama:1x4", "--new-tokens", "2", "--results-dir", str(tmp_path)])


def test_targets_are_the_four_issue_shapes_and_cases_parse():
    class Args:
        model = batch = prompt_len = None
        cases = ""

    assert [c.label for c in decode._cases(Args())] == ["llama-2-7b B8 P2048", "llama-2-7b B1 P2048",
                                                         "llama-2-7b B64 P512", "llama-3-8b B8 P8192"]
    Args.cases = "llama-3-8b:8x8192, demo:2x16"
    assert [(c.model, c.batch, c.prompt_len) for c in decode._cases(Args())] == [
        ("synthetic:llama-3-8b", 8, 8192), ("demo", 2, 16)]
    Args.cases = "llama-2-7b:8"
    with pytest.raises(SystemExit, match="MODEL:BxP"):
        decode._cases(Args())
    Args.model, Args.batch = "synthetic:tiny-llama", 3  # the single-case options win
    assert [(c.model, c.batch, c.prompt_len) for c in decode._cases(Args())] == [("synthetic:tiny-llama", 3, 2048)]


def test_headline_keys_follow_the_targets():
    def entry(ms):
        row = decode.Row(case="c", ms=ms, bytes_moved=10**9, pct_roofline=50.0)
        return row, ms / 2

    t = decode.TARGETS
    by_key = {(t[0], "fused"): entry(6.0), (t[0], "auto"): entry(11.0), (t[0], "transformers static"): entry(10.8),
              (t[1], "auto"): entry(4.0), (t[3], "fused"): entry(7.0)}
    heads = {h.key: h for h in decode._headlines(list(t), ["auto", "fused"], by_key, cuda=True)}
    assert set(heads) == {"gpu_decode_pct_roofline", "gpu_decode_tok_s", "gpu_decode_vs_hf_static",
                          "gpu_decode_b1_pct_roofline", "gpu_decode_llama3_p8192_pct_roofline"}
    # the default path (auto) where it ran, though fused was faster; the fastest of ours where auto is absent
    assert heads["gpu_decode_vs_hf_static"].value == pytest.approx(10.8 / 11.0)
    assert "ours auto" in heads["gpu_decode_pct_roofline"].unit
    assert "ours fused" in heads["gpu_decode_llama3_p8192_pct_roofline"].unit
    assert "ms/token" in heads["gpu_decode_b1_pct_roofline"].unit


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 before triton is imported")
@pytest.mark.parametrize("numel,programs,block", [(4096 * 6, 3, 1024), (1000, 4, 64), (5, 2, 16), (3, 4, 16), (64 * 7, 2, 64)])
def test_stream_read_reads_every_element_once(numel, programs, block):
    from kernels.stream_read import stream_read, stream_read_reference

    src = torch.randn(numel).to(torch.bfloat16)
    parts = stream_read(src, programs=programs, block=block)
    assert parts.shape == (programs,)
    torch.testing.assert_close(parts.sum(), stream_read_reference(src), rtol=1e-5, atol=1e-3)
    ones = torch.ones(numel)
    assert float(stream_read(ones, programs=programs, block=block).sum()) == numel  # each element once


def test_profile_decode_command_line_on_cpu(capsys, one_thread):
    from bench import profile_decode

    assert profile_decode.main(["--model", "synthetic:tiny-llama", "--batch", "2", "--prompt-len", "8", "--steps",
                                "1", "--fused"]) == 0
    out = capsys.readouterr().out
    assert "| kind | ms/step |" in out and "| total |" in out and "fused" in out
    assert profile_decode.kind_of("_skinny_gemm_kernel") == "gemm"
    assert profile_decode.kind_of("_add_rms_norm_kernel") == "norm"
    assert profile_decode.kind_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert profile_decode.kind_of("_kernel") == "attention"


def test_ncu_variants_parse_and_refuse_malformed_ones():
    from bench.ncu_decode_attention import _variant

    assert _variant("3:on2") == (3, "on", 2) and _variant("0:off") == (0, "off", 1) and _variant("1:on") == (1, "on", 1)
    with pytest.raises(ValueError):
        _variant("three:off")


def test_sweep_table_ranks_each_shapes_variants_against_auto_and_the_best_peer():
    from bench.suites.decode_attention import sweep_table

    details = {"shapes": {"B1 S8": {"ms": {"ours auto": 0.040, "sdpa cudnn": 0.039}, "best_peer": "sdpa cudnn",
                                    "sweep_ms": {"a": 0.042, "b": 0.038, "c": "error: too many resources"}},
                          "B8 S2": {"ms": {"ours auto": 0.5}}}}
    lines = sweep_table(details, top=1).splitlines()
    assert lines[2] == "| B1 S8 | b | 38.0 | 1.053x | 1.026x (sdpa cudnn) |"
    assert "2 variants timed, 1 failed or wrong" in lines[3] and len(lines) == 4  # a shape without a sweep: no rows


def test_a_run_stopped_midway_keeps_the_cases_it_measured(tmp_path, monkeypatch, one_thread):
    """A time limit or crash in a later case leaves the earlier cases' steps in decode_<tag>.partial.json."""
    real, calls = decode.predicted_step_ms, []

    def stop_at_the_second_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("the time limit")
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "predicted_step_ms", stop_at_the_second_case)
    with pytest.raises(KeyboardInterrupt):
        main(["decode", "--cases", "tiny-llama:2x6,tiny-llama:1x5", "--new-tokens", "4", "--repeat", "1",
              "--exact-seqs", "0", "--no-profile", "--ours", "plain", "--peers", "", "--tag", "cut",
              "--results-dir", str(tmp_path)])
    partial = json.loads((tmp_path / "decode_cut.partial.json").read_text())
    assert [m["case"] for m in partial["measured"]] == ["ours, plain, no graph on CPU (tiny-llama B2 P6)"]
    assert partial["measured"][0]["ms"] > 0 and "tiny-llama B2 P6" in partial["details"]["cases"]
    assert not (tmp_path / "decode_cut.json").exists()


def test_the_in_run_step_is_the_median_after_the_first_steps():
    class Result:
        step_ms = [50.0, 9.0, 4.0, 6.0, 5.0]

    assert decode._in_run_step_ms(Result()) == 5.0
    assert decode._in_run_step_ms(Result(), skip=4) == 5.0
    assert decode._in_run_step_ms(type("R", (), {"step_ms": [3.0, 2.0]})()) is None  # too short to leave any
    assert decode._in_run_step_ms(torch.zeros(2)) is None  # a peer's output: no steps of its own


def test_variant_names_with_commas_are_joined_by_the_longest_name(one_thread):
    """--ours splits on commas; a name with commas of its own ("fused, pdl, weights ahead 4") is rejoined whole,
    a shorter name it starts with ("fused, pdl") is not taken instead, and an unknown piece is refused."""
    import argparse

    args = argparse.Namespace(ours="auto,fused, pdl, weights ahead 4,fused, pdl,fused")
    assert decode._wanted_variants(args) == ["auto", "fused, pdl, weights ahead 4", "fused, pdl", "fused"]
    with pytest.raises(SystemExit, match="weights ahead 3"):
        decode._wanted_variants(argparse.Namespace(ours="fused, pdl, weights ahead 3"))


def test_pdl_variants_are_compared_with_fused_without_the_plain_variant(tmp_path, one_thread):
    """The bench's own fast-adapter variants (early launches, the folded norm) are checked token for token against
    the fused variant, also when the plain adapter is not among the variants (on a CPU the kernels are torch ops:
    identical)."""
    argv = ["decode", "--cases", "tiny-llama:2x8", "--new-tokens", "4", "--repeat", "1", "--exact-seqs", "0",
            "--no-profile", "--peers", "", "--ours", "auto,fused, pdl, weights ahead 2,fused, fold norm",
            "--results-dir", str(tmp_path)]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "decode.json").read_text())
    info = payload["details"]["cases"]["tiny-llama B2 P8"]
    c = info["fused, pdl, weights ahead 2 vs fused"]
    assert c["match_fraction"] == 1.0 and c["max_logits_rel_err"] == 0.0
    assert "fused_vs_plain" not in info
    assert any("fused, pdl, weights ahead 2 vs fused (the engine's launches): 100%" in n for n in payload["notes"])
    folded = info["fused, fold norm vs fused"]  # on a CPU the fold does not apply (torch ops): identical
    assert folded["match_fraction"] == 1.0 and folded["max_logits_rel_err"] == 0.0
    assert any("fused, fold norm vs fused (the engine's launches): 100%" in n and "rounded otherwise" in n
               for n in payload["notes"])


def test_step_clock_passes_scores_through_and_the_step_falls_back_to_the_difference(one_thread):
    clock = decode._StepClock()
    scores = torch.randn(2, 5)
    assert clock(None, scores) is scores and clock(None, scores) is scores and clock(None, scores) is scores
    assert len(clock.step_ms) == 2 and all(ms >= 0 for ms in clock.step_ms)

    class Steps:  # a run that reports its steps: 10 ms each after two slow ones
        step_ms = [50.0, 30.0, 10.0, 10.0, 10.0]

    steady, samples, _, in_run = decode._step_ms(lambda n: Steps(), new_tokens=6, repeat=3)
    assert steady == 10.0 and in_run == [10.0] * 3 and len(samples) == 3
    steady, samples, _, in_run = decode._step_ms(lambda n: None, new_tokens=6, repeat=3)  # no steps reported
    assert in_run == [] and steady == sorted(samples)[1]


def test_profile_cases_all_breaks_down_every_case(tmp_path, one_thread):
    argv = ["decode", "--cases", "tiny-llama:1x6,tiny-qwen3:1x5", "--new-tokens", "4", "--repeat", "1",
            "--exact-seqs", "0", "--peers", "", "--ours", "auto", "--profile-cases", "all",
            "--results-dir", str(tmp_path)]
    assert main(argv) == 0
    cases = json.loads((tmp_path / "decode.json").read_text())["details"]["cases"]
    assert all(cases[label]["breakdown"]["plain"]["kernels"] > 0 for label in ("tiny-llama B1 P6", "tiny-qwen3 B1 P5"))
