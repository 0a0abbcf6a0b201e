"""Rotary position embedding applied in place to K rows of any stride: what KV recomputation needs.

Recomputed K arrives as (rows, Hkv, D) views into a staging buffer whose rows hold [K | V]. Rotating them
with torch ops costs five strided passes and temporaries; this kernel reads and writes each K value once.
The rotation is transformers' `rotate_half` convention (pairs (i, i + D/2)), with cos/sin given per
position; row r uses position `r // rows_per_position` of the tables (rows are slot-major, sequences inside).
Rounding follows torch's 16-bit arithmetic: each product and the sum round (to nearest even) to the input
dtype, as `x * cos + rotate_half(x) * sin` does; in fp32 and fp16 the result equals torch's bit for bit
(tests/test_rope.py), in bf16 on the GPU (bench/results/offload.md).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_xr, stride_xh, stride_cp, num_rows, num_heads, rows_per_position,
                 HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, ROUND_BF16: tl.constexpr,
                 ROUND_FP16: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None, None]  # (R, 1, 1)
    offs_h = tl.arange(0, BLOCK_H)[None, :, None]  # (1, H, 1)
    offs_d = tl.arange(0, HALF)[None, None, :]  # (1, 1, HALF)
    mask = (offs_r < num_rows) & (offs_h < num_heads)
    base = x_ptr + offs_r.to(tl.int64) * stride_xr + offs_h * stride_xh + offs_d
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    table = (offs_r // rows_per_position) * stride_cp + offs_d  # (R, 1, HALF): the row's position
    row_ok = offs_r < num_rows
    c = tl.load(cos_ptr + table, mask=row_ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + table, mask=row_ok, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    a1, b1, a2, b2 = x1 * c, x2 * s, x2 * c, x1 * s
    if ROUND_BF16:  # torch rounds each bf16 op's result: round the products before the sum, as it does
        a1, b1, a2, b2 = _round_bf16(a1), _round_bf16(b1), _round_bf16(a2), _round_bf16(b2)
    elif ROUND_FP16:
        a1, b1 = a1.to(tl.float16).to(tl.float32), b1.to(tl.float16).to(tl.float32)
        a2, b2 = a2.to(tl.float16).to(tl.float32), b2.to(tl.float16).to(tl.float32)
    tl.store(base, (a1 - b1).to(dtype, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(base + HALF, (a2 + b2).to(dtype, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest-even bf16 value, kept in fp32, by integer arithmetic on the bits: a float cast pair
    (fp32 -> bf16 -> fp32) may be folded away by the compiler, this may not."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rows_per_position: int) -> torch.Tensor:
    """Rotate x (rows, H, D) in place. cos/sin (positions, D) with rows = positions * rows_per_position.

    The tables must repeat their first half in their second, as transformers builds them (cat(freqs, freqs)):
    the kernel reads only the first half.

    x may have any row and head stride (the head dim must be contiguous); cos/sin rows must be contiguous.
    """
    rows, num_heads, dim = x.shape
    assert x.stride(2) == 1, "the head dim must be contiguous"
    assert dim % 2 == 0 and triton.next_power_of_2(dim // 2) == dim // 2, f"head dim {dim} must be 2 * a power of 2"
    assert cos.shape == sin.shape and cos.shape[1] == dim and cos.stride(1) == sin.stride(1) == 1, (cos.shape, sin.shape)
    assert cos.stride(0) == sin.stride(0), (cos.stride(), sin.stride())
    assert rows == cos.shape[0] * rows_per_position, (rows, cos.shape, rows_per_position)
    assert x.device == cos.device == sin.device and cos.dtype == sin.dtype, (x.device, cos.device, cos.dtype)
    if rows == 0:
        return x
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if x.device.type != "cuda" and not interpret:
        raise RuntimeError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is first imported")
    block_h = triton.next_power_of_2(num_heads)
    # ~4K elements per program on the GPU; the interpreter pays per program, so it takes many rows at once.
    block_r = 64 if interpret else max(1, 4096 // (block_h * dim // 2))
    _rope_kernel[(triton.cdiv(rows, block_r),)](
        x_ptr=x, cos_ptr=cos, sin_ptr=sin, stride_xr=x.stride(0), stride_xh=x.stride(1), stride_cp=cos.stride(0),
        num_rows=rows, num_heads=num_heads, rows_per_position=rows_per_position, HALF=dim // 2, BLOCK_R=block_r,
        BLOCK_H=block_h, ROUND_BF16=x.dtype == torch.bfloat16, ROUND_FP16=x.dtype == torch.float16,
        num_warps=4)
    return x


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rows_per_position: int) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for K, in torch: returns the rotated copy of x (rows, H, D)."""
    cos = cos.repeat_interleave(rows_per_position, dim=0)[:, None, :]  # (rows, 1, D)
    sin = sin.repeat_interleave(rows_per_position, dim=0)[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
