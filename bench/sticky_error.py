"""A sticky CUDA error inside an offloaded profiling run, in a process of its own (the error kills its context).

`python bench/sticky_error.py [--out FILE]` loads a tiny model on the GPU, starts an offloaded profile through the
lab's session, and at decode step 2 launches a Triton kernel that stores to an address no allocation holds
(cudaErrorIllegalAddress, the error the 32-bit offsets gave). It then checks what a user would meet: the error
type and message (the GPU context is lost, restart the app), that the run's host memory was released, that nothing
hung (every call returns within its time), and that the next run and the next load are refused at once with the
same explanation. Prints one JSON object (and writes it to --out).

`--fault capture` checks the other side: an error that leaves the context usable. The first chat's CUDA-graph capture
of its decode step is made to fail (the attention call synchronises while the stream captures: "operation not
permitted when stream is capturing"). The chat must be reported as a failed run, not as a lost context; the next
chat, a reload and a chat after it must run, the two chats giving the same reply.
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
    parser.add_argument("--fault", choices=("sticky", "capture"), default="sticky")
    args = parser.parse_args(argv)
    if args.fault == "capture":
        return failed_capture(args)

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


def failed_capture(args) -> int:
    import kernels.decode_attention as kda
    from engine import gpu_errors
    from engine.errors import KVLabError
    from engine.lab.session import LabSession
    from engine.settings import GenerationSettings, OffloadSettings

    report: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "fault": "capture"}
    session = LabSession()
    session.load("synthetic:tiny-llama", device="cuda")
    settings = GenerationSettings(max_new_tokens=8, ignore_eos=True, offload=OffloadSettings(placement="gpu"))
    real = kda.decode_attention_segments
    captures = {"faulted": 0}

    def syncing(*a, **kw):
        if torch.cuda.is_current_stream_capturing():
            captures["faulted"] += 1
            torch.cuda.synchronize()  # not permitted while capturing: the capture fails, the context stays
        return real(*a, **kw)

    kda.decode_attention_segments = syncing
    start = time.perf_counter()
    try:  # the first chat of the session: its decode step is captured in a CUDA graph
        list(session.chat([], "hello", settings))
        report["first_run"] = "finished without an error"
    except KVLabError as exc:
        report["first_run"] = {"error": type(exc).__name__, "message": str(exc)[:600]}
    except Exception as exc:  # noqa: BLE001 - an unwrapped error is a finding too
        report["first_run"] = {"error": f"unwrapped {type(exc).__name__}", "message": str(exc)[:600]}
    report["first_run_s"] = round(time.perf_counter() - start, 2)
    report["captures_faulted"] = captures["faulted"]
    report["lost"] = gpu_errors.lost()
    kda.decode_attention_segments = real
    replies = []
    for name, call in (("next_chat", lambda: replies.append(list(session.chat([], "hello", settings))[-1].reply)),
                       ("next_load", lambda: session.load("synthetic:tiny-llama", device="cuda")),
                       ("chat_after_reload", lambda: replies.append(list(session.chat([], "hello", settings))[-1].reply))):
        try:
            call()
            report[name] = "ran"
        except KVLabError as exc:
            report[name] = {"error": type(exc).__name__, "message": str(exc)[:400]}
    report["same_reply_as_a_fresh_load"] = len(replies) == 2 and replies[0] == replies[1]
    report["ok"] = (captures["faulted"] > 0 and isinstance(report["first_run"], dict)
                    and report["first_run"]["error"] != "GpuContextLostError"
                    and not report["first_run"]["error"].startswith("unwrapped") and not report["lost"]
                    and all(report[n] == "ran" for n in ("next_chat", "next_load", "chat_after_reload"))
                    and report["same_reply_as_a_fresh_load"])
    text = json.dumps(report, indent=2, default=str)
    print(text, flush=True)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


def replace_graphs_off(settings):
    """Eager layers: the poisoned verb must run in Python at the step it is meant for (graphs replay captured work)."""
    from dataclasses import replace

    return replace(settings, cuda_graph=False)


if __name__ == "__main__":
    raise SystemExit(main())
