"""The decode-attention kernel's A/B view: one shape's pipeline-depth x prefetch variants side by side.

On a GPU each chosen variant (kernels/decode_plan.variant_grid: 1, 2, 3 stages x prefetch off / 1 / 2 tiles ahead),
`auto` (what the planner picks on this device, from its measured tuning table) and torch SDPA as the peer are checked
against the fp32 reference, timed (engine/gpu_timing.py: calls queued back to back, so the time is the GPU's and
not the host launcher's; K/V buffer sets rotated so every call reads cold from DRAM, as
bench/suites/decode_attention_study.py does: GB/s counts the K/V bytes) and, where CUPTI samples L2, run
again for `l2_ms` under PM sampling: the row's L2 hit % is the mean over that loop, of the counter and with the
calibration the Profile panel's label names. The seed paper (arXiv 2504.06319) judged prefetch by L2 hit rate; the
table puts it beside the time and GB/s, which decide.

On the CPU the timings need a GPU: the rows are the plans (what each variant launches on an H200-sized grid of 132
SMs) beside the H200 figures committed under bench/results/ for the same shape, where there are some.

    study = session.kernel_study()           # LabSession's accessor: this session's device and sampler
    result = study.run(StudyShape(batch=1, num_heads=32, num_kv_heads=8, seq_len=32768))
    result.table()                           # headers, rows
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from engine.errors import InvalidSettingsError
from kernels.config import MAX_HEAD_DIM, DecodeAttentionConfig
from kernels.decode_plan import LaunchPlan, device_refusal, variant_grid
from kernels.segments import KVSegment
from kernels.tuning import device_table

AUTO = "auto (this device's tuning table)"
PEER = "peer: torch SDPA"
VARIANT_NAMES: tuple[str, ...] = tuple(v.name for v in variant_grid(1, 8, 4096, 128, 132)) + (AUTO,)
ALL_ROWS: tuple[str, ...] = VARIANT_NAMES + (PEER,)
PLANNING_SMS = 132  # an H200's (and H100's) SMs: the grid CPU plans are made for
RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"
# Committed figures: the prefetch study first (GPU-clock times, L2 per variant since 2026-12-01 16:15 UTC), then the
# probe's kernel study (its times, by triton's do_bench, include the host's launch of each call).
COMMITTED = ("decode_attention_study.json", "cupti_live.json")
MAX_KV_BYTES = 8 << 30  # one shape's K and V; the rotated sets stay under 2x this
MAX_REL_ERR = 1e-2
COLUMNS = ("variant", "ms", "GB/s", "L2 hit %", "vs fastest", "plan", "source")


@dataclass(frozen=True)
class StudyShape:
    """One decode-attention call: B sequences of S keys, Hq query and Hkv KV heads of D dims, bf16."""

    batch: int = 1
    num_heads: int = 32
    num_kv_heads: int = 8
    seq_len: int = 32768
    head_dim: int = 128

    def __post_init__(self) -> None:
        for name in ("batch", "num_heads", "num_kv_heads", "seq_len", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidSettingsError(f"{name}={value!r}: the shape needs positive whole numbers.")
        if self.num_heads % self.num_kv_heads:
            raise InvalidSettingsError(f"{self.num_heads} query heads do not share {self.num_kv_heads} KV heads "
                                       "evenly: pick a KV head count that divides the query heads.")
        if self.head_dim > MAX_HEAD_DIM:
            raise InvalidSettingsError(f"head dim {self.head_dim}: the kernel runs head dims up to {MAX_HEAD_DIM}.")
        if self.kv_bytes > MAX_KV_BYTES:
            raise InvalidSettingsError(f"{self.label} holds {self.kv_bytes / 2**30:.1f} GiB of K/V; the study keeps "
                                       f"one shape under {MAX_KV_BYTES >> 30} GiB: fewer keys or sequences.")

    @property
    def kv_bytes(self) -> int:
        return 2 * self.batch * self.num_kv_heads * self.seq_len * self.head_dim * 2  # K and V, bf16

    @property
    def key(self) -> tuple[int, int, int, int]:
        """(B, Hq, Hkv, S), as the study bench names shapes."""
        return (self.batch, self.num_heads, self.num_kv_heads, self.seq_len)

    @property
    def label(self) -> str:
        return f"B{self.batch} Hq{self.num_heads} Hkv{self.num_kv_heads} S{self.seq_len} D{self.head_dim}"


@dataclass(frozen=True)
class VariantRow:
    """One variant of the shape: what it launches, and what it measured (None where it was not measured)."""

    name: str
    plan: str  # splits, tile, stages, prefetch: what the variant launches
    ms: float | None = None
    gb_s: float | None = None
    l2_hit_pct: float | None = None
    rel_err: float | None = None
    error: str | None = None
    source: str = "planned"  # "measured here", "committed: <device>, <date>", or "planned"


@dataclass(frozen=True)
class StudyResult:
    shape: StudyShape
    device: str
    measured: bool  # timed on this session's GPU
    rows: tuple[VariantRow, ...]
    note: str  # how the figures were made, or why there are none
    l2_label: str = ""  # what the L2 column is (counter, partition caveat, calibration)

    @property
    def fastest(self) -> VariantRow | None:
        timed = [r for r in self.rows if r.ms is not None and r.name != PEER]
        return min(timed, key=lambda r: r.ms) if timed else None

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """(headers, rows) for a table: ms, GB/s and L2 % side by side, and each time over the fastest variant's."""
        best = self.fastest
        rows = []
        for r in self.rows:
            ratio = r.ms / best.ms if best is not None and r.ms is not None else None
            rows.append([r.name, _round(r.ms, 4), _round(r.gb_s, 0), _round(r.l2_hit_pct, 1), _round(ratio, 3),
                         r.plan if r.error is None else f"{r.plan}; failed: {r.error}", r.source])
        return list(COLUMNS), rows

    def as_dict(self) -> dict[str, Any]:
        return {"shape": asdict(self.shape), "device": self.device, "measured": self.measured, "note": self.note,
                "l2_label": self.l2_label, "fastest": self.fastest.name if self.fastest else None,
                "rows": [asdict(r) for r in self.rows]}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def plan_line(plan: LaunchPlan) -> str:
    prefetch = f"prefetch d{plan.prefetch_distance}" if plan.prefetch else "prefetch off"
    return (f"{plan.num_splits} splits x {plan.tiles_per_split} tiles of {plan.block_n} keys, {plan.num_stages} "
            f"stage{'s' if plan.num_stages != 1 else ''}, {prefetch}")


