"""Chat panel: streamed replies under this tab's applied settings (placement, kernel) with the panel's own sampling
and reply length, a stop button, tokens/s under each reply. A reply asked for while the device runs another job
waits for it and says which; Stop ends the reply (or its wait) after the current token and says so."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import gradio as gr

from engine.errors import InvalidSettingsError
from engine.lab.session import LabSession, normalise_history, reply_footer
from engine.settings import GenerationSettings, SamplingSettings
from panels.api import PRIVATE, endpoint, owner
from panels.controls import ChatHistory, NumberBox, SliderBox, as_number
from panels.errors import DEVICE_QUEUE, as_markdown, describe

MAX_WAITING = 16  # replies that may wait for the device at once; more wait in Gradio's queue


def chat_settings(base: GenerationSettings, max_new_tokens, temperature, top_p, top_k, seed) -> GenerationSettings:
    """The applied settings with the panel's sampling and reply length; API values may arrive as strings."""
    seed = as_number("seed", seed, whole=True)
    sampling = SamplingSettings(temperature=as_number("temperature", temperature, whole=False),
                                top_p=as_number("top_p", top_p, whole=False), top_k=as_number("top_k", top_k, whole=True),
                                seed=None if seed in (None, -1) else seed)
    return replace(base, max_new_tokens=as_number("max_new_tokens", max_new_tokens, whole=True), sampling=sampling)


