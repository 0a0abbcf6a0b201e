"""Errors the engine raises for bad input. Each message names the problem and the fix.

Every error derives from `KVLabError`, so callers (the app, the CLI) can catch one type, show the
message and keep running.
"""


class KVLabError(Exception):
    """Base of every error KV Lab raises on purpose."""


class ModelLoadError(KVLabError):
    """The model could not be found or read (path, config, weights, hub cache)."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not one of the families the engine has an adapter for."""


class InvalidSettingsError(KVLabError, ValueError):
    """A settings value is out of range or of the wrong type."""


class PromptTooLongError(KVLabError, ValueError):
    """Prompt plus new tokens exceed the model's context window."""


class OutOfMemoryError(KVLabError, MemoryError):
    """A run needed more memory than the device had; its buffers were released."""


class CompileError(KVLabError, RuntimeError):
    """torch.compile could not compile the decode step (settings.compile); the run's buffers were released."""


class BusyError(KVLabError, RuntimeError):
    """The session is running a job (a chat reply, a profile) that the request would disturb."""


class RunFailedError(KVLabError, RuntimeError):
    """A run failed inside the engine (a kernel launch, a library call); its memory was released."""


class GpuContextLostError(KVLabError, RuntimeError):
    """The GPU reported an error that corrupts this process's CUDA context (an illegal address, a launch failure):
    no GPU work can run until the process restarts (engine/gpu_errors.py)."""


class TensorParallelError(KVLabError, RuntimeError):
    """A rank of a tensor-parallel engine failed or vanished mid-run (engine/parallel): the message names the rank
    and what it was doing; the engine has stopped and every rank released its memory."""
