"""fp32 -> the tensor's dtype with round-to-nearest-even, the same on the GPU and in the interpreter.

The GPU's bf16 conversion rounds to nearest even; the interpreter's truncates, so a kernel that casts with `.to`
would be tested against different arithmetic than it runs. `round_to` rounds the bits itself for bf16 (four integer
ops, nothing next to a memory-bound kernel's loads) and casts plainly otherwise (fp16 rounds correctly in both).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x -> dtype, nearest even; NaN stays NaN, overflow goes to inf."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, rounded).to(tl.bfloat16)
    else:
        return x.to(dtype)
