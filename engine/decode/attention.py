"""Attention in torch: prefill over a padded batch, and decode of one query token over the cache.

The decode function is the engine's reference and CPU path; on the GPU the Triton kernel
(kernels/decode_attention.py) takes its place with the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def key_mask(seq_lens: torch.Tensor, kv_len: int, *, query_pos: torch.Tensor | None = None,
             window: int | None = None) -> torch.Tensor:
    """(B, kv_len) bool: key j is visible to the last query of sequence b (and inside its window)."""
    keys = torch.arange(kv_len, device=seq_lens.device)
    mask = keys[None, :] < seq_lens[:, None]
    if window is not None:
        last = (seq_lens - 1) if query_pos is None else query_pos
        mask &= keys[None, :] > (last[:, None] - window)
    return mask


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_lens: torch.Tensor | None, *,
                      scale: float, window: int | None = None) -> torch.Tensor:
    """q (B, T, Hq, D), k/v (B, T, Hkv, D), right-padded; prompt_lens None when all are T -> (B, T, Hq*D)."""
    batch, num_tokens = q.shape[:2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if prompt_lens is None and window is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        pos = torch.arange(num_tokens, device=q.device)
        mask = pos[None, :] <= pos[:, None]  # causal (T, T)
        if window is not None:
            mask &= pos[None, :] > pos[:, None] - window
        mask = mask[None, None].expand(batch, 1, num_tokens, num_tokens)
        if prompt_lens is not None:
            mask = mask & (pos[None, None, None, :] < prompt_lens[:, None, None, None])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2).flatten(2)


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, *,
                           scale: float, window: int | None = None) -> torch.Tensor:
    """q (B, Hq, D); k/v cache (B, Hkv, S, D); seq_lens (B,) keys valid per sequence -> (B, Hq, D).

    The query heads of one KV head are stacked as that head's query rows, so GQA reads each K/V once.
    """
    batch, num_heads, dim = q.shape
    num_kv_heads, kv_len = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    mask = key_mask(seq_lens, kv_len, window=window)[:, None, None, :]  # (B, 1, 1, S)
    out = F.scaled_dot_product_attention(q.view(batch, num_kv_heads, group, dim), k_cache, v_cache,
                                         attn_mask=mask, scale=scale)
    return out.reshape(batch, num_heads, dim)
