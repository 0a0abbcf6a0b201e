"""The scheduler explorer: predicted step time against the recompute split, for one model, placement and shape.

For each split fraction the run is planned with that split fixed (engine/offload/placement.py `plan_for`, the same
path a run takes) and the plan's per-step predictions are averaged over the run's steps; the auto choice is
planned the same way, so its point lies where the scheduler would put the run. KVPR's own rule
(`paper_split`, fixed A100 constants) is given for comparison. Measured points come from the session's runs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

import torch

from engine.adapters import ModelSpec
from engine.errors import InvalidSettingsError
from engine.offload.placement import plan_for
from engine.offload.profiler import HardwareProfile
from engine.offload.scheduler import RunPlan, paper_split
from engine.settings import OffloadSettings

DEFAULT_SPLITS: tuple[float, ...] = tuple(i / 20 for i in range(21))


@dataclass(frozen=True)
class MeasuredPoint:
    """A profiling run of the same model, placement and shape: its mean split and measured median step."""

    run_id: int
    split: float
    step_ms: float
    predicted_ms: float | None
    label: str


@dataclass(frozen=True)
class ExploreResult:
    placement: str  # the placement the curve is for ("cpu" or "hybrid")
    batch: int
    prompt_tokens: int
    new_tokens: int
    offloaded_tokens: int  # old tokens per sequence in host memory at the first decode step
    splits: tuple[float, ...]
    predicted_ms: tuple[float, ...]  # mean predicted step time over the run, per split
    floor_ms: tuple[float, ...]  # mean PCIe floor over the run, per split
    auto_split: float  # mean recomputed fraction the scheduler chooses over the run
    auto_ms: float
    auto_reason: str
    paper_split: float  # KVPR's rule, for comparison
    note: str  # what the curve shows when it is not what the settings asked for
    measured: tuple[MeasuredPoint, ...] = ()

    @property
    def best_split(self) -> float:
        return self.splits[min(range(len(self.splits)), key=self.predicted_ms.__getitem__)]


def _means(plan: RunPlan) -> tuple[float, float, float]:
    """(mean predicted ms, mean floor ms, mean split over the steps that offload anything)."""
    steps = plan.steps
    offloading = [s.split for s in steps if s.offloaded_tokens > 0]
    return (statistics.fmean(s.predicted_ms for s in steps), statistics.fmean(s.pcie_floor_ms for s in steps),
            statistics.fmean(offloading) if offloading else 0.0)


def explore_splits(spec: ModelSpec, offload: OffloadSettings, *, device: torch.device, profile: HardwareProfile,
                   batch: int, prompt_tokens: int, new_tokens: int,
                   splits: tuple[float, ...] = DEFAULT_SPLITS, fused: bool = True) -> ExploreResult:
    """Predicted step time per split fraction, and the auto choice, for this model, placement and shape (fused:
    the runs take the fast adapter, as the default settings do)."""
    splits = tuple(sorted({float(s) for s in splits}))
    if not splits or any(not 0.0 <= s <= 1.0 for s in splits):
        raise InvalidSettingsError(f"splits {splits} must be fractions in [0, 1]: 0 ships all K/V, 1 recomputes all.")
    note = ""
    if not offload.offloaded:
        offload = OffloadSettings(placement="cpu", chunk_tokens=offload.chunk_tokens)
        note = ("The settings keep the KV cache on the GPU, so nothing is offloaded and there is no split to "
                "choose: the curve is for placement 'cpu'.")

    def plan(split: str | float) -> RunPlan:
        return plan_for(spec, replace(offload, split=split), device=device, batch=batch,
                        prompt_tokens=prompt_tokens, new_tokens=new_tokens, profile=profile, fused=fused)

    curve = [_means(plan(s)) for s in splits]
    auto = plan("auto")
    auto_ms, _, auto_split = _means(auto)
    offloaded = auto.steps[0].offloaded_tokens
    if offloaded == 0:
        note = (note + " " if note else "") + ("The GPU budget holds every token at the first step: nothing is "
                                               "offloaded there, so the split changes little.")
    return ExploreResult(placement=offload.placement, batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                         offloaded_tokens=offloaded, splits=splits, predicted_ms=tuple(c[0] for c in curve),
                         floor_ms=tuple(c[1] for c in curve), auto_split=auto_split, auto_ms=auto_ms,
                         auto_reason=auto.reason, paper_split=paper_split(spec, batch=batch), note=note)


__all__ = ["DEFAULT_SPLITS", "ExploreResult", "MeasuredPoint", "explore_splits"]
