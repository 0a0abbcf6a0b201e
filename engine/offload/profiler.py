"""Measure this machine for the offload scheduler: PCIe copies, recompute GEMMs, HBM and attention.

`hardware_profile(device)` returns a `HardwareProfile`, measured once and cached as JSON keyed by the GPU's
name, the driver and the torch version (`refresh=True` measures again). On a machine without a GPU the
same measurements run on host memory (copies between pageable buffers, CPU GEMMs), so the scheduler and
its tests work everywhere; those figures describe the CPU, not a PCIe link.

    python -m engine.offload.profiler [--refresh] [--device cuda|cpu]     # prints the table, caches the JSON
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from engine.cache_files import cache_root, write_cache_file

PROFILE_VERSION = 3  # 2: attention timed over back-to-back calls; 3: on the GPU's clock, calls queued
# Transfer sizes: from one activation chunk of a small batch to a whole layer's KV of a large one.
COPY_SIZES_GPU = (256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20)
COPY_SIZES_CPU = (64 << 10, 1 << 20, 8 << 20)
# Recompute GEMMs: rows = tokens x batch of one chunk or layer; (hidden, 2 * kv heads * head dim) shapes of
# MHA 7B/13B and GQA 8B models.
GEMM_ROWS_GPU = (512, 2048, 8192, 32768, 131072)
GEMM_ROWS_CPU = (64, 256, 1024)
GEMM_SHAPES_GPU = ((4096, 8192), (5120, 10240), (4096, 2048))
GEMM_SHAPES_CPU = ((256, 512),)


@dataclass(frozen=True)
class Point:
    """One measurement: a size (bytes, or GEMM rows) and the rate reached there."""

    size: int
    rate: float  # GB/s for copies, TFLOP/s for GEMMs


@dataclass(frozen=True)
class GemmCurve:
    hidden: int  # K of X (rows, hidden) @ W (hidden, out)
    out_features: int  # N: 2 * kv heads * head dim (K and V together)
    points: tuple[Point, ...]


@dataclass(frozen=True)
class HardwareProfile:
    """What this machine measured; the scheduler's only source of speeds."""

    device_type: str  # "cuda" or "cpu"
    device_name: str
    driver: str
    torch_version: str
    measured_at: str  # ISO date-time, UTC
    h2d: tuple[Point, ...]  # pinned host -> GPU, GB/s by transfer size
    d2h: tuple[Point, ...]
    bidirectional_gb_s: float  # H2D and D2H at once, both directions summed
    hbm_copy_gb_s: float  # device copy, bytes read + written
    attention_gb_s: float  # decode attention, KV bytes read per second
    gemm: tuple[GemmCurve, ...]  # bf16 (fp32 on CPU) recompute GEMMs
    launch_us: float  # host time to enqueue one small kernel (eager decode launches ~30 per layer)
    version: int = PROFILE_VERSION
    notes: tuple[str, ...] = field(default=())

    # -- lookups the scheduler uses ----------------------------------------------------------------
    def h2d_gb_s(self, num_bytes: float) -> float:
        return _interpolate(self.h2d, num_bytes)

    def d2h_gb_s(self, num_bytes: float) -> float:
        return _interpolate(self.d2h, num_bytes)

    @property
    def peak_h2d_gb_s(self) -> float:
        return max(p.rate for p in self.h2d)

    def gemm_tflop_s(self, rows: int, hidden: int, out_features: int) -> float:
        """Throughput of X (rows, hidden) @ W (hidden, out_features), from the nearest measured shape."""
        curve = min(self.gemm, key=lambda c: abs(math.log(c.hidden * c.out_features / (hidden * out_features))))
        return _interpolate(curve.points, rows)

    # -- persistence ---------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> HardwareProfile:
        points = lambda rows: tuple(Point(**p) for p in rows)  # noqa: E731
        data = dict(data)
        data["h2d"], data["d2h"] = points(data["h2d"]), points(data["d2h"])
        data["gemm"] = tuple(GemmCurve(hidden=g["hidden"], out_features=g["out_features"], points=points(g["points"]))
                             for g in data["gemm"])
        data["notes"] = tuple(data.get("notes", ()))
        return cls(**data)

    def rows(self) -> list[tuple[str, str, str]]:
        """(what, size, figure) rows: the table the CLI prints and the Hardware panel shows."""
        out = [("pinned H2D copy", _human(p.size), f"{p.rate:.1f} GB/s") for p in self.h2d]
        out += [("pinned D2H copy", _human(p.size), f"{p.rate:.1f} GB/s") for p in self.d2h]
        out.append(("H2D + D2H at once", _human(max(p.size for p in self.h2d)), f"{self.bidirectional_gb_s:.1f} GB/s total"))
        out.append(("device copy (read + write)", "", f"{self.hbm_copy_gb_s:.0f} GB/s"))
        out.append(("decode attention (KV read)", "", f"{self.attention_gb_s:.0f} GB/s"))
        for curve in self.gemm:
            for p in curve.points:
                out.append((f"recompute GEMM {curve.hidden}->{curve.out_features}", f"{p.size} rows",
                            f"{p.rate:.1f} TFLOP/s"))
        out.append(("kernel launch (host)", "", f"{self.launch_us:.1f} us"))
        return out


