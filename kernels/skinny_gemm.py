"""y = x @ W^T (+ bias) for a few rows of x (M <= 64): a decode step's projections, read at the memory roofline.

At decode shapes a GEMM is a pass over its weight: 2 N K bytes, M K N FMAs that tensor cores do in no time.
What it needs is enough bytes in flight on every SM (Little's law: ~4.5 TB/s x ~1 us ~ 4.5 MB across the chip)
and no second pass. cuBLAS leaves a lone 4096 x 4096 at 1.1-1.35 TB/s on an H200 (too few CTAs for 33.5 MB);
here the weight is cut into BLOCK_N rows x (K / split_k) columns, one program each, split_k chosen so that every SM
holds ~2 programs, and each program streams its (BLOCK_N, BLOCK_K) tiles through a `num_stages`-deep cp.async
pipeline (16-byte loads along K, each weight byte read once; x, M x K, is re-read from L2 by every column block:
M / BLOCK_N of the weight traffic, so BLOCK_N grows with M).

Split-K partial sums (fp32, M x N per split) go to a workspace; the last program of a column block to finish (an
acq_rel ticket per block, reset by that program) adds them and runs the epilogue, so the launch is one kernel with
no memset and no reduction kernel: one CUDA-graph node. Epilogues: bias; or, over a fused [gate | up] weight (GATED), the
gated MLP's act(gate) * up, written as (M, N) with N the intermediate size (kernels/gated_act.py's rounding).
Rounding: fp32 accumulation, one rounding of acc + bias, as cuBLAS; the gated epilogue rounds gate and up first as
transformers' two separate projections do.

`weights_ahead` (with PDL only): each program first asks L2 for its first weight tiles, before it waits for the
previous kernel, since the weight is not that kernel's output. Measured on an H200
(bench/results/decode_weights_ahead.md, 2026-12-01) it slowed every decode case, more the deeper (B8 P2048: 5.96 ms
with PDL alone, 6.12 / 6.37 / 6.83 at 2 / 4 / 8 tiles), so it stays off: a program becomes resident as soon as its
predecessor's last program has started, up to a whole GEMM early, and the predecessor's stream likely evicts much of
what it asked for (not yet measured).

`skinny_gemm_residual` and `FoldedNorm` (engine/fast fold_norm): a block's residual add in the epilogue of the GEMM
before it, and the following RMSNorm split across both GEMMs, so the add + norm needs no launch of its own. The
epilogue also writes h * w (the sum h scaled by the norm's weight, rounded once) and each row's sum of squares of h
per column block; the GEMM after it multiplies h * w by its weight like any input and scales each row of the result
by rstd in its epilogue, since rms_norm(h) W^T = rstd (h * w) W^T. Its main loop is the plain kernel's. A first
version normed every x tile in the main loop (rstd from the sums before the loop): measured on an H200
(bench/results/decode_fold_norm.md, 2026-12-02) it made q/k/v and gate/up 0.6 ms a step slower, more than the norm
launches it saved; the norm weight's and x's loads there feed elementwise math, not the dot, so the software pipeline
does not run them ahead and each K tile waits for an L2 round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import pdl as _pdl
from kernels.gated_act import ACTIVATIONS, gated
from kernels.l2_prefetch import prefetch_l2_each
from kernels.rounding import round_to

MAX_ROWS = 64
TICKETS = 1 << 16  # column blocks a launch may have (N / BLOCK_N)


@dataclass(frozen=True)
class SkinnyConfig:
    """One launch shape. split_k: K ranges per column block (1: no fixup)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4

    def as_dict(self) -> dict:
        return {"block_m": self.block_m, "block_n": self.block_n, "block_k": self.block_k, "split_k": self.split_k,
                "num_warps": self.num_warps, "num_stages": self.num_stages}


