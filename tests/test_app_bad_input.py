"""Bad input through the running app's API (gradio_client against a served app on the CPU).

Every case checks three things: the app answers with a clear message naming the problem and the fix (the error
the client gets, never Gradio's "has not enabled verbose error reporting" or the panels' "Unexpected ...: report
it"), the app keeps running (a short chat right after answers), and the loaded model and the client's applied
settings are what they were before.

The engine's own messages are checked case by case in test_bad_input.py; here the point is that they reach the
user through the panels, the components and the queue. Two cases are left to another file: loading a model while
a generation runs, and lone surrogates in a chat message.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import random
import shutil
import time

import pytest

import app as lab_app
from engine.lab.session import MAX_CHAT_CHARS, normalise_history

TINY = "synthetic:tiny-llama"  # byte tokenizer, 512 positions, random weights: the replies are noise but they run
CONTEXT = 512

# The applied settings every case starts from and is checked against (KV cache on the device: no offload machinery).
SETTINGS = dict(placement="gpu", gpu_kv_budget_gib="auto", split="auto", chunk_tokens=16, prefetch="auto",
                prefetch_distance=1, attention="auto", batch=2, prompt_tokens=32, max_new_tokens=8, prompt_seed=0,
                temperature=0.0, top_p=1.0, top_k=0, sampling_seed=-1)

# Gradio's words when a handler or a component raised something it was not told to show: the user learns nothing.
OPAQUE = ("has not enabled verbose error reporting", "traceback", "unexpected ")


def _serve(session):
    demo = lab_app.build_app(session)
    options = lab_app.launch_kwargs(lab_app.parse_args([]), export_dir=session.export_dir)
    demo.queue(default_concurrency_limit=1).launch(prevent_thread_lock=True, quiet=True, **options)
    return demo


@contextlib.contextmanager
def _served_tiny():
    """A fresh app on the tiny Llama (CPU, fp32) and an API client of it."""
    from gradio_client import Client

    from engine.lab.session import LabSession

    session = LabSession()
    session.load(TINY, device="cpu", dtype="float32")
    demo = _serve(session)
    try:
        yield Client(demo.local_url, verbose=False), session
    finally:
        demo.close()


@pytest.fixture(scope="module")
def lab(profile_cache):
    """A fresh app with the baseline settings applied through the API."""
    with _served_tiny() as (api, session):
        _apply(api)
        yield api, session


@pytest.fixture(scope="module")
def fresh(profile_cache):
    """Another app that never runs a profile: what the exports say before there is anything to export."""
    with _served_tiny() as served:
        yield served


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A real model directory written by save_pretrained, and damaged copies of it."""
    from engine import load_model

    root = tmp_path_factory.mktemp("app-models")
    good = root / "good"
    load_model(TINY, device="cpu").hf_model.save_pretrained(good)
    weights = (good / "model.safetensors").read_bytes()

    def damaged(name, change):
        path = root / name
        shutil.copytree(good, path)
        change(path)
        return str(path)

    def gpt2(path):
        config = json.loads((path / "config.json").read_text())
        config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        (path / "config.json").write_text(json.dumps(config))

    (root / "empty").mkdir()
    return {
        "good": str(good),
        "missing": str(root / "no" / "such-model"),
        "empty": str(root / "empty"),
        "a-file": str(good / "model.safetensors"),
        "corrupt-config": damaged("corrupt-config", lambda p: (p / "config.json").write_text('{"model_type": "lla')),
        "truncated-weights": damaged("truncated-weights",
                                     lambda p: (p / "model.safetensors").write_bytes(weights[:len(weights) // 2])),
        "garbage-weights": damaged("garbage-weights",
                                   lambda p: (p / "model.safetensors").write_bytes(random.Random(0).randbytes(4096))),
        "gpt2": damaged("gpt2", gpt2),
    }


# ---- helpers ----------------------------------------------------------------------------------------------------


def _apply(api, **changes) -> dict:
    """SETTINGS with `changes` applied (the baseline, then the changes, in one call)."""
    return api.predict(**(SETTINGS | changes), api_name="/apply_settings")


def _chat(api, message, *, n=4, temperature=0.0, top_p=1.0, top_k=0, seed=7, history=()) -> dict:
    history = list(history) if isinstance(history, (list, tuple)) else history
    return api.predict(message, history, n, temperature, top_p, top_k, seed, api_name="/chat")


def _refused(call) -> str:
    """The message of the error the client gets for `call` (which must be refused)."""
    from gradio_client.exceptions import AppError

    try:
        out = call()
    except AppError as exc:
        return str(exc)
    raise AssertionError(f"accepted: {out}")


def assert_clear(text, *needles: str) -> None:
    assert isinstance(text, str), text
    for opaque in OPAQUE:
        assert opaque not in text.lower(), f"an opaque message, not one naming the problem and the fix: {text}"
    for needle in needles:
        assert needle.lower() in text.lower(), f"{needle!r} not in what the app showed: {text}"


def _state(api, session):
    """The loaded model and this client's applied settings."""
    return (session.model.source, *session.settings_for(api.session_hash))


def still_works(api, session, before) -> None:
    """The model and the client's applied settings are those of `before`, and a short chat answers."""
    assert session.model is not None and _state(api, session) == before, "the model or the applied settings changed"
    assert session.busy() is None, f"the session still holds the device for {session.busy()}"
    out = _chat(api, "Still there?")
    assert out["tokens"] >= 1 and out["finished"], out
    assert out["history"][-1]["role"] == "assistant"
    assert _state(api, session) == before


# ---- Model panel: /load_model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("source, device, dtype, needles", [
    pytest.param("missing", "cpu", "auto", ["does not exist", "check the path"], id="nonexistent-directory"),
    pytest.param("empty", "cpu", "auto", ["no config.json", "needs config.json"], id="empty-directory"),
    pytest.param("a-file", "cpu", "auto", ["is a file", "directory holding config.json"], id="a-file-not-a-directory"),
    pytest.param("corrupt-config", "cpu", "auto", ["config.json", "not valid JSON", "restore the file"],
                 id="corrupt-config-json"),
    pytest.param("truncated-weights", "cpu", "auto", ["model.safetensors", "truncated", "re-download"],
                 id="truncated-safetensors"),
    pytest.param("garbage-weights", "cpu", "auto", ["model.safetensors", "corrupt", "re-download"],
                 id="garbage-safetensors"),
    pytest.param("gpt2", "cpu", "auto", ["'gpt2'", "not supported", "llama", "load a model of one of these families"],
                 id="unsupported-architecture-gpt2"),
    pytest.param("   ", "cpu", "auto", ["no model given", "local directory", "synthetic:<preset>"],
                 id="whitespace-only-source"),
    pytest.param("\t\n", "cpu", "auto", ["no model given", "local directory", "synthetic:<preset>"],
                 id="tab-newline-source"),
    # Device and dtype are documented choices; anything else is refused by the loader, which names the choices.
    pytest.param("good", "gpu0", "auto", ["gpu0", "not a device name", "cpu"], id="bad-device-string"),
    pytest.param("good", "cuda:x", "auto", ["cuda:x", "not a device name", "cuda"], id="bad-device-index"),
    pytest.param("good", "cpu", "float8", ["float8", "unknown", "float32"], id="bad-dtype-string"),
    pytest.param("good", "cpu", "int8", ["int8", "unknown", "bfloat16"], id="bad-dtype-int8"),
    # Longer than any path, preset or hub id: refused, quoting only its start and end.
    pytest.param("x" * 100_010, "cpu", "auto", ["100,010 characters", "…", "hub id"], id="a-100k-character-name"),
    pytest.param("y" * 300, "cpu", "auto", ["File name too long", "…", "model directory"], id="a-300-character-name"),
])
def test_a_bad_load_is_explained_and_the_loaded_model_kept(lab, model_dirs, source, device, dtype, needles):
    api, session = lab
    before = _state(api, session)
    status = _refused(lambda: api.predict(model_dirs.get(source, source), device, dtype, api_name="/load_model"))
    assert_clear(status, *needles)
    assert "tiny-llama" in status and status.count("is kept") == 1 and len(status) < 600, status
    still_works(api, session, before)


def test_cuda_asked_on_a_machine_without_a_gpu_is_explained(lab, model_dirs):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a CUDA GPU")
    api, session = lab
    before = _state(api, session)
    status = _refused(lambda: api.predict(model_dirs["good"], "cuda", "auto", api_name="/load_model"))
    assert_clear(status, "no CUDA GPU", "device='cpu'", "is kept")
    assert "tiny-llama" in status and api.predict(api_name="/model")["model"]["name"] == "tiny-llama"
    still_works(api, session, before)


# ---- Settings panel: /apply_settings ----------------------------------------------------------------------------

HYBRID = {"placement": "hybrid"}
MANUAL: dict = {}  # a number for split is a manual split


@pytest.mark.parametrize("changes, needles", [
    pytest.param({"max_new_tokens": 0}, ["max_new_tokens=0 is out of range", "between 1 and 1000000"], id="new-tokens-0"),
    pytest.param({"max_new_tokens": -5}, ["max_new_tokens=-5 is out of range", "between 1 and 1000000"],
                 id="new-tokens-negative"),
    pytest.param({"max_new_tokens": 10**9}, ["max_new_tokens=1000000000 is out of range", "between 1 and 1000000"],
                 id="new-tokens-huge"),
    pytest.param({"batch": 0}, ["batch=0 is out of range", "between 1 and 4096"], id="batch-0"),
    pytest.param({"batch": -2}, ["batch=-2 is out of range", "between 1 and 4096"], id="batch-negative"),
    pytest.param({"batch": 10**9}, ["batch=1000000000 is out of range", "between 1 and 4096"], id="batch-huge"),
    pytest.param({"prompt_tokens": 0}, ["prompt_tokens=0 is out of range", "between 1 and 1000000"], id="prompt-0"),
    pytest.param({"prompt_tokens": -3}, ["prompt_tokens=-3 is out of range", "between 1 and 1000000"],
                 id="prompt-negative"),
    pytest.param({"prompt_tokens": 10**9}, ["prompt_tokens=1000000000 is out of range", "between 1 and 1000000"],
                 id="prompt-huge"),
    pytest.param({"chunk_tokens": 0}, ["chunk_tokens=0 is out of range", "between 1 and 1000000"], id="chunk-0"),
    pytest.param(MANUAL | {"split": -0.1}, ["split=-0.1 is out of range", "[0.0, 1.0]"], id="split-below-0"),
    pytest.param(MANUAL | {"split": 1.5}, ["split=1.5 is out of range", "[0.0, 1.0]"], id="split-above-1"),
    # Whole numbers that are not: refused, where the page's number box would have rounded them.
    pytest.param({"batch": 1.5}, ["batch must be a whole number, got 1.5"], id="batch-one-and-a-half"),
    pytest.param({"chunk_tokens": 16.25}, ["chunk_tokens must be a whole number, got 16.25"], id="chunk-fraction"),
    # Valid alone, impossible for the loaded model or this device: refused at Apply with the run's own message.
    pytest.param({"prompt_tokens": 1_000_000}, ["1000000 tokens", "the model's context is 512", "shorten the prompt"],
                 id="prompt-longer-than-the-context"),
    pytest.param({"max_new_tokens": 1}, ["at least 2 new tokens"], id="one-new-token-cannot-profile"),
    pytest.param({"placement": "wizard"}, ["placement must be one of gpu, cpu, hybrid", "'wizard'"], id="placement-wizard"),
    pytest.param({"prefetch_distance": 3}, ["prefetch_distance must be 1 or 2 tiles"], id="prefetch-distance-3"),
    # A GPU KV budget no device holds: the settings cap it at 1e6 GiB, so it is refused when applied.
    pytest.param(HYBRID | {"gpu_kv_budget_gib": "1e9"},
                 ["gpu_kv_budget_gib=1000000000.0 is out of range", "[0.0, 1000000.0] GiB"], id="budget-1e9-gib"),
    pytest.param(HYBRID | {"gpu_kv_budget_gib": "-1"}, ["gpu_kv_budget_gib=-1", "out of range"], id="budget-negative"),
    # Non-numeric text through the API (a browser cannot type it into a number box; a script can send it).
    pytest.param(MANUAL | {"split": "abc"}, ["split", "'abc'", "number"], id="split-abc"),
    pytest.param(HYBRID | {"gpu_kv_budget_gib": "abc"}, ["gpu_kv_budget_gib must be a number", "'abc'",
                                                         "number or auto"], id="budget-abc"),
    pytest.param({"chunk_tokens": "abc"}, ["chunk", "'abc'", "number"], id="chunk-abc"),
    pytest.param({"batch": "abc"}, ["batch", "'abc'", "number"], id="batch-abc"),
    pytest.param({"temperature": "abc"}, ["temperature must be a number", "'abc'", "enter a number"],
                 id="temperature-abc"),
    # NaN and infinity as text: never accepted, whichever control they reach.
    pytest.param(MANUAL | {"split": "nan"}, ["split", "nan", "number"], id="split-nan"),
    pytest.param(MANUAL | {"split": "inf"}, ["split", "inf", "number"], id="split-inf"),
    pytest.param(HYBRID | {"gpu_kv_budget_gib": "nan"}, ["gpu_kv_budget_gib must be a finite number, got nan", "GiB"],
                 id="budget-nan"),
    pytest.param(HYBRID | {"gpu_kv_budget_gib": "inf"}, ["gpu_kv_budget_gib must be a finite number, got inf", "GiB"],
                 id="budget-inf"),
    pytest.param({"placement": "cpu", "gpu_kv_budget_gib": "nan"}, ["budget", "nan"], id="budget-nan-not-hybrid"),
    pytest.param({"temperature": "nan"}, ["temperature must be a finite number, got nan", "[0.0, 100.0]"],
                 id="temperature-nan"),
    pytest.param({"temperature": "-inf"}, ["temperature must be a finite number, got -inf", "[0.0, 100.0]"],
                 id="temperature-minus-inf"),
    pytest.param({"top_p": "nan"}, ["top_p must be a finite number, got nan", "(0.0, 1.0]"], id="top-p-nan"),
    pytest.param({"chunk_tokens": "nan"}, ["chunk", "nan", "number"], id="chunk-nan"),
    pytest.param({"batch": "inf"}, ["batch", "inf", "number"], id="batch-inf"),
    pytest.param({"max_new_tokens": "nan"}, ["max_new_tokens", "nan", "number"], id="new-tokens-nan"),
])
def test_a_bad_setting_is_explained_and_the_applied_settings_unchanged(lab, changes, needles):
    api, session = lab
    before = _state(api, session)
    try:
        status = _refused(lambda: _apply(api, **changes))
        assert_clear(status, *needles)
        still_works(api, session, before)
    finally:
        _apply(api)  # a wrongly accepted value must not leak into the next case


def test_a_gpu_kv_budget_beyond_any_device_on_the_cpu(lab):
    """100,000 GiB is within the settings' cap. On a GPU the run refuses it (more than the whole GPU); on the CPU the
    "GPU" is host memory and the budget only caps what stays resident, so the run keeps every slot resident and
    says so in its notes: chat and a profile run, and nothing is allocated for the budget itself."""
    api, session = lab
    _apply(api)
    before = _state(api, session)
    runs = len(session.runs)
    try:
        applied = _apply(api, placement="hybrid", gpu_kv_budget_gib="100000")
        assert "GPU budget 100000 GiB" in applied["description"], applied
        assert any("no GPU" in note and "host memory" in note for note in applied["notes"]), applied
        out = _chat(api, "abc")
        assert out["finished"] and "KV cache: hybrid" in out["status"], out
        job = api.submit(api_name="/profile")
        final = job.result(timeout=60)
        assert final["status"] == "done", final
        record = session.runs[-1]
        slots = record.prompt_tokens + record.new_tokens
        assert any("GPU KV budget 100000 GiB (given)" in note and f"{slots} of {slots} slots" in note
                   for note in record.notes), record.notes
    finally:
        _apply(api)
    assert len(session.runs) == runs + 1
    still_works(api, session, before)


# ---- Chat panel: /chat ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("message, args, needles", [
    pytest.param("", {}, ["message is empty", "type something"], id="empty"),
    pytest.param("  \n\t  ", {}, ["message is empty", "type something"], id="whitespace"),
    pytest.param("x" * (MAX_CHAT_CHARS + 1), {}, ["characters", "limit", "send a shorter text"], id="huge-paste"),
    # Within MAX_CHAT_CHARS but longer in tokens (one per byte, plus the template) than the 512 positions.
    pytest.param("y" * 2000, {}, ["context", str(CONTEXT), "short"], id="beyond-the-context"),
    pytest.param("hello", {"temperature": "hot"}, ["temperature", "hot", "number"], id="temperature-hot"),
    pytest.param("hello", {"seed": "x"}, ["seed", "'x'", "number"], id="seed-x"),
    pytest.param("hello", {"top_k": "many"}, ["top", "many", "number"], id="top-k-many"),
    pytest.param("hello", {"history": "not a list of messages"}, ["history", "list"], id="history-a-string"),
    pytest.param("hello", {"history": [{"who": "me"}, {"role": "wizard", "content": 3}, 5, None]}, ["history", "role"],
                 id="history-garbage-dicts"),
    pytest.param("hello", {"n": 2.5}, ["max_new_tokens must be a whole number, got 2.5"], id="reply-length-2.5"),
])
def test_a_bad_chat_request_is_explained_and_the_app_keeps_working(lab, message, args, needles):
    api, session = lab
    before = _state(api, session)
    assert_clear(_refused(lambda: _chat(api, message, **args)), *needles)
    still_works(api, session, before)


