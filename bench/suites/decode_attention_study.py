"""Prefetch study, the kernel side: every pipeline depth x prefetch variant of the decode-attention kernel, per shape.

For each shape (B, Hq, Hkv, S) every variant of `kernels.decode_attention.variant_grid` (1, 2, 3 stages x prefetch
off / on 1 tile ahead / on 2 tiles ahead; splits and tiles as the launcher plans them) is checked against the fp32
reference on fresh random inputs (poisoned output), then timed: triton.testing.do_bench's median, with buffer sets
rotated so each call finds its K/V cold in L2 (as bench/suites/decode_attention.py does). GB/s counts the K/V bytes.
The fastest variant of each shape class (kernels/tuning.py) goes into this device's tuning table, which
`prefetch="auto"` and an unset num_stages follow from then on.

    python -m bench decode_attention_study [--shapes '1,32,8,32768;32,32,32,4096'] [--no-table]

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

from bench.report import Row, SuiteResult
from bench.timing import cold_l2_num_sets, median_ms

# (B, Hq, Hkv, S): the decode_attention bench's shapes and the under-occupied grids prefetch might still help
SHAPES = [(1, 32, 8, 32768), (1, 32, 32, 8192), (8, 32, 32, 16384), (32, 32, 32, 4096), (64, 32, 8, 4096),
          (128, 32, 8, 2048), (4, 40, 8, 8192), (1, 32, 8, 2048), (1, 8, 1, 4096), (2, 32, 8, 1024)]
HEAD_DIM = 128
DTYPE = torch.bfloat16
MAX_REL_ERR = 1e-2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", type=str, default=None, help="subset, e.g. '1,32,8,32768;32,32,32,4096'")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench's timed span per variant (ms)")
    parser.add_argument("--no-table", action="store_true", help="measure only; leave the device's tuning table alone")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _median_ms(fn: Callable[[int], object], *, num_sets: int, device: torch.device, rep_ms: float) -> float:
    """Median ms per call of fn(i), i cycling over the buffer sets; do_bench on the GPU (it also flushes L2 between
    calls), the host clock under the interpreter."""
    counter = itertools.count()

    def call() -> object:
        return fn(next(counter) % num_sets)

    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=max(5.0, rep_ms / 4), rep=rep_ms, return_mode="median"))
    return median_ms(call, warmup=1, repeat=3)


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
    """Per shape class, the variant with the smallest geometric-mean ratio to each shape's fastest variant."""
    by_shape: dict[tuple, list[Row]] = {}
    for row in rows:
        if row.ms is not None:
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
          device: torch.device | str = "cuda", rep_ms: float = 100.0,
          table_path: Path | Literal["device"] | None = "device", notes: list[str] | None = None):
    """Time every variant on every shape -> (rows, the tuning table of these measurements).

    Rows are bench.report.Row (ms per call, K/V bytes, GB/s; extra: shape, variant, asked and ran settings, the
    plan's why, relative error). The table (fastest variant per shape class) is also written, merged over what is
    there: to this device's table (`"device"`), to `table_path`, or nowhere (None)."""
    import kernels.decode_attention as kda
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
    for shape in shapes:
        batch, num_heads, num_kv_heads, seq_len = shape
        name = f"B{batch} Hq{num_heads} Hkv{num_kv_heads} S{seq_len}"
        kv_bytes = 2 * batch * num_kv_heads * seq_len * head_dim * element_bytes
        cls = shape_class(batch * num_kv_heads, seq_len, head_dim, dtype_name(dtype))
        num_sets = cold_l2_num_sets(kv_bytes)
        sets = _make_sets(shape, num_sets, head_dim=head_dim, dtype=dtype, device=device, seed=sum(shape))
        q, k, v, lens = sets[0]
        ref = kda.decode_attention_reference(q.float(), k, v, lens)
        for variant in kda.variant_grid(batch, num_kv_heads, seq_len, head_dim, num_sms, element_bytes=element_bytes,
                                        interpret=interpret):
            plan, config = variant.plan, variant.config
            extra = {"shape": list(shape), "shape_class": cls, "variant": variant.name, "num_stages": config.num_stages,
                     "prefetch": config.prefetch == "on", "prefetch_distance": config.prefetch_distance,
                     "ran": {"num_stages": plan.num_stages, "prefetch": plan.prefetch, "block_n": plan.block_n,
                             "num_splits": plan.num_splits}, "why": plan.why}
            try:
                out = torch.full_like(q, float("nan"))
                kda.decode_attention(q, k, v, lens, plan=plan, out=out)
                extra["rel_err"] = err = _rel_err(out, ref)
                if not err <= MAX_REL_ERR:
                    raise AssertionError(f"relative error {err:.3g} > {MAX_REL_ERR}")
                ms = _median_ms(lambda i: kda.decode_attention(*sets[i], plan=plan), num_sets=num_sets, device=device,
                                rep_ms=rep_ms)
            except Exception as exc:  # noqa: BLE001 - a variant that fails or is wrong is a result, not a crash
                extra["error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
                notes.append(f"{name} {variant.name}: {extra['error']}")
                ms = None
            rows.append(Row(case=f"{name} · {variant.name}", ms=ms, bytes_moved=kv_bytes, extra=extra))
        del sets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    entries = {cls: TunedVariant(num_stages=row.extra["num_stages"], prefetch=row.extra["prefetch"],
                                 prefetch_distance=row.extra["prefetch_distance"], gb_s=row.gb_s,
                                 measured_shape=tuple(row.extra["shape"]))
               for cls, (row, _) in _pick_per_class(rows).items()}
    table = TuningTable(device=device_key(device), measured_at=now_iso(), entries=entries)
    if table_path is not None:
        path = write_table(table, device_table_path(device) if table_path == "device" else Path(table_path))
        notes.append(f"tuning table: {path} ({len(entries)} classes measured)")
    return rows, table


def run(args) -> SuiteResult:
    if not torch.cuda.is_available():
        raise SystemExit("decode_attention_study needs a CUDA GPU (tests smoke study() under the interpreter)")
    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    notes = ["times: triton.testing.do_bench median per call, L2 flushed and buffer sets rotated (cold K/V)",
             "GB/s: K and V bytes of the full lengths per call; variants checked against the fp32 reference first"]
    rows, table = study(shapes, head_dim=args.head_dim, rep_ms=args.rep_ms,
                        table_path=None if args.no_table else "device", notes=notes)
    for cls, tuned in sorted(table.entries.items()):
        notes.append(f"{cls}: {tuned.num_stages} stages, prefetch {'d%d' % tuned.prefetch_distance if tuned.prefetch else 'off'}"
                     f" ({tuned.gb_s:.0f} GB/s on {'x'.join(map(str, tuned.measured_shape))})")
    details = {"table_device": table.device, "table": {k: vars(v) for k, v in table.entries.items()},
               "head_dim": args.head_dim, "dtype": str(DTYPE)}
    return SuiteResult(suite="decode_attention_study", rows=rows, notes=notes, details=details)


if __name__ == "__main__":  # python -m bench.suites.decode_attention_study == python -m bench decode_attention_study
    import sys

    from bench.__main__ import main

    raise SystemExit(main(["decode_attention_study", *sys.argv[1:]]))
