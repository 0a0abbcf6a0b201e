"""Settings panel: placement, GPU KV budget, split, chunking, L2 prefetch, profiling shape and sampling.

The controls become one `GenerationSettings` (with its `OffloadSettings` and `DecodeAttentionConfig`) and one
`RunShape`, built by keyword; the engine validates them and its message is shown when a value is refused.
Applied settings are what Chat (placement and kernel; chat keeps its own sampling), Profile and the scheduler
explorer use.
"""

from __future__ import annotations

import math

import gradio as gr

from engine.errors import InvalidSettingsError
from engine.session import LabSession
from engine.settings import (ATTENTION_BACKENDS, PLACEMENTS, GenerationSettings, OffloadSettings, RunShape,
                             SamplingSettings)
from kernels.config import DecodeAttentionConfig
from panels.controls import NumberBox, SliderBox
from panels.errors import describe


def _number(name: str, value, *, whole: bool):
    """A control's value as a number; API clients may send strings, browsers send floats for whole numbers."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidSettingsError(f"{name} must be a number, got {value!r}: enter a number"
                                       f"{' or auto' if name == 'GPU KV budget' else ''}.") from None
    if whole and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def build_settings(*, placement, gpu_kv_budget_gib, split_mode, split, chunk_tokens, prefetch, prefetch_distance,
                   attention, max_new_tokens, temperature, top_p, top_k, sampling_seed) -> GenerationSettings:
    """The controls as one settings object; raises InvalidSettingsError with the engine's message."""
    budget = _number("GPU KV budget", gpu_kv_budget_gib, whole=False)
    if isinstance(budget, float) and not math.isfinite(budget):  # refused whatever the placement, not dropped
        raise InvalidSettingsError(f"gpu_kv_budget_gib must be a finite number, got {budget}: enter a number of GiB "
                                   "or auto.")
    offload = OffloadSettings(placement=placement, gpu_kv_budget_gib=budget if placement == "hybrid" else None,
                              split="auto" if split_mode == "auto" else _number("split", split, whole=False),
                              chunk_tokens=_number("chunk_tokens", chunk_tokens, whole=True))
    try:
        kernel = DecodeAttentionConfig(prefetch=prefetch, prefetch_distance=_number("prefetch distance",
                                                                                     prefetch_distance, whole=True))
    except ValueError as exc:  # the kernel's config is importable without the engine and raises plain ValueError
        raise InvalidSettingsError(f"Decode-attention kernel: {exc}.") from exc
    seed = _number("sampling seed", sampling_seed, whole=True)
    sampling = SamplingSettings(temperature=_number("temperature", temperature, whole=False),
                                top_p=_number("top_p", top_p, whole=False), top_k=_number("top_k", top_k, whole=True),
                                seed=None if seed in (None, -1) else seed)
    return GenerationSettings(max_new_tokens=_number("max_new_tokens", max_new_tokens, whole=True), sampling=sampling,
                              attention=attention, kernel=kernel, offload=offload)


def build_shape(*, batch, prompt_tokens, prompt_seed) -> RunShape:
    return RunShape(batch=_number("batch", batch, whole=True),
                    prompt_tokens=_number("prompt_tokens", prompt_tokens, whole=True),
                    seed=_number("prompt seed", prompt_seed, whole=True))


def describe_settings(settings: GenerationSettings, shape: RunShape) -> str:
    """One line per concern, for the panel."""
    o, k, s = settings.offload, settings.kernel, settings.sampling
    where = {"gpu": "KV cache on the GPU", "cpu": "KV cache offloaded to host memory",
             "hybrid": "KV cache split between GPU and host"}[o.placement]
    if o.placement == "hybrid":
        where += f" (GPU budget {'auto' if o.gpu_kv_budget_gib is None else f'{o.gpu_kv_budget_gib:g} GiB'})"
    if o.offloaded:
        where += f"; recompute split {o.split if o.auto_split else f'{o.split:g} (manual)'}, chunks of {o.chunk_tokens} tokens"
    sampling = "greedy" if s.greedy else f"temperature {s.temperature:g}, top-p {s.top_p:g}, top-k {s.top_k}"
    return "\n".join([
        f"- **placement:** {where}",
        f"- **decode attention:** {settings.attention}; L2 prefetch {k.prefetch}, distance {k.prefetch_distance} tile(s)",
        f"- **profiling run:** batch {shape.batch} × prompt {shape.prompt_tokens} tokens (seed {shape.seed}), "
        f"{settings.max_new_tokens} new tokens, {sampling}",
    ])