@pytest.mark.parametrize("message", [
    pytest.param("a\x00b\x01c\x07\x1b[31mred\x1b[0m\x7f\x08", id="nul-and-control-characters"),
    pytest.param(random.Random(0).randbytes(300).decode("latin-1"), id="random-bytes-as-latin-1"),
    pytest.param("\ufeff\u200b\u200c\u200d\u2028\u2029 zero-width and separators", id="invisible-characters"),
    pytest.param("👩‍👩‍👧‍👦 👨🏽‍💻 🏳️‍🌈 🇺🇳", id="emoji-zwj-sequences"),
    pytest.param("e\u0301\u0302\u0303\u0304 Z\u0334\u0321\u031ba\u0337l\u0338g\u0335o\u0336", id="combining-marks"),
    pytest.param("שלום עולם مرحبا بالعالم \u202eevil\u202c", id="rtl-text"),
    pytest.param("你好，世界。こんにちは、世界。안녕하세요 𠀀𪚥", id="cjk"),
    pytest.param("a\uffffb\ufffec\U0010ffff", id="noncharacters"),
])
def test_unusual_but_valid_text_gets_a_reply(lab, message):
    api, session = lab
    before = _state(api, session)
    out = _chat(api, message)
    assert out["finished"], out
    turns = normalise_history(out["history"])
    assert [t["role"] for t in turns] == ["user", "assistant"] and turns[0]["content"] == message
    still_works(api, session, before)


