"""Programmatic dependent launch (Hopper): let a kernel's programs start while the previous kernel finishes.

Inside a CUDA graph each kernel otherwise waits for the previous one to drain and then pays its own launch (>= 1.2 µs a
node on an H200), and a decode step is hundreds of small nodes. Launched with `launch_pdl=True`, a kernel may be
scheduled as soon as every program of the previous one has called `launch_dependents`; `enter` makes each of our
kernels first wait for the previous grid to complete (`griddepcontrol.wait`: its writes are visible after it), then
signal its own successor. Since nothing is read or written before the wait, a kernel that runs early is exactly as
correct as one that runs late; the gain is the launch hidden under the predecessor's tail. Off by default (opt in
per launch); the interpreter and older Triton releases without the instructions run without it.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    AVAILABLE = True
except ImportError:  # a Triton release without grid dependency control
    AVAILABLE = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@triton.jit
def enter(PDL: tl.constexpr):
    """First statement of a kernel that may be launched early: wait for the previous grid, release the next one."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def usable(device, *, interpreting: bool) -> bool:
    """Whether launches on `device` can ask for PDL (a CUDA GPU of compute capability 9.0 or newer, a Triton that has
    the instructions, not the interpreter)."""
    import torch

    if interpreting or not AVAILABLE or torch.device(device).type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9
