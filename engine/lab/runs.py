"""Profiling runs for the lab: a seeded decode run with telemetry attached, streamed as it goes, kept as a record.

`profile_run` runs the Generator on `batch` random prompts with a Recorder attached and yields a
`ProfileUpdate` after every decode step: the steps measured since the last update beside what the plan
predicted for them, tokens/s, PCIe payload GB/s (the engine's own bytes over its copies' time), NVML link
GB/s where a GPU lets it be sampled (else why not), where the L2 figure comes from, and the spans recorded
since the last update. The last update carries the frozen `RunRecord` that Compare, the scheduler explorer
and the trace export read; `engine/lab/live.py` holds what watchers read while a run goes on.

A run's first decode steps can be much slower than the rest (CUDA-graph capture, compilation, first-touch
allocations): `warmup_steps` finds them, and the record's tokens/s is over the steps after them.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Iterator

import torch

from engine.errors import InvalidSettingsError, RunFailedError
from engine.generator import Generator
from engine.lab.live import LiveRun
from engine.loader import LoadedModel
from engine.offload.placement import plan_for
from engine.offload.profiler import HardwareProfile
from engine.offload.scheduler import RunPlan
from engine.settings import GenerationSettings, RunShape
from engine.telemetry.export import COUNTER_LINK, PM_TRACKS, spans_from_trace
from engine.telemetry import (NCU_FALLBACK, CuptiPmSampler, NvmlSample, NvmlSampler, Recorder, Span, StepMetrics,
                              step_metrics)

NVML_PERIOD_S = 0.02  # the PCIe byte counters are 32-bit and wrap every ~78 ms at full speed
# Warm-up: leading steps slower than WARMUP_FACTOR x the median of the steps after them, at most MAX_WARMUP_STEPS.
WARMUP_FACTOR = 1.5
MAX_WARMUP_STEPS = 3
# Said in the place of a prediction, a PCIe floor or a measured/predicted ratio on a run without a GPU.
NO_GPU_PREDICTION = ("no GPU: the cost model predicts GPU steps from measured PCIe and GPU speeds, which this CPU run "
                     "has none of")


@dataclass(frozen=True)
class LabStep:
    """One measured decode step beside what the run's plan predicted for it."""

    metrics: StepMetrics
    predicted_ms: float | None  # None when no plan covers the step
    pcie_floor_ms: float | None  # the plan's H2D bytes at the best measured H2D rate; None when nothing is offloaded
    split: float | None  # fraction of the offloaded tokens recomputed; None when nothing is offloaded

    def as_dict(self) -> dict[str, Any]:
        return self.metrics.as_dict() | {"predicted_ms": self.predicted_ms, "pcie_floor_ms": self.pcie_floor_ms,
                                         "split": self.split}


