"""A streaming read of a large buffer: the device's achievable read bandwidth, the ceiling a decode step works under.

A decode step reads (weights + K/V) and writes almost nothing, so its roofline is bytes over the *read* bandwidth,
which on an H200 is above what a device-to-device copy moves per direction and above what torch's own reductions
reach (a bf16 torch.sum reads 4.0-4.2 TB/s). A persistent grid walks the buffer block by block and keeps an fp32
sum so that no load can be dropped; each program writes one partial. The block's address is a scalar 64-bit
pointer stepped once per iteration, so the compiler still knows each block is one contiguous run and issues 16-byte
loads (an int64 offset vector carried through the loop hid that: 3.65 TB/s on an H200). The bench sweeps programs
per SM, block and warps (bench/timing.py `triton_read_gb_s`) and keeps the fastest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stream_read_kernel(src_ptr, out_ptr, num_elements, EVEN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    first = tl.cast(pid, tl.int64) * BLOCK
    step = tl.cast(tl.num_programs(0), tl.int64) * BLOCK
    iters = tl.cdiv(tl.maximum(num_elements - first, 0), step)
    ptr = src_ptr + first
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for it in range(0, iters):
        if EVEN:
            acc += tl.load(ptr + lanes).to(tl.float32)
        else:
            left = num_elements - (first + tl.cast(it, tl.int64) * step)
            acc += tl.load(ptr + lanes, mask=lanes < left, other=0.0).to(tl.float32)
        ptr += step
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def stream_read(src: torch.Tensor, *, programs: int, block: int = 4096, num_warps: int = 4) -> torch.Tensor:
    """Read all of src (contiguous) once -> (programs,) fp32 partial sums (their total is src's sum)."""
    assert src.is_contiguous() and src.dim() == 1, (src.shape, src.stride())
    assert src.dtype in (torch.float32, torch.float16, torch.bfloat16), src.dtype
    assert programs >= 1 and block >= 16 and block & (block - 1) == 0, (programs, block)
    assert num_warps in (1, 2, 4, 8, 16), num_warps
    assert src.numel() < 2**62, src.numel()
    out = torch.empty(programs, dtype=torch.float32, device=src.device)
    num_elements = src.numel()
    even = num_elements % (programs * block) == 0
    _stream_read_kernel[(programs,)](src_ptr=src, out_ptr=out, num_elements=num_elements, EVEN=even, BLOCK=block,
                                     num_warps=num_warps)
    return out


def stream_read_reference(src: torch.Tensor) -> torch.Tensor:
    """The sum the partials add up to."""
    return src.float().sum()
