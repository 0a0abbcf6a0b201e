"""What the L2 hit-rate counters read on this device for a loop whose reads all hit and for one that streams DRAM.

The PM-sampling hit rates are averaged over the L2's two partitions, so an all-hit workload does not read 100 %
(about 48 % on an H200, a DRAM-streaming loop about 25 %). A label that says what a reading means must say what this
device reads at both ends: `calibrate` runs both loops with the run's counters, once per device, and the figures are
cached beside the hardware profile (engine/offload/profiler.py's cache directory), keyed by the GPU, its driver and
the chip, and keep one entry per metric.

    L2-resident loop: a bf16 buffer of a quarter of L2 summed again and again (after a warm-up, every read hits);
    DRAM-streaming loop: a buffer of 8x L2 summed again and again (every read misses, bar what the sum reuses).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from engine.cache_files import write_cache_file

CALIBRATION_VERSION = 1
LOOP_SECONDS = 0.3  # per loop; at least MIN_SAMPLES sampling intervals
MIN_SAMPLES = 12


@dataclass(frozen=True)
class L2Calibration:
    """Per L2 metric: the median reading of an all-hit loop and of a DRAM-streaming loop on one device."""

    device: str  # the GPU's name
    chip: str
    measured_at: str  # ISO date-time, UTC
    interval_us: int
    values: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (all-hit %, streaming %)
    num_samples: tuple[int, int] = (0, 0)  # samples of each loop
    note: str = ""  # why a figure is missing, when one is
    version: int = CALIBRATION_VERSION

    def figures(self, metric: str) -> tuple[float, float] | None:
        """(all-hit %, DRAM-streaming %) for `metric`, or None when it was not calibrated."""
        pair = self.values.get(metric)
        return (float(pair[0]), float(pair[1])) if pair is not None else None

    def merged(self, newer: L2Calibration) -> L2Calibration:
        return L2Calibration(device=newer.device, chip=newer.chip, measured_at=newer.measured_at,
                             interval_us=newer.interval_us, values={**self.values, **newer.values},
                             num_samples=newer.num_samples, note=newer.note)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> L2Calibration:
        raw = json.loads(text)
        if raw.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"calibration version {raw.get('version')!r}, expected {CALIBRATION_VERSION}")
        return cls(device=raw["device"], chip=raw["chip"], measured_at=raw["measured_at"],
                   interval_us=int(raw["interval_us"]),
                   values={k: (float(v[0]), float(v[1])) for k, v in raw["values"].items()},
                   num_samples=tuple(raw.get("num_samples", (0, 0))), note=raw.get("note", ""))


def calibration_path(device_name: str, driver: str, chip: str) -> Path:
    from engine.offload.profiler import cache_dir

    key = re.sub(r"[^A-Za-z0-9.]+", "-", f"{device_name}_{driver}_{chip}").strip("-")
    return cache_dir() / f"cupti-l2-calibration_{key}.json"


def load_calibration(path: Path) -> L2Calibration | None:
    """The calibration cached at `path`, or None (absent, unreadable or of another version: measured again)."""
    try:
        return L2Calibration.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None


def save_calibration(calibration: L2Calibration, path: Path) -> Path | None:
    """Write `calibration` (merged over the metrics already cached there); None when the cache is not writable."""
    old = load_calibration(path)
    if old is not None:
        calibration = old.merged(calibration)
    return write_cache_file(path, calibration.to_json())


def loop_median(samples: Sequence, metric: str) -> float | None:
    """The median of `metric` over a loop's samples, the first and last left out (they straddle its start and end);
    None with fewer than three finite readings."""
    values = [s.values.get(metric) for s in samples if s.end_ns > s.start_ns]
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if len(values) >= 5:
        values = values[1:-1]
    return statistics.median(values) if len(values) >= 3 else None


def _run_for(fn: Callable[[], object], seconds: float, sync: Callable[[], None]) -> None:
    sync()
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for _ in range(32):
            fn()
        sync()  # a short queue, so the loop ends when its time is up


def loops(device, *, seconds: float) -> tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
    """(all-hit loop, DRAM-streaming loop, free their buffers) on a CUDA `device`, each running `seconds`."""
    import torch

    device = torch.device(device)
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    resident = torch.ones(max(1 << 20, l2_bytes // 4) // 2, dtype=torch.bfloat16, device=device)
    streaming = torch.ones(max(256 << 20, 8 * l2_bytes) // 2, dtype=torch.bfloat16, device=device)
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    buffers = [resident, streaming]

    def all_hit() -> None:
        for _ in range(8):  # warm: the buffer is in L2 before the counters start counting
            buffers[0].sum()
        _run_for(lambda: buffers[0].sum(), seconds, sync)

    def streaming_loop() -> None:
        _run_for(lambda: buffers[1].sum(), seconds, sync)

    def free() -> None:
        buffers.clear()
        torch.cuda.empty_cache()

    return all_hit, streaming_loop, free


def calibrate(sample_during: Callable[[Callable[[], None]], list], *, device, device_name: str, chip: str,
              metrics: Iterable[str], interval_us: int) -> L2Calibration:
    """Run both loops under `sample_during(fn)` (PM sampling started before fn, stopped and decoded after it: the
    samples) and keep, per L2 metric, the median reading of each."""
    metrics = list(metrics)
    seconds = max(LOOP_SECONDS, MIN_SAMPLES * interval_us * 1e-6)
    all_hit, streaming, free = loops(device, seconds=seconds)
    try:
        hit_samples = sample_during(all_hit)
        stream_samples = sample_during(streaming)
    finally:
        free()
    values, gaps = {}, []
    for metric in metrics:
        hit, miss = loop_median(hit_samples, metric), loop_median(stream_samples, metric)
        if hit is None or miss is None:
            gaps.append(f"{metric}: too few samples ({len(hit_samples)} all-hit, {len(stream_samples)} streaming)")
        else:
            values[metric] = (hit, miss)
    return L2Calibration(device=device_name, chip=chip, interval_us=interval_us,
                         measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), values=values,
                         num_samples=(len(hit_samples), len(stream_samples)), note="; ".join(gaps))


__all__ = ["L2Calibration", "calibrate", "calibration_path", "load_calibration", "loop_median", "loops",
           "save_calibration"]
