"""Model panel: load the demo model, a synthetic preset, a local directory or a cached hub id; show its card.

The model is shared by every tab and API client (one device), so the card is read from the session on every page
load and every visit of the tab: it shows what is loaded now, whoever loaded it.
"""

from __future__ import annotations

from typing import Literal

import gradio as gr

from engine.lab.access import is_loopback
from engine.lab.session import LabSession
from engine.presets import PRESETS
from panels.api import PRIVATE, endpoint
from panels.errors import as_markdown, describe
from panels.plots import human_bytes

BUILT_IN = ["demo", *(f"synthetic:{name}" for name in PRESETS)]


def tokenizer_line(card: dict) -> str:
    name = card["tokenizer"]
    vocab = f"{card['vocab_size']:,}-token vocabulary" if card.get("vocab_size") else "its vocabulary"
    if name.startswith("bytes"):
        return f"one token per byte ({vocab}): the synthetic models' tokenizer"
    # transformers names its fast tokenizers by their backend class (e.g. "TokenizersBackend"), not the model's.
    return f"the model's Hugging Face tokenizer (tokenizer.json), {vocab}"


def card_markdown(card: dict | None) -> str:
    if not card:
        return "_No model loaded: pick one above and press Load model._"
    ratio = card["act_to_kv_ratio"]
    why = ("shipping activations moves more bytes than the K/V, so recomputing K/V cannot pay and the scheduler "
           "keeps the split at 0" if ratio >= 1 else
           "shipping activations moves fewer bytes than the K/V, so the scheduler may recompute part of the offloaded K/V")
    rows = [
        ("architecture", f"{card['model_type']} ({card['family']} family), {card['num_layers']} layers, hidden "
                         f"{card['hidden_size']}, {card['num_heads']} query / {card['num_kv_heads']} KV heads of {card['head_dim']}"),
        ("parameters", f"{card['num_params'] / 1e6:,.1f} M ({human_bytes(card['weight_bytes'])} in {card['dtype']})"),
        ("device", card["device"] + (" (no GPU: the engine runs on the CPU)" if card["device"] == "cpu" else "")),
        ("KV bytes per token", f"{card['kv_bytes_per_token']:,} B (all layers)"),
        ("activation / KV size", f"{ratio:.2f}x ({card['gqa_note']}): {why}"),
        ("memory needed", f"weights {human_bytes(card['weight_bytes'])} + KV {human_bytes(card['kv_bytes_per_token'] * 1000)} "
                          f"per 1,000 tokens per sequence; one sequence at the full context: "
                          f"{human_bytes(card['memory_needed_bytes'])}"),
        *([("fits", card["memory_fit"])] if card.get("memory_fit") else []),
        ("context", f"{card['max_positions']:,} positions"),
        ("tokenizer", tokenizer_line(card)),
        ("loaded in", f"{card['load_s']:.2f} s"),
    ]
    notes = "".join(f"\n- {n}" for n in card.get("notes", []))
    head = f"| model | **{card['name']}** (`{card['source']}`) |\n|---|---|"
    return head + "\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + notes


def kept_message(exc: BaseException, session: LabSession) -> str:
    """Why a load failed, and (once) which model stays loaded."""
    message = describe(exc)
    if session.model is not None and "is kept" not in message:
        message += f" The loaded model ({session.model.name}) is kept."
    return message


def is_remote(request: gr.Request | None) -> bool:
    """Whether the request comes from another machine (a direct call from Python has no request: local)."""
    client = getattr(request, "client", None)
    return request is not None and not is_loopback(getattr(client, "host", None))


def model_key(session: LabSession) -> str:
    """What identifies the loaded model for the panels that depend on it (its source and device)."""
    return f"{session.model.source}@{session.model.device}" if session.model is not None else ""


def build(session: LabSession, *, app: gr.Blocks, tab: gr.Tab) -> gr.Textbox:
    """The Model tab. Returns a hidden textbox naming the loaded model (source@device), which changes whenever the
    model does: the panels whose controls depend on the device listen to it."""
    with gr.Row():
        where = (f"; the models in {session.policy.models_dir} by name" if session.policy.models_dir else "")
        source = gr.Dropdown([*BUILT_IN, *session.policy.models()],
                             value=session.model.source if session.model else "demo", label="Model",
                             allow_custom_value=True, scale=3,
                             info=f"demo, synthetic:<preset>, a local Hugging Face directory, or a cached hub id{where}")
        device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="Device", scale=1)
        dtype = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value="auto", label="dtype", scale=1)
    load = gr.Button("Load model", variant="primary")
    gr.Markdown("_The loaded model is shared by everyone connected to this server (one device to run it on)._")
    status = gr.Markdown("")
    card = gr.Markdown(card_markdown(session.card()))
    key = gr.Textbox(model_key(session), visible=False)

    def loaded():
        return card_markdown(session.card()), model_key(session)

    def on_load(source_value, device_value, dtype_value, request: gr.Request, progress=gr.Progress()):
        progress(0.1, desc="Loading ...")
        try:
            result = session.load(source_value or "", device=None if device_value == "auto" else device_value,
                                  dtype=None if dtype_value == "auto" else dtype_value, remote=is_remote(request))
        except Exception as exc:  # noqa: BLE001 - shown in the UI; the previous model stays loaded
            return f"**Could not load:** {as_markdown(kept_message(exc, session))}", *loaded()
        return f"Loaded **{result['name']}** in {result['load_s']:.2f} s.", *loaded()

    def on_show():
        return gr.update(value=session.model.source) if session.model else gr.skip(), *loaded()

    # Not in the device queue: a load pressed while a reply streams or a profile runs is answered at once (the
    # session refuses it and says why) instead of waiting silently behind the running job.
    load.click(on_load, [source, device, dtype], [status, card, key], concurrency_id="load", concurrency_limit=1,
               **PRIVATE)
    app.load(on_show, None, [source, card, key], queue=False, **PRIVATE)
    tab.select(on_show, None, [source, card, key], queue=False, **PRIVATE)

    def model_api() -> dict:
        """The loaded model's card (shared by every client), or null when none is loaded."""
        return {"model": session.card()}

    def load_model(source: str = "demo", device: Literal["auto", "cpu", "cuda"] = "auto",
                   dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto", request: gr.Request = None) -> dict:
        """Load a model for every client: demo, synthetic:<preset>, a local Hugging Face directory (clients on other
        machines: only inside the server's --models-dir) or a hub id in the local cache. Refused, naming the running
        job, while a chat reply or a profile runs; on failure the loaded model is kept. Returns its card."""
        try:
            result = session.load(source, device=None if device == "auto" else device,
                                  dtype=None if dtype == "auto" else dtype, remote=is_remote(request))
        except Exception as exc:  # noqa: BLE001 - the client gets the message, with what stays loaded
            raise gr.Error(kept_message(exc, session), print_exception=False) from None
        return {"model": result}

    endpoint(model_api, api_name="model", output="model", queue=False)
    endpoint(load_model, api_name="load_model", output="model", concurrency_id="load", concurrency_limit=1)
    return key