@dataclass(frozen=True)
class RunRecord:
    """A finished profiling run: what ran, what it measured, what the plan predicted, and its trace."""

    run_id: int
    model: str  # the model's name
    source: str  # what it was loaded from
    device: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    seed: int
    settings: dict[str, Any]  # flat: {"offload.placement": "cpu", "kernel.prefetch": "auto", ...}
    tokens_per_s: float  # decode tokens of all sequences over the decode steps' time
    median_step_ms: float
    predicted_ms: float | None  # median of the plan's per-step predictions
    pcie_floor_ms: float | None  # median of the per-step PCIe floors; None when nothing is offloaded
    split: float | None  # mean recomputed fraction of the offloaded tokens; None when nothing is offloaded
    plan_reason: str
    prefill_ms: float
    steps: tuple[LabStep, ...]
    spans: tuple[Span, ...]
    link: tuple[NvmlSample, ...]  # NVML samples that carry a rate
    link_note: str
    l2_note: str
    l2_hit_pct: float | None  # mean over the run where CUPTI sampled it
    notes: tuple[str, ...]
    created_at: str  # ISO date-time, UTC
    # CUPTI PM-sampling series on the spans' µs axis (engine.telemetry.export.cupti_counters): PCIe and DRAM GB/s,
    # L2 hit % where the chip samples it; empty when CUPTI did not run.
    pm_counters: dict[str, list] = field(default_factory=dict)
    pm_labels: dict[str, str] = field(default_factory=dict)  # pm_counters track -> what its values are (CUPTI)
    device_name: str = ""  # the GPU's (or CPU's) name, e.g. "NVIDIA H100 80GB HBM3"
    warmup_steps: int = 0  # leading steps left out of tokens_per_s (see warmup_steps())
    tokens_per_s_all: float | None = None  # over every decode step, warm-up included

    @property
    def on_gpu(self) -> bool:
        """Whether the run ran on a GPU: only then do its predictions, PCIe floor and ratios mean anything."""
        return self.device.startswith("cuda")

    @property
    def pct_of_floor(self) -> float | None:
        """How close the measured step came to the PCIe floor (100 % = as fast as the link allows)."""
        if not self.pcie_floor_ms or not self.median_step_ms:
            return None
        return 100.0 * self.pcie_floor_ms / self.median_step_ms

    @property
    def label(self) -> str:
        s = self.settings
        where = s["offload.placement"] if s["offload.placement"] == "gpu" else \
            f"{s['offload.placement']} split {s['offload.split']}"
        return f"#{self.run_id} {self.model} · {where} · B{self.batch} P{self.prompt_tokens} N{self.new_tokens}"

    def summary(self, *, with_steps: bool = True) -> dict[str, Any]:
        """The record as JSON-ready values (spans left out: they go to the trace)."""
        out = {"run_id": self.run_id, "label": self.label, "model": self.model, "source": self.source,
               "device": self.device, "device_name": self.device_name, "batch": self.batch,
               "prompt_tokens": self.prompt_tokens,
               "new_tokens": self.new_tokens, "seed": self.seed, "settings": dict(self.settings),
               "tokens_per_s": self.tokens_per_s, "median_step_ms": self.median_step_ms,
               "predicted_ms": self.predicted_ms, "pcie_floor_ms": self.pcie_floor_ms,
               "pct_of_floor": self.pct_of_floor, "split": self.split, "plan_reason": self.plan_reason,
               "prefill_ms": self.prefill_ms, "link_note": self.link_note, "l2_note": self.l2_note,
               "l2_hit_pct": self.l2_hit_pct, "notes": list(self.notes), "created_at": self.created_at,
               "num_spans": len(self.spans), "warmup_steps": self.warmup_steps,
               "tokens_per_s_all": self.tokens_per_s_all, "pm_labels": dict(self.pm_labels)}
        if with_steps:
            out["steps"] = [step.as_dict() for step in self.steps]
        return out


@dataclass(frozen=True)
class ProfileUpdate:
    """The state of a profiling run after one more decode step (or the prefill, at step 0)."""

    run_id: int
    step: int  # decode steps measured so far
    num_steps: int  # decode steps the run measures (new tokens - 1: the first token comes from the prefill)
    step_ms: float | None  # the latest measured step
    predicted_ms: float | None  # what the plan predicted for it
    tokens_per_s: float | None  # over the steps measured so far
    payload_gb_s: dict[str, float]  # the latest step's, per direction ("h2d", "d2h")
    link_gb_s: dict[str, float] | None  # the latest NVML sample's ("h2d", "d2h"); None when not sampled
    link_note: str  # what the link figure is, or why there is none
    l2_note: str  # where the L2 figure comes from, or why there is none here
    new_spans: tuple[Span, ...]
    new_steps: tuple[LabStep, ...]
    new_link: tuple[NvmlSample, ...]
    record: RunRecord | None = None  # on the last update only
    waiting_for: str | None = None  # before the run starts: what holds the device


def flat_settings(settings: GenerationSettings) -> dict[str, Any]:
    """{"max_new_tokens": 16, "sampling.temperature": 0.0, "offload.placement": "cpu", ...}"""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}{f.name}." if dataclasses.is_dataclass(getattr(value, f.name)) else f"{prefix}{f.name}",
                     getattr(value, f.name))
        else:
            out[prefix] = list(value) if isinstance(value, tuple) else value

    walk("", settings)
    return out


def random_prompts(vocab_size: int, shape: RunShape) -> list[list[int]]:
    """`shape.batch` prompts of `shape.prompt_tokens` token ids, the same for the same seed."""
    gen = torch.Generator().manual_seed(shape.seed)
    return torch.randint(0, vocab_size, (shape.batch, shape.prompt_tokens), generator=gen).tolist()


