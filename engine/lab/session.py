"""What the app holds between clicks: the loaded model, each client's settings, profiling runs, one job at a time.

Panels talk to a `LabSession` only (no torch in panels). The loaded model and the device are shared by everyone
connected; each browser tab or API client (`owner`, its Gradio session) has its own applied settings and the run
its Profile panel shows (engine/lab/clients.py). A failed load keeps the model that was loaded before; a failed run
frees its memory and leaves the model in place for the next one.

Work that uses the device (loading, chat, profiling, measuring the hardware) takes the session's lock. A chat reply
or a profile asked for while another job holds it waits, and says what it waits for; a load is refused at once,
naming the running job. Watching a run (`live_run`, `live`) never takes the lock. Files the app offers for download
are written only under `export_dir`, a directory the session makes (the app's only allowed path).
"""

from __future__ import annotations

import tempfile
import threading
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from engine.errors import BusyError, InvalidSettingsError, KVLabError, ModelLoadError, PromptTooLongError
from engine.generator import Generator
from engine.lab.access import SourcePolicy
from engine.lab.chat import MAX_CHAT_CHARS, ChatUpdate, check_message, normalise_history, reply_footer
from engine.lab.checks import MAX_SOURCE_CHARS, check_applied, check_context, shortened
from engine.lab.clients import ClientState, Clients
from engine.lab.device import DeviceLock
from engine.lab.compare import CompareTable, compare_runs, write_compare
from engine.lab.explorer import DEFAULT_SPLITS, ExploreResult, MeasuredPoint, explore_splits
from engine.lab.live import LiveRun, LiveView
from engine.lab.runs import ProfileUpdate, RunRecord, profile_run, record_from_trace, trace_spans
from engine.loader import LoadedModel, load_model
from engine.memory import release_run_memory
from engine.offload.profiler import HardwareProfile, hardware_profile
from engine.offload.scheduler import gqa_note
from engine.settings import GenerationSettings, RunShape
from engine.telemetry import CuptiPmSampler, NvmlSampler, nvml_counters, step_counters, write_trace
from engine.telemetry.export import read_trace

MAX_RUNS = 100  # profiling runs kept for Compare and the explorer, oldest dropped first
MAX_LIVE_RUNS = 8  # runs whose live views are kept for watchers (older runs are rebuilt from their records)


def model_card(model: LoadedModel) -> dict:
    """The loader's card plus what the lab derives from the shape: the GQA note and the memory needed."""
    spec = model.spec
    full_context_kv = spec.kv_bytes_per_token * spec.max_positions
    return model.card() | {"gqa_note": gqa_note(spec), "kv_bytes_full_context": full_context_kv,
                           "memory_needed_bytes": spec.weight_bytes + full_context_kv,
                           "memory_fit": memory_fit(model)}


def memory_fit(model: LoadedModel) -> str | None:
    """What fits in GPU and host memory at the model's full context, in one line for the Model card
    (engine/offload/placement.py memory_fit); None where it cannot be worked out."""
    from engine.offload.placement import memory_fit as fit

    try:
        return fit(model.spec, device=model.device, context=model.spec.max_positions)
    except (KVLabError, ValueError):  # a budget or shape the placement refuses: the card simply leaves it out
        return None