def _checked_history(history) -> list:
    """An API client's history, or InvalidSettingsError saying what is wrong with it."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise InvalidSettingsError(f"history must be a list of {{role, content}} messages, got a "
                                   f"{type(history).__name__}: send [] or the history this endpoint returned.")
    for n, turn in enumerate(history):
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant") or \
                not isinstance(turn.get("content"), (str, list)):
            raise InvalidSettingsError(f"history message {n} is not a {{role: user or assistant, content}} message "
                                       f"({str(turn)[:60]!r}): send [] or the history this endpoint returned.")
    return history


# Why a reply ended, in words: "stop" (a stop string) read as if the Stop button had been pressed.
FINISH_WORDS = {"eos": "the model's end-of-sequence token", "stop": "end of the turn (a stop string)",
                "length": "max new tokens reached", "stopped": "Stop pressed"}


def stats_line(update, settings: GenerationSettings, model_name: str) -> str:
    """The line under the chat: tokens, speed, the model and placement it ran on, and why it ended."""
    if update.waiting_for:
        return f"Waiting for the device: {update.waiting_for} (press Stop to give up)."
    line = f"{update.num_tokens} tokens, {update.decode_tok_s:.1f} tok/s decode, {update.elapsed_s:.2f} s · {model_name}"
    if settings.offload.offloaded:
        line += f" · KV cache: {settings.offload.placement}, split {settings.offload.split}"
    if update.dropped_turns:
        line += (f" · the {update.dropped_turns} oldest turns were left out to fit the model's context (Clear chat "
                 "to start afresh)")
    if update.capped_at is not None:
        line += f" · reply capped at {update.capped_at} tokens by the context"
    if update.finish_reason:
        line += f" · finished: {FINISH_WORDS.get(update.finish_reason, update.finish_reason)}"
    return line


def build(session: LabSession) -> None:
    chatbot = ChatHistory(label="Chat", height=420)
    with gr.Row():
        message = gr.Textbox(placeholder="Say something to the model", show_label=False, scale=5, max_lines=6)
        send = gr.Button("Send", variant="primary", scale=1)
        stop = gr.Button("Stop", scale=1)
    stats = gr.Markdown("_The model answers under this tab's applied settings (Settings tab); the chat is this "
                        "tab's own._")
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            max_new_tokens = SliderBox.named("max new tokens", minimum=1, maximum=1024, value=100, step=1,
                                             label="max new tokens")
            temperature = SliderBox.named("temperature", minimum=0.0, maximum=2.0, value=0.8, step=0.05,
                                          label="temperature (0 = greedy)")
            top_p = SliderBox.named("top_p", minimum=0.05, maximum=1.0, value=0.95, step=0.01, label="top-p")
            top_k = NumberBox.named("top_k", value=0, precision=0, label="top-k (0 = off)")
            seed = NumberBox.named("seed", value=-1, precision=0, label="seed (-1 = random)")
    clear = gr.Button("Clear chat")

    def replies(history, text, max_new_tokens, temperature, top_p, top_k, seed, who) -> Iterator[tuple]:
        """(the turn's messages, the stats line, finished) per streamed state."""
        settings = chat_settings(session.settings_for(who)[0], max_new_tokens, temperature, top_p, top_k, seed)
        model_name = session.require_model().name
        turn = [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        for update in session.chat(normalise_history(history), text, settings, owner=who):
            turn[-1]["content"] = update.reply
            if update.finish_reason:
                # The figures stay under this reply (the history sent back to the model drops them).
                where = f" · KV {settings.offload.placement}" if settings.offload.offloaded else ""
                turn[-1]["content"] = update.reply + reply_footer(update.num_tokens, update.decode_tok_s, where)
            yield turn, stats_line(update, settings, model_name), update


    def respond(history, text, max_new_tokens, temperature, top_p, top_k, seed, request: gr.Request):
        shown = list(history or [])  # as displayed, earlier replies' figures included
        try:
            for turn, line, update in replies(shown, text, max_new_tokens, temperature, top_p, top_k, seed,
                                              owner(request)):
                if update.waiting_for:
                    yield shown, text, line
                elif update.finish_reason == "stopped" and not update.num_tokens:
                    yield shown, text, "Stopped before the reply started: the message is kept."
                else:
                    yield shown + turn, "", line
        except Exception as exc:  # noqa: BLE001 - shown under the chat; history and model are kept
            yield shown, text, f"**Error:** {as_markdown(describe(exc))}"

    inputs = [chatbot, message, max_new_tokens, temperature, top_p, top_k, seed]
    outputs = [chatbot, message, stats]
    queue = dict(concurrency_id=DEVICE_QUEUE, concurrency_limit=MAX_WAITING, **PRIVATE)
    send.click(respond, inputs, outputs, **queue)
    message.submit(respond, inputs, outputs, **queue)

    def on_stop(request: gr.Request):
        # The reply itself ends with "finished: stopped" (no stream is cancelled, so its last words arrive) within a
        # token; a line written here could land after that one and hide how the reply ended.
        if session.stop_chat(owner=owner(request)):
            return gr.skip()
        return "No reply of this tab is running."

    stop.click(on_stop, None, stats, queue=False, **PRIVATE)
    clear.click(lambda: ([], ""), None, [chatbot, stats], queue=False, **PRIVATE)

    def chat(message: str, history: list[dict] | None = None, max_new_tokens: int = 100, temperature: float = 0.8,
             top_p: float = 0.95, top_k: int = 0, seed: int = -1, request: gr.Request = None) -> Iterator[dict]:
        """Stream the model's reply to `message` after `history` ([{"role", "content"}, ...], as this endpoint
        returns it), under this client's applied settings (placement, decode attention) with this sampling:
        temperature (0: greedy), top_p, top_k (0: off), seed (-1: random). Each state holds the history with this
        turn, the reply so far, its tokens and tokens/s, and `finished` (eos, stop, length, stopped) at the end;
        while another job holds the device, `waiting_for` says which."""
        turns = normalise_history(_checked_history(history))
        for turn, line, update in replies(turns, message, max_new_tokens, temperature, top_p, top_k, seed,
                                          owner(request)):
            yield {"history": turns + normalise_history(turn), "reply": update.reply, "tokens": update.num_tokens,
                   "tokens_per_s": round(update.decode_tok_s, 2), "finished": update.finish_reason,
                   "waiting_for": update.waiting_for, "status": line}

    def stop_chat(request: gr.Request = None) -> dict:
        """Stop this client's streaming reply (or its wait for the device) after the current token."""
        stopping = session.stop_chat(owner=owner(request))
        return {"stopping": stopping,
                "message": "Stopping the reply after the current token." if stopping else "No reply of yours is running."}

    endpoint(chat, api_name="chat", output="reply", concurrency_id=DEVICE_QUEUE, concurrency_limit=MAX_WAITING)
    endpoint(stop_chat, api_name="stop_chat", output="stop", queue=False)
