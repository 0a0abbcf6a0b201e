"""Load: four API clients chatting at once with the served app, 200 turns in all, on the CPU with the tiny model.

Every turn is answered, each client's history comes back in order, every reply equals the same conversation
run alone (so no reply went to the wrong client), and the server's memory is back where it started: live tensor
bytes exactly, the resident set within a stated bound. The same driver (bench/chat_load.py) runs on a GPU in
`python -m bench reliability`. Also here: a model load pressed while replies stream is refused, not queued.
"""

from __future__ import annotations

import time

import pytest

import app as lab_app
import engine.decode.forward
from bench.chat_load import MemoryProbe, replay, run_load
from engine.lab.session import LabSession

CLIENTS, TURNS, NEW_TOKENS = 4, 50, 6
# The process's resident set (server and the four clients, all in this process) may grow by at most this much
# from the warm sample (every client's first 5 turns answered: Gradio's per-session state and the threads' malloc
# arenas exist) to the end. Measured here: 6-22 MiB over 200 turns, most of it allocator fragmentation (malloc_trim
# gives back ~9 MiB); tensors are checked exactly below.
RSS_BOUND_BYTES = 48 << 20
# A chat's own tensors while it runs: the tiny model's KV cache for 512 positions is 3 layers x 2 x 512 x 64 x 4 B
# = 786 KiB; activations and logits add less than that.
ONE_RUN_BYTES = 4 << 20


@pytest.fixture(scope="module")
def served(one_thread):
    session = LabSession()
    session.load("synthetic:tiny-llama", device="cpu", dtype="float32")  # 512 positions: long chats get trimmed
    demo = lab_app.build_app(session)
    demo.queue(default_concurrency_limit=1).launch(
        prevent_thread_lock=True, quiet=True, **lab_app.launch_kwargs(lab_app.parse_args([]), export_dir=session.export_dir))
    yield demo, session
    demo.close()


def test_four_clients_two_hundred_turns_all_answered_in_order(served):
    demo, session = served
    probe = MemoryProbe("cpu", period_s=0.5)
    report = run_load(demo.local_url, clients=CLIENTS, turns=TURNS, max_new_tokens=NEW_TOKENS, probe=probe)
    assert report.problems == []
    assert report.answered == CLIENTS * TURNS == 200
    assert all(len(t.replies) == TURNS for t in report.transcripts)
    assert replay(session, report.transcripts, max_new_tokens=NEW_TOKENS) == []
    memory = report.memory
    assert memory["samples"] >= 3
    assert memory["held_bytes"]["drift"] == 0, memory["held_bytes"]  # every run's tensors given back
    assert memory["pinned_store_bytes"]["max"] == 0  # CPU runs pin nothing
    assert memory["held_bytes"]["max"] - memory["held_bytes"]["first"] <= ONE_RUN_BYTES  # one chat at a time
    assert memory["rss_bytes"]["drift_since_warm"] <= RSS_BOUND_BYTES, memory["rss_bytes"]
    print(f"\nload: {report.answered} turns in {report.seconds:.1f} s, latency {report.latency_ms()}, "
          f"held drift {memory['held_bytes']['drift']} B, peak {memory['held_bytes']['max'] - memory['held_bytes']['first']} B "
          f"over the start, RSS drift {memory['rss_bytes']['drift'] / 2**20:.1f} MiB "
          f"({memory['rss_bytes']['drift_since_warm'] / 2**20:.1f} MiB since warm)")


def test_a_load_pressed_while_a_reply_streams_is_refused_at_once(served, monkeypatch):
    from gradio_client import Client

    demo, session = served
    original = engine.decode.forward.decode_step

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return original(*args, **kwargs)
    monkeypatch.setattr(engine.decode.forward, "decode_step", slow)
    api = Client(demo.local_url, verbose=False)
    chat = api.submit("a long speech, please", [], 60, 0.0, 1.0, 0, 0, api_name="/chat")
    deadline = time.monotonic() + 30
    while session.busy() != "a chat reply":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    from gradio_client.exceptions import AppError

    began = time.monotonic()
    with pytest.raises(AppError) as refused:
        api.predict("synthetic:tiny-opt", "cpu", "auto", api_name="/load_model")
    assert time.monotonic() - began < 1.0  # answered at once, not after the reply
    status = str(refused.value)
    assert "Cannot load a model while a chat reply is running" in status and "Stop" in status and "kept" in status
    assert chat.result(timeout=60)["finished"] and session.model.name == "tiny-llama"
    monkeypatch.undo()
    assert api.predict("synthetic:tiny-llama", "cpu", "float32", api_name="/load_model")["model"]["name"] == "tiny-llama"
