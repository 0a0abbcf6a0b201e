"""Tensor parallel over the GPUs of one host: 70B decode with the K/V on the GPUs and offloaded, per rank and in all.

Launch on every rank (one process per GPU):

    torchrun --nproc-per-node 2 -m bench tp        # writes bench/results/tp2.{json,md}, tp2_decode_pct_roofline
    torchrun --nproc-per-node 4 -m bench tp        # tp4.*, tp4_vs_tp2_offload_speedup (reads tp2.json)

Cases: synthetic:llama-3-70b and synthetic:llama-2-70b (bf16, each rank materialises only its part), batch 16,
prompts of 4096 (Llama 3) and 2048 (Llama 2) tokens, 32 new tokens; placements gpu (K/V in HBM), cpu auto (all K/V
in each rank's pinned host memory, the scheduler's split), cpu split 0 (all K/V copied) and hybrid auto. Step time
is the median decode step after two warm-up steps, median over --repeat runs, as rank 0 times it (every rank's own
median is in the details). Per rank: the bytes its plan moves host-to-device per step and the bandwidth that makes;
in all: the ranks' bytes over the step time against the sum of the ranks' measured H2D bandwidths (each rank
measures its own link at start, all ranks at once). The roofline of a GPU-resident step is the slowest rank's bytes
to read (its weights but the embedding table, its K/V heads at the step's mean length) over the read bandwidth
measured on rank 0 (bench/timing.py triton_read_gb_s).

Summary keys: tp2_decode_pct_roofline (llama-3-70b, gpu, 2 ranks), tp_offload_pct_aggregate_pcie (llama-3-70b,
cpu auto, this world size), tp4_vs_tp2_offload_speedup (llama-3-70b cpu auto step time at 2 ranks / at 4, on the
4-rank run when tp2.json is there). `--quick` runs synthetic:tiny-llama-tp on small shapes (a CPU smoke run with
gloo; its figures go to tp<N>_quick.* and never to summary.json).
"""

from __future__ import annotations

import gc
import json
import statistics
from dataclasses import dataclass

import torch

from bench.report import Headline, Row, SuiteResult
from bench.timing import triton_read_gb_s
from engine.errors import KVLabError
from engine.parallel import launch_engine
from engine.parallel.driver import RankFacts, TensorParallelEngine
from engine.settings import GenerationSettings, OffloadSettings

PLACEMENTS = {
    "gpu": OffloadSettings(),
    "cpu auto": OffloadSettings(placement="cpu"),
    "cpu split 0": OffloadSettings(placement="cpu", split=0.0),
    "hybrid auto": OffloadSettings(placement="hybrid"),
}
HEADLINE_MODEL = "synthetic:llama-3-70b"


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    prompt_tokens: int
    new_tokens: int

    @property
    def label(self) -> str:
        return f"{self.model.removeprefix('synthetic:')} B{self.batch} P{self.prompt_tokens} N{self.new_tokens}"


