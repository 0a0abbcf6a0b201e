"""The Profile panel's live view as data (panels/live_view.py) from runs built span by span: what a watcher is sent
from its cursor, that nothing is sent twice, that the cost of an update is bounded however long the run, the
one-step view, warm-up steps, and the timeline of a GPU-resident run (attention and compute lanes, or the steps
alone). No model, no server: the recorder's Span API and the lab's run types only."""

from __future__ import annotations

import time

import pytest

from engine.lab.live import LiveRun
from engine.lab.runs import LabStep, ProfileUpdate, steady_tokens_per_s, trace_spans, warmup_steps
from engine.telemetry import Span, StepRecord, step_metrics
from panels.live_view import MAX_BARS, MAX_SPANS_PER_READ, Cursor, live_delta

LAYERS = 4
PIPELINE = ("h2d_act", "h2d_kv", "recompute", "attention", "compute")


def step_spans(step: int, t0_us: float, *, lanes=PIPELINE, layers: int = LAYERS, layer_us: float = 100.0) -> list[Span]:
    """One decode step's spans: per layer, copies that overlap recompute, then attention, then compute."""
    spans = []
    for layer in range(layers):
        start = t0_us + layer * layer_us
        for lane in lanes:
            offset = {"h2d_act": 0, "h2d_kv": 10, "recompute": 20, "attention": 50, "compute": 70, "d2h_writeback": 90}[lane]
            spans.append(Span(step, layer, lane, start + offset, start + offset + 25, 4096 if lane.startswith("h2d") else 0))
    return spans


def run_of(num_steps: int, *, step_us: float = 500.0, lanes=PIPELINE, slow_first: int = 0, live: LiveRun | None = None,
           end: bool = True) -> LiveRun:
    live = live or LiveRun(1, num_steps=num_steps)
    for k in range(1, num_steps + 1):
        t0 = (k - 1) * step_us
        spans = step_spans(k, t0, lanes=lanes) if lanes else []
        wall = step_us * (8 if k <= slow_first else 1)
        record = StepRecord(step=k, start_us=t0, end_us=t0 + wall - 1, nbytes_by_lane={}, num_spans=len(spans))
        metrics = step_metrics([record], spans, tokens_per_step=2)
        live.add(ProfileUpdate(run_id=live.run_id, step=k, num_steps=num_steps, step_ms=wall / 1e3, predicted_ms=0.4,
                               tokens_per_s=None, payload_gb_s={}, link_gb_s=None, link_note="", l2_note="no L2 here",
                               new_spans=tuple(spans), new_steps=tuple(LabStep(m, 0.4, None, None) for m in metrics),
                               new_link=()))
    if end:
        live.end("stopped")
    return live


def follow(live: LiveRun, cursor: Cursor = Cursor(), **options) -> tuple[list[dict], Cursor]:
    """Poll like the page until everything is sent."""
    deltas = []
    for _ in range(1000):
        delta, cursor = live_delta(live, cursor, **options)
        deltas.append(delta)
        if delta["finished"]:
            return deltas, cursor
    raise AssertionError("the live view never finished")


def test_a_watcher_gets_every_span_and_step_once_and_the_first_delta_resets():
    live = LiveRun(1, num_steps=6)
    run_of(3, live=live, end=False)
    first, cursor = live_delta(live, Cursor())
    assert first["reset"] and first["base"] == "" and first["status"] == "running"
    assert len(first["bars"]["lane"]) == 3 * LAYERS * len(PIPELINE) and first["steps"]["step"] == [1, 2, 3]
    again, same = live_delta(live, cursor)  # nothing new
    assert not again["reset"] and again["base"] == str(cursor) and again["bars"]["lane"] == []
    assert again["steps"]["step"] == [] and same == cursor and not again["finished"]
    for k in range(4, 7):  # three more steps, polled one by one
        t0 = (k - 1) * 500.0
        spans = step_spans(k, t0)
        metrics = step_metrics([StepRecord(k, t0, t0 + 499, {}, len(spans))], spans, tokens_per_step=2)
        live.add(ProfileUpdate(run_id=1, step=k, num_steps=6, step_ms=0.5, predicted_ms=None, tokens_per_s=None,
                               payload_gb_s={}, link_gb_s=None, link_note="", l2_note="", new_spans=tuple(spans),
                               new_steps=tuple(LabStep(m, None, None, None) for m in metrics), new_link=()))
        delta, cursor = live_delta(live, cursor)
        assert delta["steps"]["step"] == [k] and len(delta["bars"]["lane"]) == LAYERS * len(PIPELINE)
        assert delta["one_step"]["step"] == k  # the one-step view follows the latest step
    live.end("stopped")
    last, cursor = live_delta(live, cursor)
    assert last["finished"] and last["status"] == "stopped"
    # A cursor from another run, or garbage, starts over with the whole run.
    assert live_delta(live, Cursor.parse("7:1:2:3:4:5:0"))[0]["reset"]
    assert Cursor.parse("not a cursor") == Cursor() and Cursor.parse(str(cursor)) == cursor


