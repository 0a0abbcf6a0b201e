"""The app through its API (gradio_client), on CPU with the demo model and a tiny synthetic model."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import pytest

import app as lab_app
from engine.lab.access import is_loopback


@pytest.fixture(scope="module")
def client(served_demo_app):
    from gradio_client import Client

    demo, session = served_demo_app
    return Client(demo.local_url, verbose=False), session


def _chat(api, message, *, history=(), max_new_tokens=40, temperature=0.8, top_p=0.95, top_k=0, seed=7) -> dict:
    return api.predict(message=message, history=list(history), max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, top_k=top_k, seed=seed, api_name="/chat")


def test_chat_streams_a_reply_with_its_speed(client):
    api, _ = client
    job = api.submit(message="How now, my lord?", max_new_tokens=60, seed=7, api_name="/chat")
    states = list(job)  # every streamed state
    last = job.result()
    assert len(states) >= 2, "the reply was not streamed"
    assert last["history"][-2] == {"role": "user", "content": "How now, my lord?"}
    assert last["history"][-1]["role"] == "assistant" and last["reply"].strip()
    assert last["finished"] in ("eos", "length", "stop") and last["tokens_per_s"] > 0 and last["tokens"] > 1
    assert "tok/s" in last["status"] and "demo" in last["status"]  # the line names the model it ran on
    # ... and why the reply ended in words ("stop", a stop string, read as the Stop button)
    words = {"eos": "the model's end-of-sequence token", "length": "max new tokens reached",
             "stop": "end of the turn (a stop string)"}
    assert last["status"].endswith(f"finished: {words[last['finished']]}"), last["status"]


def test_chat_same_seed_same_reply_and_history_is_kept(client):
    api, _ = client
    first = _chat(api, "Who goes there?", seed=11)
    second = _chat(api, "Who goes there?", seed=11)
    assert first["reply"] == second["reply"]
    followup = _chat(api, "Speak again.", history=first["history"])
    turns = followup["history"]
    assert len(turns) == 4 and turns[0]["content"] == "Who goes there?" and turns[1]["content"] == first["reply"]
    assert all("tok/s" not in t["content"] for t in turns)  # what goes back to the model is the words alone


@pytest.mark.parametrize("message, args, expected", [
    ("", {}, "empty"),
    ("   ", {}, "empty"),
    ("x" * 20_001, {}, "limit"),
    ("hello", {"top_k": -3}, "top_k"),
    ("hello", {"max_new_tokens": 0}, "max_new_tokens=0 is out of range"),
    ("hello", {"top_p": 0.0}, "top_p=0.0 is out of range"),
    ("hello", {"temperature": -1.0}, "temperature=-1.0 is out of range"),
    ("hello", {"max_new_tokens": 2.5}, "whole number"),
])
def test_bad_chat_input_is_refused_with_its_reason_and_the_app_keeps_working(client, message, args, expected):
    from gradio_client.exceptions import AppError

    api, session = client
    with pytest.raises(AppError, match=re.escape(expected)):
        _chat(api, message, **args)
    assert session.model is not None and _chat(api, "Still there?", max_new_tokens=5)["finished"]


def test_load_errors_keep_the_model_and_a_good_load_switches(client):
    from gradio_client.exceptions import AppError

    api, session = client
    with pytest.raises(AppError, match="does not exist") as refused:
        api.predict("/no/such/model/dir", "cpu", "auto", api_name="/load_model")
    assert "kept" in str(refused.value) and session.model.source == "demo"
    assert api.predict(api_name="/model")["model"]["source"] == "demo"
    with pytest.raises(AppError, match="Unknown synthetic preset"):
        api.predict("synthetic:nonexistent", "cpu", "auto", api_name="/load_model")
    card = api.predict("synthetic:tiny-llama", "cpu", "float32", api_name="/load_model")["model"]
    assert card["name"] == "tiny-llama" and card["kv_bytes_per_token"] > 0 and session.model.source == "synthetic:tiny-llama"
    assert _chat(api, "abc", max_new_tokens=8)["tokens"] >= 1  # random weights, byte tokenizer: noise, but it runs
    api.predict("demo", "cpu", "auto", api_name="/load_model")
    assert session.model.source == "demo"


@pytest.mark.parametrize("length", [300, 100_010])
def test_a_very_long_model_name_is_refused_with_a_short_message(client, length):
    from gradio_client.exceptions import AppError

    api, session = client
    with pytest.raises(AppError) as refused:
        api.predict("m" * length, "cpu", "auto", api_name="/load_model")
    message = str(refused.value)
    assert len(message) < 500 and "…" in message and "Unexpected" not in message, message
    assert message.count("is kept") <= 1 and session.model.source == "demo"


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
    from gradio_client.exceptions import AppError

    api, session = client
    before = session.model.source
    monkeypatch.setattr(engine.memory, "available_bytes", lambda device: 1 << 10)
    with pytest.raises(AppError, match="GiB of host memory") as refused:
        api.predict("synthetic:tiny-opt", "cpu", "float32", api_name="/load_model")
    assert "kept" in str(refused.value) and session.model.source == before
    monkeypatch.undo()
    assert _chat(api, "Still there?", max_new_tokens=5)["finished"]


def test_notebook_entry_point_builds_and_serves_the_app():
    """`lab()` (what a notebook calls) loads the model and serves the app on loopback with the safe defaults; what it
    returns prints as one line (a notebook shows a cell's last value)."""
    import urllib.request

    demo = lab_app.lab("synthetic:tiny-llama", inline=False, prevent_thread_lock=True, quiet=True)
    try:
        assert demo.local_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(demo.local_url, timeout=30) as response:
            assert response.status == 200 and b"KV Lab" in response.read()
        assert demo.share is False or demo.share is None
        assert repr(demo).count("\n") == 0 and "tiny-llama" in repr(demo) and demo.local_url in repr(demo)
    finally:
        demo.close()


def test_the_command_line_prints_its_address_and_no_share_link_hint(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, str(root / "app.py"), "--model", "synthetic:tiny-llama", "--device", "cpu"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "KV Lab running on" in line or proc.poll() is not None:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = "".join(lines)
    assert "KV Lab running on http://127.0.0.1:" in out and "no share link" in out, out
    assert "share=True" not in out and "public link" not in out, out


# ---- the dashboard: settings, profile, explorer, compare, exports, hardware (tiny model, tiny shapes) ------------

SETTINGS = dict(placement="cpu", gpu_kv_budget_gib="auto", split="auto", chunk_tokens=16, prefetch="auto",
                prefetch_distance=1, attention="auto", batch=2, prompt_tokens=32, max_new_tokens=8, prompt_seed=0,
                temperature=0.0, top_p=1.0, top_k=0, sampling_seed=-1)


def _apply(api, **changes) -> dict:
    return api.predict(**changes, api_name="/apply_settings")


def _profile(api) -> tuple[list[dict], dict]:
    job = api.submit(api_name="/profile")
    states = list(job)
    return states, job.result()


@pytest.fixture(scope="module")
def tiny_client(client, profile_cache):
    """The served app on the tiny Llama with two profiling runs made through the API: split auto and split 0.5."""
    api, session = client
    api.predict("synthetic:tiny-llama", "cpu", "float32", api_name="/load_model")
    _apply(api, **SETTINGS)
    streamed, auto_done = _profile(api)
    _apply(api, split=0.5)
    _, manual_done = _profile(api)
    yield api, session, streamed, (auto_done, manual_done)
    api.predict("demo", "cpu", "auto", api_name="/load_model")


def test_partial_settings_change_only_what_they_name(tiny_client):
    api, session, _, _ = tiny_client
    try:
        applied = _apply(api, placement="hybrid", gpu_kv_budget_gib=0.5, prefetch="off", prefetch_distance=2, batch=3)
        assert "GPU budget 0.5 GiB" in applied["description"] and any("no GPU" in n for n in applied["notes"])
        settings = applied["settings"]
        assert settings | {"placement": "cpu", "gpu_kv_budget_gib": "auto", "prefetch": "auto", "prefetch_distance": 1,
                           "batch": 2} == SETTINGS | {"split": 0.5}  # the rest is what was applied before
        assert api.predict(api_name="/settings")["settings"] == settings
        assert _apply(api, placement="cpu")["settings"]["gpu_kv_budget_gib"] == "auto"  # a budget is hybrid's only
        assert _apply(api, prefetch_distance=1)["settings"]["prefetch_distance"] == 1  # as documented: an int
    finally:
        _apply(api, **SETTINGS | {"split": 0.5})


@pytest.mark.parametrize("changes, expected", [({"batch": 0}, "batch=0 is out of range"),
                                               ({"batch": 1.5}, "batch must be a whole number, got 1.5"),
                                               ({"chunk_tokens": 0}, "chunk_tokens=0 is out of range"),
                                               ({"top_p": 0.0}, "top_p=0.0 is out of range"),
                                               ({"placement": "hybrid", "gpu_kv_budget_gib": -1}, "gpu_kv_budget_gib=-1"),
                                               ({"max_new_tokens": 1}, "at least 2 new tokens"),
                                               ({"prompt_tokens": 1_000_000}, "the model's context is 512"),
                                               ({"prompt_tokens": 600}, "shorten the prompt")])
def test_a_bad_setting_is_refused_with_the_runs_message_and_changes_nothing(tiny_client, changes, expected):
    from gradio_client.exceptions import AppError

    api, session, _, _ = tiny_client
    before = api.predict(api_name="/settings")
    with pytest.raises(AppError, match=re.escape(expected)):
        _apply(api, **changes)
    assert api.predict(api_name="/settings") == before


def test_triton_attention_on_a_cpu_is_refused_at_apply_as_the_run_would(tiny_client, monkeypatch):
    from gradio_client.exceptions import AppError

    api, _, _, _ = tiny_client
    monkeypatch.delenv("TRITON_INTERPRET")  # the tests run Triton kernels interpreted; a user's CPU cannot
    with pytest.raises(AppError, match=re.escape("attention='triton' cannot run here: no GPU")):
        _apply(api, attention="triton")


def test_a_profile_run_streams_progress_and_keeps_a_record_with_spans(tiny_client):
    api, session, streamed, (auto_done, manual_done) = tiny_client
    assert streamed and streamed[-1]["status"] == "done" and auto_done["run"]["num_spans"] > 0
    auto, manual = session.runs[-2:]
    assert auto.settings["offload.split"] == "auto" and manual.settings["offload.split"] == 0.5
    assert len(auto.steps) == 7 and auto.spans and auto.predicted_ms > 0
    assert {"h2d_act", "recompute"} <= {s.lane for s in manual.spans}  # the split recomputes (RoPE kernel interpreted)
    # On a CPU there is nothing for a GPU prediction to mean: the API says why instead of giving a number.
    assert auto_done["run"]["predicted_ms"] is None and "no GPU" in auto_done["run"]["prediction_note"]
    assert api.predict(manual.run_id, api_name="/run")["run"]["steps"][0]["step"] == 1


def test_the_live_view_sends_what_is_new_from_the_cursor(tiny_client):
    api, session, _, _ = tiny_client
    live = api.predict("", 0, api_name="/profile_live")
    record = session.runs[-1]
    assert live["reset"] and live["run"] == record.run_id and live["finished"] and "done" in live["progress"]
    assert len(live["bars"]["lane"]) == len(record.spans) and live["steps"]["step"] == list(range(1, 8))
    names = {live["lanes"][i][0] for i in live["bars"]["lane"]}
    assert {"h2d_act", "recompute", "attention", "compute"} <= names
    assert live["one_step"]["step"] == 7 and live["one_step"]["spans"]["layer"]
    again = api.predict(live["cursor"], 0, api_name="/profile_live")
    assert not again["reset"] and again["bars"]["lane"] == [] and again["steps"]["step"] == []
    assert api.predict(live["cursor"], 3, api_name="/profile_live")["one_step"]["step"] == 3


def test_the_explorer_says_why_it_predicts_nothing_on_a_cpu(tiny_client):
    from gradio_client.exceptions import AppError

    api, _, _, _ = tiny_client
    with pytest.raises(AppError, match="No predictions here: the model runs on the CPU"):
        api.predict(api_name="/explore")


def test_compare_two_runs_and_export_them(tiny_client):
    api, session, _, _ = tiny_client
    first, second = (r.run_id for r in session.runs[-2:])
    listed = api.predict(api_name="/runs")["runs"]
    assert [r["run_id"] for r in listed][:2] == [second, first]
    table = api.predict([first, second], api_name="/compare")
    columns = table["columns"]
    assert columns[:3] == ["run", "model", "offload.split"] and len(set(columns)) == len(columns)
    assert "Δ tok/s %" in columns and [row[0] for row in table["rows"]] == [f"#{first}", f"#{second}"]
    assert "blank" in table["note"]  # no predictions on the CPU
    for fmt in ("csv", "json"):
        served = api.predict([first, second], fmt, api_name="/export_compare")
        written = session.export_dir / f"kvlab-compare-{first}-{second}.{fmt}"
        assert written.is_file() and Path(served).read_bytes() == written.read_bytes()
    assert json.loads(written.read_text())["runs"][1]["settings"]["offload.split"] == 0.5
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="not among"):
        api.predict([12345], "csv", api_name="/export_compare")


def test_the_trace_downloads_from_the_export_dir(tiny_client):
    from engine.telemetry import read_trace

    api, session, _, _ = tiny_client
    served = api.predict(None, api_name="/export_trace")
    written = session.export_dir / f"kvlab-run-{session.runs[-1].run_id}.trace.json"
    assert written.is_file() and Path(served).read_bytes() == written.read_bytes()
    assert sum(e["ph"] == "X" for e in read_trace(written)["traceEvents"]) == len(session.runs[-1].spans)
    assert lab_app.launch_kwargs(lab_app.parse_args([]), export_dir=session.export_dir)["allowed_paths"] == \
        [str(session.export_dir)]


def test_the_hardware_table_names_a_cpus_figures_as_such(tiny_client):
    api, _, _, _ = tiny_client
    hardware = api.predict(False, api_name="/hardware")
    assert hardware["device_type"] == "cpu" and "CPU" in hardware["device"]
    assert set(hardware["sources"]) == {"NVML", "CUPTI"} and "CPU" in hardware["sources"]["CUPTI"]
    rows = {row[0]: row[2] for row in hardware["rows"]}
    assert rows["H2D + D2H at once"].startswith("not measured: no GPU")
    assert not any(v.startswith("0.0 ") for v in rows.values()), rows  # every figure in a unit that shows it
    assert any("GEMM" in what and "(CPU" in what for what in rows)
    assert any("no GPU: the fast adapter's GEMM plan" in note for note in hardware["notes"])


def test_the_hardware_panel_lists_the_measured_gemm_plan_of_the_models_projections(monkeypatch):
    """On a GPU the panel lists, per measured batch and projection of the loaded model, which GEMM the fast adapter
    runs and what it read; without a plan it says how to measure one."""
    import torch

    from engine.fast import plan as gemm
    from engine.loader import load_model
    from panels.hardware_panel import gemm_rows

    spec = load_model("synthetic:tiny-llama", device="cpu", dtype="float32").spec
    cuda = torch.device("cuda")
    measured = gemm.GemmPlan(device="test")
    for i, (n, k, g) in enumerate(gemm.projection_shapes(spec)):
        measured.choices[gemm.GemmPlan.key(8, n, k, g)] = gemm.GemmChoice(
            kernel="skinny" if i % 2 == 0 else "cublas", config={} if i % 2 == 0 else None, skinny_us=10.0 + i,
            cublas_us=11.0 - i, weight_bytes=2 * n * k * (2 if g else 1))
    measured.choices["8x999x7"] = gemm.GemmChoice(kernel="cublas", config=None, skinny_us=None, cublas_us=1.0,
                                                  weight_bytes=14)  # another model's shape: not listed
    monkeypatch.setattr(gemm, "gemm_plan", lambda device: measured)
    found, line = gemm_rows(spec, cuda)
    assert [r[0].split(": ")[1].split(" (")[0] for r in found] == list(gemm.PROJECTION_NAMES)
    assert all(r[0].startswith("decode GEMM, batch 8") for r in found) and "batch 8" in line
    assert found[0][2].startswith("skinny ") and "(cuBLAS " in found[0][2]
    assert found[1][2].startswith("cublas ") and "(skinny " in found[1][2]
    monkeypatch.setattr(gemm, "gemm_plan", lambda device: gemm.GemmPlan(device="test"))
    assert gemm_rows(spec, cuda)[0] == [] and "python -m engine.fast.plan" in gemm_rows(spec, cuda)[1]
    opt = load_model("synthetic:tiny-opt", device="cpu", dtype="float32").spec
    assert "plain adapter" in gemm_rows(opt, cuda)[1]


def test_chat_runs_under_this_clients_applied_placement(tiny_client):
    api, _, _, _ = tiny_client
    out = _chat(api, "abc", max_new_tokens=6)
    assert out["finished"] and "KV cache: cpu" in out["status"]


def test_stop_ends_a_running_profile_between_steps_and_says_so(tiny_client):
    api, session, _, _ = tiny_client
    runs = len(session.runs)
    try:
        # Recomputing half the tokens runs the RoPE kernel in Triton's interpreter: slow enough to stop.
        _apply(api, split=0.5, max_new_tokens=400)
        job = api.submit(api_name="/profile")
        deadline = time.monotonic() + 60
        while (session.live() is None or session.live().status != "running" or session.live().step < 2) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        stop = api.predict(api_name="/stop_profile")
        assert stop["stopping"] and "Stopping" in stop["message"]
        final = job.result(timeout=60)
        assert final["status"] == "stopped" and final["step"] < 399
        assert session.live().status == "stopped" and len(session.runs) == runs
        assert not api.predict(api_name="/stop_profile")["stopping"]
    finally:
        _apply(api, **SETTINGS | {"split": 0.5})


def _slow(monkeypatch, target, name: str, seconds: float) -> None:
    original = getattr(target, name)

    def slowly(*args, **kwargs):
        out = original(*args, **kwargs)
        time.sleep(seconds)
        return out
    monkeypatch.setattr(target, name, slowly)


def _until(predicate, timeout: float = 60.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"never saw {what}")


def test_a_long_prefill_shows_its_progress_and_the_time_left(tiny_client, monkeypatch):
    import engine.generator

    api, session, _, _ = tiny_client
    _slow(monkeypatch, engine.generator.Generator, "_prefill_progress", 0.4)  # a slow prefill: 0.4 s a layer
    job = api.submit(api_name="/profile")
    line = _until(lambda: next((p for p in [api.predict("", 0, api_name="/profile_live")["progress"]]
                                if re.search(r"prefill: layer [12] of 3, about [\d.]+ s left", p)), None),
                  what="the prefill's progress with the time left")
    assert "started here" in line
    assert job.result(timeout=120)["status"] == "done"


def test_a_job_asked_for_while_another_runs_waits_and_says_what_for(tiny_client, monkeypatch):
    """A profile pressed during another client's chat, and a chat sent during a profile, wait (nothing refused,
    nothing silent): each says what holds the device, and who started it, until its turn."""
    import engine.decode.forward
    from gradio_client import Client

    api, session, _, _ = tiny_client
    other = Client(api.src, verbose=False)
    _slow(monkeypatch, engine.decode.forward, "decode_step", 0.02)  # GPU-resident steps of 20 ms
    _apply(api, placement="gpu")
    other.predict(api_name="/apply_settings", placement="gpu")
    try:
        chat = other.submit(message="a long speech, please", max_new_tokens=200, temperature=0.0, api_name="/chat")
        _until(lambda: session.busy() == "a chat reply", what="the chat running")
        profile = api.submit(api_name="/profile")
        waiting = _until(lambda: next((s for s in profile.outputs() if s.get("status") == "waiting"), None),
                         what="the profile waiting")
        assert waiting["waiting_for"] == "a chat reply, started by another tab or an API client", waiting
        live = api.predict("", 0, api_name="/profile_live")["progress"]
        assert "waiting for a chat reply" in live, live
        assert other.predict(api_name="/stop_chat")["stopping"]
        assert chat.result(timeout=60)["finished"] == "stopped"
        assert profile.result(timeout=120)["status"] == "done"
        # Now the other way round: a chat sent while a profile runs.
        _apply(api, max_new_tokens=150)
        profile = api.submit(api_name="/profile")
        _until(lambda: (session.busy() or "").startswith("profile run #"), what="the profile running")
        chat = other.submit(message="hello", max_new_tokens=4, api_name="/chat")
        state = _until(lambda: next((s for s in chat.outputs() if s.get("waiting_for")), None), what="the chat waiting")
        assert re.match(r"profile run #\d+, started by another tab or an API client", state["waiting_for"]), state
        assert "Waiting for the device" in state["status"]
        assert api.predict(api_name="/stop_profile")["stopping"]
        assert chat.result(timeout=120)["finished"] and profile.result(timeout=60)["status"] == "stopped"
    finally:
        monkeypatch.undo()
        _apply(api, **SETTINGS | {"split": 0.5})