def pick(variants: Sequence[str] | None) -> tuple[str, ...]:
    """The asked rows in the table's order (None or empty: all); unknown names are refused, naming the known ones."""
    if not variants:
        return ALL_ROWS
    unknown = [v for v in variants if v not in ALL_ROWS]
    if unknown:
        raise InvalidSettingsError(f"Unknown variant(s) {', '.join(map(repr, unknown))}: pick from "
                                   f"{', '.join(ALL_ROWS)}.")
    return tuple(v for v in ALL_ROWS if v in variants)


def committed_rows(shape: StudyShape, *,
                   results_dir: Path = RESULTS_DIR) -> tuple[dict[str, VariantRow], list[str], str]:
    """{variant: row} of the committed GPU figures of `shape`, the notes saying where they come from (or which
    shapes were measured, when this one was not), and what their L2 column is ("" when they have none)."""
    found: dict[str, VariantRow] = {}
    notes: list[str] = []
    l2_label = ""
    for name in COMMITTED:
        path = results_dir / name
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        source = f"committed: {doc.get('device', '?')}, {doc.get('date', '?')}"
        if name == "cupti_live.json":
            study = doc.get("details", {}).get("kernel_study") or {}
            try:
                measured = StudyShape(**study["shape"])
            except (KeyError, TypeError, InvalidSettingsError):
                continue
            if measured == shape:
                # its times (triton's do_bench) include the host's launch of each call: only its L2 figures stand
                for r in study.get("rows", []):
                    _fill(found, r["name"], VariantRow(**{**r, "ms": None, "gb_s": None,
                                                          "source": f"{source} (L2 only)"}))
                l2_label = l2_label or study.get("l2_label", "")
            shapes = [measured.label]
        else:
            head_dim = doc.get("details", {}).get("head_dim", 128)
            shapes = sorted({tuple(r["extra"]["shape"]) for r in doc.get("rows", []) if "shape" in r.get("extra", {})})
            shapes = [f"B{b} Hq{h} Hkv{k} S{s} D{head_dim}" for b, h, k, s in shapes]
            for r in doc.get("rows", []):
                extra = r.get("extra", {})
                if tuple(extra.get("shape", ())) != shape.key or head_dim != shape.head_dim:
                    continue
                ran = extra.get("ran", {})
                plan = (f"{ran.get('num_splits', '?')} splits, tiles of {ran.get('block_n', '?')} keys, "
                        f"{ran.get('num_stages', '?')} stages, prefetch {'on' if ran.get('prefetch') else 'off'}")
                name = AUTO if extra.get("variant") == "auto" else extra.get("variant", r.get("case", "?"))
                _fill(found, name, VariantRow(
                    name=name, plan=plan, ms=r.get("ms"), gb_s=r.get("gb_s"),
                    l2_hit_pct=extra.get("l2_hit_pct"), rel_err=extra.get("rel_err"), error=extra.get("error"),
                    source=source))
                if extra.get("l2_hit_pct") is not None and not l2_label:  # the study sampled counters per variant
                    l2_label = next((n.removeprefix("counters: ") for n in doc.get("notes", [])
                                     if n.startswith("counters: L2")), "")
        if shapes:
            notes.append(f"{name} ({source.removeprefix('committed: ')}) measured {', '.join(shapes)}")
    return found, notes, l2_label


