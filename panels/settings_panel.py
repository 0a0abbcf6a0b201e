"""Settings panel: placement, GPU KV budget, split, chunking, L2 prefetch, profiling shape and sampling.

The controls become one `GenerationSettings` (with its `OffloadSettings` and `DecodeAttentionConfig`) and one
`RunShape`, built by keyword, checked against the loaded model and its device as a run would check them, and
applied for this client only: each browser tab and API client has its own settings (the model is shared). The
page shows, on every load, the settings that will run: this browser's last applied ones (kept in its local
storage) when they still pass the checks, else the defaults, saying so. An API call of /apply_settings changes
only the parameters it names.
"""

from __future__ import annotations

import math
from typing import Literal

import gradio as gr

from engine.errors import InvalidSettingsError
from engine.lab.session import LabSession
from engine.settings import (ATTENTION_BACKENDS, PLACEMENTS, GenerationSettings, OffloadSettings, RunShape,
                             SamplingSettings)
from kernels.config import DecodeAttentionConfig
from panels.api import PRIVATE, endpoint, owner
from panels.controls import NumberBox, SliderBox, as_number as _number
from panels.errors import shown

# The parameters of /apply_settings, in the form's order; None (left out) keeps the applied value.
PARAMETERS = ("placement", "gpu_kv_budget_gib", "split", "chunk_tokens", "prefetch", "prefetch_distance", "attention",
              "batch", "prompt_tokens", "max_new_tokens", "prompt_seed", "temperature", "top_p", "top_k",
              "sampling_seed")
SHARED = ("**This tab's settings.** The loaded model is shared by everyone connected (one device); the settings "
          "below, the chat and the run shown in Profile belong to this tab (an API client has its own).")
NO_GPU = "no GPU here: "


def params_of(settings: GenerationSettings, shape: RunShape) -> dict:
    """The applied settings as /apply_settings parameters (what /settings returns and the browser keeps)."""
    o, k, s = settings.offload, settings.kernel, settings.sampling
    return {"placement": o.placement, "gpu_kv_budget_gib": "auto" if o.gpu_kv_budget_gib is None else o.gpu_kv_budget_gib,
            "split": o.split, "chunk_tokens": o.chunk_tokens, "prefetch": k.prefetch,
            "prefetch_distance": k.prefetch_distance, "attention": settings.attention, "batch": shape.batch,
            "prompt_tokens": shape.prompt_tokens, "max_new_tokens": settings.max_new_tokens, "prompt_seed": shape.seed,
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
            "sampling_seed": -1 if s.seed is None else s.seed}


def settings_from(params: dict, settings: GenerationSettings, shape: RunShape) -> tuple[GenerationSettings, RunShape]:
    """`settings` and `shape` with the parameters `params` names (None: unchanged) -> a new pair; raises
    InvalidSettingsError with the engine's message when a value is refused."""
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise InvalidSettingsError(f"Unknown setting(s) {', '.join(unknown)}: the settings are {', '.join(PARAMETERS)}.")
    p = params_of(settings, shape) | {k: v for k, v in params.items() if v is not None}
    placement = p["placement"]
    budget = _number("gpu_kv_budget_gib", p["gpu_kv_budget_gib"], whole=False, auto=True)
    if isinstance(budget, float) and not math.isfinite(budget):  # refused whatever the placement, not dropped
        raise InvalidSettingsError(f"gpu_kv_budget_gib must be a finite number, got {budget}: enter a number of GiB "
                                   "or auto.")
    split = p["split"]
    split = "auto" if isinstance(split, str) and split.strip().lower() == "auto" else \
        _number("split", split, whole=False)
    offload = OffloadSettings(placement=placement, gpu_kv_budget_gib=budget if placement == "hybrid" else None,
                              split=split, chunk_tokens=_number("chunk_tokens", p["chunk_tokens"], whole=True))
    try:
        kernel = DecodeAttentionConfig(prefetch=p["prefetch"],
                                       prefetch_distance=_number("prefetch_distance", p["prefetch_distance"], whole=True))
    except ValueError as exc:  # the kernel's config is importable without the engine and raises plain ValueError
        if isinstance(exc, InvalidSettingsError):
            raise
        raise InvalidSettingsError(f"Decode-attention kernel: {exc}.") from exc
    seed = _number("sampling_seed", p["sampling_seed"], whole=True)
    sampling = SamplingSettings(temperature=_number("temperature", p["temperature"], whole=False),
                                top_p=_number("top_p", p["top_p"], whole=False),
                                top_k=_number("top_k", p["top_k"], whole=True), seed=None if seed in (None, -1) else seed)
    new = GenerationSettings(max_new_tokens=_number("max_new_tokens", p["max_new_tokens"], whole=True),
                             sampling=sampling, attention=p["attention"], kernel=kernel, offload=offload)
    return new, RunShape(batch=_number("batch", p["batch"], whole=True),
                         prompt_tokens=_number("prompt_tokens", p["prompt_tokens"], whole=True),
                         seed=_number("prompt_seed", p["prompt_seed"], whole=True))


