"""Errors after which this process can no longer use the GPU: illegal addresses, launch failures, device asserts.

CUDA makes such errors sticky: the context is corrupted, every later CUDA call in the process returns the same
error, and only a new process gets a working GPU again. The engine recognises them wherever a run fails, releases
what it can (host memory is freed even where CUDA refuses to unregister it), marks the process as lost so that
later runs are refused at once with the same explanation instead of failing somewhere odd, and says that the app
must be restarted. Nothing the failed run held on the GPU is freed (see `keep`): the app stays up to say so.
"""

from __future__ import annotations

import threading

# Phrases of the CUDA runtime's messages (as torch raises them) for errors that corrupt the context. Not a bare
# "device-side assert": torch ends every CUDA error's message with "Compile with `TORCH_USE_CUDA_DSA` to enable
# device-side assertions", so that phrase would call any CUDA error (a failed graph capture, a bad launch argument)
# sticky; an assert that fired reads "device-side assert triggered".
STICKY_MARKERS = (
    "illegal memory access", "cudaerrorillegaladdress", "illegal instruction", "unspecified launch failure",
    "cudaerrorlaunchfailure", "misaligned address", "device-side assert triggered", "cudaerrorassert",
    "invalid program counter", "hardware stack error", "uncorrectable ecc", "cudaerrorecc", "an illegal address",
)

_lock = threading.Lock()
_lost: str | None = None  # the first sticky error this process saw, as one line
# What a failed run held on the GPU, kept for the life of the process: after a sticky error, freeing any CUDA tensor
# (torch's allocator asks the dead context whether a graph capture is under way) throws inside a destructor and
# aborts the whole process (seen on an H200, torch 2.11). Kept, nothing is freed, and the app goes on answering.
_kept: list = []


def is_context_lost(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a CUDA error that corrupts the GPU context."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if any(marker in text for marker in STICKY_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def mark_lost(detail: str) -> None:
    global _lost
    with _lock:
        if _lost is None:
            _lost = detail


def keep(*objects) -> None:
    """Hold `objects` (a failed run's exception with its traceback, its runtime) until the process ends."""
    with _lock:
        _kept.extend(objects)


def lost() -> str | None:
    """The sticky error this process saw (None while the GPU works)."""
    return _lost


def lost_message(stage: str | None = None) -> str:
    where = f" during {stage}" if stage else ""
    return (f"The GPU reported an unrecoverable error{where} ({_lost}): the CUDA context of this process is lost and "
            "no further GPU work can run in it. The run's host memory was released. Restart the app (or the Python "
            "process) to continue; if it happens again with the same settings, choose decode attention 'torch' in "
            "Settings or report the settings that led here.")


def reset_for_tests() -> None:
    global _lost
    with _lock:
        _lost = None
        _kept.clear()