# ---- Stop pressed twice -----------------------------------------------------------------------------------------

LONG_REPLY = ("Tell me a long story.", 300)  # greedy on the tiny Llama: runs the whole 300 tokens, no EOS


def _wait_streaming(job, session, timeout=30.0):
    deadline = time.monotonic() + timeout
    while len(job.outputs()) < 3 and not job.done() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not job.done() and session.busy() == "a chat reply", "the reply ended before Stop could be pressed"


def _wait_idle(job, session, timeout=30.0):
    deadline = time.monotonic() + timeout
    while (not job.done() or session.busy() is not None) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.done() and session.busy() is None, "the reply still runs"


def test_stop_pressed_twice_with_no_chat_running(lab):
    api, session = lab
    before = _state(api, session)
    for _ in range(2):
        assert api.predict(api_name="/stop_chat") == {"stopping": False, "message": "No reply of yours is running."}
    still_works(api, session, before)


def test_stop_pressed_twice_during_a_streamed_chat_ends_the_reply(lab):
    """The API's /stop (what a script, or a second browser tab, presses) must end the reply it stops, not just
    say "Stopped." while the reply streams on to the end."""
    api, session = lab
    before = _state(api, session)
    message, n = LONG_REPLY
    job = api.submit(message, [], n, 0.0, 1.0, 0, 7, api_name="/chat")
    try:
        _wait_streaming(job, session)
        first, second = api.predict(api_name="/stop_chat"), api.predict(api_name="/stop_chat")
        assert first["stopping"] and "Stopping" in first["message"] and isinstance(second["stopping"], bool)
        _wait_idle(job, session)
        last = job.outputs()[-1]
        assert last["tokens"] < n and last["finished"] == "stopped", f"/stop_chat did not end the reply: {last}"
    finally:
        _wait_idle(job, session, timeout=60)
    still_works(api, session, before)


