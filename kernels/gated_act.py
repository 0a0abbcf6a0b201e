"""act(gate) * up over a fused [gate | up] projection: the gated MLP's middle, one pass instead of three.

With gate and up computed by one GEMM into (rows, 2 * I), the activation and product read each value once and
write (rows, I) once. Rounding follows transformers' `act_fn(gate_proj(x)) * up_proj(x)` in the input dtype: the
activation is computed in fp32 and rounded, then the product is rounded. ACT: "silu" (Llama, Mistral, Qwen) or
"gelu_tanh" (Gemma's gelu_pytorch_tanh). `silu` and `gelu_tanh` are shared with the skinny GEMM's gated epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl as _pdl
from kernels.rounding import round_to

ACTIVATIONS = ("silu", "gelu_tanh")


@triton.jit
def silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def gelu_tanh(x):
    # 0.5 * (1 + tanh(u)) = sigmoid(2u): no cancellation where tanh(u) nears -1 (torch's form loses those digits)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def gated(g, u, ACT: tl.constexpr, dtype: tl.constexpr):
    """fp32 gate and up -> act(gate) rounded to dtype, times up, in fp32 (the caller rounds the product)."""
    if ACT == "silu":
        a = silu(g)
    else:
        a = gelu_tanh(g)
    return round_to(a, dtype).to(tl.float32) * u


@triton.jit
def _gated_act_kernel(gu_ptr, out_ptr, stride_g, stride_o, width, ACT: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
    _pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    dtype = out_ptr.dtype.element_ty
    g = tl.load(gu_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_g + width + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, round_to(gated(g, u, ACT, dtype), dtype), mask=mask)


def gated_act(gate_up: torch.Tensor, *, act: str = "silu", pdl: bool = False) -> torch.Tensor:
    """gate_up (..., 2 * I), gate in the first half -> act(gate) * up (..., I), a new tensor. pdl: kernels/pdl.py."""
    assert act in ACTIVATIONS, f"act {act!r}: one of {ACTIVATIONS}"
    assert gate_up.dtype in (torch.float32, torch.float16, torch.bfloat16), gate_up.dtype
    assert gate_up.shape[-1] % 2 == 0, f"[gate | up] needs an even last dim, got {gate_up.shape[-1]}"
    assert gate_up.stride(-1) == 1, f"the last dim must be contiguous, got strides {gate_up.stride()}"
    width = gate_up.shape[-1] // 2
    try:
        rows = gate_up.view(-1, 2 * width)
    except RuntimeError:
        raise AssertionError(f"leading dims of {tuple(gate_up.shape)} with strides {gate_up.stride()} do not "
                             "collapse into rows of one stride") from None
    out = torch.empty(*gate_up.shape[:-1], width, dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] == 0 or width == 0:
        return out
    block = min(1024, triton.next_power_of_2(width))
    interpreting = not isinstance(_gated_act_kernel, triton.runtime.jit.JITFunction)
    pdl = pdl and _pdl.usable(gate_up.device, interpreting=interpreting)
    _gated_act_kernel[(rows.shape[0], triton.cdiv(width, block))](
        gu_ptr=rows, out_ptr=out, stride_g=rows.stride(0), stride_o=width, width=width, ACT=act, BLOCK=block, PDL=pdl,
        num_warps=4, **({"launch_pdl": True} if pdl else {}))
    return out


def gated_act_reference(gate_up: torch.Tensor, *, act: str = "silu") -> torch.Tensor:
    """transformers' `act_fn(gate) * up` on the two halves, in torch."""
    gate, up = gate_up.chunk(2, dim=-1)
    if act == "silu":
        return torch.nn.functional.silu(gate) * up
    return torch.nn.functional.gelu(gate, approximate="tanh") * up
