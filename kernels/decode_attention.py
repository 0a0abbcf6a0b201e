"""Split-KV (flash-decoding) attention for one query token per sequence over K/V segments, with optional L2 prefetch.

Layout (the engine's): q (B, Hq, D); each segment (kernels/segments.py) k, v (B, Hkv, S, D) views with D contiguous
and any other strides, slot j holding the token at position start + j; seq_lens int32 (B,). Sequence b's query
(position seq_lens[b] - 1) sees position p iff p < seq_lens[b] and, with a window W, p >= seq_lens[b] - W. Query
head h reads KV head h // (Hq // Hkv). Any head dim 1..256: tiles are padded to a power of two >= 16, masked.

One program handles one (sequence, KV head, split) of one segment: the Hq/Hkv query heads that share a KV head are
packed as the rows of a small matrix, so each K/V tile is read from memory once. Every segment's splits write
one partial/LSE buffer, merged by log-sum-exp in a second small kernel (skipped for one segment in one split), or,
with merge="in-kernel", by each (sequence, KV head) row's last program to finish (an acq_rel ticket per row, reset
by that program: one launch per segment, no merge kernel). merge="auto", the default, merges in the kernel where a
row has at most IN_KERNEL_MERGE_MAX_SPLITS splits (measured faster there) and by launch above. A split that sees no
key (the sequence ends before it, or the window starts after it) leaves LSE -inf: weight 0.
Every element offset is 64-bit: a staged segment's key rows are B*2*Hkv*D elements apart, so key * stride
passes 2^31 at B*S ~ 262K tokens of a 7B model.

`PREFETCH` adds one `cp.async.bulk.prefetch.L2` per K and V tile `DISTANCE` tiles ahead, issued by one thread; it
needs an sm_90 or newer GPU and contiguous, 16-byte aligned key rows, so older GPUs and segments with strided rows
run without it (the plan says why). Tiles and pipeline depth fit the device's shared memory per program
(`shared_memory_per_block`: 227 KiB on Hopper, less on an A100 or an L4). `auto` gates it by
programs per SM (DESIGN.md). Measured here, the kernel's own 3-stage cp.async pipeline already requests the next
2 tiles, so a prefetch 1-2 tiles ahead mostly races it (ncu: L2 hits rise, demand reads still miss) and moved
times from 7 % slower to 1.5 % faster; it gained 10-30 % only on an unpipelined variant. Decisions are pure
Python (kernels/decode_plan.py's `choose_launch`, and `plan_segments` here) and testable on CPU; where the device
has a measured tuning table (kernels/tuning.py, written by bench/suites/decode_attention_study.py), it decides
`auto` prefetch and an unset pipeline depth for the shape classes it measured.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from kernels.config import MAX_HEAD_DIM, MAX_SPLITS, DecodeAttentionConfig  # noqa: F401 - re-exported
# The planner, re-exported: benches and tests import it from here, and plan_segments calls choose_launch through
# this module's namespace (bench/suites/reliability.py patches it here to launch impossible tiles).
from kernels.decode_plan import (  # noqa: F401
    AUTO_PREFETCH_MAX_PROGRAMS_PER_SM,
    BIG_TILE_MIN_WAVES,
    HOPPER_SHARED_MEMORY_BYTES,
    MIN_TILES_PER_SPLIT,
    TARGET_PROGRAMS_PER_SM,
    LaunchPlan,
    Variant,
    block_d_for,
    choose_launch,
    prefetch_refusal,
    shared_memory_estimate,
    variant_grid,
)
from kernels.l2_prefetch import prefetch_l2_one as _prefetch_l2
from kernels.segments import KVSegment, visible_keys
from kernels.tuning import TuningTable, device_table, dtype_name

_CPU_NUM_SMS = 8  # stand-in SM count for the interpreter, so CPU plans are deterministic
_LOG2E = math.log2(math.e)


def plan_segments(segments: Sequence[KVSegment], *, window: int | None = None,
                  config: DecodeAttentionConfig = DecodeAttentionConfig(), num_sms: int | None = None,
                  interpret: bool | None = None,
                  tuning: TuningTable | Literal["device"] | None = "device",
                  shared_memory_bytes: int | None = None) -> tuple[LaunchPlan, ...]:
    """One plan per segment that holds slots, in order (`segment` is its index): how decode_attention_segments
    launches them. Pure Python over shapes and strides (no device work, no sync). `num_sms` None: the segments'
    device's; `interpret` None: whether this process runs the Triton interpreter; `tuning`: the measured table
    ("device": the one written for this device, if any; None: the rules only); `shared_memory_bytes` None: what one
    program may take on the segments' device (`shared_memory_per_block`)."""
    if not segments:
        raise ValueError("decode attention needs at least one K/V segment")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or a positive int, got {window!r}")
    device = segments[0].k.device
    interpret = _interpreting() if interpret is None else interpret
    num_sms = sm_count(device) if num_sms is None else num_sms
    table = device_table(device) if tuning == "device" else tuning
    plans = []
    for index, seg in enumerate(segments):
        batch, num_kv_heads, num_slots, head_dim = seg.k.shape
        if num_slots == 0:
            continue
        keys = num_slots if window is None else min(num_slots, window)  # the most keys one sequence sees here
        where = f"segment {index} (slots {seg.start}..{seg.end - 1}, {keys} keys planned"
        tuned = None
        if table is not None:
            shape_class, tuned = table.lookup(batch * num_kv_heads, keys, head_dim, dtype_name(seg.k.dtype))
            where += f"; class {shape_class} {'tuned' if tuned else 'not in the tuning table'}"
        plan = choose_launch(batch, num_kv_heads, keys, head_dim, num_sms, config,
                             element_bytes=seg.k.element_size(), interpret=interpret,
                             prefetch_refused=prefetch_refusal(seg.k, seg.v), tuned=tuned,
                             shared_memory_bytes=shared_memory_bytes or shared_memory_per_block(device))
        plans.append(dataclasses.replace(plan, segment=index, why=f"{where}): {plan.why}"))
    if not plans:
        raise ValueError("every K/V segment is empty: decode attention has no key to read")
    return tuple(plans)


