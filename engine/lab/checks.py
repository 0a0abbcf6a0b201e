"""Checks made when settings are applied, against the loaded model and its device.

They are the checks a profiling run makes before it starts, called the same way (the generator's own pre-run
checks, the decode-attention choice, the memory check and the plan), so a value that would fail the run is refused
at Apply with the message the run would give. Settings that are valid but do nothing on this device are named in
notes instead of being refused.
"""

from __future__ import annotations

from engine.decode.backend import choose_decode_attention
from engine.generator import Generator
from engine.loader import LoadedModel
from engine.offload.placement import check_run_fits, plan_for, resident_tokens
from engine.offload.profiler import HardwareProfile
from engine.settings import GenerationSettings, RunShape
from engine.lab.runs import check_profile_settings

MAX_SOURCE_CHARS = 4096  # a model source longer than this is no path, preset or hub id


def shortened(text: str, limit: int = 80) -> str:
    """`text` as it is quoted back in a message: whole when short, else its start and end around an ellipsis."""
    if len(text) <= limit:
        return text
    tail = limit // 4
    return f"{text[:limit - tail - 1]}…{text[-tail:]}"


class _PreRunChecks(Generator):
    """A Generator whose stream makes every check it makes before a run, then runs nothing."""

    def _run(self, *args, **kwargs):
        return iter(())


def check_context(model: LoadedModel, settings: GenerationSettings, *, prompt_tokens: int) -> None:
    """The checks Generator.stream makes before it starts a run of prompts up to `prompt_tokens` long (the context
    length, the GPU's state), with the same messages; nothing is run."""
    for _ in _PreRunChecks(model).stream([[0] * prompt_tokens], settings, stream_text=False):
        pass


def check_applied(model: LoadedModel, settings: GenerationSettings, shape: RunShape, *,
                  hardware: HardwareProfile | None = None) -> list[str]:
    """Raise the KVLabError a profiling run of `shape` under `settings` would raise before it starts; return notes
    on what does nothing on this device. `hardware`: the device's measured profile, when there is one already (the
    plan is then made as the run would make it); without it the memory check alone is made."""
    check_profile_settings(settings)
    spec, device = model.spec, model.device
    check_context(model, settings, prompt_tokens=shape.prompt_tokens)  # one sequence of the longest prompt will do
    choose_decode_attention(settings, device=device, head_dim=spec.head_dim)
    new_tokens, offload = settings.max_new_tokens, settings.offload
    if offload.offloaded and hardware is not None:
        plan_for(spec, offload, device=device, batch=shape.batch, prompt_tokens=shape.prompt_tokens,
                 new_tokens=new_tokens, profile=hardware, cuda_graphs=settings.cuda_graph,
                 fused=settings.wants_fast_adapter)
    else:
        resident = shape.prompt_tokens + new_tokens
        if offload.offloaded:
            resident, _ = resident_tokens(spec, offload, device=device, batch=shape.batch,
                                          prompt_tokens=shape.prompt_tokens, new_tokens=new_tokens)
        check_run_fits(spec, offload, device=device, batch=shape.batch, prompt_tokens=shape.prompt_tokens,
                       new_tokens=new_tokens, resident=resident)
    notes = []
    if device.type != "cuda":
        if settings.attention != "torch":
            notes.append("no GPU: decode attention runs torch SDPA, so the L2 prefetch settings (a Triton-kernel "
                         "feature) have no effect here")
        if offload.placement == "hybrid":
            notes.append("no GPU: the GPU KV budget only caps how many slots the plan keeps resident in host memory")
    return notes


__all__ = ["MAX_SOURCE_CHARS", "check_applied", "check_context", "shortened"]
