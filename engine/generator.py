"""The decode loop: prefill, then one token per sequence per step, streamed as it happens.

`Generator.stream` yields a `StepEvent` per step (tokens, text deltas, timings) for the chat and live
panels; `Generator.generate` runs it to the end. The GPU is kept busy: the next step is launched
before the host looks at the current step's tokens (EOS, stop strings, text).
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from engine import gpu_errors
from engine.decode import forward
from engine.decode.attention import decode_attention_torch
from engine.decode.backend import choose_decode_attention, describe_launches
from engine.decode.kv_cache import KVCache
from engine.errors import (CompileError, GpuContextLostError, InvalidSettingsError, KVLabError, OutOfMemoryError,
                           PromptTooLongError, RunFailedError)
from engine.loader import LoadedModel
from engine.memory import release_run_memory
from engine.offload.placement import check_run_fits, plan_for
from engine.sampling import make_generator, sample
from engine.settings import GenerationSettings

logger = logging.getLogger("kvlab")

# Compiled decode steps a Generator keeps (one per attention function and cache shape), most recent last.
MAX_COMPILED_STEPS = 4


@dataclass
class StepEvent:
    step: int  # 0: the token chosen from the prefill; then one per decode step
    token_ids: list[int | None]  # this step's token per sequence; None where it had already finished
    text_deltas: list[str]
    finished: list[bool]
    finish_reasons: list[str | None]  # "eos", "stop", "length" once finished
    step_ms: float  # prefill time for step 0, else the decode step's wall time
    elapsed_ms: float
    logits: torch.Tensor | None = None  # (B, vocab) float32 on the CPU, when asked for (keep_logits)

    @property
    def num_active(self) -> int:
        return sum(t is not None for t in self.token_ids)


@dataclass
class GenerationResult:
    prompt_token_ids: list[list[int]]
    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    prefill_ms: float
    step_ms: list[float] = field(default_factory=list)  # decode steps only
    decode_tokens: int = 0  # tokens produced by decode steps, all sequences
    logits: list[torch.Tensor] | None = None  # per step (B, vocab), when asked for

    @property
    def decode_ms(self) -> float:
        return sum(self.step_ms)

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / (self.decode_ms * 1e-3) if self.step_ms else 0.0


@dataclass(frozen=True)
class RunProgress:
    """How far the current run's long stage is: prefill layers done of total, since started_s (perf_counter)."""

    stage: str = ""
    done: int = 0
    total: int = 0
    started_s: float = 0.0

    @property
    def eta_s(self) -> float | None:
        if not self.done or self.done >= self.total:
            return None
        return (time.perf_counter() - self.started_s) * (self.total - self.done) / self.done


class _TextState:
    """Incremental detokenisation of one sequence, with stop strings held back until decided."""

    def __init__(self, stop_strings: tuple[str, ...]):
        self.stops = stop_strings
        self.text = ""
        self.emitted = 0

    def update(self, text: str, *, final: bool) -> tuple[str, bool]:
        """Full text so far -> (new text safe to show, a stop string was hit)."""
        hit = False
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            text, hit, final = text[: min(cuts)], True, True
        self.text = text
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
                safe = len(text.rstrip("\ufffd"))
            for s in self.stops:  # a partial stop string at the end is not shown yet
                for n in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:n]):
                        safe -= n
                        break
        delta = text[self.emitted : max(safe, self.emitted)]
        self.emitted = max(safe, self.emitted)
        return delta, hit


