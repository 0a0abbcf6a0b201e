"""The engine-managed KV cache: preallocated once per run, written in place, never concatenated."""

from __future__ import annotations

import torch

from engine.adapters import ModelSpec
from kernels.segments import KVSegment


class KVCache:
    """K and V for every layer: two tensors (L, B, Hkv, S_max, D), zero-filled.

    Sequence b's token at position p lives at [:, b, :, p]. Zero-filling matters: attention masks the
    slots past each sequence's length, and 0 * garbage could be NaN where 0 * 0 is not.
    """

    def __init__(self, spec: ModelSpec, *, batch: int, max_tokens: int, dtype: torch.dtype, device: torch.device):
        shape = (spec.num_layers, batch, spec.num_kv_heads, max_tokens, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_tokens = max_tokens

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """A cache view over existing (L, B, Hkv, S, D) tensors, allocating nothing.

        The compiled decode step takes the tensors as arguments and rebuilds its cache from them: dynamo
        then guards on their shapes, not on a cache object's identity, so a new cache of the same shape
        reuses the compiled code.
        """
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_tokens = k, v, k.shape[3]
        return cache

    @staticmethod
    def bytes_needed(spec: ModelSpec, *, batch: int, max_tokens: int, dtype_bytes: int) -> int:
        return 2 * spec.num_layers * batch * spec.num_kv_heads * max_tokens * spec.head_dim * dtype_bytes

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def layer(self, layer: int, kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (B, Hkv, kv_len, D) of one layer's K and V."""
        kv_len = self.max_tokens if kv_len is None else kv_len
        return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]

    def segments(self, layer: int, kv_len: int) -> tuple[KVSegment, ...]:
        """What decode attention reads: slots [0, kv_len) of the layer, in place."""
        k, v = self.layer(layer, kv_len)
        return (KVSegment(k, v, 0),)

    def write_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None = None, *,
                     rows: slice = slice(None)) -> None:
        """k, v (G, T, Hkv, D) of sequences `rows` for positions 0..T-1 (rows past a sequence's length are never
        read). The attention input x is what an offloaded run keeps for recomputation; a GPU cache has no use for it."""
        num_tokens = k.shape[1]
        self.k[layer, rows, :, :num_tokens].copy_(k.transpose(1, 2))
        self.v[layer, rows, :, :num_tokens].copy_(v.transpose(1, 2))

    def write_new(self, layer: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, positions: torch.Tensor) -> None:
        self.write_at(layer, k, v, positions)

    def store_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's (B, Hkv, S, D) caches, for a projection that writes the new K/V itself; None while
        torch.compile traces (it writes through `_index_write_at`)."""
        if torch.compiler.is_compiling():
            return None
        return self.k[layer], self.v[layer]

    def write_at(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v (B, 1, Hkv, D) written at each sequence's own position (B,). Graph-capturable."""
        if torch.compiler.is_compiling():
            self._index_write_at(layer, k, v, positions)
            return
        batch, _, heads, dim = k.shape
        index = positions.view(batch, 1, 1, 1).expand(batch, heads, 1, dim)
        self.k[layer].scatter_(2, index, k.transpose(1, 2))
        self.v[layer].scatter_(2, index, v.transpose(1, 2))

    def _index_write_at(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """write_at as one index_put_ on the whole cache tensor: what torch.compile traces.

        A scatter_ into the view self.k[layer] makes inductor materialise a copy of every layer's cache and
        copy it all back at the end of the step (2-3x the KV bytes per step); an index_put_ on the graph
        input itself is done in place. Eager keeps scatter_ (no index tensors to build per layer).
        """
        layers = torch.full_like(positions, layer)
        rows = torch.arange(k.shape[0], device=positions.device)
        self.k[layers, rows, :, positions] = k[:, 0]  # (B, Hkv, D) at [layer, b, :, positions[b]]
        self.v[layers, rows, :, positions] = v[:, 0]