def test_a_cancelled_chat_stream_frees_the_model(lab):
    """What the browser's Stop does (the client cancels the stream): the session's lock is released."""
    api, session = lab
    before = _state(api, session)
    message, n = LONG_REPLY
    job = api.submit(message, [], n, 0.0, 1.0, 0, 7, api_name="/chat")
    _wait_streaming(job, session)
    assert job.cancel()
    job.cancel()  # pressed twice
    _wait_idle(job, session)
    still_works(api, session, before)


def test_stop_profile_pressed_twice_with_nothing_running(lab):
    api, session = lab
    before = _state(api, session)
    for _ in range(2):
        stop = api.predict(api_name="/stop_profile")
        assert not stop["stopping"] and "No profile of yours is running" in stop["message"]
    still_works(api, session, before)


def test_stop_profile_pressed_twice_during_a_run(lab):
    api, session = lab
    runs = len(session.runs)
    try:
        _apply(api, max_new_tokens=400)
        before = _state(api, session)
        job = api.submit(api_name="/profile")
        deadline = time.monotonic() + 60
        while (session.live() is None or session.live().status != "running" or session.live().step < 2) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        first = api.predict(api_name="/stop_profile")
        second = api.predict(api_name="/stop_profile")
        assert first["stopping"] and "Stopping after the current step" in first["message"]
        assert isinstance(second["stopping"], bool), second
        final = job.result(timeout=60)
        assert final["status"] == "stopped" and final["step"] < 399, final
        assert not api.predict(api_name="/stop_profile")["stopping"]
        assert session.live().status == "stopped" and len(session.runs) == runs
        still_works(api, session, before)
    finally:
        _apply(api)


