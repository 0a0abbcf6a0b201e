"""What a profiling run has produced so far, read incrementally by whoever watches it.

The engine's thread adds a `ProfileUpdate` per decode step; pollers (the Profile panel's timer, API clients) read
only what is new since their cursor (`LiveRun.read`), so the cost of watching grows with what happened since the
last look, not with the length of the run. `LiveRun.view()` is the whole run at once, for scripts and tests.

Before the first decode step a run has nothing to show but where it is: waiting for the device, measuring the
hardware, or in a long prefill (the generator's `RunProgress`, updated after every prefill layer); `stage()` says
which, with an estimate of the time left.
"""

from __future__ import annotations

import bisect
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.telemetry import NvmlSample, Span

if TYPE_CHECKING:  # runs.py imports this module
    from engine.lab.runs import LabStep, ProfileUpdate, RunRecord


@dataclass(frozen=True)
class RunStage:
    """Where a run is: "waiting", "measuring the hardware", "prefill", "decode", "stopping after the current step",
    or its end status."""

    stage: str
    done: int = 0  # prefill layers or decode steps done
    total: int = 0
    eta_s: float | None = None  # time left in this stage; None when unknown
    detail: str = ""  # e.g. what the run waits for

    def line(self) -> str:
        eta = f", about {_seconds(self.eta_s)} left" if self.eta_s is not None else ""
        if self.stage == "waiting":
            return f"waiting for {self.detail} to finish"
        if self.stage == "prefill":
            return f"prefill: layer {self.done} of {self.total}{eta}"
        if self.stage == "decode":
            return f"decode step {self.done} of {self.total}{eta}"
        return self.stage + (f" ({self.detail})" if self.detail else "")


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


@dataclass(frozen=True)
class LiveRead:
    """What a run produced from a cursor on: new steps, spans and link samples, and the run's state now."""

    run_id: int
    owner: str | None  # who started the run (a browser tab's or API client's session), None from Python
    status: str  # "waiting", "running", "done", "stopped", "imported" or "failed: <message>"
    version: int  # grows with every change
    step: int
    num_steps: int
    stage: RunStage
    steps_from: int  # index of new_steps[0] in the run's steps
    new_steps: tuple[LabStep, ...]
    spans_from: int
    new_spans: tuple[Span, ...]
    link_from: int
    new_link: tuple[NvmlSample, ...]
    num_spans: int  # spans recorded so far (a read may stop short of them: see `LiveRun.read`)
    link_note: str
    l2_note: str
    record: RunRecord | None

    @property
    def finished(self) -> bool:
        return self.status not in ("waiting", "running")


@dataclass(frozen=True)
class LiveView:
    """A snapshot of a whole run, for a script or a test."""

    run_id: int
    status: str
    version: int
    step: int
    num_steps: int
    spans: tuple[Span, ...]
    steps: tuple[LabStep, ...]
    link: tuple[NvmlSample, ...]
    link_note: str
    l2_note: str
    record: RunRecord | None


