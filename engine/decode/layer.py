"""The one decode layer, for every placement: the new token's projections, its K/V stored, attention over the
layer's K/V segments, the output projection and the MLP.

Where the segments come from is the K/V source's business (`LayerKV`): the GPU cache gives one segment read in
place (engine/decode/kv_cache.py); an offloaded run gives its GPU-resident slots in place and the slots it
staged or recomputed (engine/offload/runtime.py). The layer is the same for all of them, and for the compiled
and CUDA-graphed steps.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from engine.adapters import DecoderAdapter
from kernels.segments import KVSegment


class LayerKV(Protocol):
    """Where one layer's K/V live during a decode step."""

    def write_new(self, layer: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Keep the new token's k, v (B, 1, Hkv, D) at each sequence's position (B,); x (B, 1, h) is its attention
        input, which a source that recomputes K/V keeps too."""

    def segments(self, layer: int, kv_len: int) -> Sequence[KVSegment]:
        """The segments attention reads for slots [0, kv_len), the new token's included."""

    def store_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's K and V caches (B, Hkv, S, D) when the new token's K/V go there at its position and nowhere
        else (the projection may then write them itself, in its own launch); None where `write_new` must run."""


class DecodeAttention(Protocol):
    def __call__(self, q: torch.Tensor, segments: Sequence[KVSegment], seq_lens: torch.Tensor, *, scale: float,
                 window: int | None, softcap: float | None) -> torch.Tensor: ...


def attend_block(adapter: DecoderAdapter, layer: int, hidden: torch.Tensor, rope, positions: torch.Tensor,
                 seq_lens: torch.Tensor, *, kv: LayerKV, kv_len: int, attend: DecodeAttention) -> torch.Tensor:
    """hidden (B, 1, h) -> hidden after attention and the output projection. seq_lens (B,) int32: keys per sequence,
    the new token's included; rope: this layer's (cos, sin) at `positions`, or None."""
    spec = adapter.spec
    # A GPU cache takes the new K/V from the RoPE launch itself where the adapter can (two scatter launches a layer
    # fewer), with the input norm folded into the q/k/v GEMM where the adapter left it there; every other source,
    # and every other adapter, stores them through write_new, which also takes the normed input x.
    target = kv.store_target(layer)
    stored = None if target is None else adapter.project_qkv_storing_from_hidden(layer, hidden, rope, positions,
                                                                                 *target)
    if stored is None:
        x = adapter.attn_input(layer, hidden)
        stored = None if target is None else adapter.project_qkv_storing(layer, x, rope, positions, *target)
        if stored is None:
            q, k, v = adapter.project_qkv(layer, x, rope)
            kv.write_new(layer, k, v, x, positions)
    if stored is not None:
        q, k, v = stored
    attn = attend(q[:, 0], kv.segments(layer, kv_len), seq_lens, scale=spec.attention_scale, window=spec.window(layer),
                  softcap=spec.attn_softcap)
    return adapter.attn_output(layer, attn.flatten(1)[:, None], hidden)


def mlp_block(adapter: DecoderAdapter, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    return adapter.mlp_block(layer, hidden)


def decode_layer(adapter: DecoderAdapter, layer: int, hidden: torch.Tensor, rope, positions: torch.Tensor,
                 seq_lens: torch.Tensor, *, kv: LayerKV, kv_len: int, attend: DecodeAttention) -> torch.Tensor:
    hidden = attend_block(adapter, layer, hidden, rope, positions, seq_lens, kv=kv, kv_len=kv_len, attend=attend)
    return mlp_block(adapter, layer, hidden)
