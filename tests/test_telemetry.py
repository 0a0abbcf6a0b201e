"""Telemetry on the CPU: the recorder (CPU clock and, through fake events, the CUDA event path), step
metrics, Perfetto export, downsampling, and the NVML/CUPTI samplers' unavailable and failure paths."""

from __future__ import annotations

import csv
import gzip
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.telemetry import (COUNTER_L2, COUNTER_LINK, COUNTER_PAYLOAD, COUNTER_TOKENS, LANE_LABELS, LANES,
                              PCIE_DIRECTION, PCIE_LANES, PROCESS_NAME, CounterUnwrapper, NvmlSampler, Recorder, Span,
                              StepMetrics, StepRecord, build_trace, check_lane, downsample_segments, l2_counters,
                              lanes_in_direction, nvml_counters, read_json, read_trace, spans_from_trace, step_counters,
                              step_metrics, to_csv, to_json, union_us, write_trace)

# Names of L2 series (any formula string labels the series; the CUPTI counters' own are in test_cupti_sampler.py).
L2_FORMULA_SERVED = "(tex lookup hits + ltcfabric lookup hits) / tex reads"
L2_FORMULA_PLAIN = "lts__t_sector_hit_rate"

REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.001)
    return predicate()


def busy_work(n: int) -> int:
    """CPU work of a few µs that no optimiser removes (no sleep: the recorder must time real work)."""
    return sum(i * i for i in range(n))


# ---- lanes -----------------------------------------------------------------------------------------

def test_lanes_labels_and_pcie_directions():
    assert LANES == ("h2d_act", "h2d_kv", "recompute", "attention", "compute", "d2h_writeback")
    assert set(LANE_LABELS) == set(LANES) and len(set(LANE_LABELS.values())) == len(LANES)
    assert LANE_LABELS["h2d_kv"] == "H2D KV" and LANE_LABELS["d2h_writeback"] == "D2H write-back"
    assert PCIE_LANES == ("h2d_act", "h2d_kv", "d2h_writeback")
    assert lanes_in_direction("h2d") == ("h2d_act", "h2d_kv") and lanes_in_direction("d2h") == ("d2h_writeback",)
    assert check_lane("attention") == 3
    with pytest.raises(ValueError, match="unknown lane 'mlp': the lanes are h2d_act, h2d_kv, recompute, attention"):
        check_lane("mlp")


# ---- recorder on the CPU ---------------------------------------------------------------------------

def test_cpu_recorder_rejects_unknown_lanes_and_misordered_steps():
    rec = Recorder(torch.device("cpu"))
    with pytest.raises(ValueError, match="the lanes are h2d_act, h2d_kv, recompute, attention, compute, d2h_writeback"):
        rec.begin("pcie", 0)
    with pytest.raises(RuntimeError, match="without begin_step"):
        rec.end_step()
    rec.begin_step(0)
    with pytest.raises(RuntimeError, match="step 0 is still open"):
        rec.begin_step(1)
    rec.end_step()
    rec.close()
    with pytest.raises(RuntimeError, match="closed"):
        rec.begin_step(1)


def test_cuda_recorder_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        Recorder(torch.device("cuda"))
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        Recorder(torch.device("meta"))


def test_cpu_spans_per_lane_are_ordered_and_do_not_overlap():
    rec = Recorder("cpu")
    for layer in range(20):
        for lane in LANES:
            handle = rec.begin(lane, layer, nbytes=layer)
            busy_work(50)
            rec.end(handle, stream=None)
    spans, next_index = rec.spans()
    assert next_index == len(spans) == 20 * len(LANES)
    for lane in LANES:
        lane_spans = [s for s in spans if s.lane == lane]
        assert [s.layer for s in lane_spans] == list(range(20))
        assert all(s.dur_us > 0 for s in lane_spans)
        assert all(a.end_us <= b.start_us for a, b in zip(lane_spans, lane_spans[1:]))
    assert all(s.step == -1 for s in spans)  # recorded outside any step
    assert rec.steps() == []


def fake_runtime(rec: Recorder, *, num_steps: int, num_layers: int) -> dict[tuple[int, str], int]:
    """A decode loop shaped like the offload runtime's: per layer, copies, recompute, attention, MLP and
    write-back, each around a little real CPU work. Returns the bytes fed per (step, lane)."""
    fed: dict[tuple[int, str], int] = {}
    for step in range(num_steps):
        rec.begin_step(step)
        for layer in range(num_layers):
            for lane_index, lane in enumerate(LANES):
                nbytes = (1000 * (step + 1) + 10 * layer + lane_index) if lane in PCIE_DIRECTION else 0
                handle = rec.begin(lane, layer, nbytes=nbytes)
                busy_work(30 + 10 * lane_index)
                rec.end(handle)
                fed[(step, lane)] = fed.get((step, lane), 0) + nbytes
        rec.end_step()
    return fed