def _interpolate(points: tuple[Point, ...], size: float) -> float:
    """Rate at `size`, linear in log(size) between measured points, clamped at the ends."""
    sizes = [p.size for p in points]
    if size <= sizes[0]:
        return points[0].rate
    if size >= sizes[-1]:
        return points[-1].rate
    i = bisect.bisect_left(sizes, size)
    lo, hi = points[i - 1], points[i]
    f = (math.log(size) - math.log(lo.size)) / (math.log(hi.size) - math.log(lo.size))
    return lo.rate + f * (hi.rate - lo.rate)


def _human(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:g} {unit}"
    return f"{num_bytes} B"


# -- measuring ------------------------------------------------------------------------------------------
def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """-> median_ms(fn, repeat): CUDA events on a GPU, the host clock on the CPU; one warm-up call first."""

    def median_ms(fn: Callable[[], object], repeat: int) -> float:
        fn()
        times = []
        for _ in range(repeat):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return median_ms


def _copy_curve(device: torch.device, sizes: tuple[int, ...], *, to_device: bool, repeat: int) -> tuple[Point, ...]:
    median_ms = _timer(device)
    pin = device.type == "cuda"
    host = torch.empty(max(sizes), dtype=torch.uint8, pin_memory=pin)
    dev = torch.empty(max(sizes), dtype=torch.uint8, device=device)
    points = []
    for size in sizes:
        src, dst = (host[:size], dev[:size]) if to_device else (dev[:size], host[:size])
        ms = median_ms(lambda: dst.copy_(src, non_blocking=True), repeat)
        points.append(Point(size=size, rate=size / (ms * 1e-3) / 1e9))
    return tuple(points)


def _bidirectional_gb_s(device: torch.device, size: int, *, repeat: int) -> float:
    if device.type != "cuda":
        return 0.0
    up_host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    down_host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    up_dev, down_dev = (torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2))
    up, down = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def both() -> None:
        main = torch.cuda.current_stream(device)
        for stream in (up, down):
            stream.wait_stream(main)
        with torch.cuda.stream(up):
            up_dev.copy_(up_host, non_blocking=True)
        with torch.cuda.stream(down):
            down_host.copy_(down_dev, non_blocking=True)
        main.wait_stream(up)
        main.wait_stream(down)

    ms = _timer(device)(both, repeat)
    return 2 * size / (ms * 1e-3) / 1e9


