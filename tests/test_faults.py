"""Faults inside a run: each is reported with a message naming what failed and what to do, the run's memory is
given back (measured: bytes of live tensors before the run and after the failure, and page-locked host bytes),
and the next run on the same session gives the same reply as before the fault.

On the CPU the faults are injected where the GPU would raise them (an allocation in prefill or in a decode
step, cudaHostRegister, a Triton launch, the NVML sampler thread); `bench/suites/reliability.py` forces the
real ones on a GPU (a memory budget set with torch's per-process limit, a kernel launch the compiler refuses).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import engine.decode.forward
import engine.lab.runs
import engine.offload.store
from engine.errors import KVLabError, OutOfMemoryError, RunFailedError
from engine.memory import held_bytes
from engine.offload.runtime import OffloadRuntime
from engine.offload.store import pinned_bytes
from engine.lab.session import LabSession
from engine.settings import GenerationSettings, OffloadSettings, SamplingSettings

pytestmark = pytest.mark.usefixtures("one_thread", "profile_cache")  # conftest.py

GREEDY = GenerationSettings(max_new_tokens=6, sampling=SamplingSettings(temperature=0.0), ignore_eos=True)
OFFLOADED = replace(GREEDY, offload=OffloadSettings(placement="cpu", split=0.5))
PLACEMENTS = {"gpu-resident": GREEDY, "offloaded": OFFLOADED}
MESSAGE = "To be, or not to be"


@pytest.fixture(scope="module")
def session():
    session = LabSession()
    session.load("synthetic:tiny-llama", device="cpu", dtype="float32")
    return session


def reply(session: LabSession, settings: GenerationSettings) -> str:
    *_, last = session.chat([], MESSAGE, settings)
    assert last.finish_reason is not None
    return last.reply


@pytest.fixture(scope="module")
def baseline(session):
    """What each placement replies before any fault; every run after a fault must reply the same."""
    return {name: reply(session, settings) for name, settings in PLACEMENTS.items()}


def survives(session, baseline, placement: str, fault, *needles: str, error: type[KVLabError] = KVLabError,
             settings: GenerationSettings | None = None) -> str:
    """Run a chat under `fault` (a context manager): it fails with `error` naming every needle, gives back every
    byte it held, and the next chat replies as before. Returns the message."""
    settings = settings or PLACEMENTS[placement]
    held_before, pinned_before = held_bytes("cpu"), pinned_bytes()
    with fault:
        with pytest.raises(KVLabError) as info:
            reply(session, settings)
    message = str(info.value)
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {message}"
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in: {message}"
    del info
    # Measured, not assumed: every tensor the failed run made is gone (CPU: live storages, exact).
    assert held_bytes("cpu") - held_before == 0
    assert pinned_bytes() == pinned_before == 0
    assert session.model is not None and session.busy() is None
    assert reply(session, settings) == baseline[placement]
    return message


class Patched:
    """monkeypatch as a context manager: `attr` of `target` replaced while the block runs."""

    def __init__(self, target, attr: str, value):
        self.target, self.attr, self.value = target, attr, value

    def __enter__(self):
        self.original = getattr(self.target, self.attr)
        setattr(self.target, self.attr, self.value)

    def __exit__(self, *exc):
        setattr(self.target, self.attr, self.original)


def oom_after(original, *, calls_before: int = 0):
    """`original`, but raising torch's out-of-memory error on call number `calls_before + 1` (after doing the
    real work, so the run's buffers are in use when it fails)."""
    count = []

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        count.append(1)
        if len(count) == calls_before + 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return result
    return wrapped


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_out_of_memory_in_prefill(session, baseline, placement):
    fault = Patched(engine.decode.forward, "prefill", oom_after(engine.decode.forward.prefill))
    survives(session, baseline, placement, fault, "out of memory", "during prefill", "lower the batch",
             "memory of this run was released", error=OutOfMemoryError)


