"""Chrome/Perfetto trace export of recorded spans and counters, and downsampling for plots.

The trace is the JSON Object Format: {"traceEvents": [...], "displayTimeUnit": "ms", "metadata": {...}}
with ts/dur in µs since the recorder's origin. One process ("KV Lab decode"), one thread id per lane
(named with the lane's label, sorted in LANES order), an "X" complete event per span and "C" counter
events for link/payload GB/s, L2 hit % and tokens/s.

Slices on one thread id must nest, never partially overlap. A lane's spans run one after another on one
stream, so they should not overlap at all; if some do anyway (work recorded from two streams under one
lane), the overlapping ones go to an extra track of that lane ("attention (overlap 2)") rather than
being dropped or making a trace Perfetto draws wrongly. `metadata["overlap_tracks"]` counts them.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.telemetry.lanes import LANE_INDEX, LANE_LABELS, LANES, check_lane
from engine.telemetry.metrics import StepMetrics
from engine.telemetry.nvml_sampler import NvmlSample
# CUPTI PM-sampling tracks (L2 hit %, PCIe, DRAM, stalls): named, filled and labelled beside the counter choice.
from engine.telemetry.pm_metrics import (  # noqa: F401 - re-exported
    COUNTER_L2, COUNTER_PM_DRAM, COUNTER_PM_DRAM_PCT, COUNTER_PM_L2_ALL, COUNTER_PM_L2_SECTORS, COUNTER_PM_PCIE,
    COUNTER_PM_STALL, PM_TRACKS, cupti_counters)
from engine.telemetry.recorder import Span

PROCESS_NAME = "KV Lab decode"
PID = 1
COUNTER_LINK = "PCIe link GB/s (NVML)"
COUNTER_PAYLOAD = "PCIe payload GB/s"
COUNTER_TOKENS = "tokens/s"
# Traces above this size are gzipped even when the name does not ask for it (Perfetto opens .json.gz).
GZIP_OVER_BYTES = 32 << 20

# name -> [(ts_us, {series: value})]: one Chrome counter track per name, one series per key.
Counters = Mapping[str, Sequence[tuple[float, Mapping[str, float]]]]


# ---- counter tracks from the telemetry sources -----------------------------------------------------

def nvml_counters(samples: Iterable[NvmlSample]) -> dict[str, list[tuple[float, dict[str, float]]]]:
    """NVML link GB/s (tx = D2H, rx = H2D) at each sample that has a rate."""
    points = [(s.t_us, {"tx": s.tx_gb_s, "rx": s.rx_gb_s}) for s in samples
              if s.tx_gb_s is not None and s.rx_gb_s is not None]
    return {COUNTER_LINK: points} if points else {}


def step_counters(metrics: Iterable[StepMetrics]) -> dict[str, list[tuple[float, dict[str, float]]]]:
    """Payload GB/s per direction and tokens/s, each placed at its step's start."""
    metrics = list(metrics)
    if not metrics:
        return {}
    return {COUNTER_PAYLOAD: [(m.start_us, dict(m.payload_gb_s)) for m in metrics],
            COUNTER_TOKENS: [(m.start_us, {"tokens/s": m.tokens_per_s}) for m in metrics]}


def l2_counters(points: Iterable[tuple[float, float]], *,
                formula: str) -> dict[str, list[tuple[float, dict[str, float]]]]:
    """L2 hit % at (ts_us, pct) points; the series is named by the formula so the trace says which it is."""
    track = [(t_us, {formula: pct}) for t_us, pct in points]
    return {COUNTER_L2: track} if track else {}


# ---- trace ------------------------------------------------------------------------------------------

def _assign_tracks(lane_spans: list[Span]) -> list[int]:
    """Track number per span (sorted by start): the first track whose last slice ended by its start."""
    track_ends: list[float] = []
    tracks = []
    for span in lane_spans:
        for k, end_us in enumerate(track_ends):
            if span.start_us >= end_us:
                track_ends[k] = span.end_us
                tracks.append(k)
                break
        else:
            track_ends.append(span.end_us)
            tracks.append(len(track_ends) - 1)
    return tracks


def _tid(lane_index: int, track: int) -> int:
    return 1 + lane_index + track * len(LANES)


