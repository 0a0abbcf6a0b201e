"""CUPTI PM sampling on this GPU: which counters, what L2 reads at both ends, what sampling costs a decode step.

    python bench/cupti_probe.py --out DIR [--model synthetic:llama-2-7b] [--batch 8] [--prompt-len 2048]
        [--new-tokens 16] [--intervals-ms 5,1] [--kernel-shape 1,32,8,32768] [--budget-s 150]

(a) the chip's single-pass sets, every member of each, and the counters chosen from them (or what is missing);
(b) the L2 calibration: what an L2-resident and a DRAM-streaming loop read with the chosen L2 counters, and how
    fast the streaming loop runs with sampling off and on (the GPU's own cost of sampling);
(c) an offloaded decode (synthetic:llama-2-7b B8 P2048, placement cpu, split auto) through the Profile panel's
    code path (engine/lab/runs.profile_run), sampling off and on interleaved, twice each, at the default interval
    and at every other interval asked: `cupti_overhead_ratio` = tok/s sampled / tok/s unsampled (default interval),
    the sampler thread's CPU time beside it;
(d) that run's trace with the live L2 series (cupti_live_run.trace.json.gz: import it in the Profile panel);
(e) the Kernels tab's study of one shape, L2 sampled per variant.
Writes DIR/cupti_live.json and .md (bench/report.py's format, `l2_live_available` and `cupti_overhead_ratio` as
headlines: merge them into bench/results/summary.json) and the trace. Without cupti-python or a GPU it says why,
writes the JSON saying so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SUITE = "cupti_live"
COMMAND = "python bench/cupti_probe.py --out DIR"


def _loaded_libcupti() -> list[str]:
    try:
        return sorted({line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                       if "libcupti" in line or "libnvperf" in line})
    except OSError:
        return []


def _load_cupti_first() -> str:
    """Import cupti-python and load its libcupti before torch does (torch links the one of its own wheels, which may
    be older). Returns '' or why it could not."""
    try:
        import cupti.profiler_host as ph

        ph.get_supported_chips()  # loads libcupti
        return ""
    except ImportError as exc:
        return f"cupti-python not installed ({exc})"
    except Exception as exc:  # noqa: BLE001
        return f"cupti-python could not load libcupti: {type(exc).__name__}: {exc}"


class Probe:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.monotonic() + args.budget_s
        self.rows: list = []
        self.headlines: list = []
        self.notes: list[str] = []
        self.details: dict = {}

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def part(self, name: str, fn, *, needs_s: float = 0.0) -> None:
        if self.left_s() < needs_s:
            self.notes.append(f"{name}: skipped, {self.left_s():.0f} s of the {self.args.budget_s:.0f} s budget left")
            return
        t0 = time.monotonic()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - each part reports its failure; the others still run
            self.notes.append(f"{name} failed: {type(exc).__name__}: {exc}")
            self.details.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
            print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
        self.details.setdefault("part_s", {})[name] = round(time.monotonic() - t0, 1)
        print(f"[{name}] {time.monotonic() - t0:.1f} s", flush=True)

    def write(self) -> None:
        from bench.report import SuiteResult, write_results

        self.args.out.mkdir(parents=True, exist_ok=True)
        result = SuiteResult(suite=SUITE, rows=self.rows, headlines=self.headlines, notes=self.notes,
                             details=self.details)
        write_results(result, results_dir=self.args.out, command=COMMAND)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="synthetic:llama-2-7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--intervals-ms", default="5,1", help="sampling intervals to run (the first one is the "
                                                              "sampler's default, the headline's)")
    parser.add_argument("--kernel-shape", default="1,32,8,32768", help="B,Hq,Hkv,S of the kernel study ('' skips it)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="parts that would start past this are skipped")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests run the parts on the CPU
    args = parser.parse_args(argv)
    probe = Probe(args)
    from bench.report import Headline

    why = _load_cupti_first()
    probe.details["libcupti_loaded"] = _loaded_libcupti()
    import torch

    from engine.telemetry import DEFAULT_INTERVAL_US, CuptiPmSampler

    intervals_us = [int(float(ms) * 1000) for ms in args.intervals_ms.split(",") if ms.strip()]
    if intervals_us[0] != DEFAULT_INTERVAL_US:
        probe.notes.append(f"the first interval asked ({intervals_us[0]} µs) is not the sampler's default "
                           f"({DEFAULT_INTERVAL_US} µs): the headline is at the one asked")
    sampler = CuptiPmSampler(0, interval_us=intervals_us[0], calibrate=False)
    reason = why or (None if torch.cuda.is_available() else "no GPU: CUDA reports no device on this machine")
    pm = sampler.probe() if reason is None else None
    if pm is not None and not pm.available:
        reason = pm.reason
    probe.details["torch"] = torch.__version__
    if reason is not None:
        print(f"CUPTI PM sampling unavailable here: {reason}", flush=True)
        probe.notes.append(f"CUPTI PM sampling unavailable: {reason}")
        probe.details["available"] = False
        probe.headlines.append(Headline("l2_live_available", 0.0, f"1 when L2 counters were configured ({reason})"))
        probe.write()
        return 0

    choice = pm.choice
    probe.details.update(available=True, chip=pm.chip, reason=pm.reason, metrics=list(pm.metrics),
                         roles=dict(choice.roles), set_name=choice.set_name, use_set_name=choice.use_set_name,
                         missing=list(choice.missing), device_name=torch.cuda.get_device_name(0))
    probe.part("sets", lambda: _sets(probe, pm))
    print(f"chosen on {pm.chip}: {pm.metrics}\nL2: {pm.l2_formula}\nmissing: {choice.missing}", flush=True)
    probe.headlines.append(Headline("l2_live_available", 1.0 if pm.l2_available else 0.0,
                                    f"1 when L2 counters were configured on this chip ({pm.l2_formula or pm.reason})"))
    probe.part("calibration", lambda: _calibration(probe, sampler, intervals_us), needs_s=10)
    probe.part("decode", lambda: _decode(probe, sampler, intervals_us), needs_s=45)
    if args.kernel_shape:
        probe.part("kernel_study", lambda: _kernels(probe, sampler), needs_s=25)
    probe.details["libcupti_loaded"] = _loaded_libcupti()
    probe.write()
    return 0


def _sets(probe: Probe, pm) -> None:
    """Every set's members, as the chip lists them (the record future counter choices are tested against)."""
    import cupti.profiler_host as ph

    sets = {}
    for name in ph.get_single_pass_sets(pm.chip):
        try:
            sets[name] = list(ph.get_metrics_in_single_pass_set(pm.chip, name))
        except Exception as exc:  # noqa: BLE001
            sets[name] = [f"<unreadable: {type(exc).__name__}: {exc}>"]
    probe.details["single_pass_sets"] = sets
    # What the chip says of each member of the L2 set: kind and sub-metrics (what the next choice is tested against).
    members = sets.get(pm.choice.set_name or "", [])[:120]
    host = ph.ProfilerHost(pm.chip, ph.ProfilerType.PM_SAMPLING)
    host.initialize()
    properties = {}
    try:
        for name in members:
            try:
                props = host.get_metric_properties(name)
                properties[name] = {"type": str(getattr(props.metric_type, "name", props.metric_type)),
                                    "description": props.description, "dim_unit": props.dim_unit,
                                    "sub_metrics": list(host.get_sub_metrics(name, props.metric_type))}
            except Exception as exc:  # noqa: BLE001
                properties[name] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        host.deinitialize()
    probe.details["set_member_properties"] = properties
    for name, members in sets.items():
        print(f"set {name}: {len(members)} metrics: {', '.join(members[:60])}{' ...' if len(members) > 60 else ''}")