def test_cpu_recorder_accounts_every_byte_fed_per_lane_and_step():
    rec = Recorder(torch.device("cpu"))
    fed = fake_runtime(rec, num_steps=4, num_layers=6)
    spans, _ = rec.spans()
    steps = rec.steps()
    assert [s.step for s in steps] == [0, 1, 2, 3]
    for record in steps:
        assert record.num_spans == 6 * len(LANES)
        assert record.nbytes_by_lane == {lane: fed[(record.step, lane)] for lane in LANES}
        step_spans = [s for s in spans if s.step == record.step]
        assert {lane: sum(s.nbytes for s in step_spans if s.lane == lane) for lane in LANES} == record.nbytes_by_lane
        assert all(record.start_us <= s.start_us and s.end_us <= record.end_us for s in step_spans)
    assert all(a.end_us <= b.start_us for a, b in zip(steps, steps[1:]))
    assert sum(sum(r.nbytes_by_lane.values()) for r in steps) == sum(fed.values()) > 0


def test_cpu_span_that_ends_after_end_step_completes_its_step_late():
    rec = Recorder("cpu")
    rec.begin_step(7)
    late = rec.begin("d2h_writeback", 31, nbytes=4096)
    rec.end_step()
    assert rec.steps() == []  # the write-back is still open
    rec.end(late)
    (record,) = rec.steps()
    assert record.step == 7 and record.nbytes_by_lane["d2h_writeback"] == 4096 and record.num_spans == 1
    assert record.end_us == rec.spans()[0][0].end_us  # the wall covers the late span


def test_cpu_ring_overflow_counts_dropped_and_incremental_reads_skip_nothing_twice():
    rec = Recorder("cpu", capacity_spans=5)
    for layer in range(3):
        rec.end(rec.begin("compute", layer))
    first, cursor = rec.spans()
    assert [s.layer for s in first] == [0, 1, 2] and cursor == 3
    for layer in range(3, 12):
        rec.end(rec.begin("compute", layer))
    assert rec.dropped == 7
    later, cursor = rec.spans(cursor)
    assert [s.layer for s in later] == [7, 8, 9, 10, 11] and cursor == 12  # 3..6 fell out of the ring
    assert rec.spans(cursor) == ([], 12)


def test_cpu_begin_end_stay_cheap():
    rec = Recorder("cpu")
    rec.begin_step(0)
    t0 = time.perf_counter()
    for i in range(20_000):
        rec.end(rec.begin("attention", i % 32, nbytes=1))
    rec.end_step()
    assert time.perf_counter() - t0 < 2.0  # ~2 µs a pair; a host sync or a file write would blow this
    assert rec.steps()[0].nbytes_by_lane["attention"] == 20_000


# ---- recorder on the CUDA event path, driven by fake events -------------------------------------

class FakeGpu:
    """A clock (ms) and a completion front: events recorded after the front have not run yet."""

    def __init__(self) -> None:
        self.now_ms = 0.0
        self.done_ms = -1.0
        self.created = 0
        self.fail_elapsed = False
        self.syncs = 0

    def event(self) -> FakeEvent:
        self.created += 1
        return FakeEvent(self)

    def synchronize(self) -> None:
        self.syncs += 1
        self.done_ms = self.now_ms


class FakeEvent:
    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu = gpu
        self.t_ms: float | None = None
        self.stream = None

    def record(self, stream=None) -> None:
        self.t_ms, self.stream = self.gpu.now_ms, stream

    def query(self) -> bool:
        return self.t_ms is not None and self.t_ms <= self.gpu.done_ms

    def synchronize(self) -> None:
        self.gpu.done_ms = max(self.gpu.done_ms, self.t_ms)

    def elapsed_time(self, end: FakeEvent) -> float:
        if self.gpu.fail_elapsed:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        assert self.query() and end.query(), "elapsed_time on an event that has not completed"
        return end.t_ms - self.t_ms


def event_recorder(gpu: FakeGpu, **kwargs) -> Recorder:
    return Recorder("cpu", event_factory=gpu.event, device_synchronize=gpu.synchronize, poll_interval_s=0.0002,
                    **kwargs)


