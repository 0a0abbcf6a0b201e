"""KV offload with partial recomputation (KVPR): step time against the PCIe floor, the scheduler's predictions,
the GPU-resident and transformers peers, and offloaded-vs-resident token equality.

Parts (--parts, all by default):
- exact:  the trained demo model in bf16, mixed prompt lengths: tokens of every placement/split (and the plain
          synchronous schedule) against GPU-resident decoding, and the 7B runs of `mha` against a resident run.
- mha:    synthetic:llama-2-7b, B8 P2048 N64, all KV in pinned host memory: split 0 (all K/V copied), auto,
          1 (all recomputed), the paper's fixed split, auto on the synchronous schedule, a hybrid; transformers
          `cache_implementation="offloaded"` on the same prompts.
- gqa:    synthetic:llama-3-8b, B16 P4096 N32, all KV on the CPU: the scheduler must turn recompute off.
- hybrid: synthetic:llama-2-7b, B16 P8192 N32 (K/V ~ 69 GB): hybrid auto against all-CPU auto; transformers'
          dynamic cache on the same shape.
- telemetry: the mha shape, all KV on the CPU, auto split, recorder on against off (lane spans of every layer);
          the GPU-resident graphed step with step markers on against off; a trace of a short recorded run
          (spans, NVML link counters, payload and tokens/s counters) written beside the results.
Our step time is the median decode step of a run (the engine's own per-step wall time; prefill excluded), median
over --repeat runs. transformers' is (t(N tokens) - t(1 token)) / (N - 1). The PCIe floor of a plan is the bytes
it moves host-to-device per step over the best H2D bandwidth measured by the profiler at the start of this run.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
import traceback
from dataclasses import dataclass, field

import torch

from bench.report import Headline, Row, SuiteResult
from engine import GenerationSettings, Generator, load_model
from engine.offload.profiler import hardware_profile
from engine.offload.scheduler import paper_split
from engine.settings import OffloadSettings

PARTS = ("exact", "mha", "gqa", "hybrid", "telemetry")


def add_arguments(parser) -> None:
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--mha-model", default="synthetic:llama-2-7b")
    parser.add_argument("--gqa-model", default="synthetic:llama-3-8b")
    parser.add_argument("--exact-model", default="demo")
    parser.add_argument("--families", default="", help="comma list of tiny presets for the families' exactness check "
                        "(default: every tiny preset)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per configuration (median of their medians)")
    parser.add_argument("--chunk-tokens", type=int, default=OffloadSettings().chunk_tokens)
    parser.add_argument("--peer-tokens", type=int, default=12, help="new tokens of the transformers offloaded peer")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run, not the issue's figures")
    parser.add_argument("--tag", default="", help="suffix of the result files' name (offload_<tag>)")


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _prompts(vocab: int, batch: int, length: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen).tolist()


def _measure(engine: Generator, prompts, settings: GenerationSettings, repeat: int) -> dict:
    """Median decode step (ms) over `repeat` runs, the plan's prediction for the same steps, and the tokens."""
    medians, result = [], None
    for _ in range(repeat):
        result = engine.generate(prompts, settings)
        steady = result.step_ms[2:] or result.step_ms  # the first steps still warm the allocator and cuBLAS
        medians.append(statistics.median(steady))
        _free()
    out = {"ms": statistics.median(medians), "run_medians_ms": medians, "tokens": result.token_ids,
           "prefill_ms": result.prefill_ms}
    plan = engine.plan if settings.offload.offloaded else None
    if plan is not None:
        steps = plan.steps[2 + 1: len(result.step_ms) + 1] or plan.steps
        out |= {"predicted_ms": statistics.median(p.predicted_ms for p in steps),
                "floor_ms": statistics.median(p.pcie_floor_ms for p in steps),
                "h2d_bytes": int(statistics.median(p.h2d_bytes for p in steps)),
                "split": statistics.median(p.split for p in steps), "reason": plan.steps[0].reason,
                "resident_tokens": plan.resident_tokens, "budget": plan.gpu_budget_note}
    return out