def _calibration(probe: Probe, sampler, intervals_us: list[int]) -> None:
    cal = sampler.calibration(refresh=True)
    if cal is None:
        probe.notes.append(f"L2 calibration: {sampler.calibration_note}")
        return
    probe.details["calibration"] = {"values": {m: list(v) for m, v in cal.values.items()},
                                    "num_samples": list(cal.num_samples), "note": cal.note,
                                    "interval_us": cal.interval_us}
    for metric, (hit, miss) in cal.values.items():
        print(f"calibration {metric}: all-hit loop {hit:.1f} %, DRAM-streaming loop {miss:.1f} %", flush=True)
        probe.notes.append(f"L2 calibration, {metric}: an L2-resident loop reads {hit:.1f} %, a DRAM-streaming loop "
                           f"{miss:.1f} % ({cal.num_samples[0]} and {cal.num_samples[1]} samples every "
                           f"{cal.interval_us / 1000:g} ms)")
    _streaming_rates(probe, intervals_us)


def _streaming_rates(probe: Probe, intervals_us: list[int]) -> None:
    """The GPU's own cost of sampling, without Python in the way: GB/s of 200 back-to-back sums of 1 GiB with
    sampling off, on at each interval, and off again."""
    import torch

    from engine.telemetry import CuptiPmSampler

    bufs = [torch.ones(1 << 29, dtype=torch.bfloat16, device="cuda")]  # 1 GiB

    def rate() -> float:
        buf = bufs[0]
        for _ in range(3):
            buf.sum()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            buf.sum()
        end.record()
        end.synchronize()
        return 200 * buf.numel() * 2 / (start.elapsed_time(end) * 1e-3) / 1e9

    rates = {"off": rate()}
    for interval in intervals_us:
        box = {}
        samples = CuptiPmSampler(0, interval_us=interval, calibrate=False).sample_during(
            lambda: box.setdefault("r", rate()))
        rates[f"on {interval} us"] = box["r"]
        probe.details.setdefault("sum_samples", {})[str(interval)] = len(samples)
    rates["off again"] = rate()
    bufs.clear()
    torch.cuda.empty_cache()
    probe.details["sum_gb_s"] = rates
    from bench.report import Row

    base = statistics.fmean([rates["off"], rates["off again"]])
    for label, value in rates.items():
        probe.rows.append(Row(case=f"bf16 sum of 1 GiB, sampling {label}", gb_s=value,
                              peer="sampling off" if label.startswith("on") else None,
                              ratio=value / base if label.startswith("on") else None))
    print(f"1 GiB sum GB/s: {rates}", flush=True)