def _gemm_curves(device: torch.device, *, repeat: int) -> tuple[GemmCurve, ...]:
    median_ms = _timer(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes, row_counts = (GEMM_SHAPES_GPU, GEMM_ROWS_GPU) if device.type == "cuda" else (GEMM_SHAPES_CPU, GEMM_ROWS_CPU)
    curves = []
    for hidden, out_features in shapes:
        weight = torch.randn(out_features, hidden, dtype=dtype, device=device) * 0.02
        x_all = torch.randn(max(row_counts), hidden, dtype=dtype, device=device)
        points = []
        for rows in row_counts:
            x = x_all[:rows]
            ms = median_ms(lambda: torch.nn.functional.linear(x, weight), repeat)
            points.append(Point(size=rows, rate=2 * rows * hidden * out_features / (ms * 1e-3) / 1e12))
        curves.append(GemmCurve(hidden=hidden, out_features=out_features, points=tuple(points)))
        del weight, x_all
    return tuple(curves)


def _attention_gb_s(device: torch.device, *, repeat: int) -> float:
    """Decode attention over a GPU-resident cache, KV bytes read per second (the kernel the engine uses).

    Timed on the GPU's clock, calls queued behind a GPU sleep (engine/gpu_timing.py), as the engine's graphed steps
    run it. Ten calls bracketed by events from an idle GPU (profile version 2) counted the host's planning and
    launch: on an H200 that read 3.0-3.5 TB/s where the kernel reads 4.6 (bench/results/decode_attention.md), and
    the GPU-resident predictions came out 8-19 % slow."""
    if device.type == "cuda":
        from engine.gpu_timing import queued_median_ms
        from kernels.decode_attention import decode_attention

        batch, heads, seq, dim, dtype = 8, 32, 4096, 128, torch.bfloat16  # 537 MB of K/V: 9x an H200's L2
        q = torch.randn(batch, heads, dim, dtype=dtype, device=device)
        k, v = (torch.randn(batch, heads, seq, dim, dtype=dtype, device=device) for _ in range(2))
        lens = torch.full((batch,), seq, dtype=torch.int32, device=device)
        with torch.cuda.device(device):
            ms = queued_median_ms(lambda i: decode_attention(q, k, v, lens, sm_scale=dim**-0.5), num_sets=1,
                                  repeat=repeat)
    else:
        from engine.decode.attention import decode_attention_torch
        from kernels.segments import KVSegment

        batch, heads, seq, dim = 2, 4, 512, 64
        q = torch.randn(batch, heads, dim)
        k, v = (torch.randn(batch, heads, seq, dim) for _ in range(2))
        lens = torch.full((batch,), seq)
        segments = (KVSegment(k, v, 0),)
        ms = _timer(device)(lambda: decode_attention_torch(q, segments, lens, scale=dim**-0.5), repeat)
    return 2 * k.numel() * k.element_size() / (ms * 1e-3) / 1e9


def _launch_us(device: torch.device) -> float:
    """Host cost of enqueuing one small kernel (what an uncaptured eager step pays per op)."""
    x = torch.zeros(16, device=device)
    for _ in range(50):
        x.add_(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    count = 2000
    t0 = time.perf_counter()
    for _ in range(count):
        x.add_(1)
    host_us = (time.perf_counter() - t0) / count * 1e6
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return host_us


def measure(device: torch.device | str, *, quick: bool = False) -> HardwareProfile:
    """Run every measurement on `device` (a few seconds on a GPU). `quick`: fewer repeats (tests)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    repeat = 3 if quick else 10
    gpu = device.type == "cuda"
    sizes = COPY_SIZES_GPU if gpu else COPY_SIZES_CPU
    with torch.inference_mode():
        h2d = _copy_curve(device, sizes, to_device=True, repeat=repeat)
        d2h = _copy_curve(device, sizes, to_device=False, repeat=repeat)
        bidir = _bidirectional_gb_s(device, sizes[-1], repeat=repeat)
        hbm_bytes = (1 << 30) if gpu else (64 << 20)
        src = torch.empty(hbm_bytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        hbm = hbm_bytes / (_timer(device)(lambda: dst.copy_(src), repeat) * 1e-3) / 1e9
        del src, dst
        gemm = _gemm_curves(device, repeat=repeat)
        attention = _attention_gb_s(device, repeat=repeat)
        launch = _launch_us(device)
    name, driver = _identity(device)
    notes = () if gpu else ("no GPU: copies are host-memory copies and GEMMs run on the CPU",)
    if gpu:
        torch.cuda.empty_cache()
    return HardwareProfile(device_type=device.type, device_name=name, driver=driver, torch_version=torch.__version__,
                           measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), h2d=h2d, d2h=d2h,
                           bidirectional_gb_s=bidir, hbm_copy_gb_s=hbm, attention_gb_s=attention, gemm=gemm,
                           launch_us=launch, notes=notes)


def _identity(device: torch.device) -> tuple[str, str]:
    if device.type != "cuda":
        import platform

        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)", "none"
    name = torch.cuda.get_device_name(device)
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:  # noqa: BLE001 - NVML is optional for the key: fall back to the CUDA runtime's version
        driver = f"cuda {torch.version.cuda}"
    return name, driver


# -- the cache ------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return cache_root() / "hardware"


def cache_path(device: torch.device | str) -> Path:
    device = torch.device(device)
    name, driver = _identity(device)
    key = re.sub(r"[^A-Za-z0-9.]+", "-", f"{name}_{driver}_torch-{torch.__version__}").strip("-")
    return cache_dir() / f"{key}.json"


def hardware_profile(device: torch.device | str, *, refresh: bool = False, quick: bool = False) -> HardwareProfile:
    """The cached profile of `device`, measured (and cached) when missing, outdated or `refresh`."""
    path = cache_path(device)
    if not refresh and path.exists():
        try:
            profile = HardwareProfile.from_dict(json.loads(path.read_text()))
            if profile.version == PROFILE_VERSION:
                return profile
        except (ValueError, TypeError, KeyError):
            pass  # an unreadable or old cache entry is measured again
    profile = measure(device, quick=quick)
    write_cache_file(path, profile.to_json())  # a read-only home still gets a profile, just not a cached one
    return profile


def format_table(profile: HardwareProfile) -> str:
    rows = [("what", "size", "measured"), *profile.rows()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{profile.device_name} | driver {profile.driver} | torch {profile.torch_version} | {profile.measured_at}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"note: {n}" for n in profile.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.offload.profiler", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--refresh", action="store_true", help="measure again instead of reading the cache")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (seconds less, noisier)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    profile = hardware_profile(args.device, refresh=args.refresh, quick=args.quick)
    print(format_table(profile))
    print(f"cached in {cache_path(args.device)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