class LiveRun:
    """What a profiling run has produced so far: the engine's thread adds updates, pollers read from cursors."""

    def __init__(self, run_id: int, *, num_steps: int, owner: str | None = None, status: str = "running") -> None:
        self.run_id = run_id
        self.owner = owner
        self._lock = threading.Lock()
        self._status = status
        self._waiting_for = ""
        self._version = 0
        self._step, self._num_steps = 0, num_steps
        self._spans: list[Span] = []
        self._first_span: dict[int, int] = {}  # step -> index of its first span
        self._steps: list[LabStep] = []
        self._link: list[NvmlSample] = []
        self._link_note = self._l2_note = ""
        self._record: RunRecord | None = None
        self._progress: Callable[[], object] | None = None  # the generator's RunProgress, read from other threads
        self._decode_started_s: float | None = None
        self._stopping = False  # Stop was asked; the run ends after its current step

    # -- the engine's side ------------------------------------------------------------------------------
    def wait_for(self, what: str) -> None:
        """The run waits for the device, which `what` ("a chat reply (another tab)") holds."""
        with self._lock:
            self._status, self._waiting_for = "waiting", what
            self._version += 1

    def start(self) -> None:
        with self._lock:
            self._status, self._waiting_for = "running", ""
            self._version += 1

    def follow(self, progress: Callable[[], object]) -> None:
        """Read the run's stage before its first step from `progress()` (a RunProgress: stage, done, total, eta_s)."""
        self._progress = progress

    def add(self, update: ProfileUpdate) -> None:
        with self._lock:
            for n, span in enumerate(update.new_spans, start=len(self._spans)):
                self._first_span.setdefault(span.step, n)
            self._spans.extend(update.new_spans)
            self._steps.extend(update.new_steps)
            self._link.extend(update.new_link)
            # Updates come once the prefill is over: its own (step 0) where the run yields one, else the first step.
            if self._decode_started_s is None and (update.step == 0 or update.new_steps):
                self._decode_started_s = time.perf_counter()
            self._step, self._num_steps = update.step, update.num_steps
            self._link_note, self._l2_note = update.link_note, update.l2_note
            if update.record is not None:
                self._record = update.record
            self._version += 1

    def request_stop(self) -> None:
        """Stop was asked (by whoever watches): the stage says so until the run ends after its current step."""
        with self._lock:
            self._stopping = True
            self._version += 1

    def end(self, status: str) -> None:
        with self._lock:
            self._status = status
            self._version += 1

    # -- readers --------------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self._status

    @property
    def version(self) -> int:
        return self._version

    def stage(self) -> RunStage:
        """Where the run is now, with the time left where it can be told."""
        status = self._status
        if status == "waiting":
            return RunStage("waiting", detail=self._waiting_for)
        if status != "running":
            return RunStage(status)
        if self._stopping:
            with self._lock:
                step, total = self._step, self._num_steps
            where = f"decode step {step} of {total}" if self._decode_started_s is not None else "before decoding"
            return RunStage("stopping after the current step", detail=where)
        if self._decode_started_s is None:
            progress = self._progress() if self._progress is not None else None
            if progress is not None and getattr(progress, "stage", "") == "prefill" and progress.total:
                return RunStage("prefill", done=progress.done, total=progress.total, eta_s=progress.eta_s)
            return RunStage("setting up the run")
        with self._lock:
            step, total = self._step, self._num_steps
            recent = [s.metrics.step_ms for s in self._steps[-16:]]
        eta = (total - step) * statistics.median(recent) / 1e3 if recent and step < total else None
        return RunStage("decode", done=step, total=total, eta_s=eta)

    def read(self, *, steps_from: int = 0, spans_from: int = 0, link_from: int = 0,
             max_spans: int | None = None) -> LiveRead:
        """What is new since the cursor (indices into the run's steps, spans and link samples). `max_spans` caps
        the spans of one read (the rest come with the next), so one read's cost is bounded however far behind the
        reader is."""
        stage = self.stage()
        with self._lock:
            spans_end = len(self._spans) if max_spans is None else min(len(self._spans), spans_from + max_spans)
            return LiveRead(
                run_id=self.run_id, owner=self.owner, status=self._status, version=self._version, step=self._step,
                num_steps=self._num_steps, stage=stage, steps_from=steps_from,
                new_steps=tuple(self._steps[steps_from:]), spans_from=spans_from,
                new_spans=tuple(self._spans[spans_from:spans_end]), link_from=link_from,
                new_link=tuple(self._link[link_from:]), num_spans=len(self._spans), link_note=self._link_note,
                l2_note=self._l2_note, record=self._record)

    def head(self) -> LiveRead:
        """The run's state with nothing of its steps, spans or samples (cheap: for a status line)."""
        with self._lock:
            ends = len(self._steps), len(self._spans), len(self._link)
        return self.read(steps_from=ends[0], spans_from=ends[1], link_from=ends[2])

    def span_index(self, step: int) -> int | None:
        """Index of the first span of decode step `step` in the run's spans (None: it has none)."""
        with self._lock:
            return self._first_span.get(step)

    def step_at(self, step: int) -> LabStep | None:
        """Decode step `step` (numbered from 1), if measured."""
        with self._lock:
            if 1 <= step <= len(self._steps) and self._steps[step - 1].metrics.step == step:
                return self._steps[step - 1]
            return next((s for s in self._steps if s.metrics.step == step), None)

    def first_steps(self, count: int) -> tuple[LabStep, ...]:
        with self._lock:
            return tuple(self._steps[:count])

    def link_between(self, t0_us: float, t1_us: float) -> tuple[NvmlSample, ...]:
        """NVML samples taken between two times (µs on the run's axis)."""
        with self._lock:
            link = self._link
            lo = bisect.bisect_left(link, t0_us, key=lambda x: x.t_us)
            hi = bisect.bisect_right(link, t1_us, key=lambda x: x.t_us)
            return tuple(link[lo:hi])

    def step_spans(self, step: int) -> tuple[Span, ...]:
        """The spans of one decode step (a step's spans are recorded together, so they sit together in the list)."""
        with self._lock:
            spans = self._spans
            # Walk back from the end: the step asked for is usually among the latest.
            out = []
            seen = False
            for span in reversed(spans):
                if span.step == step:
                    out.append(span)
                    seen = True
                elif seen and span.step < step:
                    break
            out.reverse()
            return tuple(out)

    def view(self) -> LiveView:
        with self._lock:
            return LiveView(run_id=self.run_id, status=self._status, version=self._version, step=self._step,
                            num_steps=self._num_steps, spans=tuple(self._spans), steps=tuple(self._steps),
                            link=tuple(self._link), link_note=self._link_note, l2_note=self._l2_note,
                            record=self._record)


__all__ = ["LiveRead", "LiveRun", "LiveView", "RunStage"]
