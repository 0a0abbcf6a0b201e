"""One adapter per model family; `adapter_for` picks it from the transformers config."""

from __future__ import annotations

import torch

from engine.adapters.base import DecoderAdapter, ModelSpec
from engine.adapters.llama import LlamaAdapter
from engine.adapters.opt import OPTAdapter
from engine.errors import UnsupportedArchitectureError

ADAPTERS: tuple[type[DecoderAdapter], ...] = (LlamaAdapter, OPTAdapter)
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


def adapter_for(hf_model: torch.nn.Module) -> DecoderAdapter:
    return check_supported(hf_model.config.model_type, getattr(hf_model.config, "architectures", None))(hf_model)


__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "DecoderAdapter", "ModelSpec", "adapter_for", "check_supported"]