def describe_settings(settings: GenerationSettings, shape: RunShape, notes: list[str] = (), *,
                      on_gpu: bool = True) -> str:
    """One line per concern, for the panel. on_gpu False: the loaded model runs on the CPU, where "gpu" means the
    K/V stays beside the weights and the offloaded placements keep both parts in the same memory."""
    o, k, s = settings.offload, settings.kernel, settings.sampling
    if on_gpu:
        where = {"gpu": "KV cache on the GPU (resident)", "cpu": "KV cache offloaded to host memory",
                 "hybrid": "KV cache split between GPU and host"}[o.placement]
    else:
        where = {"gpu": "KV cache resident beside the weights (in CPU memory: no GPU here)",
                 "cpu": "KV cache through the offload path (no GPU here: both sides are CPU memory)",
                 "hybrid": "KV cache split as on a GPU (no GPU here: both parts are CPU memory)"}[o.placement]
    if o.placement == "hybrid":
        where += f" (GPU budget {'auto' if o.gpu_kv_budget_gib is None else f'{o.gpu_kv_budget_gib:g} GiB'})"
    if o.offloaded:
        where += f"; recompute split {o.split if o.auto_split else f'{o.split:g} (manual)'}, chunks of {o.chunk_tokens} tokens"
    sampling = "greedy" if s.greedy else f"temperature {s.temperature:g}, top-p {s.top_p:g}, top-k {s.top_k}"
    lines = [
        f"- **placement:** {where}",
        f"- **decode attention:** {settings.attention}; L2 prefetch {k.prefetch}, distance {k.prefetch_distance} tile(s)",
        f"- **profiling run:** batch {shape.batch} × prompt {shape.prompt_tokens} tokens (seed {shape.seed}), "
        f"{settings.max_new_tokens} new tokens, {sampling}",
    ]
    return "\n".join(lines + [f"- _{note}_" for note in notes])


def _on_gpu(session: LabSession) -> bool:
    return session.model is None or session.model.device.type == "cuda"


def gpu_controls(session: LabSession) -> tuple[dict, dict, dict]:
    """Updates of the GPU-only controls (L2 prefetch, its distance, the hybrid GPU budget) for the loaded model's
    device: disabled, saying why, on a CPU."""
    model = session.model
    if model is not None and model.device.type == "cuda":
        return (gr.update(interactive=True, info="auto gates it by occupancy"),
                gr.update(interactive=True, info="tiles ahead"),
                gr.update(interactive=True, info="a number, or auto: what is free after the weights and the run's buffers"))
    why = NO_GPU + ("the decode attention runs torch SDPA on the CPU" if model is not None else "no model loaded")
    return (gr.update(interactive=False, info=f"{why}; the L2 prefetch is a Triton-kernel feature"),
            gr.update(interactive=False, info=why),
            gr.update(interactive=False, info=f"{why}: every slot is in host memory, so there is no GPU memory to budget"))


