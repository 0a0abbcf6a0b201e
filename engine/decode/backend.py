"""Which decode-attention implementation a run uses, behind the engine's one attention signature.

The decode layer calls `attend(q (B, Hq, D), segments, seq_lens (B,) int32, scale=, window=, softcap=)` over the
layer's K/V segments (kernels/segments.py). The Triton kernel handles windows, soft-capping and any segment
layout; head dims it cannot run keep the torch path, and the run says so. Under torch.compile the kernel is
reached through the custom op `kvlab::decode_attention` (one segment: the compiled step reads the GPU cache),
which dynamo treats as opaque (it cannot trace a Triton launcher that plans its grid in Python).
"""

from __future__ import annotations

import os
from functools import lru_cache, partial
from typing import Sequence

import torch

from engine.decode.attention import decode_attention_torch
from engine.decode.layer import DecodeAttention
from engine.errors import InvalidSettingsError
from engine.settings import GenerationSettings
from kernels.config import DecodeAttentionConfig, unsupported_head_dim
from kernels.segments import KVSegment


@torch.library.custom_op("kvlab::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                        scale: float, window: int | None, softcap: float | None, prefetch: str,
                        prefetch_distance: int, num_splits: int | None, block_n: int | None) -> torch.Tensor:
    """kernels.decode_attention.decode_attention over one segment at slot 0, as a torch op; the config travels as
    its fields (op arguments must be tensors or scalars). Returns a new (B, Hq, D) tensor, aliasing no input."""
    from kernels.decode_attention import decode_attention

    config = DecodeAttentionConfig(prefetch=prefetch, prefetch_distance=prefetch_distance, num_splits=num_splits,
                                   block_n=block_n)
    return decode_attention(q, k_cache, v_cache, seq_lens, sm_scale=scale, window=window, softcap=softcap,
                            config=config)


@decode_attention_op.register_fake
def _decode_attention_fake(q, k_cache, v_cache, seq_lens, scale, window, softcap, prefetch, prefetch_distance,
                           num_splits, block_n):
    return torch.empty_like(q)  # the kernel's output is empty_like(q) too, so strides agree


def _triton_attend(q, segments: Sequence[KVSegment], seq_lens, *, scale: float, window: int | None,
                   softcap: float | None, config: DecodeAttentionConfig) -> torch.Tensor:
    # decode_step passes int32 lengths already (then this is free); others are converted on the device.
    seq_lens = seq_lens.to(torch.int32)
    if torch.compiler.is_compiling():
        (seg,) = segments
        return decode_attention_op(q, seg.k, seg.v, seq_lens, scale, window, softcap, config.prefetch,
                                   config.prefetch_distance, config.num_splits, config.block_n)
    from kernels.decode_attention import decode_attention_segments

    # Eager calls the launcher directly: the op's dispatch would add host time to every layer.
    return decode_attention_segments(q, segments, seq_lens, sm_scale=scale, window=window, softcap=softcap,
                                     config=config)


@lru_cache(maxsize=None)
def _triton_attend_with(config: DecodeAttentionConfig) -> DecodeAttention:
    # One function object per config: the compiled decode steps are cached per attention function.
    return partial(_triton_attend, config=config)


def choose_decode_attention(settings: GenerationSettings, *, device: torch.device,
                            head_dim: int) -> tuple[DecodeAttention, str]:
    """-> (attention function, one line saying which and why)."""
    wanted = settings.attention
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    reasons = []
    head_dim_why = unsupported_head_dim(head_dim)
    if head_dim_why is not None:
        reasons.append(head_dim_why)
    if device.type != "cuda" and not interpret:
        reasons.append("no GPU (the kernel runs on CPU only under TRITON_INTERPRET=1)")
    if wanted == "torch" or (wanted == "auto" and (reasons or device.type != "cuda")):
        why = "torch SDPA decode attention" + (" (asked)" if wanted == "torch" else "")
        if reasons and wanted == "auto":
            why += f": the Triton kernel is not used here: {'; '.join(reasons)}"
        return decode_attention_torch, why
    if reasons:
        raise InvalidSettingsError(f"attention='triton' cannot run here: {'; '.join(reasons)}. "
                                   "Use attention='torch' or 'auto'.")
    return _triton_attend_with(settings.kernel), f"Triton decode attention (prefetch {settings.kernel.prefetch})"


def describe_launches(why: str, segments: Sequence[KVSegment], *, window: int | None,
                      config: DecodeAttentionConfig) -> str:
    """`why` with how the Triton kernel launches over a run's segments (first layer): splits, tiles, and whether the
    prefetch asked for runs on each segment (strided staging rows cannot take a bulk prefetch)."""
    from kernels.decode_attention import plan_segments

    plans = plan_segments(segments, window=window, config=config)
    return f"{why}; " + "; ".join(plan.why for plan in plans)
