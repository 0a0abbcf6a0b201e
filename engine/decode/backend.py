"""Which decode-attention implementation a run uses, behind the engine's one attention signature.

The forward pass calls `attend(q (B, Hq, D), k_cache, v_cache (B, Hkv, S, D), seq_lens (B,), scale=,
window=)`. The Triton kernel has no sliding window; a windowed model keeps the torch path and says so.
Under torch.compile the kernel is reached through the custom op `kvlab::decode_attention`, which
dynamo treats as opaque (it cannot trace a Triton launcher that plans its grid in Python).
"""

from __future__ import annotations

import os
from functools import lru_cache, partial

import torch

from engine.attention import decode_attention_torch
from engine.errors import InvalidSettingsError
from engine.forward import DecodeAttention
from engine.settings import GenerationSettings
from kernels.config import DecodeAttentionConfig


@torch.library.custom_op("kvlab::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                        scale: float, prefetch: str, prefetch_distance: int, num_splits: int | None,
                        block_n: int | None) -> torch.Tensor:
    """kernels.decode_attention.decode_attention as a torch op; the config travels as its fields (op
    arguments must be tensors or scalars). Returns a new (B, Hq, D) tensor, aliasing no input."""
    from kernels.decode_attention import decode_attention

    config = DecodeAttentionConfig(prefetch=prefetch, prefetch_distance=prefetch_distance, num_splits=num_splits,
                                   block_n=block_n)
    return decode_attention(q, k_cache, v_cache, seq_lens, sm_scale=scale, config=config)


@decode_attention_op.register_fake
def _decode_attention_fake(q, k_cache, v_cache, seq_lens, scale, prefetch, prefetch_distance, num_splits, block_n):
    return torch.empty_like(q)  # the kernel's output is empty_like(q) too, so strides agree


def _triton_attend(q, k_cache, v_cache, seq_lens, *, scale: float, window: int | None,
                   config: DecodeAttentionConfig) -> torch.Tensor:
    # decode_step passes int32 lengths already (then this is free); others are converted on the device.
    seq_lens = seq_lens.to(torch.int32)
    if torch.compiler.is_compiling():
        return decode_attention_op(q, k_cache, v_cache, seq_lens, scale, config.prefetch, config.prefetch_distance,
                                   config.num_splits, config.block_n)
    from kernels.decode_attention import decode_attention

    # Eager calls the launcher directly: the op's dispatch would add host time to every layer.
    return decode_attention(q, k_cache, v_cache, seq_lens, sm_scale=scale, config=config)


@lru_cache(maxsize=None)
def _triton_attend_with(config: DecodeAttentionConfig) -> DecodeAttention:
    # One function object per config: the compiled decode steps are cached per attention function.
    return partial(_triton_attend, config=config)


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
    return _triton_attend_with(settings.kernel), f"Triton decode attention (prefetch {settings.kernel.prefetch})"