def test_out_of_memory_in_a_decode_step(session, baseline):
    fault = Patched(engine.decode.forward, "decode_step", oom_after(engine.decode.forward.decode_step, calls_before=2))
    survives(session, baseline, "gpu-resident", fault, "out of memory", "during decode step 3",
             "memory of this run was released", error=OutOfMemoryError)


def test_out_of_memory_in_an_offloaded_decode_step(session, baseline):
    fault = Patched(OffloadRuntime, "decode", oom_after(OffloadRuntime.decode, calls_before=1))
    survives(session, baseline, "offloaded", fault, "out of memory", "during decode step 2", "offload",
             error=OutOfMemoryError)


class FakeCudart:
    """cudaHostRegister as the CUDA runtime answers it: success for the first `succeed` buffers, then
    cudaErrorMemoryAllocation (2); unregister counts what it is given back."""

    def __init__(self, succeed: int):
        self.succeed, self.registered, self.unregistered = succeed, [], []

    def cudaHostRegister(self, ptr, num_bytes, flags):
        if len(self.registered) >= self.succeed:
            return 2
        self.registered.append(ptr)
        return 0

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


class PinningFails:
    """The store page-locks its host buffers (as for a GPU) and cudaHostRegister fails after `succeed` buffers."""

    def __init__(self, succeed: int = 1):
        self.succeed = succeed

    def __enter__(self):
        self.cudart = FakeCudart(succeed=self.succeed)
        self.patches = [Patched(engine.offload.store, "pins_host_memory", lambda device: True),
                        Patched(torch.cuda, "cudart", lambda: self.cudart)]
        for patch in self.patches:
            patch.__enter__()

    def __exit__(self, *exc):
        for patch in reversed(self.patches):
            patch.__exit__(*exc)
        # What was registered was unregistered, once each.
        assert self.cudart.registered and sorted(self.cudart.unregistered) == sorted(self.cudart.registered)


def test_pinned_memory_allocation_failure(session, baseline):
    survives(session, baseline, "offloaded", PinningFails(), "could not page-lock", "CUDA error 2",
             "placement 'hybrid'", error=OutOfMemoryError)


