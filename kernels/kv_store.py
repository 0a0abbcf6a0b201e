"""The new token's K and V written into a (B, Hkv, S, D) cache at each sequence's position: one launch for both.

torch does it as two scatters (one per tensor) plus their index tensors: two or three graph nodes a layer, ~1.2 µs
or more each on an H200. Here one program per (sequence, head block) moves its K and V rows; positions are int64
and every offset 64-bit (a cache row stride times a position passes 2^31 on long, wide caches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl as _pdl


@triton.jit
def _kv_store_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, stride_kb, stride_kh, stride_vb, stride_vh, stride_kcb,
                     stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs, num_heads, head_dim,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    _pdl.enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None].to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (d < head_dim)
    pos = tl.load(pos_ptr + b).to(tl.int64)
    k = tl.load(k_ptr + b * stride_kb + heads * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + b * stride_vb + heads * stride_vh + d, mask=mask)
    tl.store(kc_ptr + b * stride_kcb + heads * stride_kch + pos * stride_kcs + d, k, mask=mask)
    tl.store(vc_ptr + b * stride_vcb + heads * stride_vch + pos * stride_vcs + d, v, mask=mask)


def store_kv_(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              positions: torch.Tensor, *, pdl: bool = False) -> None:
    """k, v (B, 1, Hkv, D) -> k_cache[b, :, positions[b]] and v_cache[...] of (B, Hkv, S, D) caches, in place.
    Any strides with a contiguous head dim (k, v may be views into a fused qkv row). Graph-capturable."""
    batch, one, heads, dim = k.shape
    assert one == 1 and v.shape == k.shape, (k.shape, v.shape)
    assert k_cache.shape == v_cache.shape and k_cache.shape[:2] == (batch, heads) and k_cache.shape[3] == dim, \
        (k.shape, k_cache.shape, v_cache.shape)
    assert k.stride(3) == v.stride(3) == k_cache.stride(3) == v_cache.stride(3) == 1, "the head dim must be contiguous"
    assert k.dtype == v.dtype == k_cache.dtype == v_cache.dtype, (k.dtype, v.dtype, k_cache.dtype, v_cache.dtype)
    assert positions.shape == (batch,) and not positions.is_floating_point(), (positions.shape, positions.dtype)
    assert k.device == v.device == k_cache.device == v_cache.device == positions.device
    if batch == 0:
        return
    block_d = triton.next_power_of_2(dim)
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // block_d))
    interpreting = not isinstance(_kv_store_kernel, triton.runtime.jit.JITFunction)
    pdl = pdl and _pdl.usable(k.device, interpreting=interpreting)
    _kv_store_kernel[(batch, triton.cdiv(heads, block_h))](
        k_ptr=k, v_ptr=v, kc_ptr=k_cache, vc_ptr=v_cache, pos_ptr=positions, stride_kb=k.stride(0),
        stride_kh=k.stride(2), stride_vb=v.stride(0), stride_vh=v.stride(2), stride_kcb=k_cache.stride(0),
        stride_kch=k_cache.stride(1), stride_kcs=k_cache.stride(2), stride_vcb=v_cache.stride(0),
        stride_vch=v_cache.stride(1), stride_vcs=v_cache.stride(2), num_heads=heads, head_dim=dim, BLOCK_H=block_h,
        BLOCK_D=block_d, PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}))


def store_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       positions: torch.Tensor) -> None:
    """engine/decode/kv_cache.py's write: a scatter of each tensor at each sequence's position."""
    batch, _, heads, dim = k.shape
    index = positions.view(batch, 1, 1, 1).expand(batch, heads, 1, dim)
    k_cache.scatter_(2, index, k.transpose(1, 2))
    v_cache.scatter_(2, index, v.transpose(1, 2))