class LabSession:
    def __init__(self, *, export_dir: str | Path | None = None, models_dir: str | Path | None = None) -> None:
        self.model: LoadedModel | None = None
        self.policy = SourcePolicy(models_dir)  # what clients on other machines may load
        # One device job at a time, whatever the UI's queue does.
        self._jobs = DeviceLock(on_release=self._give_back_memory, kept=self._kept_line)
        self._lock = self._jobs.lock
        self.clients = Clients()  # per browser tab or API client: applied settings, the run in view
        self.runs: list[RunRecord] = []  # finished profiling runs, oldest first
        self._next_run_id = 1
        self._ids = threading.Lock()  # run ids are taken by jobs that have not got the device yet
        self._live: dict[int, LiveRun] = {}  # the newest runs' live views, by run id
        self._profile_stops: dict[int, tuple[str | None, threading.Event]] = {}  # runs not ended yet
        self._chat_stops: list[tuple[str | None, threading.Event]] = []  # replies streaming or waiting
        self._stops_lock = threading.Lock()
        self._profiles: dict[str, HardwareProfile] = {}
        self._cupti: dict[str, CuptiPmSampler] = {}
        self._export_dir = Path(export_dir) if export_dir is not None else None

    # -- model ---------------------------------------------------------------------------------
    def load(self, source: str, *, device: str | None = None, dtype: str | None = None, remote: bool = False) -> dict:
        """Load `source` and make it current for every client; on failure the previous model stays loaded.

        Refused (BusyError) while a chat reply or a profile runs: swapping the model under a running job would
        end it with a confusing error, and waiting silently behind a long profile looks like a hang. `remote`:
        the request comes from another machine, so filesystem paths must lie in the allowed models directory."""
        if isinstance(source, str) and len(source) > MAX_SOURCE_CHARS:
            raise ModelLoadError(f"The model source is {len(source):,} characters long ({shortened(source)!r}); no "
                                 f"path, preset or hub id is longer than {MAX_SOURCE_CHARS:,}: give a model directory, "
                                 "'demo', 'synthetic:<preset>' or a hub id.")
        try:
            source = self.policy.resolve(source, remote=remote)
            with self._device_job(f"loading {shortened(str(source))}", refused="load a model"):
                self.model = load_model(source, device=device, dtype=dtype)
                return model_card(self.model)
        except KVLabError as exc:
            raise _quoted_short(exc, source) from None
        except OSError as exc:  # the filesystem refused the name itself (too long, bad characters)
            raise ModelLoadError(f"Could not read {shortened(str(source))!r} as a model: {exc.strerror or exc}. Give "
                                 "the path of a model directory, 'demo', 'synthetic:<preset>' or a hub id.") from None

    def _device_job(self, what: str, *, refused: str = "load a model", owner: str | None = None, wait: bool = False):
        """Hold the device for `what`, or refuse at once (BusyError) naming the running job (`wait`: wait for it)."""
        return self._jobs.held(what, refused=refused, owner=owner, wait=wait)

    def _queue(self, what: str, owner: str | None, stop: threading.Event, held: list) -> Iterator[str]:
        """Wait for the device, yielding what holds it every WAIT_REPORT_S (see DeviceLock.queue)."""
        return self._jobs.queue(what, owner, stop, held, self.busy_line)

    def _release_device(self) -> None:
        self._jobs.release()

    def busy(self) -> str | None:
        """What is running now (e.g. "a chat reply"), or None."""
        return self._jobs.job

    def busy_line(self, owner: str | None = None) -> str:
        """What holds the device, said to `owner`: the job, who started it and, for a profile, how far it is."""
        job = self._jobs.job
        if job is None:
            return "nothing (starting)"
        line = f"{job}, {self._jobs.who(owner)}"
        if job.startswith("profile run #"):
            live = self._live.get(int(job.removeprefix("profile run #")))
            if live is not None:
                line += f": {live.stage().line()}"
        return line

    def _give_back_memory(self) -> None:
        if self.model is not None:
            release_run_memory(self.model.device)  # a server's many threads would each keep cuBLAS memory

    def _kept_line(self) -> str:
        return f" The loaded model ({self.model.name}) is kept." if self.model is not None else ""

    def card(self) -> dict | None:
        return model_card(self.model) if self.model is not None else None

    def require_model(self) -> LoadedModel:
        if self.model is None:
            raise InvalidSettingsError("No model is loaded: load one in the Model panel first.")
        return self.model

    # -- settings (per client) -----------------------------------------------------------------
    def client(self, owner: str | None = None) -> ClientState:
        return self.clients.get(owner)

    @property
    def settings(self) -> GenerationSettings:
        """The settings applied by the Python client (owner None); each tab and API client has its own."""
        return self.client(None).settings

    @property
    def shape(self) -> RunShape:
        return self.client(None).shape

    def settings_for(self, owner: str | None) -> tuple[GenerationSettings, RunShape]:
        state = self.client(owner)
        return state.settings, state.shape

    def apply_settings(self, settings: GenerationSettings, shape: RunShape | None = None, *,
                       owner: str | None = None) -> list[str]:
        """Make `settings` (and the profiling run's `shape`) the ones `owner`'s chat, profiling and explorer use.

        With a model loaded they are checked first as a profiling run would check them (context, memory, the
        decode-attention backend, the plan): a KVLabError with the run's message, and nothing applied, when they
        would fail. Returns notes on settings that do nothing on this device."""
        if not isinstance(settings, GenerationSettings):
            raise InvalidSettingsError(f"settings must be a GenerationSettings instance, got {type(settings).__name__}.")
        if shape is not None and not isinstance(shape, RunShape):
            raise InvalidSettingsError(f"shape must be a RunShape instance, got {type(shape).__name__}.")
        state = self.client(owner)
        shape = shape if shape is not None else state.shape
        notes = []
        if self.model is not None:
            notes = check_applied(self.model, settings, shape, hardware=self._profiles.get(str(self.model.device)))
        state.settings, state.shape = settings, shape
        return notes

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

    def has_hardware(self) -> bool:
        """Whether this session holds the device's measurements (else the next job that needs them measures first)."""
        return str(self._device()) in self._profiles

    def hardware(self, *, refresh: bool = False) -> HardwareProfile:
        """The profiler's measurements of the loaded model's device: held, read from the cache, or measured now
        (`refresh`). Measuring needs the device: refused (BusyError) while a job runs."""
        device = self._device()
        held = self._profiles.get(str(device))
        if held is not None and not refresh:
            return held
        with self._device_job("measuring the hardware", refused="measure the hardware"):
            return self._hardware(device, refresh=refresh)

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
        if device.type != "cuda":
            cupti = "the model runs on the CPU: no GPU counters to sample"
        else:
            probe = self._cupti_sampler(device).probe()
            cupti = probe.reason if not probe.available else f"available: {probe.reason}"
        return {"NVML": nvml, "CUPTI": cupti}

    # -- chat ----------------------------------------------------------------------------------
    def chat(self, history: list[dict], message: str, settings: GenerationSettings, *,
             owner: str | None = None) -> Iterator[ChatUpdate]:
        """Stream the model's reply to `message` after `history` ([{role, content}, ...]). `owner` names who asked
        (a browser tab, an API client): `stop_chat(owner)` stops only that one's reply. While another job holds the
        device the updates say what it is (`waiting_for`) until the reply starts.

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
        stop, held = threading.Event(), []
        entry = (owner, stop)
        with self._stops_lock:
            self._chat_stops.append(entry)
        start = time.perf_counter()
        try:
            for waiting in self._queue("a chat reply", owner, stop, held):
                yield ChatUpdate(reply="", num_tokens=0, decode_tok_s=0.0, elapsed_s=time.perf_counter() - start,
                                 finish_reason=None, dropped_turns=dropped, waiting_for=waiting)
            if not held:
                yield ChatUpdate(reply="", num_tokens=0, decode_tok_s=0.0, elapsed_s=time.perf_counter() - start,
                                 finish_reason="stopped", dropped_turns=dropped)
                return
            try:
                if self.model is not model:  # swapped while this reply waited: not possible (loads are refused)
                    raise BusyError("The model changed while the reply waited: send the message again.")
                generator = Generator(model)
                if settings.offload.offloaded:
                    generator.profile = self._hardware(model.device)
                reply, decode_ms, num_tokens = "", 0.0, 0
                for event in generator.stream([prompt], settings):
                    reply += event.text_deltas[0]
                    if event.token_ids[0] is not None:
                        num_tokens += 1
                    if event.step > 0:
                        decode_ms += event.step_ms
                    done = event.finished[0]
                    reason = event.finish_reasons[0] if done else "stopped" if stop.is_set() else None
                    yield ChatUpdate(reply=reply, num_tokens=num_tokens,
                                     decode_tok_s=(num_tokens - 1) / (decode_ms * 1e-3) if decode_ms else 0.0,
                                     elapsed_s=time.perf_counter() - start, finish_reason=reason,
                                     dropped_turns=dropped, capped_at=settings.max_new_tokens if capped else None)
                    if reason is not None:
                        return
            finally:
                self._release_device()
        finally:
            with self._stops_lock:
                self._chat_stops.remove(entry)

    def stop_chat(self, owner: str | None = None) -> bool:
        """End `owner`'s reply after its current token, or its wait for the device (any reply's, when `owner` is
        None); False if it has none."""
        with self._stops_lock:
            mine = [stop for who, stop in self._chat_stops if owner is None or who == owner]
        for stop in mine:
            stop.set()
        return bool(mine)

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
    def profile(self, settings: GenerationSettings, *, batch: int, prompt_tokens: int, seed: int = 0,
                gpu_counters: bool = True, owner: str | None = None) -> Iterator[ProfileUpdate]:
        """Run `batch` seeded random prompts of `prompt_tokens` tokens under `settings` with telemetry attached.

        Yields a ProfileUpdate per decode step (and, while another job holds the device, updates saying what it
        waits for); the last one carries the RunRecord, which is also kept in `runs`. While it runs,
        `live_run(owner)` shows what it has produced so far, and `owner` views it; `stop_profile()` (from any
        thread), or closing the iterator, ends it early without a record. `gpu_counters`: sample PCIe/DRAM/L2
        counters with CUPTI where available (on an H100 sampling every millisecond slowed an offloaded step by
        about a fifth).
        """
        shape = RunShape(batch=batch, prompt_tokens=prompt_tokens, seed=seed)
        if not isinstance(settings, GenerationSettings):
            raise InvalidSettingsError(f"settings must be a GenerationSettings instance, got {type(settings).__name__}.")
        model = self.require_model()
        with self._ids:
            run_id, self._next_run_id = self._next_run_id, self._next_run_id + 1
        num_steps = max(0, settings.max_new_tokens - 1)
        live = LiveRun(run_id, num_steps=num_steps, owner=owner, status="waiting")
        self._keep_live(live)
        self.client(owner).viewing = run_id
        stop, held = threading.Event(), []
        with self._stops_lock:
            self._profile_stops[run_id] = (owner, stop)
        status = "stopped"
        try:
            for waiting in self._queue(f"profile run #{run_id}", owner, stop, held):
                live.wait_for(waiting)
                yield ProfileUpdate(run_id=run_id, step=0, num_steps=num_steps, step_ms=None, predicted_ms=None,
                                    tokens_per_s=None, payload_gb_s={}, link_gb_s=None, link_note="", l2_note="",
                                    new_spans=(), new_steps=(), new_link=(), waiting_for=waiting)
            if not held:
                return
            try:
                live.start()
                if self.model is not model:
                    raise BusyError("The model changed while the run waited: press Run profile again.")
                hardware = self._hardware(model.device)
                with closing(profile_run(model, settings, shape, run_id=run_id, hardware=hardware, live=live,
                                         cupti=self._cupti_sampler(model.device) if gpu_counters else None)) \
                        as updates:
                    for update in updates:
                        live.add(update)
                        if update.record is not None:
                            self.runs = [*self.runs, update.record][-MAX_RUNS:]
                            status = "done"
                        yield update
                        if stop.is_set():
                            break
            finally:
                self._release_device()
        except Exception as exc:
            status = f"failed: {exc}"
            raise
        finally:
            with self._stops_lock:
                self._profile_stops.pop(run_id, None)
            live.end(status)

    def stop_profile(self, owner: str | None = None) -> bool:
        """Ask `owner`'s running (or waiting) profile, any one's when `owner` is None, to end after its current step
        (it keeps no record); False if there is none."""
        with self._stops_lock:
            mine = [(run_id, stop) for run_id, (who, stop) in self._profile_stops.items()
                    if owner is None or who == owner]
        for run_id, stop in mine:
            stop.set()
            live = self._live.get(run_id)
            if live is not None:  # its watchers' progress line says so until the run ends
                live.request_stop()
        return bool(mine)

    def _keep_live(self, live: LiveRun) -> None:
        self._live[live.run_id] = live
        for run_id in sorted(list(self._live))[:-MAX_LIVE_RUNS]:
            if self._live[run_id].status not in ("waiting", "running"):
                del self._live[run_id]

    def live_run(self, owner: str | None = None) -> LiveRun | None:
        """The run `owner` views (the one it last started, imported or picked), else the newest; never waits."""
        viewing = self.client(owner).viewing
        if viewing is not None:
            live = self._live.get(viewing)
            if live is not None:
                return live
            record = next((r for r in self.runs if r.run_id == viewing), None)
            if record is not None:
                return self._keep_record_live(record, "done")
        newest = max(list(self._live), default=None)
        return self._live.get(newest) if newest is not None else None

    def live(self, owner: str | None = None) -> LiveView | None:
        """The run `owner` views as it stands, whole (scripts and tests; watchers read `live_run` incrementally)."""
        live = self.live_run(owner)
        return live.view() if live is not None else None

    def view_run(self, run_id: int, owner: str | None = None) -> LiveRun:
        """Make a kept run (or a running one) the one `owner`'s Profile panel shows."""
        live = self._live.get(run_id)
        if live is None:
            live = self._keep_record_live(self.run(run_id), "done")
        self.client(owner).viewing = run_id
        return live

    def _keep_record_live(self, record: RunRecord, status: str) -> LiveRun:
        live = LiveRun(record.run_id, num_steps=len(record.steps))
        live.add(ProfileUpdate(run_id=record.run_id, step=len(record.steps), num_steps=len(record.steps),
                               step_ms=record.median_step_ms, predicted_ms=record.predicted_ms,
                               tokens_per_s=record.tokens_per_s, payload_gb_s={}, link_gb_s=None,
                               link_note=record.link_note, l2_note=record.l2_note, new_spans=record.spans,
                               new_steps=record.steps, new_link=record.link, record=record))
        live.end(status)
        self._keep_live(live)
        return live

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
        check_context(model, replace(settings, max_new_tokens=new_tokens), prompt_tokens=prompt_tokens)
        hardware = self._profiles.get(str(model.device))
        if hardware is None:  # planning needs the device's measured speeds: measured first, with the device
            with self._device_job("measuring the hardware", refused="measure the hardware"):
                hardware = self._hardware(model.device)
        result = explore_splits(model.spec, settings.offload, device=model.device, profile=hardware, batch=batch,
                                prompt_tokens=prompt_tokens, new_tokens=new_tokens, splits=splits,
                                fused=settings.wants_fast_adapter)
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
        """The run's Chrome/Perfetto trace (lanes per layer, payload and link GB/s, tokens/s) under `export_dir`.
        A run of more spans than a trace keeps (runs.MAX_TRACE_SPANS) has its later steps merged per lane."""
        record = self.run(run_id)
        spans, merged_note = trace_spans(record)
        counters = step_counters(s.metrics for s in record.steps) | nvml_counters(record.link) | record.pm_counters
        metadata = record.summary(with_steps=True) | ({"spans_merged": merged_note} if merged_note else {})
        return write_trace(self.export_dir / f"kvlab-run-{record.run_id}.trace.json", spans, counters=counters,
                           metadata=metadata)

    def import_run(self, path: str | Path, *, note: str = "", owner: str | None = None) -> RunRecord:
        """A run exported by export_trace (here or on another machine) kept beside this session's runs and shown
        as `owner`'s Profile panel's run. `note` says where it was measured."""
        path = Path(path)
        try:
            trace = read_trace(path)
        except (OSError, ValueError, EOFError) as exc:  # EOFError: a gzip file cut short
            raise InvalidSettingsError(f"Could not read a trace from {path.name}: {exc or type(exc).__name__}. "
                                       "Import a .trace.json(.gz) "
                                       "written by the Profile panel's Export.") from exc
        with self._ids:
            record = record_from_trace(trace, run_id=self._next_run_id, note=note)
            self._next_run_id += 1
        self.runs = [*self.runs, record][-MAX_RUNS:]
        self._keep_record_live(record, "imported")
        self.client(owner).viewing = record.run_id
        return record

    def import_peer_runs(self, path: str | Path) -> list[RunRecord]:
        """KV Lab's and the peers' finished runs from the peers suite's results (bench/results/peers.json), kept
        beside this session's runs for Compare (engine/lab/peer_runs.py)."""
        from engine.lab.peer_runs import peer_records, read_peer_results

        payload = read_peer_results(path)
        with self._ids:
            records = peer_records(payload, first_run_id=self._next_run_id)
            self._next_run_id += len(records)
        self.runs = [*self.runs, *records][-MAX_RUNS:]
        return records

    # -- kernel study (engine/lab/kernel_study.py; the Kernels tab) ------------------------------------
    def kernel_study(self):
        """The decode-attention variant study on this session's device and CUPTI sampler; it holds the device while
        it runs (refused, naming the job, while another one does)."""
        from engine.lab.kernel_study import KernelStudy

        device = self._device()
        return KernelStudy(device, cupti=self._cupti_sampler(device) if device.type == "cuda" else None,
                           device_job=lambda: self._device_job("a kernel study", refused="run a kernel study"))


def _quoted_short(exc: KVLabError, source) -> KVLabError:
    """`exc` with a long model source quoted in its message shortened (the message names it; a reader needs its
    start and end, not 100,000 characters of it)."""
    if not isinstance(source, str) or len(source) <= 80 or source not in str(exc):
        return exc
    short = type(exc)(str(exc).replace(source, shortened(source)))
    return short


__all__ = ["MAX_CHAT_CHARS", "ChatUpdate", "LabSession", "check_message", "model_card", "normalise_history",
           "reply_footer"]
