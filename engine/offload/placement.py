"""From settings and the loaded model to a RunPlan: how many slots stay on the GPU, then the scheduler.

The GPU budget of a hybrid run is either given in GiB or taken from what is free once the weights are loaded,
less what the run itself needs besides the resident K/V: the staging buffers of an offloaded step and the
prefill's activations (whole-batch, whole-prompt tensors of one layer at a time).
"""

from __future__ import annotations

import torch

from engine.adapters import ModelSpec
from engine.errors import InvalidSettingsError
from engine.profiler import HardwareProfile, hardware_profile
from engine.scheduler import RunPlan, plan_run
from engine.settings import OffloadSettings

MARGIN_BYTES = 1 << 30  # allocator slack, cuBLAS workspaces, the logits


def prefill_working_bytes(spec: ModelSpec, *, batch: int, prompt_tokens: int) -> int:
    """Peak bytes of one prefill layer's temporaries. Whole-batch tensors: hidden, X, Q, attention output and
    its flattened copy, the activations' host-bound copy (6 h per token), K, V, their stacked and host-bound
    copies (6 Hkv D). Per-token stages run over slices of PREFILL_SLICE_TOKENS (engine/forward.py): fp32 norms
    and the MLP's three intermediates there. Half as much again for allocator fragmentation."""
    from engine.forward import PREFILL_SLICE_TOKENS

    s = spec
    tokens = batch * prompt_tokens
    whole = tokens * (6 * s.hidden_size + 6 * s.num_kv_heads * s.head_dim) * s.dtype_bytes
    per_slice = min(tokens, PREFILL_SLICE_TOKENS) * (3 * s.intermediate_size * s.dtype_bytes + 3 * s.hidden_size * 4)
    return (whole + per_slice) * 3 // 2 + batch * s.vocab_size * 4


def staging_bytes(spec: ModelSpec, *, batch: int, max_tokens: int) -> int:
    """Two layers of staging K/V over all slots, and two of activations (at most as many slots)."""
    kv = 2 * max_tokens * 2 * batch * spec.num_kv_heads * spec.head_dim * spec.dtype_bytes
    act = 2 * max_tokens * batch * spec.hidden_size * spec.dtype_bytes
    return kv + act


def resident_tokens(spec: ModelSpec, offload: OffloadSettings, *, device: torch.device, batch: int,
                    prompt_tokens: int, new_tokens: int) -> tuple[int, str]:
    """-> (slots per sequence kept on the GPU, a line saying how the budget was set)."""
    max_tokens = prompt_tokens + new_tokens
    slot_bytes = spec.num_layers * 2 * batch * spec.num_kv_heads * spec.head_dim * spec.dtype_bytes
    if offload.placement == "gpu":
        return max_tokens, "all K/V on the GPU"
    if offload.placement == "cpu":
        return 0, "all K/V in host memory"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    else:
        free = total = None
    if offload.gpu_kv_budget_gib is not None:
        budget = int(offload.gpu_kv_budget_gib * 2**30)
        if total is not None and budget > total:
            raise InvalidSettingsError(
                f"gpu_kv_budget_gib={offload.gpu_kv_budget_gib:g} is more than the whole GPU "
                f"({total / 2**30:.1f} GiB): give a budget below the free GPU memory, or None to size it automatically.")
        how = f"GPU KV budget {offload.gpu_kv_budget_gib:g} GiB (given)"
    else:
        if free is None:  # no GPU: the "GPU" is host memory; keep half the cache resident so both paths run
            budget = slot_bytes * max_tokens // 2
            how = "no GPU: half of the slots resident (auto budget)"
        else:
            working = (prefill_working_bytes(spec, batch=batch, prompt_tokens=prompt_tokens)
                       + staging_bytes(spec, batch=batch, max_tokens=max_tokens) + MARGIN_BYTES)
            budget = max(0, free - working)
            how = (f"GPU KV budget {budget / 2**30:.1f} GiB (auto: {free / 2**30:.1f} GiB free less "
                   f"{working / 2**30:.1f} GiB for staging, prefill and slack)")
    tokens = min(max_tokens, budget // slot_bytes)
    return tokens, f"{how}: {tokens} of {max_tokens} slots per sequence resident"


def plan_for(spec: ModelSpec, offload: OffloadSettings, *, device: torch.device, batch: int, prompt_tokens: int,
             new_tokens: int, profile: HardwareProfile | None = None, cuda_graphs: bool = True) -> RunPlan:
    """The run's plan: the resident range from the budget, the recompute/copy ranges from the scheduler."""
    if profile is None:
        profile = hardware_profile(device)
    resident, how = resident_tokens(spec, offload, device=device, batch=batch, prompt_tokens=prompt_tokens,
                                    new_tokens=new_tokens)
    split = None if offload.auto_split else float(offload.split)
    return plan_run(spec, profile, placement=offload.placement, batch=batch, prompt_tokens=prompt_tokens,
                    new_tokens=new_tokens, resident_tokens=resident, split=split, chunk_tokens=offload.chunk_tokens,
                    budget_note=how, cuda_graphs=cuda_graphs)