def _hf_step_ms(hf_model, prompts, new_tokens: int, **kwargs) -> float:
    """transformers generate: (t(N) - t(1)) / (N - 1), one warm-up of 2 tokens first."""
    device = next(hf_model.parameters()).device
    ids = torch.tensor(prompts, device=device)

    def timed(n: int) -> float:
        _free()
        start = time.perf_counter()
        with torch.no_grad():
            hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, **kwargs)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    timed(2)
    return (timed(new_tokens) - timed(1)) / (new_tokens - 1)


def _match(tokens, ref) -> dict:
    same = [a == b for a, b in zip(tokens, ref)]
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(tokens, ref)]
    return {"match_fraction": sum(same) / len(same), "first_divergence": first}


def _row(case: str, m: dict, batch: int, *, peer: str | None = None, peer_ms: float | None = None) -> Row:
    extra = {k: m[k] for k in ("predicted_ms", "split", "reason", "resident_tokens", "budget", "run_medians_ms",
                               "prefill_ms") if k in m}
    if "predicted_ms" in m:
        extra["prediction_error_pct"] = 100 * (m["predicted_ms"] - m["ms"]) / m["ms"]
    return Row(case=case, ms=m["ms"], tok_s=batch / (m["ms"] * 1e-3), bytes_moved=m.get("h2d_bytes"),
               pct_roofline=100 * m["floor_ms"] / m["ms"] if m.get("floor_ms") else None, peer=peer, peer_ms=peer_ms,
               extra=extra)


@dataclass
class _Run:
    """What the parts of one bench run share and fill in."""

    args: object
    device: str
    dtype: str
    quick: bool
    rows: list = field(default_factory=list)
    headlines: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    details: dict = field(default_factory=dict)
    predictions: list = field(default_factory=list)  # (case, predicted ms, measured ms)

    def off(self, placement: str, split="auto", **kw) -> OffloadSettings:
        return OffloadSettings(placement=placement, split=split, chunk_tokens=self.args.chunk_tokens, **kw)