def test_an_update_costs_what_is_new_not_the_length_of_the_run():
    live = run_of(400, end=False)  # 8,000 spans recorded
    _, cursor = follow_until_caught_up(live)
    began = time.perf_counter()
    for _ in range(50):
        delta, _ = live_delta(live, cursor)
    per_update_ms = (time.perf_counter() - began) / 50 * 1e3
    assert delta["bars"]["lane"] == [] and per_update_ms < 5, per_update_ms
    # A watcher far behind gets at most MAX_SPANS_PER_READ spans per update, the rest in the next ones.
    behind = Cursor(run_id=1, steps=0, spans=0, link=0, bars=0)
    delta, after = live_delta(live, behind)
    assert len(delta["bars"]["lane"]) == MAX_SPANS_PER_READ and after.spans == MAX_SPANS_PER_READ


def follow_until_caught_up(live: LiveRun) -> tuple[dict, Cursor]:
    delta, cursor = live_delta(live, Cursor())
    while True:
        nxt, after = live_delta(live, cursor)
        if after == cursor:
            return delta, cursor
        delta, cursor = nxt, after


def test_a_long_run_is_drawn_with_bounded_bars():
    live = run_of(MAX_BARS // (LAYERS * len(PIPELINE)) + 50)  # more spans than MAX_BARS, finished
    delta, _ = live_delta(live, Cursor())
    assert len(delta["bars"]["lane"]) <= MAX_BARS and "merged" in delta["bars_note"]
    assert sum(delta["bars"]["n"]) == live.head().num_spans  # every span is in some bar
    # While a long run goes on, bars past MAX_BARS come one per lane per step.
    cursor = Cursor(run_id=1, steps=0, spans=0, link=0, bars=MAX_BARS)
    delta, _ = live_delta(live, cursor)
    assert set(delta["bars"]["layer"]) == {-1} and "one bar per lane per step" in delta["bars_note"]


def test_the_one_step_view_shows_a_steps_layers_and_its_pcie_payload_rate():
    live = run_of(5)
    delta, cursor = live_delta(live, Cursor(), show_step=3)
    one = delta["one_step"]
    assert one["step"] == 3 and len(one["spans"]["lane"]) == LAYERS * len(PIPELINE)
    assert min(one["spans"]["x0"]) == 0.0 and max(one["spans"]["x1"]) < 0.5  # ms since the step began
    assert sorted(set(one["spans"]["layer"])) == list(range(LAYERS))
    rate = one["payload"]["h2d"]
    # Two 4 KiB copies of 25 µs overlap for 15 µs in each layer: 0.16, then 0.33, then 0.16 GB/s, then none.
    assert max(rate["gb_s"]) == pytest.approx(2 * 4096 / 25 / 1e3, rel=1e-3) and rate["gb_s"][-1] == 0.0
    # The same step again: not sent again; another step: sent.
    assert "one_step" not in live_delta(live, cursor, show_step=3)[0]
    assert live_delta(live, cursor, show_step=5)[0]["one_step"]["step"] == 5


def test_a_gpu_resident_run_has_a_timeline_with_or_without_per_layer_spans():
    # The GPU-resident decode path records attention and compute per layer (what the engine's recorder gets).
    live = run_of(4, lanes=("attention", "compute"))
    delta, _ = live_delta(live, Cursor())
    lanes = {delta["lanes"][i][0] for i in delta["bars"]["lane"]}
    assert lanes == {"attention", "compute"} and delta["one_step"]["spans"]["lane"]
    # A run that timed whole steps only still has a timeline: the steps' row.
    bare = run_of(4, lanes=())
    delta, _ = live_delta(bare, Cursor())
    assert delta["bars"]["lane"] == [] and delta["steps"]["step"] == [1, 2, 3, 4]
    assert delta["steps"]["t1"][0] > delta["steps"]["t0"][0] and delta["one_step"]["spans"]["lane"] == []


def test_warmup_steps_are_told_apart_and_left_out_of_tokens_per_s():
    assert warmup_steps([1189.0, 490.2, 82.0, 82.1, 82.5, 81.7, 83.1, 81.6, 85.9, 91.9, 100.9]) == 2  # the H100 run
    assert warmup_steps([1258.9, 107.4, 91.7, 99.0, 103.1, 87.0, 92.1]) == 1
    assert warmup_steps([10.0, 10.2, 9.9, 10.1, 10.0]) == 0 and warmup_steps([50.0, 1.0, 1.0]) == 0  # too few after
    live = run_of(10, slow_first=2)
    delta, _ = live_delta(live, Cursor())
    assert delta["warmup"] == 2
    steps = live.view().steps
    assert steady_tokens_per_s(steps, 2) == pytest.approx(2 / 0.499e-3, rel=1e-3)  # 2 tokens per 0.499 ms step


def test_on_a_cpu_no_prediction_is_sent_and_the_reason_is():
    live = run_of(3)
    delta, _ = live_delta(live, Cursor(), on_gpu=False)
    assert set(delta["steps"]["predicted"]) == {None} and "no GPU" in delta["no_prediction"]
    on_gpu, _ = live_delta(live, Cursor(), on_gpu=True)
    assert on_gpu["steps"]["predicted"] == [0.4] * 3 and "no_prediction" not in on_gpu


def test_a_trace_of_too_many_spans_keeps_the_first_steps_whole_and_merges_the_rest():
    from engine.lab.runs import RunRecord

    spans = tuple(s for k in range(1, 101) for s in step_spans(k, k * 1000.0))  # 2,000 spans
    record = RunRecord(run_id=1, model="m", source="m", device="cpu", batch=1, prompt_tokens=1, new_tokens=2, seed=0,
                       settings={}, tokens_per_s=1.0, median_step_ms=1.0, predicted_ms=None, pcie_floor_ms=None,
                       split=None, plan_reason="", prefill_ms=0.0, steps=(), spans=spans, link=(), link_note="",
                       l2_note="", l2_hit_pct=None, notes=(), created_at="")
    assert trace_spans(record, max_spans=5000) == (spans, "")
    kept, note = trace_spans(record, max_spans=1000)
    assert len(kept) <= 1000 and "merged" in note
    whole = [s for s in kept if s.layer >= 0]
    assert whole == list(spans[:len(whole)]) and {s.layer for s in kept[len(whole):]} == {-1}
    assert sum(s.nbytes for s in kept) == sum(s.nbytes for s in spans)


def test_the_stage_is_decode_once_steps_arrive_even_without_a_prefill_update():
    """The progress line follows the run into its decode steps whether or not the run reported its prefill's end
    (a step-0 update): a run whose first update is step 1 read "prefill: layer 3 of 3" to its end."""
    from types import SimpleNamespace

    live = LiveRun(1, num_steps=6)
    live.start()
    live.follow(lambda: SimpleNamespace(stage="prefill", done=3, total=3, eta_s=None))
    assert live.stage().line() == "prefill: layer 3 of 3"
    run_of(2, live=live, end=False)
    stage = live.stage()
    assert (stage.stage, stage.done, stage.total) == ("decode", 2, 2)
    assert stage.line().startswith("decode step 2 of 2")


def test_a_stop_asked_shows_in_the_stage_until_the_run_ends():
    """Stop writes nothing beside the run's own last line (a reply could land after it and hide it): the progress
    line says the run is stopping, from the step it is in, and then how it ended."""
    live = LiveRun(1, num_steps=6)
    live.start()
    live.request_stop()
    assert live.stage().line() == "stopping after the current step (before decoding)"
    run_of(2, live=live, end=False)
    version = live.version
    live.request_stop()
    assert live.version > version
    assert live.stage().line() == "stopping after the current step (decode step 2 of 2)"
    live.end("stopped")
    assert live.stage().line() == "stopped" and live.head().finished
