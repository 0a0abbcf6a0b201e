"""What the app holds between clicks: the loaded model, the applied settings, profiling runs, one job at a time.

Panels talk to a `LabSession` only (no torch in panels). A failed load keeps the model that was loaded
before; a failed run frees its memory and leaves the model in place for the next one. Work that uses the
device (loading, chat, profiling, measuring the hardware) takes the session's lock; `live()` does not, so
the Profile panel can poll a running profile. Files the app offers for download are written only under
`export_dir`, a directory the session makes (the app's only allowed path).
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from engine.access import SourcePolicy
from engine.errors import BusyError, InvalidSettingsError, PromptTooLongError
from engine.explorer import DEFAULT_SPLITS, ExploreResult, MeasuredPoint, explore_splits
from engine.generator import Generator
from engine.lab_runs import LiveRun, LiveView, ProfileUpdate, RunRecord, profile_run, record_from_trace
from engine.loader import LoadedModel, load_model
from engine.memory import release_run_memory
from engine.profiler import HardwareProfile, hardware_profile
from engine.run_compare import CompareTable, compare_runs, write_compare
from engine.scheduler import gqa_note
from engine.settings import GenerationSettings, RunShape
from engine.telemetry import CuptiPmSampler, NvmlSampler, nvml_counters, step_counters, write_trace
from engine.telemetry.export import read_trace

MAX_CHAT_CHARS = 20_000  # longer pastes are refused: the model's context is far shorter anyway
MAX_RUNS = 100  # profiling runs kept for Compare and the explorer, oldest dropped first


@dataclass(frozen=True)
class ChatUpdate:
    """One streamed state of a reply: the text so far and the run's figures."""

    reply: str
    num_tokens: int
    decode_tok_s: float
    elapsed_s: float
    finish_reason: str | None  # None while streaming
    dropped_turns: int = 0  # oldest history turns left out so the prompt fits the context
    capped_at: int | None = None  # the reply's length limit when the context left less than asked for


def model_card(model: LoadedModel) -> dict:
    """The loader's card plus what the lab derives from the shape: the GQA note and the memory needed."""
    spec = model.spec
    full_context_kv = spec.kv_bytes_per_token * spec.max_positions
    return model.card() | {"gqa_note": gqa_note(spec), "kv_bytes_full_context": full_context_kv,
                           "memory_needed_bytes": spec.weight_bytes + full_context_kv}


