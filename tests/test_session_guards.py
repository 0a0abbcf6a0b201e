"""What the session does with input that would break a run: conversations longer than the context, text that is
not valid Unicode, and a model load while a reply or a profile is running.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

import engine.decode.forward
from engine.errors import BusyError, InvalidSettingsError, PromptTooLongError
from engine.lab.session import LabSession, normalise_history
from engine.settings import GenerationSettings, SamplingSettings

pytestmark = pytest.mark.usefixtures("one_thread", "profile_cache")  # conftest.py

GREEDY = GenerationSettings(max_new_tokens=8, sampling=SamplingSettings(temperature=0.0), ignore_eos=True)


@pytest.fixture(scope="module")
def session():
    session = LabSession()
    session.load("synthetic:tiny-llama", device="cpu", dtype="float32")  # 512 positions, one token per byte
    return session


def last_update(session, history, message, settings=GREEDY):
    *_, last = session.chat(history, message, settings)
    return last


def conversation(turns: int, chars: int) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i:03d}" + "x" * (chars - 3)}
            for i in range(turns)]


def test_a_conversation_that_fits_keeps_every_turn(session):
    update = last_update(session, conversation(4, 20), "hello")
    assert update.dropped_turns == 0 and update.capped_at is None and update.num_tokens == 8


@pytest.mark.parametrize("turns, chars", [(10, 100), (9, 100), (40, 30), (2, 460)])
def test_a_long_conversation_drops_its_oldest_turns_to_fit(session, turns, chars):
    history = conversation(turns, chars)
    update = last_update(session, history, "and now?")
    assert update.dropped_turns > 0 and update.num_tokens == 8 and update.capped_at is None
    # As few as possible: keeping one more turn (pair) would not have fit.
    tokenizer, context = session.model.tokenizer, session.model.spec.max_positions
    kept = history[update.dropped_turns:]
    assert not kept or kept[0]["role"] == "user"  # the transcript still starts with a user turn
    prompt = tokenizer.chat_prompt([*kept, {"role": "user", "content": "and now?"}])
    assert len(tokenizer.encode(prompt)) + 8 <= context
    wider = tokenizer.chat_prompt([*history[max(0, update.dropped_turns - 2):], {"role": "user", "content": "and now?"}])
    assert len(tokenizer.encode(wider)) + 8 > context


def test_a_message_that_leaves_little_room_caps_the_reply(session):
    context = session.model.spec.max_positions
    message = "m" * (context - 30)
    update = last_update(session, conversation(6, 50), message, replace(GREEDY, max_new_tokens=100))
    assert update.dropped_turns == 6 and update.capped_at is not None and 1 <= update.capped_at < 100
    assert update.num_tokens == update.capped_at and update.finish_reason == "length"


@pytest.mark.parametrize("extra", [0, 1, 200])
def test_a_message_that_fills_the_context_is_refused(session, extra):
    message = "m" * (session.model.spec.max_positions + extra)
    with pytest.raises(PromptTooLongError, match="no room for a reply: send a shorter message"):
        last_update(session, [], message)
    assert last_update(session, [], "still here").num_tokens == 8


@pytest.mark.parametrize("message, where", [("\ud800", 1), ("ab\udfffc", 3), ("ok \ud83d", 4)])
def test_a_lone_surrogate_is_refused_with_its_position(session, message, where):
    with pytest.raises(InvalidSettingsError, match=f"lone surrogate .* at character {where}.*paste the text again"):
        last_update(session, [], message)


def test_a_lone_surrogate_in_earlier_turns_is_replaced(session):
    history = [{"role": "user", "content": "a\ud800b"}, {"role": "assistant", "content": "c\udc00"}]
    assert normalise_history(history) == [{"role": "user", "content": "a\ufffdb"},
                                          {"role": "assistant", "content": "c\ufffd"}]
    assert last_update(session, history, "next").num_tokens == 8


@pytest.mark.parametrize("message", ["👩‍👩‍👧‍👦 family", "e\u0301\u0301\u0301", "مرحبا بالعالم", "漢字かな", "\ufeff\u200b\u200d",
                                     "\x00\x01\x7f binary", "\uffff\U0010fffd"])
def test_valid_unicode_of_every_kind_gets_a_reply(session, message):
    assert last_update(session, [], message).num_tokens == 8


def slow_steps(monkeypatch, seconds: float) -> None:
    original = engine.decode.forward.decode_step

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)
    monkeypatch.setattr(engine.decode.forward, "decode_step", slow)


def wait_until_busy(session, prefix: str) -> None:
    deadline = time.monotonic() + 30
    while not (session.busy() or "").startswith(prefix):
        assert time.monotonic() < deadline, f"never became busy with {prefix!r}"
        time.sleep(0.005)


def test_loading_while_a_reply_streams_is_refused_and_the_reply_finishes(session, monkeypatch):
    slow_steps(monkeypatch, 0.02)
    results = {}
    chat = threading.Thread(target=lambda: results.update(last=last_update(session, [], "go",
                                                                          replace(GREEDY, max_new_tokens=40))))
    chat.start()
    wait_until_busy(session, "a chat reply")
    with pytest.raises(BusyError, match="while a chat reply is running: press Stop or wait.*tiny-llama.*kept"):
        session.load("synthetic:tiny-opt", device="cpu")
    chat.join(60)
    assert results["last"].num_tokens == 40 and session.model.name == "tiny-llama" and session.busy() is None
    monkeypatch.undo()
    card = session.load("synthetic:tiny-llama", device="cpu", dtype="float32")  # free again: loads
    assert card["name"] == "tiny-llama"


def test_loading_while_a_profile_runs_is_refused(session, monkeypatch):
    slow_steps(monkeypatch, 0.02)
    updates = session.profile(replace(GREEDY, max_new_tokens=30), batch=1, prompt_tokens=8)
    first = next(updates)  # the profile holds the session from here until it ends
    assert first.run_id == session.live().run_id
    with pytest.raises(BusyError, match=f"while profile run #{first.run_id} is running"):
        session.load("synthetic:tiny-opt", device="cpu")
    *_, last = updates
    assert last.record is not None and session.model.name == "tiny-llama" and session.busy() is None