# ---- Exports before any run (a fresh app) -------------------------------------------------------------------------


@pytest.mark.parametrize("api_name, args, needles", [
    pytest.param("/export_trace", (None,), ["No profiling run yet", "run one in the Profile panel"], id="export-trace"),
    pytest.param("/export_compare", ([1], "csv"), ["No profiling run yet", "run one in the Profile panel"],
                 id="export-compare-run-1"),
    pytest.param("/export_compare", ([], "json"), ["No runs picked", "pick one or more runs"],
                 id="export-compare-none-picked"),
    pytest.param("/compare", ([1, 2],), ["No profiling run yet", "run one in the Profile panel"], id="compare-runs-1-2"),
    pytest.param("/compare", ([],), ["No runs picked", "pick one or more runs"], id="compare-none-picked"),
    pytest.param("/compare", (["first"],), ["picked by number", "'first'", "pick runs from the list"],
                 id="compare-not-a-number"),
    pytest.param("/compare", ("1, 2",), ["run_ids must be a list", "[1, 2]"], id="compare-not-a-list"),
    pytest.param("/profile_live", ("", 0), ["No profiling run yet", "/profile"], id="profile-live"),
    pytest.param("/run", (None,), ["No profiling run yet"], id="run-record"),
    pytest.param("/show_run", (3,), ["No profiling run yet"], id="show-run-3"),
])
def test_exports_before_any_run_say_so(fresh, api_name, args, needles):
    api, session = fresh
    assert not session.runs, "this app must not have run a profile"
    before = _state(api, session)
    assert_clear(_refused(lambda: api.predict(*args, api_name=api_name)), *needles)
    assert not list(session.export_dir.iterdir()), "an export was written with nothing to export"
    still_works(api, session, before)


