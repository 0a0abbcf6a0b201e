"""Residual add + LayerNorm in one pass (OPT's norms), the LayerNorm sibling of kernels/rms_norm.py.

    s = dtype(r + x);  y = dtype((fp32(s) - mean) * rsqrt(var + eps) * fp32(w) + fp32(b))

as torch's layer_norm computes it for 16-bit inputs (fp32 statistics, one rounding at the end). The variance is
taken about the mean from the row in registers (two passes over registers, one over memory). One program per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.rounding import round_to

from kernels import pdl as _pdl
from kernels.rms_norm import MAX_HIDDEN, _interpreting, _rows


@triton.jit
def _add_layer_norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, out_ptr, stride_x, stride_r, stride_s, stride_o,
                           num_cols, eps, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                           PDL: tl.constexpr):
    _pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    dtype = out_ptr.dtype.element_ty
    s = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = round_to(s, dtype)
        tl.store(sum_ptr + row * stride_s + cols, s, mask=mask)
        s = s.to(tl.float32)
    mean = tl.sum(s, axis=0) / num_cols
    centred = tl.where(mask, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(centred * centred, axis=0) / num_cols + eps)
    y = centred * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, round_to(y, dtype), mask=mask)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                   *, eps: float, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n) [+ residual] -> (s = residual + x, layer_norm(s) * weight + bias), new tensors of x's shape
    (residual None: s is x itself). pdl: as kernels/rms_norm.py's."""
    n = x.shape[-1]
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), x.dtype
    assert weight is not None, "LayerNorm without a weight: pass ones"
    for name, t in (("weight", weight), ("bias", bias)):
        assert t is None or (t.shape == (n,) and t.stride(0) == 1 and t.dtype == x.dtype and t.device == x.device), \
            (name, None if t is None else (t.shape, t.dtype, t.device), n, x.dtype)
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
    _add_layer_norm_kernel[(x2.shape[0],)](
        x_ptr=x2, res_ptr=r2, w_ptr=weight, b_ptr=weight if bias is None else bias, sum_ptr=s2, out_ptr=out,
        stride_x=x2.stride(0), stride_r=r2.stride(0), stride_s=s2.stride(0), stride_o=n, num_cols=n, eps=eps,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BLOCK=block, PDL=pdl,
        num_warps=max(1, min(16, block // 512)), **({"launch_pdl": True} if pdl else {}))
    return total, out


def add_layer_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                             bias: torch.Tensor | None, *, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual + hidden` then torch's layer_norm, as OPT's decoder layer runs them."""
    total = x if residual is None else residual + x
    return total, torch.nn.functional.layer_norm(total, (x.shape[-1],), weight, bias, eps)
