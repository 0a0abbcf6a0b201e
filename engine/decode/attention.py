"""Attention in torch: prefill over a padded batch in bounded memory, and decode of one query token over K/V segments.

The decode function is the engine's reference and CPU path; on the GPU the Triton kernel
(kernels/decode_attention.py) takes its place with the same signature. Both honour the layer's sliding window
and the family's logit soft-capping.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kernels.segments import KVSegment, visible_keys

# Prefill attention with a window or soft-capping runs query blocks of this many tokens, each against the keys it
# can see: the scores of one block are (B, Hq, block, keys), bounded by the block and the window, never T x T.
PREFILL_QUERY_BLOCK = 1024


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_lens: Sequence[int] | None, *,
                      scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q (B, T, Hq, D), k/v (B, T, Hkv, D), right-padded -> (B, T, Hq*D); each query attends causally to its own
    sequence (and its window). prompt_lens None: every prompt is T long. Rows past a prompt's length are
    zeros. No (T, T) mask is built: equal lengths run as one causal kernel call, mixed lengths one per sequence."""
    batch, num_tokens, num_heads, dim = q.shape
    if prompt_lens is None or len(set(prompt_lens)) == 1 and prompt_lens[0] == num_tokens:
        return _causal(q, k, v, scale=scale, window=window, softcap=softcap).flatten(2)
    out = q.new_zeros(batch, num_tokens, num_heads, dim)
    for b, length in enumerate(prompt_lens):
        out[b : b + 1, :length] = _causal(q[b : b + 1, :length], k[b : b + 1, :length], v[b : b + 1, :length],
                                         scale=scale, window=window, softcap=softcap)
    return out.flatten(2)


def _causal(q, k, v, *, scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """(B, T, H, D) causal attention of T queries over the same T keys -> (B, T, Hq, D)."""
    num_tokens = q.shape[1]
    gqa = q.shape[2] != k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if softcap is None and (window is None or window >= num_tokens):
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa).transpose(1, 2)
    out = torch.empty_like(qt)
    for q0 in range(0, num_tokens, PREFILL_QUERY_BLOCK):
        q1 = min(q0 + PREFILL_QUERY_BLOCK, num_tokens)
        k0 = 0 if window is None else max(0, q0 - window + 1)
        rows = torch.arange(q0, q1, device=q.device)[:, None]
        cols = torch.arange(k0, q1, device=q.device)[None, :]
        mask = cols <= rows
        if window is not None:
            mask &= cols > rows - window
        out[:, :, q0:q1] = _masked(qt[:, :, q0:q1], kt[:, :, k0:q1], vt[:, :, k0:q1], mask, scale=scale,
                                   softcap=softcap)
    return out.transpose(1, 2)


def _masked(q, k, v, mask, *, scale: float, softcap: float | None) -> torch.Tensor:
    """q (B, Hq, M, D) over k/v (B, Hkv, N, D) with a (M, N) or broadcastable bool mask -> (B, Hq, M, D)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def decode_attention_torch(q: torch.Tensor, segments: Sequence[KVSegment], seq_lens: torch.Tensor, *, scale: float,
                           window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q (B, Hq, D) of each sequence's newest token over the K/V `segments` -> (B, Hq, D).

    One segment without soft-capping is one SDPA call (the query heads of a KV head stacked as its query rows, so
    GQA reads each K/V once). Otherwise each segment gives a partial output and its log-sum-exp in fp32, merged
    as the kernel merges its splits."""
    batch, num_heads, dim = q.shape
    if len(segments) == 1 and softcap is None:
        seg = segments[0]
        num_kv_heads = seg.k.shape[1]
        mask = visible_keys(seq_lens, seg, window=window)[:, None, None, :]  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(q.view(batch, num_kv_heads, num_heads // num_kv_heads, dim), seg.k,
                                             seg.v, attn_mask=mask, scale=scale)
        return out.reshape(batch, num_heads, dim)
    partials = [_segment_partial(q, seg, seq_lens, scale=scale, window=window, softcap=softcap) for seg in segments]
    return merge_partials([o for o, _ in partials], [lse for _, lse in partials]).to(q.dtype)


def _segment_partial(q, seg: KVSegment, seq_lens, *, scale: float, window: int | None, softcap: float | None):
    """-> (out (B, Hq, D) fp32, lse (B, Hq) fp32, -inf where the segment holds no visible key)."""
    batch, num_heads, dim = q.shape
    num_kv_heads = seg.k.shape[1]
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, dim)
    scores = torch.matmul(qg, seg.k.float().transpose(-1, -2)) * scale  # (B, Hkv, group, S)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = visible_keys(seq_lens, seg, window=window)[:, None, None, :]
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hkv, group)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.matmul(probs, seg.v.float())
    return out.reshape(batch, num_heads, dim), lse.reshape(batch, num_heads)


def merge_partials(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> torch.Tensor:
    """Partial attention outputs (B, Hq, D) with their log-sum-exps (B, Hq) -> the softmax over all their keys."""
    lse = torch.stack(lses)  # (n, B, Hq)
    top = lse.max(dim=0).values
    weights = torch.exp(lse - torch.where(torch.isfinite(top), top, 0.0))  # 0 for empty partials
    total = weights.sum(dim=0)
    out = sum(w[..., None] * o for w, o in zip(weights, outs))
    return out / torch.where(total > 0, total, 1.0)[..., None]