class Generator:
    """Runs the engine's own decode loop on a loaded model."""

    def __init__(self, model: LoadedModel, *, attend: forward.DecodeAttention | None = None):
        self.model = model
        self.attend = attend  # None: chosen per run from the settings (engine/decode/backend.py)
        self.attention_why = ""
        self.stage = ""  # what the current run is doing ("prefill", "decode step 3"), for its failure message
        # settings.compile: compiled steps kept across runs, so repeated runs of one shape compile once.
        self._compiled: OrderedDict[tuple, object] = OrderedDict()
        self.compile_why = ""  # what the last run did about compiling, for benches and the UI
        # Offloaded placements: the hardware profile (None: measured or read from the cache), the last run's
        # plan, the schedule (overlapped, or the plain synchronous one), and a telemetry recorder if any.
        self.profile = None
        self.plan = None
        self.offload_overlapped = True
        self.layers_why = ""  # how the last offloaded or profiled run executed each layer (graphs or eager)
        self.recorder = None
        self.progress = RunProgress()  # what the current run is doing, for live views (read from other threads)
        self._fast_adapter = None  # settings.fused: the model's fast adapter (engine/fast), built at first use
        self.fused_why = ""  # what the last run did about settings.fused
        # Called once a run's buffers are allocated, right before prefill: tensor parallel's ranks agree there to
        # start (engine/parallel/driver.py), so that a rank refusing the run never leaves the others inside a collective.
        self.before_prefill = None
        self.failure_detail = ""  # the exception behind the last RunFailedError, one line

    def _adapter(self, settings: GenerationSettings):
        """The model's adapter, or its fast version when settings.fused (built once per Generator; the fused weights
        are views the model's own modules share, so memory does not grow). "auto": the fast one on a CUDA device."""
        if settings.fused is False:
            self.fused_why = "off"
            return self.model.adapter
        if settings.fused == "auto" and self.model.device.type != "cuda":
            self.fused_why = "auto: the plain adapter on the CPU (the fused pieces are the same torch ops there)"
            return self.model.adapter
        if settings.fused == "auto" and settings.compile:
            self.fused_why = "auto: the plain adapter under compile (inductor fuses its ops itself; fused=True to combine)"
            return self.model.adapter
        from engine.fast import fuse, why_not_fused

        why = why_not_fused(self.model.adapter)
        if why is not None:
            self.fused_why = why
            return self.model.adapter
        if self._fast_adapter is None:
            self._fast_adapter = fuse(self.model.adapter)
        self.fused_why = "fast adapter (engine/fast): fused q/k/v and gate/up GEMMs, fused norm, RoPE and activation"
        return self._fast_adapter

    def _prefill_progress(self, layers_done: int, layers: int) -> None:
        self.progress = RunProgress(stage="prefill", done=layers_done, total=layers,
                                    started_s=self.progress.started_s)

    def encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            got = "an empty list" if isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)) \
                else f"a {type(prompts).__name__}"
            raise InvalidSettingsError(f"prompts must be a non-empty list of strings or of token-id lists, got {got}: "
                                       "wrap a single prompt in a list, e.g. ['To be, or not'].")
        vocab = self.model.spec.vocab_size
        ids = []
        for n, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if not prompt:
                    raise InvalidSettingsError(f"prompt {n} is empty: give at least one character of text.")
                tokens = self.model.tokenizer.encode(prompt)
            elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)) and \
                    all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                tokens = list(prompt)
                bad = [t for t in tokens if not 0 <= t < vocab]
                if bad:
                    raise InvalidSettingsError(f"prompt {n} holds token ids outside 0..{vocab - 1} (e.g. {bad[0]}): "
                                               f"use ids of this model's {vocab}-token vocabulary, or pass text.")
            else:
                got = type(prompt).__name__
                if isinstance(prompt, (bytes, bytearray)):
                    got = "bytes (decode them to text first)"
                elif isinstance(prompt, Sequence):
                    odd = next(t for t in prompt if not isinstance(t, int) or isinstance(t, bool))
                    got = f"a {got} holding {odd!r} ({type(odd).__name__})"
                raise InvalidSettingsError(f"prompt {n} must be a string or a list of token ids, got {got}: "
                                           "pass text, or a list of ints.")
            if not tokens:
                raise InvalidSettingsError(f"prompt {n} is empty: give at least one token of text.")
            ids.append(tokens)
        return ids

    def generate(self, prompts, settings: GenerationSettings = GenerationSettings(), *,
                 keep_logits: bool = False) -> GenerationResult:
        prompt_ids = self.encode(prompts)
        tokens: list[list[int]] = [[] for _ in prompt_ids]
        reasons: list[str | None] = [None] * len(prompt_ids)
        result = GenerationResult(prompt_token_ids=prompt_ids, token_ids=tokens, texts=[], finish_reasons=[],
                                  prefill_ms=0.0, logits=[] if keep_logits else None)
        for event in self.stream(prompt_ids, settings, stream_text=False, keep_logits=keep_logits):
            if keep_logits:
                result.logits.append(event.logits)
            for b, tok in enumerate(event.token_ids):
                if tok is not None:
                    tokens[b].append(tok)
                reasons[b] = event.finish_reasons[b] or reasons[b]
            if event.step == 0:
                result.prefill_ms = event.step_ms
            else:
                result.step_ms.append(event.step_ms)
                result.decode_tokens += event.num_active
        tok = self.model.tokenizer
        texts = [tok.decode([t for t in seq if t not in tok.eos_token_ids]) for seq in tokens]
        for b, text in enumerate(texts):  # stop strings, applied to the final text as the stream does
            texts[b], hit = _TextState(settings.stop_strings).update(text, final=True)
        result.texts = texts
        result.finish_reasons = [r or "length" for r in reasons]
        return result

    def stream(self, prompts, settings: GenerationSettings = GenerationSettings(), *,
               stream_text: bool = True, keep_logits: bool = False) -> Iterator[StepEvent]:
        if not isinstance(settings, GenerationSettings):
            raise InvalidSettingsError(f"settings must be a GenerationSettings instance, got {type(settings).__name__}: "
                                       "build one with GenerationSettings(max_new_tokens=...).")
        prompt_ids = self.encode(prompts)
        model, spec = self.model, self.model.spec
        batch, lens = len(prompt_ids), [len(p) for p in prompt_ids]
        longest, new_tokens = max(lens), settings.max_new_tokens
        if longest + new_tokens > spec.max_positions:
            raise PromptTooLongError(
                f"The longest prompt has {longest} tokens; with max_new_tokens={new_tokens} that needs "
                f"{longest + new_tokens} positions, but the model's context is {spec.max_positions}: "
                "shorten the prompt or ask for fewer new tokens.")
        original = spec.rope_original_max
        if spec.rope_type == "longrope" and original is not None and longest <= original < longest + new_tokens - 1:
            # transformers' Phi-3 recomputes the whole cache with the long factors when a sequence passes its original
            # context; the engine keeps each K as it was computed, so such a run would silently differ from it.
            raise InvalidSettingsError(
                f"This run crosses the model's original context of {original} positions during decoding (prompt "
                f"{longest} tokens + {new_tokens} new): LongRoPE switches to its long factors there and transformers "
                f"recomputes the whole cache, which KV Lab does not. Ask for at most {original - longest + 1} new "
                f"tokens, or use a prompt longer than {original} tokens (then every token uses the long factors).")
        if model.device.type == "cuda" and gpu_errors.lost() is not None:
            raise GpuContextLostError(gpu_errors.lost_message())
        self.stage = "setting up the run"
        self.layers_why = ""
        failure = None
        try:
            yield from self._run(prompt_ids, settings, stream_text=stream_text, keep_logits=keep_logits)
        except GpuContextLostError:
            raise
        except torch.OutOfMemoryError as exc:
            # The traceback holds _run's frames and so its KV cache: drop it before freeing memory.
            failure = ("oom", str(exc).splitlines()[0][:200])
            exc.__traceback__ = None
            del exc
        except KVLabError:
            raise  # already names the problem and the fix; the run's buffers were released where it was raised
        except Exception as exc:  # a kernel launch, a library call: report it with the stage, free the run
            # The server's log keeps the traceback as text: a record holding exc_info would keep the run's frames
            # (and its KV cache) alive in whatever handler stores records.
            logger.error("run failed during %s:\n%s", self.stage, "".join(traceback.format_exception(exc)))
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            self.failure_detail = detail  # what failed, for callers that report it their own way (engine/parallel)
            failure = ("lost" if gpu_errors.is_context_lost(exc) else "error", detail)
            if failure[0] == "lost":
                gpu_errors.keep(exc)  # its traceback holds the run's GPU tensors: freeing one now aborts the process
            else:
                exc.__traceback__ = None
            del exc
        if failure is None:
            return
        kind, detail = failure
        if kind == "lost":  # no CUDA call works any more (not even a free): report, and refuse later runs
            gpu_errors.mark_lost(detail)
            raise GpuContextLostError(gpu_errors.lost_message(self.stage))
        _release_memory(model.device)
        if kind == "oom":
            need = KVCache.bytes_needed(spec, batch=batch, max_tokens=longest + new_tokens,
                                        dtype_bytes=model.dtype.itemsize)
            raise OutOfMemoryError(
                f"Out of memory on {model.device} during {self.stage} for batch {batch}, prompts up to {longest} "
                f"tokens and {new_tokens} new tokens (KV cache {need / 2**30:.2f} GiB): lower the batch, the prompt "
                f"length or max_new_tokens, or offload the KV cache. The memory of this run was released. ({detail})")
        hint = (" The run used the Triton decode-attention kernel: decode attention 'torch' in Settings runs without it."
                if self.attention_why.startswith("Triton") else "")
        raise RunFailedError(f"The run failed during {self.stage} ({detail}): its memory was released and the model "
                             f"is kept; run again, or change the settings that led here.{hint}")

    def _decoder(self, settings: GenerationSettings, attend: forward.DecodeAttention, cache: KVCache, *,
                 use_graph: bool):
        """-> (step(ids, pos, kv_len) -> logits, a GraphedDecode of it or None)."""
        adapter, device = self._adapter(settings), self.model.device
        batch, max_tokens = cache.k.shape[1], cache.max_tokens
        compiled = self._compiled_step(adapter, attend, cache) if settings.compile and settings.max_new_tokens > 1 \
            else None
        if compiled is None:
            self.compile_why = "one new token: no decode step to compile" if settings.compile else "off"

        def step(ids: torch.Tensor, pos: torch.Tensor, kv_len: int = max_tokens) -> torch.Tensor:
            if compiled is not None:  # reads all max_tokens slots (masked), so its shapes never change per step
                return compiled(cache, ids, pos)
            return forward.decode_step(adapter, cache, ids, pos, kv_len=kv_len, attend=attend)

        if not use_graph:
            return step, None
        try:
            return step, forward.GraphedDecode(step, batch=batch, device=device, scratch_position=max_tokens - 1)
        except RuntimeError as exc:
            if compiled is None or isinstance(exc, (CompileError, torch.OutOfMemoryError)):
                raise
            failure = f"{type(exc).__name__}: {str(exc)[:300]}"
        raise CompileError(f"The compiled decode step could not be captured in a CUDA graph ({failure}): "
                           "set compile=False, or cuda_graph=False to run it compiled without a graph.")

    def _compiled_step(self, adapter, attend: forward.DecodeAttention, cache: KVCache):
        """The decode step compiled for this attention and cache shape; compiles it on first use."""
        from engine.decode.compiled import CompiledDecode  # imports torch._dynamo: only when asked for

        key = (attend, adapter, tuple(cache.k.shape), cache.k.dtype, cache.k.device)
        shape = f"batch {cache.k.shape[1]}, {cache.max_tokens} cache slots"
        compiled = self._compiled.pop(key, None)
        if compiled is not None:
            self.compile_why = f"reused the decode step compiled for {shape}"
        else:
            compiled = CompiledDecode(adapter, attend)
            # Compile before the first timed step; the warm-up writes a slot every sequence overwrites first.
            seconds = compiled.warm_up(cache, scratch_position=cache.max_tokens - 1)
            self.compile_why = f"decode step compiled by {compiled.backend} for {shape} in {seconds:.1f} s"
        self._compiled[key] = compiled
        while len(self._compiled) > MAX_COMPILED_STEPS:
            self._compiled.popitem(last=False)
        return compiled

    def _run(self, prompt_ids: list[list[int]], settings: GenerationSettings, *, stream_text: bool, keep_logits: bool):
        model, spec = self.model, self.model.spec
        device = model.device
        batch, lens = len(prompt_ids), [len(p) for p in prompt_ids]
        max_tokens = max(lens) + settings.max_new_tokens  # one spare slot: the loop may run one step past the last
        attend, self.attention_why = (self.attend, "given by the caller") if self.attend is not None else \
            choose_decode_attention(settings, device=device, head_dim=spec.head_dim)
        runtime = None
        if settings.offload.offloaded:
            runtime = self._offload_runtime(settings, attend, lens)
            cache = runtime  # prefill writes each layer where the plan keeps it
        else:
            check_run_fits(spec, settings.offload, device=device, batch=batch, prompt_tokens=max(lens),
                           new_tokens=settings.max_new_tokens, resident=max_tokens)
        try:
            yield from self._decode_loop(prompt_ids, settings, attend, runtime, stream_text=stream_text,
                                         keep_logits=keep_logits)
        finally:
            if runtime is not None:
                self.layers_why = runtime.graphs_why  # captured at the first step, or why not
                runtime.release()

    def _offload_runtime(self, settings: GenerationSettings, attend, lens: list[int]):
        from engine.offload.runtime import OffloadRuntime  # imports triton (kernels/rope.py): only when offloading
        from engine.offload.store import OffloadStore

        model = self.model
        self.plan = plan_for(model.spec, settings.offload, device=model.device, batch=len(lens),
                             prompt_tokens=max(lens), new_tokens=settings.max_new_tokens, profile=self.profile,
                             cuda_graphs=settings.cuda_graph, fused=settings.wants_fast_adapter)
        store = OffloadStore(model.spec, self.plan, dtype=model.dtype, device=model.device)
        try:
            return OffloadRuntime(self._adapter(settings), self.plan, store, attend, prompt_lens=lens,
                                  overlapped=self.offload_overlapped, recorder=self.recorder,
                                  cuda_graphs=settings.cuda_graph)
        except BaseException:
            # Unpin before the store's memory goes back to the allocator: a freed range that stays registered
            # makes a later registration of the same addresses fail (cudaErrorHostMemoryAlreadyRegistered).
            store.release()
            raise

    def _decode_loop(self, prompt_ids, settings: GenerationSettings, attend, runtime, *, stream_text: bool,
                     keep_logits: bool):
        model, adapter, tok = self.model, self._adapter(settings), self.model.tokenizer
        device, spec = model.device, adapter.spec
        batch, lens = len(prompt_ids), [len(p) for p in prompt_ids]
        longest, new_tokens = max(lens), settings.max_new_tokens
        max_tokens = longest + new_tokens  # one spare slot: the loop may run one step past the last token
        start = time.perf_counter()
        cache = runtime if runtime is not None else \
            KVCache(spec, batch=batch, max_tokens=max_tokens, dtype=model.dtype, device=device)
        if self.attend is None and attend is not decode_attention_torch:  # what the kernel does on these segments
            self.attention_why = describe_launches(self.attention_why, cache.segments(0, max_tokens),
                                                   window=spec.window(0), config=settings.kernel)
        padded = torch.full((batch, longest), tok.pad_token_id, dtype=torch.long)
        for b, ids in enumerate(prompt_ids):
            padded[b, : len(ids)] = torch.tensor(ids)
        prompt_lens = torch.tensor(lens, device=device)
        gen = make_generator(settings.sampling, device)
        if self.before_prefill is not None:
            self.before_prefill()
        self.stage = "prefill"
        self.progress = RunProgress(stage="prefill", total=spec.num_layers, started_s=time.perf_counter())
        logits = forward.prefill(adapter, cache, padded.to(device), lens, progress=self._prefill_progress)
        pending = sample(logits, settings.sampling, gen)
        positions = prompt_lens.clone()  # where each sequence's pending token's K/V goes
        if runtime is not None:
            runtime.finish_prefill()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        prefill_ms = (time.perf_counter() - start) * 1e3

        profiled = runtime is None and self.recorder is not None  # lanes per layer: no whole-step graph
        # RoPE types whose frequencies follow the longest position (dynamic, longrope) choose them in Python: a step
        # captured once would keep the frequencies of its capture once a run passes the original context.
        moving_rope = spec.rope_original_max is not None and max_tokens > spec.rope_original_max
        use_graph = device.type == "cuda" and settings.cuda_graph and new_tokens > 1 and runtime is None \
            and not profiled and not moving_rope
        try:
            if runtime is not None:  # an offloaded step is planned per length: eager, no graph
                step, decode = (lambda ids, pos, kv_len: runtime.decode(ids, pos, kv_len)), None
                self.compile_why = "off: an offloaded step is planned per length and runs eagerly" \
                    if settings.compile else "off"
            elif profiled:
                from engine.decode.resident_steps import ResidentSteps

                steps = ResidentSteps(adapter, cache, attend, self.recorder, cuda_graphs=settings.cuda_graph)
                step, decode = steps.decode, None
                self.layers_why = steps.why
                self.compile_why = "off: a profiled step times each layer" if settings.compile else "off"
            else:
                self.stage = "capturing the decode step in a CUDA graph" if use_graph else "setting up the decode step"
                step, decode = self._decoder(settings, attend, cache, use_graph=use_graph)
        except CompileError as exc:
            # Free this run's memory before the error leaves: the failed call's finished frames (kept by the
            # traceback) and this frame still reference the cache.
            traceback.clear_frames(exc.__traceback__)
            del cache
            _release_memory(device)
            raise
        pinned = device.type == "cuda"
        host = [torch.empty(batch, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        finished, reasons = [False] * batch, [None] * batch
        generated: list[list[int]] = [[] for _ in range(batch)]
        texts = [_TextState(settings.stop_strings) for _ in range(batch)]
        last = time.perf_counter()
        for step_index in range(new_tokens):
            buf = host[step_index % 2]
            buf.copy_(pending, non_blocking=pinned)
            step_logits = logits.to("cpu", copy=True) if keep_logits else None
            ready = torch.cuda.Event() if pinned else None
            if ready is not None:
                ready.record()
            if step_index + 1 < new_tokens:  # launch the next step now; its result is read next turn
                self.stage = f"decode step {step_index + 1}"
                kv_len = max_tokens if use_graph else longest + step_index + 1
                if self.recorder is not None:  # step markers on the compute stream; lanes come from the runtime
                    self.recorder.begin_step(step_index + 1)
                logits = decode(pending, positions) if use_graph else step(pending, positions, kv_len)
                if self.recorder is not None:
                    self.recorder.end_step()
                nxt = sample(logits, settings.sampling, gen)
                positions += 1
            if ready is not None:
                ready.synchronize()
            event_tokens: list[int | None] = [None] * batch
            deltas = [""] * batch
            for b in range(batch):
                if finished[b]:
                    continue
                token = int(buf[b])
                event_tokens[b] = token
                generated[b].append(token)
                if token in tok.eos_token_ids and not settings.ignore_eos:
                    finished[b], reasons[b] = True, "eos"
                elif len(generated[b]) >= new_tokens:
                    finished[b], reasons[b] = True, "length"
                if stream_text or settings.stop_strings:
                    text = tok.decode([t for t in generated[b] if t not in tok.eos_token_ids])
                    deltas[b], hit = texts[b].update(text, final=finished[b])
                    if hit and not finished[b]:
                        finished[b], reasons[b] = True, "stop"
            now = time.perf_counter()
            yield StepEvent(step=step_index, token_ids=event_tokens, text_deltas=deltas if stream_text else [""] * batch,
                            finished=list(finished), finish_reasons=list(reasons),
                            step_ms=prefill_ms if step_index == 0 else (now - last) * 1e3,
                            elapsed_ms=(now - start) * 1e3, logits=step_logits)
            last = now
            if all(finished):
                break
            pending = nxt
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if profiled:
            self.layers_why = steps.why  # graphs, or why the layers ran eagerly
        del cache, decode


def _release_memory(device: torch.device) -> None:
    gc.collect()  # a failed run's frames and graphs may sit in reference cycles
    release_run_memory(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
