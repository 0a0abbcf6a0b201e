"""The bench harness on CPU: one table, results files with device/date/command, summary.json merging."""

from __future__ import annotations

import json

import pytest

from bench.__main__ import available_suites, main
from bench.report import Headline, Row, command_line, markdown_table, update_summary

SUMMARY_FIELDS = {"value", "unit", "peer", "peer_value", "device", "date", "command"}


def test_decode_suite_writes_results_and_summary(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"kept_key": {"value": 1.0, "unit": "x"}}))
    argv = ["decode", "--model", "synthetic:tiny-llama", "--batch", "2", "--prompt-len", "12", "--new-tokens", "6",
            "--repeat", "2", "--exact-seqs", "3", "--exact-tokens", "5", "--ours", "auto",
            "--results-dir", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| case |" in printed and "transformers generate, dynamic cache" in printed
    payload = json.loads((tmp_path / "decode.json").read_text())
    assert {"suite", "device", "date", "command", "rows", "headlines"} <= set(payload)
    assert payload["command"].startswith("python -m bench decode") and str(tmp_path) not in payload["command"]
    ours = next(r for r in payload["rows"] if r["case"].startswith("ours, auto"))
    peer = next(r for r in payload["rows"] if r["case"].startswith("transformers"))
    assert ours["ratio"] == pytest.approx(peer["ms"] / ours["ms"])
    assert ours["tok_s"] == pytest.approx(2 / (ours["ms"] * 1e-3))
    md = (tmp_path / "decode.md").read_text()
    assert payload["device"] in md and payload["date"] in md and payload["command"] in md
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "kept_key" in summary  # other suites' headlines are kept
    for key in ("gpu_decode_tok_s", "gpu_decode_pct_roofline", "gpu_exact_tokens_match"):
        assert SUMMARY_FIELDS <= set(summary[key]), key
    assert summary["gpu_exact_tokens_match"]["value"] == 1.0  # fp32 on CPU: the engine is exact


def test_unknown_suite_and_variant_are_refused(tmp_path, capsys):
    assert main(["no-such-suite"]) == 2
    assert "choose one of" in capsys.readouterr().err
    assert {"decode", "decode_attention", "demo_chat"} <= set(available_suites())
    with pytest.raises(SystemExit, match="unknown --ours"):
        main(["decode", "--model", "synthetic:tiny-llama", "--ours", "warp-speed", "--exact-seqs", "0",
              "--results-dir", str(tmp_path)])


def test_command_line_drops_the_results_dir():
    assert command_line(["decode", "--results-dir", "/x/y", "--repeat", "3"]) == "python -m bench decode --repeat 3"
    assert command_line(["decode", "--results-dir=/x/y"]) == "python -m bench decode"
    assert command_line(["--a b"], program="python t.py") == "python t.py '--a b'"


def test_rows_derive_bandwidth_and_ratio_and_the_table_skips_empty_columns():
    row = Row(case="c", ms=2.0, bytes_moved=4_000_000_000, peer="p", peer_ms=3.0)
    assert row.gb_s == pytest.approx(2000.0) and row.ratio == pytest.approx(1.5)
    table = markdown_table([row, Row(case="peer only", ms=3.0)])
    assert "tok/s" not in table and "| c | 2.000 |" in table and "1.50x" in table and "| - |" in table


def test_update_summary_overwrites_a_key_and_keeps_the_rest(tmp_path):
    update_summary([Headline("a", 1.0, "x"), Headline("b", 2.0, "y")], device="d1", date="t1", command="c1",
                   results_dir=tmp_path)
    update_summary([Headline("a", 3.0, "x", peer="p", peer_value=4.0)], device="d2", date="t2", command="c2",
                   results_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["a"] == {"value": 3.0, "unit": "x", "peer": "p", "peer_value": 4.0, "device": "d2", "date": "t2",
                            "command": "c2"}
    assert summary["b"]["device"] == "d1"


def test_offload_suite_runs_every_part_on_cpu_and_keeps_its_smoke_figures_out_of_the_summary(tmp_path, capsys,
                                                                                              profile_cache):
    (tmp_path / "summary.json").write_text(json.dumps({"kept_key": {"value": 1.0, "unit": "x"}}))
    # Two families' tiny presets stand for all of them here (tests/test_offload.py runs every family offloaded).
    assert main(["offload", "--parts", "exact,mha,gqa,telemetry", "--exact-model", "synthetic:tiny-llama",
                 "--families", "tiny-llama3,tiny-gemma3", "--results-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "cpu, split 0 (all K/V copied)" in printed and "recorder on" in printed
    payload = json.loads((tmp_path / "offload_quick.json").read_text())
    details = payload["details"]
    assert "failures" not in details, details.get("failures")
    # fp32 on CPU: every placement, split and schedule gives the GPU-resident tokens, recompute is bit-exact
    assert all(v["match_fraction"] == 1.0 for k, v in details["exact_demo"].items()
               if isinstance(v, dict) and "match_fraction" in v)
    assert all(v["k_differing"] == 0 == v["v_differing"] for v in details["recompute_vs_prefill"].values())
    assert {p["case"] for p in details["predictions"]} >= {"cpu, split 0 (all K/V copied)", "cpu, auto split"}
    assert (tmp_path / "offload_quick_trace.json.gz").exists()
    assert json.loads((tmp_path / "summary.json").read_text()) == {"kept_key": {"value": 1.0, "unit": "x"}}


def test_results_markdown_renders_again_from_its_json(tmp_path):
    """The .md beside a .json is markdown_of(that json): a results file whose .md did not come back from a GPU run
    renders the same page from its .json; extra tables sit between the headlines and the notes."""
    import json

    from bench.report import SuiteResult, markdown_of, write_results

    result = SuiteResult(suite="demo_suite", rows=[Row(case="a", ms=2.0, bytes_moved=4_000_000), Row(case="b", ms=None)],
                         headlines=[Headline("demo_key", 1.25, "x", "peer", 3.0)], notes=["a note"],
                         tables=["| t |\n|---|\n| 1 |"])
    write_results(result, results_dir=tmp_path, command="python -m bench demo_suite")
    md = (tmp_path / "demo_suite.md").read_text()
    assert markdown_of(json.loads((tmp_path / "demo_suite.json").read_text())) == md
    assert md.index("`demo_key`") < md.index("| t |") < md.index("- a note") and "2.000" in md


def test_gpu_run_script_runs_only_the_steps_named(tmp_path):
    """`bash bench/gpu_run.sh OUT STEP...` runs those steps alone (a time-limited GPU session runs a few at a time)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["bash", "bench/gpu_run.sh", str(tmp_path), "gpu_oom"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    logs = sorted(p.name for p in tmp_path.glob("*.log"))
    assert logs == ["gpu_oom.log"], (logs, done.stdout, done.stderr)
    assert "needs a CUDA GPU" in (tmp_path / "gpu_oom.log").read_text()  # it ran, and said why it stopped here