def run(args) -> SuiteResult:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown --parts {unknown}; choose from {list(PARTS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = _Run(args=args, device=device, dtype="bfloat16" if device == "cuda" else "float32",
               quick=args.quick or device == "cpu")
    profile = hardware_profile(device, refresh=True)
    ctx.notes.append(f"H2D bandwidth measured in this run: {profile.peak_h2d_gb_s:.1f} GB/s best "
                     f"({', '.join(f'{p.rate:.1f}' for p in profile.h2d)} GB/s over "
                     f"{', '.join(str(p.size >> 10) + ' KiB' for p in profile.h2d)}); D2H {profile.d2h[-1].rate:.1f} "
                     f"GB/s; both at once {profile.bidirectional_gb_s:.1f} GB/s")
    ctx.details["profile"] = json.loads(profile.to_json())
    for part in parts:
        try:
            PART_FUNCTIONS[part](ctx)
        except Exception as exc:  # noqa: BLE001 - one part's failure is reported; the others' results are kept
            ctx.notes.append(f"part {part} failed: {type(exc).__name__}: {str(exc)[:400]}")
            ctx.details.setdefault("failures", {})[part] = traceback.format_exc()[-3000:]
        _free()
    if ctx.predictions:
        errors = {case: 100 * abs(p - m) / m for case, p, m in ctx.predictions}
        ctx.details["predictions"] = [{"case": c, "predicted_ms": p, "measured_ms": m, "error_pct": errors[c]}
                                      for c, p, m in ctx.predictions]
        worst = max(errors, key=errors.get)
        ctx.headlines.append(Headline("scheduler_max_pred_error_pct", errors[worst],
                                      f"% worst |predicted - measured| / measured step time over {len(errors)} "
                                      f"(placement, split) points (worst: {worst}; target <= 15)"))
    headlines = ctx.headlines
    if ctx.quick:  # small shapes are a smoke run: their figures never reach summary.json
        ctx.notes.append("quick run (small shapes): headlines not recorded: " +
                         "; ".join(f"{h.key}={h.value:.4g}" for h in headlines))
        headlines = []
    suite = "offload_quick" if ctx.quick else "offload" + (f"_{args.tag}" if args.tag else "")
    return SuiteResult(suite=suite, rows=ctx.rows, headlines=headlines, notes=ctx.notes, details=ctx.details)


def _setup(ctx: _Run, source: str, tiny_source: str, batch: int, plen: int, new: int, **load_options):
    """-> (model, prompts, generator, shape label); without a GPU the tiny preset of the family stands in."""
    model = load_model(source if not ctx.quick or ctx.device == "cuda" else tiny_source, device=ctx.device,
                       dtype=ctx.dtype, **load_options)
    return model, _prompts(model.spec.vocab_size, batch, plen), Generator(model), \
        f"{model.source} B{batch} P{plen} N{new}"


def _part_exact(ctx: _Run) -> None:
    model = load_model(ctx.args.exact_model, device=ctx.device, dtype=ctx.dtype)
    gen = torch.Generator().manual_seed(7)
    new = 40
    lengths = torch.randint(20, min(400, model.spec.max_positions - new), (8,), generator=gen).tolist()
    prompts = [torch.randint(3, model.spec.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    engine = Generator(model)
    base = GenerationSettings(max_new_tokens=new, ignore_eos=True)
    ref = engine.generate(prompts, base).token_ids
    kv_gib = model.spec.kv_bytes_per_token * len(prompts) * (max(lengths) + new) / 2**30
    checks = {"cpu split 0": ctx.off("cpu", 0.0), "cpu split 0.5": ctx.off("cpu", 0.5), "cpu split 1": ctx.off("cpu", 1.0),
              "cpu auto": ctx.off("cpu"), "hybrid 0.4 of the KV, split 0.5": ctx.off("hybrid", 0.5,
                                                                               gpu_kv_budget_gib=0.4 * kv_gib)}
    exact = {}
    for name, offload in checks.items():
        exact[name] = _match(engine.generate(prompts, GenerationSettings(max_new_tokens=new, ignore_eos=True,
                                                                         offload=offload)).token_ids, ref)
    exact["cpu split 0.5, eager (no CUDA graphs)"] = _match(engine.generate(prompts, GenerationSettings(
        max_new_tokens=new, ignore_eos=True, cuda_graph=False, offload=ctx.off("cpu", 0.5))).token_ids, ref)
    engine.offload_overlapped = False
    exact["cpu split 0.5, synchronous schedule"] = _match(engine.generate(
        prompts, GenerationSettings(max_new_tokens=new, ignore_eos=True, offload=ctx.off("cpu", 0.5))).token_ids, ref)
    engine.offload_overlapped = True
    ctx.details["exact_demo"] = {"prompt_lengths": lengths, "new_tokens": new, **exact}
    ctx.details["exact_families"] = _families_exact(ctx)
    worst_family = min(v["match_fraction"] for f in ctx.details["exact_families"].values() for v in f.values())
    ctx.notes.append("tiny presets of every family (fp32, mixed prompt lengths, 24 greedy tokens) vs GPU-resident: "
                     + "; ".join(f"{name}: " + ", ".join(f"{k} {v['match_fraction']:.0%}" for k, v in checks.items())
                                 for name, checks in ctx.details["exact_families"].items()))
    ctx.details["recompute_vs_prefill"] = {model.source: _recompute_vs_prefill(model, ctx)}
    worst = min([e["match_fraction"] for e in exact.values()] + [worst_family])
    ctx.notes.append(f"exactness ({ctx.args.exact_model}, {ctx.dtype}, {len(prompts)} prompts of {min(lengths)}-{max(lengths)} "
                 f"tokens, {new} greedy tokens) vs GPU-resident: " +
                 "; ".join(f"{k}: {v['match_fraction']:.0%}" for k, v in exact.items()))
    ctx.headlines.append(Headline("offload_exact_tokens_match", worst,
                              f"fraction of sequences token-identical to GPU-resident decoding, worst placement/split "
                              f"({ctx.args.exact_model}, {ctx.dtype}, {new} tokens)", peer="GPU-resident placement"))
    del model, engine
    _free()


def _families_exact(ctx: _Run) -> dict:
    """Every family's tiny preset (Llama, Llama-3 GQA, Mistral window, Qwen2 bias, Qwen3 k-norm, OPT) in fp32:
    offloaded tokens against GPU-resident ones, recompute on and off, CUDA-graphed layers where there is a GPU."""
    from engine.presets import TINY_PRESETS

    out = {}
    chosen = [n.strip() for n in getattr(ctx.args, "families", "").split(",") if n.strip()] or TINY_PRESETS
    for name in chosen:
        model = load_model(f"synthetic:{name}", device=ctx.device, dtype="float32")
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, model.spec.vocab_size, (n,), generator=gen).tolist() for n in (5, 40, 17, 40)]
        engine = Generator(model)
        settings = lambda offload: GenerationSettings(max_new_tokens=24, ignore_eos=True, offload=offload)  # noqa: E731
        ref = engine.generate(prompts, settings(OffloadSettings())).token_ids
        out[name] = {label: _match(engine.generate(prompts, settings(offload)).token_ids, ref) for label, offload in (
            ("cpu split 0", OffloadSettings(placement="cpu", split=0.0, chunk_tokens=7)),
            ("cpu split 0.6", OffloadSettings(placement="cpu", split=0.6, chunk_tokens=7)),
            ("hybrid split 1", OffloadSettings(placement="hybrid", gpu_kv_budget_gib=1e-4, split=1.0, chunk_tokens=5)))}
        del model, engine
    return out


def _recompute_vs_prefill(model, ctx: _Run, *, batch: int = 4, length: int = 300) -> dict:
    return recompute_vs_prefill(model, batch=batch, length=length, chunk_tokens=ctx.args.chunk_tokens)


def recompute_vs_prefill(model, *, batch: int, length: int, chunk_tokens: int) -> dict:
    """Recomputed K/V (the runtime's fused GEMM + RoPE kernel) against the prefill's, element by element."""
    from engine.decode import forward
    from engine.decode.kv_cache import KVCache
    from engine.offload.runtime import OffloadRuntime
    from engine.offload.store import OffloadStore
    from engine.offload.placement import plan_for

    spec = model.spec
    ids = torch.randint(3, spec.vocab_size, (batch, length), generator=torch.Generator().manual_seed(3)).to(model.device)
    lens = torch.full((batch,), length, device=model.device)
    cache = KVCache(spec, batch=batch, max_tokens=length + 1, dtype=model.dtype, device=model.device)
    forward.prefill(model.adapter, cache, ids, lens)
    plan = plan_for(spec, OffloadSettings(placement="cpu", split=1.0, chunk_tokens=chunk_tokens), device=model.device,
                    batch=batch, prompt_tokens=length, new_tokens=1)
    store = OffloadStore(spec, plan, dtype=model.dtype, device=model.device)
    runtime = OffloadRuntime(model.adapter, plan, store, forward.decode_attention_torch, prompt_lens=[length] * batch)
    forward.prefill(model.adapter, runtime, ids, lens)
    torch.cuda.synchronize() if model.device.type == "cuda" else None
    differ = {"k": 0, "v": 0}
    total, worst = 0, {"k": 0.0, "v": 0.0}
    with torch.inference_mode():
        for layer in range(spec.num_layers):
            for lo, hi in plan.steps[0].chunks:
                runtime.load_act(layer, 0, lo, hi)
            runtime.recompute_layer(layer, 0, plan.steps[0].chunks)
            staged = store.staged_segment(0, length)
            got = staged.k, staged.v
            want = cache.layer(layer, length)
            for name, a, b in (("k", got[0], want[0]), ("v", got[1], want[1])):
                differ[name] += int((a != b).sum())
                worst[name] = max(worst[name], float((a.float() - b.float()).abs().max()))
            total += want[0].numel()
    runtime.release()
    return {"elements_per_tensor": total, "k_differing": differ["k"], "v_differing": differ["v"],
            "k_max_abs_diff": worst["k"], "v_max_abs_diff": worst["v"], "batch": batch, "length": length}


def _part_mha(ctx: _Run) -> None:
    batch, plen, new = (2, 256, 16) if ctx.quick else (8, 2048, 64)
    model, prompts, engine, shape = _setup(ctx, ctx.args.mha_model, "synthetic:tiny-llama", batch, plen, new)
    mk = lambda offload: GenerationSettings(max_new_tokens=new, ignore_eos=True, offload=offload)  # noqa: E731
    engine.generate(prompts, GenerationSettings(max_new_tokens=4, ignore_eos=True))  # warm-up
    resident = _measure(engine, prompts, mk(OffloadSettings()), ctx.args.repeat)
    paper = paper_split(model.spec, batch=batch)
    configs = {"cpu, split 0 (all K/V copied)": ctx.off("cpu", 0.0), "cpu, auto split": ctx.off("cpu"),
               "cpu, split 1 (all recomputed)": ctx.off("cpu", 1.0),
               f"cpu, paper's fixed split {paper:.2f}": ctx.off("cpu", round(paper, 4)),
               "hybrid 4 GiB GPU budget, auto split": ctx.off("hybrid", gpu_kv_budget_gib=4.0 if not ctx.quick else 0.002)}
    measured = {name: _measure(engine, prompts, mk(o), ctx.args.repeat) for name, o in configs.items()}
    engine.offload_overlapped = False
    measured["cpu, auto split, synchronous schedule"] = _measure(engine, prompts, mk(ctx.off("cpu")), 1)
    engine.offload_overlapped = True
    measured["cpu, auto split, eager layers (no CUDA graphs)"] = _measure(
        engine, prompts, GenerationSettings(max_new_tokens=new, ignore_eos=True, cuda_graph=False,
                                            offload=ctx.off("cpu")), 1)
    peer_ms = None
    if ctx.device == "cuda":
        try:
            peer_ms = _hf_step_ms(model.hf_model, prompts, ctx.args.peer_tokens, cache_implementation="offloaded")
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            ctx.notes.append(f"transformers offloaded cache did not run: {type(exc).__name__}: {str(exc)[:300]}")
    ctx.rows.append(_row(f"GPU-resident KV, CUDA graph ({shape})", resident, batch))
    full = measured["cpu, split 0 (all K/V copied)"]
    auto = measured["cpu, auto split"]
    for name, m in measured.items():
        ctx.rows.append(_row(f"{name} ({shape})", m, batch, peer="transformers offloaded" if peer_ms else None,
                         peer_ms=peer_ms))
        if "synchronous" not in name and "eager" not in name:
            ctx.predictions.append((name, m["predicted_ms"], m["ms"]))
    if peer_ms:
        ctx.rows.append(Row(case=f"transformers generate, offloaded cache ({model.source} B{batch} P{plen}, "
                             f"{ctx.args.peer_tokens} tokens)", ms=peer_ms, tok_s=batch / (peer_ms * 1e-3)))
    ctx.details["mha_tokens_vs_resident"] = {name: _match(m["tokens"], resident["tokens"]) for name, m in measured.items()}
    ctx.details["recompute_vs_prefill"] = {**ctx.details.get("recompute_vs_prefill", {}),
                                           model.source: _recompute_vs_prefill(model, ctx)}
    ctx.notes.append("7B tokens vs GPU-resident (random weights: near-flat logits, so bf16 rounding of recomputed K/V "
                 "can flip a greedy choice): " + "; ".join(
                     f"{k}: {v['match_fraction']:.0%}" for k, v in ctx.details["mha_tokens_vs_resident"].items()))
    ctx.notes.append(f"auto split chose {auto['split']:.2f} of the offloaded tokens (median step): {auto['reason']}")
    ctx.headlines.append(Headline("offload_full_pct_pcie_floor", 100 * full["floor_ms"] / full["ms"],
                              f"% of the PCIe floor, split 0, all KV on the CPU ({shape})",
                              peer="PCIe floor ms: K/V bytes per step / best measured H2D bandwidth",
                              peer_value=full["floor_ms"]))
    ctx.headlines.append(Headline("kvpr_step_ratio_vs_full", auto["ms"] / full["ms"],
                              f"auto-split step / split-0 step ({shape}; target <= 0.60)",
                              peer="split 0 step ms", peer_value=full["ms"]))
    ctx.headlines.append(Headline("offload_decode_tok_s", batch / (auto["ms"] * 1e-3),
                              f"tok/s, auto split, all KV on the CPU ({shape})",
                              peer="transformers generate, cache_implementation='offloaded', same prompts",
                              peer_value=batch / (peer_ms * 1e-3) if peer_ms else None))
    del model, engine
    _free()


def _part_gqa(ctx: _Run) -> None:
    batch, plen, new = (2, 256, 8) if ctx.quick else (16, 4096, 32)
    model, prompts, engine, shape = _setup(ctx, ctx.args.gqa_model, "synthetic:tiny-qwen2", batch, plen, new)
    m = _measure(engine, prompts, GenerationSettings(max_new_tokens=new, ignore_eos=True, offload=ctx.off("cpu")),
                 ctx.args.repeat)
    ctx.rows.append(_row(f"cpu, auto split ({shape})", m, batch))
    ctx.predictions.append((f"gqa cpu auto ({shape})", m["predicted_ms"], m["ms"]))
    ctx.notes.append(f"GQA scheduler: split {m['split']:.2f}; reason: {m['reason']}")
    ctx.headlines.append(Headline("gqa_offload_pct_pcie_floor", 100 * m["floor_ms"] / m["ms"],
                              f"% of the PCIe floor, auto split (chose {m['split']:.2f}), all KV on the CPU ({shape})",
                              peer="PCIe floor ms", peer_value=m["floor_ms"]))
    del model, engine
    _free()


def _part_hybrid(ctx: _Run) -> None:
    batch, plen, new = (2, 384, 8) if ctx.quick else (16, 8192, 32)
    # Llama-2's context is 4096: random weights have no trained length, so the preset's is lengthened.
    model, prompts, engine, shape = _setup(ctx, ctx.args.mha_model, "synthetic:tiny-llama", batch, plen, new,
                                           max_positions=max(4096, plen + new))
    kv_gb = model.spec.kv_bytes_per_token * batch * (plen + new) / 1e9
    mk = lambda offload: GenerationSettings(max_new_tokens=new, ignore_eos=True, offload=offload)  # noqa: E731
    hybrid = _measure(engine, prompts, mk(ctx.off("hybrid")), 1)
    cpu = _measure(engine, prompts, mk(ctx.off("cpu")), 1)
    ctx.rows.append(_row(f"hybrid auto ({shape}, K/V {kv_gb:.1f} GB)", hybrid, batch, peer="all-CPU auto",
                     peer_ms=cpu["ms"]))
    ctx.rows.append(_row(f"cpu, auto split ({shape})", cpu, batch))
    ctx.predictions += [(f"hybrid auto ({shape})", hybrid["predicted_ms"], hybrid["ms"]),
                    (f"cpu auto ({shape})", cpu["predicted_ms"], cpu["ms"])]
    ctx.notes.append(f"hybrid: {hybrid['budget']}; split {hybrid['split']:.2f}")
    ctx.headlines.append(Headline("hybrid_vs_cpu_ratio", cpu["ms"] / hybrid["ms"],
                              f"all-CPU step / hybrid step, both auto ({shape}; target >= 1.5)",
                              peer="all-CPU auto step ms", peer_value=cpu["ms"]))
    if ctx.device == "cuda":
        try:
            hf_ms = _hf_step_ms(model.hf_model, prompts, 3)
            ctx.notes.append(f"transformers generate (dynamic cache) on {shape}: {hf_ms:.1f} ms/step")
        except torch.OutOfMemoryError as exc:
            ctx.notes.append(f"transformers generate (dynamic cache) on {shape}: out of memory "
                         f"({str(exc).splitlines()[0][:160]})")
    del model, engine
    _free()


def _part_telemetry(ctx: _Run) -> None:
    args, device, dtype, quick = ctx.args, ctx.device, ctx.dtype, ctx.quick
    rows, headlines, notes, details, off = ctx.rows, ctx.headlines, ctx.notes, ctx.details, ctx.off
    """Recorder overhead on the mha shape, and a trace of a short offloaded KVPR run."""
    from engine.telemetry import CuptiPmSampler, NvmlSampler, Recorder, step_metrics
    from engine.telemetry.export import cupti_counters, nvml_counters, step_counters, write_trace

    batch, plen, new = (2, 256, 16) if quick else (8, 2048, 64)
    model, prompts, engine, shape = _setup(ctx, ctx.args.mha_model, "synthetic:tiny-llama", batch, plen, new)
    settings = {"cpu auto": GenerationSettings(max_new_tokens=new, ignore_eos=True, offload=off("cpu")),
                "GPU-resident": GenerationSettings(max_new_tokens=new, ignore_eos=True)}
    ratios = {}
    for name, gen_settings in settings.items():
        engine.recorder = None
        engine.generate(prompts, GenerationSettings(max_new_tokens=4, ignore_eos=True))  # warm-up
        timed = {}
        for mode in ("off", "on", "off", "on"):  # interleaved, so drift hits both alike
            recorder = Recorder(model.device) if mode == "on" else None
            engine.recorder = recorder
            timed.setdefault(mode, []).append(_measure(engine, prompts, gen_settings, 1)["ms"])
            if recorder is not None:
                recorder.flush()
                details.setdefault("recorder_spans", {})[name] = len(recorder.spans()[0])
                recorder.close()
        off_ms, on_ms = statistics.median(timed["off"]), statistics.median(timed["on"])
        ratios[name] = off_ms / on_ms
        rows.append(Row(case=f"{name}, recorder off ({shape})", ms=off_ms, tok_s=batch / (off_ms * 1e-3)))
        rows.append(Row(case=f"{name}, recorder on ({shape})", ms=on_ms, tok_s=batch / (on_ms * 1e-3),
                        peer="recorder off", peer_ms=off_ms))
    engine.recorder = None
    details["telemetry_ratios"] = ratios
    headlines.append(Headline("telemetry_overhead_ratio", min(ratios.values()),
                              f"decode tok/s with the recorder on / off, worst of {', '.join(ratios)} ({shape}; "
                              "target >= 0.97)", peer="recorder off"))
    # A short recorded run with KVPR on: the committed trace.
    recorder = Recorder(model.device)
    sampler = NvmlSampler(0, time_origin_ns=recorder.origin_ns) if device == "cuda" else None
    started = sampler.start() if sampler is not None else False
    pm = CuptiPmSampler(0)
    pm_ok = device == "cuda" and pm.probe().available
    notes.append(f"CUPTI PM sampling: {pm.probe().reason}")
    if pm_ok:
        pm.start()
    engine.recorder = recorder
    short = GenerationSettings(max_new_tokens=6, ignore_eos=True, offload=off("cpu"))
    engine.generate(prompts, short)
    engine.recorder = None
    recorder.flush()
    pm_samples = pm.stop() if pm_ok else []
    samples = []
    if sampler is not None:
        sampler.stop()
        samples = sampler.samples()[0]
    spans, _ = recorder.spans()
    metrics = step_metrics(recorder.steps(), spans, tokens_per_step=batch)
    counters = {**nvml_counters(samples), **step_counters(metrics),
                **cupti_counters(pm_samples, origin_wall_ns=recorder.origin_wall_ns)}
    details["cupti_samples"] = len(pm_samples)
    plan = engine.plan
    path = write_trace(args.results_dir / f"{'offload_quick' if quick else 'offload'}_trace.json.gz", spans, counters=counters, metadata={
        "model": model.source, "shape": f"B{batch} P{plen}", "placement": "cpu", "split": "auto",
        "plan_reason": plan.steps[0].reason, "predicted_step_ms": plan.steps[0].predicted_ms,
        "nvml": "sampled" if started else (sampler.why_unavailable if sampler is not None else "no GPU"),
        "cupti": pm.probe().reason})
    recorder.close()
    details["trace"] = {"file": path.name, "spans": len(spans), "steps": len(metrics),
                        "nvml": "sampled" if started else "unavailable",
                        "payload_gb_s": [m.payload_gb_s for m in metrics]}
    notes.append(f"trace of a 6-token offloaded run ({shape}, cpu auto): {path.name}, {len(spans)} spans, "
                 f"NVML {'sampled' if started else 'unavailable'}")
    del model, engine
    _free()


PART_FUNCTIONS = {"exact": _part_exact, "mha": _part_mha, "gqa": _part_gqa, "hybrid": _part_hybrid,
                  "telemetry": _part_telemetry}
