"""Recorder: intervals of per-layer work on each lane of a decode step, in µs since one origin.

The runtime calls `begin`/`end` around every per-layer operation and `begin_step`/`end_step` around a
decode step. On CUDA those calls only record events on the given stream (no host sync, no allocation in
steady state: events come from a reused pool); a daemon thread waits for the events in order and turns
them into `Span`s in a bounded ring, which panels read incrementally with `spans(since)`. On the CPU the
same calls read `time.perf_counter_ns()` and resolve at once.

    rec = Recorder(torch.device("cuda"))
    rec.begin_step(0)
    h = rec.begin("h2d_kv", layer=3, stream=copy_stream, nbytes=kv_bytes)
    ...  # enqueue the copy on copy_stream
    rec.end(h, stream=copy_stream)
    rec.end_step()
    spans, next_index = rec.spans(since=0)
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.telemetry.lanes import LANES, check_lane


class TimingEvent(Protocol):
    """What the recorder needs of an event: torch.cuda.Event's record/query/synchronize/elapsed_time."""

    def record(self, stream: Any = None) -> None: ...
    def query(self) -> bool: ...
    def synchronize(self) -> None: ...
    def elapsed_time(self, end_event: Any) -> float: ...  # ms from self to end_event


@dataclass(frozen=True, slots=True)
class Span:
    """One operation on one lane: µs since the recorder's origin, and the bytes it moved."""

    step: int  # -1 when recorded outside begin_step/end_step
    layer: int
    lane: str
    start_us: float
    end_us: float
    nbytes: int

    @property
    def dur_us(self) -> float:
        return self.end_us - self.start_us


@dataclass(frozen=True)
class StepRecord:
    """One decode step: its wall interval (µs since origin) and the bytes each lane moved in it."""

    step: int
    start_us: float
    end_us: float
    nbytes_by_lane: dict[str, int]  # every lane present, 0 where nothing moved
    num_spans: int

    @property
    def wall_us(self) -> float:
        return self.end_us - self.start_us

    @property
    def step_ms(self) -> float:
        return self.wall_us / 1000.0


class _StepAcc:
    """A step being recorded. `begun` is written only by the engine thread; the rest only by whoever
    resolves (the engine thread on the CPU, the resolver thread on CUDA), so no lock is needed."""

    __slots__ = ("step", "begun", "resolved", "ended", "marker_start_us", "marker_end_us", "first_us",
                 "last_us", "nbytes_by_lane", "done")

    def __init__(self, step: int) -> None:
        self.step = step
        self.begun = 0
        self.resolved = 0
        self.ended = False
        self.marker_start_us: float | None = None
        self.marker_end_us: float | None = None
        self.first_us = float("inf")
        self.last_us = float("-inf")
        self.nbytes_by_lane = [0] * len(LANES)
        self.done = False


# Items of the pending queue (CUDA path), tagged by their first element.
_SPAN, _STEP_START, _STEP_END = 0, 1, 2