def test_event_path_resolves_in_the_background_with_times_from_the_origin_event():
    gpu = FakeGpu()
    gpu.now_ms = 5.0  # the origin event is recorded at 5 ms of GPU time
    rec = event_recorder(gpu)
    assert gpu.syncs == 1 and rec.uses_events and isinstance(rec.origin_ns, int)
    rec.begin_step(0, stream="main")
    gpu.now_ms = 6.0
    copy = rec.begin("h2d_kv", 0, stream="copy", nbytes=1 << 20)
    gpu.now_ms = 7.5
    rec.end(copy, stream="copy")
    attn = rec.begin("attention", 0, stream="main")
    gpu.now_ms = 8.25
    rec.end(attn, stream="main")
    rec.end_step(stream="main")
    assert rec.spans() == ([], 0) and rec.pending == 4  # 2 step markers, 2 spans: none has run yet

    gpu.done_ms = 7.5  # the copy finished, the attention did not
    assert wait_until(lambda: rec.spans()[1] == 1)
    time.sleep(0.01)
    assert rec.spans()[1] == 1 and rec.steps() == []  # the head of the queue holds the rest back
    gpu.done_ms = 100.0
    assert rec.flush(5.0)
    spans, cursor = rec.spans()
    assert cursor == 2
    assert spans == [Span(0, 0, "h2d_kv", 1000.0, 2500.0, 1 << 20), Span(0, 0, "attention", 2500.0, 3250.0, 0)]
    (record,) = rec.steps()
    assert (record.step, record.start_us, record.end_us, record.num_spans) == (0, 0.0, 3250.0, 2)
    assert record.nbytes_by_lane["h2d_kv"] == 1 << 20 and record.step_ms == 3.25
    rec.close()
    assert not rec._thread.is_alive()


def test_event_path_ring_overflow_counts_dropped():
    gpu = FakeGpu()
    rec = event_recorder(gpu, capacity_spans=10)
    for layer in range(25):
        handle = rec.begin("h2d_act", layer, nbytes=layer)
        gpu.now_ms += 0.5
        rec.end(handle)
    gpu.done_ms = gpu.now_ms
    assert rec.flush(5.0)
    spans, cursor = rec.spans(0)
    assert rec.dropped == 15 and cursor == 25
    assert [s.layer for s in spans] == list(range(15, 25))
    assert [s.layer for s in rec.spans(20)[0]] == [20, 21, 22, 23, 24]
    assert rec.spans(25) == ([], 25)
    rec.close()


def test_event_path_incremental_reads_never_return_a_span_twice():
    gpu = FakeGpu()
    rec = event_recorder(gpu)
    seen: list[Span] = []
    stop = threading.Event()

    def reader() -> None:  # a panel polling while the engine records
        cursor = 0
        while not stop.is_set():
            new, cursor = rec.spans(cursor)
            seen.extend(new)
        new, cursor = rec.spans(cursor)
        seen.extend(new)

    thread = threading.Thread(target=reader)
    thread.start()
    num_steps, num_layers = 20, 16
    for step in range(num_steps):
        rec.begin_step(step)
        for layer in range(num_layers):
            for lane in ("h2d_kv", "attention"):
                handle = rec.begin(lane, layer, nbytes=100)
                gpu.now_ms += 0.01
                rec.end(handle)
        rec.end_step()
        gpu.done_ms = gpu.now_ms - 0.05  # the GPU trails the host a little
    gpu.done_ms = gpu.now_ms
    assert rec.flush(5.0)
    stop.set()
    thread.join(5.0)
    keys = [(s.step, s.layer, s.lane) for s in seen]
    assert len(keys) == len(set(keys)) == num_steps * num_layers * 2
    assert keys == [(step, layer, lane) for step in range(num_steps) for layer in range(num_layers)
                    for lane in ("h2d_kv", "attention")]
    assert [r.step for r in rec.steps()] == list(range(num_steps))
    assert all(r.nbytes_by_lane["h2d_kv"] == 100 * num_layers for r in rec.steps())
    rec.close()


def test_event_path_reuses_its_event_pool():
    gpu = FakeGpu()
    rec = event_recorder(gpu, pool_events=8)
    assert gpu.created == 9  # the pool and the origin event
    for step in range(200):
        rec.begin_step(step)
        rec.end(rec.begin("compute", 0))
        gpu.now_ms += 1.0
        rec.end_step()
        gpu.done_ms = gpu.now_ms
        assert rec.flush(5.0)
    assert gpu.created == 9  # 800 events recorded, none allocated after construction
    assert len(rec.steps()) == 200
    rec.close()


