"""K/V segments: the pieces of one layer's K/V that decode attention reads, wherever each lives.

A decode step attends over slots [0, seq_len) of every sequence. Those slots may sit in several places: a
GPU-resident cache read in place, a staging buffer filled from host memory, slots recomputed from activations.
Each place is a `KVSegment`; attention runs over every segment and merges the partial results by their
log-sum-exp, exactly as the split-KV kernel merges its own splits. Importable without triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVSegment:
    """Slots [start, start + S) of every sequence: k, v (B, Hkv, S, D) views, the head dim contiguous.

    Key j of the segment is the token at position start + j. Which of them sequence b sees is decided by its
    length (positions < seq_lens[b]) and the layer's window, never by the segment.
    """

    k: torch.Tensor
    v: torch.Tensor
    start: int = 0

    def __post_init__(self) -> None:
        if self.k.dim() != 4 or self.k.shape != self.v.shape:
            raise ValueError(f"a segment's k and v must be (B, Hkv, S, D) of one shape, got {tuple(self.k.shape)} "
                             f"and {tuple(self.v.shape)}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"a segment's start must be a position >= 0, got {self.start!r}")

    @property
    def num_slots(self) -> int:
        return self.k.shape[2]

    @property
    def end(self) -> int:
        return self.start + self.num_slots


def visible_keys(seq_lens: torch.Tensor, segment: KVSegment, *, window: int | None) -> torch.Tensor:
    """(B, S) bool: key j of `segment` is visible to sequence b's newest token (position seq_lens[b] - 1).

    Visible: its position p = start + j is below seq_lens[b] and, with a sliding window W, p >= seq_lens[b] - W
    (the query and the W - 1 tokens before it), as transformers' sliding-window masks have it."""
    positions = segment.start + torch.arange(segment.num_slots, device=seq_lens.device)
    lens = seq_lens.to(torch.int64)[:, None]
    mask = positions[None, :] < lens
    if window is not None:
        mask &= positions[None, :] >= lens - window
    return mask
