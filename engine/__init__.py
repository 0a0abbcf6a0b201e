"""KV Lab's inference engine: load a Hugging Face causal LM, run its own decode loop, stream steps.

    from engine import load_model, Generator, GenerationSettings
    model = load_model("synthetic:tiny-llama", device="cpu")
    result = Generator(model).generate(["To be, or not"], GenerationSettings(max_new_tokens=16))
"""

import os

# KV caches, staging buffers and prefill temporaries are large and of many sizes: expandable segments keep the
# CUDA allocator from fragmenting into reserved-but-unusable blocks (read when CUDA is first used).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from engine.adapters import SUPPORTED_MODEL_TYPES, ModelSpec
from engine.errors import (CompileError, InvalidSettingsError, KVLabError, ModelLoadError, OutOfMemoryError,
                           PromptTooLongError, UnsupportedArchitectureError)
from engine.generator import GenerationResult, Generator, StepEvent
from engine.loader import LoadedModel, load_model
from engine.presets import PRESETS, TINY_PRESETS
from engine.settings import GenerationSettings, SamplingSettings

__all__ = [
    "PRESETS", "SUPPORTED_MODEL_TYPES", "TINY_PRESETS", "CompileError", "GenerationResult", "GenerationSettings",
    "Generator", "InvalidSettingsError", "KVLabError", "LoadedModel", "ModelLoadError", "ModelSpec", "OutOfMemoryError",
    "PromptTooLongError", "SamplingSettings", "StepEvent", "UnsupportedArchitectureError", "load_model",
]