# ---- Profile panel: importing garbage ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, needles", [
    pytest.param("notes.json", b"hello, this is not a trace", ["Could not read a trace from notes.json",
                                                                "Import a .trace.json(.gz)"], id="text-not-json"),
    pytest.param("empty.trace.json", b"", ["Could not read a trace from empty.trace.json", "Import a .trace.json(.gz)"],
                 id="empty-file"),
    pytest.param("noise.json.gz", b"\x1f\x8b" + random.Random(1).randbytes(200),
                 ["Could not read a trace from noise.json.gz", "Import a .trace.json(.gz)"], id="gzip-magic-then-noise"),
    pytest.param("cut.json.gz", gzip.compress(b'{"traceEvents": []}' * 50)[:40],
                 ["Could not read a trace from cut.json.gz", "Import a .trace.json(.gz)"], id="truncated-gzip"),
    pytest.param("binary.json", random.Random(2).randbytes(300), ["Could not read a trace from binary.json",
                                                                  "Import a .trace.json(.gz)"], id="binary-noise"),
    pytest.param("list.json", b"[1, 2, 3]", ["trace", "import a trace exported from the Profile panel"],
                 id="json-array"),
    pytest.param("other.json", b'{"traceEvents": []}', ["no KV Lab run record", "import a trace exported"],
                 id="someone-elses-trace"),
    pytest.param("partial.json", json.dumps({"metadata": {"model": "m", "settings": {}, "steps": [],
                                                          "median_step_ms": 1.0, "batch": 1}}).encode(),
                 ["trace", "import a trace exported from the Profile panel"], id="run-record-missing-fields"),
    pytest.param("notes.txt", b"a text file", ["Could not read a trace from notes.txt", "Import a .trace.json(.gz)"],
                 id="wrong-extension"),
])
def test_importing_garbage_is_explained_and_nothing_is_added(lab, tmp_path, name, content, needles):
    from gradio_client import handle_file

    api, session = lab
    before = _state(api, session)
    runs, live = len(session.runs), session.live()
    path = tmp_path / name
    path.write_bytes(content)
    assert_clear(_refused(lambda: api.predict(handle_file(str(path)), api_name="/import_run")), *needles)
    assert len(session.runs) == runs and session.live() == live, "a garbage import became a run"
    still_works(api, session, before)


