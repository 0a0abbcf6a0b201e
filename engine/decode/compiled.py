"""The decode step through torch.compile (inductor), opt-in with `GenerationSettings.compile`.

Why: the eager step is ~40 small kernels per layer (RMSNorm alone ~6, RoPE ~5, SiLU*mul, residual adds),
and even replayed from a CUDA graph each costs a few µs of GPU time. Inductor fuses the elementwise ops
around the GEMMs. Our `forward.GraphedDecode` still captures and replays the compiled step, so compile
runs in the default mode, not "reduce-overhead" (that would capture a second graph of its own).

Shapes are static (dynamic=False): the step always attends over all S cache slots, masked to each
sequence's length, so one compile serves every step of a run and every run of the same (batch, S).
The cache tensors are arguments, not closed over: dynamo guards on their shapes, not on a cache object.
"""

from __future__ import annotations

import time
import types
from typing import Callable

import torch
import torch._dynamo  # its exception types, caught below

from engine.decode import forward
from engine.adapters import DecoderAdapter
from engine.errors import CompileError
from engine.decode.kv_cache import KVCache

BACKEND = "inductor"  # the real path; tests swap in a failing backend to check the error


def _step_function(adapter: DecoderAdapter, attend: forward.DecodeAttention) -> Callable[..., torch.Tensor]:
    def decode(token_ids: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = KVCache.over(k, v)
        return forward.decode_step_traceable(adapter, cache, token_ids, positions, kv_len=cache.max_tokens,
                                             attend=attend)

    # Dynamo keeps its compiled entries per code object and stops compiling one past `recompile_limit`
    # (8) entries (with fullgraph=True it raises). Every model and shape would share `decode`'s code
    # object; a copy per compiled step keeps each step's entry apart, and frees it with the step.
    code = decode.__code__.replace()
    return types.FunctionType(code, decode.__globals__, decode.__name__, decode.__defaults__, decode.__closure__)


def _failure(exc: BaseException, limit: int = 400) -> str:
    """One line saying why compiling failed; running out of memory while compiling is re-raised as such."""
    inner = getattr(exc, "inner_exception", None)  # what the backend raised, under dynamo's wrapper
    if isinstance(inner, torch.OutOfMemoryError):
        raise inner from None
    cause = exc if inner is None else inner
    text = f"{type(cause).__name__}: {cause}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CompiledDecode:
    """`forward.decode_step` for one model and attention function, compiled once per cache shape."""

    def __init__(self, adapter: DecoderAdapter, attend: forward.DecodeAttention, *, backend=None):
        self.backend = backend or BACKEND
        self._fn = torch.compile(_step_function(adapter, attend), backend=self.backend, fullgraph=True,
                                 dynamic=False)

    def __call__(self, cache: KVCache, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """token_ids, positions (B,) -> logits (B, vocab), attending over all cache slots (masked)."""
        try:
            with torch.no_grad():
                return self._fn(token_ids, positions, cache.k, cache.v)
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as exc:
            failure = _failure(exc)
        # Raised outside the except block, so the error holds no reference to dynamo's frames and the
        # cache tensors (its example inputs) they hold.
        raise CompileError(
            f"torch.compile ({self.backend}) could not compile the decode step: {failure}. "
            "Set compile=False in the generation settings to run the decode step without compiling "
            "(inductor needs Triton on a GPU, a C++ compiler on the CPU).")

    def warm_up(self, cache: KVCache, *, scratch_position: int) -> float:
        """Compile now (if this shape is new), outside any timed step -> seconds taken.

        It writes K/V of token 0 at `scratch_position` of every sequence: use a slot that each later
        step overwrites before reading it (as GraphedDecode's warm-up does).
        """
        batch, device = cache.k.shape[1], cache.k.device
        token_ids = torch.zeros(batch, dtype=torch.long, device=device)
        positions = torch.full((batch,), scratch_position, dtype=torch.long, device=device)
        start = time.perf_counter()
        self(cache, token_ids, positions)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
