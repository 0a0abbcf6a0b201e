"""The Profile panel's live view as data for the browser: what a watcher has not drawn yet, from its cursor.

The page draws the plots itself (panels/live_plots.js) from these deltas and appends to what it already shows, so
the server's work per update grows with what happened since the last one, never with the length of the run, and
a redraw never resets the user's zoom. A cursor is what the page has drawn: the run, how many of its steps,
spans and NVML samples, how many timeline bars, the step shown in the one-step view, and whether the run's end
was drawn. A cursor of another run (or none) asks for the whole run, bounded: past MAX_BARS the timeline's bars are
merged (across the smallest gaps for a finished run, one per lane per step while it runs), and CUPTI series are
thinned to MAX_SERIES_POINTS in the run view (the one-step view gets its step's samples as measured).

Times are ms since the run's recorder origin (the recorder's µs / 1000) in the run view, and ms since the step
began in the one-step view.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from engine.lab.live import LiveRead, LiveRun
from engine.lab.runs import NO_GPU_PREDICTION, LabStep, RunRecord, warmup_steps
from engine.telemetry import LANE_LABELS, LANES, PCIE_DIRECTION, Span, downsample_segments
from engine.telemetry.export import COUNTER_L2, COUNTER_PM_PCIE

MAX_BARS = 20_000  # timeline bars drawn one per span; past this, merged
MAX_SPANS_PER_READ = 5_000  # spans one update sends; a watcher further behind gets the rest in the next ones
MAX_SERIES_POINTS = 4_000
LANE_COLOURS = {"h2d_act": "#4c78a8", "h2d_kv": "#72b7b2", "recompute": "#f58518", "attention": "#e45756",
                "compute": "#54a24b", "d2h_writeback": "#b279a2"}
WARMUP_WINDOW = 16  # warm-up is told from the first steps only, so an update's cost does not grow with the run


@dataclass(frozen=True)
class Cursor:
    run_id: int = 0
    steps: int = 0
    spans: int = 0
    link: int = 0
    bars: int = 0
    shown_step: int = 0  # the step in the one-step view (0: none yet)
    final: bool = False  # the run's end (its record) has been drawn

    @classmethod
    def parse(cls, text) -> Cursor:
        """A cursor from the page (or an API client); anything unreadable is no cursor (the whole run is sent)."""
        try:
            run_id, steps, spans, link, bars, shown, final = (int(part) for part in str(text or "").split(":"))
        except ValueError:
            return cls()
        if min(run_id, steps, spans, link, bars, shown) < 0:
            return cls()
        return cls(run_id, steps, spans, link, bars, shown, bool(final))

    def __str__(self) -> str:
        return f"{self.run_id}:{self.steps}:{self.spans}:{self.link}:{self.bars}:{self.shown_step}:{int(self.final)}"


def _r(value: float) -> float:
    return round(value, 4)


def _bars(spans: Sequence[Span], *, merged_from_step: bool) -> dict:
    """Timeline bars as columns (lane index, start and end ms, layer, step, spans merged)."""
    index = {lane: i for i, lane in enumerate(LANES)}
    cols = {"lane": [], "x0": [], "x1": [], "layer": [], "step": [], "n": []}
    if merged_from_step:  # one bar per lane per step (a step read in two parts gives two)
        groups: dict[tuple[int, str], list[Span]] = defaultdict(list)
        for span in spans:
            groups[(span.step, span.lane)].append(span)
        rows = [(index[lane], min(s.start_us for s in g), max(s.end_us for s in g), -1, step, len(g))
                for (step, lane), g in groups.items()]
    else:
        rows = [(index[s.lane], s.start_us, s.end_us, s.layer, s.step, 1) for s in spans]
    for lane, start_us, end_us, layer, step, count in rows:
        cols["lane"].append(lane)
        cols["x0"].append(_r(start_us / 1e3))
        cols["x1"].append(_r(end_us / 1e3))
        cols["layer"].append(layer)
        cols["step"].append(step)
        cols["n"].append(count)
    return cols


def _segments(spans: Sequence[Span], max_bars: int) -> dict:
    """A whole run's bars, merged across the smallest gaps past `max_bars` (the large idle gaps stay visible)."""
    index = {lane: i for i, lane in enumerate(LANES)}
    segments = downsample_segments(spans, max_bars)
    return {"lane": [index[s.lane] for s in segments], "x0": [_r(s.start_us / 1e3) for s in segments],
            "x1": [_r(s.end_us / 1e3) for s in segments], "layer": [-1] * len(segments),
            "step": [-1] * len(segments), "n": [s.num_spans for s in segments]}


