"""Telemetry of decode steps: per-lane intervals, per-step metrics, NVML/CUPTI counters, trace export.

    from engine.telemetry import Recorder, step_metrics, write_trace
    rec = Recorder(device)             # the runtime calls begin_step/begin/end/end_step
    spans, next_index = rec.spans()    # panels poll incrementally
    metrics = step_metrics(rec.steps(), spans, tokens_per_step=batch)
    write_trace("decode.json.gz", spans, counters=step_counters(metrics))
"""

from engine.telemetry.cupti_calibration import L2Calibration
from engine.telemetry.cupti_sampler import (DEFAULT_INTERVAL_US, NCU_FALLBACK, CuptiPmSampler, CuptiProbe, CuptiSample,
                                            PmRun)
from engine.telemetry.export import (COUNTER_L2, COUNTER_LINK, COUNTER_PAYLOAD, COUNTER_TOKENS, PROCESS_NAME, Segment,
                                     build_trace, downsample_segments, l2_counters, nvml_counters, read_trace,
                                     spans_from_trace, step_counters, write_trace)
from engine.telemetry.lanes import (DIRECTIONS, LANE_LABELS, LANES, PCIE_DIRECTION, PCIE_LANES, check_lane, lane_label,
                                    lanes_in_direction)
from engine.telemetry.metrics import StepMetrics, gb_per_s, read_json, step_metrics, to_csv, to_json, union_us
from engine.telemetry.nvml_sampler import CounterUnwrapper, NvmlSample, NvmlSampler
from engine.telemetry.pm_metrics import PM_TRACKS, CounterChoice, choose_counters, cupti_counters, series_labels
from engine.telemetry.recorder import Recorder, Span, StepRecord

__all__ = [
    "COUNTER_L2", "COUNTER_LINK", "COUNTER_PAYLOAD", "COUNTER_TOKENS", "DEFAULT_INTERVAL_US", "DIRECTIONS", "LANES",
    "LANE_LABELS", "NCU_FALLBACK", "PCIE_DIRECTION", "PCIE_LANES", "PM_TRACKS", "PROCESS_NAME", "CounterChoice",
    "CounterUnwrapper", "CuptiPmSampler", "CuptiProbe", "CuptiSample", "L2Calibration", "NvmlSample", "NvmlSampler",
    "PmRun", "Recorder", "Segment", "Span", "StepMetrics", "StepRecord", "build_trace", "check_lane", "choose_counters",
    "cupti_counters", "downsample_segments", "gb_per_s", "l2_counters", "lane_label", "lanes_in_direction",
    "nvml_counters", "read_json", "read_trace", "series_labels", "spans_from_trace", "step_counters", "step_metrics",
    "to_csv", "to_json", "union_us", "write_trace",
]
