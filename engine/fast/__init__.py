"""Fast adapters: a plain model adapter transformed into one over fused weights and fused kernels.

    from engine.fast import fuse
    fast = fuse(model.adapter)          # same interface, same numbers, same memory

`fuse` builds the fused q/k/v and gate/up weights in place (the model's own Linear modules become views of them,
so the plain adapter and transformers' forward keep working), and returns the family's fast adapter; a family
without one comes back unchanged, and `why_not_fused` says why. The adapters know nothing of caches or offload.
"""

from __future__ import annotations

from engine.adapters.base import DecoderAdapter
from engine.adapters.llama import LlamaAdapter
from engine.fast.gemma import FusedGemmaAdapter
from engine.fast.llama import FusedLlamaAdapter, FusedPhi3Adapter
from engine.fast.plan import GemmPlan, gemm_plan

FAST_ADAPTERS = (FusedLlamaAdapter,)  # the Phi-3 and Gemma ones are subclasses
# plain adapter class name -> its fast adapter (by name: a family's module may be absent from an older checkout)
_FAST_FOR = {LlamaAdapter.__name__: FusedLlamaAdapter, "Phi3Adapter": FusedPhi3Adapter,
             "GemmaAdapter": FusedGemmaAdapter}


def why_not_fused(adapter: DecoderAdapter) -> str | None:
    """None when `fuse(adapter)` gives a fast adapter, else one line saying why not."""
    if isinstance(adapter, FAST_ADAPTERS):
        return None
    if adapter.layers and any(type(m).__name__ == "RowParallelLinear" for m in adapter.layers[0].modules()):
        # engine/parallel/shard.py's rank part: its row-parallel projections all-reduce inside their forward, which
        # the fast adapter's own GEMMs would skip
        return "a tensor-parallel rank's part runs its plain adapter (row-parallel projections all-reduce themselves)"
    if type(adapter).__name__ in _FAST_FOR:
        return None
    return f"no fast adapter for the {adapter.family or type(adapter).__name__} family: it runs its plain adapter"


def fuse(adapter: DecoderAdapter, *, kernels: str = "auto", plan: GemmPlan | None = None,
         pdl: bool = False, weights_ahead: int = 0, fold_norm: bool = False) -> DecoderAdapter:
    """The fast version of `adapter` (itself when it is already fast or its family has none).

    kernels: "auto" (Triton kernels on CUDA tensors, torch elsewhere), "triton" (everywhere: CPU needs
    TRITON_INTERPRET=1), "torch" (fused weights only). plan: which GEMM each shape runs (default: the device's
    cached measurements, engine/fast/plan.py). pdl: launch the kernels with programmatic dependent launch (Hopper;
    kernels/pdl.py); weights_ahead: with PDL, weight tiles each GEMM program prefetches into L2 before it waits for
    the previous kernel; fold_norm: the Llama family's add + RMSNorm at each block's end split between the GEMMs
    either side of it, where both run the skinny kernel (no launch of its own; Gemma's sandwich norms are left as
    they are; GPU-resident bf16 runs then round differently from offloaded ones, engine/fast/llama.py). An adapter
    that is already fast comes back as it is, whatever the arguments."""
    if isinstance(adapter, FAST_ADAPTERS) or why_not_fused(adapter) is not None:
        return adapter
    return _FAST_FOR[type(adapter).__name__](adapter, kernels=kernels, plan=plan, pdl=pdl,
                                             weights_ahead=weights_ahead, fold_norm=fold_norm)


__all__ = ["FAST_ADAPTERS", "FusedGemmaAdapter", "FusedLlamaAdapter", "FusedPhi3Adapter", "GemmPlan", "fuse",
           "gemm_plan", "why_not_fused"]