FULL_CASES = (Case(HEADLINE_MODEL, 16, 4096, 32), Case("synthetic:llama-2-70b", 16, 2048, 32))
QUICK_CASES = (Case("synthetic:tiny-llama-tp", 2, 48, 8),)


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny-llama-tp, small shapes: a smoke run (CPU, gloo)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per case (median of their medians)")
    parser.add_argument("--placements", default=",".join(PLACEMENTS), help=f"comma list of {', '.join(PLACEMENTS)}")
    parser.add_argument("--no-cuda-graph", action="store_true", help="eager decode steps (CUDA graphs off)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="a collective waiting longer raises")


def run(args) -> SuiteResult | None:
    from engine.parallel.group import LaunchSettings

    placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    unknown = [p for p in placements if p not in PLACEMENTS]
    if unknown:
        raise SystemExit(f"unknown --placements {unknown}; choose from {list(PLACEMENTS)}")
    cases = QUICK_CASES if args.quick else FULL_CASES
    try:
        launch = LaunchSettings.from_env(timeout_s=args.timeout_s)
    except KVLabError as exc:  # not under torchrun
        raise SystemExit(f"python -m bench tp runs on every rank: {exc}") from None
    world = launch.world_size
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    rows, notes, details = [], [], {"world_size": world, "cases": {}}
    group = None
    for case in cases:
        engine = launch_engine(case.model, launch=launch if group is None else None, group=group, dtype=dtype)
        group = engine.group
        engine.owns_group = False  # one group for every case; left at the end
        if engine.rank != 0:
            engine.follow()
            continue
        read_gb_s = triton_read_gb_s()
        details["read_gb_s"] = read_gb_s
        for placement in placements:
            try:
                measured = _measure(engine, case, PLACEMENTS[placement], repeat=args.repeat,
                                    cuda_graph=not args.no_cuda_graph)
            except KVLabError as exc:  # a placement that does not fit this host is reported, the rest still run
                notes.append(f"{case.label} {placement}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            row, facts = _row(engine, case, placement, measured, read_gb_s=read_gb_s)
            rows.append(row)
            details["cases"][f"{case.label} {placement}"] = facts
        engine.close()
        gc.collect()
    if group is None or group.rank != 0:
        if group is not None:
            group.close()
        return None  # rank 0 writes the results
    group.close()
    headlines = _headlines(rows, world=world, quick=args.quick, results_dir=args.results_dir)
    suite = f"tp{world}" + ("_quick" if args.quick else "")
    notes.insert(0, f"{world} ranks, {dtype}; per-rank links measured at start; read bandwidth "
                    f"{details['read_gb_s']:.0f} GB/s (rank 0)")
    if args.quick:
        details["quick_headlines"] = {h.key: h.value for h in headlines}
        notes.append("quick run (tiny shapes): headlines not recorded: " +
                     "; ".join(f"{h.key}={h.value:.4g}" for h in headlines))
        headlines = []
    return SuiteResult(suite=suite, rows=rows, headlines=headlines, notes=notes, details=details)


def _measure(engine: TensorParallelEngine, case: Case, offload: OffloadSettings, *, repeat: int,
             cuda_graph: bool) -> dict:
    gen = torch.Generator().manual_seed(1)
    vocab = engine.model.spec.vocab_size
    prompts = torch.randint(3, vocab, (case.batch, case.prompt_tokens), generator=gen).tolist()
    settings = GenerationSettings(max_new_tokens=case.new_tokens, ignore_eos=True, cuda_graph=cuda_graph,
                                  offload=offload)
    medians, per_rank = [], []
    for _ in range(repeat):
        result = engine.generate(prompts, settings)
        medians.append(statistics.median(_steady(result.step_ms)))
        per_rank.append(engine.rank_facts)
    return {"ms": statistics.median(medians), "run_medians_ms": medians, "facts": per_rank[-1]}


def _steady(values):
    return values[2:] or values  # the first steps still warm the allocator and the links


def _row(engine: TensorParallelEngine, case: Case, placement: str, m: dict, *, read_gb_s: float):
    facts: list[RankFacts] = m["facts"]
    ms = m["ms"]
    h2d = [int(statistics.median(_steady(f.h2d_bytes))) if f.h2d_bytes else 0 for f in facts]
    per_rank_gb_s = [b / (ms * 1e-3) / 1e9 for b in h2d]
    links = [f.peak_h2d_gb_s or 0.0 for f in facts]
    aggregate = sum(h2d) / (ms * 1e-3) / 1e9
    mean_len = case.prompt_tokens + case.new_tokens / 2
    read_bytes = [_step_read_bytes(engine, f, batch=case.batch, mean_len=mean_len) for f in facts]
    roofline_ms = max(read_bytes) / (read_gb_s * 1e9) * 1e3
    offloaded = placement != "gpu"
    extra = {
        "per_rank_h2d_bytes": h2d, "per_rank_h2d_gb_s": per_rank_gb_s, "per_rank_link_gb_s": links,
        "aggregate_h2d_gb_s": aggregate, "sum_link_gb_s": sum(links),
        "pct_aggregate_pcie": 100 * aggregate / sum(links) if offloaded and sum(links) else None,
        "per_rank_step_ms": [statistics.median(_steady(f.step_ms)) for f in facts],
        "per_rank_predicted_ms": [statistics.median(_steady(f.predicted_ms)) if f.predicted_ms else None
                                  for f in facts],
        "per_rank_kv_bytes_per_token": [f.kv_bytes_per_token for f in facts],
        "act_bytes_per_token": facts[0].act_bytes_per_token,
        "collective_bytes_per_step": [f.collective_bytes // max(1, len(f.step_ms) + 1) for f in facts],
        "roofline_ms": roofline_ms, "run_medians_ms": m["run_medians_ms"],
    }
    pct = 100 * roofline_ms / ms if not offloaded else extra["pct_aggregate_pcie"]
    row = Row(case=f"{case.label} {placement} TP{len(facts)}", ms=ms, tok_s=case.batch / (ms * 1e-3),
              bytes_moved=sum(h2d) if offloaded else max(read_bytes), pct_roofline=pct,
              peer="sum of ranks' H2D links" if offloaded else "per-GPU read roofline",
              peer_ms=(sum(h2d) / (sum(links) * 1e9) * 1e3 if offloaded and sum(links) else roofline_ms), extra=extra)
    return row, {k: v for k, v in extra.items()} | {"ms": ms}


def _step_read_bytes(engine: TensorParallelEngine, facts: RankFacts, *, batch: int, mean_len: float) -> int:
    """Bytes one rank reads per GPU-resident decode step: its weights but the embedding table (B rows of it are
    gathered; a tied LM head reads its vocabulary rows of the table), and its K/V heads at the mean length."""
    hf = engine.model.hf_model
    embed = hf.get_input_embeddings().weight
    table = embed.numel() * embed.element_size()
    head = hf.lm_head
    tied = getattr(head, "rows", None) is None
    head_bytes = head.chunk * embed.shape[1] * embed.element_size() if tied else 0
    return int(facts.weight_bytes - table + head_bytes + batch * mean_len * facts.kv_bytes_per_token)


def _headlines(rows: list[Row], *, world: int, quick: bool, results_dir) -> list[Headline]:
    out = []
    model = (QUICK_CASES if quick else FULL_CASES)[0].label

    def find(placement: str) -> Row | None:
        return next((r for r in rows if r.case == f"{model} {placement} TP{world}"), None)

    resident, offload = find("gpu"), find("cpu auto")
    if resident is not None and world == 2:
        out.append(Headline("tp2_decode_pct_roofline", resident.pct_roofline,
                            f"% of the per-GPU read roofline ({model}, K/V on the GPUs, 2 ranks; {resident.ms:.2f} "
                            "ms/step)", peer="slowest rank's weight + K/V bytes / measured read bandwidth",
                            peer_value=resident.extra["roofline_ms"]))
    if offload is not None and offload.pct_roofline is not None:
        out.append(Headline("tp_offload_pct_aggregate_pcie", offload.pct_roofline,
                            f"% of the sum of the {world} ranks' measured H2D bandwidths ({model}, all K/V in host "
                            f"memory, auto split; {offload.extra['aggregate_h2d_gb_s']:.1f} GB/s in all)",
                            peer="sum of ranks' measured H2D links", peer_value=offload.extra["sum_link_gb_s"]))
    if offload is not None and world == 4:
        tp2 = _tp2_row(results_dir / ("tp2_quick.json" if quick else "tp2.json"), f"{model} cpu auto TP2")
        if tp2 is not None:
            out.append(Headline("tp4_vs_tp2_offload_speedup", tp2["ms"] / offload.ms,
                                f"x ({model}, all K/V in host memory, auto split: step time at 2 ranks / at 4)",
                                peer="the 2-rank run (tp2.json)", peer_value=tp2["ms"]))
    return out


def _tp2_row(path, case: str) -> dict | None:
    if not path.exists():
        return None
    rows = json.loads(path.read_text())["rows"]
    return next((r for r in rows if r["case"] == case), None)


__all__ = ["Case", "FULL_CASES", "PLACEMENTS", "QUICK_CASES", "add_arguments", "run"]