def _lab_step(metrics: StepMetrics, plan: RunPlan | None, prompt_tokens: int) -> LabStep:
    # Recorder step k decodes over prompt_tokens + k slots (the generator numbers decode steps from 1).
    try:
        planned = plan.step(prompt_tokens + metrics.step) if plan is not None else None
    except IndexError:
        planned = None
    if planned is None:
        return LabStep(metrics=metrics, predicted_ms=None, pcie_floor_ms=None, split=None)
    offloaded = planned.offloaded_tokens > 0
    return LabStep(metrics=metrics, predicted_ms=planned.predicted_ms,
                   pcie_floor_ms=planned.pcie_floor_ms if offloaded else None,
                   split=planned.split if offloaded else None)


def _start_link(device: torch.device, origin_ns: int) -> tuple[NvmlSampler | None, str]:
    if device.type != "cuda":
        return None, "no PCIe link in use: the model runs on the CPU (payload figures are host-memory copies)"
    sampler = NvmlSampler(device.index or 0, period_s=NVML_PERIOD_S, time_origin_ns=origin_ns)
    if not sampler.start():
        return None, f"NVML link GB/s unavailable: {sampler.why_unavailable}"
    return sampler, f"NVML link GB/s (protocol bytes included), sampled every {NVML_PERIOD_S * 1e3:.0f} ms"


