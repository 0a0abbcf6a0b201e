"""The fast adapter's pieces, each with two implementations: the Triton kernel (GPU, or CPU under the interpreter)
and the plain torch computation the unfused adapter does (CPU, and whatever torch.compile traces: inductor fuses
those ops itself, and dynamo cannot trace the launchers).

`KernelPolicy.mode`: "auto" runs the kernels on CUDA tensors only, "triton" everywhere (tests on the interpreter),
"torch" nowhere. `KernelPolicy.pdl`: launch them with programmatic dependent launch (kernels/pdl.py), so that each
may start while its predecessor drains; off by default. `KernelPolicy.weights_ahead`: with PDL, the skinny GEMM's
programs prefetch their first weight tiles into L2 in that overlap (kernels/l2_prefetch.py), before they wait.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.fast.plan import GemmPlan

MODES = ("auto", "triton", "torch")
# transformers' hidden_act names -> the kernels' activations; others run their torch module.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class KernelPolicy:
    mode: str = "auto"
    pdl: bool = False
    # with PDL: weight tiles each skinny-GEMM program prefetches into L2 before it waits for the previous kernel
    weights_ahead: int = 0
    # each residual add in the epilogue of the GEMM before it (o_proj, down) and its RMSNorm split between that
    # epilogue and the GEMM after it (gate/up, the next q/k/v; kernels/skinny_gemm.py FoldedNorm): up to two launches
    # a layer fewer, where both GEMMs run the skinny kernel (engine/fast/llama.py). 0.10-0.12 ms off a B8/B1
    # llama-2-7b step on an H200 (bench/results/decode_fold_default.md, 2026-12-02); off by default, since in bf16 its
    # q/k/v input is rounded otherwise than an offloaded layer's, which keeps the normed tensor for recomputation
    fold_norm: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"kernel mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.weights_ahead, bool) or not isinstance(self.weights_ahead, int) or self.weights_ahead < 0:
            raise ValueError(f"weights_ahead must be an int >= 0 (weight tiles), got {self.weights_ahead!r}")

    def triton(self, t: torch.Tensor) -> bool:
        if self.mode == "torch" or torch.compiler.is_compiling():
            return False
        return self.mode == "triton" or t.is_cuda


def norm_eps(module: torch.nn.Module) -> float:
    eps = getattr(module, "variance_epsilon", None)
    return float(module.eps if eps is None else eps)


def add_norm(policy: KernelPolicy, x: torch.Tensor, residual: torch.Tensor | None, norm: torch.nn.Module, *,
             unit_offset: bool = False):
    """-> (residual + x, norm(residual + x)), residual None: (x, norm(x)). norm: an RMSNorm module of the family
    (unit_offset: Gemma's, which scales by 1 + weight)."""
    if policy.triton(x):
        from kernels.rms_norm import add_rms_norm

        return add_rms_norm(x, residual, norm.weight, eps=norm_eps(norm), unit_offset=unit_offset, pdl=policy.pdl)
    total = x if residual is None else residual + x
    return total, norm(total)


class Projection:
    """One (possibly fused) projection y = x W^T + b, run by the skinny kernel or cuBLAS as the plan says."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, gated: bool = False) -> None:
        self.weight, self.bias, self.gated = weight, bias, gated
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0] // 2 if gated else weight.shape[0]

    def skinny_config(self, plan: GemmPlan, rows: int):
        return plan.config(rows, self.out_features, self.in_features, gated=self.gated, device=self.weight.device)

    def runs_skinny(self, x: torch.Tensor, *, policy: KernelPolicy, plan: GemmPlan, act: str = "") -> bool:
        """Whether a call on x runs the skinny kernel (what a folded norm needs on both sides): Triton kernels, the
        plan's pick for these rows, and not fp32 on a GPU (the kernel's fp32 dot is not tensor-core work; mode
        "triton" forces it), nor a gated projection without the kernels' activation."""
        rows = x.numel() // self.in_features
        return (policy.triton(x) and (x.dtype != torch.float32 or policy.mode == "triton")
                and (bool(act) or not self.gated) and 1 <= rows <= 64 and self.skinny_config(plan, rows) is not None)

    def add_residual(self, x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module, *, policy: KernelPolicy,
                     plan: GemmPlan):
        """-> (h = residual + x W^T + b, the FoldedNorm of `norm` over h) from one skinny launch (runs_skinny must
        hold): the block's end, and the next GEMM's input without a norm launch."""
        from kernels.skinny_gemm import skinny_gemm_residual

        rows = x.numel() // self.in_features
        total, folded = skinny_gemm_residual(x.reshape(rows, self.in_features), self.weight, self.bias,
                                             residual.reshape(rows, self.out_features), norm_weight=norm.weight,
                                             eps=norm_eps(norm),
                                             config=self.skinny_config(plan, rows), pdl=policy.pdl,
                                             weights_ahead=policy.weights_ahead)
        return total.view(residual.shape), folded

    def __call__(self, x: torch.Tensor, *, policy: KernelPolicy, plan: GemmPlan, act: str = "",
                 act_fn=None, norm=None) -> torch.Tensor:
        """x (..., K) -> (..., N); gated: act(x W_gate^T + b) * (x W_up^T + b) (..., I), `act` the kernels' name
        ("" when they have none for the family: `act_fn` runs), `act_fn` transformers' activation module. norm: a
        kernels.skinny_gemm.FoldedNorm of x: the GEMM runs on its scaled rows and its epilogue applies rstd
        (runs_skinny must hold)."""
        lead = x.shape[:-1]
        rows = x.numel() // self.in_features
        if norm is not None or self.runs_skinny(x, policy=policy, plan=plan, act=act):
            from kernels.skinny_gemm import skinny_gemm

            rows_in = x.reshape(rows, self.in_features) if norm is None else norm.scaled
            y = skinny_gemm(rows_in, self.weight, self.bias, act=act if self.gated else "",
                            config=self.skinny_config(plan, rows), pdl=policy.pdl,
                            weights_ahead=policy.weights_ahead, norm=norm)
            return y.view(*lead, self.out_features)
        y = F.linear(x, self.weight, self.bias)
        if not self.gated:
            return y
        if act and policy.triton(x):
            from kernels.gated_act import gated_act

            return gated_act(y, act=act, pdl=policy.pdl)
        gate, up = y.chunk(2, dim=-1)
        return act_fn(gate) * up