def test_event_path_resolver_failure_is_reported_without_touching_the_engine():
    gpu = FakeGpu()
    rec = event_recorder(gpu)
    gpu.fail_elapsed = True
    rec.end(rec.begin("attention", 0))
    gpu.done_ms = gpu.now_ms
    assert wait_until(lambda: rec.error is not None)
    assert "illegal memory access" in rec.error
    assert not rec.flush(0.5)
    created = gpu.created
    for layer in range(1, 100):  # the engine keeps going; recording just stopped
        rec.end(rec.begin("attention", layer))
    assert wait_until(lambda: rec.pending == 0)  # the queue is drained, not left to grow
    assert gpu.created == created and rec.spans() == ([], 0)
    rec.close()
    assert not rec._thread.is_alive()


# ---- metrics ---------------------------------------------------------------------------------------

def test_union_of_intervals():
    assert union_us([]) == 0.0
    assert union_us([(0, 10), (5, 15), (20, 30)]) == 25.0  # overlap counted once
    assert union_us([(0, 100), (10, 20), (30, 40)]) == 100.0  # nested
    assert union_us([(0, 10), (10, 20)]) == 20.0  # touching
    assert union_us([(30, 40), (0, 10), (5, 5)]) == 20.0  # unsorted, empty interval


def hand_made_step() -> tuple[StepRecord, list[Span]]:
    spans = [
        Span(0, 0, "h2d_act", 0.0, 100.0, 1_000_000),
        Span(0, 0, "h2d_kv", 50.0, 250.0, 3_000_000),  # overlaps h2d_act: H2D union is [0, 250) = 250 µs
        Span(0, 0, "recompute", 100.0, 200.0, 0),
        Span(0, 0, "attention", 100.0, 300.0, 0),
        Span(0, 1, "attention", 400.0, 450.0, 0),
        Span(0, 0, "d2h_writeback", 300.0, 400.0, 1_500_000),
        Span(0, 1, "d2h_writeback", 350.0, 500.0, 500_000),  # D2H union is [300, 500) = 200 µs
        Span(1, 0, "h2d_kv", 2000.0, 2100.0, 99),  # another step's span: ignored
    ]
    record = StepRecord(step=0, start_us=0.0, end_us=1000.0, num_spans=7,
                        nbytes_by_lane={"h2d_act": 1_000_000, "h2d_kv": 3_000_000, "recompute": 0, "attention": 0,
                                        "compute": 0, "d2h_writeback": 2_000_000})
    return record, spans


def test_step_metrics_against_hand_computed_values():
    record, spans = hand_made_step()
    (m,) = step_metrics([record], spans, tokens_per_step=8)
    assert m.step_ms == 1.0 and m.tokens_per_s == 8000.0
    assert m.pcie_busy_ms == {"h2d": 0.25, "d2h": 0.2}
    assert m.payload_gb_s["h2d"] == pytest.approx(16.0)  # 4 MB / 250 µs
    assert m.payload_gb_s["d2h"] == pytest.approx(10.0)  # 2 MB / 200 µs
    assert m.busy_ms_by_lane["attention"] == pytest.approx(0.25)
    assert m.busy_ms_by_lane["recompute"] == pytest.approx(0.1) and m.busy_ms_by_lane["compute"] == 0.0
    assert m.nbytes_by_lane["d2h_writeback"] == 2_000_000
    row = m.as_dict()
    assert row["payload_gb_s_h2d"] == pytest.approx(16.0) and row["nbytes_h2d_kv"] == 3_000_000
    assert row["tokens_per_s"] == 8000.0
    (m2,) = step_metrics([record], spans, tokens_per_step={0: 2})
    assert m2.tokens_per_s == 2000.0


def test_metrics_json_and_csv_round_trip(tmp_path):
    record, spans = hand_made_step()
    metrics = step_metrics([record], spans, tokens_per_step=8)
    assert read_json(to_json(tmp_path / "m.json", metrics, metadata={"model": "tiny"})) == metrics
    assert json.loads((tmp_path / "m.json").read_text())["metadata"] == {"model": "tiny"}
    with to_csv(tmp_path / "m.csv", metrics).open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(metrics[0].as_dict())
    assert [StepMetrics.from_dict(row) for row in rows] == metrics