def _decode(probe: Probe, sampler, intervals_us: list[int]) -> None:
    import torch

    from bench.report import Headline, Row
    from engine.lab.runs import profile_run, trace_spans
    from engine.loader import load_model
    from engine.offload.profiler import hardware_profile
    from engine.settings import GenerationSettings, OffloadSettings, RunShape
    from engine.telemetry import CuptiPmSampler, nvml_counters, step_counters, write_trace

    args = probe.args
    model = load_model(args.model, device=args.device)
    hardware = hardware_profile(model.device, quick=True)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, offload=OffloadSettings(placement="cpu"))
    shape = RunShape(batch=args.batch, prompt_tokens=args.prompt_len)
    samplers = {intervals_us[0]: sampler}
    for interval in intervals_us[1:]:
        samplers[interval] = CuptiPmSampler(0, interval_us=interval, calibrate=False)
    sampler.calibrate = True  # the default arm labels its L2 series with the calibration (cached by then)
    arms = ["off", *intervals_us]
    order = arms * 2  # interleaved: drift hits every arm alike
    runs: dict[str, list] = {str(a): [] for a in arms}
    case = f"{args.model} B{args.batch} P{args.prompt_len} N{args.new_tokens}, KV cpu, split auto"
    last_record = None
    # One short run first, not counted: the process's first-time costs (kernel compilation, first pinned allocation).
    for _ in profile_run(model, replace(settings, max_new_tokens=4), shape, run_id=0, hardware=hardware):
        pass
    for run_id, arm in enumerate(order, start=1):
        cupti = None if arm == "off" else samplers[arm]
        record = None
        for update in profile_run(model, settings, shape, run_id=run_id, hardware=hardware, cupti=cupti):
            record = update.record or record
        stats = cupti.stats if cupti is not None else None
        entry = {"tok_s": record.tokens_per_s, "median_step_ms": record.median_step_ms,
                 "warmup_steps": record.warmup_steps, "l2_hit_pct": record.l2_hit_pct, "l2_note": record.l2_note,
                 "pm_samples": len(record.pm_counters.get("PCIe GB/s (CUPTI PM sampling)", [])),
                 "drain_cpu_s": stats.drain_cpu_s if stats else None, "decodes": stats.decodes if stats else None,
                 "drain_error": stats.error if stats else None}
        runs[str(arm)].append(entry)
        print(f"run {run_id} sampling {arm}: {record.tokens_per_s:.2f} tok/s, median step {record.median_step_ms:.2f} "
              f"ms, L2 {record.l2_hit_pct}", flush=True)
        if arm == intervals_us[0]:
            last_record = record
        torch.cuda.empty_cache()
    probe.details["decode_runs"] = runs
    off = statistics.median(r["tok_s"] for r in runs["off"])
    probe.rows.append(Row(case=f"{case}, sampling off", ms=statistics.median(r["median_step_ms"] for r in runs["off"]),
                          tok_s=off))
    for interval in intervals_us:
        arm = runs[str(interval)]
        on = statistics.median(r["tok_s"] for r in arm)
        probe.rows.append(Row(case=f"{case}, sampling every {interval / 1000:g} ms",
                              ms=statistics.median(r["median_step_ms"] for r in arm), tok_s=on, peer="sampling off",
                              peer_ms=statistics.median(r["median_step_ms"] for r in runs["off"]),
                              extra={"ratio_tok_s": on / off, "drain_cpu_s": [r["drain_cpu_s"] for r in arm],
                                     "l2_hit_pct": [r["l2_hit_pct"] for r in arm]}))
        probe.details.setdefault("overhead_ratio_by_interval_us", {})[str(interval)] = on / off
    ratio = probe.details["overhead_ratio_by_interval_us"][str(intervals_us[0])]
    probe.headlines.append(Headline("cupti_overhead_ratio", ratio,
                                    f"decode tok/s with CUPTI PM sampling every {intervals_us[0] / 1000:g} ms / "
                                    f"without, same process, interleaved x2 ({case}; target >= 0.97)",
                                    peer="sampling off", peer_value=off))
    if last_record is not None:
        spans, merged = trace_spans(last_record)
        counters = (step_counters(s.metrics for s in last_record.steps) | nvml_counters(last_record.link)
                    | last_record.pm_counters)
        meta = last_record.summary(with_steps=True) | ({"spans_merged": merged} if merged else {})
        path = write_trace(args.out / "cupti_live_run.trace.json.gz", spans, counters=counters, metadata=meta)
        probe.details["trace"] = {"file": path.name, "spans": len(spans), "pm_tracks": sorted(last_record.pm_counters),
                                  "pm_labels": last_record.pm_labels, "l2_note": last_record.l2_note}
        probe.notes.append(f"trace with the live L2 series: {path.name} ({len(spans)} spans; import it in the Profile "
                           "panel)")
    del model
    torch.cuda.empty_cache()


def _kernels(probe: Probe, sampler) -> None:
    from bench.report import Row
    from engine.lab.kernel_study import KernelStudy, StudyShape

    b, h, hk, s = (int(x) for x in probe.args.kernel_shape.split(","))
    shape = StudyShape(batch=b, num_heads=h, num_kv_heads=hk, seq_len=s)
    result = KernelStudy(probe.args.device, cupti=sampler).run(shape)
    probe.details["kernel_study"] = result.as_dict()
    headers, rows = result.table()
    print(" | ".join(headers))
    for row in rows:
        print(" | ".join("-" if v is None else str(v) for v in row))
    for r in result.rows:
        probe.rows.append(Row(case=f"{result.shape.label} · {r.name}", ms=r.ms, gb_s=r.gb_s,
                              extra={"l2_hit_pct": r.l2_hit_pct, "plan": r.plan, "error": r.error}))
    probe.notes.append(f"kernel study {result.shape.label}: {result.note}; L2: {result.l2_label}")


if __name__ == "__main__":
    raise SystemExit(main())