class LabSession:
    def __init__(self, *, export_dir: str | Path | None = None, models_dir: str | Path | None = None) -> None:
        self.model: LoadedModel | None = None
        self.policy = SourcePolicy(models_dir)  # what clients on other machines may load
        self._lock = threading.Lock()  # one GPU job at a time, whatever the UI's queue does
        self._job: str | None = None  # what holds the lock, for the message a refused load shows
        # The settings panel applies one settings object and a run shape; chat, profiling and the explorer use them.
        self.settings = GenerationSettings()
        self.shape = RunShape()
        self.runs: list[RunRecord] = []  # finished profiling runs, oldest first
        self._next_run_id = 1
        self._live: LiveRun | None = None
        self._stop_requested = threading.Event()  # set by stop_profile, read between steps
        self._chat_stop = threading.Event()  # set by stop_chat, read between tokens
        self._chat_owner: str | None = None  # who asked for the running reply (a browser tab, an API client)
        self._profiles: dict[str, HardwareProfile] = {}
        self._cupti: dict[str, CuptiPmSampler] = {}
        self._export_dir = Path(export_dir) if export_dir is not None else None

    # -- model ---------------------------------------------------------------------------------
    def load(self, source: str, *, device: str | None = None, dtype: str | None = None, remote: bool = False) -> dict:
        """Load `source` and make it current; on failure the previous model stays loaded.

        Refused (BusyError) while a chat reply or a profile runs: swapping the model under a running job would
        end it with a confusing error, and waiting silently behind a long profile looks like a hang. `remote`:
        the request comes from another machine, so filesystem paths must lie in the allowed models directory."""
        source = self.policy.resolve(source, remote=remote)
        with self._device_job(f"loading {source}", wait=False):
            self.model = load_model(source, device=device, dtype=dtype)
            return model_card(self.model)

    @contextmanager
    def _device_job(self, what: str, *, wait: bool = True):
        """Hold the session's lock for `what` ("a chat reply", ...), named for the message a refused load shows.
        `wait=False`: refuse with BusyError, naming the running job, rather than wait for it."""
        if not self._lock.acquire(blocking=wait):
            kept = f" The loaded model ({self.model.name}) is kept." if self.model is not None else ""
            raise BusyError(f"Cannot load a model while {self._job or 'another job'} is running: press Stop or "
                            f"wait for it to finish, then load again.{kept}")
        self._job = what
        try:
            yield
        finally:
            self._job = None
            if self.model is not None:
                release_run_memory(self.model.device)  # a server's many threads would each keep cuBLAS memory
            self._lock.release()

    def busy(self) -> str | None:
        """What is running now (e.g. "a chat reply"), or None."""
        return self._job

    def card(self) -> dict | None:
        return model_card(self.model) if self.model is not None else None

    def require_model(self) -> LoadedModel:
        if self.model is None:
            raise InvalidSettingsError("No model is loaded: load one in the Model panel first.")
        return self.model

    # -- settings ------------------------------------------------------------------------------
    def apply_settings(self, settings: GenerationSettings, shape: RunShape | None = None) -> None:
        """Make `settings` (and the profiling run's `shape`) the ones chat, profiling and the explorer use."""
        if not isinstance(settings, GenerationSettings):
            raise InvalidSettingsError(f"settings must be a GenerationSettings instance, got {type(settings).__name__}.")
        if shape is not None and not isinstance(shape, RunShape):
            raise InvalidSettingsError(f"shape must be a RunShape instance, got {type(shape).__name__}.")
        self.settings = settings
        if shape is not None:
            self.shape = shape

    # -- hardware ------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        if self.model is not None:
            return self.model.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _hardware(self, device: torch.device, *, refresh: bool = False) -> HardwareProfile:
        # Caller holds the lock: measuring uses the device.
        key = str(device)
        if refresh or key not in self._profiles:
            self._profiles[key] = hardware_profile(device, refresh=refresh)
        return self._profiles[key]

    def hardware(self, *, refresh: bool = False) -> HardwareProfile:
        """The profiler's measurements of the loaded model's device: cached, or measured now (`refresh`)."""
        with self._device_job("measuring the hardware"):
            return self._hardware(self._device(), refresh=refresh)

    def _cupti_sampler(self, device: torch.device) -> CuptiPmSampler:
        key = str(device)
        if key not in self._cupti:
            self._cupti[key] = CuptiPmSampler(device.index or 0)
        return self._cupti[key]

    def telemetry_sources(self) -> dict[str, str]:
        """Whether NVML (PCIe link bytes) and CUPTI (L2 hit rate) can sample here, and why not."""
        device = self._device()
        if device.type != "cuda":
            nvml = "the model runs on the CPU: no PCIe link in use"
        else:
            sampler = NvmlSampler(device.index or 0)
            nvml = "available: PCIe link bytes sampled every 20 ms" if sampler.available() else sampler.why_unavailable
            sampler.close()
        probe = self._cupti_sampler(device).probe()
        return {"NVML": nvml, "CUPTI": probe.reason if not probe.available else f"available: {probe.reason}"}

    # -- chat ----------------------------------------------------------------------------------
    def chat(self, history: list[dict], message: str, settings: GenerationSettings, *,
             owner: str | None = None) -> Iterator[ChatUpdate]:
        """Stream the model's reply to `message` after `history` ([{role, content}, ...]). `owner` names who asked
        (a browser tab, an API client): `stop_chat(owner)` stops only that one's reply.

        A conversation longer than the model's context keeps its newest turns: the oldest are dropped (and
        counted in the updates) until the prompt plus `max_new_tokens` fits; if the message alone leaves too
        little room, the reply is capped at what is left; a message that fills the context is refused."""
        check_message(message)
        model = self.require_model()
        turns = normalise_history(history)
        context = model.spec.max_positions
        prompt, prompt_len, dropped = self._fit_prompt(model, turns, message, settings.max_new_tokens)
        room = context - prompt_len
        if room < 1:
            raise PromptTooLongError(f"The message is {prompt_len} tokens as a prompt and the model's context is "
                                     f"{context} positions, leaving no room for a reply: send a shorter message.")
        capped = room < settings.max_new_tokens
        stops = tuple(dict.fromkeys((*model.chat_stop_strings, *settings.stop_strings)))
        settings = replace(settings, stop_strings=stops, max_new_tokens=min(room, settings.max_new_tokens))
        with self._device_job("a chat reply"):
            self._chat_stop.clear()
            self._chat_owner = owner
            generator = Generator(model)
            if settings.offload.offloaded:
                generator.profile = self._hardware(model.device)
            start = time.perf_counter()
            reply, decode_ms, num_tokens = "", 0.0, 0
            for event in generator.stream([prompt], settings):
                reply += event.text_deltas[0]
                if event.token_ids[0] is not None:
                    num_tokens += 1
                if event.step > 0:
                    decode_ms += event.step_ms
                done = event.finished[0]
                reason = event.finish_reasons[0] if done else "stopped" if self._chat_stop.is_set() else None
                yield ChatUpdate(reply=reply, num_tokens=num_tokens,
                                 decode_tok_s=(num_tokens - 1) / (decode_ms * 1e-3) if decode_ms else 0.0,
                                 elapsed_s=time.perf_counter() - start, finish_reason=reason,
                                 dropped_turns=dropped, capped_at=settings.max_new_tokens if capped else None)
                if reason is not None:
                    return

    def stop_chat(self, owner: str | None = None) -> bool:
        """End the streaming reply after its current token (only `owner`'s, when given); False if none runs."""
        if self._job != "a chat reply" or (owner is not None and self._chat_owner not in (None, owner)):
            return False
        self._chat_stop.set()
        return True

    @staticmethod
    def _fit_prompt(model: LoadedModel, turns: list[dict], message: str, new_tokens: int) -> tuple[list[int], int, int]:
        """(prompt token ids, their number, oldest turns dropped) for the newest history that leaves room for
        `new_tokens`; with no history left, the message alone (the caller caps the reply). The ids come from the
        chat template with one BOS (re-encoding the template's text would add a second)."""
        context = model.spec.max_positions
        dropped = 0
        while True:
            prompt = model.tokenizer.chat_ids([*turns[dropped:], {"role": "user", "content": message}])
            length = len(prompt)
            if length + new_tokens <= context or dropped >= len(turns):
                return prompt, length, dropped
            # Drop a user turn with the reply that followed it, so the transcript still alternates.
            dropped += 2 if dropped + 1 < len(turns) and turns[dropped + 1]["role"] == "assistant" else 1

    # -- profiling -----------------------------------------------------------------------------
    def profile(self, settings: GenerationSettings, *, batch: int, prompt_tokens: int,
                seed: int = 0, gpu_counters: bool = True) -> Iterator[ProfileUpdate]:
        """Run `batch` seeded random prompts of `prompt_tokens` tokens under `settings` with telemetry attached.

        Yields a ProfileUpdate per decode step; the last one carries the RunRecord, which is also kept in
        `runs`. While it runs, `live()` shows what it has produced so far; `stop_profile()` (from any thread),
        or closing the iterator, ends it early without a record. `gpu_counters`: sample PCIe/DRAM/L2 counters with
        CUPTI where available (on an H100 sampling every millisecond slowed an offloaded step by about a fifth).
        """
        shape = RunShape(batch=batch, prompt_tokens=prompt_tokens, seed=seed)
        if not isinstance(settings, GenerationSettings):
            raise InvalidSettingsError(f"settings must be a GenerationSettings instance, got {type(settings).__name__}.")
        model = self.require_model()
        with self._device_job(f"profile run #{self._next_run_id}"):
            hardware = self._hardware(model.device)
            run_id, self._next_run_id = self._next_run_id, self._next_run_id + 1
            live = self._live = LiveRun(run_id, num_steps=max(0, settings.max_new_tokens - 1))
            self._stop_requested.clear()
            status = "stopped"
            try:
                with closing(profile_run(model, settings, shape, run_id=run_id, hardware=hardware,
                                         cupti=self._cupti_sampler(model.device) if gpu_counters else None)) \
                        as updates:
                    for update in updates:
                        live.add(update)
                        if update.record is not None:
                            self.runs = [*self.runs, update.record][-MAX_RUNS:]
                            status = "done"
                        yield update
                        if self._stop_requested.is_set():
                            break
            except Exception as exc:
                status = f"failed: {exc}"
                raise
            finally:
                live.end(status)

    def stop_profile(self) -> bool:
        """Ask the running profile to end after its current step (it keeps no record); False if none runs."""
        live = self._live
        if live is None or live.status != "running":
            return False
        self._stop_requested.set()
        return True

    def live(self) -> LiveView | None:
        """The current (or last) profiling run as it stands; never waits for the device."""
        live = self._live
        return live.view() if live is not None else None

    def run(self, run_id: int | None = None) -> RunRecord:
        """A kept run by id (None: the latest)."""
        if not self.runs:
            raise InvalidSettingsError("No profiling run yet: run one in the Profile panel first.")
        if run_id is None:
            return self.runs[-1]
        for record in self.runs:
            if record.run_id == run_id:
                return record
        raise InvalidSettingsError(f"Run #{run_id} is not among this session's runs "
                                   f"({', '.join(f'#{r.run_id}' for r in self.runs)}): pick one of those.")

    # -- scheduler explorer ----------------------------------------------------------------------
    def explore(self, settings: GenerationSettings, *, batch: int, prompt_tokens: int, new_tokens: int | None = None,
                splits: tuple[float, ...] = DEFAULT_SPLITS) -> ExploreResult:
        """Predicted step time against the split fraction for the loaded model under `settings` and this shape,
        the auto choice, and the measured points of kept runs of the same model, placement and shape."""
        RunShape(batch=batch, prompt_tokens=prompt_tokens)  # validates
        new_tokens = settings.max_new_tokens if new_tokens is None else new_tokens
        model = self.require_model()
        if prompt_tokens + new_tokens > model.spec.max_positions:
            raise PromptTooLongError(f"prompt_tokens={prompt_tokens} plus {new_tokens} new tokens need "
                                     f"{prompt_tokens + new_tokens} positions, but the model's context is "
                                     f"{model.spec.max_positions}: shorten the prompt or ask for fewer new tokens.")
        with self._device_job("the scheduler explorer"):
            hardware = self._hardware(model.device)
            result = explore_splits(model.spec, settings.offload, device=model.device, profile=hardware, batch=batch,
                                    prompt_tokens=prompt_tokens, new_tokens=new_tokens, splits=splits)
        offload = settings.offload
        same = [r for r in self.runs if r.source == model.source and r.device == str(model.device)
                and (r.batch, r.prompt_tokens, r.new_tokens) == (batch, prompt_tokens, new_tokens)
                and r.settings["offload.placement"] == result.placement and r.split is not None
                and r.settings["offload.chunk_tokens"] == offload.chunk_tokens
                and r.settings["offload.gpu_kv_budget_gib"] == offload.gpu_kv_budget_gib]
        measured = tuple(MeasuredPoint(run_id=r.run_id, split=r.split, step_ms=r.median_step_ms,
                                       predicted_ms=r.predicted_ms, label=r.label) for r in same)
        return replace(result, measured=measured)

    # -- compare and export ----------------------------------------------------------------------
    def compare(self, run_ids: list[int]) -> CompareTable:
        """Kept runs side by side, the first one the baseline of the deltas."""
        return compare_runs([self.run(run_id) for run_id in run_ids])

    @property
    def export_dir(self) -> Path:
        """Where exports are written (made on first use): the one directory the app may serve files from."""
        if self._export_dir is None:
            self._export_dir = Path(tempfile.mkdtemp(prefix="kvlab-exports-"))
        self._export_dir.mkdir(parents=True, exist_ok=True)
        return self._export_dir

    def export_compare(self, run_ids: list[int], *, fmt: str = "csv") -> Path:
        """The comparison of `run_ids` as a .csv (the table) or .json (the table and the full records)."""
        if fmt not in ("csv", "json"):
            raise InvalidSettingsError(f"Export format {fmt!r} is not offered: use 'csv' or 'json'.")
        records = [self.run(run_id) for run_id in run_ids]
        name = "kvlab-compare-" + "-".join(str(r.run_id) for r in records) + f".{fmt}"
        return write_compare(self.export_dir / name, records)

    def export_trace(self, run_id: int | None = None) -> Path:
        """The run's Chrome/Perfetto trace (lanes per layer, payload and link GB/s, tokens/s) under `export_dir`."""
        record = self.run(run_id)
        counters = step_counters(s.metrics for s in record.steps) | nvml_counters(record.link) | record.pm_counters
        return write_trace(self.export_dir / f"kvlab-run-{record.run_id}.trace.json", record.spans, counters=counters,
                           metadata=record.summary(with_steps=True))

    def import_run(self, path: str | Path, *, note: str = "") -> RunRecord:
        """A run exported by export_trace (here or on another machine) kept beside this session's runs and shown
        as the Profile panel's current run. `note` says where it was measured."""
        path = Path(path)
        try:
            trace = read_trace(path)
        except (OSError, ValueError, EOFError) as exc:  # EOFError: a gzip file cut short
            raise InvalidSettingsError(f"Could not read a trace from {path.name}: {exc or type(exc).__name__}. "
                                       "Import a .trace.json(.gz) "
                                       "written by the Profile panel's Export.") from exc
        with self._device_job("a run import"):
            record = record_from_trace(trace, run_id=self._next_run_id, note=note)
            self._next_run_id += 1
            self.runs = [*self.runs, record][-MAX_RUNS:]
            live = LiveRun(record.run_id, num_steps=len(record.steps))
            live.add(ProfileUpdate(run_id=record.run_id, step=len(record.steps), num_steps=len(record.steps),
                                   step_ms=record.median_step_ms, predicted_ms=record.predicted_ms,
                                   tokens_per_s=record.tokens_per_s, payload_gb_s={}, link_gb_s=None,
                                   link_note=record.link_note, l2_note=record.l2_note, new_spans=record.spans,
                                   new_steps=record.steps, new_link=record.link, record=record))
            live.end("imported")
            self._live = live
        return record


