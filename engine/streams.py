"""The CUDA streams the engine runs side work on: one per (device, role) for the life of the process.

cuBLAS keeps a workspace (32 MiB on Hopper) for every (handle, stream) pair it has run a GEMM on, until the
process ends or the workspaces are cleared. A fresh stream per run (warm-ups before graph capture, the offload
runtime's copy streams) therefore grew GPU memory by a workspace per run: measured on an H100, a chat's memory
rose by 32 MiB per reply until torch's pool of streams wrapped, ~1.1 GB over 40 replies. Reused streams keep the
pairs few; `engine.memory.release_run_memory` clears what the threads of a server still add.
"""

from __future__ import annotations

import threading

import torch

_streams: dict[tuple[torch.device, str], torch.cuda.Stream] = {}
_lock = threading.Lock()


def side_stream(device: torch.device | str, role: str) -> torch.cuda.Stream:
    """The stream for `role` ("warm-up", "h2d", "d2h", ...) on `device`, made on first use."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _lock:
        stream = _streams.get((device, role))
        if stream is None:
            stream = _streams[(device, role)] = torch.cuda.Stream(device)
        return stream


__all__ = ["side_stream"]
