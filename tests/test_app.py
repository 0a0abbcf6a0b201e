"""The app through its API (gradio_client), on CPU with the demo model and a tiny synthetic model."""

from __future__ import annotations

import argparse

import pytest

import app as lab_app
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
    assert first[0][-1] == second[0][-1]
    followup = _chat(api, "Speak again.", history=first[0])
    turns = normalise_history(followup[0])
    assert len(turns) == 4 and turns[0]["content"] == "Who goes there?"


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
        lab_app.launch_kwargs(lab_app.parse_args(["--host", "0.0.0.0"]))
    with pytest.raises(SystemExit, match="user:password"):
        lab_app.launch_kwargs(lab_app.parse_args(["--host", "0.0.0.0", "--auth", "nopassword"]))
    kwargs = lab_app.launch_kwargs(lab_app.parse_args(["--host", "10.1.2.3", "--auth", "a:b"]))
    assert kwargs["auth"] == ("a", "b")
    defaults = lab_app.launch_kwargs(argparse.Namespace(host="127.0.0.1", port=None, auth=None))
    assert defaults["share"] is False and defaults["run_history"] is False and defaults["enable_monitoring"] is False
    assert lab_app.is_loopback("::1") and lab_app.is_loopback("127.0.0.5") and not lab_app.is_loopback("0.0.0.0")


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