class Recorder:
    """Per-lane intervals and per-step byte counts of decode steps (see the module docstring).

    `origin_ns` is time.perf_counter_ns() at the origin: pass it to NvmlSampler(time_origin_ns=...) to put
    NVML samples on the same µs axis. `stream=None` means the current stream of the current device.
    `event_factory` (and `device_synchronize`) replace torch.cuda.Event (and torch.cuda.synchronize):
    with them the event path runs on any device, which is how it is tested without a GPU.
    """

    def __init__(self, device: torch.device | str, *, capacity_spans: int = 200_000,
                 capacity_steps: int = 100_000, pool_events: int = 256,
                 event_factory: Callable[[], TimingEvent] | None = None,
                 device_synchronize: Callable[[], None] | None = None, poll_interval_s: float = 0.005) -> None:
        self.device = torch.device(device)
        origin_stream: Any = None
        if capacity_spans < 1 or capacity_steps < 1:
            raise ValueError(f"capacities must be positive, got capacity_spans={capacity_spans}, "
                             f"capacity_steps={capacity_steps}")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"a Recorder times work on 'cpu' or 'cuda' devices, not {self.device.type!r}")
        if self.device.type == "cuda" and event_factory is None:
            if not torch.cuda.is_available():
                raise ValueError(f"a Recorder on {self.device} needs a CUDA GPU, and torch sees none here; "
                                 "record on torch.device('cpu') instead")
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            event_factory = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
            device_synchronize = lambda: torch.cuda.synchronize(self.device)  # noqa: E731
            origin_stream = torch.cuda.current_stream(self.device)  # the recorder's device, whatever is current
        self.uses_events = event_factory is not None
        self._event_factory = event_factory
        self._poll_interval_s = poll_interval_s

        self._lock = threading.Lock()  # guards the rings and the counters below; held only briefly
        self._ring: collections.deque[Span] = collections.deque(maxlen=capacity_spans)
        self._steps: collections.deque[StepRecord] = collections.deque(maxlen=capacity_steps)
        self._num_resolved = 0  # global index of the next span to be resolved
        self.dropped = 0  # spans pushed out of the full ring, oldest first (a reader that far behind misses them)
        self.error: str | None = None  # set when the resolver thread failed; recording then stops
        self._current: _StepAcc | None = None
        self._closed = False

        if not self.uses_events:
            self.origin_ns = time.perf_counter_ns()
            self.origin_wall_ns = time.time_ns()
            return
        # CUDA: one origin event that every time is measured from. The device is idle when it is
        # recorded, so the event fires almost at once; perf_counter is read either side of it and the
        # midpoint kept, which lets NVML samples (perf_counter time) sit on the same µs axis.
        self._pool: collections.deque[TimingEvent] = collections.deque(event_factory() for _ in range(pool_events))
        self._pending: collections.deque[tuple] = collections.deque()
        if device_synchronize is not None:
            device_synchronize()
        self._origin = event_factory()
        before_ns = time.perf_counter_ns()
        self._origin.record(origin_stream)
        self._origin.synchronize()
        self.origin_ns = (before_ns + time.perf_counter_ns()) // 2
        # The same instant on the wall clock: CUPTI's PM samples carry the GPU's global timer, which the driver
        # keeps on the host's wall clock (ns since the epoch), so they map onto this axis by subtraction.
        self.origin_wall_ns = time.time_ns() - (time.perf_counter_ns() - self.origin_ns)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._resolve_loop, name="kvlab-recorder", daemon=True)
        self._thread.start()

    # ---- hot path (engine thread) -------------------------------------------------------------------

    def begin_step(self, step: int, *, stream: Any = None) -> None:
        """Start step `step`; the spans begun until `end_step` belong to it."""
        if self._closed:
            raise RuntimeError("this Recorder is closed: make a new one for the next run")
        if self._current is not None:
            raise RuntimeError(f"begin_step({step}) while step {self._current.step} is still open: "
                               "call end_step() first")
        acc = _StepAcc(int(step))
        self._current = acc
        if self.uses_events:
            event = self._take_event()
            event.record(stream)
            self._pending.append((_STEP_START, acc, event))
        else:
            acc.marker_start_us = (time.perf_counter_ns() - self.origin_ns) / 1000.0

    def end_step(self, *, stream: Any = None) -> None:
        """Close the open step. Spans of it still open are added when they end."""
        acc = self._current
        if acc is None:
            raise RuntimeError("end_step() without begin_step()")
        self._current = None
        if self.uses_events:
            event = self._take_event()
            event.record(stream)
            self._pending.append((_STEP_END, acc, event))
        else:
            self._resolve_step_end(acc, (time.perf_counter_ns() - self.origin_ns) / 1000.0)

    def begin(self, lane: str, layer: int, stream: Any = None, nbytes: int = 0) -> tuple:
        """Mark the start of an operation on `lane`; returns an opaque handle for `end`."""
        lane_index = check_lane(lane)
        acc = self._current
        if acc is not None:
            acc.begun += 1
        if self.uses_events:
            event = self._take_event()
            event.record(stream)
            return (acc, layer, lane_index, nbytes, event)
        return (acc, layer, lane_index, nbytes, time.perf_counter_ns())

    def end(self, handle: tuple, stream: Any = None) -> None:
        """Mark the end of the operation `handle` came from (on the stream it ran on)."""
        acc, layer, lane_index, nbytes, start = handle
        if self.uses_events:
            event = self._take_event()
            event.record(stream)
            self._pending.append((_SPAN, acc, layer, lane_index, nbytes, start, event))
            return
        end_ns = time.perf_counter_ns()
        with self._lock:
            self._resolve_span(acc, layer, lane_index, nbytes, (start - self.origin_ns) / 1000.0,
                               (end_ns - self.origin_ns) / 1000.0)

    def _take_event(self) -> TimingEvent:
        try:
            return self._pool.pop()
        except IndexError:  # the GPU is further behind than the pool is deep: grow it
            assert self._event_factory is not None
            return self._event_factory()

    # ---- readers (any thread) -----------------------------------------------------------------------

    def spans(self, since: int = 0) -> tuple[list[Span], int]:
        """Spans resolved at global index >= `since` still in the ring, and the index to pass next time.
        Spans that fell out of the ring before being read are skipped (and counted in `dropped`)."""
        with self._lock:
            first = self._num_resolved - len(self._ring)
            count = self._num_resolved - max(since, first)
            if count <= 0:
                return [], self._num_resolved
            # From the right end: a deque indexes in O(n) towards its middle, and incremental readers
            # want only the newest few.
            out = list(itertools.islice(reversed(self._ring), count))
            out.reverse()
            return out, self._num_resolved

    def steps(self) -> list[StepRecord]:
        """Completed steps (end marker and every span resolved), oldest first."""
        with self._lock:
            return list(self._steps)

    @property
    def pending(self) -> int:
        """Operations recorded but not yet resolved (always 0 on the CPU)."""
        return len(self._pending) if self.uses_events else 0

    def flush(self, timeout_s: float | None = 10.0) -> bool:
        """Wait (off the hot path) until everything recorded so far is resolved; False on timeout or when
        the resolver failed (see `error`)."""
        if not self.uses_events:
            return True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._pending or self._in_flight:
            if self.error is not None or not self._thread.is_alive():
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(self._poll_interval_s)
        return self.error is None

    def close(self, timeout_s: float = 10.0) -> None:
        """Resolve what is pending (up to `timeout_s`), then stop the resolver thread."""
        if self._closed:
            return
        self._closed = True
        if self.uses_events:
            self.flush(timeout_s)
            self._stop.set()
            self._thread.join(timeout_s)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- resolution (engine thread on the CPU, resolver thread on CUDA) -----------------------------

    _in_flight = False  # the resolver has popped an item it has not finished with

    def _resolve_loop(self) -> None:
        try:
            self._resolve_until_stopped()
        except Exception as exc:  # a CUDA error must not take the engine down: report, stop recording
            self.error = f"{type(exc).__name__}: {exc}"
            self._in_flight = False
            self._discard_until_stopped()

    def _resolve_until_stopped(self) -> None:
        pending, origin = self._pending, self._origin
        resolved = 0
        while not self._stop.is_set():
            if not pending:
                time.sleep(self._poll_interval_s)
                continue
            resolved += 1
            if resolved % 32 == 0:  # hand the GIL back often: the engine thread enqueues the next step meanwhile
                time.sleep(0)
            item = pending[0]
            # Resolve strictly in recording order: the head decides. An event on a slow stream holds
            # back later ones, which only delays their display.
            if not (item[-1].query() and (item[0] != _SPAN or item[5].query())):
                time.sleep(self._poll_interval_s)
                continue
            self._in_flight = True
            pending.popleft()
            kind, acc = item[0], item[1]
            if kind == _SPAN:
                _, _, layer, lane_index, nbytes, start_event, end_event = item
                start_us = origin.elapsed_time(start_event) * 1000.0
                end_us = origin.elapsed_time(end_event) * 1000.0
                self._pool.append(start_event)
                self._pool.append(end_event)
                with self._lock:
                    self._resolve_span(acc, layer, lane_index, nbytes, start_us, end_us)
            else:
                event = item[2]
                t_us = origin.elapsed_time(event) * 1000.0
                self._pool.append(event)
                if kind == _STEP_START:
                    acc.marker_start_us = t_us
                else:
                    self._resolve_step_end(acc, t_us)
            self._in_flight = False

    def _discard_until_stopped(self) -> None:
        # After a failure the engine keeps recording; hand its events straight back to the pool so the
        # queue does not grow and no event is allocated for the rest of the run.
        pending = self._pending
        while not self._stop.is_set():
            while pending:
                item = pending.popleft()
                self._pool.append(item[-1])
                if item[0] == _SPAN:
                    self._pool.append(item[5])
            time.sleep(self._poll_interval_s)

    def _resolve_span(self, acc: _StepAcc | None, layer: int, lane_index: int, nbytes: int, start_us: float,
                      end_us: float) -> None:
        # Caller holds self._lock.
        ring = self._ring
        if len(ring) == ring.maxlen:
            self.dropped += 1
        ring.append(Span(acc.step if acc is not None else -1, layer, LANES[lane_index], start_us, end_us, nbytes))
        self._num_resolved += 1
        if acc is not None:
            acc.resolved += 1
            acc.nbytes_by_lane[lane_index] += nbytes
            acc.first_us = min(acc.first_us, start_us)
            acc.last_us = max(acc.last_us, end_us)
            self._maybe_finish_step(acc)

    def _resolve_step_end(self, acc: _StepAcc, t_us: float) -> None:
        with self._lock:
            acc.marker_end_us = t_us
            acc.ended = True
            self._maybe_finish_step(acc)

    def _maybe_finish_step(self, acc: _StepAcc) -> None:
        # Caller holds self._lock. A step is complete once its end marker and all its spans resolved;
        # its wall interval covers both markers and every span (a span on a side stream may start
        # before the marker on the main stream, or end after it).
        if acc.done or not acc.ended or acc.resolved < acc.begun:
            return
        acc.done = True
        assert acc.marker_start_us is not None and acc.marker_end_us is not None
        self._steps.append(StepRecord(
            step=acc.step, start_us=min(acc.marker_start_us, acc.first_us),
            end_us=max(acc.marker_end_us, acc.last_us),
            nbytes_by_lane={lane: acc.nbytes_by_lane[i] for i, lane in enumerate(LANES)}, num_spans=acc.resolved))