class RuntimeSetupFails(PinningFails):
    """Every buffer pins, then building the offload runtime runs out of memory (its GPU buffers, under pressure)."""

    def __enter__(self):
        super().__enter__()

        def failing_init(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")
        self.runtime = Patched(OffloadRuntime, "__init__", failing_init)
        self.runtime.__enter__()

    def __exit__(self, *exc):
        self.runtime.__exit__(*exc)
        super().__exit__(*exc)  # checks that every registered buffer was unregistered


def test_a_failure_building_the_offload_runtime_unpins_the_store(session, baseline):
    # Unpinned late, the store's memory would go back to the allocator still registered, and a later store at the
    # same addresses would fail with cudaErrorHostMemoryAlreadyRegistered (seen on an H100 before this was fixed).
    survives(session, baseline, "offloaded", RuntimeSetupFails(succeed=100), "out of memory",
             "during setting up the run", error=OutOfMemoryError)


class LaunchFails:
    """A Triton kernel's launch raises what Triton raises when a launch needs more shared memory than the GPU
    has. `module.attr` is the jitted kernel that the launcher indexes with its grid."""

    def __init__(self, module, attr: str):
        self.module, self.attr = module, attr

    def __enter__(self):
        from triton.runtime.errors import OutOfResources

        class Refusing:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    raise OutOfResources(required=300_000, limit=232_448, name="shared memory")
                return launch

        self.patch = Patched(self.module, self.attr, Refusing())
        self.patch.__enter__()

    def __exit__(self, *exc):
        self.patch.__exit__(*exc)


@pytest.fixture(scope="module")
def demo_session():
    """The demo model (head dim 64, which the decode-attention kernel takes; the tiny presets' 16 it does not)."""
    session = LabSession()
    session.load("demo", device="cpu")
    return session


def test_an_error_raised_inside_the_decode_attention_kernel_launch(demo_session):
    import kernels.decode_attention

    settings = replace(GREEDY, attention="triton")  # the kernel, run by Triton's interpreter
    before = reply(demo_session, settings)
    message = survives(demo_session, {"triton": before}, "triton", LaunchFails(kernels.decode_attention, "_kernel"),
                       "the run failed during decode step 1", "OutOfResources", "shared memory",
                       "memory was released", "decode attention 'torch'", error=RunFailedError, settings=settings)
    assert "prefill" not in message  # prefill runs its own attention; the kernel's first launch is decode step 1


def test_an_error_raised_inside_the_rope_kernel_launch_while_recomputing(session, baseline):
    import kernels.rope

    # An offloaded run that recomputes K/V applies RoPE to them with its Triton kernel, from the first step on.
    survives(session, baseline, "offloaded", LaunchFails(kernels.rope, "_rope_kernel"),
             "the run failed during decode step 1", "OutOfResources", "memory was released", error=RunFailedError)


class FailingLink:
    """A PCIe link sampler whose thread fails after `good` samples, as NvmlSampler does when the driver stops
    answering: `status` turns to "failed: ..." and no more samples come."""

    def __init__(self, good: int):
        from engine.telemetry import NvmlSample

        self.samples_made = [NvmlSample(t_us=1000.0 * i, tx_bytes=i, rx_bytes=i, tx_gb_s=1.0, rx_gb_s=2.0,
                                        gpu_util_pct=None, mem_util_pct=None, mem_used_bytes=None, sm_clock_mhz=None)
                             for i in range(good)]
        self.status = "running"
        self.closed = False

    def samples(self, since: int = 0):
        out = self.samples_made[since:]
        self.status = "failed: NVMLError_GpuIsLost: GPU is lost"
        return out, len(self.samples_made)

    def close(self):
        self.closed = True


def test_a_telemetry_sampler_failure_is_noted_and_the_run_is_kept(session, monkeypatch):
    link = FailingLink(good=3)
    monkeypatch.setattr(engine.lab.runs, "_start_link", lambda device, origin: (link, "NVML link GB/s"))
    settings = replace(GREEDY, max_new_tokens=5)
    held_before, runs = held_bytes("cpu"), len(session.runs)
    *_, last = session.profile(settings, batch=2, prompt_tokens=16)
    record = last.record
    assert record is not None and len(session.runs) == runs + 1 and link.closed
    assert "GPU is lost" in record.link_note and "after 3 samples" in record.link_note
    assert any("PCIe link sampling failed" in note for note in record.notes)
    assert len(record.link) == 3 and len(record.steps) == 4  # the samples before the failure, every step
    del last, record
    assert held_bytes("cpu") == held_before  # a kept run is plain data: plans, spans, samples; no tensors
    monkeypatch.undo()
    *_, again = session.profile(settings, batch=2, prompt_tokens=16)
    assert again.record is not None and "failed" not in again.record.link_note


def test_a_span_recorder_that_times_nothing_fails_the_profile_clearly(session, monkeypatch):
    from engine.telemetry import Recorder

    monkeypatch.setattr(Recorder, "steps", lambda self: [])
    held_before, runs = held_bytes("cpu"), len(session.runs)
    with pytest.raises(RunFailedError, match="Telemetry failed.*not kept.*run the profile again"):
        list(session.profile(replace(GREEDY, max_new_tokens=4), batch=1, prompt_tokens=8))
    assert held_bytes("cpu") == held_before and len(session.runs) == runs and session.live().status.startswith("failed")
    monkeypatch.undo()
    *_, last = session.profile(replace(GREEDY, max_new_tokens=4), batch=1, prompt_tokens=8)
    assert last.record is not None and len(session.runs) == runs + 1
