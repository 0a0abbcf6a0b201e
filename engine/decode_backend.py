"""Which decode-attention implementation a run uses, behind the engine's one attention signature.

The forward pass calls `attend(q (B, Hq, D), k_cache, v_cache (B, Hkv, S, D), seq_lens (B,), scale=,
window=)`. The Triton kernel has no sliding window; a windowed model keeps the torch path and says so.
"""

from __future__ import annotations

import os
from functools import partial

import torch

from engine.attention import decode_attention_torch
from engine.errors import InvalidSettingsError
from engine.forward import DecodeAttention
from engine.settings import GenerationSettings
from kernels.config import DecodeAttentionConfig


def _triton_attend(q, k_cache, v_cache, seq_lens, *, scale: float, window: int | None,
                   config: DecodeAttentionConfig) -> torch.Tensor:
    from kernels.decode_attention import decode_attention

    # int32 lengths, converted on the device: no host sync, so the step stays graph-capturable.
    return decode_attention(q, k_cache, v_cache, seq_lens.to(torch.int32), sm_scale=scale, config=config)


def choose_decode_attention(settings: GenerationSettings, *, device: torch.device, head_dim: int,
                            sliding_window: int | None) -> tuple[DecodeAttention, str]:
    """-> (attention function, one line saying which and why)."""
    wanted = settings.attention
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    reasons = []
    if head_dim not in (64, 128):
        reasons.append(f"head dim {head_dim} (the kernel supports 64 and 128)")
    if sliding_window is not None:
        reasons.append("sliding-window attention (the kernel has no window)")
    if device.type != "cuda" and not interpret:
        reasons.append("no GPU (the kernel runs on CPU only under TRITON_INTERPRET=1)")
    if wanted == "torch" or (wanted == "auto" and (reasons or device.type != "cuda")):
        why = "torch SDPA decode attention" + (f": {'; '.join(reasons)}" if reasons and wanted == "auto" else "")
        return decode_attention_torch, why
    if reasons:
        raise InvalidSettingsError(f"attention='triton' cannot run here: {'; '.join(reasons)}. "
                                   "Use attention='torch' or 'auto'.")
    return partial(_triton_attend, config=settings.kernel), f"Triton decode attention (prefetch {settings.kernel.prefetch})"