def build(session: LabSession) -> None:
    current, shape = session.settings, session.shape
    gr.Markdown("One settings object for the engine. **Apply** validates it; Chat, Profile and the Scheduler "
                "explorer then run under it (Chat keeps its own sampling and reply length).")
    with gr.Row():
        placement = gr.Radio(list(PLACEMENTS), value=current.offload.placement, label="KV cache placement",
                             info="gpu: all on the GPU; cpu: offloaded to pinned host memory; hybrid: GPU up to a budget")
        # A textbox, so that "auto" (size the budget from the free GPU memory) is a value, not an empty number.
        budget = gr.Textbox(value="auto" if current.offload.gpu_kv_budget_gib is None else
                            f"{current.offload.gpu_kv_budget_gib:g}", label="GPU KV budget, GiB (hybrid)",
                            info="a number, or auto: what is free after the weights and the run's buffers")
    with gr.Row():
        split_mode = gr.Radio(["auto", "manual"], value="auto" if current.offload.auto_split else "manual",
                              label="Recompute split", info="auto: the scheduler chooses per step")
        split = SliderBox.named("split", minimum=0.0, maximum=1.0, step=0.05,
                                value=0.5 if current.offload.auto_split else current.offload.split,
                                label="manual split (fraction of offloaded tokens recomputed)")
        chunk = NumberBox.named("chunk_tokens", value=current.offload.chunk_tokens, precision=0,
                                label="activation chunk (tokens)")
    with gr.Row():
        prefetch = gr.Radio(["off", "on", "auto"], value=current.kernel.prefetch, label="L2 prefetch",
                            info="auto gates it by occupancy")
        distance = gr.Radio([1, 2], value=current.kernel.prefetch_distance, label="prefetch distance (tiles)")
        attention = gr.Dropdown(list(ATTENTION_BACKENDS), value=current.attention, label="decode attention")
    with gr.Row():
        batch = NumberBox.named("batch", value=shape.batch, precision=0, label="batch (profiling)")
        prompt_tokens = NumberBox.named("prompt_tokens", value=shape.prompt_tokens, precision=0,
                                        label="prompt length, tokens (profiling)")
        new_tokens = NumberBox.named("max_new_tokens", value=current.max_new_tokens, precision=0, label="new tokens")
        prompt_seed = NumberBox.named("prompt seed", value=shape.seed, precision=0, label="prompt seed")
    with gr.Accordion("Sampling (profiling runs)", open=False):
        with gr.Row():
            temperature = NumberBox.named("temperature", value=current.sampling.temperature,
                                          label="temperature (0 = greedy)")
            top_p = NumberBox.named("top_p", value=current.sampling.top_p, label="top-p")
            top_k = NumberBox.named("top_k", value=current.sampling.top_k, precision=0, label="top-k (0 = off)")
            sampling_seed = NumberBox.named("sampling seed", precision=0, label="sampling seed (-1 = random)",
                                            value=-1 if current.sampling.seed is None else current.sampling.seed)
    apply = gr.Button("Apply settings", variant="primary")
    status = gr.Markdown(describe_settings(current, shape))

    def on_apply(placement, gpu_kv_budget_gib, split_mode, split, chunk_tokens, prefetch, prefetch_distance,
                 attention, batch, prompt_tokens, max_new_tokens, prompt_seed, temperature, top_p, top_k,
                 sampling_seed):
        try:
            settings = build_settings(placement=placement, gpu_kv_budget_gib=gpu_kv_budget_gib, split_mode=split_mode,
                                      split=split, chunk_tokens=chunk_tokens, prefetch=prefetch,
                                      prefetch_distance=prefetch_distance, attention=attention,
                                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k, sampling_seed=sampling_seed)
            run_shape = build_shape(batch=batch, prompt_tokens=prompt_tokens, prompt_seed=prompt_seed)
            session.apply_settings(settings, run_shape)
        except Exception as exc:  # noqa: BLE001 - shown in the panel; the applied settings are unchanged
            return (f"**Invalid:** {describe(exc)} The applied settings are unchanged.\n\n"
                    + describe_settings(session.settings, session.shape))
        return "**Applied.**\n\n" + describe_settings(settings, run_shape)

    inputs = [placement, budget, split_mode, split, chunk, prefetch, distance, attention, batch, prompt_tokens,
              new_tokens, prompt_seed, temperature, top_p, top_k, sampling_seed]
    apply.click(on_apply, inputs, status, api_name="apply_settings", queue=False)
