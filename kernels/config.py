"""Settings of the decode-attention kernel, importable without triton (the engine's settings carry them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MAX_SPLITS = 256


@dataclass(frozen=True)
class DecodeAttentionConfig:
    """User-facing settings; `None` means the launcher chooses."""

    prefetch: Literal["off", "on", "auto"] = "auto"
    prefetch_distance: int = 1  # tiles ahead
    num_splits: int | None = None
    block_n: int | None = None  # keys per tile
    num_stages: int | None = None  # depth of the cp.async K/V pipeline (1: none); None: a tuning table or the rules

    def __post_init__(self) -> None:
        if self.prefetch not in ("off", "on", "auto"):
            raise ValueError(f"prefetch must be 'off', 'on' or 'auto', got {self.prefetch!r}")
        if self.prefetch_distance not in (1, 2):
            raise ValueError(f"prefetch_distance must be 1 or 2 tiles, got {self.prefetch_distance!r}")
        if self.num_splits is not None and not (isinstance(self.num_splits, int) and 1 <= self.num_splits <= MAX_SPLITS):
            raise ValueError(f"num_splits must be None or an int in 1..{MAX_SPLITS}, got {self.num_splits!r}")
        if self.block_n is not None and self.block_n not in (16, 32, 64, 128):
            raise ValueError(f"block_n must be None or one of 16, 32, 64, 128, got {self.block_n!r}")
        if self.num_stages is not None and (isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int)
                                            or self.num_stages not in (1, 2, 3)):
            raise ValueError(f"num_stages must be None (the launcher chooses) or 1, 2 or 3 pipeline stages, "
                             f"got {self.num_stages!r}")


MAX_HEAD_DIM = 256  # 256-wide heads run 32-key tiles 3 stages deep in ~96 KiB of shared memory (bf16)


def unsupported_head_dim(head_dim: int) -> str | None:
    """Why the decode-attention kernel cannot run heads of `head_dim` (None: it can; widths that are not a power of
    two >= 16 are padded to one inside the kernel, and masked)."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim} (the kernel runs head dims up to {MAX_HEAD_DIM})"
    return None
