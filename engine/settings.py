"""Frozen settings that flow unchanged from the UI (or a script) to the engine.

Change a value with `dataclasses.replace(settings, field=value)`; validation runs again there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import InvalidSettingsError
from kernels.config import DecodeAttentionConfig

ATTENTION_BACKENDS = ("auto", "torch", "triton")
PLACEMENTS = ("gpu", "cpu", "hybrid")


def _check_int(name: str, value: object, *, low: int, high: int | None = None, hint: str = "") -> None:
    bound = f"between {low} and {high}" if high is not None else f"of at least {low}"
    fix = f"use a whole number {bound}{hint}."
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSettingsError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}): {fix}")
    if value < low or (high is not None and value > high):
        raise InvalidSettingsError(f"{name}={value} is out of range: {fix}")


def _check_float(name: str, value: object, *, low: float, high: float, low_open: bool = False, hint: str = "") -> None:
    fix = f"use a number in {'(' if low_open else '['}{low}, {high}]{hint}."
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidSettingsError(f"{name} must be a finite number, got {value!r}: {fix}")
    if value < low or value > high or (low_open and value == low):
        raise InvalidSettingsError(f"{name}={value} is out of range: {fix}")


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut
    seed: int | None = None  # None: a fresh random stream per run

    def __post_init__(self) -> None:
        _check_float("temperature", self.temperature, low=0.0, high=100.0, hint=" (0 is greedy)")
        _check_int("top_k", self.top_k, low=0, hint=" (0 turns top-k off)")
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True, hint=" (1.0 turns top-p off)")
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**63 - 1, hint=", or None for a fresh random seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class OffloadSettings:
    """Where the KV cache lives and how offloaded tokens reach the GPU each decode step.

    placement: "gpu" keeps all K/V on the GPU; "cpu" keeps every token's K/V (and, where recomputation
    pays, its attention-input activations) in pinned host memory; "hybrid" keeps the first tokens of
    every sequence on the GPU, up to `gpu_kv_budget_gib` (None: what is free after the weights and the
    run's working buffers), and offloads the rest.
    split: "auto" lets the scheduler choose, per step, the fraction of offloaded tokens whose K/V are
    recomputed from activations; a number in [0, 1] fixes it (0: ship all K/V, 1: recompute all).
    chunk_tokens: activations travel and are recomputed in chunks of this many token positions, so the
    recomputation of one chunk overlaps the copy of the next.
    """

    placement: str = "gpu"
    gpu_kv_budget_gib: float | None = None
    split: str | float = "auto"
    chunk_tokens: int = 512

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise InvalidSettingsError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}: "
                                       "'gpu' keeps the KV cache on the GPU, 'cpu' offloads it, 'hybrid' splits it.")
        if self.gpu_kv_budget_gib is not None:
            _check_float("gpu_kv_budget_gib", self.gpu_kv_budget_gib, low=0.0, high=1e6,
                         hint=" GiB, or None to size it from the free GPU memory")
            if self.placement != "hybrid":
                raise InvalidSettingsError(f"gpu_kv_budget_gib={self.gpu_kv_budget_gib} only applies to placement "
                                           f"'hybrid', not {self.placement!r}: set placement='hybrid' or drop the budget.")
        if self.split != "auto":
            _check_float("split", self.split, low=0.0, high=1.0,
                         hint=" (the fraction of offloaded tokens recomputed), or 'auto'")
        _check_int("chunk_tokens", self.chunk_tokens, low=1, high=1_000_000, hint=" token positions")

    @property
    def offloaded(self) -> bool:
        return self.placement != "gpu"

    @property
    def auto_split(self) -> bool:
        return self.split == "auto"


@dataclass(frozen=True)
class GenerationSettings:
    """One generation run: how many tokens, when to stop, how to sample, how to execute."""

    max_new_tokens: int = 64
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks decode a fixed number of tokens
    cuda_graph: bool = True  # capture the decode step once and replay it (GPU only)
    # Decode attention: "triton" is kernels/decode_attention.py (GPU, or CPU under TRITON_INTERPRET=1),
    # "torch" the SDPA reference; "auto" takes the kernel on a GPU and torch on the CPU.
    attention: str = "auto"
    kernel: DecodeAttentionConfig = field(default_factory=DecodeAttentionConfig)
    # Run the decode step through torch.compile (inductor) so its small elementwise ops fuse; the CUDA
    # graph still captures it. Opt-in: the first run per batch and cache length compiles for tens of
    # seconds (minutes for a 7B model), which only pays off over many steps (benchmarks, long runs).
    compile: bool = False
    # The fast adapter (engine/fast): fused q/k/v and gate/up weights, one-pass norm, RoPE and activation kernels, the
    # skinny GEMM where the device's measured GEMM plan says it wins. The same numbers as the plain adapter.
    # "auto": on a CUDA device for every family that has one (1.37x the plain adapter's step on an H200, no compile
    # wait), the plain adapter on the CPU (where the fused pieces are the same torch ops), under compile and under
    # tensor parallel.
    fused: bool | str = "auto"
    offload: OffloadSettings = field(default_factory=OffloadSettings)

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, low=1, high=1_000_000)
        if not isinstance(self.sampling, SamplingSettings):
            raise InvalidSettingsError(f"sampling must be a SamplingSettings instance, got {type(self.sampling).__name__}: "
                                       "build one with SamplingSettings(temperature=..., top_p=...).")
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise InvalidSettingsError("stop_strings must be a tuple of non-empty strings, e.g. ('\\n\\n',).")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.attention not in ATTENTION_BACKENDS:
            raise InvalidSettingsError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}.")
        if not isinstance(self.kernel, DecodeAttentionConfig):
            raise InvalidSettingsError("kernel must be a kernels.config.DecodeAttentionConfig instance.")
        if not isinstance(self.offload, OffloadSettings):
            raise InvalidSettingsError("offload must be an engine.settings.OffloadSettings instance, e.g. "
                                       "OffloadSettings(placement='cpu').")
        for name in ("cuda_graph", "ignore_eos", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidSettingsError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if not (isinstance(self.fused, bool) or self.fused == "auto"):
            raise InvalidSettingsError(f"fused must be True, False or 'auto' (the fast adapter on a GPU), got {self.fused!r}.")

    @property
    def wants_fast_adapter(self) -> bool:
        """Whether a run on a GPU takes the fast adapter where the family has one: fused=True, or "auto" without
        compile (engine/generator.py `_adapter` applies this; the scheduler times such a run's GEMMs from the
        device's measured GEMM plan)."""
        return self.fused is True or (self.fused == "auto" and not self.compile)


@dataclass(frozen=True)
class RunShape:
    """The shape of a profiling run: `batch` random prompts of `prompt_tokens` tokens each, drawn from `seed`.

    How many tokens to generate is the settings' max_new_tokens; chat always runs one sequence.
    """

    batch: int = 2
    prompt_tokens: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("batch", self.batch, low=1, high=4096, hint=" sequences")
        _check_int("prompt_tokens", self.prompt_tokens, low=1, high=1_000_000, hint=" tokens per prompt")
        _check_int("seed", self.seed, low=0, high=2**63 - 1)
