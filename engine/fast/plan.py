"""Which GEMM each decode projection runs: the skinny Triton kernel or cuBLAS, measured per shape, cached per device.

The skinny kernel (kernels/skinny_gemm.py) should beat cuBLAS where cuBLAS leaves bandwidth unused (a lone 4096 x
4096 at 1.1-1.35 TB/s on an H200) and may lose elsewhere; only a measurement on the device decides. `measure_plan`
times both on cold weights (rotated past L2) inside a CUDA graph, as a decode step runs them, for each
(rows, out, in, gated) shape and a few launch shapes, and `gemm_plan` keeps the result as JSON keyed by the GPU,
torch and triton (like engine/offload/profiler.py's hardware profile). Shapes never measured use the paper choice:
the skinny kernel's default launch up to DEFAULT_SKINNY_ROWS rows, cuBLAS above.

    python -m engine.fast.plan --model synthetic:llama-2-7b --rows 1,8,64     # measures, prints, caches
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from engine.cache_files import cache_root, write_cache_file

PLAN_VERSION = 1  # a plan measured with fewer candidates stays valid: its winners are still measured winners
DEFAULT_SKINNY_ROWS = 16  # unmeasured shapes: skinny up to this many rows (bandwidth argument in the kernel's file)

Shape = tuple[int, int, int, bool]  # (rows, out_features, in_features, gated)


@dataclass(frozen=True)
class GemmChoice:
    """The measured winner of one shape. config None: cuBLAS. Times in µs per call inside a CUDA graph."""

    kernel: str  # "skinny" or "cublas"
    config: dict | None
    skinny_us: float | None
    cublas_us: float
    weight_bytes: int
    rel_err: float | None = None  # the skinny result against cuBLAS's on the same inputs (it loses above 1e-2)

    @property
    def best_us(self) -> float:
        return self.cublas_us if self.skinny_us is None else min(self.cublas_us, self.skinny_us)


@dataclass
class GemmPlan:
    device: str
    measured_at: str = ""
    choices: dict[str, GemmChoice] = field(default_factory=dict)
    version: int = PLAN_VERSION

    @staticmethod
    def key(rows: int, out_features: int, in_features: int, gated: bool) -> str:
        return f"{rows}x{out_features}x{in_features}{'-gated' if gated else ''}"

    def config(self, rows: int, out_features: int, in_features: int, *, gated: bool, device: torch.device):
        """-> a SkinnyConfig to run the skinny kernel with, or None for cuBLAS."""
        from kernels.skinny_gemm import MAX_ROWS, SkinnyConfig, default_config

        if rows > MAX_ROWS:
            return None
        choice = self.choices.get(self.key(rows, out_features, in_features, gated))
        if choice is not None:
            return SkinnyConfig(**choice.config) if choice.kernel == "skinny" else None
        if rows > DEFAULT_SKINNY_ROWS:
            return None
        return default_config(rows, out_features, in_features, gated=gated, device=device)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> GemmPlan:
        choices = {k: GemmChoice(**v) for k, v in data.get("choices", {}).items()}
        return cls(device=data["device"], measured_at=data.get("measured_at", ""), choices=choices,
                   version=data.get("version", 0))

    def rows(self) -> list[dict]:
        """One dict per measured shape, for tables: GB/s of each kernel on the weight bytes."""
        out = []
        for key, c in sorted(self.choices.items()):
            cublas = c.weight_bytes / (c.cublas_us * 1e-6) / 1e9
            skinny = c.weight_bytes / (c.skinny_us * 1e-6) / 1e9 if c.skinny_us else None
            out.append({"shape": key, "cublas_us": c.cublas_us, "cublas_gb_s": cublas, "skinny_us": c.skinny_us,
                        "skinny_gb_s": skinny, "winner": c.kernel, "config": c.config})
        return out


# -- measuring --------------------------------------------------------------------------------------------------
def candidate_configs(rows: int, out_features: int, in_features: int, *, gated: bool, device: torch.device):
    """The default launch shape and its neighbours: split-K halved, doubled, 2 and 4; twice the columns; a
    shallower pipeline. Which one wins differs per shape and device (the ramp and tail of a 10-50 µs launch), so
    the plan measures them all. On an H200 (2026-12-01) split-K 2 won the lone 4096 x 4096 by 0.8 %; a 6-deep
    pipeline, 8 warps and 256-long K tiles, also measured then, won no shape and are left out (each adds compiles
    to a model's first load)."""
    from kernels.skinny_gemm import default_config

    base = default_config(rows, out_features, in_features, gated=gated, device=device)
    k_tiles = -(-in_features // base.block_k)
    wide = dataclasses.replace(base, block_n=2 * base.block_n,
                               split_k=min(16, max(1, base.split_k * 2)) if base.split_k > 1 else 1)
    found = [base, dataclasses.replace(base, split_k=max(1, base.split_k // 2)),
             dataclasses.replace(base, split_k=min(16, base.split_k * 2)), wide,
             dataclasses.replace(base, num_stages=3)]
    found += [dataclasses.replace(base, split_k=split) for split in (2, 4) if split <= k_tiles // 4]
    unique = []
    for c in found:
        if c not in unique:
            unique.append(c)
    return unique


def _graph_us(calls, *, repeat: int = 5) -> float:
    """µs per call of `calls` (a list of thunks) captured back to back in one CUDA graph, median of replays."""
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls[0]()  # cuBLAS picks its workspace outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def measure_shape(rows: int, out_features: int, in_features: int, *, gated: bool, dtype: torch.dtype,
                  device: torch.device, calls: int = 24) -> GemmChoice:
    """Time cuBLAS (plus the gated activation kernel when gated) against the skinny kernel's candidates."""
    from kernels.gated_act import gated_act
    from kernels.skinny_gemm import skinny_gemm

    weight_rows = (2 if gated else 1) * out_features
    weight_bytes = weight_rows * in_features * torch.finfo(dtype).bits // 8
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    sets = max(2, min(16, -(-4 * l2 // weight_bytes) + 1))  # > 4x L2 between two uses of one weight
    weights = [torch.randn(weight_rows, in_features, device=device).to(dtype) for _ in range(sets)]
    x = torch.randn(rows, in_features, device=device).to(dtype)
    schedule = [weights[i % sets] for i in range(calls)]

    def cublas(w):
        y = torch.nn.functional.linear(x, w)
        return gated_act(y, act="silu") if gated else y

    cublas_us = _graph_us([lambda w=w: cublas(w) for w in schedule])
    want = cublas(weights[0]).float()
    best, best_us, worst_err = None, None, 0.0
    for config in candidate_configs(rows, out_features, in_features, gated=gated, device=device):
        try:
            got = skinny_gemm(x, weights[0], act="silu" if gated else "", config=config).float()
        except Exception as exc:  # noqa: BLE001 - a launch shape the device cannot run (shared memory) never wins
            if "OutOfResources" not in type(exc).__name__ and "out of resource" not in str(exc).lower():
                raise
            continue
        err = float((got - want).norm() / want.norm().clamp_min(1e-30))
        worst_err = max(worst_err, err)
        if not err <= 1e-2:  # a wrong result never wins (NaN fails too)
            continue
        us = _graph_us([lambda w=w, c=config: skinny_gemm(x, w, act="silu" if gated else "", config=c)
                        for w in schedule])
        if best_us is None or us < best_us:
            best, best_us = config, us
    del weights
    torch.cuda.empty_cache()
    kernel = "skinny" if best_us is not None and best_us < cublas_us else "cublas"
    return GemmChoice(kernel=kernel, config=best.as_dict() if kernel == "skinny" else None, skinny_us=best_us,
                      cublas_us=cublas_us, weight_bytes=weight_bytes, rel_err=worst_err)


def projection_shapes(spec) -> list[tuple[int, int, bool]]:
    """(out_features, in_features, gated) of a Llama-family layer's fused projections and the LM head."""
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    return [(qkv, spec.hidden_size, False), (spec.hidden_size, spec.num_heads * spec.head_dim, False),
            (spec.intermediate_size, spec.hidden_size, True), (spec.hidden_size, spec.intermediate_size, False),
            (spec.vocab_size, spec.hidden_size, False)]


FAST_FAMILIES = ("llama", "gemma", "phi3")  # ModelSpec.family values with a fast adapter (engine/fast/__init__.py)


def projection_us(spec, rows: int, device: torch.device | str, plan: GemmPlan | None = None
                  ) -> tuple[float, float] | None:
    """(one layer's projections, the LM head) in µs per call at `rows` sequences, as the fast adapter runs them: each
    shape's measured winner in the device's GEMM plan. None where the family has no fast adapter or any of its
    shapes was not measured (then no measurement says what the adapter's launches take)."""
    if spec.family not in FAST_FAMILIES:
        return None
    plan = plan if plan is not None else gemm_plan(device)
    times = []
    for out_features, in_features, gated in projection_shapes(spec):
        choice = plan.choices.get(GemmPlan.key(rows, out_features, in_features, gated))
        if choice is None:
            return None
        times.append(choice.best_us)
    return sum(times[:-1]), times[-1]


PROJECTION_NAMES = ("q/k/v", "output", "gate/up + activation", "down", "LM head")  # projection_shapes' order


def model_plan_rows(spec, plan: GemmPlan) -> list[dict]:
    """The plan's measured shapes of this model's projections, at every batch measured, in layer order: each row
    GemmPlan.rows()'s figures plus `rows` (the batch), `projection` (its name) and `weight_mb`."""
    from kernels.skinny_gemm import MAX_ROWS

    wanted = {GemmPlan.key(rows, n, k, g): (rows, i) for rows in range(1, MAX_ROWS + 1)
              for i, (n, k, g) in enumerate(projection_shapes(spec))}  # measure_plan skips rows past MAX_ROWS
    found = [(wanted[row["shape"]], row) for row in plan.rows() if row["shape"] in wanted]
    return [dict(row, rows=rows, projection=PROJECTION_NAMES[i],
                 weight_mb=plan.choices[row["shape"]].weight_bytes / 1e6)
            for (rows, i), row in sorted(found, key=lambda item: item[0])]


def measure_plan(shapes: list[tuple[int, int, int, bool]], *, dtype: torch.dtype, device: torch.device,
                 plan: GemmPlan | None = None) -> GemmPlan:
    """Measure `shapes` (rows, out, in, gated) not yet in `plan` (rows past the kernel's limit are cuBLAS'
    anyway and skipped)."""
    from kernels.skinny_gemm import MAX_ROWS

    plan = plan or GemmPlan(device=_identity(device))
    for rows, out_features, in_features, gated in shapes:
        key = GemmPlan.key(rows, out_features, in_features, gated)
        if rows > MAX_ROWS or key in plan.choices:
            continue
        plan.choices[key] = measure_shape(rows, out_features, in_features, gated=gated, dtype=dtype, device=device)
    plan.measured_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return plan


# -- the cache --------------------------------------------------------------------------------------------------
def _identity(device: torch.device) -> str:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{name}_torch-{torch.__version__}_triton-{triton.__version__}"


def cache_path(device: torch.device | str) -> Path:
    key = re.sub(r"[^A-Za-z0-9.]+", "-", _identity(torch.device(device))).strip("-")
    return cache_root() / "gemm" / f"{key}.json"


def gemm_plan(device: torch.device | str) -> GemmPlan:
    """The cached plan of `device` (an empty one, i.e. the paper defaults, where nothing was measured)."""
    device = torch.device(device)
    path = cache_path(device)
    if path.exists():
        try:
            plan = GemmPlan.from_dict(json.loads(path.read_text()))
            if plan.version == PLAN_VERSION:
                return plan
        except (ValueError, TypeError, KeyError):
            pass  # an unreadable or old entry counts as none
    return GemmPlan(device=_identity(device))


def save_plan(plan: GemmPlan, device: torch.device | str) -> Path | None:
    return write_cache_file(cache_path(device), plan.to_json())  # None: the plan holds for this process only


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-2-7b", help="whose projection shapes to measure")
    parser.add_argument("--rows", default="1,8,16", help="comma list of row counts (decode batch sizes)")
    parser.add_argument("--refresh", action="store_true", help="measure again what is cached")
    args = parser.parse_args(argv)
    from engine.loader import load_model

    device = torch.device("cuda")
    spec = load_model(args.model, device="cuda", dtype="bfloat16").spec
    plan = GemmPlan(device=_identity(device)) if args.refresh else gemm_plan(device)
    rows = [int(r) for r in args.rows.split(",")]
    shapes = [(r, n, k, g) for r in rows for n, k, g in projection_shapes(spec)]
    plan = measure_plan(shapes, dtype=torch.bfloat16, device=device, plan=plan)
    for r in plan.rows():
        print(r)
    print(f"cached in {save_plan(plan, device)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
