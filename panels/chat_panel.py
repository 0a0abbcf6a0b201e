"""Chat panel: streamed replies under the applied settings (placement, kernel) with the panel's own sampling and
reply length, a stop button, tokens/s under each reply."""

from __future__ import annotations

import gradio as gr

from dataclasses import replace

from engine.errors import InvalidSettingsError
from engine.session import LabSession, normalise_history, reply_footer
from engine.settings import GenerationSettings, SamplingSettings
from panels.controls import ChatHistory, NumberBox, SliderBox
from panels.errors import GPU_QUEUE, describe


def chat_settings(base: GenerationSettings, max_new_tokens, temperature, top_p, top_k, seed) -> GenerationSettings:
    """The applied settings with the panel's sampling and reply length; API values may arrive as strings."""
    try:
        sampling = SamplingSettings(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                    seed=None if seed in (None, "", -1) else int(seed))
        return replace(base, max_new_tokens=int(max_new_tokens), sampling=sampling)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InvalidSettingsError):
            raise
        raise InvalidSettingsError(f"A chat setting is not a number ({exc}): enter numbers only.") from exc


def _owner(request: gr.Request | None) -> str | None:
    """Who is asking: Gradio's session of the browser tab or API client (None when called directly)."""
    return getattr(request, "session_hash", None) if request is not None else None


def build(session: LabSession) -> None:
    chatbot = ChatHistory(label="Chat", height=420)
    with gr.Row():
        message = gr.Textbox(placeholder="Say something to the model", show_label=False, scale=5, max_lines=6)
        send = gr.Button("Send", variant="primary", scale=1)
        stop = gr.Button("Stop", scale=1)
    stats = gr.Markdown("")
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

    def respond(history, text, n, temp, p, k, s, request: gr.Request):
        shown = list(history or [])  # as displayed, earlier replies' figures included
        try:
            settings = chat_settings(session.settings, n, temp, p, k, s)
            updates = session.chat(normalise_history(shown), text, settings, owner=_owner(request))
            turn = shown + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            for update in updates:
                turn[-1]["content"] = update.reply
                line = (f"{update.num_tokens} tokens, {update.decode_tok_s:.1f} tok/s decode, "
                        f"{update.elapsed_s:.2f} s")
                if settings.offload.offloaded:
                    line += f" · KV cache: {settings.offload.placement}, split {settings.offload.split}"
                if update.dropped_turns:
                    line += (f" · the {update.dropped_turns} oldest turns were left out to fit the model's "
                             "context (Clear chat to start afresh)")
                if update.capped_at is not None:
                    line += f" · reply capped at {update.capped_at} tokens by the context"
                if update.finish_reason:
                    line += f" · finished: {update.finish_reason}"
                    # The figures stay under this reply (the history sent back to the model drops them).
                    where = f" · KV {settings.offload.placement}" if settings.offload.offloaded else ""
                    turn[-1]["content"] = update.reply + reply_footer(update.num_tokens, update.decode_tok_s, where)
                yield turn, "", line
        except Exception as exc:  # noqa: BLE001 - shown under the chat; history and model are kept
            yield shown, text, f"**Error:** {describe(exc)}"

    inputs = [chatbot, message, max_new_tokens, temperature, top_p, top_k, seed]
    outputs = [chatbot, message, stats]
    sent = send.click(respond, inputs, outputs, concurrency_id=GPU_QUEUE, concurrency_limit=1, api_name="chat")
    submitted = message.submit(respond, inputs, outputs, concurrency_id=GPU_QUEUE, concurrency_limit=1,
                               api_name=False)
    def on_stop(request: gr.Request):
        # The browser's click also cancels the stream (`cancels`); an API client's /stop reaches only this.
        if session.stop_chat(owner=_owner(request)):
            return "Stopping the reply after the current token."
        return "No reply of yours is running."

    stop.click(on_stop, None, stats, cancels=[sent, submitted], api_name="stop", queue=False)
    clear.click(lambda: ([], ""), None, [chatbot, stats], api_name=False, queue=False)