def _start_l2(cupti: CuptiPmSampler | None, device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"no GPU L2 to sample: the model runs on the CPU; L2 figures: see {NCU_FALLBACK} (Nsight Compute)"
    if cupti is None:
        return False, f"GPU counters (CUPTI) off for this run; L2 figures: see {NCU_FALLBACK} (Nsight Compute)"
    probe = cupti.probe()
    if not probe.available:
        return False, probe.reason
    try:
        cupti.start()
    except Exception as exc:  # noqa: BLE001 - counters refused at run time: the run goes on without them
        return False, f"CUPTI PM sampling could not start ({type(exc).__name__}: {exc}); L2 figures: see {NCU_FALLBACK}"
    return True, f"L2 hit % ({probe.l2_formula}) by CUPTI PM sampling: the run's mean is shown when it ends"


def _stop_l2(cupti: CuptiPmSampler, *,
             origin_wall_ns: int) -> tuple[float | None, str, dict[str, list], dict[str, str]]:
    """-> (mean L2 hit %, what the L2 figure is, CUPTI counter tracks on the recorder's axis, their labels)."""
    try:
        pm = cupti.run_result(cupti.stop(), origin_wall_ns=origin_wall_ns)
    except Exception as exc:  # noqa: BLE001
        return None, f"CUPTI PM sampling failed ({type(exc).__name__}: {exc}); L2 figures: see {NCU_FALLBACK}", {}, {}
    return pm.l2_hit_pct, pm.note, pm.counters, pm.labels


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def warmup_steps(step_ms: list[float]) -> int:
    """How many leading steps are warm-up: each slower than WARMUP_FACTOR x the median of the steps after it, at
    most MAX_WARMUP_STEPS, and none unless three or more steps follow them."""
    count = 0
    while count < min(MAX_WARMUP_STEPS, len(step_ms) - 3) and \
            step_ms[count] > WARMUP_FACTOR * statistics.median(step_ms[count + 1:]):
        count += 1
    return count


def steady_tokens_per_s(steps: tuple[LabStep, ...] | list[LabStep], warmup: int) -> float:
    """Decode tokens of all sequences over the time of the steps after the warm-up."""
    steady = steps[warmup:] or steps
    ms = sum(s.metrics.step_ms for s in steady)
    return sum(s.metrics.tokens for s in steady) / (ms * 1e-3) if ms > 0 else 0.0


def check_profile_settings(settings: GenerationSettings) -> None:
    """What a profiling run needs of its settings beyond their own checks (also checked when they are applied)."""
    if settings.max_new_tokens < 2:
        raise InvalidSettingsError(f"max_new_tokens={settings.max_new_tokens}: a profiling run needs at least 2 "
                                   "new tokens (the first comes from the prefill, decode steps make the rest).")


def _placement_note(plan: RunPlan | None, settings: GenerationSettings, device: torch.device) -> str | None:
    """Where the run kept its K/V, in words true for its device."""
    if device.type != "cuda" and not settings.offload.offloaded:
        return ("KV cache resident (placement 'gpu'): the model runs on the CPU, so it stays in host memory and "
                "nothing crosses PCIe")
    return plan.gpu_budget_note if plan is not None and plan.gpu_budget_note else None


def profile_run(model: LoadedModel, settings: GenerationSettings, shape: RunShape, *, run_id: int,
                hardware: HardwareProfile, cupti: CuptiPmSampler | None = None,
                live: LiveRun | None = None) -> Iterator[ProfileUpdate]:
    """Decode `shape.batch` random prompts under `settings` with telemetry attached; one update per step. `live`:
    the LiveRun that watchers read, which follows the generator's progress through the prefill."""
    check_profile_settings(settings)
    spec, device = model.spec, model.device
    run_settings = replace(settings, ignore_eos=True, stop_strings=())  # every run decodes the same steps
    prompts = random_prompts(spec.vocab_size, shape)
    generator = Generator(model)
    generator.profile = hardware
    if live is not None:
        live.follow(lambda: generator.progress)
    recorder = Recorder(device)
    generator.recorder = recorder
    # GPU-resident runs have no offload plan; the scheduler's cost model still predicts their step time.
    plan = None if settings.offload.offloaded else plan_for(
        spec, settings.offload, device=device, batch=shape.batch, prompt_tokens=shape.prompt_tokens,
        new_tokens=settings.max_new_tokens, profile=hardware, fused=settings.wants_fast_adapter)
    link, link_note = _start_link(device, recorder.origin_ns)
    l2_started, l2_note = _start_l2(cupti, device)
    num_steps = settings.max_new_tokens - 1
    all_spans: list[Span] = []
    waiting: dict[int, list[Span]] = defaultdict(list)  # spans of steps not yet complete
    lab_steps: list[LabStep] = []
    link_samples: list[NvmlSample] = []
    cursor = {"steps": 0, "spans": 0, "link": 0}

    def collect() -> ProfileUpdate:
        # Completed steps first: every span of a completed step is resolved, so reading spans after the
        # steps never misses one of them.
        records = recorder.steps()[cursor["steps"]:]
        cursor["steps"] += len(records)
        spans, cursor["spans"] = recorder.spans(cursor["spans"])
        all_spans.extend(spans)
        for span in spans:
            waiting[span.step].append(span)
        step_spans = [span for record in records for span in waiting.pop(record.step, [])]
        new_steps = tuple(_lab_step(m, plan, shape.prompt_tokens)
                          for m in step_metrics(records, step_spans, tokens_per_step=shape.batch))
        lab_steps.extend(new_steps)
        new_link: tuple[NvmlSample, ...] = ()
        if link is not None:
            samples, cursor["link"] = link.samples(cursor["link"])
            new_link = tuple(s for s in samples if s.rx_gb_s is not None and s.tx_gb_s is not None)
            link_samples.extend(new_link)
        last = lab_steps[-1] if lab_steps else None
        decode_ms = sum(s.metrics.step_ms for s in lab_steps)
        return ProfileUpdate(
            run_id=run_id, step=len(lab_steps), num_steps=num_steps,
            step_ms=last.metrics.step_ms if last else None, predicted_ms=last.predicted_ms if last else None,
            tokens_per_s=sum(s.metrics.tokens for s in lab_steps) / (decode_ms * 1e-3) if decode_ms > 0 else None,
            payload_gb_s=dict(last.metrics.payload_gb_s) if last else {},
            link_gb_s={"h2d": link_samples[-1].rx_gb_s, "d2h": link_samples[-1].tx_gb_s} if link_samples else None,
            link_note=link_note, l2_note=l2_note, new_spans=tuple(spans), new_steps=new_steps, new_link=new_link)

    prefill_ms = 0.0
    try:
        for event in generator.stream(prompts, run_settings, stream_text=False):
            if event.step == 0:
                prefill_ms = event.step_ms
                if settings.offload.offloaded:
                    plan = generator.plan  # made by the generator for this run before its prefill
            yield collect()
        recorder.flush()
        final = collect()  # steps resolved after the last event
        l2_pct, pm_counters, pm_labels = None, {}, {}
        if l2_started:
            l2_started = False
            l2_pct, l2_note, pm_counters, pm_labels = _stop_l2(cupti, origin_wall_ns=recorder.origin_wall_ns)
        if not lab_steps:
            raise RunFailedError(f"Telemetry failed: the span recorder timed no decode step of run #{run_id} "
                                 f"({recorder.error or 'no error reported'}); the run is not kept and its memory was "
                                 "released: run the profile again.")
        notes = [*hardware.notes]
        if link is not None and link.status.startswith("failed"):
            # A sampler that stops mid-run (driver reset, GPU lost) ends the link series, not the run.
            link_note = (f"{link_note}; the NVML sampler {link.status} after {len(link_samples)} samples: the "
                         "link figures end there")
            notes.append(f"PCIe link sampling {link.status}")
        if recorder.error is not None:
            notes.append(f"the span recorder failed mid-run ({recorder.error}): later steps are missing from the "
                         "timeline")
        placement_note = _placement_note(plan, settings, device)
        if placement_note:
            notes.append(placement_note)
        if plan is not None and plan.gemm_note:
            notes.append(plan.gemm_note)
        if generator.layers_why:
            notes.append(generator.layers_why)
        if not all_spans:
            notes.append("no per-layer spans: the engine times only whole decode steps for this placement, so the "
                         "timeline shows each step's interval")
        if recorder.dropped:
            notes.append(f"{recorder.dropped} spans fell out of the recorder's ring: the timeline misses them")
        warmup = warmup_steps([s.metrics.step_ms for s in lab_steps])
        record = RunRecord(
            run_id=run_id, model=model.name, source=model.source, device=str(device), batch=shape.batch,
            prompt_tokens=shape.prompt_tokens, new_tokens=settings.max_new_tokens, seed=shape.seed,
            settings=flat_settings(run_settings), tokens_per_s=steady_tokens_per_s(lab_steps, warmup),
            median_step_ms=statistics.median(s.metrics.step_ms for s in lab_steps),
            predicted_ms=_median([s.predicted_ms for s in lab_steps if s.predicted_ms is not None]),
            pcie_floor_ms=_median([s.pcie_floor_ms for s in lab_steps if s.pcie_floor_ms is not None]),
            split=statistics.fmean(v) if (v := [s.split for s in lab_steps if s.split is not None]) else None,
            plan_reason=plan.reason if plan is not None else "no plan",
            prefill_ms=prefill_ms, steps=tuple(lab_steps), spans=tuple(all_spans), link=tuple(link_samples),
            link_note=link_note, l2_note=l2_note, l2_hit_pct=l2_pct, notes=tuple(notes),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), pm_counters=pm_counters, pm_labels=pm_labels,
            device_name=hardware.device_name, warmup_steps=warmup, tokens_per_s_all=final.tokens_per_s or 0.0)
        yield replace(final, l2_note=l2_note, link_note=link_note, record=record)
    finally:
        recorder.close()
        if link is not None:
            link.close()
        if l2_started:
            _stop_l2(cupti, origin_wall_ns=recorder.origin_wall_ns)


