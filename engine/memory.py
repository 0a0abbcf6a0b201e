"""Will it fit? Checks made before weights or a KV cache are allocated.

On the GPU an allocation that does not fit raises; on the CPU it may succeed lazily and then bring in the
operating system's out-of-memory killer, which ends the whole process (and the app with it). So sizes are
compared with what is free first, and a request that cannot fit fails with a message naming the fix.
"""

from __future__ import annotations

import torch

from engine.errors import OutOfMemoryError

# Leave this fraction of the free memory for activations, allocator slack and the rest of the process.
HEADROOM = 0.9


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` in bytes (CPU: the kernel's MemAvailable); None where it cannot be read."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(need_bytes: int, device: torch.device, *, what: str, fix: str) -> None:
    """Raise OutOfMemoryError when `need_bytes` exceed the usable free memory of `device`."""
    free = available_bytes(device)
    if free is None or need_bytes <= HEADROOM * free:
        return
    where = "GPU" if device.type == "cuda" else "host"
    raise OutOfMemoryError(f"{what} needs {need_bytes / 2**30:.2f} GiB of {where} memory but only "
                           f"{free / 2**30:.2f} GiB is free on {device}: {fix}")
