"""A streaming read of a large buffer: the device's achievable read bandwidth, the ceiling a decode step works under.

A decode step reads (weights + K/V) and writes almost nothing, so its roofline is bytes over the *read* bandwidth,
which on an H200 is above what a device-to-device copy moves per direction and above what torch's own reductions
reach (a bf16 torch.sum reads 3.99 TB/s; this kernel, 8 programs per SM over 4096-element blocks, 4.56 on the same
card: DESIGN.md). A persistent grid walks the buffer block by block, 16-byte loads, and keeps an fp32 sum so that no
load can be dropped; each program writes one partial.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stream_read_kernel(src_ptr, out_ptr, num_elements, EVEN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    idx = tl.arange(0, BLOCK).to(tl.int64) + pid * BLOCK  # 64-bit: a 4 GiB bf16 buffer has 2^31 elements
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(pid * BLOCK, num_elements, step):
        if EVEN:
            acc += tl.load(src_ptr + idx).to(tl.float32)
        else:
            acc += tl.load(src_ptr + idx, mask=idx < num_elements, other=0.0).to(tl.float32)
        idx += step
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def stream_read(src: torch.Tensor, *, programs: int, block: int = 4096) -> torch.Tensor:
    """Read all of src (contiguous) once -> (programs,) fp32 partial sums (their total is src's sum)."""
    assert src.is_contiguous() and src.dim() == 1, (src.shape, src.stride())
    assert src.dtype in (torch.float32, torch.float16, torch.bfloat16), src.dtype
    assert programs >= 1 and block >= 16 and block & (block - 1) == 0, (programs, block)
    assert src.numel() < 2**62, src.numel()
    out = torch.empty(programs, dtype=torch.float32, device=src.device)
    num_elements = src.numel()
    even = num_elements % (programs * block) == 0
    _stream_read_kernel[(programs,)](src_ptr=src, out_ptr=out, num_elements=num_elements, EVEN=even, BLOCK=block,
                                     num_warps=4)
    return out


def stream_read_reference(src: torch.Tensor) -> torch.Tensor:
    """The sum the partials add up to."""
    return src.float().sum()