def check_message(message) -> None:
    """A chat message the model can read, or InvalidSettingsError naming what is wrong with it."""
    if not isinstance(message, str) or not message.strip():
        raise InvalidSettingsError("The message is empty: type something to send.")
    if len(message) > MAX_CHAT_CHARS:
        raise InvalidSettingsError(f"The message has {len(message):,} characters; the limit is {MAX_CHAT_CHARS:,}: "
                                   "send a shorter text.")
    surrogate = next((i for i, c in enumerate(message) if _is_surrogate(c)), None)
    if surrogate is not None:
        raise InvalidSettingsError(
            f"The message holds a lone surrogate (U+{ord(message[surrogate]):04X} at character {surrogate + 1}), "
            "which is not valid Unicode text and cannot be encoded: paste the text again from its source.")


def _is_surrogate(char: str) -> bool:
    """Half of a UTF-16 pair, alone: JSON can carry one, UTF-8 cannot encode it."""
    return 0xD800 <= ord(char) <= 0xDFFF


def _valid_text(text: str) -> str:
    """Earlier turns as the tokenizer can encode them: a lone surrogate (API clients can send one) becomes U+FFFD."""
    return "".join("\ufffd" if _is_surrogate(c) else c for c in text)


# The figures the Chat panel writes under each finished reply; not part of what the model said.
REPLY_FOOTER = re.compile(r"(?:\n\n|^)_\d+ tokens · [0-9.,]+ tok/s[^_\n]*_$")  # alone: a blank reply, trimmed by the display


def reply_footer(num_tokens: int, decode_tok_s: float, note: str = "") -> str:
    return f"\n\n_{num_tokens} tokens · {decode_tok_s:.1f} tok/s{note}_"


def normalise_history(history) -> list[dict]:
    """Chat history as [{role, content: str}], the panel's reply footers removed. Browsers send content as
    blocks, API clients as strings."""
    out = []
    for turn in history or []:
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
            continue
        content = turn.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
        if isinstance(content, str):
            if turn["role"] == "assistant":
                content = REPLY_FOOTER.sub("", content)
            out.append({"role": turn["role"], "content": _valid_text(content)})
    return out


__all__ = ["ChatUpdate", "LabSession", "check_message", "model_card", "normalise_history", "reply_footer"]
