"""Decode with the KV cache on the GPU, in roofline units: the engine (default, and with the fast adapter) against
transformers `generate` (static and dynamic cache) on the four target shapes, plus GPU exactness checks.

Cases (default): synthetic:llama-2-7b B8 P2048, B1 P2048 (ms/step = ms/token), B64 P512; synthetic:llama-3-8b B8
P8192; bf16, 64 new tokens. `--model/--batch/--prompt-len` run one case instead. Decode step time is taken the same
way for every contender: the median interval between a run's own decode steps (after the first two), median over
repeats, so neither prefill nor a run's one CUDA-graph capture counts. The engine reports its steps; transformers'
are timestamped by a pass-through logits processor, called once per token. (time to generate N tokens - time to
generate 2) / (N - 2) is kept beside it, with the setup a run pays once; it was the row's figure until 2026-12-01
22:30 UTC, and its samples carry the capture's run-to-run variation. The scheduler's cost model
predicts each case's GPU-resident step from the device's hardware profile; the error is reported per case. The
roofline of a step is the bytes it must read (every weight but the embedding table, plus each sequence's K/V at the
step's mean length) over the device's read bandwidth, measured in the same run: the faster of a Triton streaming
read swept over grid, block and warps (kernels/stream_read.py; swept again after the cases, the faster sweep
kept) and a torch bf16 sum; the device-to-device copy is printed beside it. If any row reads faster than that, the
ceiling is raised to it and a note says so: no figure exceeds 100 %.

Before the fast adapter runs, the GEMM plan (engine/fast/plan.py) is measured for the cases' shapes where the
device's cache lacks them: cuBLAS against the skinny kernel per projection and batch, in a CUDA graph on cold
weights; the table goes into the results. A per-step breakdown (bench/profile_decode.py) of the first case, plain
and fused, says where the time goes.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass

import torch

from bench.report import Headline, Row, SuiteResult, write_partial
from bench.timing import device_copy_gb_s, read_sweep_note, streaming_read_gb_s, triton_read_gb_s
from engine import PRESETS, GenerationSettings, Generator, load_model
from engine.errors import CompileError
from engine.hf_reference import hf_greedy, rel_err
from engine.offload.placement import measured_projections


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    prompt_len: int

    @property
    def label(self) -> str:
        return f"{self.model.removeprefix('synthetic:')} B{self.batch} P{self.prompt_len}"


TARGETS = (Case("synthetic:llama-2-7b", 8, 2048), Case("synthetic:llama-2-7b", 1, 2048),
           Case("synthetic:llama-2-7b", 64, 512), Case("synthetic:llama-3-8b", 8, 8192))
# variant -> GenerationSettings fields. "auto" is the default: the fast adapter on a GPU (fused="auto"), the plain
# one on the CPU; "plain" the plain adapter everywhere; "fused" the fast adapter everywhere.
VARIANTS = {
    "auto": {}, "plain": dict(fused=False), "torch attention": dict(attention="torch", fused=False),
    "triton attention": dict(attention="triton", fused=False),
    "auto, eager (no graph)": dict(cuda_graph=False), "plain, eager (no graph)": dict(fused=False, cuda_graph=False),
    "compiled": dict(compile=True, fused=False),
    "fused": dict(fused=True), "fused, compiled": dict(fused=True, compile=True),
    "fused, eager (no graph)": dict(fused=True, cuda_graph=False),
    # the fast adapter's kernels launched with programmatic dependent launch (kernels/pdl.py; Hopper), and with each
    # GEMM program prefetching its first weight tiles into L2 before its PDL wait (kernels/l2_prefetch.py)
    "fused, pdl": dict(fused=True, pdl=True),
    **{f"fused, pdl, weights ahead {t}": dict(fused=True, pdl=True, weights_ahead=t) for t in (1, 2, 4, 8)},
    # each block's add + RMSNorm split between the GEMMs either side of it (engine/fast/ops.py fold_norm)
    "fused, fold norm": dict(fused=True, fold_norm=True),
}
# on a GPU auto is the fast adapter, and the folded norms are measured beside it (PDL lost on every case on an H200,
# 2026-12-01, and is asked for by name); on a CPU the kernels are torch ops, so the fold is the fused variant there
DEFAULT_VARIANTS = ("auto", "plain", "fused, fold norm")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="one case instead of the targets (with --batch, --prompt-len)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--cases", default="", help="comma list of MODEL:BxP, e.g. 'llama-2-7b:8x2048' (default: the "
                        "four targets)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peers", default=None, help="comma list of transformers peers: static, dynamic (default: "
                        "both on a GPU, dynamic on a CPU)")
    parser.add_argument("--peer-cases", default="first", choices=("first", "all"),
                        help="run the transformers peers on the first case only (default) or on every case")
    parser.add_argument("--exact-seqs", type=int, default=16, help="sequences in the GPU exactness check (0: skip)")
    parser.add_argument("--exact-tokens", type=int, default=32)
    parser.add_argument("--exact-models", default="", help="extra models for the exactness check, comma list")
    parser.add_argument("--ours", default="", help=f"comma list of our variants (default: "
                        f"{', '.join(DEFAULT_VARIANTS)}); any of: {', '.join(VARIANTS)}")
    parser.add_argument("--no-tune", action="store_true", help="do not measure the GEMM plan (use the cached one)")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-step kernel breakdown")
    parser.add_argument("--profile-cases", default="first", choices=("first", "all"),
                        help="which cases get the per-step kernel breakdown (all: where each missed target loses time)")
    parser.add_argument("--tag", default="", help="suffix of the result files' name (decode_<tag>)")


def _cases(args) -> list[Case]:
    if args.model or args.batch or args.prompt_len:
        return [Case(args.model or "synthetic:llama-2-7b", args.batch or 8, args.prompt_len or 2048)]
    if not args.cases:
        return list(TARGETS)
    cases = []
    for item in filter(None, (c.strip() for c in args.cases.split(","))):
        try:
            model, shape = item.rsplit(":", 1)
            batch, prompt = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--cases entry {item!r} is not MODEL:BxP (e.g. llama-2-7b:8x2048)") from None
        cases.append(Case(model if ":" in model or model == "demo" else f"synthetic:{model}", batch, prompt))
    return cases


def _wanted_variants(args) -> list[str]:
    """--ours as a list, checked before any model is loaded. Names may hold commas ("fused, compiled", "fused, pdl,
    weights ahead 4"): a piece joins the following ones when together they name a variant."""
    pieces, wanted = [v.strip() for v in args.ours.split(",") if v.strip()], []
    while pieces:
        # the longest run of pieces from here that names a variant (else the piece alone, reported below)
        take = next((n for n in range(len(pieces), 1, -1) if ", ".join(pieces[:n]) in VARIANTS), 1)
        wanted.append(", ".join(pieces[:take]))
        del pieces[:take]
    wanted = wanted or [v for v in DEFAULT_VARIANTS if torch.cuda.is_available() or not _own_adapter(v)]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown --ours variant(s) {unknown}; choose from {list(VARIANTS)}")
    return wanted


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> tuple[float, object]:
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return (time.perf_counter() - start) * 1e3, out


def _in_run_step_ms(result, skip: int = 2) -> float | None:
    """The median wall time between a run's own decode steps after the first `skip`: the steady step measured inside
    one run, so no capture or prefill is in it. `result.step_ms`: the engine's GenerationResult (it queues step n + 1
    before it reads step n's token, so in steady state the interval is the GPU's step), or a transformers run's
    `_StepClock` intervals (generate syncs every step: the interval is its step with that sync). None without."""
    steps = getattr(result, "step_ms", None)
    if not steps or len(steps) <= skip:
        return None
    return statistics.median(steps[skip:])


class _StepClock:
    """A transformers logits processor that only timestamps: generate calls it once per new token, so the intervals
    between calls are its decode steps (each ended by generate's own per-step sync). Scores pass through unchanged."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores

    @property
    def step_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.times, self.times[1:])]


def _step_ms(run, new_tokens: int, repeat: int, *, warmup_tokens: int = 2
             ) -> tuple[float, list[float], float, list[float]]:
    """The steady decode step, two ways. First: the median over repeats of each N-token run's in-run step
    (`_in_run_step_ms`: the median interval between its own steps); run(n) generates n tokens and returns something
    with `step_ms`. Where a run reports no steps, (t(N tokens) - t(2 tokens)) / (N - 2) instead: both runs pay the
    same once-per-run setup (prefill, and the engine's CUDA-graph capture of the step), so it cancels, but the
    capture's run-to-run variation does not (on an H200 its samples spread 5.2-6.8 ms around a 5.88 ms step whose
    in-run samples agreed to 0.1 %). Second: those difference samples. Third (median): what a run pays once,
    t(2) - t(1) - step. Fourth: each run's in-run step."""
    # warm-up: allocator, cuBLAS handles, graph capture paths (and compiling, when asked), and the kernels a run of
    # N tokens first meets (on an H200 the first full run of a variant was 2-3x the later ones without this)
    run(new_tokens)
    run(warmup_tokens)
    samples, setup, in_run = [], [], []
    for _ in range(repeat):
        full, result = _timed(lambda: run(new_tokens))
        two, _ = _timed(lambda: run(2))
        one, _ = _timed(lambda: run(1))
        step = (full - two) / (new_tokens - 2)
        samples.append(step)
        setup.append(two - one - step)
        if (inside := _in_run_step_ms(result)) is not None:
            in_run.append(inside)
    steady = statistics.median(in_run) if len(in_run) == repeat else statistics.median(samples)
    return steady, samples, statistics.median(setup), in_run


def _divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (len when equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def compare_greedy(tokens: list[list[int]], logits: list[torch.Tensor], ref_tokens: list[list[int]],
                   ref_logits: list[torch.Tensor]) -> dict:
    """Two greedy runs of the same prompts: sequences token-identical, and logits (B, V) per step compared up
    to and including each sequence's first differing step (same inputs until then)."""
    num_seqs, new_tokens = len(ref_tokens), len(ref_logits)
    matches, diverge_at, errors, first_step = 0, [], [], []
    for b in range(num_seqs):
        diverge = _divergence(tokens[b], ref_tokens[b])
        matches += diverge == len(ref_tokens[b])
        diverge_at.append(diverge)
        first_step.append(rel_err(logits[0][b], ref_logits[0][b]))
        errors += [rel_err(logits[step][b], ref_logits[step][b]) for step in range(min(diverge + 1, new_tokens))]
    return {"match_fraction": matches / num_seqs, "first_divergence": diverge_at,
            "max_logits_rel_err": max(errors), "median_logits_rel_err": statistics.median(errors),
            "median_prefill_logits_rel_err": statistics.median(first_step)}


# variant fields that pick how the bench's own fast adapter launches its kernels (engine.fast.fuse's keywords), and
# their defaults there (the engine's fast adapter)
ADAPTER_FIELDS = {"pdl": False, "weights_ahead": 0, "fold_norm": False}


def _adapter_fields(fields: dict) -> dict:
    """The variant's ADAPTER_FIELDS that differ from the engine's fast adapter."""
    return {k: fields[k] for k, default in ADAPTER_FIELDS.items() if k in fields and fields[k] != default}


def _own_adapter(variant: str) -> bool:
    """Whether the variant runs the bench's own fast adapter (launched otherwise than the engine's)."""
    return bool(_adapter_fields(VARIANTS[variant]))


class Engines:
    """Our generators for one model: the engine's own (settings.fused picks its adapter) and, for the variants that
    launch the fast adapter's kernels otherwise (PDL, weights ahead, the folded norm), the bench's fast adapters, one
    per combination (the engine's knob selects the fast adapter, not how its kernels launch)."""

    def __init__(self, model) -> None:
        self.model, self.plain, self._own = model, Generator(model), {}

    def generator(self, **adapter_fields) -> Generator:
        key = tuple(sorted(_adapter_fields(adapter_fields).items()))
        if not key:
            return self.plain
        if key not in self._own:
            from engine.fast import fuse

            fast = fuse(self.model.adapter, **dict(key))
            self._own[key] = Generator(dataclasses.replace(self.model, adapter=fast))
        return self._own[key]

    def generate(self, prompts, n: int, variant: str, *, keep_logits: bool = False):
        fields = dict(VARIANTS[variant])
        adapter_fields = {k: fields.pop(k) for k in ADAPTER_FIELDS if k in fields}
        settings = GenerationSettings(max_new_tokens=n, ignore_eos=True, **fields)
        engine = self.generator(**adapter_fields)
        result = engine.generate(prompts, settings, keep_logits=keep_logits)
        self.last = engine
        return result


def exactness(model, *, num_seqs: int, new_tokens: int, seed: int = 0, fp32_reference: bool = True,
              compiled: bool = False, fused: bool = False) -> dict:
    """Greedy tokens and logits of the engine vs transformers on fresh random prompts of mixed lengths.

    In bf16 two correct implementations drift apart by rounding alone, so where memory allows the same
    prompts also run through transformers in fp32 on upcast weights: the engine's and transformers' bf16
    errors against that reference say whether the engine is any less exact than the framework itself.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, min(512, model.spec.max_positions - new_tokens), (num_seqs,), generator=gen).tolist()
    prompts = [torch.randint(3, model.spec.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    engines = Engines(model)
    ours = engines.generate(prompts, new_tokens, "plain", keep_logits=True)
    ref_tokens, ref_logits = hf_greedy(model.hf_model, prompts, max_new_tokens=new_tokens)

    result = {"model": model.source, "dtype": str(model.dtype), "num_seqs": num_seqs, "new_tokens": new_tokens,
              "prompt_lengths": lengths, "attention": engines.plain.attention_why,
              **compare_greedy(ours.token_ids, ours.logits, ref_tokens, ref_logits)}
    if compiled:  # the compiled step against transformers too (fused kernels round differently)
        mine = engines.generate(prompts, new_tokens, "compiled", keep_logits=True)
        result["compiled_vs_transformers"] = compare_greedy(mine.token_ids, mine.logits, ref_tokens, ref_logits)
    mine = None
    if fused:  # the fast adapter against transformers, and against the plain adapter
        try:
            mine = engines.generate(prompts, new_tokens, "fused", keep_logits=True)
            result["fused_vs_transformers"] = compare_greedy(mine.token_ids, mine.logits, ref_tokens, ref_logits)
            result["fused_vs_ours"] = compare_greedy(mine.token_ids, mine.logits, ours.token_ids, ours.logits)
        except Exception as exc:  # noqa: BLE001 - reported in the results; the timed rows say the rest
            result["fused_failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if fp32_reference and model.dtype != torch.float32:
        import copy

        try:
            reference = copy.deepcopy(model.hf_model).float()
            fp_tokens, fp_logits = hf_greedy(reference, prompts, max_new_tokens=new_tokens)
            del reference
            result["ours_vs_fp32"] = compare_greedy(ours.token_ids, ours.logits, fp_tokens, fp_logits)
            result["transformers_bf16_vs_fp32"] = compare_greedy(ref_tokens, ref_logits, fp_tokens, fp_logits)
            if mine is not None:
                result["fused_vs_fp32"] = compare_greedy(mine.token_ids, mine.logits, fp_tokens, fp_logits)
        except torch.OutOfMemoryError:
            result["fp32_reference"] = "skipped: the fp32 copy did not fit in GPU memory"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def _exactness_notes(e: dict) -> list[str]:
    notes = [f"exactness {e['model']}: {e['match_fraction']:.0%} of {e['num_seqs']} sequences match transformers for "
             f"{e['new_tokens']} greedy tokens; logits rel. error max {e['max_logits_rel_err']:.2e}, median "
             f"{e['median_logits_rel_err']:.2e}, median at the prefill {e['median_prefill_logits_rel_err']:.2e}"]
    for key, who in (("compiled_vs_transformers", "ours compiled vs transformers"),
                     ("fused_vs_transformers", "ours fused vs transformers"), ("fused_vs_ours", "ours fused vs ours"),
                     ("ours_vs_fp32", "ours vs transformers fp32"),
                     ("fused_vs_fp32", "ours fused vs transformers fp32"),
                     ("transformers_bf16_vs_fp32", "transformers vs its own fp32")):
        if key in e:
            f = e[key]
            notes.append(f"  {who}: {f['match_fraction']:.0%} of sequences match; logits rel. error median "
                         f"{f['median_logits_rel_err']:.2e}, at the prefill {f['median_prefill_logits_rel_err']:.2e}, "
                         f"max {f['max_logits_rel_err']:.2e}")
    return notes


def step_bytes(model, case: Case, new_tokens: int) -> int:
    """Bytes one decode step must read: every weight except the embedding table (only B rows of it are gathered;
    a tied LM head is read, so then it counts), plus each sequence's K/V at the step's mean length."""
    spec = model.spec
    embed = model.hf_model.get_input_embeddings().weight
    head = model.hf_model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    weight_bytes = (spec.num_params - (0 if tied else embed.numel())) * spec.dtype_bytes
    mean_len = case.prompt_len + new_tokens / 2
    return int(weight_bytes + case.batch * mean_len * spec.kv_bytes_per_token)


def _tune(model, cases: list[Case], device: torch.device) -> tuple[dict | None, list[str], object]:
    """Measure the GEMM plan for the cases' batches (what is not cached yet) -> (plan table rows, notes, plan)."""
    from engine.fast.plan import gemm_plan, measure_plan, projection_shapes, save_plan

    started = time.perf_counter()
    plan = gemm_plan(device)
    shapes = [(c.batch, n, k, g) for c in cases for n, k, g in projection_shapes(model.spec)]
    plan = measure_plan(shapes, dtype=model.dtype, device=device, plan=plan)
    where = save_plan(plan, device)
    wanted = {plan.key(*s) for s in shapes}
    table = [r for r in plan.rows() if r["shape"] in wanted]
    notes = [f"GEMM plan for {model.source} ({time.perf_counter() - started:.0f} s; cached in {where}): "
             + "; ".join(f"{r['shape']}: cuBLAS {r['cublas_gb_s']:.0f} GB/s, skinny "
                         f"{r['skinny_gb_s'] or 0:.0f} GB/s -> {r['winner']}" for r in table)]
    return table, notes, plan


def predicted_step_ms(spec, profile, case: Case, new_tokens: int, projections=None) -> float:
    """The scheduler's cost model for a GPU-resident run of the case (engine/offload/scheduler.py: plan_run with
    every token resident): its mean predicted decode step over the run. projections: the measured GEMM times
    (engine/offload/scheduler.py ProjectionTimes) the engine's plan_for gives a fast-adapter run; None: estimated
    from the copy bandwidth."""
    from engine.offload.scheduler import plan_run

    plan = plan_run(spec, profile, placement="gpu", batch=case.batch, prompt_tokens=case.prompt_len,
                    new_tokens=new_tokens, resident_tokens=case.prompt_len + new_tokens, split=None, chunk_tokens=512,
                    projections=projections)
    return statistics.mean(step.predicted_ms for step in plan.steps)


def run(args) -> SuiteResult:
    if args.new_tokens < 3:
        raise SystemExit(f"--new-tokens must be at least 3 (a decode step is timed as (t(N) - t(2)) / (N - 2)), "
                         f"got {args.new_tokens}")
    wanted = _wanted_variants(args)
    cases = _cases(args)
    # The suite targets the GPU; on a CPU it runs too (fp32), so the harness itself is testable anywhere.
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = "bfloat16" if cuda else "float32"
    peers_wanted = [p for p in (args.peers if args.peers is not None else ("static,dynamic" if cuda else "dynamic"))
                    .split(",") if p.strip()]
    stream_gb_s, copy_gb_s = triton_read_gb_s(), device_copy_gb_s()
    sum_gb_s = streaming_read_gb_s() if cuda else stream_gb_s
    read_gb_s = max(stream_gb_s, sum_gb_s)  # the faster read is the ceiling
    notes = [f"read bandwidth at the start (the roofline's ceiling, the faster of two reads, unless the sweep after "
             f"the cases reads faster): {read_gb_s:.0f} GB/s; Triton streaming "
             f"read {stream_gb_s:.0f} GB/s, torch bf16 sum {sum_gb_s:.0f} GB/s; device copy {copy_gb_s:.0f} GB/s "
             "(read + write)" + ("" if cuda else " (no GPU: host memory, torch sum)")]
    if sweep_note := read_sweep_note():
        notes.append(sweep_note)
    details: dict = {"read_gb_s": read_gb_s, "copy_gb_s": copy_gb_s, "cases": {}}
    from engine.offload.profiler import hardware_profile

    profile = hardware_profile(device, quick=not cuda)  # the scheduler's measured speeds (cached per device)
    details["profile"] = json.loads(profile.to_json())
    predictions: dict[Case, float] = {}
    headlines: list[Headline] = []
    measured: list[dict] = []  # one per timed row, turned into Rows once the ceiling is final
    by_model: dict[str, list[Case]] = {}
    for case in cases:
        by_model.setdefault(case.model, []).append(case)

    for model_index, (source, model_cases) in enumerate(by_model.items()):
        # Random weights have no trained length: lengthen a preset's context when a case needs it (P8192 + N).
        longest = max(c.prompt_len for c in model_cases) + args.new_tokens + 1
        own = PRESETS.get(source.removeprefix("synthetic:"), {}).get("max_position_embeddings")
        lengthen = source.startswith("synthetic:") and own is not None and longest > own
        model = load_model(source, device=device, dtype=dtype, max_positions=longest if lengthen else None)
        details.setdefault("models", {})[source] = model.card()
        fused_wanted = any(VARIANTS[v].get("fused") or (v == "auto" and cuda) for v in wanted)  # auto: fast on a GPU
        tuned_plan = None  # the GEMM plan measured below (else the device's cached one)
        if fused_wanted:
            from engine.fast import why_not_fused

            why = why_not_fused(model.adapter)
            if why:
                notes.append(f"{source}: {why}")
            elif cuda and not args.no_tune:
                try:
                    table, plan_notes, tuned_plan = _tune(model, model_cases, device)
                    details.setdefault("gemm_plan", {})[source] = table
                    notes += plan_notes
                except Exception as exc:  # noqa: BLE001 - the fast adapter then runs the unmeasured defaults
                    notes.append(f"GEMM plan for {source} not measured: {type(exc).__name__}: {str(exc)[:300]}")
        if model_index == 0 and args.exact_seqs:
            exact = [exactness(model, num_seqs=args.exact_seqs, new_tokens=args.exact_tokens, fused=fused_wanted)]
            for extra in filter(None, args.exact_models.split(",")):
                other = load_model(extra, device=device, dtype=dtype)
                exact.append(exactness(other, num_seqs=args.exact_seqs, new_tokens=args.exact_tokens,
                                       compiled=other.spec.num_params < 1e9, fused=fused_wanted))
                del other
            details["exactness"] = exact
            for e in exact:
                notes += _exactness_notes(e)
            headlines += _exactness_headlines(exact)

        engines = Engines(model)
        for case_index, case in enumerate(model_cases):
            first_case = model_index == 0 and case_index == 0
            gen = torch.Generator().manual_seed(1)
            prompts = torch.randint(3, model.spec.vocab_size, (case.batch, case.prompt_len), generator=gen)
            prompt_lists = prompts.tolist()
            num_bytes = step_bytes(model, case, args.new_tokens)
            info = details["cases"][case.label] = {"step_bytes": num_bytes}
            ours_ms: dict[str, float] = {}
            for name in wanted:
                warmup = args.new_tokens if VARIANTS[name].get("compile") else 2
                try:
                    (ours_ms[name], info[f"ours_{name}_samples_ms"], info[f"ours_{name}_setup_ms"],
                     info[f"ours_{name}_in_run_ms"]) = _step_ms(
                        lambda n, name=name: engines.generate(prompt_lists, n, name), args.new_tokens, args.repeat,
                        warmup_tokens=warmup)
                    info[f"ours_{name}_attention"] = engines.last.attention_why
                    in_run = info[f"ours_{name}_in_run_ms"]
                    print(f"{case.label} · ours {name}: {ours_ms[name]:.3f} ms/step (in-run steps "
                          + ", ".join(f"{x:.3f}" for x in in_run) + "; (t(N) - t(2)) / (N - 2) samples "
                          + ", ".join(f"{x:.3f}" for x in info[f"ours_{name}_samples_ms"]) + ")", flush=True)
                except CompileError as exc:  # a compile that fails here is reported, not fatal to the other rows
                    notes.append(f"{case.label}: variant '{name}' did not run: {exc}")
                except Exception as exc:  # noqa: BLE001 - e.g. a capture the driver refused: reported, the run goes on
                    notes.append(f"{case.label}: variant '{name}' failed: {type(exc).__name__}: {str(exc)[:300]}")
            # The engine's own plan for this run: the fast adapter's measured GEMMs where the GEMM plan has them.
            projections = measured_projections(model.spec, device=device, batch=case.batch, fused=fused_wanted,
                                               gemm_plan=tuned_plan)
            info["prediction_gemm_source"] = "measured GEMM plan" if projections else "copy bandwidth x efficiency"
            predictions[case] = info["predicted_step_ms"] = predicted_step_ms(model.spec, profile, case,
                                                                              args.new_tokens, projections)
            if projections is not None:
                info["predicted_step_ms_bandwidth_only"] = predicted_step_ms(model.spec, profile, case,
                                                                             args.new_tokens)
            if "auto" in ours_ms:
                err = 100 * (predictions[case] - ours_ms["auto"]) / ours_ms["auto"]
                info["prediction_err_pct"] = err
                without = info.get("predicted_step_ms_bandwidth_only")
                notes.append(f"{case.label}: the cost model predicts {predictions[case]:.3f} ms per GPU-resident step "
                             f"(GEMMs from the {info['prediction_gemm_source']}), ours auto measured "
                             f"{ours_ms['auto']:.3f} ms ({err:+.1f} %)"
                             + (f"; from the copy bandwidth alone it would predict {without:.3f} ms "
                                f"({100 * (without - ours_ms['auto']) / ours_ms['auto']:+.1f} %)" if without else ""))
                if in_run := info.get("ours_auto_in_run_ms"):
                    diff = info["ours_auto_samples_ms"]
                    notes.append(f"{case.label}: ours auto's step inside each run (the row's figure) "
                                 f"{min(in_run):.3f}-{max(in_run):.3f} ms over {len(in_run)} runs; from "
                                 f"(t(N) - t(2)) / (N - 2), which carries each run's graph capture, median "
                                 f"{statistics.median(diff):.3f} ms, {min(diff):.3f}-{max(diff):.3f}")
            fast_ran = any(VARIANTS[v].get("fused") or (v == "auto" and cuda) for v in ours_ms)
            if fast_ran and ("plain" in ours_ms or any(_own_adapter(v) for v in ours_ms)):
                _compare_variants(engines, prompt_lists, args.new_tokens, ours_ms, info, notes, case)
            peers: dict[str, float] = {}
            if first_case or args.peer_cases == "all":
                peers = _peers(model, prompts.to(device), peers_wanted, args, info, notes, case)
            for name, ms in ours_ms.items():
                graph = "eager" not in name
                label = name if not graph else f"{name}, {'CUDA graph' if cuda else 'no graph on CPU'}"
                measured.append(dict(case=f"ours, {label} ({case.label})", ms=ms, batch=case.batch, bytes=num_bytes,
                                     peers=peers, key=(case, name)))
            for peer, ms in peers.items():
                measured.append(dict(case=f"transformers generate, {peer} cache ({case.label})", ms=ms,
                                     batch=case.batch, bytes=num_bytes, peers={}, key=(case, f"transformers {peer}")))
            if (first_case or getattr(args, "profile_cases", "first") == "all") and not args.no_profile:
                info["breakdown"] = _breakdowns(model, engines, case, wanted, notes)
            # what a run stopped later (a time limit, a crash) would otherwise lose: the cases measured so far
            if getattr(args, "results_dir", None) is not None:
                so_far = [{k: v for k, v in m.items() if k != "key"} for m in measured]
                write_partial(args.results_dir, "decode" + (f"_{args.tag}" if args.tag else ""),
                              {"measured": so_far, "notes": notes, "details": details})
        del engines, model
        if cuda:
            torch.cuda.empty_cache()

    # The read again, now that the GPU has run for minutes (clocks, the first sweep's warm-up): the faster of the
    # two is the ceiling, so a slow first sweep cannot inflate every percentage (two H200 runs of the same steps
    # measured 4317 and 4533 GB/s at their start).
    if cuda:
        again = triton_read_gb_s()
        notes.append(f"read bandwidth measured again after the cases: {again:.0f} GB/s (at the start: "
                     f"{stream_gb_s:.0f}); the ceiling takes the faster")
        details["read_gb_s_after"] = again
        read_gb_s = details["read_gb_s"] = max(read_gb_s, again)
    # The ceiling: the measured read bandwidth, or the fastest row if one read faster (then say so).
    ceiling = read_gb_s
    fastest = max((m["bytes"] / (m["ms"] * 1e-3) / 1e9 for m in measured), default=0.0)
    if fastest > ceiling:
        notes.append(f"a row read {fastest:.0f} GB/s, above the measured reads' {read_gb_s:.0f}: the ceiling is "
                     "raised to it (its bytes may have hit in L2)")
        ceiling = fastest
    details["ceiling_gb_s"] = ceiling
    rows, by_key = [], {}
    for m in measured:
        floor_ms = m["bytes"] / (ceiling * 1e9) * 1e3
        main_peer = "static" if "static" in m["peers"] else next(iter(m["peers"]), None)
        row = Row(case=m["case"], ms=m["ms"], tok_s=m["batch"] / (m["ms"] * 1e-3), bytes_moved=m["bytes"],
                  pct_roofline=100 * floor_ms / m["ms"], peer=f"transformers {main_peer}" if main_peer else None,
                  peer_ms=m["peers"].get(main_peer) if main_peer else None)
        rows.append(row)
        by_key[m["key"]] = (row, floor_ms)
    notes.append(f"bytes per step over {ceiling:.0f} GB/s: " + "; ".join(
        f"{c.label} {details['cases'][c.label]['step_bytes'] / 1e9:.2f} GB -> roofline "
        f"{details['cases'][c.label]['step_bytes'] / (ceiling * 1e9) * 1e3:.2f} ms" for c in cases
        if c.label in details["cases"]) + (" (B1: ms/step is ms/token)" if any(c.batch == 1 for c in cases) else ""))
    if not args.tag:
        headlines += _headlines(cases, wanted, by_key, cuda)
        errors = {c: details["cases"][c.label]["prediction_err_pct"] for c in cases
                  if "prediction_err_pct" in details["cases"].get(c.label, {})}
        if errors:
            worst = max(errors, key=lambda c: abs(errors[c]))
            headlines.append(Headline(
                "gpu_resident_prediction_max_err_pct", abs(errors[worst]),
                f"% |predicted - measured| / measured, the cost model's GPU-resident step against ours auto, worst of "
                f"{len(errors)} cases: {worst.label} ({errors[worst]:+.1f} %; target <= 10)",
                peer="measured step, ours auto", peer_value=by_key[(worst, "auto")][0].ms))
    return SuiteResult(suite="decode" + (f"_{args.tag}" if args.tag else ""), rows=rows, headlines=headlines,
                       notes=notes, details=details)


def _compare_variants(engines, prompt_lists, new_tokens: int, ours_ms: dict, info: dict, notes: list, case) -> None:
    """Greedy tokens and logits of the fused variant against the plain one (when both ran), and of every variant of
    the bench's own fast adapter against fused (PDL, weights ahead: the same kernels launched early, identical or an
    early launch raced; the folded norms: the GEMM's input rounded once, rstd summed in another order), on the
    case's prompts."""
    early_variants = [v for v in ours_ms if _own_adapter(v)]
    try:
        fast = engines.generate(prompt_lists, new_tokens, "fused", keep_logits=True)
        if "plain" in ours_ms:
            plain = engines.generate(prompt_lists, new_tokens, "plain", keep_logits=True)
            c = info["fused_vs_plain"] = compare_greedy(fast.token_ids, fast.logits, plain.token_ids, plain.logits)
            info["ours_internal_step_ms_median"] = statistics.median(plain.step_ms)
            info["fused_internal_step_ms_median"] = statistics.median(fast.step_ms)
            notes.append(f"{case.label}: fused vs plain (same prompts, {new_tokens} greedy tokens): "
                         f"{c['match_fraction']:.0%} of sequences token-identical; logits rel. error median "
                         f"{c['median_logits_rel_err']:.2e}, max {c['max_logits_rel_err']:.2e}")
        for variant in early_variants:
            early = engines.generate(prompt_lists, new_tokens, variant, keep_logits=True)
            c = compare_greedy(early.token_ids, early.logits, fast.token_ids, fast.logits)
            info["pdl_vs_fused" if variant == "fused, pdl" else f"{variant} vs fused"] = c
            expected = ("the norm rounded otherwise: bf16 rounding differences" if VARIANTS[variant].get("fold_norm")
                        else "0 expected")
            notes.append(f"{case.label}: {variant} vs fused (the engine's launches): {c['match_fraction']:.0%} of "
                         f"sequences token-identical, logits max rel. error {c['max_logits_rel_err']:.1e} ({expected})")
    except Exception as exc:  # noqa: BLE001 - reported, the timed rows stand
        notes.append(f"{case.label}: variant comparison failed: {type(exc).__name__}: {str(exc)[:300]}")


def _peers(model, input_ids, peers_wanted, args, info, notes, case) -> dict[str, float]:
    peers = {}
    for peer in peers_wanted:
        kwargs = {} if peer == "dynamic" else {"cache_implementation": peer}

        def hf(n: int, kwargs=kwargs) -> _StepClock:
            from transformers import LogitsProcessorList

            clock = _StepClock()
            with torch.no_grad():
                model.hf_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                        logits_processor=LogitsProcessorList([clock]), **kwargs)
            return clock

        try:
            # A static cache makes transformers compile its forward on the first full-length run: warm up with one.
            warmup = args.new_tokens if peer == "static" else 2
            (peers[peer], info[f"transformers_{peer}_samples_ms"], info[f"transformers_{peer}_setup_ms"],
             info[f"transformers_{peer}_in_run_ms"]) = _step_ms(hf, args.new_tokens, args.repeat, warmup_tokens=warmup)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            notes.append(f"{case.label}: transformers {peer} cache did not run: {type(exc).__name__}: {str(exc)[:300]}")
    return peers


def _breakdowns(model, engines: Engines, case: Case, wanted: list[str], notes: list[str]) -> dict:
    """Kernels by kind per eager step, plain and fused (and with the folded norms, when asked for; each step also
    replayed from a CUDA graph)."""
    from bench.profile_decode import format_breakdown, step_breakdown

    out = {}
    adapters = {"plain": model.adapter}
    if any(VARIANTS[v].get("fused") for v in wanted):
        from engine.fast import fuse

        adapters["fused"] = fuse(model.adapter)
        if any(VARIANTS[v].get("fold_norm") for v in wanted):  # where the folds' launches went: the timed adapter
            adapters["fused, fold norm"] = engines.generator(fold_norm=True).model.adapter
    for name, adapter in adapters.items():
        try:
            b = out[name] = step_breakdown(model, adapter, batch=case.batch, prompt_len=case.prompt_len,
                                           steps=5 if model.device.type == "cuda" else 1)
        except Exception as exc:  # noqa: BLE001 - a profile that cannot run is reported, not fatal
            notes.append(f"breakdown of {name} did not run: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        kinds = ", ".join(f"{k} {v['ms']:.2f} ms ({v['kernels']:.0f})" for k, v in b["kinds"].items())
        graph = f"; CUDA graph replay {b['graph_ms']:.2f} ms" if b.get("graph_ms") is not None else ""
        notes.append(f"{case.label} {name} eager step: {b['total_ms']:.2f} ms in {b['kernels']:.0f} kernels "
                     f"({kinds}){graph}")
        out[name]["table"] = format_breakdown(b, f"{case.label}, {name}")
    return out


def _exactness_headlines(exact: list[dict]) -> list[Headline]:
    # The headline is taken on trained weights where the run has them: with random weights the logits are nearly
    # flat, and bf16 rounding alone flips their argmax (transformers' own bf16 against its fp32 shows it).
    trained = next((e for e in exact if not e["model"].startswith("synthetic:")), exact[0])
    out = [Headline("gpu_exact_tokens_match", trained["match_fraction"],
                    f"fraction of sequences, first {trained['new_tokens']} greedy tokens ({trained['model']}, bf16)",
                    peer="transformers generate (bf16, same weights)"),
           Headline("gpu_exact_logits_max_rel_err", trained["max_logits_rel_err"],
                    f"relative L2 error of logits vs transformers ({trained['model']}, bf16; target <= 2e-2)",
                    peer="transformers generate (bf16, same weights)")]
    for e in exact:
        if e is not trained and "transformers_bf16_vs_fp32" in e:
            name = e['model'].removeprefix('synthetic:').replace('-', '_').replace('.', '_')
            out.append(Headline(f"gpu_exact_tokens_match_{name}", e["ours_vs_fp32"]["match_fraction"],
                                f"fraction matching transformers fp32 ({e['model']}, random weights)",
                                peer="transformers bf16 vs its own fp32",
                                peer_value=e["transformers_bf16_vs_fp32"]["match_fraction"]))
    return out


def _headlines(cases: list[Case], wanted: list[str], by_key: dict, cuda: bool) -> list[Headline]:
    """Roofline percentages of the default path (settings as shipped: "auto") per target case, and its ratio to
    transformers static; a run without the auto variant reports its fastest variant, named in the unit."""
    out = []
    order = ("auto", "fused, fold norm", "fused, pdl", "fused", "fused, compiled", "compiled", "plain")

    def best(case):
        if (case, "auto") in by_key:  # the targets are the default path's, not the best knob's
            return by_key[(case, "auto")][0].ms, "auto"
        found = [(by_key[(case, v)][0].ms, v) for v in order if (case, v) in by_key]
        return min(found) if found else None

    graph = "CUDA graph" if cuda else "CPU"
    names = dict(zip(TARGETS, ("gpu_decode", "gpu_decode_b1", "gpu_decode_b64", "gpu_decode_llama3_p8192")))
    for index, case in enumerate(cases):
        found = best(case)
        if found is None:
            continue
        ms, variant = found
        row, floor_ms = by_key[(case, variant)]
        # a target keeps its own key; a case of one's own choosing is the headline case when it comes first
        key = names.get(case, "gpu_decode" if index == 0 else f"gpu_decode_case{index}")
        how = f"ours {variant}, {graph}; {case.label} N64"
        unit = f"% of roofline ({how}" + (f"; {ms:.3f} ms/token" if case.batch == 1 else "") + ")"
        out.append(Headline(f"{key}_pct_roofline", row.pct_roofline, unit,
                            peer="roofline ms: weight + K/V bytes per step / measured read bandwidth",
                            peer_value=floor_ms))
        if key == "gpu_decode":
            static = by_key.get((case, "transformers static"))
            dynamic = by_key.get((case, "transformers dynamic"))
            out.append(Headline("gpu_decode_tok_s", case.batch / (ms * 1e-3), f"tok/s ({how})",
                                peer="transformers generate (dynamic cache), same run",
                                peer_value=case.batch / (dynamic[0].ms * 1e-3) if dynamic else None))
            if static:
                out.append(Headline("gpu_decode_vs_hf_static", static[0].ms / ms,
                                    f"x (transformers static ms / ours ms; {how}; target >= 1.6)",
                                    peer="transformers generate, static cache", peer_value=static[0].ms))
    return out
