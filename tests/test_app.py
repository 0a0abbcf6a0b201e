"""The app through its API (gradio_client), on CPU with the demo model and a tiny synthetic model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import re

import pytest

import app as lab_app
from engine.access import is_loopback
from engine.session import normalise_history


@pytest.fixture(scope="module")
def client(served_demo_app):
    from gradio_client import Client

    demo, session = served_demo_app
    return Client(demo.local_url, verbose=False), session


def _chat(client, message, *, n=40, temperature=0.8, top_p=0.95, top_k=0, seed=7, history=()):
    return client.predict(list(history), message, n, temperature, top_p, top_k, seed, api_name="/chat")


def test_chat_streams_a_reply_with_its_speed(client):
    api, _ = client
    job = api.submit([], "How now, my lord?", 60, 0.8, 0.95, 0, 7, api_name="/chat")
    outputs = list(job)  # every streamed state
    history, box, stats = job.result()
    assert len(outputs) >= 2, "the reply was not streamed"
    assert history[-2]["role"] == "user" and history[-1]["role"] == "assistant"
    reply = history[-1]["content"]
    reply = reply if isinstance(reply, str) else "".join(b.get("text", "") for b in reply)
    assert reply.strip() and box == ""
    assert "tok/s" in stats and "finished" in stats


def test_chat_same_seed_same_reply_and_history_is_kept(client):
    api, _ = client
    first = _chat(api, "Who goes there?", seed=11)
    second = _chat(api, "Who goes there?", seed=11)
    assert normalise_history(first[0])[-1] == normalise_history(second[0])[-1]  # the same words; speeds differ
    followup = _chat(api, "Speak again.", history=first[0])
    turns = normalise_history(followup[0])
    assert len(turns) == 4 and turns[0]["content"] == "Who goes there?"
    # Each reply keeps its own figures under it; what goes back to the model is the words alone.
    replies = [t["content"] if isinstance(t["content"], str) else "".join(b.get("text", "") for b in t["content"])
               for t in followup[0] if t["role"] == "assistant"]
    assert len(replies) == 2 and all(re.search(r"_\d+ tokens · [0-9.]+ tok/s_$", r) for r in replies)
    assert all("tok/s" not in t["content"] for t in turns)


@pytest.mark.parametrize("message, args, expected", [
    ("", {}, "empty"),
    ("   ", {}, "empty"),
    ("x" * 20_001, {}, "limit"),
    ("hello", {"top_k": -3}, "top_k"),
])
def test_bad_chat_input_is_reported_and_the_app_keeps_working(client, message, args, expected):
    api, session = client
    history, box, stats = _chat(api, message, **args)
    assert "Error" in stats and expected in stats, stats
    assert box == message  # the user's text is not lost
    assert session.model is not None
    assert _chat(api, "Still there?", n=5)[0][-1]["content"] is not None


@pytest.mark.parametrize("args, expected", [({"n": 0}, "minimum"), ({"n": 5000}, "maximum"),
                                            ({"top_p": 0.0}, "minimum"), ({"temperature": -1.0}, "minimum")])
def test_out_of_range_sliders_are_refused_and_the_app_keeps_working(client, args, expected):
    from gradio_client.exceptions import AppError

    api, session = client
    with pytest.raises(AppError, match=expected):
        _chat(api, "hello", **args)
    assert _chat(api, "Still there?", n=5)[2].count("tok/s") == 1


def test_load_errors_keep_the_model_and_a_good_load_switches(client):
    api, session = client
    status, card = api.predict("/no/such/model/dir", "cpu", "auto", api_name="/load_model")
    assert "Could not load" in status and "does not exist" in status and "kept" in status
    assert session.model.source == "demo" and "demo" in card
    status, card = api.predict("synthetic:nonexistent", "cpu", "auto", api_name="/load_model")
    assert "Unknown synthetic preset" in status and session.model.source == "demo"
    status, card = api.predict("synthetic:tiny-llama", "cpu", "float32", api_name="/load_model")
    assert "Loaded" in status and "tiny-llama" in card and "KV bytes per token" in card
    assert session.model.source == "synthetic:tiny-llama"
    history, _, stats = _chat(api, "abc", n=8)
    assert "tok/s" in stats  # random weights, byte tokenizer: the text is noise but the run works
    status, _ = api.predict("demo", "cpu", "auto", api_name="/load_model")
    assert session.model.source == "demo"


def test_non_loopback_needs_auth():
    with pytest.raises(SystemExit, match="without --auth"):
        lab_app.checked_auth(lab_app.parse_args(["--host", "0.0.0.0"]))
    with pytest.raises(SystemExit, match="user:password"):
        lab_app.checked_auth(lab_app.parse_args(["--host", "0.0.0.0", "--auth", "nopassword"]))
    kwargs = lab_app.launch_kwargs(lab_app.parse_args(["--host", "10.1.2.3", "--auth", "a:b"]), export_dir="exports")
    assert kwargs["auth"] == ("a", "b")
    defaults = lab_app.launch_kwargs(argparse.Namespace(host="127.0.0.1", port=None, auth=None), export_dir="exports")
    assert defaults["share"] is False and defaults["run_history"] is False and defaults["enable_monitoring"] is False
    assert defaults["mcp_server"] is False and defaults["allowed_paths"] == ["exports"]
    assert is_loopback("::1") and is_loopback("127.0.0.5") and not is_loopback("0.0.0.0") and not is_loopback(None)


def test_a_model_too_big_for_memory_is_refused_and_the_loaded_one_kept(client, monkeypatch):
    import engine.memory

    api, session = client
    before = session.model.source
    monkeypatch.setattr(engine.memory, "available_bytes", lambda device: 1 << 10)
    status, card = api.predict("synthetic:tiny-opt", "cpu", "float32", api_name="/load_model")
    assert "Could not load" in status and "GiB of host memory" in status and "kept" in status
    assert session.model.source == before
    monkeypatch.undo()
    assert "tok/s" in _chat(api, "Still there?", n=5)[2]


def test_notebook_entry_point_builds_and_serves_the_app():
    """`lab()` (what a notebook calls) loads the model and serves the app on loopback with the safe defaults."""
    import urllib.request

    demo = lab_app.lab("synthetic:tiny-llama", inline=False, prevent_thread_lock=True, quiet=True)
    try:
        assert demo.local_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(demo.local_url, timeout=30) as response:
            assert response.status == 200 and b"KV Lab" in response.read()
        assert demo.share is False or demo.share is None
    finally:
        demo.close()


# ---- the dashboard: settings, profile, explorer, compare, exports, hardware (tiny model, tiny shapes) ------------

SETTINGS = dict(placement="cpu", gpu_kv_budget_gib="auto", split_mode="auto", split=0.5, chunk_tokens=16, prefetch="auto",
                prefetch_distance=1, attention="auto", batch=2, prompt_tokens=32, max_new_tokens=8, prompt_seed=0,
                temperature=0.0, top_p=1.0, top_k=0, sampling_seed=-1)


def _apply(api, **changes):
    return api.predict(**(SETTINGS | changes), api_name="/apply_settings")


def _profile(api):
    job = api.submit(api_name="/profile")
    streamed = [progress for progress, _timer in job]
    return streamed, job.result()[0]


@pytest.fixture(scope="module")
def tiny_client(client, profile_cache):
    """The served app on the tiny Llama with two profiling runs made through the API: split auto and split 0.5."""
    from engine.settings import GenerationSettings, RunShape

    api, session = client
    status, _ = api.predict("synthetic:tiny-llama", "cpu", "float32", api_name="/load_model")
    assert "Loaded" in status
    assert "Applied" in _apply(api)
    streamed, auto_done = _profile(api)
    assert "Applied" in _apply(api, split_mode="manual", split=0.5)
    _, manual_done = _profile(api)
    yield api, session, streamed, (auto_done, manual_done)
    api.predict("demo", "cpu", "auto", api_name="/load_model")
    session.apply_settings(GenerationSettings(), RunShape())


def test_settings_are_applied_as_one_object(tiny_client):
    api, session, _, _ = tiny_client
    status = _apply(api, placement="hybrid", gpu_kv_budget_gib="0.5", prefetch="off", prefetch_distance=2, batch=3)
    assert "Applied" in status and "GPU budget 0.5 GiB" in status
    settings, shape = session.settings, session.shape
    assert settings.offload.placement == "hybrid" and settings.offload.gpu_kv_budget_gib == 0.5
    assert settings.kernel.prefetch == "off" and settings.kernel.prefetch_distance == 2 and shape.batch == 3
    assert isinstance(settings.offload.chunk_tokens, int) and settings.offload.chunk_tokens == 16
    assert "GPU budget auto" in _apply(api, placement="hybrid") and session.settings.offload.gpu_kv_budget_gib is None
    _apply(api)


@pytest.mark.parametrize("changes, expected", [({"batch": 0}, "batch=0 is out of range"),
                                               ({"chunk_tokens": 0}, "chunk_tokens=0 is out of range"),
                                               ({"top_p": 0.0}, "top_p=0.0 is out of range"),
                                               ({"placement": "hybrid", "gpu_kv_budget_gib": "-1"}, "gpu_kv_budget_gib=-1"),
                                               ({"placement": "hybrid", "gpu_kv_budget_gib": "lots"}, "number or auto"),
                                               ({"max_new_tokens": 0}, "max_new_tokens=0 is out of range")])
def test_a_bad_setting_shows_the_engines_message_and_changes_nothing(tiny_client, changes, expected):
    api, session, _, _ = tiny_client
    before = (session.settings, session.shape)
    status = _apply(api, **changes)
    assert "Invalid" in status and expected in status and "unchanged" in status, status
    assert (session.settings, session.shape) == before


def test_a_profile_run_streams_progress_and_keeps_a_record_with_spans(tiny_client):
    api, session, streamed, (auto_done, manual_done) = tiny_client
    assert len(streamed) >= 4 and any("step 3/7" in line for line in streamed)
    assert "done" in auto_done and "tok/s" in auto_done and "predicted" in auto_done
    auto, manual = session.runs[-2:]
    assert auto.settings["offload.split"] == "auto" and manual.settings["offload.split"] == 0.5
    assert len(auto.steps) == 7 and auto.spans and auto.predicted_ms > 0 and auto.pct_of_floor > 0
    assert {"h2d_act", "recompute"} <= {s.lane for s in manual.spans}  # the split recomputes (RoPE kernel interpreted)


def test_the_live_view_draws_the_webgl_timeline_and_the_figures(tiny_client):
    api, session, _, _ = tiny_client
    timeline, pcie, steps, sources, summary, drawn = api.predict("", api_name="/profile_view")
    figure = json.loads(timeline["plot"])
    assert {trace["type"] for trace in figure["data"]} == {"scattergl"}
    assert figure["layout"]["uirevision"] == f"timeline-{session.runs[-1].run_id}"
    assert any("layer" in text for trace in figure["data"] for text in trace["hovertext"] if text)
    assert len(json.loads(pcie["plot"])["data"]) >= 2 and len(json.loads(steps["plot"])["data"]) == 3
    assert "done" in summary and "predicted step" in summary and "PCIe floor" in summary
    assert "decode_attention_ncu.md" in sources  # no CUPTI here: the L2 line points at the Nsight Compute results
    assert drawn == f"{session.runs[-1].run_id}:{session.live().version}"
    assert api.predict(drawn, api_name="/profile_view")[-1] == drawn  # nothing new: nothing redrawn


def test_the_explorer_predicts_every_split_and_shows_the_measured_runs(tiny_client):
    api, session, _, _ = tiny_client
    plot, info = api.predict(api_name="/explore")
    figure = json.loads(plot["plot"])
    names = [trace.get("name") for trace in figure["data"]]
    assert names[:3] == ["predicted step ms", "PCIe floor ms", "auto (scheduler)"] and "measured runs" in names
    assert len(figure["data"][0]["x"]) == 21
    assert "Auto" in info and f"#{session.runs[-1].run_id}" in info and "KVPR" in info


def test_compare_two_runs_and_export_them(tiny_client):
    api, session, _, _ = tiny_client
    first, second = (str(r.run_id) for r in session.runs[-2:])
    choices, note = api.predict(api_name="/list_runs")
    assert [value for _, value in choices["choices"]][-2:] == [first, second] and "runs" in note
    table, diff = api.predict([first, second], api_name="/compare")
    assert table["headers"][:3] == ["run", "model", "offload.split"] and "Δ tok/s %" in table["headers"]
    assert [row[0] for row in table["data"]] == [f"#{first}", f"#{second}"] and f"#{first}" in diff
    for fmt in ("csv", "json"):
        served, _ = api.predict([first, second], fmt, api_name="/export_compare")
        written = session.export_dir / f"kvlab-compare-{first}-{second}.{fmt}"
        assert written.is_file() and Path(served).read_bytes() == written.read_bytes()
    assert json.loads(written.read_text())["runs"][1]["settings"]["offload.split"] == 0.5
    _, message = api.predict(["12345"], "csv", api_name="/export_compare")
    assert "not among" in message


def test_the_trace_downloads_from_the_export_dir(tiny_client):
    from engine.telemetry import read_trace

    api, session, _, _ = tiny_client
    served, _ = api.predict(api_name="/export_trace")
    written = session.export_dir / f"kvlab-run-{session.runs[-1].run_id}.trace.json"
    assert written.is_file() and Path(served).read_bytes() == written.read_bytes()
    assert sum(e["ph"] == "X" for e in read_trace(written)["traceEvents"]) == len(session.runs[-1].spans)
    assert lab_app.launch_kwargs(lab_app.parse_args([]), export_dir=session.export_dir)["allowed_paths"] == \
        [str(session.export_dir)]


def test_the_hardware_table_shows_the_profilers_measurements(tiny_client):
    api, _, _, _ = tiny_client
    header, table = api.predict(api_name="/hardware")
    assert "CPU" in header and "best H2D copy" in header and "NVML" in header and "CUPTI" in header
    assert table["headers"] == ["what", "size", "measured"] and any("GEMM" in row[0] for row in table["data"])


def test_chat_runs_under_the_applied_placement(tiny_client):
    api, _, _, _ = tiny_client
    _, _, stats = _chat(api, "abc", n=6)
    assert "tok/s" in stats and "KV cache: cpu" in stats


def test_stop_ends_a_running_profile_between_steps(tiny_client):
    import time

    api, session, _, _ = tiny_client
    runs = len(session.runs)
    try:
        # Recomputing half the tokens runs the RoPE kernel in Triton's interpreter: slow enough to stop.
        assert "Applied" in _apply(api, split_mode="manual", split=0.5, max_new_tokens=400)
        job = api.submit(api_name="/profile")
        deadline = time.monotonic() + 60
        while (session.live() is None or session.live().status != "running" or session.live().step < 2) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        message, _ = api.predict(api_name="/stop_profile")
        assert "Stopping" in message
        final = job.result(timeout=60)[0]
        assert "stopped after" in final and "no record" in final
        assert session.live().status == "stopped" and session.live().step < 399 and len(session.runs) == runs
        assert "No profile is running" in api.predict(api_name="/stop_profile")[0]
    finally:
        _apply(api)


def test_errors_in_dashboard_actions_are_shown_and_the_model_survives(tiny_client):
    api, session, _, _ = tiny_client
    runs = len(session.runs)
    try:
        assert "Applied" in _apply(api, prompt_tokens=600)  # valid alone; too long for the model's 512 positions
        _, progress = _profile(api)
        assert "Error" in progress and "context" in progress and "kept" in progress
        assert "Error" in api.predict(api_name="/explore")[1]
        assert "No runs picked" in api.predict([], api_name="/compare")[1]
    finally:
        _apply(api)
    assert len(session.runs) == runs and session.model.source == "synthetic:tiny-llama"
    assert "done" in _profile(api)[1]
