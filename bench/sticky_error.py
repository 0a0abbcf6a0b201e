"""A sticky CUDA error inside an offloaded profiling run, in a process of its own (the error kills its context).

`python bench/sticky_error.py [--out FILE]` loads a tiny model on the GPU, starts an offloaded profile through the
lab's session, and at decode step 2 launches a Triton kernel that stores to an address no allocation holds
(cudaErrorIllegalAddress, the error the 32-bit offsets gave). It then checks what a user would meet: the error
type and message (the GPU context is lost, restart the app), that the run's host memory was released, that nothing
hung (every call returns within its time), and that the next run and the next load are refused at once with the
same explanation. Prints one JSON object (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _store_far(x_ptr, offset):
    tl.store(x_ptr + offset, 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import engine.offload.runtime as runtime_module
    from engine import gpu_errors
    from engine.errors import GpuContextLostError, KVLabError
    from engine.lab.session import LabSession
    from engine.offload.store import pinned_bytes
    from engine.settings import GenerationSettings, OffloadSettings

    report: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    session = LabSession()
    session.load("synthetic:tiny-llama", device="cuda")
    settings = GenerationSettings(max_new_tokens=8, ignore_eos=True, offload=OffloadSettings(placement="cpu",
                                                                                            split=0.5))
    real = runtime_module.attend_block
    calls = {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2 * session.model.spec.num_layers + 1:  # the first layer of decode step 2 (eager step 1)
            x = torch.zeros(16, device="cuda")
            _store_far[(1,)](x, 1 << 40)
        return real(*a, **kw)

    runtime_module.attend_block = poisoned
    start = time.perf_counter()
    try:
        for _ in session.profile(replace_graphs_off(settings), batch=2, prompt_tokens=32, gpu_counters=False):
            pass
        report["first_run"] = "finished without an error"
    except GpuContextLostError as exc:
        report["first_run"] = {"error": type(exc).__name__, "message": str(exc)}
    except KVLabError as exc:
        report["first_run"] = {"error": type(exc).__name__, "message": str(exc)}
    report["first_run_s"] = round(time.perf_counter() - start, 2)
    report["pinned_bytes_after"] = pinned_bytes()
    report["lost"] = gpu_errors.lost()
    runtime_module.attend_block = real
    for name, call in (("chat", lambda: list(session.chat([], "hello", settings))),
                       ("load", lambda: session.load("synthetic:tiny-llama", device="cuda"))):
        start = time.perf_counter()
        try:
            call()
            report[f"next_{name}"] = "ran"
        except KVLabError as exc:
            report[f"next_{name}"] = {"error": type(exc).__name__, "message": str(exc)[:400]}
        report[f"next_{name}_s"] = round(time.perf_counter() - start, 2)
    report["ok"] = (isinstance(report["first_run"], dict) and report["first_run"]["error"] == "GpuContextLostError"
                    and all(isinstance(report[f"next_{n}"], dict) and report[f"next_{n}"]["error"] ==
                            "GpuContextLostError" for n in ("chat", "load")))
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if args.out is not None:
        args.out.write_text(text + "\n")
    # The dead context's GPU buffers are kept alive (engine/gpu_errors.py): the interpreter's teardown would free
    # them and abort. A restarted process is what the message asks for; this one leaves without tearing down.
    os._exit(0)


def replace_graphs_off(settings):
    """Eager layers: the poisoned verb must run in Python at the step it is meant for (graphs replay captured work)."""
    from dataclasses import replace

    return replace(settings, cuda_graph=False)


if __name__ == "__main__":
    raise SystemExit(main())
