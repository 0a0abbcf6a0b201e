"""Frozen settings that flow unchanged from the UI (or a script) to the engine.

Change a value with `dataclasses.replace(settings, field=value)`; validation runs again there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import InvalidSettingsError


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSettingsError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}).")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidSettingsError(f"{name} must be {bound}, got {value}.")


def _check_float(name: str, value: object, *, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidSettingsError(f"{name} must be a finite number, got {value!r}.")
    if value < low or value > high or (low_open and value == low):
        side = "(" if low_open else "["
        raise InvalidSettingsError(f"{name} must be in {side}{low}, {high}], got {value}.")


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut
    seed: int | None = None  # None: a fresh random stream per run

    def __post_init__(self) -> None:
        _check_float("temperature", self.temperature, low=0.0, high=100.0)
        _check_int("top_k", self.top_k, low=0)
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**63 - 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationSettings:
    """One generation run: how many tokens, when to stop, how to sample, how to execute."""

    max_new_tokens: int = 64
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks decode a fixed number of tokens
    cuda_graph: bool = True  # capture the decode step once and replay it (GPU only)

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, low=1, high=1_000_000)
        if not isinstance(self.sampling, SamplingSettings):
            raise InvalidSettingsError("sampling must be a SamplingSettings instance.")
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise InvalidSettingsError("stop_strings must be a tuple of non-empty strings, e.g. ('\\n\\n',).")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
