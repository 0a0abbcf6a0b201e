"""Residual add + RMSNorm in one pass: what runs between a decoder layer's blocks.

A decode step reads the new residual `r + x` once, writes it once, and writes the normed activations once: one
launch where transformers' LlamaRMSNorm takes ~6 (the add, the casts, pow, mean, rsqrt, two muls) and a
read-modify-write pass each. Rounding follows transformers exactly, in the input dtype:

    Llama/Mistral/Qwen:  s = dtype(r + x);  y = w * dtype(fp32(s) * rsqrt(mean(fp32(s)^2) + eps))
    Gemma (UNIT_OFFSET): s = dtype(r + x);  y = dtype(fp32(s) * rsqrt(mean(fp32(s)^2) + eps) * (1 + fp32(w)))

(Gemma multiplies by the weight before its one rounding, Llama after; transformers PR 29402.) Only the sum of
squares is ordered differently from torch's reduction, so fp32 results agree to a few ulps and 16-bit results
mostly bit for bit, else by one ulp (tests/test_rms_norm.py). One program per row, the whole row in registers:
rows are at most 32K wide.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl as _pdl
from kernels.rounding import round_to

MAX_HIDDEN = 32768


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, sum_ptr, out_ptr, stride_x, stride_r, stride_s, stride_o, num_cols,
                         eps, HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    _pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    dtype = out_ptr.dtype.element_ty
    s = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = round_to(s, dtype)  # the residual stream is kept in the model's dtype: round the sum as torch's add does
        tl.store(sum_ptr + row * stride_s + cols, s, mask=mask)
        s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(s * s, axis=0) / num_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if UNIT_OFFSET:
        y = s * rstd * (1.0 + w.to(tl.float32))
    else:
        y = round_to(s * rstd, dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, round_to(y, dtype), mask=mask)


def _interpreting() -> bool:
    # triton.jit picks the interpreter when this module is imported, from TRITON_INTERPRET at that time.
    return not isinstance(_add_rms_norm_kernel, triton.runtime.jit.JITFunction)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    assert t.dim() >= 1 and t.stride(-1) == 1, f"{name}: the last dim must be contiguous, got strides {t.stride()}"
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise AssertionError(f"{name}: leading dims {tuple(t.shape[:-1])} with strides {t.stride()[:-1]} do not "
                             "collapse into rows of one stride") from None


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, *, eps: float,
                 unit_offset: bool = False, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n) [+ residual (..., n)] -> (s = residual + x, rms_norm(s) * weight), both new tensors of x's shape.

    residual None: s is x itself (no copy) and only the norm is computed. unit_offset: Gemma's (1 + weight).
    pdl: launch with programmatic dependent launch where the device allows (kernels/pdl.py).
    """
    n = x.shape[-1]
    assert weight.shape == (n,) and weight.stride(0) == 1, (weight.shape, weight.stride(), n)
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), x.dtype
    assert weight.dtype == x.dtype and weight.device == x.device, (x.dtype, weight.dtype, x.device, weight.device)
    assert 1 <= n <= MAX_HIDDEN, f"rows of {n} (1..{MAX_HIDDEN})"
    x2 = _rows(x, "x")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual is None:
        total, r2, s2 = x, x2, x2
    else:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device, \
            (residual.shape, residual.dtype, x.shape, x.dtype)
        r2 = _rows(residual, "residual")
        total = torch.empty_like(out)
        s2 = total.view(-1, n)
    if x2.shape[0] == 0:
        return total, out
    block = triton.next_power_of_2(n)
    pdl = pdl and _pdl.usable(x.device, interpreting=_interpreting())
    _add_rms_norm_kernel[(x2.shape[0],)](
        x_ptr=x2, res_ptr=r2, w_ptr=weight, sum_ptr=s2, out_ptr=out, stride_x=x2.stride(0), stride_r=r2.stride(0),
        stride_s=s2.stride(0), stride_o=n, num_cols=n, eps=eps, HAS_RESIDUAL=residual is not None,
        UNIT_OFFSET=unit_offset, BLOCK=block, PDL=pdl, num_warps=max(1, min(16, block // 512)),
        **({"launch_pdl": True} if pdl else {}))
    return total, out


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, *, eps: float,
                           unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `residual + hidden` then LlamaRMSNorm (GemmaRMSNorm with unit_offset), in torch."""
    total = x if residual is None else residual + x
    h = total.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return total, (h * (1.0 + weight.float())).to(x.dtype)
    return total, weight * h.to(x.dtype)
