"""Nsight Compute counters for the decode-attention kernel: pipeline depth x prefetch, on a few shapes.

    python bench/ncu_decode_attention.py [--results-dir bench/results] [--ncu /path/to/ncu] [--tag h200]
        [--shapes '1,32,8,32768;32,32,32,4096'] [--variants '0:off,0:on1']

Variants are `stages:prefetch` (stages 0: the planner's depth; prefetch off, on1 or on2: tiles ahead). Runs `ncu
--csv --clock-control none` on this same script in worker mode (one shape, one variant, the split kernel `_kernel`
profiled after warm-up calls), parses the CSV, and writes `decode_attention_ncu[_TAG].json` and `.md` with the
device, date and command. L2 service is reported
two ways: ncu's plain hit rate, and the partition-aware fraction of L1 (tex) read sectors served by
L2 = (tex lookup hits + ltcfabric lookup hits) / tex reads, since on H100 about half of the hits land
in the far partition and arrive over the fabric. Exits non-zero when ncu is missing or fails.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import command_line  # noqa: E402
SHAPES = [(1, 32, 8, 32768), (32, 32, 32, 4096)]  # (B, Hq, Hkv, S), D = 128, bf16
HEAD_DIM = 128
WARMUP_CALLS = 2
REQUIRED = ["gpu__time_duration.sum", "dram__bytes_read.sum", "lts__t_sector_hit_rate.pct",
            "lts__t_sectors_srcunit_tex_op_read.sum", "lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum",
            "lts__t_sectors_srcunit_ltcfabric_op_read_lookup_hit.sum"]
# Long-scoreboard stalls: the first name that this ncu knows is used. The first is what ncu's Warp State
# section shows (cycles a warp waits on global memory per issued instruction); the last is a fallback that
# ncu 2025 answers as a base name with .pct/.ratio/.max_rate sub-metrics (.ratio read: cycles per warp).
STALL_CANDIDATES = ["smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
                    "smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct",
                    "smsp__average_warp_latency_issue_stalled_long_scoreboard"]
OPTIONAL = ["sm__warps_active.avg.pct_of_peak_sustained_active", "launch__grid_size"]
_UNIT_SCALE = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6, "second": 1e9,
               "byte": 1.0, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12}


def _variant(text: str) -> tuple[int, str, int]:
    """'3:on1' -> (3 stages, prefetch "on", distance 1); stages 0: the planner's."""
    stages, prefetch = text.split(":")
    distance = int(prefetch[2:] or 1) if prefetch.startswith("on") else 1
    return int(stages), "on" if prefetch.startswith("on") else "off", distance