def _steps(steps: Sequence[LabStep], *, on_gpu: bool) -> dict:
    m = [s.metrics for s in steps]
    return {"step": [x.step for x in m], "t0": [_r(x.start_us / 1e3) for x in m],
            "t1": [_r(x.end_us / 1e3) for x in m], "ms": [_r(x.step_ms) for x in m],
            "tokens": [x.tokens for x in m],
            "predicted": [_r(s.predicted_ms) if on_gpu and s.predicted_ms is not None else None for s in steps],
            "h2d": [_r(x.payload_gb_s.get("h2d", 0.0)) for x in m], "d2h": [_r(x.payload_gb_s.get("d2h", 0.0)) for x in m]}


def _thin(points: list, limit: int) -> list:
    if len(points) <= limit:
        return points
    stride = -(-len(points) // limit)
    return points[::stride]


def _pm_series(record: RunRecord | None, *, t0_us: float | None = None, t1_us: float | None = None,
               limit: int | None = None) -> dict:
    """CUPTI PCIe read/write GB/s and L2 hit % (where sampled), within [t0, t1] when given, times in ms (since t0
    when given)."""
    if record is None:
        return {}
    out = {}
    for name, key in ((COUNTER_PM_PCIE, "pcie"), (COUNTER_L2, "l2")):
        points = record.pm_counters.get(name, [])
        if t0_us is not None:
            points = [(t, v) for t, v in points if t0_us <= t <= t1_us]
        if limit is not None:
            points = _thin(points, limit)
        if not points:
            continue
        base = t0_us or 0.0
        series = {"t": [_r((t - base) / 1e3) for t, _ in points]}
        for field in sorted(points[0][1]):
            series[field] = [_r(v.get(field, 0.0)) for _, v in points]
        out[key] = series
    return out


def _payload_rate(spans: Sequence[Span], direction: str, origin_us: float) -> dict:
    """The engine's payload GB/s in one direction over a step: at each moment, the bytes over the duration of every
    copy then in flight, summed. A step function: (t, GB/s) at every start and end of a copy."""
    edges = []
    for s in spans:
        if PCIE_DIRECTION.get(s.lane) == direction and s.end_us > s.start_us and s.nbytes:
            rate = s.nbytes / (s.end_us - s.start_us) / 1e3  # bytes per µs / 1e3 = GB/s
            edges += [(s.start_us, rate), (s.end_us, -rate)]
    edges.sort()
    ts, rates, level = [], [], 0.0
    for t_us, change in edges:
        level = max(0.0, level + change)
        ts.append(_r((t_us - origin_us) / 1e3))
        rates.append(_r(level))
    return {"t": ts, "gb_s": rates}


def one_step(live: LiveRun, step: LabStep, record: RunRecord | None, link: Sequence) -> dict:
    """The one-step view: the step's spans per layer and lane, the PCIe series and the L2 % under them (ms since the
    step began)."""
    m = step.metrics
    spans = live.step_spans(m.step)
    index = {lane: i for i, lane in enumerate(LANES)}
    origin = m.start_us
    out = {"step": m.step, "ms": _r(m.step_ms),
           "spans": {"lane": [index[s.lane] for s in spans], "layer": [s.layer for s in spans],
                     "x0": [_r((s.start_us - origin) / 1e3) for s in spans],
                     "x1": [_r((s.end_us - origin) / 1e3) for s in spans], "bytes": [s.nbytes for s in spans]},
           "payload": {d: _payload_rate(spans, d, origin) for d in ("h2d", "d2h")},
           "pm": _pm_series(record, t0_us=m.start_us, t1_us=m.end_us)}
    near = [x for x in link if x.rx_gb_s is not None and x.tx_gb_s is not None and m.start_us <= x.t_us <= m.end_us]
    if near:
        out["link"] = {"t": [_r((x.t_us - origin) / 1e3) for x in near], "rx": [_r(x.rx_gb_s) for x in near],
                       "tx": [_r(x.tx_gb_s) for x in near]}
    return out


def _head(read: LiveRead, record: RunRecord | None) -> dict:
    on_gpu = record.on_gpu if record is not None else None
    return {"run": read.run_id, "status": read.status, "num_steps": read.num_steps,
            "lanes": [[lane, LANE_LABELS[lane], LANE_COLOURS[lane]] for lane in LANES], "on_gpu": on_gpu}


def live_delta(live: LiveRun, cursor: Cursor, *, show_step: int | None = None, on_gpu: bool = False,
               l2_why: str = "", window: int = 0) -> tuple[dict, Cursor]:
    """What the page must add to what `cursor` says it has drawn, and the cursor after it. `show_step`: the step
    for the one-step view (None or 0: the latest). `on_gpu`: whether the run's device is a GPU (predictions are
    drawn only then). `window`: while the run goes on, send only the spans of its last `window` steps (the page
    draws no more; 0: all). The delta's "reset" tells the page to start over (another run, or no cursor); "base"
    is the cursor it was made from, so a page that has drawn something else ignores it."""
    before = cursor
    reset = cursor.run_id != live.run_id
    if reset:
        cursor = Cursor(run_id=live.run_id)
    if window and live.status in ("waiting", "running"):
        latest = live.head().steps_from  # steps measured so far
        first = live.span_index(max(1, latest - window + 1))
        if first is not None and first > cursor.spans:  # skip what the page would drop at once
            cursor = replace(cursor, spans=first)
    read = live.read(steps_from=cursor.steps, spans_from=cursor.spans, link_from=cursor.link,
                     max_spans=None if reset else MAX_SPANS_PER_READ)
    record = read.record
    on_gpu = record.on_gpu if record is not None else on_gpu
    delta = _head(read, record) | {"reset": reset, "base": "" if reset else str(before), "on_gpu": on_gpu,
                                   "window": window}
    spans = read.new_spans
    if reset and len(spans) > MAX_BARS:  # a long run joined late or shown whole: bounded
        bars = _segments(spans, MAX_BARS) if read.finished else _bars(spans, merged_from_step=True)
        sent = MAX_BARS
        delta["bars_note"] = f"{read.num_spans:,} spans drawn as {len(bars['lane']):,} merged bars"
    else:
        merged = cursor.bars >= MAX_BARS
        bars = _bars(spans, merged_from_step=merged)
        sent = cursor.bars + len(bars["lane"])
        if merged:
            delta["bars_note"] = f"per-layer bars for the first {MAX_BARS:,} spans, then one bar per lane per step"
    delta["bars"] = bars
    delta["steps"] = _steps(read.new_steps, on_gpu=on_gpu)
    if not on_gpu:
        delta["no_prediction"] = NO_GPU_PREDICTION
    link = [x for x in read.new_link if x.rx_gb_s is not None and x.tx_gb_s is not None]
    if link:
        delta["link"] = {"t": [_r(x.t_us / 1e3) for x in link], "rx": [_r(x.rx_gb_s) for x in link],
                         "tx": [_r(x.tx_gb_s) for x in link]}
    delta["warmup"] = record.warmup_steps if record is not None else \
        warmup_steps([s.metrics.step_ms for s in live.first_steps(WARMUP_WINDOW)])
    if record is not None and not cursor.final:
        delta["pm"] = _pm_series(record, limit=MAX_SERIES_POINTS)
    total_steps = read.steps_from + len(read.new_steps)
    # The one-step view: the step asked for, else the latest; redrawn once more at the end, with the CUPTI samples
    # the record then holds.
    shown, target = cursor.shown_step, None
    ending = record is not None and not cursor.final
    if show_step:
        if show_step != shown or ending:
            target = live.step_at(show_step)
    elif read.new_steps:
        target = read.new_steps[-1]
    elif ending and shown:
        target = live.step_at(shown)
    if target is not None:
        m = target.metrics
        delta["one_step"] = one_step(live, target, record, live.link_between(m.start_us - 50_000, m.end_us + 50_000))
        delta["following"] = not show_step  # the latest step, not one the user picked
        shown = m.step
    if reset or ending:
        delta["l2_why"] = l2_why or read.l2_note
    after = replace(cursor, steps=total_steps, spans=read.spans_from + len(spans),
                    link=read.link_from + len(read.new_link), bars=sent, shown_step=shown,
                    final=cursor.final or record is not None)
    delta["cursor"] = str(after)
    delta["finished"] = read.finished and after.spans >= read.num_spans and total_steps >= read.step
    return delta, after


__all__ = ["Cursor", "MAX_BARS", "live_delta", "one_step"]
