"""Model panel: load the demo model, a synthetic preset, a local directory or a cached hub id; show its card."""

from __future__ import annotations

import gradio as gr

from engine.presets import PRESETS
from engine.session import LabSession
from engine.access import is_loopback
from panels.errors import describe
from panels.plots import human_bytes

BUILT_IN = ["demo", *(f"synthetic:{name}" for name in PRESETS)]


def card_markdown(card: dict | None) -> str:
    if not card:
        return "_No model loaded._"
    ratio = card["act_to_kv_ratio"]
    why = ("shipping activations moves more bytes than the K/V, so recomputing K/V cannot pay and the scheduler "
           "keeps the split at 0" if ratio >= 1 else
           "shipping activations moves fewer bytes than the K/V, so the scheduler may recompute part of the offloaded K/V")
    rows = [
        ("model", f"{card['name']} (`{card['source']}`)"),
        ("architecture", f"{card['model_type']} ({card['family']} family), {card['num_layers']} layers, hidden "
                         f"{card['hidden_size']}, {card['num_heads']} query / {card['num_kv_heads']} KV heads of {card['head_dim']}"),
        ("parameters", f"{card['num_params'] / 1e6:,.1f} M ({human_bytes(card['weight_bytes'])} in {card['dtype']})"),
        ("device", card["device"]),
        ("KV bytes per token", f"{card['kv_bytes_per_token']:,} B (all layers)"),
        ("activation / KV size", f"{ratio:.2f}x ({card['gqa_note']}): {why}"),
        ("memory needed", f"weights {human_bytes(card['weight_bytes'])} + KV {human_bytes(card['kv_bytes_per_token'] * 1000)} "
                          f"per 1,000 tokens per sequence; one sequence at the full context: "
                          f"{human_bytes(card['memory_needed_bytes'])}"),
        ("context", f"{card['max_positions']:,} positions"),
        ("tokenizer", card["tokenizer"]),
        ("loaded in", f"{card['load_s']:.2f} s"),
    ]
    notes = "".join(f"\n- {n}" for n in card.get("notes", []))
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]) + notes


def is_remote(request: gr.Request | None) -> bool:
    """Whether the request comes from another machine (a direct call from Python has no request: local)."""
    client = getattr(request, "client", None)
    return request is not None and not is_loopback(getattr(client, "host", None))


def build(session: LabSession) -> dict:
    """The Model tab. Returns the components other panels may listen to."""
    with gr.Row():
        where = (f"; the models in {session.policy.models_dir} by name" if session.policy.models_dir else "")
        source = gr.Dropdown([*BUILT_IN, *session.policy.models()],
                             value=session.model.source if session.model else "demo", label="Model",
                             allow_custom_value=True, scale=3,
                             info=f"demo, synthetic:<preset>, a local Hugging Face directory, or a cached hub id{where}")
        device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="Device", scale=1)
        dtype = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value="auto", label="dtype", scale=1)
    load = gr.Button("Load model", variant="primary")
    status = gr.Markdown("")
    card = gr.Markdown(card_markdown(session.card()))

    def on_load(source_value, device_value, dtype_value, request: gr.Request, progress=gr.Progress()):
        progress(0.1, desc=f"Loading {source_value} ...")
        try:
            loaded = session.load(source_value or "", device=None if device_value == "auto" else device_value,
                                  dtype=None if dtype_value == "auto" else dtype_value, remote=is_remote(request))
        except Exception as exc:  # noqa: BLE001 - shown in the UI; the previous model stays loaded
            kept = f" The loaded model ({session.model.name}) is kept." if session.model else ""
            return f"**Could not load:** {describe(exc)}{kept}", card_markdown(session.card())
        return f"Loaded **{loaded['name']}** in {loaded['load_s']:.2f} s.", card_markdown(loaded)

    # Not in the GPU queue: a load pressed while a reply streams or a profile runs is answered at once (the
    # session refuses it and says why) instead of waiting silently behind the running job.
    load.click(on_load, [source, device, dtype], [status, card], concurrency_id="load", concurrency_limit=1,
               api_name="load_model")
    return {"card": card, "status": status}
