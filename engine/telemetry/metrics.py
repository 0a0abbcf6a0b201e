"""Per-step metrics derived from a Recorder's steps and spans: the one record type runs are judged by.

Payload GB/s is the engine's own byte count over the time its copies of that direction were in flight
(the union of the direction's spans in the step, so two overlapping copies are not counted twice). It
is labelled "payload" to keep it apart from NVML's "link" GB/s, which counts protocol overhead too
(~8 % more). GB are 1e9 bytes, as PCIe rates are quoted.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.telemetry.lanes import DIRECTIONS, LANES, PCIE_DIRECTION
from engine.telemetry.recorder import Span, StepRecord


def union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals, in their unit."""
    total = 0.0
    cur_start = cur_end = None
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def gb_per_s(nbytes: int, dur_us: float) -> float:
    """Bytes over µs as GB/s (1e9 bytes); 0.0 when nothing moved or no time passed."""
    return nbytes / dur_us / 1e3 if nbytes and dur_us > 0 else 0.0


@dataclass(frozen=True)
class StepMetrics:
    """What one decode step did: its wall time, bytes and busy time per lane, PCIe payload rates."""

    step: int
    start_us: float
    end_us: float
    tokens: int  # tokens produced by the step (the batch size for a plain decode step)
    nbytes_by_lane: dict[str, int] = field(default_factory=dict)
    busy_ms_by_lane: dict[str, float] = field(default_factory=dict)  # union of the lane's spans
    pcie_busy_ms: dict[str, float] = field(default_factory=dict)  # direction -> union of its lanes' spans
    payload_gb_s: dict[str, float] = field(default_factory=dict)  # direction -> bytes / pcie_busy

    @property
    def step_ms(self) -> float:
        return (self.end_us - self.start_us) / 1000.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.step_ms / 1000.0) if self.step_ms > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """A flat dict (one column per lane and direction), as written to JSON and CSV."""
        out: dict[str, Any] = {"step": self.step, "start_us": self.start_us, "end_us": self.end_us,
                               "step_ms": self.step_ms, "tokens": self.tokens, "tokens_per_s": self.tokens_per_s}
        for lane in LANES:
            out[f"nbytes_{lane}"] = self.nbytes_by_lane.get(lane, 0)
        for lane in LANES:
            out[f"busy_ms_{lane}"] = self.busy_ms_by_lane.get(lane, 0.0)
        for direction in DIRECTIONS:
            out[f"pcie_busy_ms_{direction}"] = self.pcie_busy_ms.get(direction, 0.0)
            out[f"payload_gb_s_{direction}"] = self.payload_gb_s.get(direction, 0.0)
        return out

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> StepMetrics:
        """Inverse of as_dict (derived columns are recomputed, not read)."""
        return cls(step=int(row["step"]), start_us=float(row["start_us"]), end_us=float(row["end_us"]),
                   tokens=int(row["tokens"]),
                   nbytes_by_lane={lane: int(row[f"nbytes_{lane}"]) for lane in LANES},
                   busy_ms_by_lane={lane: float(row[f"busy_ms_{lane}"]) for lane in LANES},
                   pcie_busy_ms={d: float(row[f"pcie_busy_ms_{d}"]) for d in DIRECTIONS},
                   payload_gb_s={d: float(row[f"payload_gb_s_{d}"]) for d in DIRECTIONS})


def step_metrics(steps: Sequence[StepRecord], spans: Iterable[Span], *,
                 tokens_per_step: int | Mapping[int, int]) -> list[StepMetrics]:
    """One StepMetrics per step record. Spans are matched to steps by their `step` field; spans of
    steps not in `steps` (or recorded outside a step) are ignored."""
    wanted = {record.step for record in steps}
    by_step: dict[int, list[Span]] = {step: [] for step in wanted}
    for span in spans:
        if span.step in wanted:
            by_step[span.step].append(span)
    out = []
    for record in steps:
        tokens = tokens_per_step if isinstance(tokens_per_step, int) else tokens_per_step[record.step]
        step_spans = by_step[record.step]
        busy_ms = {lane: union_us((s.start_us, s.end_us) for s in step_spans if s.lane == lane) / 1000.0
                   for lane in LANES}
        pcie_busy_ms, payload = {}, {}
        for direction in DIRECTIONS:
            dir_spans = [s for s in step_spans if PCIE_DIRECTION.get(s.lane) == direction]
            busy_us = union_us((s.start_us, s.end_us) for s in dir_spans)
            pcie_busy_ms[direction] = busy_us / 1000.0
            # Bytes from the same spans as the time (not from the step record), so that a ring that
            # dropped some spans gives a rate over fewer copies rather than a wrong one.
            payload[direction] = gb_per_s(sum(s.nbytes for s in dir_spans), busy_us)
        out.append(StepMetrics(step=record.step, start_us=record.start_us, end_us=record.end_us, tokens=tokens,
                               nbytes_by_lane=dict(record.nbytes_by_lane), busy_ms_by_lane=busy_ms,
                               pcie_busy_ms=pcie_busy_ms, payload_gb_s=payload))
    return out


def to_json(path: str | Path, metrics: Sequence[StepMetrics], *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write {"metadata": ..., "steps": [as_dict, ...]} to `path`."""
    path = Path(path)
    doc = {"metadata": dict(metadata or {}), "steps": [m.as_dict() for m in metrics]}
    path.write_text(json.dumps(doc, indent=1))
    return path


def read_json(path: str | Path) -> list[StepMetrics]:
    """The StepMetrics written by to_json."""
    return [StepMetrics.from_dict(row) for row in json.loads(Path(path).read_text())["steps"]]


def to_csv(path: str | Path, metrics: Sequence[StepMetrics]) -> Path:
    """Write one row per step, columns as in StepMetrics.as_dict (header always written)."""
    path = Path(path)
    columns = list(StepMetrics(step=0, start_us=0.0, end_us=0.0, tokens=0).as_dict())
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for m in metrics:
            writer.writerow(m.as_dict())
    return path
