"""A sticky CUDA error (illegal address, launch failure) inside a run, injected on the CPU where the GPU raises it:
the run ends with GpuContextLostError saying the app must be restarted, host memory is released, the run's device
buffers are kept (freeing one after a lost context aborts the process), and later GPU runs and loads are refused at
once. The same path ran once on an H200 (bench/results/sticky_error.json, bench/sticky_error.py)."""

from __future__ import annotations

import pytest
import torch

import engine.offload.runtime as runtime_module
from engine import GenerationSettings, Generator, gpu_errors
from engine.errors import GpuContextLostError, KVLabError
from engine.lab.session import LabSession
from engine.settings import OffloadSettings

pytestmark = pytest.mark.usefixtures("one_thread", "profile_cache")

ILLEGAL = "CUDA error: an illegal memory access was encountered"


@pytest.fixture(autouse=True)
def fresh_process_state():
    gpu_errors.reset_for_tests()
    yield
    gpu_errors.reset_for_tests()


def _poison(monkeypatch, *, after_calls: int):
    """attend_block raises the runtime's message for an illegal address on its `after_calls`-th call, and so does
    every later device synchronisation (the error is sticky)."""
    real = runtime_module.attend_block
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= after_calls:
            raise torch.AcceleratorError(ILLEGAL) if hasattr(torch, "AcceleratorError") else RuntimeError(ILLEGAL)
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime_module, "attend_block", poisoned)
    return calls


def test_a_sticky_error_mid_run_reports_a_lost_context_and_releases_host_memory(tiny, monkeypatch):
    released = []
    real_release_host = runtime_module.OffloadStore.release_host

    def tracked(store):
        released.append(store)
        return real_release_host(store)

    monkeypatch.setattr(runtime_module.OffloadStore, "release_host", tracked)
    # The context is lost from the error on: the runtime's final synchronisation fails too.
    _poison(monkeypatch, after_calls=2 * tiny.spec.num_layers + 1)
    settings = GenerationSettings(max_new_tokens=6, ignore_eos=True, offload=OffloadSettings(placement="cpu", split=0.5))
    with pytest.raises(GpuContextLostError) as lost:
        Generator(tiny).generate([[5, 6, 7, 8] * 4, [9, 10]], settings)
    text = str(lost.value)
    assert "during decode step 3" in text and "CUDA context of this process is lost" in text
    assert "Restart the app" in text and "illegal memory access" in text
    assert gpu_errors.lost() is not None and "illegal memory access" in gpu_errors.lost()
    assert released, "the host store must be released even though the context is lost"
    assert not hasattr(released[0], "host_kv") and not hasattr(released[0], "host_act")
    # The run's exception (its frames hold the device buffers) is kept: nothing of the run was freed.
    assert any(isinstance(kept, BaseException) for kept in gpu_errors._kept)


def test_later_gpu_runs_and_loads_are_refused_at_once(tiny, monkeypatch):
    gpu_errors.mark_lost(f"AcceleratorError: {ILLEGAL}")
    monkeypatch.setattr(tiny, "device", torch.device("cuda"))  # a model on the lost GPU (nothing reaches CUDA)
    with pytest.raises(GpuContextLostError, match="Restart the app"):
        next(Generator(tiny).stream([[5, 6, 7]], GenerationSettings(max_new_tokens=2)))
    import engine.loader as loader

    monkeypatch.setattr(loader, "resolve_device_dtype", lambda device, dtype: (torch.device("cuda"), torch.bfloat16))
    with pytest.raises(GpuContextLostError, match="no further GPU work can run"):
        loader.load_model("synthetic:tiny-llama", device="cuda")
    # A CPU model in the same process still runs: only the GPU is gone.
    monkeypatch.setattr(tiny, "device", torch.device("cpu"))
    assert Generator(tiny).generate([[5, 6, 7]], GenerationSettings(max_new_tokens=2, ignore_eos=True)).token_ids


def test_the_session_reports_the_loss_to_the_panel_that_ran_it(monkeypatch):
    session = LabSession()
    session.load("synthetic:tiny-llama", device="cpu", dtype="float32")
    _poison(monkeypatch, after_calls=4)
    settings = GenerationSettings(max_new_tokens=5, ignore_eos=True, offload=OffloadSettings(placement="cpu"))
    with pytest.raises(KVLabError) as failed:
        for _ in session.profile(settings, batch=2, prompt_tokens=16, gpu_counters=False):
            pass
    assert isinstance(failed.value, GpuContextLostError) and "Restart the app" in str(failed.value)
    assert session.busy() is None  # the job ended: nothing hangs, the lock is free
    assert session.model is not None  # the loaded model is kept (freeing its weights would abort the process)


_TORCH_TAIL = ("\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
               "might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\nCompile with "
               "`TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")


@pytest.mark.parametrize("message, sticky", [
    ("CUDA error: an illegal memory access was encountered", True),
    ("CUDA error: unspecified launch failure", True),
    ("CUDA error: device-side assert triggered", True),
    ("CUDA error: misaligned address", True),
    ("CUDA error: operation failed due to a previous error during capture", False),
    ("CUDA error: operation not permitted when stream is capturing", False),
    ("CUDA error: invalid argument", False),
    ("CUDA error: too many resources requested for launch", False),
])
def test_only_errors_that_corrupt_the_context_count_as_lost(message, sticky):
    """As torch raises them: every CUDA error's message ends with a hint about device-side assertions, which must
    not make a recoverable error (a failed graph capture, a bad launch) look like a lost context."""
    error = RuntimeError(message + _TORCH_TAIL)
    assert gpu_errors.is_context_lost(error) is sticky
    try:
        raise ValueError("the engine's wrapper") from error
    except ValueError as wrapped:
        assert gpu_errors.is_context_lost(wrapped) is sticky  # found through the cause chain too