def test_metrics_from_a_real_cpu_recording():
    rec = Recorder("cpu")
    fed = fake_runtime(rec, num_steps=3, num_layers=4)
    spans, _ = rec.spans()
    metrics = step_metrics(rec.steps(), spans, tokens_per_step=4)
    assert [m.step for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert m.nbytes_by_lane == {lane: fed[(m.step, lane)] for lane in LANES}
        h2d_bytes = fed[(m.step, "h2d_act")] + fed[(m.step, "h2d_kv")]
        assert m.payload_gb_s["h2d"] == pytest.approx(h2d_bytes / (m.pcie_busy_ms["h2d"] * 1e-3) / 1e9)
        assert 0 < m.pcie_busy_ms["h2d"] <= m.step_ms and m.tokens_per_s > 0


# ---- trace export ----------------------------------------------------------------------------------

def sample_spans() -> list[Span]:
    spans = []
    t = 0.0
    for layer in range(3):
        for lane_index, lane in enumerate(LANES):
            spans.append(Span(0, layer, lane, t + lane_index, t + lane_index + 5.0, 100 * (layer + 1)))
        t += 10.0
    return spans


def test_trace_structure(tmp_path):
    spans = sample_spans()
    nvml = [SimpleNamespace(t_us=5.0, tx_gb_s=None, rx_gb_s=None),
            SimpleNamespace(t_us=25.0, tx_gb_s=1.5, rx_gb_s=40.0)]
    record, hand_spans = hand_made_step()
    counters = {**nvml_counters(nvml), **step_counters(step_metrics([record], hand_spans, tokens_per_step=8)),
                **l2_counters([(3.0, 42.5)], formula=L2_FORMULA_SERVED)}
    trace = build_trace(spans, counters=counters, metadata={"model": "synthetic:tiny-llama", "device": "cpu"})
    assert trace["displayTimeUnit"] == "ms"
    meta = trace["metadata"]
    assert meta["model"] == "synthetic:tiny-llama" and meta["time_unit"] == "us" and meta["num_spans"] == 18
    assert meta["overlap_tracks"] == {} and meta["lanes"] == LANE_LABELS
    events = trace["traceEvents"]
    (process,) = [e for e in events if e["ph"] == "M" and e["name"] == "process_name"]
    assert process["args"]["name"] == PROCESS_NAME == "KV Lab decode"
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(names.values()) == sorted(LANE_LABELS.values()) and len(names) == len(LANES)
    sort_index = {e["tid"]: e["args"]["sort_index"] for e in events if e["name"] == "thread_sort_index"}
    assert [names[tid] for tid in sorted(sort_index, key=sort_index.get)] == [LANE_LABELS[lane] for lane in LANES]

    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == 18
    tid_of_lane = {}
    for e in slices:
        assert tid_of_lane.setdefault(e["cat"], e["tid"]) == e["tid"]  # one tid per lane
        assert names[e["tid"]] == LANE_LABELS[e["cat"]]
    first = next(e for e in slices if e["name"] == "attention L1")
    assert (first["ts"], first["dur"], first["args"]) == (13.0, 5.0, {"step": 0, "layer": 1, "bytes": 200})

    counter_events = [e for e in events if e["ph"] == "C"]
    by_name = {}
    for e in counter_events:
        by_name.setdefault(e["name"], []).append(e)
    assert [e["args"] for e in by_name[COUNTER_LINK]] == [{"tx": 1.5, "rx": 40.0}]  # the rate-less sample is left out
    assert by_name[COUNTER_PAYLOAD][0]["args"]["h2d"] == pytest.approx(16.0)
    assert by_name[COUNTER_TOKENS][0]["args"] == {"tokens/s": 8000.0}
    assert by_name[COUNTER_L2][0] == {"ph": "C", "pid": 1, "name": COUNTER_L2, "ts": 3.0,
                                      "args": {L2_FORMULA_SERVED: 42.5}}
    json.dumps(trace)  # everything in it is JSON


def test_overlapping_spans_of_one_lane_go_to_an_extra_track():
    spans = [Span(0, 0, "attention", 0.0, 10.0, 0), Span(0, 1, "attention", 5.0, 15.0, 0),
             Span(0, 2, "attention", 10.0, 20.0, 0), Span(0, 3, "attention", 12.0, 13.0, 0)]
    trace = build_trace(spans)
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    tids = {e["tid"] for e in slices}
    assert len(tids) == 3 and trace["metadata"]["overlap_tracks"] == {"attention": 2}
    for tid in tids:  # no partial overlap left on any tid
        on_tid = sorted((e["ts"], e["ts"] + e["dur"]) for e in slices if e["tid"] == tid)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(on_tid, on_tid[1:]))
    thread_names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert {"attention", "attention (overlap 2)", "attention (overlap 3)"} <= thread_names
    assert sorted(s.layer for s in spans_from_trace(trace)) == [0, 1, 2, 3]  # nothing dropped


