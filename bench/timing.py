"""Timing on the GPU: medians over repeats after warm-up, with CUDA events, and the memory ceilings."""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 10, sync: bool = True) -> float:
    """Median wall time of `fn()` in ms, timed with CUDA events (host clock on CPU)."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times_ms = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times_ms)


def device_copy_gb_s(*, num_bytes: int = 2 << 30, repeat: int = 10) -> float:
    """Measured bandwidth of a device-to-device copy (host memory without a GPU), bytes read plus written."""
    if not torch.cuda.is_available():
        num_bytes = min(num_bytes, 256 << 20)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.empty(num_bytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=3, repeat=repeat)
    del src, dst
    return 2 * (num_bytes // 2) / (ms * 1e-3) / 1e9


def l2_cache_bytes() -> int:
    """The GPU's L2 size in bytes (50 MiB on an H100 SXM); 0 without a GPU."""
    return torch.cuda.get_device_properties(0).L2_cache_size if torch.cuda.is_available() else 0


def cold_l2_num_sets(bytes_per_set: int, *, min_sets: int = 2, max_total_bytes: int = 8 << 30) -> int:
    """How many copies of a working set to rotate through so each call finds none of its bytes in L2.

    At least `min_sets`, and enough that the sets read between two uses of one set exceed 4x L2.
    """
    wanted = max(min_sets, -(-4 * l2_cache_bytes() // max(1, bytes_per_set)) + 1)
    return max(1, min(wanted, max_total_bytes // max(1, bytes_per_set)))


def rotating_median_ms(fn: Callable[[int], object], *, num_sets: int, warmup: int = 3, repeat: int = 10,
                       min_sample_ms: float = 2.0) -> float:
    """Median ms per call of `fn(i)`, with i cycling over `num_sets` buffer sets (cold L2 per call).

    Each sample queues enough calls to last `min_sample_ms` behind a GPU sleep, so the GPU runs them
    back to back and the host's launch overhead is not counted; events bracket only the calls.
    """
    import time

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


def streaming_read_gb_s(*, num_bytes: int = 2 << 30, repeat: int = 10) -> float:
    """Read-only streaming bandwidth: a bf16 -> fp32 sum over a buffer far larger than L2."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    ms = median_ms(lambda: torch.sum(src, dtype=torch.float32), warmup=3, repeat=repeat)
    del src
    return num_bytes / (ms * 1e-3) / 1e9


def triton_read_gb_s(*, num_bytes: int = 4 << 30, programs_per_sm: int = 8, block: int = 4096,
                     repeat: int = 10) -> float:
    """The device's achievable read bandwidth: kernels/stream_read.py over a bf16 buffer far larger than L2 (4 GiB,
    8 programs per SM, 4096-element blocks: 4.56 TB/s on an H200, where a torch bf16 sum reads 3.99). The buffer
    shrinks to a quarter of the free memory when 4 GiB would not fit. Without a GPU: a torch sum over host memory
    (the interpreter runs the kernel correctly, not fast)."""
    if not torch.cuda.is_available():
        src = torch.randn(min(num_bytes, 256 << 20) // 4)
        ms = median_ms(lambda: torch.sum(src), warmup=2, repeat=repeat)
        return src.numel() * 4 / (ms * 1e-3) / 1e9
    from kernels.stream_read import stream_read

    free, _ = torch.cuda.mem_get_info()
    num_bytes = min(num_bytes, free // 4) // (2 * block) * (2 * block)
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    programs = programs_per_sm * torch.cuda.get_device_properties(0).multi_processor_count
    ms = median_ms(lambda: stream_read(src, programs=programs, block=block), warmup=3, repeat=repeat)
    del src
    return num_bytes / (ms * 1e-3) / 1e9