MAX_TRACE_SPANS = 200_000  # spans a trace keeps one by one (~30 MB of JSON); later steps are merged per lane


def trace_spans(record: RunRecord, max_spans: int = MAX_TRACE_SPANS) -> tuple[tuple[Span, ...], str]:
    """The spans a trace of `record` holds: every one while they number `max_spans` or fewer; past that the first
    steps one by one and each later step's spans merged into one per lane (layer -1). -> (spans, what was merged)."""
    spans = record.spans
    if len(spans) <= max_spans:
        return spans, ""
    steps = sorted({s.step for s in spans})
    per_step = defaultdict(list)
    for span in spans:
        per_step[span.step].append(span)
    kept: list[Span] = []
    merged: list[Span] = []
    for n, step in enumerate(steps):
        step_spans = per_step[step]
        if len(kept) + len(step_spans) + (len(steps) - n) * 6 <= max_spans and not merged:
            kept.extend(step_spans)
            continue
        by_lane = defaultdict(list)
        for span in step_spans:
            by_lane[span.lane].append(span)
        merged += [Span(step=step, layer=-1, lane=lane, start_us=min(s.start_us for s in group),
                        end_us=max(s.end_us for s in group), nbytes=sum(s.nbytes for s in group))
                   for lane, group in by_lane.items()]
    first_merged = merged[0].step if merged else None
    return tuple(kept + merged), (f"{len(spans):,} spans: steps from {first_merged} on are merged into one slice per "
                                  "lane (layer -1) to keep the trace under "
                                  f"{max_spans:,} slices")