def test_trace_write_gzip_and_round_trip(tmp_path):
    spans = sample_spans()
    counters = l2_counters([(1.0, 10.0), (2.0, 20.0)], formula=L2_FORMULA_PLAIN)
    plain = write_trace(tmp_path / "t.json", spans, counters=counters, metadata={"run": 1})
    assert plain.name == "t.json" and plain.read_bytes()[:1] == b"{"
    zipped = write_trace(tmp_path / "t.json.gz", spans, counters=counters, metadata={"run": 1})
    assert zipped.read_bytes()[:2] == b"\x1f\x8b" and gzip.decompress(zipped.read_bytes()) == plain.read_bytes()
    big = write_trace(tmp_path / "big.json", spans, counters=counters, metadata={"run": 1}, gzip_over_bytes=100)
    assert big.name == "big.json.gz" and big.read_bytes()[:2] == b"\x1f\x8b"
    expected = build_trace(spans, counters=counters, metadata={"run": 1})
    assert read_trace(plain) == read_trace(zipped) == read_trace(big) == expected
    back = sorted(spans_from_trace(read_trace(zipped)), key=lambda s: (s.lane, s.layer))
    want = sorted(spans, key=lambda s: (s.lane, s.layer))
    assert [(s.step, s.layer, s.lane, s.start_us, s.nbytes) for s in back] == \
        [(s.step, s.layer, s.lane, s.start_us, s.nbytes) for s in want]
    assert [s.end_us for s in back] == pytest.approx([s.end_us for s in want])


def test_trace_rejects_unknown_lanes():
    with pytest.raises(ValueError, match="unknown lane 'gpu'"):
        build_trace([Span(0, 0, "gpu", 0.0, 1.0, 0)])


# ---- downsampling ----------------------------------------------------------------------------------

def test_downsample_keeps_spans_when_few_and_merges_smallest_gaps_when_many():
    spans = sample_spans()
    assert len(downsample_segments(spans, 100)) == 18
    # attention: many spans 1 µs apart, one big idle gap; compute: three spans.
    attention = [Span(0, i, "attention", 2.0 * i, 2.0 * i + 1.0, 10) for i in range(50)]
    attention += [Span(1, i, "attention", 1000.0 + 2.0 * i, 1001.0 + 2.0 * i, 10) for i in range(50)]
    compute = [Span(0, i, "compute", 5000.0 + 100.0 * i, 5010.0 + 100.0 * i, 1) for i in range(3)]
    segments = downsample_segments(attention + compute, 4)
    assert len(segments) == 4
    by_lane = {lane: [s for s in segments if s.lane == lane] for lane in ("attention", "compute")}
    assert sum(s.num_spans for s in by_lane["attention"]) == 100 and sum(s.nbytes for s in by_lane["attention"]) == 1000
    assert sum(s.num_spans for s in by_lane["compute"]) == 3
    # Two breaks allowed: attention's 901 µs idle gap and one of compute's 90 µs gaps; 1 µs gaps merge.
    assert [(s.start_us, s.end_us) for s in by_lane["attention"]] == [(0.0, 99.0), (1000.0, 1099.0)]
    assert len(by_lane["compute"]) == 2
    assert len(downsample_segments(attention + compute, 1)) == 2  # never fewer than one per lane
    with pytest.raises(ValueError):
        downsample_segments(spans, 0)


# ---- NVML ------------------------------------------------------------------------------------------

class FakeNvmlError(Exception):
    TEXT = {3: "Not Supported", 9: "Driver Not Loaded", 12: "NVML Shared Library Not Found", 15: "GPU is lost",
            999: "Unknown Error"}

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self.TEXT.get(self.value, f"error {self.value}")