@triton.jit
def _tanh(x):
    # tanh from exp2, odd-symmetric so exp2 never overflows (triton has no tanh the interpreter also runs)
    t = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _kernel(q_ptr, k_ptr, v_ptr, seq_lens_ptr, o_ptr, lse_ptr, qk_scale, softcap_log2,
            stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_ob, stride_oh, stride_os, stride_lb, stride_lh, split_offset, key_start, num_slots, window,
            num_kv_heads, tiles_per_split, ticket_ptr, final_ptr, stride_fb, stride_fh, total_splits,
            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PREFETCH: tl.constexpr, DISTANCE: tl.constexpr,
            DOT_FP32: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, MERGE_IN_KERNEL: tl.constexpr):
    # grid (num_splits, B * Hkv) over one segment. Writes fp32 partials (B, Hq, splits of all segments, D) at
    # column split_offset + split and their log2-domain LSE when SPLIT, else the normalised output into o_ptr.
    # Scores are in the log2 domain: qk_scale = sm_scale * log2(e), or sm_scale / softcap with SOFTCAP
    # (then s = softcap * tanh(q.k * sm_scale / softcap), times log2(e) = softcap_log2 * tanh(...)).
    # MERGE_IN_KERNEL: each program takes a ticket of its (seq, KV head) row once its partials are written; the one
    # that draws the last of total_splits (over every segment's launch) merges the row into final_ptr and resets it.
    split = tl.program_id(0)
    b = tl.program_id(1) // num_kv_heads
    kv_head = tl.program_id(1) % num_kv_heads
    seq_len = tl.load(seq_lens_ptr + b)
    # This sequence's visible slots of the segment are [lo, hi); split s reads its tiles_per_split tiles from lo.
    hi = tl.minimum(seq_len - key_start, num_slots)
    if WINDOW:
        lo = tl.maximum(seq_len - window - key_start, 0)
    else:
        lo = 0
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, hi)
    b64 = tl.cast(b, tl.int64)
    kv64 = tl.cast(kv_head, tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < GROUP
    head = kv64 * GROUP + offs_m  # (BLOCK_M,) int64 query heads of this KV head (rows >= GROUP are padding)
    q = tl.load(q_ptr + b64 * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b64 * stride_kb + kv64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + kv64 * stride_vh
    k_tile = offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :]  # (BLOCK_N, BLOCK_D) offsets in a tile
    v_tile = offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ROW_BYTES = HEAD_DIM * (k_ptr.dtype.element_ty.primitive_bitwidth // 8)
    if PREFETCH:
        for j in tl.static_range(1, DISTANCE):  # tiles the loop's first iterations would not prefetch
            rows = tl.minimum(tl.maximum(end - (start + j * BLOCK_N), 0), BLOCK_N)
            _prefetch_l2(k_base + tl.cast(start + j * BLOCK_N, tl.int64) * stride_kn, rows * ROW_BYTES)
            _prefetch_l2(v_base + tl.cast(start + j * BLOCK_N, tl.int64) * stride_vn, rows * ROW_BYTES)
    for n0 in range(start, end, BLOCK_N):
        n64 = tl.cast(n0, tl.int64)
        if PREFETCH:
            ahead = n0 + DISTANCE * BLOCK_N
            rows = tl.minimum(tl.maximum(end - ahead, 0), BLOCK_N)
            _prefetch_l2(k_base + tl.cast(ahead, tl.int64) * stride_kn, rows * ROW_BYTES)
            _prefetch_l2(v_base + tl.cast(ahead, tl.int64) * stride_vn, rows * ROW_BYTES)
        valid = n0 + offs_n < end
        kv_mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_base + n64 * stride_kn + k_tile, mask=kv_mask, other=0.0)
        v = tl.load(v_base + n64 * stride_vn + v_tile, mask=kv_mask, other=0.0)
        if DOT_FP32:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            qk = _tanh(qk * qk_scale) * softcap_log2
        else:
            qk = qk * qk_scale
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_FP32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a split with no visible key leaves 0 and LSE -inf
    o_mask = m_ok[:, None] & d_ok[None, :]
    if SPLIT:
        column = tl.cast(split_offset + split, tl.int64)
        o_rows = o_ptr + b64 * stride_ob + head[:, None] * stride_oh + column * stride_os
        tl.store(o_rows + offs_d[None, :], out, mask=o_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b64 * stride_lb + head * stride_lh + column, lse, mask=m_ok)
        if MERGE_IN_KERNEL:
            tl.debug_barrier()  # every thread's partials are written before the ticket releases them
            ticket = tl.atomic_add(ticket_ptr + tl.program_id(1), 1, sem="acq_rel", scope="gpu")
            if ticket == total_splits - 1:
                # the online log-sum-exp over the row's splits: the same sum as _merge_kernel's, in one pass
                lse_rows = lse_ptr + b64 * stride_lb + head * stride_lh
                part_rows = o_ptr + b64 * stride_ob + head[:, None] * stride_oh + offs_d[None, :]
                m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
                den = tl.zeros([BLOCK_M], tl.float32)
                merged = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                for s in range(0, total_splits):
                    s64 = tl.cast(s, tl.int64)
                    # .cg: other SMs wrote these; L1 is not coherent with them, L2 is
                    lse_s = tl.load(lse_rows + s64, mask=m_ok, other=float("-inf"), cache_modifier=".cg")
                    part = tl.load(part_rows + s64 * stride_os, mask=o_mask, other=0.0, cache_modifier=".cg")
                    m_new = tl.maximum(m_run, lse_s)
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split seen yet: weights stay 0
                    rescale = tl.exp2(m_run - m_safe)
                    w = tl.exp2(lse_s - m_safe)
                    merged = merged * rescale[:, None] + part * w[:, None]
                    den = den * rescale + w
                    m_run = m_new
                merged = merged / tl.where(den > 0, den, 1.0)[:, None]  # a row with no visible key gives 0
                f_rows = final_ptr + b64 * stride_fb + head[:, None] * stride_fh
                tl.store(f_rows + offs_d[None, :], merged.to(final_ptr.dtype.element_ty), mask=o_mask)
                tl.store(ticket_ptr + tl.program_id(1), 0)  # ready for the next call
    else:
        o_rows = o_ptr + b64 * stride_ob + head[:, None] * stride_oh
        tl.store(o_rows + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, out_ptr, num_heads, num_splits, stride_pb, stride_ph, stride_ps,
                  stride_lb, stride_lh, stride_ob, stride_oh,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr):
    # grid (B * Hq,): out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max) over every split of every
    # segment, CHUNK splits at a time; splits with LSE -inf weigh 0 (a row with none visible gives 0)
    row = tl.program_id(0)
    b = tl.cast(row // num_heads, tl.int64)
    h = tl.cast(row % num_heads, tl.int64)
    lse_row = lse_ptr + b * stride_lb + h * stride_lh
    part_row = part_ptr + b * stride_pb + h * stride_ph
    offs_all = tl.arange(0, BLOCK_S)
    lse_max = tl.max(tl.load(lse_row + offs_all, mask=offs_all < num_splits, other=float("-inf")), axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_D], tl.float32)
    denom = 0.0
    for s0 in range(0, num_splits, CHUNK):
        offs_s = s0 + tl.arange(0, CHUNK)
        s_ok = offs_s < num_splits
        w = tl.exp2(tl.load(lse_row + offs_s, mask=s_ok, other=float("-inf")) - lse_max)
        parts = tl.load(part_row + offs_s.to(tl.int64)[:, None] * stride_ps + offs_d[None, :],
                        mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(parts * w[:, None], axis=0)
        denom += tl.sum(w, axis=0)
    out = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _interpreting() -> bool:
    # triton.jit picks the interpreter when this module is imported, from TRITON_INTERPRET at that time.
    return not isinstance(_kernel, JITFunction)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The device's SM count (the interpreter: a fixed stand-in, so CPU plans are deterministic)."""
    if device.type != "cuda":
        return _CPU_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def shared_memory_per_block(device: torch.device) -> int:
    """The most shared memory one program may take on `device` (the opt-in limit Triton launches against: 227 KiB on
    an H100/H200, 163 KiB on an A100, 99 KiB on an L4 or RTX 4090); Hopper's figure for the interpreter."""
    if device.type != "cuda":
        return HOPPER_SHARED_MEMORY_BYTES
    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def _check_inputs(q: torch.Tensor, segments: Sequence[KVSegment], seq_lens: torch.Tensor, out: torch.Tensor | None,
                  window: int | None, softcap: float | None) -> None:
    batch, num_heads, head_dim = q.shape
    assert q.dtype in (torch.bfloat16, torch.float16, torch.float32) and q.stride(2) == 1, (q.dtype, q.stride())
    assert 1 <= head_dim <= MAX_HEAD_DIM, f"head dim {head_dim} is outside 1..{MAX_HEAD_DIM}"
    assert len(segments) >= 1, "decode attention needs at least one K/V segment"
    for seg in segments:
        b, num_kv_heads, _, d = seg.k.shape
        assert (b, d) == (batch, head_dim) and num_heads % num_kv_heads == 0, (q.shape, seg.k.shape)
        assert num_kv_heads == segments[0].k.shape[1], "every segment must hold the same KV heads"
        assert seg.k.dtype == seg.v.dtype == q.dtype, (q.dtype, seg.k.dtype, seg.v.dtype)
        assert seg.k.stride(3) == 1 and seg.v.stride(3) == 1, "the head dim must be contiguous"
        assert seg.k.device == seg.v.device == q.device, (q.device, seg.k.device, seg.v.device)
    assert seq_lens.shape == (batch,) and seq_lens.dtype == torch.int32 and seq_lens.device == q.device, (seq_lens.shape, seq_lens.dtype, seq_lens.device)
    if out is not None:
        assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1 and out.device == q.device, (out.shape, out.dtype, out.stride())
    assert window is None or (isinstance(window, int) and not isinstance(window, bool) and window >= 1), window
    assert softcap is None or softcap > 0, softcap
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is first imported")


MERGES = ("auto", "launch", "in-kernel")
# "auto" merges inside the split kernel up to this many splits per row, by launch above. Measured on an H200
# (bench/results/decode_attention_sweep.md, 2026-12-01): at 4 splits the in-kernel merge saved 2.4-3.0 us of a
# 40 us call (B1 Hq32 Hkv32 S8192, B4 Hq40 Hkv8 S8192); at 16 splits it saved nothing (B1 Hq32 Hkv8 S32768),
# since the last program reads the row's splits one after another while the merge kernel reads them in parallel.
IN_KERNEL_MERGE_MAX_SPLITS = 8
MERGE_TICKET_ROWS = 1 << 16  # (seq, KV head) rows the in-kernel merge's counters cover; more rows merge by launch
_MERGE_TICKETS: dict[torch.device, torch.Tensor] = {}


def merge_tickets(device: torch.device, rows: int) -> torch.Tensor | None:
    """The per-device ticket counters of the in-kernel merge (zeros between calls: each row's merging program resets
    its own), or None where that merge cannot run: more rows than the counters, or first use inside a CUDA-graph
    capture (allocated outside one, they are captured like any buffer). Calls that share them must be ordered (one
    stream), as the engine's attention calls are."""
    if rows > MERGE_TICKET_ROWS:
        return None
    tickets = _MERGE_TICKETS.get(device)
    if tickets is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        tickets = _MERGE_TICKETS[device] = torch.zeros(MERGE_TICKET_ROWS, dtype=torch.int32, device=device)
    return tickets


def chosen_merge(merge: str, total_splits: int) -> str:
    """The merge a call runs: "launch" or "in-kernel" as asked, "auto" by the row's split count."""
    assert merge in MERGES, f"merge must be one of {MERGES}, got {merge!r}"
    if merge != "auto":
        return merge
    return "in-kernel" if total_splits <= IN_KERNEL_MERGE_MAX_SPLITS else "launch"


def _launch(q: torch.Tensor, segments: Sequence[KVSegment], plans: Sequence[LaunchPlan], seq_lens: torch.Tensor, *,
            sm_scale: float | None, window: int | None, softcap: float | None, out: torch.Tensor,
            merge: str = "auto") -> torch.Tensor:
    """Every plan's split kernel into one partial/LSE buffer, then one merge (none for one plan of one split): a
    second kernel ("launch"), or the last program of each row inside the split kernel ("in-kernel", where
    merge_tickets allows; else by launch). Allocations depend on shapes and plans only, never on data: capturable
    in a CUDA graph."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = segments[plans[0].segment].k.shape[1]
    interpret = _interpreting()
    group = num_heads // num_kv_heads
    # Query heads of a KV head as the M rows of tensor-core dots, padded to 16. Even for MHA this cut times
    # by 24-42 % against a broadcast-multiply-sum: tl.dot operands ride the cp.async shared-memory pipeline.
    block_m = max(16, triton.next_power_of_2(group))
    block_d = block_d_for(head_dim)
    total_splits = sum(plan.num_splits for plan in plans)
    split = len(plans) > 1 or total_splits > 1
    if split:
        partial = torch.empty((batch, num_heads, total_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, num_heads, total_splits), dtype=torch.float32, device=q.device)
        o_strides = (partial.stride(0), partial.stride(1), partial.stride(2))
    else:
        partial, lse = out, out  # the kernel writes the output directly; lse_ptr unused
        o_strides = (out.stride(0), out.stride(1), 0)
    merge = chosen_merge(merge, total_splits)
    tickets = merge_tickets(q.device, batch * num_kv_heads) if split and merge == "in-kernel" else None
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    try:
        _launch_splits(q, segments, plans, seq_lens, partial, lse, o_strides, tickets, out, split=split, scale=scale,
                       softcap=softcap, window=window, total_splits=total_splits, num_kv_heads=num_kv_heads,
                       group=group, block_m=block_m, block_d=block_d, interpret=interpret)
    except BaseException:
        # A launch refused after an earlier segment's programs took tickets would leave counts behind, and the next
        # call would merge too early: clear them (not inside a capture, where nothing ran).
        if tickets is not None and not (q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            tickets.zero_()
        raise
    if split and tickets is None:
        _merge_kernel[(batch * num_heads,)](
            part_ptr=partial, lse_ptr=lse, out_ptr=out, num_heads=num_heads, num_splits=total_splits,
            stride_pb=partial.stride(0), stride_ph=partial.stride(1), stride_ps=partial.stride(2),
            stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_ob=out.stride(0), stride_oh=out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(total_splits),
            CHUNK=min(32, triton.next_power_of_2(total_splits)), num_warps=4)
    return out


def _launch_splits(q, segments, plans, seq_lens, partial, lse, o_strides, tickets, out, *, split: bool, scale: float,
                   softcap: float | None, window: int | None, total_splits: int, num_kv_heads: int, group: int,
                   block_m: int, block_d: int, interpret: bool) -> None:
    """One split-kernel launch per plan (segment), each writing its splits' columns of the partial/LSE buffer."""
    batch, _, head_dim = q.shape
    split_offset = 0
    for plan in plans:
        seg = segments[plan.segment]
        k, v = seg.k, seg.v
        # A bulk prefetch needs one contiguous, 16-byte aligned run of rows (plans from benches may ask anyway).
        prefetch = plan.prefetch and not interpret and prefetch_refusal(k, v) is None
        _kernel[(plan.num_splits, batch * num_kv_heads)](
            q_ptr=q, k_ptr=k, v_ptr=v, seq_lens_ptr=seq_lens, o_ptr=partial, lse_ptr=lse,
            qk_scale=scale * _LOG2E if softcap is None else scale / softcap,
            softcap_log2=0.0 if softcap is None else softcap * _LOG2E,
            stride_qb=q.stride(0), stride_qh=q.stride(1),
            stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
            stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
            stride_ob=o_strides[0], stride_oh=o_strides[1], stride_os=o_strides[2],
            stride_lb=lse.stride(0) if split else 0, stride_lh=lse.stride(1) if split else 0,
            split_offset=split_offset, key_start=seg.start, num_slots=seg.num_slots,
            window=0 if window is None else window, num_kv_heads=num_kv_heads, tiles_per_split=plan.tiles_per_split,
            ticket_ptr=seq_lens if tickets is None else tickets, final_ptr=out, stride_fb=out.stride(0),
            stride_fh=out.stride(1), total_splits=total_splits, MERGE_IN_KERNEL=tickets is not None,
            GROUP=group, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=plan.block_n,
            SPLIT=split, PREFETCH=prefetch, DISTANCE=plan.prefetch_distance,
            # fp32 dots for fp32 inputs, and under the interpreter (its bf16 tl.dot is wrong in triton 3.9)
            DOT_FP32=q.dtype == torch.float32 or interpret, SOFTCAP=softcap is not None, WINDOW=window is not None,
            num_warps=plan.num_warps, num_stages=plan.num_stages)
        split_offset += plan.num_splits


def decode_attention_segments(q: torch.Tensor, segments: Sequence[KVSegment], seq_lens: torch.Tensor, *,
                              sm_scale: float | None = None, window: int | None = None, softcap: float | None = None,
                              config: DecodeAttentionConfig = DecodeAttentionConfig(),
                              out: torch.Tensor | None = None, merge: str = "auto") -> torch.Tensor:
    """Attention of each sequence's newest token over the visible keys of every segment -> (B, Hq, D), q's dtype.

    Scores s = q.k * sm_scale (default D^-0.5), soft-capped to softcap * tanh(s / softcap) when `softcap` is set;
    keys visible as kernels.segments.visible_keys says. One split-kernel launch per segment with slots (its own
    key start and splits, `plan_segments`), one merge over all of them. No host syncs and no data-dependent
    allocation, so it can be captured in a CUDA graph; the interpreter always runs without prefetch. merge: how the
    splits are merged (`_launch`): "auto" (in the split kernel up to IN_KERNEL_MERGE_MAX_SPLITS splits per row, by a
    second launch above), "launch" or "in-kernel"."""
    _check_inputs(q, segments, seq_lens, out, window, softcap)
    plans = plan_segments(segments, window=window, config=config, num_sms=sm_count(q.device))
    out = torch.empty_like(q) if out is None else out
    return _launch(q, segments, plans, seq_lens, sm_scale=sm_scale, window=window, softcap=softcap, out=out,
                   merge=merge)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, *,
                     sm_scale: float | None = None, window: int | None = None, softcap: float | None = None,
                     config: DecodeAttentionConfig = DecodeAttentionConfig(), out: torch.Tensor | None = None,
                     plan: LaunchPlan | None = None, merge: str = "auto") -> torch.Tensor:
    """decode_attention_segments over one segment at slot 0: k_cache, v_cache (B, Hkv, S_max, D), seq_lens each in
    1..S_max. `plan` overrides the planner (benches use it to sweep)."""
    batch, num_heads, head_dim = q.shape
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[0] == batch and k_cache.shape[3] == head_dim, (q.shape, k_cache.shape, v_cache.shape)
    segments = [KVSegment(k_cache, v_cache, 0)]
    _check_inputs(q, segments, seq_lens, out, window, softcap)
    if plan is None:
        plans = plan_segments(segments, window=window, config=config, num_sms=sm_count(q.device))
    else:
        plans = (dataclasses.replace(plan, segment=0),)
    out = torch.empty_like(q) if out is None else out
    return _launch(q, segments, plans, seq_lens, sm_scale=sm_scale, window=window, softcap=softcap, out=out,
                   merge=merge)


def decode_attention_segments_reference(q: torch.Tensor, segments: Sequence[KVSegment], seq_lens: torch.Tensor, *,
                                        sm_scale: float | None = None, window: int | None = None,
                                        softcap: float | None = None) -> torch.Tensor:
    """Plain torch, one sequence at a time over its visible keys of all segments, in fp32 (float64 for float64 q);
    syncs on seq_lens: for tests and benches. Returns q's dtype."""
    batch, num_heads, head_dim = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    out = torch.empty_like(q)
    for b in range(batch):
        seen = [visible_keys(seq_lens[b : b + 1], seg, window=window)[0].to(seg.k.device) for seg in segments]
        k = torch.cat([seg.k[b][:, mask].to(dtype) for seg, mask in zip(segments, seen)], dim=1)  # (Hkv, n, D)
        v = torch.cat([seg.v[b][:, mask].to(dtype) for seg, mask in zip(segments, seen)], dim=1)
        qg = q[b].to(dtype).view(k.shape[0], num_heads // k.shape[0], head_dim)  # (Hkv, group, D)
        scores = torch.einsum("kgd,knd->kgn", qg, k) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        out[b] = torch.einsum("kgn,knd->kgd", torch.softmax(scores, dim=-1), v).reshape(num_heads, head_dim).to(q.dtype)
    return out


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, *,
                               sm_scale: float | None = None, window: int | None = None,
                               softcap: float | None = None) -> torch.Tensor:
    """decode_attention_segments_reference over one segment at slot 0 (the cache of decode_attention)."""
    return decode_attention_segments_reference(q, [KVSegment(k_cache, v_cache, 0)], seq_lens, sm_scale=sm_scale,
                                               window=window, softcap=softcap)