def browser_memory() -> gr.BrowserState:
    """Where this browser keeps its last applied settings (its local storage). Rendered outside the tabs: a
    component in a tab not yet shown is not mounted, and would read nothing when the page loads."""
    return gr.BrowserState(None, storage_key="kvlab-settings")


def build(session: LabSession, *, app: gr.Blocks, model_key: gr.Textbox, saved: gr.BrowserState) -> None:
    current, shape = session.settings, session.shape
    gr.Markdown(SHARED + " **Apply** checks them against the loaded model and device; Chat, Profile and the "
                "Scheduler explorer then run under them (Chat keeps its own sampling and reply length).")
    with gr.Row():
        placement = gr.Radio(list(PLACEMENTS), value=current.offload.placement, label="KV cache placement",
                             info="gpu: all on the GPU; cpu: offloaded to pinned host memory; hybrid: GPU up to a budget")
        # A textbox, so that "auto" (size the budget from the free GPU memory) is a value, not an empty number.
        budget = gr.Textbox(value="auto", label="GPU KV budget, GiB (hybrid)")
    with gr.Row():
        split_mode = gr.Radio(["auto", "manual"], value="auto" if current.offload.auto_split else "manual",
                              label="Recompute split", info="auto: the scheduler chooses per step")
        split = SliderBox.named("split", minimum=0.0, maximum=1.0, step=0.05, value=0.5,
                                label="manual split (fraction of offloaded tokens recomputed)")
        chunk = NumberBox.named("chunk_tokens", value=current.offload.chunk_tokens, precision=0,
                                label="activation chunk (tokens)")
    with gr.Row():
        prefetch = gr.Radio(["off", "on", "auto"], value=current.kernel.prefetch, label="L2 prefetch")
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
            sampling_seed = NumberBox.named("sampling seed", precision=0, label="sampling seed (-1 = random)", value=-1)
    apply = gr.Button("Apply settings", variant="primary")
    status = gr.Markdown(describe_settings(current, shape, on_gpu=_on_gpu(session)))

    form = [placement, budget, split_mode, split, chunk, prefetch, distance, attention, batch, prompt_tokens,
            new_tokens, prompt_seed, temperature, top_p, top_k, sampling_seed]

    def form_values(settings: GenerationSettings, run_shape: RunShape) -> list:
        p = params_of(settings, run_shape)
        manual = p["split"] != "auto"
        return [p["placement"], str(p["gpu_kv_budget_gib"]), "manual" if manual else "auto",
                p["split"] if manual else 0.5, p["chunk_tokens"], p["prefetch"], p["prefetch_distance"],
                p["attention"], p["batch"], p["prompt_tokens"], p["max_new_tokens"], p["prompt_seed"],
                p["temperature"], p["top_p"], p["top_k"], p["sampling_seed"]]

    def on_apply(placement, gpu_kv_budget_gib, split_mode, split, chunk_tokens, prefetch, prefetch_distance,
                 attention, batch, prompt_tokens, max_new_tokens, prompt_seed, temperature, top_p, top_k,
                 sampling_seed, request: gr.Request):
        who = owner(request)
        applied, applied_shape = session.settings_for(who)
        try:
            # The form shows every value, so Apply sends them all; a manual split's value only counts when manual.
            params = dict(placement=placement, gpu_kv_budget_gib=gpu_kv_budget_gib,
                          split="auto" if split_mode == "auto" else split, chunk_tokens=chunk_tokens, prefetch=prefetch,
                          prefetch_distance=prefetch_distance, attention=attention, batch=batch,
                          prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, prompt_seed=prompt_seed,
                          temperature=temperature, top_p=top_p, top_k=top_k, sampling_seed=sampling_seed)
            settings, run_shape = settings_from(params, applied, applied_shape)
            notes = session.apply_settings(settings, run_shape, owner=who)
        except Exception as exc:  # noqa: BLE001 - shown in the panel; the applied settings are unchanged
            return (f"**Invalid:** {shown(exc)} The applied settings are unchanged.\n\n"
                    + describe_settings(applied, applied_shape, on_gpu=_on_gpu(session))), gr.skip()
        return ("**Applied.**\n\n" + describe_settings(settings, run_shape, notes, on_gpu=_on_gpu(session)),
                params_of(settings, run_shape))

    def on_page_load(kept: dict | None, request: gr.Request):
        """The form as this tab will run it: the browser's last applied settings restored when they still pass the
        checks against the loaded model, else the defaults."""
        who = owner(request)
        settings, run_shape = session.settings_for(who)
        line = "Defaults (nothing applied in this browser yet)."
        if isinstance(kept, dict) and kept:
            try:
                restored = settings_from({k: v for k, v in kept.items() if k in PARAMETERS}, settings, run_shape)
                notes = session.apply_settings(*restored, owner=who)
                settings, run_shape = restored
                line = "Restored this browser's last applied settings." + "".join(f"\n- _{n}_" for n in notes)
            except Exception as exc:  # noqa: BLE001 - said in the panel; the defaults stay
                line = f"This browser's last applied settings no longer apply ({shown(exc)}): the defaults are applied."
        return [*form_values(settings, run_shape),
                f"{line}\n\n{describe_settings(settings, run_shape, on_gpu=_on_gpu(session))}",
                *gpu_controls(session)]

    apply.click(on_apply, form, [status, saved], queue=False, **PRIVATE)
    app.load(on_page_load, saved, [*form, status, prefetch, distance, budget], queue=False, **PRIVATE)
    model_key.change(lambda: gpu_controls(session), None, [prefetch, distance, budget], queue=False, **PRIVATE)

    def settings_api(request: gr.Request) -> dict:
        """This client's applied settings, as /apply_settings parameters, and the run they describe."""
        settings, run_shape = session.settings_for(owner(request))
        return {"settings": params_of(settings, run_shape),
                "description": describe_settings(settings, run_shape, on_gpu=_on_gpu(session))}

    def apply_settings(placement: Literal["gpu", "cpu", "hybrid"] | None = None,
                       gpu_kv_budget_gib: float | Literal["auto"] | None = None,
                       split: float | Literal["auto"] | None = None, chunk_tokens: int | None = None,
                       prefetch: Literal["off", "on", "auto"] | None = None, prefetch_distance: int | None = None,
                       attention: Literal["auto", "torch", "triton"] | None = None, batch: int | None = None,
                       prompt_tokens: int | None = None, max_new_tokens: int | None = None,
                       prompt_seed: int | None = None, temperature: float | None = None, top_p: float | None = None,
                       top_k: int | None = None, sampling_seed: int | None = None,
                       request: gr.Request = None) -> dict:
        """Apply settings for this client (its chat, profiles and explorer); parameters left out keep their applied
        values. Checked against the loaded model and device as a run would check them: a refused value raises
        with the run's message and nothing changes. placement: gpu, cpu or hybrid; gpu_kv_budget_gib: GiB or
        "auto" (hybrid only); split: the fraction of offloaded tokens recomputed, 0..1, or "auto"; chunk_tokens:
        activation chunk; prefetch: off, on or auto; prefetch_distance: 1 or 2 tiles; batch, prompt_tokens,
        max_new_tokens, prompt_seed: the profiling run; temperature, top_p, top_k, sampling_seed (-1: random):
        its sampling. Returns the applied settings and notes on what does nothing on this device."""
        params = {name: value for name, value in locals().items() if name in PARAMETERS}
        who = owner(request)
        settings, run_shape = settings_from(params, *session.settings_for(who))
        notes = session.apply_settings(settings, run_shape, owner=who)
        return {"settings": params_of(settings, run_shape), "notes": notes,
                "description": describe_settings(settings, run_shape, on_gpu=_on_gpu(session))}

    endpoint(settings_api, api_name="settings", output="settings", queue=False)
    endpoint(apply_settings, api_name="apply_settings", output="applied", queue=False)
