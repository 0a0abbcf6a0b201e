"""RoPE of q and k inside the fused qkv projection's output, in place, in one launch (optionally with the per-head
q/k RMSNorm of Qwen3 before it, and the new token's K/V written into a cache at each sequence's position).

The fused GEMM writes rows [q heads | k heads | v heads] (Hq + 2 Hkv heads of D). The q and k heads are one
contiguous prefix of the row, so one tile of heads covers both: each head's first R dims rotate (transformers'
`rotate_half` pairs (i, i + R/2), partial rotary when R < D, any even R), the rest pass through. Rounding follows
torch's 16-bit arithmetic as in kernels/rope.py: each product and the sum round to the input dtype; a q/k norm
rounds as LlamaRMSNorm does. cos/sin rows may be shared by the batch (prefill's (1, T, R) tables).

With a cache (decode, T = 1): K (rotated) and V of sequence b go to k_cache[b, :, positions[b]] and v_cache[...]
in the same launch, so the step needs no scatter of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl as _pdl
from kernels.rounding import round_to


@triton.jit
def _rope_qkv_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, kc_ptr, vc_ptr, pos_ptr,
                     stride_xb, stride_xt, stride_cb, stride_ct, stride_kb, stride_kh, stride_ks, stride_vb,
                     stride_vh, stride_vs, num_tokens, num_q_heads, num_kv_heads, head_dim, half_rotary, eps,
                     QK_NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr, STORE: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    _pdl.enter(PDL)
    row = tl.program_id(0)
    b, t = (row // num_tokens).to(tl.int64), (row % num_tokens).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # (H, 1)
    d = tl.arange(0, BLOCK_D)[None, :]  # (1, D)
    dtype = qkv_ptr.dtype.element_ty
    rotated_heads = num_q_heads + num_kv_heads  # the q and k heads; v heads follow
    is_v = heads >= rotated_heads
    live = heads < (rotated_heads + num_kv_heads if STORE else rotated_heads)
    mask = live & (d < head_dim)
    rotary = half_rotary * 2
    partner = tl.where(d < half_rotary, d + half_rotary, tl.where(d < rotary, d - half_rotary, d))
    row_ptr = qkv_ptr + b * stride_xb + t * stride_xt + heads.to(tl.int64) * head_dim
    x = tl.load(row_ptr + d, mask=mask, other=0.0).to(tl.float32)
    x_p = tl.load(row_ptr + partner, mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:  # RMSNorm over each q/k head, before the rotation (Llama's arithmetic, or Gemma's (1 + w))
        rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1, keep_dims=True) / head_dim + eps)
        is_q = heads < num_q_heads
        w = tl.where(is_q, tl.load(qw_ptr + d, mask=d < head_dim, other=0.0),
                     tl.load(kw_ptr + d, mask=d < head_dim, other=0.0)).to(tl.float32)
        w_p = tl.where(is_q, tl.load(qw_ptr + partner, mask=d < head_dim, other=0.0),
                       tl.load(kw_ptr + partner, mask=d < head_dim, other=0.0)).to(tl.float32)
        if UNIT_OFFSET:
            x_n = round_to(x * rstd * (1.0 + w), dtype).to(tl.float32)
            x_pn = round_to(x_p * rstd * (1.0 + w_p), dtype).to(tl.float32)
        else:
            x_n = round_to(round_to(x * rstd, dtype).to(tl.float32) * w, dtype).to(tl.float32)
            x_pn = round_to(round_to(x_p * rstd, dtype).to(tl.float32) * w_p, dtype).to(tl.float32)
        x, x_p = tl.where(is_v, x, x_n), tl.where(is_v, x_p, x_pn)
    table = b * stride_cb + t * stride_ct + d
    in_rotary = (d < rotary) & ~is_v
    c = tl.load(cos_ptr + table, mask=in_rotary, other=1.0).to(tl.float32)  # pass-through dims and V: x * 1 + 0
    s = tl.load(sin_ptr + table, mask=in_rotary, other=0.0).to(tl.float32)
    s = tl.where(d < half_rotary, -s, s)  # rotate_half: (-x2, x1)
    a = round_to(x * c, dtype).to(tl.float32)
    out = round_to(a + round_to(x_p * s, dtype).to(tl.float32), dtype)
    tl.store(row_ptr + d, out, mask=mask & ~is_v)
    if STORE:
        pos = tl.load(pos_ptr + b).to(tl.int64)
        kv_head = (heads - num_q_heads).to(tl.int64)
        k_dst = kc_ptr + b * stride_kb + kv_head * stride_kh + pos * stride_ks + d
        tl.store(k_dst, out, mask=mask & (heads >= num_q_heads) & ~is_v)
        v_dst = vc_ptr + b * stride_vb + (kv_head - num_kv_heads) * stride_vh + pos * stride_vs + d
        tl.store(v_dst, out, mask=mask & is_v)


def rope_qkv_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, num_heads: int, num_kv_heads: int,
              head_dim: int, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
              eps: float = 1e-6, unit_offset: bool = False, k_cache: torch.Tensor | None = None,
              v_cache: torch.Tensor | None = None, positions: torch.Tensor | None = None,
              pdl: bool = False) -> torch.Tensor:
    """Rotate the q and k heads of qkv (B, T, (Hq + 2 Hkv) * D) in place; cos/sin (B or 1, T, R), R even <= D.

    q_norm/k_norm (D,): per-head RMSNorm weights applied first (Qwen3; Gemma 3's (1 + w) with unit_offset).
    k_cache/v_cache (B, Hkv, S, D) with positions (B,): also write K and V of each sequence's token there (T must
    be 1). pdl: kernels/pdl.py. Returns qkv.
    """
    batch, num_tokens, width = qkv.shape
    assert width == (num_heads + 2 * num_kv_heads) * head_dim, (qkv.shape, num_heads, num_kv_heads, head_dim)
    assert qkv.stride(2) == 1, f"qkv rows must be contiguous, got strides {qkv.stride()}"
    assert qkv.dtype in (torch.float32, torch.float16, torch.bfloat16), qkv.dtype
    rotary = cos.shape[-1]
    assert cos.shape == sin.shape and cos.dim() == 3 and cos.shape[0] in (1, batch) and cos.shape[1] == num_tokens, \
        (cos.shape, sin.shape, qkv.shape)
    assert rotary % 2 == 0 and 0 < rotary <= head_dim, f"rotary dims {rotary} must be even and <= {head_dim}"
    assert cos.stride() == sin.stride() and cos.stride(2) == 1, (cos.stride(), sin.stride())
    assert cos.dtype == sin.dtype and cos.device == sin.device == qkv.device, (cos.dtype, sin.dtype, cos.device)
    assert (q_norm is None) == (k_norm is None), "q_norm and k_norm come together"
    for norm in (q_norm, k_norm):
        assert norm is None or (norm.shape == (head_dim,) and norm.stride(0) == 1 and norm.dtype == qkv.dtype), \
            (norm.shape, norm.dtype)
    store = k_cache is not None
    assert store == (v_cache is not None) == (positions is not None), "k_cache, v_cache and positions come together"
    if store:
        assert num_tokens == 1, f"the cache write is for one new token per sequence, got {num_tokens}"
        assert k_cache.shape == v_cache.shape and k_cache.shape[:2] == (batch, num_kv_heads) and \
            k_cache.shape[3] == head_dim, (k_cache.shape, v_cache.shape, batch, num_kv_heads, head_dim)
        assert k_cache.stride(3) == v_cache.stride(3) == 1 and k_cache.dtype == v_cache.dtype == qkv.dtype, \
            (k_cache.stride(), v_cache.stride(), k_cache.dtype)
        assert positions.shape == (batch,) and not positions.is_floating_point() and positions.device == qkv.device, \
            (positions.shape, positions.dtype)
    if batch * num_tokens == 0:
        return qkv
    block_d = triton.next_power_of_2(head_dim)
    heads = num_heads + (2 if store else 1) * num_kv_heads
    block_h = min(triton.next_power_of_2(heads), max(1, 2048 // block_d))
    dummy = qkv  # never read: the constexpr flags switch the pointer's use off
    interpreting = not isinstance(_rope_qkv_kernel, triton.runtime.jit.JITFunction)
    pdl = pdl and _pdl.usable(qkv.device, interpreting=interpreting)
    _rope_qkv_kernel[(batch * num_tokens, triton.cdiv(heads, block_h))](
        qkv_ptr=qkv, cos_ptr=cos, sin_ptr=sin, qw_ptr=dummy if q_norm is None else q_norm,
        kw_ptr=dummy if k_norm is None else k_norm, kc_ptr=k_cache if store else dummy,
        vc_ptr=v_cache if store else dummy, pos_ptr=positions if store else dummy,
        stride_xb=qkv.stride(0), stride_xt=qkv.stride(1), stride_cb=cos.stride(0) if cos.shape[0] > 1 else 0,
        stride_ct=cos.stride(1), stride_kb=k_cache.stride(0) if store else 0,
        stride_kh=k_cache.stride(1) if store else 0,
        stride_ks=k_cache.stride(2) if store else 0, stride_vb=v_cache.stride(0) if store else 0,
        stride_vh=v_cache.stride(1) if store else 0, stride_vs=v_cache.stride(2) if store else 0,
        num_tokens=num_tokens, num_q_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        half_rotary=rotary // 2, eps=eps, QK_NORM=q_norm is not None, UNIT_OFFSET=unit_offset, STORE=store,
        BLOCK_H=block_h, BLOCK_D=block_d, PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}))
    return qkv


def rope_qkv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, num_heads: int, num_kv_heads: int,
                       head_dim: int, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                       eps: float = 1e-6, unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (q, k, v) (B, T, H, D) as transformers computes them from the split projections (a copy)."""
    q, k, v = qkv.unflatten(-1, (num_heads + 2 * num_kv_heads, head_dim)).split(
        (num_heads, num_kv_heads, num_kv_heads), dim=2)
    if q_norm is not None:  # LlamaRMSNorm (GemmaRMSNorm) over each head
        def norm(x, w):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
            return (h * (1.0 + w.float())).to(x.dtype) if unit_offset else w * h.to(x.dtype)
        q, k = norm(q, q_norm), norm(k, k_norm)
    cos, sin, rotary = cos.unsqueeze(2), sin.unsqueeze(2), cos.shape[-1]

    def rotate(x):  # x * cos + rotate_half(x) * sin on the first R dims, the rest passed through
        x_rot, x_pass = x[..., :rotary], x[..., rotary:]
        half = rotary // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)

    return rotate(q), rotate(k), v.clone()