def _raw_call(url: str, api_name: str, data: list) -> str:
    """Call an endpoint over plain HTTP, as a client that is not gradio_client may (it uploads nothing itself);
    returns the event stream's text."""
    import httpx

    with httpx.Client(base_url=url, timeout=60) as web:
        event_id = web.post(f"/gradio_api/call/{api_name}", json={"data": data}).json()["event_id"]
        return web.get(f"/gradio_api/call/{api_name}/{event_id}").text


@pytest.mark.parametrize("trace", [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "/etc/hosts",
                                   {"path": "../../../etc/passwd"}], ids=["a-server-path", "a-bare-path", "dot-dot"])
def test_import_reads_only_a_file_uploaded_with_the_request(lab, trace):
    """A path the client names is not read (it could be any file on the server): only an uploaded one."""
    api, session = lab
    before = _state(api, session)
    stream = _raw_call(api.src, "import_run", [trace])
    # Gradio refuses a file reference it did not receive ("not uploaded by a user"); a bare string reaches the
    # endpoint, which refuses it itself.
    assert "event: error" in stream and "event: complete" not in stream, stream
    if isinstance(trace, str):
        assert "must be a file uploaded with this request" in stream, stream
    assert "root:" not in stream and "localhost" not in stream  # nothing of the files came back
    still_works(api, session, before)


def test_import_with_no_file(lab):
    api, session = lab
    before = _state(api, session)
    assert_clear(_refused(lambda: api.predict(None, api_name="/import_run")), "must be a file uploaded")
    still_works(api, session, before)
