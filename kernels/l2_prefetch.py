"""Bulk L2 prefetch (`cp.async.bulk.prefetch.L2`, sm_90): ask the memory system for bytes a kernel will read soon.

A hint, not a load: nothing lands in registers or shared memory, so it can be issued before a kernel may read
anything (before a programmatic-dependent-launch wait, kernels/pdl.py) and it never changes a result. L2 is the
GPU's point of coherence, so a prefetched line a predecessor writes afterwards is updated in L2, never left stale.
Each request is `num_bytes` contiguous bytes from a 16-byte aligned address, a multiple of 16 (0: skipped). Inline
PTX for sm_90 and newer: the interpreter cannot run it and ptxas refuses it for older GPUs, so callers gate it behind
a constexpr that is off there (kernels/decode_plan.py `capability_refusal`; the skinny GEMM's needs PDL, sm_90 too).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def prefetch_l2_one(ptr, num_bytes):
    """One lane of the CTA (thread 0) prefetches `num_bytes` bytes from the scalar pointer `ptr`."""
    tl.inline_asm_elementwise(
        asm="""{
        .reg .pred p, q;
        .reg .u32 t;
        mov.u32 t, %tid.x;
        setp.eq.u32 p, t, 0;
        setp.ne.u32 q, $2, 0;
        and.pred p, p, q;
        @p cp.async.bulk.prefetch.L2.global [$1], $2;
        mov.u32 $0, 0;
        }""",
        constraints="=r,l,r", args=[ptr, num_bytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_l2_each(ptrs, num_bytes):
    """Every element of the pointer tensor `ptrs` prefetches its own `num_bytes` (an int32 tensor of the same shape):
    one request per row of a tile whose rows are not contiguous. Elements that more than one thread holds are
    requested more than once, which costs an issue slot and no bandwidth (the second request finds the line
    in flight)."""
    tl.inline_asm_elementwise(
        asm="""{
        .reg .pred p;
        setp.ne.u32 p, $2, 0;
        @p cp.async.bulk.prefetch.L2.global [$1], $2;
        mov.u32 $0, 0;
        }""",
        constraints="=r,l,r", args=[ptrs, num_bytes], dtype=tl.int32, is_pure=False, pack=1)

