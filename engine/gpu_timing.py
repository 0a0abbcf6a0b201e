"""GPU time of one kernel call, with the host's launch overhead left out: what a call costs inside a CUDA graph.

Triton's Python launcher and the planner take tens of microseconds on the host, as long as a 40 µs attention kernel
runs. A timer that records an event, launches, and records again (triton's do_bench) then measures the host: on an
H200 it read 0.139 ms for a B1 x 32K-key call that runs in 0.041 ms back to back. Here each sample queues enough
calls to last `min_sample_ms` behind a GPU sleep, so the GPU runs them back to back; events bracket only the calls.
Buffer sets are rotated (`fn(i)`, i cycling) so that each call finds its K/V cold in L2.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def queued_median_ms(fn: Callable[[int], object], *, num_sets: int, warmup: int = 3, repeat: int = 10,
                     min_sample_ms: float = 2.0) -> float:
    """Median ms per call of `fn(i)`, i cycling over `num_sets` buffer sets, on the current CUDA device."""
    for i in range(warmup):
        fn(i % num_sets)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(0)
    end.record()
    end.synchronize()
    calls = max(1, min(200, int(min_sample_ms / max(start.elapsed_time(end), 1e-3))))
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i % num_sets)
    host_s = time.perf_counter() - t0  # time to enqueue one sample's calls
    torch.cuda.synchronize()
    times_ms = []
    for r in range(repeat):
        torch.cuda._sleep(int(host_s * 1.5 * 2e9) + 100_000)  # ~2 GHz: keeps the GPU busy while we enqueue
        start.record()
        for i in range(calls):
            fn((r * calls + i) % num_sets)
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end) / calls)
    return statistics.median(times_ms)