class FakeNvml:
    """The slice of pynvml the sampler uses, with PCIe counters that wrap at 2**32. It has no
    nvmlDeviceGetPcieThroughput (the ~20 ms blocking call): a sampler calling it would fail here."""

    NVML_SUCCESS, NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_LIBRARY_NOT_FOUND = 0, 3, 9, 12
    NVML_FI_DEV_PCIE_COUNT_TX_BYTES, NVML_FI_DEV_PCIE_COUNT_RX_BYTES, NVML_CLOCK_SM = 197, 198, 1
    NVML_VALUE_TYPE_UNSIGNED_INT, NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 1, 3
    NVMLError = FakeNvmlError

    def __init__(self, *, tx_start=2**32 - 1000, rx_start=7, tx_step=1_500_000_000, rx_step=3_000_000_000,
                 stamp_step_us=20_000, init_error=None, field_return=0, fail_after_reads=None, no_utilization=False):
        self.tx_start, self.rx_start, self.tx_step, self.rx_step = tx_start, rx_start, tx_step, rx_step
        self.stamp_step_us, self.init_error, self.field_return = stamp_step_us, init_error, field_return
        self.fail_after_reads, self.no_utilization = fail_after_reads, no_utilization
        self.reads = 0
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error is not None:
            raise FakeNvmlError(self.init_error)

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlErrorString(self, code):
        return str(FakeNvmlError(code))

    def nvmlDeviceGetFieldValues(self, handle, field_ids):
        assert field_ids == [197, 198]
        if self.fail_after_reads is not None and self.reads >= self.fail_after_reads:
            raise FakeNvmlError(15)
        n = self.reads
        self.reads += 1
        raw = {197: (self.tx_start + n * self.tx_step) % 2**32, 198: (self.rx_start + n * self.rx_step) % 2**32}
        # TX reported as unsigned int, RX as unsigned long long: both are read through valueType.
        return [SimpleNamespace(fieldId=f, nvmlReturn=self.field_return, timestamp=1_000_000 + n * self.stamp_step_us,
                                valueType=1 if f == 197 else 3,
                                value=SimpleNamespace(uiVal=raw[f], ullVal=raw[f] if f == 198 else 0))
                for f in field_ids]

    def nvmlDeviceGetUtilizationRates(self, handle):
        if self.no_utilization:
            raise FakeNvmlError(3)
        return SimpleNamespace(gpu=87, memory=41)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=5 << 30, total=80 << 30)

    def nvmlDeviceGetClockInfo(self, handle, clock):
        assert clock == self.NVML_CLOCK_SM
        return 1980


def test_counter_unwrapper_adds_deltas_mod_2_32():
    unwrap = CounterUnwrapper()
    # 2**32 - 10 -> 5 wraps (+15); 5 -> 2**31 (+2**31 - 5); 2**31 -> 2**31 (+0); 2**31 -> 0 wraps (+2**31).
    assert [unwrap.update(r) for r in (2**32 - 10, 5, 2**31, 2**31, 0)] == [0, 15, 2**31 + 10, 2**31 + 10, 2**32 + 10]
    # The total is the sum of the forward steps, however often the counter wrapped.
    unwrap, raw, total = CounterUnwrapper(), 2**32 - 3, 0
    unwrap.update(raw)
    for delta in (1, 2, 3_000_000_000, 4_000_000_000, 7):
        raw = (raw + delta) % 2**32
        total += delta
        assert unwrap.update(raw) == total
    assert total > 2**32


def test_nvml_on_this_machine_is_unavailable_with_the_real_reason():
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine")
    except ImportError:
        expected = "nvidia-ml-py not installed"
    except Exception:
        expected = "NVML could not initialise:"
    sampler = NvmlSampler()
    assert sampler.available() is False
    assert sampler.why_unavailable.startswith(expected)
    assert sampler.status.startswith("unavailable: ")
    assert sampler.start() is False and not sampler.running
    assert sampler.samples() == ([], 0) and sampler.latest() is None
    sampler.close()


def test_nvml_unavailable_reasons(monkeypatch):
    no_driver = NvmlSampler(nvml=FakeNvml(init_error=12))
    assert no_driver.why_unavailable == ("NVML could not initialise: NVML Shared Library Not Found "
                                         "(no NVIDIA driver on this machine)")
    other = NvmlSampler(nvml=FakeNvml(init_error=999))
    assert other.why_unavailable == "NVML could not initialise: Unknown Error"
    refused = NvmlSampler(nvml=FakeNvml(field_return=3))
    assert refused.why_unavailable == "field counters refused: PCIe TX byte counter: Not Supported"
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # import pynvml now raises ImportError
    assert NvmlSampler().why_unavailable == "nvidia-ml-py not installed (pip install nvidia-ml-py)"
    with pytest.raises(ValueError, match="wrap"):
        NvmlSampler(period_s=0.1)


