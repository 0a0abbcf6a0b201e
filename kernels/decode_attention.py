"""Split-KV (flash-decoding) attention for one query token per sequence, with optional L2 prefetch.

Layout (the engine's): q (B, Hq, D); k_cache, v_cache (B, Hkv, S_max, D) with D contiguous;
seq_lens int32 (B,), each in 1..S_max. Query head h reads KV head h // (Hq // Hkv).

One program handles one (sequence, KV head, split): the Hq/Hkv query heads that share a KV head are
packed as the rows of a small matrix, so each K/V tile is read from memory once. Splits are merged
by log-sum-exp in a second small kernel (skipped when there is one split). `PREFETCH` adds one
`cp.async.bulk.prefetch.L2` per K and V tile `DISTANCE` tiles ahead, issued by one thread; `auto`
gates it by programs per SM (DESIGN.md). Measured here, the kernel's own 3-stage cp.async pipeline
already requests the next 2 tiles, so a prefetch 1-2 tiles ahead mostly races it (ncu: L2 hits rise,
demand reads still miss) and moved times from 7 % slower to 1.5 % faster; it gained 10-30 % only on
an unpipelined variant. Decisions are pure Python (`choose_launch`) and testable on CPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from kernels.config import MAX_SPLITS, DecodeAttentionConfig

# Measured on an H100 (bench/results/decode_attention*.md) unless said otherwise.
# auto: prefetch only on grids with fewer programs per SM than this. With the 3-stage cp.async pipeline,
# prefetch tied or lost (0-5 % at d=1, up to 7 % at d=2) on every bench shape, 0.97 to 7.8 programs/SM
# (decode_attention.md, 2026-11-25); the streaming read of DESIGN.md gained 48 % only at 1 CTA/SM without
# a pipeline. What is left for it: grids that leave most SMs idle (short, small batches), where one
# program's pipeline is all that is in flight. That regime is not in the bench.
AUTO_PREFETCH_MAX_PROGRAMS_PER_SM = 0.5
# About one program per SM was fastest with the 3-stage pipeline (B1 Hkv8 S32768: 0.053 ms at 0.97/SM,
# 0.057 ms at 3.9/SM); keep >= MIN_TILES_PER_SPLIT tiles in a split so the pipeline fills.
TARGET_PROGRAMS_PER_SM = 1.0
MIN_TILES_PER_SPLIT = 4
# 32 KiB tiles (BLOCK_N 128 at D=128, 16-bit) leave room for one program per SM but keep twice the bytes
# in flight: 6 % faster on grids of 7.8 waves of them (B64/B128 GQA); the 3-wave floor is a guess that
# keeps the last wave's tail small.
BIG_TILE_MIN_WAVES = 3.0
_CPU_NUM_SMS = 8  # stand-in SM count for the interpreter, so CPU plans are deterministic


@dataclass(frozen=True)
class LaunchPlan:
    """How one call is launched; no tensors. `why` says how prefetch and the splits were decided."""

    num_splits: int
    tiles_per_split: int
    block_n: int
    num_warps: int
    num_stages: int
    prefetch: bool
    prefetch_distance: int
    num_programs: int  # grid size of the split kernel
    programs_per_sm: float
    why: str


def choose_launch(batch: int, num_kv_heads: int, max_seq_len: int, head_dim: int, num_sms: int,
                  config: DecodeAttentionConfig = DecodeAttentionConfig(), *, element_bytes: int = 2,
                  interpret: bool = False) -> LaunchPlan:
    """Plan splits, tile size and prefetch for a (batch, KV heads, S_max, D) decode step on `num_sms` SMs.

    `element_bytes` is the cache's element size (2 for bf16/fp16, 4 for fp32); `interpret` forces
    prefetch off (the interpreter cannot run inline PTX).
    """
    for name, value in (("batch", batch), ("num_kv_heads", num_kv_heads), ("max_seq_len", max_seq_len), ("num_sms", num_sms)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if element_bytes not in (2, 4):
        raise ValueError(f"element_bytes must be 2 or 4, got {element_bytes!r}")
    if head_dim not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128, got {head_dim!r}")
    if not isinstance(config, DecodeAttentionConfig):
        raise ValueError(f"config must be a DecodeAttentionConfig, got {type(config).__name__}")
    rows = batch * num_kv_heads
    if config.block_n is not None:
        block_n = config.block_n
    elif head_dim == 128 and element_bytes == 2 and rows >= BIG_TILE_MIN_WAVES * num_sms:
        block_n = 128
    else:
        block_n = 64 if head_dim == 128 else 128  # 16 KiB tiles at 16-bit
    tile_bytes = block_n * head_dim * element_bytes
    num_stages = 3 if tile_bytes <= 32 * 1024 else 2  # K and V tiles in flight must fit in shared memory
    num_tiles = triton.cdiv(max_seq_len, block_n)
    if config.num_splits is not None:
        wanted, split_why = config.num_splits, f"{config.num_splits} splits asked"
    else:
        wanted = min(max(1, int(TARGET_PROGRAMS_PER_SM * num_sms // rows)), max(1, num_tiles // MIN_TILES_PER_SPLIT))
        split_why = f"{rows} (seq, KV head) rows on {num_sms} SMs, aim {TARGET_PROGRAMS_PER_SM:g} program/SM"
    tiles_per_split = triton.cdiv(num_tiles, max(1, min(wanted, num_tiles, MAX_SPLITS)))
    num_splits = triton.cdiv(num_tiles, tiles_per_split)  # no split is empty at S_max
    num_programs = rows * num_splits
    per_sm = num_programs / num_sms
    if interpret:
        prefetch, why = False, "prefetch off: TRITON_INTERPRET cannot run inline PTX"
    elif config.prefetch == "off":
        prefetch, why = False, "prefetch off (asked)"
    elif config.prefetch == "on":
        prefetch, why = True, f"prefetch on (asked), {per_sm:.2f} programs/SM"
    else:
        prefetch = per_sm < AUTO_PREFETCH_MAX_PROGRAMS_PER_SM
        why = (f"auto: {per_sm:.2f} programs/SM {'<' if prefetch else '>='} {AUTO_PREFETCH_MAX_PROGRAMS_PER_SM:g}"
               f" -> prefetch {'on' if prefetch else 'off'}")
    return LaunchPlan(num_splits=num_splits, tiles_per_split=tiles_per_split, block_n=block_n, num_warps=4,
                      num_stages=num_stages, prefetch=prefetch, prefetch_distance=config.prefetch_distance,
                      num_programs=num_programs, programs_per_sm=per_sm,
                      why=f"{why}; {num_splits} splits x {tiles_per_split} tiles of {block_n} ({split_why})")


@triton.jit
def _prefetch_l2(ptr, num_bytes):
    # One lane of the CTA issues a bulk L2 prefetch of `num_bytes` contiguous bytes (skipped when 0).
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
def _kernel(q_ptr, k_ptr, v_ptr, seq_lens_ptr, o_ptr, lse_ptr, qk_scale,
            stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_ob, stride_oh, stride_os, num_kv_heads, tiles_per_split,
            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
            SPLIT: tl.constexpr, PREFETCH: tl.constexpr, DISTANCE: tl.constexpr, DOT_FP32: tl.constexpr):
    # grid (num_splits, B * Hkv). Writes (B, Hq, num_splits, D) fp32 partials + log2-domain LSE when
    # SPLIT, else the normalised output straight into o_ptr (B, Hq, D).
    split = tl.program_id(0)
    b = tl.program_id(1) // num_kv_heads
    kv_head = tl.program_id(1) % num_kv_heads
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + offs_m  # (BLOCK_M,) query heads of this KV head (rows >= GROUP are padding)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=offs_m[:, None] < GROUP, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    ROW_BYTES = HEAD_DIM * (k_ptr.dtype.element_ty.primitive_bitwidth // 8)
    if PREFETCH:
        for j in tl.static_range(1, DISTANCE):  # tiles the loop's first iterations would not prefetch
            rows = tl.minimum(tl.maximum(end - (start + j * BLOCK_N), 0), BLOCK_N)
            _prefetch_l2(k_base + (start + j * BLOCK_N) * stride_kn, rows * ROW_BYTES)
            _prefetch_l2(v_base + (start + j * BLOCK_N) * stride_vn, rows * ROW_BYTES)
    for n0 in range(start, end, BLOCK_N):
        if PREFETCH:
            ahead = n0 + DISTANCE * BLOCK_N
            rows = tl.minimum(tl.maximum(end - ahead, 0), BLOCK_N)
            _prefetch_l2(k_base + ahead * stride_kn, rows * ROW_BYTES)
            _prefetch_l2(v_base + ahead * stride_vn, rows * ROW_BYTES)
        keys = n0 + offs_n
        valid = keys < end
        k = tl.load(k_base + keys[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        if DOT_FP32:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
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
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty split (past seq_len) leaves 0 and LSE -inf
    row_mask = offs_m[:, None] < GROUP
    if SPLIT:
        o_rows = o_ptr + b.to(tl.int64) * stride_ob + head[:, None] * stride_oh + split * stride_os
        tl.store(o_rows + offs_d[None, :], out, mask=row_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + (b * num_kv_heads * GROUP + head) * tl.num_programs(0) + split, lse, mask=offs_m < GROUP)
    else:
        o_rows = o_ptr + b.to(tl.int64) * stride_ob + head[:, None] * stride_oh
        tl.store(o_rows + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, out_ptr, num_heads, num_splits, stride_pb, stride_ph, stride_ps,
                  stride_ob, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr):
    # grid (B * Hq,): out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max), CHUNK splits at a time
    row = tl.program_id(0)
    b = row // num_heads
    h = row % num_heads
    offs_all = tl.arange(0, BLOCK_S)
    lse_max = tl.max(tl.load(lse_ptr + row * num_splits + offs_all, mask=offs_all < num_splits, other=float("-inf")), axis=0)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    denom = 0.0
    for s0 in range(0, num_splits, CHUNK):
        offs_s = s0 + tl.arange(0, CHUNK)
        w = tl.exp2(tl.load(lse_ptr + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf")) - lse_max)
        parts = tl.load(part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                        mask=offs_s[:, None] < num_splits, other=0.0)
        acc += tl.sum(parts * w[:, None], axis=0)
        denom += tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, (acc / denom).to(out_ptr.dtype.element_ty))


def _interpreting() -> bool:
    # triton.jit picks the interpreter when this module is imported, from TRITON_INTERPRET at that time.
    return not isinstance(_kernel, JITFunction)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, *,
                     sm_scale: float | None = None, config: DecodeAttentionConfig = DecodeAttentionConfig(),
                     out: torch.Tensor | None = None, plan: LaunchPlan | None = None) -> torch.Tensor:
    """softmax(q k^T * sm_scale) v over keys [0, seq_lens[b]) of each sequence; returns (B, Hq, D) in q's dtype.

    No host syncs and no data-dependent allocation, so it can be captured in a CUDA graph. `plan`
    overrides `choose_launch` (benches use it to sweep); the interpreter always runs without prefetch.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, max_seq_len = k_cache.shape[1], k_cache.shape[2]
    assert k_cache.shape == v_cache.shape == (batch, num_kv_heads, max_seq_len, head_dim), (q.shape, k_cache.shape, v_cache.shape)
    assert num_heads % num_kv_heads == 0, f"Hq={num_heads} is not a multiple of Hkv={num_kv_heads}"
    assert q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in (torch.bfloat16, torch.float16, torch.float32), (q.dtype, k_cache.dtype, v_cache.dtype)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "the head dim must be contiguous"
    assert seq_lens.shape == (batch,) and seq_lens.dtype == torch.int32 and seq_lens.device == q.device, (seq_lens.shape, seq_lens.dtype, seq_lens.device)
    assert q.device == k_cache.device == v_cache.device, (q.device, k_cache.device, v_cache.device)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1 and out.device == q.device, (out.shape, out.dtype, out.stride())
    interpret = _interpreting()
    if q.device.type != "cuda" and not interpret:
        raise RuntimeError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is first imported")
    if plan is None:
        plan = choose_launch(batch, num_kv_heads, max_seq_len, head_dim, _num_sms(q.device), config,
                             element_bytes=q.element_size(), interpret=interpret)
    # A bulk prefetch needs one contiguous, 16-byte aligned run of rows; anything else runs without it.
    prefetch = plan.prefetch and not interpret and k_cache.stride(2) == v_cache.stride(2) == head_dim \
        and k_cache.data_ptr() % 16 == 0 and v_cache.data_ptr() % 16 == 0
    group = num_heads // num_kv_heads
    # Query heads of a KV head as the M rows of tensor-core dots, padded to 16. Even for MHA this cut times
    # by 24-42 % against a broadcast-multiply-sum: tl.dot operands ride the cp.async shared-memory pipeline.
    block_m = max(16, triton.next_power_of_2(group))
    split = plan.num_splits > 1
    if split:
        partial = torch.empty((batch, num_heads, plan.num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, num_heads, plan.num_splits), dtype=torch.float32, device=q.device)
    else:
        partial, lse = out, out  # the kernel writes the output directly; lse_ptr unused
    o_strides = (partial.stride(0), partial.stride(1), partial.stride(2) if split else 0)
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    _kernel[(plan.num_splits, batch * num_kv_heads)](
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, seq_lens_ptr=seq_lens, o_ptr=partial, lse_ptr=lse,
        qk_scale=scale * math.log2(math.e),
        stride_qb=q.stride(0), stride_qh=q.stride(1),
        stride_kb=k_cache.stride(0), stride_kh=k_cache.stride(1), stride_kn=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vh=v_cache.stride(1), stride_vn=v_cache.stride(2),
        stride_ob=o_strides[0], stride_oh=o_strides[1], stride_os=o_strides[2],
        num_kv_heads=num_kv_heads, tiles_per_split=plan.tiles_per_split,
        GROUP=group, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_N=plan.block_n,
        SPLIT=split, PREFETCH=prefetch, DISTANCE=plan.prefetch_distance,
        # fp32 dots for fp32 inputs, and under the interpreter (its bf16 tl.dot is wrong in triton 3.9)
        DOT_FP32=q.dtype == torch.float32 or interpret,
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    if split:
        _merge_kernel[(batch * num_heads,)](
            part_ptr=partial, lse_ptr=lse, out_ptr=out, num_heads=num_heads, num_splits=plan.num_splits,
            stride_pb=partial.stride(0), stride_ph=partial.stride(1), stride_ps=partial.stride(2),
            stride_ob=out.stride(0), stride_oh=out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(plan.num_splits),
            CHUNK=min(32, triton.next_power_of_2(plan.num_splits)), num_warps=4)
    return out


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, *,
                               sm_scale: float | None = None) -> torch.Tensor:
    """Plain torch in fp32, one sequence at a time (syncs on seq_lens; for tests and benches)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    out = torch.empty_like(q)
    for b in range(batch):
        n = int(seq_lens[b])
        qg = q[b].float().view(num_kv_heads, num_heads // num_kv_heads, head_dim)  # (Hkv, group, D)
        k, v = k_cache[b, :, :n].float(), v_cache[b, :, :n].float()  # (Hkv, n, D)
        probs = torch.softmax(torch.einsum("kgd,knd->kgn", qg, k) * scale, dim=-1)
        out[b] = torch.einsum("kgn,knd->kgd", probs, v).reshape(num_heads, head_dim).to(q.dtype)
    return out
