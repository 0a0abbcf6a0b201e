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


def streaming_read_gb_s(*, num_bytes: int = 2 << 30, repeat: int = 10) -> float:
    """Read-only streaming bandwidth: a bf16 -> fp32 sum over a buffer far larger than L2."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    ms = median_ms(lambda: torch.sum(src, dtype=torch.float32), warmup=3, repeat=repeat)
    del src
    return num_bytes / (ms * 1e-3) / 1e9


# (programs per SM, block elements, warps) the read sweeps: persistent grids of 1-16 programs per SM, 8-32 KiB blocks
READ_CONFIGS = tuple((per_sm, block, warps) for per_sm in (2, 4, 8, 16) for block in (4096, 8192, 16384)
                     for warps in (4, 8))
LAST_READ_SWEEP: dict[str, float] = {}  # "programs/SM x block x warps" -> GB/s of the last sweep (for notes)


def read_config_label(per_sm: int, block: int, warps: int) -> str:
    return f"{per_sm}/SM x {block} x {warps} warps"


def triton_read_gb_s(*, num_bytes: int = 4 << 30, configs=READ_CONFIGS, repeat: int = 10) -> float:
    """The device's achievable read bandwidth: the fastest of kernels/stream_read.py's configs over a bf16 buffer far
    larger than L2 (4 GiB; each config's median over `repeat`); LAST_READ_SWEEP keeps every config's figure. The
    buffer shrinks to a quarter of the free memory when 4 GiB would not fit. Without a GPU: a torch sum over host
    memory (the interpreter runs the kernel correctly, not fast)."""
    if not torch.cuda.is_available():
        src = torch.randn(min(num_bytes, 256 << 20) // 4)
        ms = median_ms(lambda: torch.sum(src), warmup=2, repeat=repeat)
        return src.numel() * 4 / (ms * 1e-3) / 1e9
    from kernels.stream_read import stream_read

    free, _ = torch.cuda.mem_get_info()
    largest_block = max(block for _, block, _ in configs)
    num_bytes = min(num_bytes, free // 4) // (2 * largest_block) * (2 * largest_block)
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    LAST_READ_SWEEP.clear()
    for per_sm, block, warps in configs:
        ms = median_ms(lambda: stream_read(src, programs=per_sm * num_sms, block=block, num_warps=warps),
                       warmup=3, repeat=repeat)
        LAST_READ_SWEEP[read_config_label(per_sm, block, warps)] = num_bytes / (ms * 1e-3) / 1e9
    del src
    return max(LAST_READ_SWEEP.values())


def read_floor_ms(num_bytes: int, *, repeat: int = 10, top: int = 4, configs=READ_CONFIGS) -> tuple[float, str]:
    """The fastest any kernel can read `num_bytes` once from DRAM: the Triton streaming read over buffers of exactly
    that size, rotated past L2 and queued back to back as the benches time their kernels (engine/gpu_timing), with
    the `top` fastest configs of the last large-buffer sweep (all configs when none ran). -> (ms, config label).

    A kernel that must read these bytes cannot beat this floor by more than noise: ramp-up and tail of a short
    launch are in it, which the large-buffer ceiling leaves out."""
    from engine.gpu_timing import queued_median_ms
    from kernels.stream_read import stream_read

    ranked = sorted(configs, key=lambda c: -LAST_READ_SWEEP.get(read_config_label(*c), 0.0))
    chosen = ranked[:top] if LAST_READ_SWEEP else list(configs)
    num_sets = cold_l2_num_sets(num_bytes)
    bufs = [torch.empty(max(1, num_bytes // 2), dtype=torch.bfloat16, device="cuda").normal_() for _ in range(num_sets)]
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    best_ms, best_label = float("inf"), ""
    for per_sm, block, warps in chosen:
        ms = queued_median_ms(lambda i: stream_read(bufs[i], programs=per_sm * num_sms, block=block, num_warps=warps),
                              num_sets=num_sets, repeat=repeat)
        if ms < best_ms:
            best_ms, best_label = ms, read_config_label(per_sm, block, warps)
    del bufs
    torch.cuda.empty_cache()
    return best_ms, best_label


def read_sweep_note() -> str:
    """The last sweep's fastest and slowest configs, for a bench's notes."""
    if not LAST_READ_SWEEP:
        return ""
    ranked = sorted(LAST_READ_SWEEP.items(), key=lambda kv: -kv[1])
    return (f"Triton streaming read over {len(ranked)} configs (programs/SM x block elements x warps): fastest "
            f"{ranked[0][0]} {ranked[0][1]:.0f} GB/s, slowest {ranked[-1][0]} {ranked[-1][1]:.0f} GB/s")