def _worker(shape: tuple[int, ...], variant: str) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from kernels.decode_attention import DecodeAttentionConfig, decode_attention

    batch, num_heads, num_kv_heads, seq_len = shape
    q = torch.randn(batch, num_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, num_kv_heads, seq_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    stages, prefetch, distance = _variant(variant)
    config = DecodeAttentionConfig(prefetch=prefetch, prefetch_distance=distance, num_stages=stages or None)
    for _ in range(WARMUP_CALLS + 1):
        decode_attention(q, k, v, lens, config=config)
    torch.cuda.synchronize()


def _parse_csv(text: str) -> dict[str, tuple[float, str]]:
    """{metric: (value, unit)} from ncu --csv output (the last profiled kernel wins)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"') and "Metric Name" in line), None)
    if start is None:
        raise ValueError("no ncu CSV header in the output")
    metrics = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        name, value = row.get("Metric Name"), (row.get("Metric Value") or "").replace(",", "")
        if not name:
            continue
        try:
            metrics[name] = (float(value), (row.get("Metric Unit") or "").strip())
        except ValueError:
            continue
    return metrics


def _value(metrics: dict, name: str, *, base_unit: str | None = None) -> float | None:
    if name not in metrics:
        return None
    value, unit = metrics[name]
    if base_unit and unit.lower() in _UNIT_SCALE:
        value *= _UNIT_SCALE[unit.lower()]
    return value


def _profile(ncu: str, shape, prefetch: str, metrics: list[str]) -> tuple[dict, str]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "ncu.csv"
        cmd = [ncu, "--csv", "--clock-control", "none", "--print-units", "base", "--kernel-name", "_kernel",
               "--launch-skip", str(WARMUP_CALLS), "--launch-count", "1", "--metrics", ",".join(metrics),
               "--log-file", str(log), sys.executable, str(Path(__file__).resolve()), "--worker",
               "--shape", ",".join(map(str, shape)), "--variant", prefetch]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        text = (log.read_text() if log.exists() else "") + "\n" + proc.stdout
        if proc.returncode != 0 or '"Metric Name"' not in text:
            raise RuntimeError(f"ncu failed (rc {proc.returncode}): {(text + proc.stderr)[-3000:]}")
        # Recorded without this machine's paths (temporary log, interpreter).
        shown = ["ncu", *cmd[1:-8], "<log>", "python", "bench/ncu_decode_attention.py --worker ..."]
        return _parse_csv(text), shlex.join(shown)


def _measure(ncu: str, shape, prefetch: str, cache: dict) -> dict:
    # Metric names vary with the ncu version: try the full list, drop what is rejected, keep what worked.
    attempts = [cache["metrics"]] if "metrics" in cache else (
        [REQUIRED + [s] + OPTIONAL for s in STALL_CANDIDATES] + [REQUIRED + [s] for s in STALL_CANDIDATES] + [REQUIRED])
    for metrics in attempts:
        try:
            raw, cmd = _profile(ncu, shape, prefetch, metrics)
            cache["metrics"] = metrics
            break
        except RuntimeError as exc:
            print(f"ncu rejected {len(metrics)} metrics; retrying with fewer: {str(exc)[-300:]}", file=sys.stderr)
            last = exc
    else:
        raise last
    stall = next((name for s in STALL_CANDIDATES for name in (s, s + ".ratio") if name in raw), None)
    batch, num_heads, num_kv_heads, seq_len = shape
    bytes_moved = 2 * batch * num_kv_heads * seq_len * HEAD_DIM * 2 + 2 * batch * num_heads * HEAD_DIM * 2
    duration_ns = _value(raw, "gpu__time_duration.sum", base_unit="ns")
    tex_reads = _value(raw, "lts__t_sectors_srcunit_tex_op_read.sum")
    tex_hits = _value(raw, "lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum")
    fabric_hits = _value(raw, "lts__t_sectors_srcunit_ltcfabric_op_read_lookup_hit.sum")
    return {
        "shape": f"B{batch} Hq{num_heads} Hkv{num_kv_heads} S{seq_len}",
        "prefetch": prefetch,  # the variant, stages:prefetch
        "duration_us": duration_ns / 1e3 if duration_ns else None,
        "gb_s": bytes_moved / duration_ns if duration_ns else None,
        "dram_read_mb": (_value(raw, "dram__bytes_read.sum", base_unit="byte") or 0) / 1e6 or None,
        "kv_mb": bytes_moved / 1e6,
        "l2_hit_rate_pct": _value(raw, "lts__t_sector_hit_rate.pct"),
        "l2_served_pct": 100 * (tex_hits + (fabric_hits or 0)) / tex_reads if tex_reads and tex_hits is not None else None,
        "long_scoreboard_stall": _value(raw, stall) if stall else None,
        "long_scoreboard_metric": stall,
        "achieved_occupancy_pct": _value(raw, OPTIONAL[0]),
        "grid_size": _value(raw, OPTIONAL[1]),
        "ncu_command": cmd,
        "raw": {k: list(v) for k, v in raw.items()},
    }


def _device() -> str:
    try:
        import torch

        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.multi_processor_count} SMs, torch {torch.__version__})"
    except Exception as exc:  # noqa: BLE001 - informative only
        return f"unknown ({exc})"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--ncu", default=None, help="ncu executable (default: PATH, then /usr/local/cuda/bin/ncu)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="0:off", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES))
    parser.add_argument("--variants", default="0:off,0:on1", help="stages:prefetch, e.g. '1:off,1:on1,3:off,3:on1'")
    parser.add_argument("--tag", default="", help="results go to decode_attention_ncu_TAG.*")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(tuple(int(x) for x in args.shape.split(",")), args.variant)
        return 0
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        _variant(v)  # a malformed variant fails here, before any profiling
    ncu = args.ncu or shutil.which("ncu") or next(
        (p for p in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/ncu") if os.path.exists(p)), None)
    if not ncu:
        print("ncu (Nsight Compute) not found on PATH or in /usr/local/cuda/bin; install it or pass --ncu", file=sys.stderr)
        return 2
    rows, cache = [], {}
    for shape in shapes:
        for variant in variants:
            try:
                rows.append(_measure(ncu, shape, variant, cache))
            except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as exc:
                print(f"{shape} {variant}: {exc}", file=sys.stderr)
                return 1
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "raw"}), flush=True)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = command_line(argv, program="python bench/ncu_decode_attention.py")
    payload = {"device": _device(), "date": date, "command": command, "ncu": ncu, "rows": rows,
               "l2_served_formula": "(lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum + "
                                    "lts__t_sectors_srcunit_ltcfabric_op_read_lookup_hit.sum) / lts__t_sectors_srcunit_tex_op_read.sum"}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = "decode_attention_ncu" + (f"_{args.tag}" if args.tag else "")
    (args.results_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = ["# Nsight Compute: decode attention `_kernel`, pipeline depth x prefetch", "",
          f"- device: {payload['device']}", f"- date: {date}", f"- command: `{command}`",
          f"- ncu: `{rows[0]['ncu_command']}`", f"- L2 served = {payload['l2_served_formula']}", "",
          "| shape | stages:prefetch (0: the planner's depth) | duration µs | GB/s | DRAM read MB | K+V+q+out MB | L2 hit % | L2 served % | long-scoreboard stall | occupancy % |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['shape']} | {r['prefetch']} | {_fmt(r['duration_us'], '{:.1f}')} | {_fmt(r['gb_s'], '{:.0f}')} | "
                  f"{_fmt(r['dram_read_mb'], '{:.1f}')} | {r['kv_mb']:.1f} | {_fmt(r['l2_hit_rate_pct'], '{:.1f}')} | "
                  f"{_fmt(r['l2_served_pct'], '{:.1f}')} | {_fmt(r['long_scoreboard_stall'], '{:.2f}')} | "
                  f"{_fmt(r['achieved_occupancy_pct'], '{:.1f}')} |")
    md += ["", f"- long-scoreboard metric: `{rows[0]['long_scoreboard_metric']}`",
           "- durations are ncu's (`--clock-control none`, one kernel launch, caches flushed before each replay pass by "
           "ncu's default `--cache-control all`); the merge kernel is not included"]
    (args.results_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
