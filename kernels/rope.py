"""Rotary position embedding applied in place to K rows of any stride: what KV recomputation needs.

Recomputed K arrives as (rows, Hkv, D) views into a staging buffer whose rows hold [K | V]. Rotating them
with torch ops costs five strided passes and temporaries; this kernel reads and writes each K value once.
The rotation is transformers' `rotate_half` convention over the first R dims of each head (pairs (i, i + R/2);
R = D, or the rotary dim of a partial-rotary model, whose dims [R, D) pass through untouched), with cos/sin given
per position; row r uses position `r // rows_per_position` of the tables (rows are slot-major, sequences inside).
Any even R: the half is padded to a power of two and masked. Offsets are 64-bit.
Rounding follows torch's 16-bit arithmetic: each product and the sum round (to nearest even) to the input
dtype, as `x * cos + rotate_half(x) * sin` does; the result equals torch's bit for bit in fp32, fp16 and bf16
(tests/test_rope.py, under the interpreter; bf16 on the GPU: bench/results/offload.md). bf16 is rounded by
integer arithmetic, the final value too, so the interpreter's truncating fp32 -> bf16 cast never rounds.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_xr, stride_xh, stride_cp, num_rows, num_heads, rows_per_position,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                 ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr):
    offs_r = (tl.cast(tl.program_id(0), tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None, None]  # (R, 1, 1)
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)[None, :, None]  # (1, H, 1)
    offs_d = tl.arange(0, BLOCK_HALF)[None, None, :]  # (1, 1, HALF)
    row_ok = (offs_r < num_rows) & (offs_d < HALF)
    mask = row_ok & (offs_h < num_heads)
    base = x_ptr + offs_r * stride_xr + offs_h * stride_xh + offs_d
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    table = (offs_r // rows_per_position) * stride_cp + offs_d  # (R, 1, HALF): the row's position
    c = tl.load(cos_ptr + table, mask=row_ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + table, mask=row_ok, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    a1, b1, a2, b2 = x1 * c, x2 * s, x2 * c, x1 * s
    if ROUND_BF16:  # torch rounds each bf16 op's result: round the products before the sum, as it does
        a1, b1, a2, b2 = _round_bf16(a1), _round_bf16(b1), _round_bf16(a2), _round_bf16(b2)
        y1, y2 = _round_bf16(a1 - b1), _round_bf16(a2 + b2)  # bf16 values: the casts below are exact
    elif ROUND_FP16:
        a1, b1 = a1.to(tl.float16).to(tl.float32), b1.to(tl.float16).to(tl.float32)
        a2, b2 = a2.to(tl.float16).to(tl.float32), b2.to(tl.float16).to(tl.float32)
        y1, y2 = a1 - b1, a2 + b2
    else:
        y1, y2 = a1 - b1, a2 + b2
    tl.store(base, y1.to(dtype, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(base + HALF, y2.to(dtype, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest-even bf16 value, kept in fp32, by integer arithmetic on the bits: a float cast pair
    (fp32 -> bf16 -> fp32) may be folded away by the compiler, this may not. NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rows_per_position: int,
          rotary_dim: int | None = None) -> torch.Tensor:
    """Rotate dims [0, R) of x (rows, H, D) in place; R = rotary_dim (None: D), any even R <= D; dims [R, D) are
    not touched. cos/sin (positions, R) with rows = positions * rows_per_position.

    The tables must repeat their first half in their second, as transformers builds them (cat(freqs, freqs)):
    the kernel reads only the first half.

    x may have any row and head stride (the head dim must be contiguous); cos/sin rows must be contiguous.
    """
    rows, num_heads, dim = x.shape
    rotary = dim if rotary_dim is None else rotary_dim
    assert x.stride(2) == 1, "the head dim must be contiguous"
    assert isinstance(rotary, int) and 2 <= rotary <= dim and rotary % 2 == 0, \
        f"rotary dim {rotary} must be even and in 2..{dim} (head dim {dim})"
    assert cos.shape == sin.shape and cos.dim() == 2 and cos.shape[1] == rotary, (cos.shape, sin.shape, rotary)
    assert cos.stride(1) == sin.stride(1) == 1 and cos.stride(0) == sin.stride(0), (cos.stride(), sin.stride())
    assert rows == cos.shape[0] * rows_per_position, (rows, cos.shape, rows_per_position)
    assert x.device == cos.device == sin.device and cos.dtype == sin.dtype, (x.device, cos.device, cos.dtype)
    if rows == 0:
        return x
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if x.device.type != "cuda" and not interpret:
        raise RuntimeError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is first imported")
    block_h = triton.next_power_of_2(num_heads)
    block_half = triton.next_power_of_2(rotary // 2)
    # ~4K elements per program on the GPU; the interpreter pays per program, so it takes many rows at once.
    block_r = 64 if interpret else max(1, 4096 // (block_h * block_half))
    _rope_kernel[(triton.cdiv(rows, block_r),)](
        x_ptr=x, cos_ptr=cos, sin_ptr=sin, stride_xr=x.stride(0), stride_xh=x.stride(1), stride_cp=cos.stride(0),
        num_rows=rows, num_heads=num_heads, rows_per_position=rows_per_position, HALF=rotary // 2,
        BLOCK_HALF=block_half, BLOCK_R=block_r, BLOCK_H=block_h, ROUND_BF16=x.dtype == torch.bfloat16,
        ROUND_FP16=x.dtype == torch.float16, num_warps=4)
    return x


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rows_per_position: int,
                   rotary_dim: int | None = None) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for K (partial rotary too), in torch: the rotated copy of x (rows, H, D)."""
    rotary = x.shape[-1] if rotary_dim is None else rotary_dim
    cos = cos.repeat_interleave(rows_per_position, dim=0)[:, None, :]  # (rows, 1, R)
    sin = sin.repeat_interleave(rows_per_position, dim=0)[:, None, :]
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    half = rotary // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)
