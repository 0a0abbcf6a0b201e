"""KV Lab at the scale it exists for: K/V larger than the GPU, contexts to 128K tokens, shapes chosen from this
machine's memories.

Parts (--parts, all by default):
- offsets:  the decode-attention kernel over views whose element offsets pass 2^31 (a position-major staging view of
            llama-2-7b B16 S16400, whose key row stride is B*2*Hkv*D; a GQA staging view with B*S >= 2M tokens)
            against the torch reference in fp32, on fresh random data.
- rope:     K/V recomputed from activations (fused GEMM, k-norm, RoPE kernel) against the prefill's K/V for head
            dims 64, 80, 96, 128, 256 (and partial rotary), fp32 and bf16; offloaded tokens against GPU-resident ones.
- prefill:  a 128K-token prompt (and a mixed-length batch): the estimated peak of weights + K/V + prefill
            temporaries against torch's measured peak allocation.
- long_mha: an MHA model with a long context (llama-2-7b-32k) at 32K, batch from the rule below: hybrid auto with
            KVPR (auto split) and with split 0; all K/V on the CPU at the largest batch the host holds; transformers'
            offloaded cache where it runs.
- long_gqa: llama-3.1-8b (GQA) at 128K, batch from the rule: hybrid auto, all K/V on the CPU (the largest batch host
            memory holds), transformers' offloaded cache where it runs.
- hf_shape: transformers' offloaded cache at the largest shape it runs here (B1 at 128K for llama-3.1-8b, B1 at 32K
            for the MHA model; three 128K prefills per figure) beside ours at that shape, in the same call: hybrid
            auto (what a user gets: at B1 the K/V fit the GPU, so it keeps them there) and all K/V on the CPU (the
            same bytes over PCIe as transformers). The rule's batch cannot run transformers' offloaded cache on this
            host: it keeps every layer's K/V in host memory.
The rule: K/V at least 1.5x what fits on the GPU beside the weights, with the offloaded part fitting host memory;
each part prints which shape it chose and why. When host memory is smaller than 1.5x the GPU's K/V room (an H200:
139 GiB GPU, 125 GiB host), no shape has K/V past the GPU that all fits host memory, so all-CPU runs take the
largest batch host memory holds; an all-CPU step is PCIe-bound, so its tok/s does not depend on the batch (its
% of the PCIe floor says so), and the hybrid / all-CPU ratio compares tok/s at the same context.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
import traceback
from dataclasses import dataclass, field

import torch

from bench.report import Headline, Row, SuiteResult, write_results
from engine import GenerationSettings, Generator, load_model
from engine.errors import KVLabError
from engine.memory import available_bytes
from engine.offload.placement import human_bytes, prefill_working_bytes
from engine.offload.profiler import hardware_profile
from engine.settings import OffloadSettings

PARTS = ("offsets", "rope", "prefill", "long_mha", "long_gqa", "hf_shape")
ROPE_HEAD_DIMS = (64, 80, 96, 128, 256)


def add_arguments(parser) -> None:
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--mha-model", default="synthetic:llama-2-7b-32k")
    parser.add_argument("--gqa-model", default="synthetic:llama-3.1-8b")
    parser.add_argument("--mha-context", type=int, default=32768)
    parser.add_argument("--gqa-context", type=int, default=131072)
    parser.add_argument("--new-tokens", type=int, default=8, help="decode steps of each long run")
    parser.add_argument("--hf-tokens", type=int, default=3, help="new tokens of transformers' offloaded peer")
    parser.add_argument("--kv-over-gpu", type=float, default=1.5, help="the rule's K/V / GPU K/V room")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run, not the issue's figures")
    parser.add_argument("--tag", default="")


@dataclass
class _Run:
    args: object
    device: str
    quick: bool
    rows: list = field(default_factory=list)
    headlines: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def result(self) -> SuiteResult:
        headlines = self.headlines
        if self.quick:
            self.notes.append("quick run: headlines not recorded: " +
                              "; ".join(f"{h.key}={h.value:.4g}" for h in headlines))
            headlines = []
        suite = "scale_quick" if self.quick else "scale" + (f"_{self.args.tag}" if self.args.tag else "")
        return SuiteResult(suite=suite, rows=list(self.rows), headlines=list(headlines), notes=list(self.notes),
                           details=dict(self.details))


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run(args) -> SuiteResult:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown --parts {unknown}; choose from {list(PARTS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = _Run(args=args, device=device, quick=args.quick or device == "cpu")
    profile = hardware_profile(device, refresh=device == "cuda")
    ctx.details["profile"] = json.loads(profile.to_json())
    ctx.notes.append(f"H2D bandwidth measured in this run: {profile.peak_h2d_gb_s:.1f} GB/s best")
    for part in parts:
        start = time.perf_counter()
        try:
            PART_FUNCTIONS[part](ctx)
        except Exception as exc:  # noqa: BLE001 - one part's failure is reported; the others' results are kept
            ctx.notes.append(f"part {part} failed: {type(exc).__name__}: {str(exc)[:400]}")
            ctx.details.setdefault("failures", {})[part] = traceback.format_exc()[-3000:]
        ctx.details.setdefault("part_seconds", {})[part] = round(time.perf_counter() - start, 1)
        _free()
        if not ctx.quick:  # what is measured so far survives a later part's crash or a time limit
            write_results(ctx.result(), results_dir=args.results_dir, command=getattr(args, "command", None))
    return ctx.result()


# -- offsets ------------------------------------------------------------------------------------------------
def _part_offsets(ctx: _Run) -> None:
    from kernels.decode_attention import decode_attention_reference, decode_attention_segments
    from kernels.segments import KVSegment

    cases = [("llama-2-7b staging B16 S16400 (MHA 32x128)", 16, 32, 32, 16400, 128),
             ("GQA staging B64 S32768 (32 q / 8 kv heads x 128), B*S = 2.1M tokens", 64, 32, 8, 32768, 128)]
    if ctx.quick:
        cases = [("tiny staging B3 S97", 3, 4, 2, 97, 16)]
    out = {}
    for label, batch, heads, kv_heads, slots, dim in cases:
        gen = torch.Generator(device=ctx.device).manual_seed(11)
        dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
        stage = torch.randn((slots, batch, 2, kv_heads, dim), dtype=dtype, device=ctx.device, generator=gen)
        k, v = stage[:, :, 0].permute(1, 2, 0, 3), stage[:, :, 1].permute(1, 2, 0, 3)
        q = torch.randn((batch, heads, dim), dtype=dtype, device=ctx.device, generator=gen)
        lens = torch.randint(slots // 2, slots + 1, (batch,), generator=gen, device=ctx.device).to(torch.int32)
        lens[0] = slots
        largest = (slots - 1) * k.stride(2) + (batch - 1) * k.stride(0) + (kv_heads - 1) * k.stride(1) + dim
        got = decode_attention_segments(q, (KVSegment(k, v, 0),), lens, sm_scale=dim**-0.5)
        want = decode_attention_reference(q, k, v, lens, sm_scale=dim**-0.5)
        err = float((got.float() - want.float()).norm() / want.float().norm())
        finite = bool(torch.isfinite(got).all())
        out[label] = {"largest_element_offset": largest, "past_2_31": largest > 2**31, "rel_error": err,
                      "finite": finite, "kv_bytes": 2 * stage.numel() * stage.element_size() // 2}
        ctx.rows.append(Row(case=f"offsets: {label}, largest offset {largest:,}", extra=out[label]))
        ctx.notes.append(f"offsets {label}: largest element offset {largest:,} ({'>' if largest > 2**31 else '<='} "
                         f"2^31), relative error vs fp32 reference {err:.2e}, all finite: {finite}")
        del stage, k, v, q, got, want
        _free()
    ctx.details["offsets"] = out
    ctx.headlines.append(Headline("offsets_64bit_max_rel_error", max(o["rel_error"] for o in out.values()),
                                  "relative error of the kernel over views with element offsets past 2^31, vs the "
                                  "fp32 torch reference (bf16 inputs)"))


# -- rope ------------------------------------------------------------------------------------------------
def _rope_model(head_dim: int, *, dtype: str, device: str, rotary: float = 1.0):
    """A 2-layer Llama (or, for partial rotary, Phi-3) with heads of `head_dim`, random weights, made from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.adapters import adapter_for
    from engine.loader import LoadedModel, init_random_weights_
    from engine.tokenizer import byte_tokenizer

    heads, kv_heads = 4, 2
    kw = dict(hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim, num_hidden_layers=2,
              num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=384, max_position_embeddings=1024,
              head_dim=head_dim, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model_type = "llama"
    if rotary != 1.0:
        model_type = "phi3"
        kw.pop("head_dim")
        kw["partial_rotary_factor"] = rotary
    config = AutoConfig.for_model(model_type, **kw)
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    hf.to_empty(device=device)
    init_random_weights_(hf, std=0.2, seed=0)
    hf.eval()
    tok = byte_tokenizer(bos=1, eos=2, pad=0)
    return LoadedModel(source=f"rope-test:{model_type}-d{head_dim}", name=f"d{head_dim}", hf_model=hf,
                       adapter=adapter_for(hf), tokenizer=tok, device=torch.device(device), dtype=torch_dtype,
                       load_s=0.0)


def _part_rope(ctx: _Run) -> None:
    from bench.suites.offload import recompute_vs_prefill

    out = {}
    cases = [(d, 1.0) for d in ROPE_HEAD_DIMS] + [(96, 0.75)]
    for head_dim, rotary in cases:
        for dtype in ("float32", "bfloat16") if ctx.device == "cuda" else ("float32",):
            label = f"head dim {head_dim}" + (f", rotary {rotary:g}" if rotary != 1.0 else "") + f", {dtype}"
            try:
                model = _rope_model(head_dim, dtype=dtype, device=ctx.device, rotary=rotary)
            except Exception as exc:  # noqa: BLE001 - a family not yet supported is reported, not fatal
                out[label] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                continue
            kv = recompute_vs_prefill(model, batch=3, length=97, chunk_tokens=32)
            gen = torch.Generator().manual_seed(4)
            prompts = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in (97, 40, 1)]
            engine = Generator(model)
            mk = lambda offload: GenerationSettings(max_new_tokens=12, ignore_eos=True, offload=offload)  # noqa: E731
            ref = engine.generate(prompts, mk(OffloadSettings()), keep_logits=True)
            runs = {}
            for name, offload in (("cpu split 1", OffloadSettings(placement="cpu", split=1.0, chunk_tokens=32)),
                                  ("hybrid split 0.5", OffloadSettings(placement="hybrid", split=0.5, chunk_tokens=16,
                                                                       gpu_kv_budget_gib=1e-4))):
                got = engine.generate(prompts, mk(offload), keep_logits=True)
                worst = max(float((a - b).abs().max()) for a, b in zip(got.logits, ref.logits))
                runs[name] = {"tokens_equal": got.token_ids == ref.token_ids, "max_logit_diff": worst,
                              "attention": engine.attention_why}
            out[label] = {"recompute_vs_prefill": kv, "offloaded_vs_resident": runs}
            ctx.notes.append(f"rope {label}: recomputed K differs in {kv['k_differing']} of {kv['elements_per_tensor']}"
                             f" elements (max {kv['k_max_abs_diff']:.2e}), V in {kv['v_differing']}; offloaded tokens "
                             "equal to resident: " + ", ".join(f"{n} {r['tokens_equal']}" for n, r in runs.items()))
            del model, engine
            _free()
    ctx.details["rope"] = out
    fp32 = [v for k, v in out.items() if "float32" in k and "error" not in v]
    ctx.headlines.append(Headline(
        "recompute_head_dims_exact", float(all(r["tokens_equal"] for v in fp32 for r in v["offloaded_vs_resident"].values())),
        f"1 if offloaded recomputation gave the GPU-resident tokens in fp32 for every head dim of {ROPE_HEAD_DIMS} "
        "and partial rotary (0.75 of 96), else 0"))