def record_from_trace(trace: dict[str, Any], *, run_id: int, note: str = "") -> RunRecord:
    """A RunRecord back from an exported trace (LabSession.export_trace): its metadata holds the summary and the
    steps, its events the spans and the counters. For runs measured elsewhere (another machine, an earlier
    session) to sit beside this session's in Compare, Profile and the explorer."""
    if not isinstance(trace, dict) or not isinstance(trace.get("metadata", {}), dict):
        raise InvalidSettingsError(f"This file holds JSON but not a trace (a {type(trace).__name__} at the top): "
                                   "import a trace exported from the Profile panel.")
    meta = trace.get("metadata", {})
    missing = [key for key in ("model", "settings", "steps", "median_step_ms", "batch") if key not in meta]
    if missing:
        raise InvalidSettingsError(f"This trace holds no KV Lab run record (metadata lacks {', '.join(missing)}): "
                                   "import a trace exported from the Profile panel.")
    try:
        return _record(trace, meta, run_id=run_id, note=note)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a record cut short or edited by hand
        what = f"missing {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise InvalidSettingsError(f"This trace's run record is damaged ({what}): import a trace exported from the "
                                   "Profile panel, unedited.") from None


def _record(trace: dict[str, Any], meta: dict[str, Any], *, run_id: int, note: str) -> RunRecord:
    counters: dict[str, list] = defaultdict(list)
    for event in trace["traceEvents"]:
        if event.get("ph") == "C":
            counters[event["name"]].append((float(event["ts"]), dict(event["args"])))
    link = tuple(NvmlSample(t_us=t, tx_bytes=0, rx_bytes=0, tx_gb_s=a.get("tx"), rx_gb_s=a.get("rx"), gpu_util_pct=None,
                            mem_util_pct=None, mem_used_bytes=None, sm_clock_mhz=None)
                 for t, a in counters.get(COUNTER_LINK, ()))
    steps = tuple(LabStep(metrics=StepMetrics.from_dict(row), predicted_ms=row.get("predicted_ms"),
                          pcie_floor_ms=row.get("pcie_floor_ms"), split=row.get("split")) for row in meta["steps"])
    pm = {name: counters[name] for name in PM_TRACKS if counters.get(name)}
    notes = tuple(meta.get("notes", ())) + ((note,) if note else ())
    # Traces exported before warm-up was told apart hold tokens/s over every step: both are recomputed from the steps.
    warmup = warmup_steps([s.metrics.step_ms for s in steps])
    all_ms = sum(s.metrics.step_ms for s in steps)
    return RunRecord(
        run_id=run_id, model=meta["model"], source=meta.get("source", meta["model"]), device=meta.get("device", "?"),
        batch=int(meta["batch"]), prompt_tokens=int(meta["prompt_tokens"]), new_tokens=int(meta["new_tokens"]),
        seed=int(meta.get("seed", 0)), settings=dict(meta["settings"]),
        tokens_per_s=steady_tokens_per_s(steps, warmup) if steps else float(meta["tokens_per_s"]),
        median_step_ms=float(meta["median_step_ms"]), predicted_ms=meta.get("predicted_ms"),
        pcie_floor_ms=meta.get("pcie_floor_ms"), split=meta.get("split"), plan_reason=meta.get("plan_reason", ""),
        prefill_ms=float(meta.get("prefill_ms", 0.0)), steps=steps, spans=tuple(spans_from_trace(trace)), link=link,
        link_note=meta.get("link_note", ""), l2_note=meta.get("l2_note", ""), l2_hit_pct=meta.get("l2_hit_pct"),
        notes=notes, created_at=meta.get("created_at", ""), pm_counters=pm, pm_labels=dict(meta.get("pm_labels") or {}),
        device_name=meta.get("device_name", ""),
        warmup_steps=warmup,
        tokens_per_s_all=sum(s.metrics.tokens for s in steps) / (all_ms * 1e-3) if all_ms > 0 else None)


__all__ = ["LabStep", "ProfileUpdate", "RunRecord", "flat_settings", "profile_run", "random_prompts",
           "record_from_trace", "steady_tokens_per_s", "warmup_steps"]
