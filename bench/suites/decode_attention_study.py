"""Prefetch study, the kernel side: every pipeline depth x prefetch variant of the decode-attention kernel, per shape.

For each shape (B, Hq, Hkv, S) every variant of `kernels.decode_attention.variant_grid` (1, 2, 3 stages x prefetch
off / on 1 tile ahead / on 2 tiles ahead; splits and tiles as the launcher plans them; and at depth 1 the same three
with 16- and 32-key tiles, `SHALLOW_TILES`, the latency-bound kernel the seed paper prefetched for) is checked against
the fp32 reference on fresh random inputs (poisoned output), then timed: calls queued back to back behind a GPU sleep, buffer
sets rotated so each call finds its K/V cold in L2 (engine/gpu_timing.py, as bench/suites/decode_attention.py
does: the GPU's time, which is what a call costs in the engine's CUDA graphs; triton's do_bench, used before
2026-12-01 16:00 UTC, timed the host's launch of small kernels). GB/s counts the K/V bytes. With CUPTI PM sampling
(cupti-python, libcupti preloaded) each variant then runs alone for `--counters-ms` under sampling: its mean L2 hit
rate and long-scoreboard stalls (the counters the chip's single-pass sets offer, engine/telemetry/pm_metrics.py).
The fastest variant of each shape class (kernels/tuning.py) goes into this device's tuning table, which
`prefetch="auto"` and an unset num_stages follow from then on; `auto` is then timed on every shape beside the
fastest fixed variant.

Headlines: `prefetch_shallow_gain` (at pipeline depth 1, on the under-occupied shapes: prefetch off time / the
faster prefetch-on time, the best such shape) and `decode_attn_auto_vs_best_variant` (the fastest fixed variant's
time / auto's, the worst shape).

    python -m bench decode_attention_study [--shapes '1,32,8,32768;32,32,32,4096'] [--no-table] [--counters-ms 0]

`study()` is what to call from a session on the GPU. Under TRITON_INTERPRET=1 it also runs tiny shapes on the CPU,
timed by the host clock, prefetch forced off: a smoke test of the code, never a measurement.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from bench.report import Headline, Row, SuiteResult
from bench.timing import cold_l2_num_sets, median_ms

# (B, Hq, Hkv, S): the decode_attention bench's shapes, one sequence of 128K keys, the under-occupied grids prefetch
# might still help, and the attention calls of the decode bench's four targets (bench/suites/decode.py TARGETS:
# llama-2-7b B1 and B8 at 2048 keys, B64 at 512, llama-3-8b B8 at 8192), so the tuning table holds their classes
SHAPES = [(1, 32, 8, 32768), (1, 32, 32, 8192), (8, 32, 32, 16384), (32, 32, 32, 4096), (64, 32, 8, 4096),
          (128, 32, 8, 2048), (4, 40, 8, 8192), (1, 32, 8, 131072), (1, 32, 8, 2048), (1, 8, 1, 4096), (2, 32, 8, 1024),
          (1, 32, 32, 2048), (8, 32, 32, 2048), (64, 32, 32, 512), (8, 32, 8, 8192)]
HEAD_DIM = 128
# Depth-1 variants with these fixed tile lengths too (keys): one 4 or 8 KiB K and V tile in flight per program, the
# latency-bound kernel where a prefetch of the next tiles should pay (kernels/decode_plan.variant_grid). At 32 keys
# prefetch gained 1.35-1.39x on the long under-occupied shapes (H200, 2026-12-02), 2 tiles ahead no more than 1: a
# 16-key tile spends a larger share of its step waiting, so the gain should be larger there.
SHALLOW_TILES = (16, 32)
DTYPE = torch.bfloat16
MAX_REL_ERR = 1e-2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", type=str, default=None, help="subset, e.g. '1,32,8,32768;32,32,32,4096'")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--repeat", type=int, default=11, help="timed samples per variant (>= 2 ms each; median)")
    parser.add_argument("--counters-ms", type=float, default=60.0,
                        help="span each variant runs under CUPTI PM sampling for L2 and stalls (0: no counters)")
    parser.add_argument("--interval-us", type=int, default=1000, help="the PM sampling interval")
    parser.add_argument("--no-table", action="store_true", help="measure only; leave the device's tuning table alone")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _median_ms(fn: Callable[[int], object], *, num_sets: int, device: torch.device, repeat: int) -> float:
    """Median ms per call of fn(i), i cycling over the buffer sets: the GPU's time of calls queued back to back
    (engine/gpu_timing.py); the host clock under the interpreter."""
    if device.type == "cuda":
        from engine.gpu_timing import queued_median_ms

        return queued_median_ms(fn, num_sets=num_sets, repeat=repeat)
    counter = itertools.count()
    return median_ms(lambda: fn(next(counter) % num_sets), warmup=1, repeat=3)


def _make_sets(shape, num_sets: int, *, head_dim: int, dtype: torch.dtype, device: torch.device, seed: int):
    batch, num_heads, num_kv_heads, seq_len = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(num_sets):
        q = torch.randn(batch, num_heads, head_dim, device=device, generator=gen).to(dtype)
        k = torch.randn(batch, num_kv_heads, seq_len, head_dim, device=device, generator=gen).to(dtype)
        v = torch.randn(batch, num_kv_heads, seq_len, head_dim, device=device, generator=gen).to(dtype)
        sets.append((q, k, v, torch.full((batch,), seq_len, dtype=torch.int32, device=device)))
    return sets


def _pick_per_class(rows: list[Row]) -> dict[str, tuple[Row, float]]:
    """Per shape class, the variant with the smallest geometric-mean ratio to each shape's fastest variant. Rows with
    a fixed tile (the shallow-tile family) are left out: the tuning table holds stages and prefetch, and the
    engine plans its own tiles."""
    by_shape: dict[tuple, list[Row]] = {}
    for row in rows:
        if row.ms is not None and row.extra.get("tile") is None:
            by_shape.setdefault(tuple(row.extra["shape"]), []).append(row)
    ratios: dict[str, dict[str, list[float]]] = {}
    best_rows: dict[tuple[str, str], Row] = {}
    for shape_rows in by_shape.values():
        fastest = min(r.ms for r in shape_rows)
        for r in shape_rows:
            cls, name = r.extra["shape_class"], r.extra["variant"]
            ratios.setdefault(cls, {}).setdefault(name, []).append(r.ms / fastest)
            best_rows.setdefault((cls, name), r)
    picked = {}
    for cls, per_variant in ratios.items():
        complete = {n: v for n, v in per_variant.items() if len(v) == max(len(x) for x in per_variant.values())}
        name = min(complete, key=lambda n: statistics.geometric_mean(complete[n]))
        picked[cls] = (best_rows[(cls, name)], statistics.geometric_mean(complete[name]))
    return picked


def study(shapes: Sequence[tuple[int, int, int, int]] = SHAPES, *, head_dim: int = HEAD_DIM, dtype: torch.dtype = DTYPE,
          device: torch.device | str = "cuda", repeat: int = 11,
          table_path: Path | Literal["device"] | None = "device", notes: list[str] | None = None,
          sampler=None, counters_ms: float = 60.0, shallow_tiles: tuple[int, ...] = SHALLOW_TILES):
    """Time every variant on every shape -> (rows, the tuning table of these measurements, auto rows).

    Rows are bench.report.Row (ms per call, K/V bytes, GB/s; extra: shape, variant, asked and ran settings, the
    plan's why, relative error, and with a CUPTI `sampler` the variant's mean L2 hit % and long-scoreboard stalls).
    The table (fastest variant per shape class) is also written, merged over what is there: to this device's table
    (`"device"`), to `table_path`, or nowhere (None). Auto rows: `auto` with that table, one per shape."""
    import kernels.decode_attention as kda
    from engine.lab.kernel_study import counter_means
    from kernels.segments import KVSegment
    from kernels.tuning import TunedVariant, TuningTable, device_key, dtype_name, now_iso, shape_class, write_table
    from kernels.tuning import table_path as device_table_path

    device = torch.device(device)
    notes = [] if notes is None else notes
    interpret = kda._interpreting()
    if device.type != "cuda" and not interpret:
        raise RuntimeError("the study needs a CUDA GPU, or TRITON_INTERPRET=1 for a CPU smoke run")
    num_sms = kda.sm_count(device)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    rows: list[Row] = []

    def inputs(shape):
        """The shape's K/V bytes, buffer sets (seeded: the same on every call) and fp32 reference of set 0."""
        batch, _, num_kv_heads, seq_len = shape
        kv_bytes = 2 * batch * num_kv_heads * seq_len * head_dim * element_bytes
        num_sets = cold_l2_num_sets(kv_bytes)
        sets = _make_sets(shape, num_sets, head_dim=head_dim, dtype=dtype, device=device, seed=sum(shape))
        q, k, v, lens = sets[0]
        return kv_bytes, sets, kda.decode_attention_reference(q.float(), k, v, lens)

    def checked_ms(plan, sets, ref, extra: dict) -> float:
        """Check `plan` against the reference on set 0 (poisoned output; the error goes into `extra`), then time it
        over the rotated sets; raises when it is wrong."""
        q, k, v, lens = sets[0]
        out = torch.full_like(q, float("nan"))
        kda.decode_attention(q, k, v, lens, plan=plan, out=out)
        extra["rel_err"] = err = _rel_err(out, ref)
        if not err <= MAX_REL_ERR:
            raise AssertionError(f"relative error {err:.3g} > {MAX_REL_ERR}")
        return _median_ms(lambda i: kda.decode_attention(*sets[i], plan=plan), num_sets=len(sets), device=device,
                          repeat=repeat)

    def release() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for shape in shapes:
        batch, num_heads, num_kv_heads, seq_len = shape
        name = f"B{batch} Hq{num_heads} Hkv{num_kv_heads} S{seq_len}"
        cls = shape_class(batch * num_kv_heads, seq_len, head_dim, dtype_name(dtype))
        kv_bytes, sets, ref = inputs(shape)
        for variant in kda.variant_grid(batch, num_kv_heads, seq_len, head_dim, num_sms, element_bytes=element_bytes,
                                        interpret=interpret, shallow_tiles=shallow_tiles,
                                        shared_memory_bytes=kda.shared_memory_per_block(device)):
            plan, config = variant.plan, variant.config
            extra = {"shape": list(shape), "shape_class": cls, "variant": variant.name, "num_stages": config.num_stages,
                     "tile": config.block_n,
                     "prefetch": config.prefetch == "on", "prefetch_distance": config.prefetch_distance,
                     "ran": {"num_stages": plan.num_stages, "prefetch": plan.prefetch, "block_n": plan.block_n,
                             "num_splits": plan.num_splits}, "programs_per_sm": plan.programs_per_sm, "why": plan.why}
            try:
                ms = checked_ms(plan, sets, ref, extra)
                if sampler is not None and counters_ms > 0:
                    counter = itertools.count()
                    extra.update(counter_means(sampler, lambda: kda.decode_attention(
                        *sets[next(counter) % len(sets)], plan=plan), counters_ms, device))
            except Exception as exc:  # noqa: BLE001 - a variant that fails or is wrong is a result, not a crash
                extra["error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
                notes.append(f"{name} {variant.name}: {extra['error']}")
                ms = None
            rows.append(Row(case=f"{name} · {variant.name}", ms=ms, bytes_moved=kv_bytes, extra=extra))
        del sets, ref
        release()
    entries = {cls: TunedVariant(num_stages=row.extra["num_stages"], prefetch=row.extra["prefetch"],
                                 prefetch_distance=row.extra["prefetch_distance"], gb_s=row.gb_s,
                                 measured_shape=tuple(row.extra["shape"]))
               for cls, (row, _) in _pick_per_class(rows).items()}
    table = TuningTable(device=device_key(device), measured_at=now_iso(), entries=entries)
    if table_path is not None:
        path = write_table(table, device_table_path(device) if table_path == "device" else Path(table_path))
        notes.append(f"tuning table: {path} ({len(entries)} classes measured)")
    auto_rows = []
    for shape in shapes:  # auto, as the engine plans it from this table, on the same (re-made) inputs
        batch, num_heads, num_kv_heads, seq_len = shape
        kv_bytes, sets, ref = inputs(shape)
        k = sets[0][1]
        auto, = kda.plan_segments([KVSegment(k, k, 0)], num_sms=num_sms, interpret=interpret, tuning=table)
        extra = {"shape": list(shape), "variant": "auto", "why": auto.why,
                 "ran": {"num_stages": auto.num_stages, "prefetch": auto.prefetch, "block_n": auto.block_n,
                         "num_splits": auto.num_splits}}
        try:
            ms = checked_ms(auto, sets, ref, extra)
        except Exception as exc:  # noqa: BLE001 - recorded; the headline then leaves the shape out
            extra["error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            ms = None
        auto_rows.append(Row(case=f"B{batch} Hq{num_heads} Hkv{num_kv_heads} S{seq_len} · auto (tuned)", ms=ms,
                             bytes_moved=kv_bytes, extra=extra))
        del sets, ref
        release()
    return rows, table, auto_rows


UNDER_OCCUPIED_PROGRAMS_PER_SM = 1.0  # grids that leave SMs without a second program: where prefetch should pay


def shallow_gains(rows: Sequence[Row]) -> dict[tuple, tuple[float, Row, Row]]:
    """At pipeline depth 1 on the under-occupied shapes, per (shape, tile: None for the planned one): (prefetch off ms
    / the faster prefetch-on ms of the same tile, the off row, that on row)."""
    groups: dict[tuple, dict[bool, list[Row]]] = {}
    for row in rows:
        if row.ms is not None and row.extra.get("num_stages") == 1:
            key = (tuple(row.extra["shape"]), row.extra.get("tile"))
            groups.setdefault(key, {}).setdefault(bool(row.extra.get("prefetch")), []).append(row)
    gains = {}
    for key, by_prefetch in groups.items():
        offs, ons = by_prefetch.get(False, []), by_prefetch.get(True, [])
        if not offs or not ons or offs[0].extra.get("programs_per_sm", 0.0) >= UNDER_OCCUPIED_PROGRAMS_PER_SM:
            continue
        off, on = offs[0], min(ons, key=lambda r: r.ms)
        gains[key] = (off.ms / on.ms, off, on)
    return gains


def shallow_gain(rows: Sequence[Row], *, planned_tiles_only: bool = False) -> tuple[float, str] | None:
    """The largest of `shallow_gains` (only the planned tiles': `planned_tiles_only`): (gain, the shape, variant and
    programs per SM); None when no under-occupied shape was timed at depth 1."""
    gains = {k: g for k, g in shallow_gains(rows).items() if not (planned_tiles_only and k[1] is not None)}
    if not gains:
        return None
    (shape, _), (gain, off, on) = max(gains.items(), key=lambda kv: kv[1][0])
    return gain, (f"B{shape[0]} Hq{shape[1]} Hkv{shape[2]} S{shape[3]}, {on.extra['variant']} against "
                  f"{off.extra['variant']}, {off.extra['programs_per_sm']:.2f} programs/SM")


def auto_vs_best(rows: Sequence[Row], auto_rows: Sequence[Row]) -> tuple[float, str] | None:
    """(the fastest fixed variant's ms / auto's ms, the shape), for the shape where auto is furthest behind."""
    worst = None
    for auto in auto_rows:
        shape = auto.extra["shape"]
        fixed = [r.ms for r in rows if r.ms is not None and r.extra["shape"] == shape]
        if auto.ms is None or not fixed:
            continue
        ratio = min(fixed) / auto.ms
        if worst is None or ratio < worst[0]:
            worst = (ratio, "B{} Hq{} Hkv{} S{}".format(*shape))
    return worst


def counters_table(rows: Sequence[Row], auto_rows: Sequence[Row]) -> str:
    """Markdown: per variant, ms, GB/s, L2 hit % and long-scoreboard stalls side by side."""
    lines = ["| case | ms | GB/s | L2 hit % | long-scoreboard stalls | DRAM read % |", "|---|---|---|---|---|---|"]

    def fmt(value, spec):
        return "-" if value is None else spec.format(value)

    for row in [*rows, *auto_rows]:
        lines.append(f"| {row.case} | {fmt(row.ms, '{:.4f}')} | {fmt(row.gb_s, '{:.0f}')} | "
                     f"{fmt(row.extra.get('l2_hit_pct'), '{:.1f}')} | {fmt(row.extra.get('stall_long_scoreboard'), '{:.2f}')} | "
                     f"{fmt(row.extra.get('dram_pct'), '{:.1f}')} |")
    return "\n".join(lines)


def _sampler(interval_us: int, notes: list[str]):
    """The CUPTI PM sampler for the variants' counters, or None (the note says why)."""
    from engine.telemetry import CuptiPmSampler
    from engine.telemetry.pm_metrics import series_labels

    sampler = CuptiPmSampler(0, interval_us=interval_us, calibrate=False)
    probe = sampler.probe()
    if not probe.l2_available:
        notes.append(f"counters: none sampled ({probe.reason})")
        return None
    calibration = sampler.calibration()
    labels = series_labels(probe.choice, interval_us=interval_us, calibration=calibration)
    notes.append("counters: " + "; ".join(f"{track}: {label}" for track, label in labels.items()))
    for line in probe.choice.missing:
        notes.append(f"counters: {line}")
    return sampler


def run(args) -> SuiteResult:
    if not torch.cuda.is_available():
        raise SystemExit("decode_attention_study needs a CUDA GPU (tests smoke study() under the interpreter)")
    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    notes = ["times: median per call of calls queued back to back behind a GPU sleep (the GPU's time, no host "
             "launch), buffer sets rotated (cold K/V)",
             "GB/s: K and V bytes of the full lengths per call; variants checked against the fp32 reference first"]
    sampler = _sampler(args.interval_us, notes) if args.counters_ms > 0 else None
    rows, table, auto_rows = study(shapes, head_dim=args.head_dim, repeat=args.repeat,
                                   table_path=None if args.no_table else "device", notes=notes, sampler=sampler,
                                   counters_ms=args.counters_ms)
    for cls, tuned in sorted(table.entries.items()):
        notes.append(f"{cls}: {tuned.num_stages} stages, prefetch {'d%d' % tuned.prefetch_distance if tuned.prefetch else 'off'}"
                     f" ({tuned.gb_s:.0f} GB/s on {'x'.join(map(str, tuned.measured_shape))})")
    headlines = []
    gain = shallow_gain(rows)
    if gain is not None:
        headlines.append(Headline("prefetch_shallow_gain", gain[0],
                                  f"x (prefetch off ms / prefetch on ms at pipeline depth 1, same tile, under-occupied "
                                  f"grids (< {UNDER_OCCUPIED_PROGRAMS_PER_SM:g} program/SM), best shape: {gain[1]}; "
                                  "target >= 1.5)", "prefetch off, depth 1"))
        planned = shallow_gain(rows, planned_tiles_only=True)
        if planned is not None:
            notes.append(f"prefetch gain at depth 1 with the tiles the launcher plans (no fixed tile): "
                         f"{planned[0]:.2f}x at best ({planned[1]})")
        by_shape_and_tile = sorted(shallow_gains(rows).items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
        for (shape, tile), (g, off, on) in by_shape_and_tile:
            which = "planned tile" if tile is None else f"tile {tile}"
            notes.append("depth 1, B{} Hq{} Hkv{} S{}".format(*shape) + f", {which}: prefetch gains {g:.2f}x "
                         f"({off.ms * 1e3:.1f} -> {on.ms * 1e3:.1f} us, {on.extra['variant']})")
    else:
        notes.append("prefetch_shallow_gain not reported: no under-occupied shape was timed at depth 1")
    worst = auto_vs_best(rows, auto_rows)
    if worst is not None:
        headlines.append(Headline("decode_attn_auto_vs_best_variant", worst[0],
                                  f"x (fastest fixed variant ms / auto ms with this run's tuning table, worst shape: "
                                  f"{worst[1]}; 1.0 = auto is the fastest)", "fastest fixed variant"))
    details = {"table_device": table.device, "table": {k: vars(v) for k, v in table.entries.items()},
               "head_dim": args.head_dim, "dtype": str(DTYPE), "counters": sampler is not None}
    return SuiteResult(suite="decode_attention_study", rows=[*rows, *auto_rows], headlines=headlines, notes=notes,
                       details=details, tables=[counters_table(rows, auto_rows)])


if __name__ == "__main__":  # python -m bench.suites.decode_attention_study == python -m bench decode_attention_study
    import sys

    from bench.__main__ import main

    raise SystemExit(main(["decode_attention_study", *sys.argv[1:]]))