def _fill(found: dict[str, VariantRow], name: str, row: VariantRow) -> None:
    """Keep the first committed row of a variant; a later one only adds the L2 figure the first lacks."""
    first = found.get(name)
    if first is None:
        found[name] = row
    elif first.l2_hit_pct is None and row.l2_hit_pct is not None:
        found[name] = replace(first, l2_hit_pct=row.l2_hit_pct, source=f"{first.source}; L2 {row.source}")


def auto_why(plan: LaunchPlan) -> str:
    """How `auto` decided (tuned, or the rule), from the plan's why."""
    return plan.why.split("): ", 1)[-1].split(";")[0]


class KernelStudy:
    """The variants of one shape on `device`. `cupti`: the session's PM sampler (L2 per variant where it samples L2);
    `device_job`: a context manager holding the session's device while the study runs."""

    def __init__(self, device: torch.device | str, *, cupti: Any = None,
                 device_job: Callable[[], AbstractContextManager] | None = None,
                 results_dir: Path = RESULTS_DIR) -> None:
        self.device = torch.device(device)
        self.cupti = cupti
        self._device_job = device_job or nullcontext
        self.results_dir = results_dir

    # ---- plans (pure Python, any device) --------------------------------------------------------------

    def plans(self, shape: StudyShape, *, num_sms: int | None = None) -> dict[str, LaunchPlan]:
        """{row name: the plan it launches} for every variant and `auto`, on this device's grid (PLANNING_SMS on the
        CPU), prefetch as the GPU would run it. `auto` reads this device's tuning table as the engine does."""
        import kernels.decode_attention as kda

        if num_sms is None:
            num_sms = kda.sm_count(self.device) if self.device.type == "cuda" else PLANNING_SMS
        # what one program may take here (less than Hopper's on an A100 or an L4): plans that launch on this GPU
        smem = kda.shared_memory_per_block(self.device)
        plans = {v.name: v.plan for v in variant_grid(shape.batch, shape.num_kv_heads, shape.seq_len, shape.head_dim,
                                                      num_sms, shared_memory_bytes=smem)}
        # Shapes only: meta tensors of the cache's layout stand in for K and V.
        k = torch.empty((shape.batch, shape.num_kv_heads, shape.seq_len, shape.head_dim), dtype=torch.bfloat16,
                        device="meta")
        auto, = kda.plan_segments([KVSegment(k, k, 0)], config=DecodeAttentionConfig(), num_sms=num_sms,
                                  interpret=False, tuning=device_table(self.device), shared_memory_bytes=smem)
        plans[AUTO] = auto
        if (refusal := device_refusal(self.device)) is not None:
            # the kernel drops a prefetch this GPU cannot issue: say so in the rows that asked for one
            plans = {name: replace(plan, prefetch=False, why=f"{plan.why}; {refusal}: runs without it")
                     if plan.prefetch else plan for name, plan in plans.items()}
        return plans

    # ---- the study ------------------------------------------------------------------------------------

    def run(self, shape: StudyShape, variants: Sequence[str] | None = None, *, sample_l2: bool = True,
            rep_ms: float = 50.0, l2_ms: float = 150.0) -> StudyResult:
        """Time (and sample L2 over) the chosen rows on the GPU; on the CPU, the plans and the committed figures."""
        names = pick(variants)
        if self.device.type != "cuda":
            return self.offline(shape, names)
        with self._device_job():
            return self._measure(shape, names, sample_l2=sample_l2, rep_ms=rep_ms, l2_ms=l2_ms)

    def offline(self, shape: StudyShape, names: Sequence[str] = ALL_ROWS) -> StudyResult:
        plans = self.plans(shape)
        committed, notes, committed_l2 = committed_rows(shape, results_dir=self.results_dir)
        rows = []
        for name in names:
            plan = plan_line(plans[name]) if name in plans else "cuDNN / flash, as torch picks"
            if name == AUTO:
                plan = f"{plan} ({auto_why(plans[name])})"
            row = committed.get(name)
            rows.append(replace(row, plan=row.plan or plan) if row is not None else VariantRow(name=name, plan=plan))
        where = "; ".join(notes) if notes else "no GPU figures are committed under bench/results/ yet"
        hit = any(r.source.startswith("committed") for r in rows)
        note = (f"No GPU here: timings need one. Plans are for a {PLANNING_SMS}-SM grid; "
                + (f"figures from {where}." if hit else f"this shape has no committed figures ({where})."))
        return StudyResult(shape=shape, device=str(self.device), measured=False, rows=tuple(rows), note=note,
                           l2_label=committed_l2 or "L2 hit % needs CUPTI on a GPU (none committed for this shape)")

    def _measure(self, shape: StudyShape, names: Sequence[str], *, sample_l2: bool, rep_ms: float,
                 l2_ms: float) -> StudyResult:
        import kernels.decode_attention as kda
        from engine.gpu_timing import queued_median_ms

        device = self.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        plans = self.plans(shape, num_sms=kda.sm_count(device))
        l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
        num_sets = max(2, min(-(-4 * l2_bytes // shape.kv_bytes) + 1, max(1, MAX_KV_BYTES // shape.kv_bytes)))
        gen = torch.Generator(device=device).manual_seed(sum(shape.key))
        sets = []
        for _ in range(num_sets):
            q = torch.randn(shape.batch, shape.num_heads, shape.head_dim, device=device, generator=gen).bfloat16()
            k, v = (torch.randn(shape.batch, shape.num_kv_heads, shape.seq_len, shape.head_dim, device=device,
                                generator=gen).bfloat16() for _ in range(2))
            sets.append((q, k, v, torch.full((shape.batch,), shape.seq_len, dtype=torch.int32, device=device)))
        q, k, v, lens = sets[0]
        ref = kda.decode_attention_reference(q.float(), k, v, lens)
        sampler, l2_label, notes = self._l2_sampler(sample_l2)
        rows = []
        for name in names:
            call = self._call(kda, name, plans.get(name))
            plan = plan_line(plans[name]) if name in plans else "torch scaled_dot_product_attention (GQA), its pick"
            if name == AUTO:
                plan = f"{plan} ({auto_why(plans[name])})"
            try:
                out = call(q, k, v, lens).float()
                err = ((out - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
                if not err <= MAX_REL_ERR:
                    raise AssertionError(f"relative error {err:.3g} > {MAX_REL_ERR}")
                counter = iter(range(1 << 62))
                step = lambda: call(*sets[next(counter) % num_sets])  # noqa: E731
                # samples of >= 2 ms each: rep_ms of them in all
                ms = queued_median_ms(lambda i: call(*sets[i]), num_sets=num_sets, repeat=max(5, round(rep_ms / 2)))
                l2 = counter_means(sampler, step, l2_ms, device).get("l2_hit_pct") if sampler is not None else None
                rows.append(VariantRow(name=name, plan=plan, ms=ms, gb_s=shape.kv_bytes / (ms * 1e-3) / 1e9,
                                       l2_hit_pct=l2, rel_err=err, source="measured here"))
            except Exception as exc:  # noqa: BLE001 - a variant that fails is a row saying so
                rows.append(VariantRow(name=name, plan=plan, error=f"{type(exc).__name__}: {str(exc)[:200]}",
                                       source="measured here"))
        sets.clear()
        torch.cuda.empty_cache()
        note = (f"{torch.cuda.get_device_name(device)}: median over ~{rep_ms:g} ms of calls queued back to back per "
                f"row (GPU time, no host launch), {num_sets} K/V sets rotated (cold L2); GB/s = K+V bytes / time; "
                "checked against the fp32 reference first"
                + (f"; {'; '.join(notes)}" if notes else ""))
        return StudyResult(shape=shape, device=torch.cuda.get_device_name(device), measured=True, rows=tuple(rows),
                           note=note, l2_label=l2_label)

    @staticmethod
    def _call(kda: Any, name: str, plan: LaunchPlan | None) -> Callable:
        if name == PEER:
            import torch.nn.functional as F

            def sdpa(q, k, v, lens):
                return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)
            return sdpa
        return lambda q, k, v, lens: kda.decode_attention(q, k, v, lens, plan=plan)

    def _l2_sampler(self, sample_l2: bool) -> tuple[Any, str, list[str]]:
        """(the sampler to use or None, what the L2 column is, notes)."""
        from engine.telemetry.pm_metrics import COUNTER_L2, series_labels

        if not sample_l2:
            return None, "L2 not sampled (asked)", []
        sampler = self.cupti
        if sampler is None:
            return None, "no CUPTI sampler on this device", []
        probe = sampler.probe()
        if not probe.l2_available:
            return None, f"L2 not sampled: {probe.reason}", []
        calibration = sampler.calibration()
        labels = series_labels(probe.choice, interval_us=sampler.interval_us, calibration=calibration)
        notes = [] if calibration is not None else [sampler.calibration_note]
        return sampler, f"mean over each row's {probe.choice.l2_metric} samples: {labels.get(COUNTER_L2, '')}", notes


def counter_means(sampler: Any, step: Callable[[], object], span_ms: float, device: torch.device) -> dict[str, float]:
    """Run `step` back to back for `span_ms` under the sampler's PM sampling -> the mean of each sampled figure:
    "l2_hit_pct" (the chosen L2 counter) and, where the chip's set has them, "stall_long_scoreboard" and "dram_pct"
    (by engine/telemetry/pm_metrics.py's roles). The first and last samples straddle the loop's edges: dropped."""
    from engine.telemetry.pm_metrics import DRAM_PCT, STALL

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def loop() -> None:
        sync()
        t_end = time.perf_counter() + span_ms / 1e3
        while time.perf_counter() < t_end:
            for _ in range(16):
                step()
            sync()

    samples = sampler.sample_during(loop)
    samples = samples[1:-1] if len(samples) >= 5 else samples
    choice = sampler.probe().choice
    roles = choice.roles if choice is not None else {}
    series = {"l2_hit_pct": [s.l2_hit_pct for s in samples if s.l2_hit_pct is not None]}
    for role in (STALL, DRAM_PCT):
        if role in roles:
            series[role] = [s.values[roles[role]] for s in samples
                            if roles[role] in s.values and math.isfinite(s.values[roles[role]])]
    return {name: statistics.fmean(values) for name, values in series.items() if values}


__all__ = ["ALL_ROWS", "AUTO", "COLUMNS", "PEER", "VARIANT_NAMES", "KernelStudy", "StudyResult", "StudyShape",
           "VariantRow", "auto_why", "committed_rows", "counter_means", "pick", "plan_line"]