def build_trace(spans: Iterable[Span], *, counters: Counters | None = None,
                metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The trace as a JSON-ready dict (see the module docstring)."""
    by_lane: dict[str, list[Span]] = {lane: [] for lane in LANES}
    for span in spans:
        by_lane[LANES[check_lane(span.lane)]].append(span)
    events: list[dict[str, Any]] = [{"ph": "M", "pid": PID, "name": "process_name", "args": {"name": PROCESS_NAME}}]
    slices: list[dict[str, Any]] = []
    overlap_tracks: dict[str, int] = {}
    for lane, lane_spans in by_lane.items():
        lane_index = LANE_INDEX[lane]
        lane_spans.sort(key=lambda s: (s.start_us, s.end_us))
        tracks = _assign_tracks(lane_spans)
        num_tracks = max(tracks, default=0) + 1
        if num_tracks > 1:
            overlap_tracks[lane] = num_tracks - 1
        for track in range(num_tracks):
            tid = _tid(lane_index, track)
            name = LANE_LABELS[lane] if track == 0 else f"{LANE_LABELS[lane]} (overlap {track + 1})"
            events.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_name", "args": {"name": name}})
            events.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_sort_index",
                           "args": {"sort_index": lane_index * 100 + track}})
        for span, track in zip(lane_spans, tracks):
            slices.append({"ph": "X", "pid": PID, "tid": _tid(lane_index, track), "name": f"{lane} L{span.layer}",
                           "cat": lane, "ts": span.start_us, "dur": span.end_us - span.start_us,
                           "args": {"step": span.step, "layer": span.layer, "bytes": span.nbytes}})
    slices.sort(key=lambda e: (e["ts"], e["tid"]))
    events += slices
    for name, points in (counters or {}).items():
        for ts_us, values in points:
            events.append({"ph": "C", "pid": PID, "name": name, "ts": ts_us,
                           "args": {key: float(value) for key, value in values.items()}})
    meta = {"producer": "KV Lab telemetry", "time_unit": "us", "time_origin": "Recorder origin (first event)",
            "lanes": dict(LANE_LABELS), "num_spans": len(slices), "overlap_tracks": overlap_tracks,
            "counters": sorted((counters or {}).keys())}
    meta.update(metadata or {})
    return {"traceEvents": events, "displayTimeUnit": "ms", "metadata": meta}


def write_trace(path: str | Path, spans: Iterable[Span], *, counters: Counters | None = None,
                metadata: Mapping[str, Any] | None = None, gzip_over_bytes: int = GZIP_OVER_BYTES) -> Path:
    """Write the trace; gzip when the name ends in .gz or the JSON passes `gzip_over_bytes` (then ".gz"
    is appended to the name). Returns the path written."""
    path = Path(path)
    data = json.dumps(build_trace(spans, counters=counters, metadata=metadata), separators=(",", ":")).encode()
    if path.name.endswith(".gz") or len(data) > gzip_over_bytes:
        if not path.name.endswith(".gz"):
            path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, compresslevel=6)
    path.write_bytes(data)
    return path


def read_trace(path: str | Path) -> dict[str, Any]:
    """A trace written by write_trace (plain or gzipped, told apart by the gzip magic bytes)."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return json.loads(data)


def spans_from_trace(trace: Mapping[str, Any]) -> list[Span]:
    """The spans of a trace's "X" events, in trace order."""
    return [Span(step=e["args"]["step"], layer=e["args"]["layer"], lane=e["cat"], start_us=e["ts"],
                 end_us=e["ts"] + e["dur"], nbytes=e["args"]["bytes"])
            for e in trace["traceEvents"] if e["ph"] == "X"]


# ---- downsampling for plots -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Segment:
    """Adjacent spans of one lane merged into one bar (a single span when nothing was merged)."""

    lane: str
    start_us: float
    end_us: float
    num_spans: int
    nbytes: int


def downsample_segments(spans: Iterable[Span], max_segments: int) -> list[Segment]:
    """At most `max_segments` segments (but at least one per non-empty lane), lanes in LANES order.

    When there are too many spans, the spans of a lane separated by the smallest gaps are merged first,
    so the large idle gaps (the ones a reader looks for) stay visible at any zoom-out.
    """
    if max_segments < 1:
        raise ValueError(f"max_segments must be >= 1, got {max_segments}")
    by_lane: dict[str, list[Span]] = {lane: [] for lane in LANES}
    for span in spans:
        by_lane[LANES[check_lane(span.lane)]].append(span)
    lanes = [lane for lane in LANES if by_lane[lane]]
    for lane in lanes:
        by_lane[lane].sort(key=lambda s: (s.start_us, s.end_us))
    total = sum(len(by_lane[lane]) for lane in lanes)
    if total <= max_segments:
        return [Segment(s.lane, s.start_us, s.end_us, 1, s.nbytes) for lane in lanes for s in by_lane[lane]]

    # Gap before span i of a lane = its start minus the furthest end so far (negative when overlapping).
    gaps: list[tuple[float, str, int]] = []
    for lane in lanes:
        lane_spans = by_lane[lane]
        furthest_end = lane_spans[0].end_us
        for i in range(1, len(lane_spans)):
            gaps.append((lane_spans[i].start_us - furthest_end, lane, i))
            furthest_end = max(furthest_end, lane_spans[i].end_us)
    num_breaks = max(0, max_segments - len(lanes))
    gaps.sort(key=lambda g: g[0], reverse=True)
    breaks = {(lane, i) for _, lane, i in gaps[:num_breaks]}

    out: list[Segment] = []
    for lane in lanes:
        lane_spans = by_lane[lane]
        first = lane_spans[0]
        start_us, end_us, count, nbytes = first.start_us, first.end_us, 1, first.nbytes
        for i in range(1, len(lane_spans)):
            span = lane_spans[i]
            if (lane, i) in breaks:
                out.append(Segment(lane, start_us, end_us, count, nbytes))
                start_us, end_us, count, nbytes = span.start_us, span.end_us, 0, 0
            end_us = max(end_us, span.end_us)
            count += 1
            nbytes += span.nbytes
        out.append(Segment(lane, start_us, end_us, count, nbytes))
    return out