def test_nvml_unwraps_wrapping_counters_into_totals_and_link_rates():
    nvml = FakeNvml(no_utilization=True)
    origin_ns = time.perf_counter_ns()
    sampler = NvmlSampler(period_s=0.001, time_origin_ns=origin_ns, nvml=nvml)
    assert sampler.available() and sampler.why_unavailable is None
    assert sampler.start() and sampler.status == "running"
    assert wait_until(lambda: sampler.samples()[1] >= 6)
    sampler.stop()
    assert sampler.status == "stopped" and not sampler.running
    samples, count = sampler.samples()
    assert count == len(samples) >= 6
    for k, s in enumerate(samples):
        assert s.tx_bytes == k * 1_500_000_000 and s.rx_bytes == k * 3_000_000_000  # wrapped ~every read
        assert s.gpu_util_pct is None and s.mem_util_pct is None  # refused at probe: left out, not fatal
        assert s.mem_used_bytes == 5 << 30 and s.sm_clock_mhz == 1980
    assert samples[0].tx_gb_s is None and samples[0].rx_gb_s is None
    assert all(s.tx_gb_s == 75.0 and s.rx_gb_s == 150.0 for s in samples[1:])  # bytes / 20 ms of NVML time
    elapsed_us = (time.perf_counter_ns() - origin_ns) / 1000
    assert all(0 < a.t_us < b.t_us < elapsed_us for a, b in zip(samples, samples[1:]))
    tail, cursor = sampler.samples(count - 2)
    assert tail == samples[-2:] and cursor == count
    sampler.close()
    assert nvml.shutdowns == 1


def test_nvml_failure_mid_run_stops_the_thread_and_leaves_the_caller_alone():
    nvml = FakeNvml(fail_after_reads=4)  # the probe read and three samples succeed
    sampler = NvmlSampler(period_s=0.001, nvml=nvml)
    assert sampler.start()
    assert wait_until(lambda: sampler.status.startswith("failed"))
    assert wait_until(lambda: not sampler.running)
    assert sampler.status == "failed: FakeNvmlError: GPU is lost"
    samples, count = sampler.samples()
    assert count == 3 and [s.gpu_util_pct for s in samples] == [87, 87, 87]
    sampler.stop()
    sampler.close()
    assert sampler.status == "failed: FakeNvmlError: GPU is lost"


# ---- CUPTI (the sampler, its counter choice and calibration: tests/test_cupti_sampler.py) -----------------

def test_cupti_counters_land_on_the_recorders_axis_in_gb_per_s():
    from engine.telemetry.cupti_sampler import CuptiSample
    from engine.telemetry.export import COUNTER_PM_DRAM, COUNTER_PM_PCIE, cupti_counters

    origin = 1_795_580_768_000_000_000  # wall-clock ns, as the GPU's global timer reads
    samples = [CuptiSample(start_ns=origin + 2_000_000, end_ns=origin + 2_500_000,
                           values={"pcie__read_bytes.sum": 27_000_000.0, "pcie__write_bytes.sum": 500_000.0,
                                   "dram__bytes_read.sum": 1_000_000_000.0}, l2_hit_pct=None),
               CuptiSample(start_ns=origin + 2_500_000, end_ns=origin + 2_500_000, values={}, l2_hit_pct=None),
               CuptiSample(start_ns=origin + 3_000_000, end_ns=origin + 4_000_000, values={"dram__bytes_read.sum": 0.0},
                           l2_hit_pct=41.5)]
    tracks = cupti_counters(samples, origin_wall_ns=origin)
    (t0, pcie), = tracks[COUNTER_PM_PCIE]
    assert t0 == 2000.0 and pcie == {"read": 54.0, "write": 1.0}  # 27 MB in 0.5 ms is 54 GB/s
    assert tracks[COUNTER_PM_DRAM] == [(2000.0, {"read": 2000.0}), (3000.0, {"read": 0.0})]
    assert tracks[COUNTER_L2] == [(3000.0, {"L2 hit %": 41.5})]  # the zero-length sample is skipped
    assert cupti_counters([], origin_wall_ns=origin) == {}


def test_recorder_wall_origin_matches_its_perf_counter_origin():
    before = time.time_ns()
    rec = Recorder(torch.device("cpu"))
    after = time.time_ns()
    assert before <= rec.origin_wall_ns <= after
    rec.close()
