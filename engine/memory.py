"""Will it fit? Checks made before weights or a KV cache are allocated.

On the GPU an allocation that does not fit raises; on the CPU it may succeed lazily and then bring in the
operating system's out-of-memory killer, which ends the whole process (and the app with it). So sizes are
compared with what is free first, and a request that cannot fit fails with a message naming the fix.
"""

from __future__ import annotations

import gc

import torch

from engine import gpu_errors
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


def held_bytes(device: torch.device | str) -> int:
    """Bytes of tensors alive on `device` now: what a finished or failed run must give back.

    On the GPU, the caching allocator's allocated bytes; on the CPU, the storages of every tensor the garbage
    collector can reach (each storage counted once), after a collection."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        # type(), not isinstance: isinstance reads __class__, which some lazy module proxies turn into warnings.
        kind = type(obj)
        if kind.__name__ in ("FakeTensor", "FunctionalTensor"):  # torch.compile's stand-ins own no memory
            continue
        if issubclass(kind, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            try:
                storage = obj.untyped_storage()
                address, size = storage.data_ptr(), storage.nbytes()
            except (RuntimeError, NotImplementedError):  # sparse layouts; fake tensors left by torch.compile
                continue
            seen[address] = max(seen.get(address, 0), size)
    return sum(seen.values())


def release_run_memory(device: torch.device | str) -> None:
    """After a run on `device` ends (done or failed), give back what it left in torch's caches beyond its tensors:
    the cuBLAS workspaces of the threads and streams it ran GEMMs on (32 MiB each on Hopper; a server's worker
    threads each add theirs, engine/streams.py). Cheap: no garbage collection, no return of cached memory."""
    device = torch.device(device)
    # On the CPU there is nothing of the kind; a lost GPU context answers every call with its error.
    if device.type == "cuda" and gpu_errors.lost() is None:
        # The run's kernels finish before their workspaces are reused; its graphs are never replayed again.
        torch.cuda.synchronize(device)
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # torch's own call before graph capture
        if clear is not None:
            clear()
