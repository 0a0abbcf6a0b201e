"""One adapter per model family; `adapter_for` picks it from the transformers config."""

from __future__ import annotations

import torch

from engine.adapters.base import DecoderAdapter, ModelSpec
from engine.adapters.gemma import GemmaAdapter
from engine.adapters.llama import LlamaAdapter
from engine.adapters.opt import OPTAdapter
from engine.adapters.phi3 import Phi3Adapter
from engine.errors import UnsupportedArchitectureError

ADAPTERS: tuple[type[DecoderAdapter], ...] = (LlamaAdapter, GemmaAdapter, Phi3Adapter, OPTAdapter)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.MODEL_TYPES)


def check_supported(model_type: str | None, architectures=None) -> type[DecoderAdapter]:
    for adapter in ADAPTERS:
        if model_type in adapter.MODEL_TYPES:
            return adapter
    arch = f" ({', '.join(architectures)})" if architectures else ""
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r}{arch} is not supported. Supported model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}. Load a model of one of these families."
    )


def check_unquantized(quantization: object, source: str) -> None:
    """Refuse a quantized checkpoint (config.json's `quantization_config`: FP8, AWQ, GPTQ, bitsandbytes, ...) before
    anything loads: the engine's decode layer reads plain floating-point weights (it fuses q/k/v and gate/up from
    them), so a quantized layer would fail mid-run or, worse, run on its raw integer or float8 payload."""
    if not quantization:
        return
    method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else \
        getattr(quantization, "quant_method", "unknown")
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    raise UnsupportedArchitectureError(
        f"{source} is a quantized checkpoint (quantization_config, quant_method {str(method)!r}): KV Lab runs "
        "bfloat16, float16 or float32 weights only. Load the unquantized checkpoint (usually the same model id "
        "without -FP8, -AWQ, -GPTQ or -bnb), or dequantize it first and save it with save_pretrained.")


def adapter_for(hf_model: torch.nn.Module) -> DecoderAdapter:
    """The family's adapter for a loaded model; refuses (UnsupportedArchitectureError) a configuration the engine
    would run wrongly or fail on mid-run, naming what is unsupported."""
    config = hf_model.config
    check_unquantized(getattr(config, "quantization_config", None), f"The model {getattr(config, 'name_or_path', '')!r}")
    adapter = check_supported(config.model_type, getattr(config, "architectures", None))(hf_model)
    check_runnable(adapter)
    return adapter


@torch.no_grad()
def check_runnable(adapter: DecoderAdapter) -> None:
    """Shape facts every family must satisfy, checked once when the model loads: GQA groups whole, RoPE over an
    even number of dims no wider than a head, and the rotary tables the model builds as wide as the spec says
    (a Llama config with partial_rotary_factor builds narrower tables than its attention rotates)."""
    spec = adapter.spec
    name = spec.model_type
    if spec.num_heads % spec.num_kv_heads:
        raise UnsupportedArchitectureError(
            f"{name}: {spec.num_heads} query heads do not split into groups over {spec.num_kv_heads} K/V heads: fix "
            "num_key_value_heads in config.json.")
    if spec.positional != "rope":
        return
    if spec.rotary_dims % 2 or not 0 < spec.rotary_dims <= spec.head_dim:
        raise UnsupportedArchitectureError(
            f"{name}: RoPE over {spec.rotary_dims} dims of {spec.head_dim}-dim heads is not supported (RoPE rotates "
            "pairs of dims, at most the whole head): fix head_dim or partial_rotary_factor in config.json.")
    param = next(adapter.hf_model.parameters())
    hidden = torch.zeros(1, 1, spec.hidden_size, dtype=param.dtype, device=param.device)
    widths = {rope[0].shape[-1] for rope in adapter.rope(hidden, torch.zeros(1, 1, dtype=torch.long,
                                                                             device=param.device)) if rope is not None}
    if widths != {spec.rotary_dims}:
        raise UnsupportedArchitectureError(
            f"{name}: the model's RoPE tables cover {sorted(widths)} dims but its attention rotates "
            f"{spec.rotary_dims} of each {spec.head_dim}-dim head (partial_rotary_factor on a family that rotates "
            "whole heads?): remove partial_rotary_factor from config.json.")


__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "DecoderAdapter", "ModelSpec", "adapter_for", "check_runnable",
           "check_supported", "check_unquantized"]