# -- prefill peak memory -----------------------------------------------------------------------------------
def _part_prefill(ctx: _Run) -> None:
    source = ctx.args.gqa_model if not ctx.quick else "synthetic:tiny-llama"
    model = load_model(source, device=ctx.device, dtype="bfloat16" if ctx.device == "cuda" else "float32")
    spec = model.spec
    context = ctx.args.gqa_context if not ctx.quick else 300
    cases = {"one 128K-token prompt" if not ctx.quick else "one prompt": [context - 2],
             "mixed lengths (64K, 40K)" if not ctx.quick else "mixed": [context // 2, context * 5 // 16]}
    out = {}
    engine = Generator(model)
    for label, lengths in cases.items():
        gen = torch.Generator().manual_seed(5)
        prompts = [torch.randint(3, spec.vocab_size, (n,), generator=gen).tolist() for n in lengths]
        _free()
        if ctx.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        result = engine.generate(prompts, GenerationSettings(max_new_tokens=2, ignore_eos=True))
        seconds = time.perf_counter() - start
        kv = spec.kv_bytes_per_token * len(lengths) * (max(lengths) + 2)
        working = prefill_working_bytes(spec, batch=len(lengths), prompt_tokens=max(lengths))
        estimate = model.spec.weight_bytes + kv + working
        row = {"lengths": lengths, "prefill_ms": result.prefill_ms, "seconds": seconds, "kv_bytes": kv,
               "working_estimate_bytes": working, "estimate_bytes": estimate}
        if ctx.device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            row |= {"measured_peak_bytes": peak, "weights_allocated_before": before,
                    "estimate_error_pct": 100 * (estimate - peak) / peak,
                    "working_measured_bytes": peak - before - kv}
            ctx.notes.append(f"prefill {label} ({source}): estimated peak {human_bytes(estimate)} (weights "
                             f"{human_bytes(spec.weight_bytes)} + K/V {human_bytes(kv)} + temporaries "
                             f"{human_bytes(working)}) vs measured {human_bytes(peak)}: "
                             f"{row['estimate_error_pct']:+.1f} %; prefill {result.prefill_ms / 1e3:.1f} s")
        out[label] = row
        ctx.rows.append(Row(case=f"prefill {label} ({source})", ms=result.prefill_ms, extra=row))
    ctx.details["prefill_memory"] = out
    if ctx.device == "cuda":
        worst = max(abs(r["estimate_error_pct"]) for r in out.values())
        ctx.headlines.append(Headline("prefill_peak_estimate_error_pct", worst,
                                      "% |estimated - measured| peak GPU allocation of a 128K-token prefill (weights "
                                      "+ K/V + temporaries), worst case; target <= 10"))
    del model, engine
    _free()


# -- long contexts ---------------------------------------------------------------------------------------
def choose_batch(spec, *, context: int, new_tokens: int, device: str, kv_over_gpu: float) -> tuple[int, int, str]:
    """-> (hybrid batch, all-CPU batch, why) from the free GPU memory (weights loaded) and the host's memory."""
    per_seq = spec.kv_bytes_per_token * (context + new_tokens)
    if device == "cuda":
        gpu_free = torch.cuda.mem_get_info()[0]
    else:
        gpu_free = 4 * per_seq  # a CPU smoke run: pretend four sequences fit
    host = available_bytes(torch.device("cpu")) or 0
    room = gpu_free / per_seq  # sequences of K/V the GPU could hold beside the weights (before any working memory)
    batch = max(1, math.ceil(kv_over_gpu * room))
    why = (f"{human_bytes(per_seq)} of K/V per sequence at {context + new_tokens:,} tokens; {human_bytes(gpu_free)} "
           f"free on the GPU beside the weights holds {room:.2f} sequences; {kv_over_gpu:g}x that is batch {batch} "
           f"({human_bytes(batch * per_seq)} of K/V); host memory available: {human_bytes(host)}")
    cpu_batch = max(1, min(2, int(0.85 * host // per_seq)))
    if batch * per_seq > 0.85 * host:
        why += (f"; all-CPU at that batch would need {human_bytes(batch * per_seq)} of host memory, more than this "
                f"host has, so all-CPU runs batch {cpu_batch} (its step is PCIe-bound: tok/s does not depend on the "
                "batch)")
    else:
        cpu_batch = batch
    return batch, cpu_batch, why


def _fitting_batch(spec, batch: int, splits: dict, *, device, prompt_len: int, new: int) -> tuple[int, str]:
    """The rule's batch, or the largest below it whose hybrid runs under every split in `splits` fit GPU + host
    memory (planned and checked without allocating anything) -> (batch, a clause saying what was lowered)."""
    from engine.offload.placement import plan_for

    for b in range(batch, 0, -1):
        try:
            for split in splits.values():
                plan_for(spec, OffloadSettings(placement="hybrid", split=split), device=device, batch=b,
                         prompt_tokens=prompt_len, new_tokens=new)
        except KVLabError as exc:
            last = str(exc)
            continue
        return b, "" if b == batch else (f"; batch {batch} does not fit GPU + host memory under every split "
                                         f"({last[:300]}), so batch {b}, the largest that does")
    raise RuntimeError(f"no batch fits this machine's GPU and host memory at {prompt_len + new} tokens")


def _prompts(vocab: int, batch: int, length: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen).tolist()


def _measure(engine: Generator, prompts, settings: GenerationSettings) -> dict:
    result = engine.generate(prompts, settings)
    steady = result.step_ms[2:] or result.step_ms
    ms = statistics.median(steady)
    out = {"ms": ms, "step_ms": result.step_ms, "prefill_ms": result.prefill_ms, "tok_s": len(prompts) / (ms * 1e-3),
           "tokens": result.token_ids}
    plan = engine.plan if settings.offload.offloaded else None
    if plan is not None:
        steps = plan.steps[3: len(result.step_ms) + 1] or plan.steps
        out |= {"predicted_ms": statistics.median(p.predicted_ms for p in steps),
                "floor_ms": statistics.median(p.pcie_floor_ms for p in steps),
                "h2d_bytes": int(statistics.median(p.h2d_bytes for p in steps)),
                "split": statistics.median(p.split for p in steps), "reason": plan.steps[0].reason,
                "resident_tokens": plan.resident_tokens, "budget": plan.gpu_budget_note, "layers": engine.layers_why}
    return out


def _hf_offloaded_ms(hf_model, prompts, new_tokens: int) -> float:
    from bench.suites.offload import _hf_step_ms

    return _hf_step_ms(hf_model, prompts, new_tokens, cache_implementation="offloaded")


def _long_row(ctx: _Run, label: str, m: dict, batch: int, kv_bytes: int) -> None:
    extra = {k: m[k] for k in ("predicted_ms", "split", "reason", "resident_tokens", "budget", "prefill_ms", "layers",
                               "step_ms") if k in m} | {"kv_bytes": kv_bytes, "batch": batch}
    ctx.rows.append(Row(case=label, ms=m["ms"], tok_s=m["tok_s"], bytes_moved=m.get("h2d_bytes"),
                        pct_roofline=100 * m["floor_ms"] / m["ms"] if m.get("floor_ms") else None, extra=extra))


def _long(ctx: _Run, *, source: str, tiny: str, context: int, label: str, splits: dict) -> dict:
    """Hybrid runs of the rule's shape under each of `splits`, all-CPU at the largest batch host memory holds,
    transformers' offloaded cache where it runs. -> what was measured, by case."""
    new = ctx.args.new_tokens if not ctx.quick else 4
    if ctx.quick:
        source, context = tiny, 200
    model = load_model(source, device=ctx.device, dtype="bfloat16" if ctx.device == "cuda" else "float32")
    spec = model.spec
    batch, cpu_batch, why = choose_batch(spec, context=context, new_tokens=new, device=ctx.device,
                                         kv_over_gpu=ctx.args.kv_over_gpu)
    prompt_len = context - new
    batch, fitted = _fitting_batch(spec, batch, splits, device=model.device, prompt_len=prompt_len, new=new)
    why += fitted
    ctx.notes.append(f"{label} shape ({source}): {why}")
    engine = Generator(model)
    out = {"batch": batch, "cpu_batch": cpu_batch, "why": why}
    per_seq = spec.kv_bytes_per_token * context
    settings = lambda offload: GenerationSettings(max_new_tokens=new, ignore_eos=True, offload=offload)  # noqa: E731
    for name, split in splits.items():
        offload = OffloadSettings(placement="hybrid", split=split)
        try:
            m = _measure(engine, _prompts(spec.vocab_size, batch, prompt_len), settings(offload))
        except KVLabError as exc:
            ctx.notes.append(f"{label} hybrid {name} at batch {batch}: refused: {exc}")
            out[f"hybrid {name}"] = {"refused": str(exc)}
            continue
        m["kv_bytes"] = batch * per_seq
        _long_row(ctx, f"{label}: hybrid auto budget, {name} (B{batch} x {context:,}, K/V "
                       f"{human_bytes(batch * per_seq)})", m, batch, batch * per_seq)
        out[f"hybrid {name}"] = m
        ctx.notes.append(f"{label} hybrid {name}: {m['budget']}; split {m['split']:.2f}; {m['reason']}")
        _free()
    # The rule's shape all on the CPU: refused up front when host memory cannot hold it (what a user would see).
    if cpu_batch < batch:
        from engine.offload.placement import plan_for

        try:
            plan_for(spec, OffloadSettings(placement="cpu"), device=model.device, batch=batch,
                     prompt_tokens=prompt_len, new_tokens=new)
            out["cpu at the rule's batch"] = "fits"
        except KVLabError as exc:
            out["cpu at the rule's batch"] = f"refused before allocating: {exc}"
            ctx.notes.append(f"{label} all-CPU at batch {batch}: refused before allocating: {exc}")
    cpu_prompts = _prompts(spec.vocab_size, cpu_batch, prompt_len)
    m = _measure(engine, cpu_prompts, settings(OffloadSettings(placement="cpu")))
    _long_row(ctx, f"{label}: all K/V on the CPU, auto (B{cpu_batch} x {context:,}, K/V "
                   f"{human_bytes(cpu_batch * per_seq)})", m, cpu_batch, cpu_batch * per_seq)
    out["cpu auto"] = m
    _free()
    if ctx.device == "cuda":
        hf_prompts = cpu_prompts[:1]
        try:
            hf_ms = _hf_offloaded_ms(model.hf_model, hf_prompts, ctx.args.hf_tokens)
            out["hf offloaded"] = {"ms": hf_ms, "batch": 1, "tok_s": 1 / (hf_ms * 1e-3)}
            ours = _measure(engine, hf_prompts, settings(OffloadSettings(placement="cpu")))
            out["cpu auto, HF's shape"] = ours
            ctx.rows.append(Row(case=f"{label}: all K/V on the CPU, auto (B1 x {context:,}, transformers' shape)",
                                ms=ours["ms"], tok_s=ours["tok_s"], bytes_moved=ours.get("h2d_bytes"),
                                pct_roofline=100 * ours["floor_ms"] / ours["ms"],
                                peer="transformers generate, cache_implementation='offloaded'", peer_ms=hf_ms))
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is an answer, recorded
            out["hf offloaded"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            ctx.notes.append(f"{label}: transformers offloaded cache at B1 x {context:,}: {out['hf offloaded']['error']}")
    del model, engine
    _free()
    return out


def _part_long_mha(ctx: _Run) -> None:
    out = _long(ctx, source=ctx.args.mha_model, tiny="synthetic:tiny-llama", context=ctx.args.mha_context,
                label="MHA 32K", splits={"KVPR auto split": "auto", "split 0": 0.0})
    ctx.details["long_mha"] = _strip(out)
    _hf_headline(ctx, out, "long_mha_vs_hf_offloaded_ratio", "MHA model at 32K")
    auto, zero = out.get("hybrid KVPR auto split"), out.get("hybrid split 0")
    if isinstance(auto, dict) and isinstance(zero, dict) and "ms" in auto and "ms" in zero:
        ctx.headlines.append(Headline("long_mha_kvpr_vs_split0", zero["ms"] / auto["ms"],
                                      "hybrid split-0 step / hybrid KVPR-auto step, MHA model at 32K, rule's batch"))


def _part_long_gqa(ctx: _Run) -> None:
    out = _long(ctx, source=ctx.args.gqa_model, tiny="synthetic:tiny-llama3", context=ctx.args.gqa_context,
                label="GQA 128K", splits={"auto split": "auto"})
    ctx.details["long_gqa"] = _strip(out)
    hybrid, cpu = out.get("hybrid auto split"), out.get("cpu auto")
    if isinstance(hybrid, dict) and "ms" in hybrid:
        kv_gib = hybrid["kv_bytes"] / 2**30
        ctx.headlines.append(Headline("long_hybrid_pct_pcie_floor", 100 * hybrid["floor_ms"] / hybrid["ms"],
                                      "% of the PCIe floor of the offloaded part, llama-3.1-8b hybrid auto at 128K, "
                                      "rule's batch (target >= 95)"))
        ctx.headlines.append(Headline("max_kv_gib_run", kv_gib, "GiB of K/V decoded in this run (hybrid, 128K)"))
        if isinstance(cpu, dict) and "ms" in cpu:
            ctx.headlines.append(Headline("long_hybrid_vs_cpu_ratio", hybrid["tok_s"] / cpu["tok_s"],
                                          f"decode tok/s, hybrid auto (B{out['batch']}) / all K/V on the CPU "
                                          f"(B{out['cpu_batch']}), 128K context (target >= 1.5)"))
    _hf_headline(ctx, out, "long_vs_hf_offloaded_ratio", "llama-3.1-8b at 128K")


def _hf_headline(ctx: _Run, out: dict, key: str, what: str) -> None:
    hf, ours = out.get("hf offloaded", {}), out.get("cpu auto, HF's shape")
    if "ms" in hf and isinstance(ours, dict):
        ctx.headlines.append(Headline(key, hf["ms"] / ours["ms"],
                                      f"transformers offloaded step / ours (all K/V on the CPU), B1, {what} "
                                      "(target >= 6)", peer="transformers cache_implementation='offloaded'",
                                      peer_value=hf["ms"]))


def _strip(out: dict) -> dict:
    """The per-case figures without token lists (kept small)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "tokens"} if isinstance(v, dict) else v)
            for k, v in out.items()}


def _part_hf_shape(ctx: _Run) -> None:
    cases = (("GQA 128K", ctx.args.gqa_model, "synthetic:tiny-llama3", ctx.args.gqa_context, "long_vs_hf_offloaded_ratio",
              "long_cpu_vs_hf_offloaded_ratio"),
             ("MHA 32K", ctx.args.mha_model, "synthetic:tiny-llama", ctx.args.mha_context,
              "long_mha_vs_hf_offloaded_ratio", "long_mha_cpu_vs_hf_offloaded_ratio"))
    new = ctx.args.new_tokens if not ctx.quick else 4
    for label, source, tiny, context, key, cpu_key in cases:
        if ctx.quick:
            source, context = tiny, 200
        model = load_model(source, device=ctx.device, dtype="bfloat16" if ctx.device == "cuda" else "float32")
        spec, engine = model.spec, Generator(model)
        prompts = _prompts(spec.vocab_size, 1, context - new)
        host_need = ctx.args.kv_over_gpu * torch.cuda.mem_get_info()[0] if ctx.device == "cuda" else 0
        ctx.notes.append(f"{label} at transformers' shape (B1 x {context:,}, K/V "
                         f"{human_bytes(spec.kv_bytes_per_token * context)}): transformers' offloaded cache keeps "
                         f"every layer's K/V in host memory, so the rule's batch (K/V {human_bytes(host_need)}) "
                         f"cannot run it on this host ({human_bytes(available_bytes(torch.device('cpu')) or 0)} "
                         "available)")
        out: dict = {}
        settings = lambda offload: GenerationSettings(max_new_tokens=new, ignore_eos=True, offload=offload)  # noqa: E731
        for name, offload in (("hybrid auto", OffloadSettings(placement="hybrid")),
                              ("cpu auto", OffloadSettings(placement="cpu"))):
            m = _measure(engine, prompts, settings(offload))
            out[name] = m
            where = (f"{m['resident_tokens']:,} of {context:,} slots resident" if "resident_tokens" in m else "")
            ctx.notes.append(f"{label} {name} at B1: {m.get('budget', '')}; {where}; {m.get('reason', '')}")
            _free()
        if ctx.device == "cuda":
            try:
                hf_ms = _hf_offloaded_ms(model.hf_model, prompts, ctx.args.hf_tokens)
                out["hf offloaded"] = {"ms": hf_ms}
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run is an answer, recorded
                out["hf offloaded"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                ctx.notes.append(f"{label}: transformers offloaded cache at B1: {out['hf offloaded']['error']}")
        hf_ms = out.get("hf offloaded", {}).get("ms")
        peer = "transformers generate, cache_implementation='offloaded'" if hf_ms else None
        for name, what in (("hybrid auto", "hybrid auto"), ("cpu auto", "all K/V on the CPU, auto")):
            m = out[name]
            ctx.rows.append(Row(case=f"{label}: {what} (B1 x {context:,}, transformers' shape)", ms=m["ms"],
                                tok_s=m["tok_s"], bytes_moved=m.get("h2d_bytes"),
                                pct_roofline=100 * m["floor_ms"] / m["ms"] if m.get("floor_ms") else None,
                                peer=peer, peer_ms=hf_ms, extra={"resident_tokens": m.get("resident_tokens"),
                                                                 "prefill_ms": m["prefill_ms"]}))
        if hf_ms:
            hybrid, cpu = out["hybrid auto"], out["cpu auto"]
            resident = hybrid.get("resident_tokens")
            ctx.headlines.append(Headline(
                key, hf_ms / hybrid["ms"], f"transformers offloaded step / ours, hybrid auto, B1, {label}, same call "
                f"(target >= 6); ours keeps {resident if resident is not None else 'all'} of {context:,} slots on "
                f"the GPU here (equal bytes: {cpu_key})", peer="transformers cache_implementation='offloaded'",
                peer_value=hf_ms))
            ctx.headlines.append(Headline(
                cpu_key, hf_ms / cpu["ms"], f"transformers offloaded step / ours with all K/V on the CPU (the same "
                f"K/V bytes over PCIe), B1, {label}, same call", peer="transformers cache_implementation='offloaded'",
                peer_value=hf_ms))
        ctx.details.setdefault("hf_shape", {})[label] = _strip(out)
        del model, engine
        _free()


PART_FUNCTIONS = {"offsets": _part_offsets, "rope": _part_rope, "prefill": _part_prefill, "long_mha": _part_long_mha,
                  "long_gqa": _part_long_gqa, "hf_shape": _part_hf_shape}