@triton.jit
def _dot(x, w, acc, DOT_FP32: tl.constexpr):
    """acc + x @ w^T; w is a (BLOCK_N, BLOCK_K) weight tile, K contiguous."""
    if DOT_FP32:
        return tl.dot(x, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, part_ptr, ticket_ptr, M, N, K, stride_xm, stride_wn,
                        stride_ym, k_per_split, split_k, up_offset, split_stride, HAS_BIAS: tl.constexpr,
                        ACT: tl.constexpr, GATED: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PDL: tl.constexpr,
                        AHEAD_TILES: tl.constexpr, res_ptr, stride_rm, ssq_ptr, ssq_cols, nw_ptr, scaled_ptr, eps,
                        RESIDUAL: tl.constexpr, NORM_IN: tl.constexpr, UNIT_OFFSET: tl.constexpr,
                        BLOCK_SSQ: tl.constexpr):
    # RESIDUAL: y = dtype(residual + dtype(x W^T + b)); each row's sum of squares of y over this program's BLOCK_N
    # columns into ssq (M, ssq_cols) fp32 at column pid_n; and scaled = dtype(y * nw) (Gemma: y * (1 + nw)), (M, N),
    # for the next GEMM. NORM_IN: x is such a `scaled` and ssq (M, ssq_cols) its sums of squares: the epilogue
    # multiplies each row's x W^T by rstd = 1 / sqrt(mean(y^2) + eps) before the bias.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    k_start = pid_k * k_per_split
    if AHEAD_TILES > 0:
        # The weight is not the previous kernel's output: ask L2 for this program's first tiles of it while that
        # kernel is still running (one request per weight row; bytes rounded down to whole 16-byte units).
        element_bytes = w_ptr.dtype.element_ty.primitive_bitwidth // 8
        ahead_end = tl.minimum(k_start + tl.minimum(AHEAD_TILES * BLOCK_K, k_per_split), K)  # within its own split
        ahead_bytes = (ahead_end - k_start) * element_bytes
        ahead_bytes = tl.where(n_ok, tl.maximum(ahead_bytes, 0) // 16 * 16, 0)
        rows = w_ptr + offs_n.to(tl.int64) * stride_wn + k_start
        prefetch_l2_each(rows, ahead_bytes)
        if GATED:
            prefetch_l2_each(rows + up_offset, ahead_bytes)
    _pdl.enter(PDL)  # before any load or store: x is the previous kernel's output
    if NORM_IN:
        # issued here, used after the main loop: the L2 round trip overlaps the weight stream
        offs_s = tl.arange(0, BLOCK_SSQ)
        parts_ssq = tl.load(ssq_ptr + offs_m[:, None] * ssq_cols + offs_s[None, :],
                            mask=m_ok[:, None] & (offs_s < ssq_cols)[None, :], other=0.0)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_start + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.minimum(k_start + k_per_split, K)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:  # whole tiles: masks constant along K, so the loads stay 16 bytes wide
            x_mask, w_mask = m_ok[:, None], n_ok[:, None]
        else:
            k_ok = (k + offs_k) < k_end
            x_mask, w_mask = m_ok[:, None] & k_ok[None, :], n_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if DOT_FP32:  # fp32 models (no tf32), and the interpreter, whose dot multiplies bf16's raw bits
            x = x.to(tl.float32)
        acc = _dot(x, w, acc, DOT_FP32)
        if GATED:
            w_up = tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0)  # the up rows follow the gate rows
            acc_up = _dot(x, w_up, acc_up, DOT_FP32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_mask = m_ok[:, None] & n_ok[None, :]
    last = True
    if SPLIT:
        # Workspace (split_k, M, N or 2 N) fp32: this program's partial sums; GATED: gate at [0, N), up at [N, 2 N).
        tile = offs_m[:, None].to(tl.int64) * (2 * N if GATED else N) + offs_n[None, :]
        tl.store(part_ptr + pid_k.to(tl.int64) * split_stride + tile, acc, mask=out_mask)
        if GATED:
            tl.store(part_ptr + pid_k.to(tl.int64) * split_stride + tile + N, acc_up, mask=out_mask)
        tl.debug_barrier()  # every thread's partials are written before the ticket releases them
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        last = ticket == split_k - 1
        if last:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            parts = part_ptr + tile  # split s at parts + s * split_stride: a pointer walk, 64-bit throughout
            for _ in range(0, split_k):
                acc += tl.load(parts, mask=out_mask, other=0.0, cache_modifier=".cg")  # L2: other SMs wrote it
                if GATED:
                    acc_up += tl.load(parts + N, mask=out_mask, other=0.0, cache_modifier=".cg")
                parts += split_stride
            tl.store(ticket_ptr + pid_n, 0)  # ready for the next launch
    if last:
        dtype = y_ptr.dtype.element_ty
        if NORM_IN:
            # rstd per row from the partial sums, summed in one fixed order (deterministic run to run; the one-pass
            # norm kernel sums the row in another order, so rstd may differ from it in its last fp32 bit)
            rstd = 1.0 / tl.sqrt_rn(tl.sum(parts_ssq, axis=1) / K + eps)
            acc = acc * rstd[:, None]
            if GATED:
                acc_up = acc_up * rstd[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_up += tl.load(bias_ptr + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            gate = round_to(acc, dtype).to(tl.float32)
            up = round_to(acc_up, dtype).to(tl.float32)
            acc = gated(gate, up, ACT, dtype)
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        if RESIDUAL:
            r = tl.load(res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :], mask=out_mask, other=0.0)
            total = round_to(round_to(acc, dtype).to(tl.float32) + r.to(tl.float32), dtype)  # as torch's r + out
            tl.store(y_ptrs, total, mask=out_mask)
            squares = tl.where(out_mask, total.to(tl.float32) * total.to(tl.float32), 0.0)
            tl.store(ssq_ptr + offs_m * ssq_cols + pid_n, tl.sum(squares, axis=1), mask=m_ok)
            norm_w = tl.load(nw_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if UNIT_OFFSET:
                norm_w += 1.0
            scaled = round_to(total.to(tl.float32) * norm_w[None, :], dtype)  # one rounding of h * w
            tl.store(scaled_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], scaled, mask=out_mask)
        else:
            tl.store(y_ptrs, round_to(acc, dtype), mask=out_mask)


def _interpreting() -> bool:
    # triton.jit picks the interpreter when this module is imported, from TRITON_INTERPRET at that time.
    return not isinstance(_skinny_gemm_kernel, triton.runtime.jit.JITFunction)


_TICKETS: dict[torch.device, torch.Tensor] = {}


def tickets(device: torch.device) -> torch.Tensor:
    """The per-device ticket counters (zeros between launches: each launch's last programs reset theirs).

    Allocated on first use, which must not be inside a CUDA-graph capture (warm up first). Launches that share
    them must be ordered (one stream): the engine runs its GEMMs on the compute stream."""
    device = torch.device(device)
    if device not in _TICKETS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny_gemm's ticket counters are allocated on first use: run it once before "
                               "capturing a CUDA graph")
        _TICKETS[device] = torch.zeros(TICKETS, dtype=torch.int32, device=device)
    return _TICKETS[device]


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # plan as for an H100/H200 where there is no GPU (the interpreter runs any grid)


def default_config(num_rows: int, out_features: int, in_features: int, *, gated: bool, device: torch.device,
                   dtype_bytes: int = 2) -> SkinnyConfig:
    """The launch shape used when no measured choice exists (engine/fast/plan.py measures and caches them).

    BLOCK_N keeps x's L2 re-reads at <= 1/4 of the weight's bytes (<= 1/2 at M = 64); split_k makes ~2 programs per
    SM with at least 4 K tiles each, so the cp.async pipeline has something to overlap."""
    block_m = 16 if num_rows <= 16 else 32 if num_rows <= 32 else 64
    # weight rows per program: block_n (gated: 2 block_n, gate and up)
    block_n = (32 if num_rows <= 16 else 64) if gated else 32 if num_rows <= 8 else 64 if num_rows <= 16 else 128
    block_k = 128 if block_m <= 32 else 64
    if dtype_bytes == 4:
        block_k //= 2
    col_blocks = triton.cdiv(out_features, block_n)
    k_tiles = triton.cdiv(in_features, block_k)
    split_k = max(1, min(triton.cdiv(2 * num_sms(device), col_blocks), k_tiles // 4, 16))
    return SkinnyConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k)


def weights_ahead_refusal(weight: torch.Tensor, tiles: int, *, pdl: bool) -> str | None:
    """Why a launch cannot prefetch `tiles` weight tiles ahead (None: it can). The prefetch is issued before the
    PDL wait, to overlap the previous kernel; without PDL it would only repeat the pipeline's own first loads."""
    if tiles <= 0:
        return "no tiles asked"
    if not pdl:
        return "launched without PDL: nothing runs before the first loads for a prefetch to overlap"
    element_bytes = weight.element_size()
    if weight.data_ptr() % 16 or (weight.stride(0) * element_bytes) % 16:
        return "weight rows are not 16-byte aligned, a bulk prefetch needs aligned rows"
    return None


@dataclass(frozen=True)
class FoldedNorm:
    """An RMSNorm of rows h (M, K) left for the next GEMM, as `skinny_gemm_residual` wrote it: scaled = h * w rounded
    to h's dtype (Gemma: h * (1 + w)), which that GEMM takes as its x, and h's sums of squares per column block
    (M, blocks) fp32, from which its epilogue scales each row by rstd."""

    scaled: torch.Tensor
    sum_squares: torch.Tensor
    eps: float


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, act: str = "",
                config: SkinnyConfig | None = None, pdl: bool = False, weights_ahead: int = 0,
                norm: FoldedNorm | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T (+ bias (N,)) -> (M, N), M <= 64. act "silu"/"gelu_tanh": weight is a fused
    [gate; up] (2 I, K) (bias (2 I,)) and the result is act(x W_gate^T + b_gate) * (x W_up^T + b_up), (M, I).
    pdl: launch with programmatic dependent launch where the device allows (kernels/pdl.py). weights_ahead: with
    PDL, each program first prefetches this many of its weight tiles into L2, before it waits for the previous
    kernel (`weights_ahead_refusal` says when it cannot); the result is the same either way. norm: x is
    `norm.scaled`, and the GEMM computes rms_norm(h) @ W^T as rstd * (x W^T) (+ bias, act), rstd from the sums of
    squares. Against the norm kernel followed by the GEMM, the GEMM's input is rounded once (h * w) where that path
    rounds twice (h * rstd, then * w), and rstd is summed in another order."""
    return _launch(x, weight, bias, act=act, config=config, pdl=pdl, weights_ahead=weights_ahead, norm=norm)[0]


def skinny_gemm_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, *,
                         norm_weight: torch.Tensor, eps: float, unit_offset: bool = False,
                         config: SkinnyConfig | None = None, pdl: bool = False,
                         weights_ahead: int = 0) -> tuple[torch.Tensor, FoldedNorm]:
    """-> (h = residual + x W^T (+ b), each rounded as the model's separate projection and add are, (M, N); the
    FoldedNorm of RMSNorm(norm_weight, eps) over h): the residual add of a block's end in the GEMM's epilogue, and
    what the next GEMM needs to take rms_norm(h) as its input without a norm kernel of its own."""
    assert norm_weight.shape == (weight.shape[0],) and norm_weight.stride(0) == 1 and norm_weight.dtype == x.dtype, \
        (norm_weight.shape, norm_weight.dtype, weight.shape)
    total, ssq, scaled = _launch(x, weight, bias, act="", config=config, pdl=pdl, weights_ahead=weights_ahead,
                                 residual=residual, residual_norm=(norm_weight, unit_offset))
    return total, FoldedNorm(scaled, ssq, eps=float(eps))


def _launch(x, weight, bias, *, act: str, config: SkinnyConfig | None, pdl: bool, weights_ahead: int,
            residual: torch.Tensor | None = None, residual_norm: tuple | None = None, norm: FoldedNorm | None = None):
    assert isinstance(weights_ahead, int) and weights_ahead >= 0, \
        f"weights_ahead must be an int >= 0, got {weights_ahead!r}"
    assert x.dim() == 2 and weight.dim() == 2, (x.shape, weight.shape)
    num_rows, in_features = x.shape
    assert 1 <= num_rows <= MAX_ROWS, f"skinny_gemm takes 1..{MAX_ROWS} rows, got {num_rows}"
    assert weight.shape[1] == in_features, (x.shape, weight.shape)
    assert x.stride(1) == 1 and weight.stride(1) == 1, f"K must be contiguous: x {x.stride()}, weight {weight.stride()}"
    assert x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16, torch.float32), \
        (x.dtype, weight.dtype)
    assert x.device == weight.device, (x.device, weight.device)
    assert act == "" or act in ACTIVATIONS, f"act {act!r}: '' or one of {ACTIVATIONS}"
    out_features = weight.shape[0] // 2 if act else weight.shape[0]
    assert not act or weight.shape[0] % 2 == 0, f"a fused [gate; up] weight has an even row count, got {weight.shape}"
    assert bias is None or (bias.shape == (weight.shape[0],) and bias.stride(0) == 1 and bias.dtype == x.dtype), \
        (None if bias is None else (bias.shape, bias.dtype), weight.shape)
    config = config or default_config(num_rows, out_features, in_features, gated=bool(act), device=x.device,
                                      dtype_bytes=x.element_size())
    assert num_rows <= config.block_m, (num_rows, config)
    y = torch.empty(num_rows, out_features, dtype=x.dtype, device=x.device)
    col_blocks = triton.cdiv(out_features, config.block_n)
    assert col_blocks <= TICKETS, f"{out_features} columns need {col_blocks} blocks of {config.block_n} (> {TICKETS})"
    ssq, ssq_cols, norm_weight, scaled, eps, unit_offset = y, 0, y, None, 0.0, False
    if residual is not None:
        assert residual.shape == y.shape and residual.dtype == x.dtype and residual.device == x.device \
            and residual.stride(1) == 1, (residual.shape, residual.dtype, residual.stride(), y.shape)
        ssq = torch.empty(num_rows, col_blocks, dtype=torch.float32, device=x.device)
        scaled = torch.empty_like(y)
        ssq_cols = col_blocks
        norm_weight, unit_offset = residual_norm
    if norm is not None:
        assert residual is None, "a GEMM takes a folded norm on its input or makes one for its output, not both"
        sums = norm.sum_squares
        assert sums.dim() == 2 and sums.shape[0] == num_rows and sums.dtype == torch.float32 and sums.is_contiguous() \
            and sums.device == x.device, (sums.shape, sums.dtype, x.shape)
        assert x.shape == norm.scaled.shape, f"x is the folded norm's scaled rows: {tuple(x.shape)} vs " \
            f"{tuple(norm.scaled.shape)}"
        ssq, ssq_cols, eps = sums, sums.shape[1], float(norm.eps)
    # K per split: whole BLOCK_K tiles, so only the last split's last tile is ragged.
    k_per_split = triton.cdiv(triton.cdiv(in_features, config.split_k), config.block_k) * config.block_k
    split_k = triton.cdiv(in_features, k_per_split)
    split = split_k > 1
    pdl = pdl and _pdl.usable(x.device, interpreting=_interpreting())
    ahead = weights_ahead if weights_ahead_refusal(weight, weights_ahead, pdl=pdl) is None else 0
    part = torch.empty(split_k, num_rows, (2 if act else 1) * out_features, dtype=torch.float32, device=x.device) \
        if split else y
    _skinny_gemm_kernel[(col_blocks, split_k)](
        x_ptr=x, w_ptr=weight, bias_ptr=weight if bias is None else bias, y_ptr=y, part_ptr=part,
        ticket_ptr=tickets(x.device) if split else y, M=num_rows, N=out_features, K=in_features,
        stride_xm=x.stride(0), stride_wn=weight.stride(0), stride_ym=y.stride(0), k_per_split=k_per_split,
        split_k=split_k, up_offset=out_features * weight.stride(0), split_stride=part[0].numel() if split else 0,
        HAS_BIAS=bias is not None, ACT=act, GATED=bool(act), SPLIT=split, EVEN_K=in_features % config.block_k == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT_FP32=x.dtype == torch.float32 or _interpreting(), PDL=pdl, AHEAD_TILES=ahead,
        res_ptr=y if residual is None else residual, stride_rm=0 if residual is None else residual.stride(0),
        ssq_ptr=ssq, ssq_cols=ssq_cols, nw_ptr=norm_weight, scaled_ptr=y if scaled is None else scaled, eps=eps,
        RESIDUAL=residual is not None, NORM_IN=norm is not None, UNIT_OFFSET=unit_offset,
        BLOCK_SSQ=triton.next_power_of_2(max(1, ssq_cols)) if norm is not None else 1,
        num_warps=config.num_warps, num_stages=config.num_stages, **({"launch_pdl": True} if pdl else {}))
    return y, ssq, scaled


def skinny_gemm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                          act: str = "") -> torch.Tensor:
    """What the plain model computes: F.linear (fp32 accumulation, one rounding), and for a fused [gate; up] weight
    act(gate) * up over the two projections, each rounded first."""
    if not act:
        return torch.nn.functional.linear(x, weight, bias)
    gate_w, up_w = weight.chunk(2)
    gate_b, up_b = (None, None) if bias is None else bias.chunk(2)
    gate = torch.nn.functional.linear(x, gate_w, gate_b)
    up = torch.nn.functional.linear(x, up_w, up_b)
    if act == "silu":
        return torch.nn.functional.silu(gate) * up
    return torch.nn.functional.gelu(gate, approximate="tanh") * up
