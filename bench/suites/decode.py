"""Decode with the KV cache on the GPU: the engine against transformers `generate`, plus a GPU exactness check.

Shape (issue default): synthetic:llama-2-7b, bf16, batch 8, prompt 2048, 64 new tokens. Decode step time
is taken the same way for every contender: (time to generate N tokens - time to generate 1) / (N - 1),
median over repeats, so prefill never counts. The roofline is weight bytes + KV bytes read per step over
the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.report import Headline, Row, SuiteResult
from bench.timing import device_copy_gb_s
from engine import GenerationSettings, Generator, load_model
from engine.errors import CompileError
from engine.hf_reference import hf_greedy, rel_err


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="synthetic:llama-2-7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peers", default="dynamic", help="comma list of transformers peers: dynamic, static")
    parser.add_argument("--exact-seqs", type=int, default=16, help="sequences in the GPU exactness check (0: skip)")
    parser.add_argument("--exact-tokens", type=int, default=32)
    parser.add_argument("--exact-models", default="", help="extra models for the exactness check, comma list")
    parser.add_argument("--ours", default="", help="comma list of our variants to time (default: all): auto, "
                        "'torch attention', 'triton attention', 'auto, eager (no graph)', compiled")
    parser.add_argument("--tag", default="", help="suffix of the result files' name (decode_<tag>)")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return (time.perf_counter() - start) * 1e3


def _step_ms(run, new_tokens: int, repeat: int, *, warmup_tokens: int = 2) -> tuple[float, list[float]]:
    """Median over repeats of (t(N tokens) - t(1 token)) / (N - 1); run(n) generates n tokens."""
    run(warmup_tokens)  # warm-up: allocator, cuBLAS handles, graph capture paths (and compiling, when asked)
    samples = []
    for _ in range(repeat):
        full = _timed(lambda: run(new_tokens))
        first = _timed(lambda: run(1))
        samples.append((full - first) / (new_tokens - 1))
    return statistics.median(samples), samples


def _compiled_vs_eager(ours, new_tokens: int) -> dict:
    """Greedy tokens and logits of the compiled step against the eager one, up to each first divergence."""
    eager, compiled = ours(new_tokens, keep_logits=True), ours(new_tokens, compile=True, keep_logits=True)
    return {**compare_greedy(compiled.token_ids, compiled.logits, eager.token_ids, eager.logits),
            "internal_step_ms_median": statistics.median(compiled.step_ms)}


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


def exactness(model, *, num_seqs: int, new_tokens: int, seed: int = 0, fp32_reference: bool = True,
              compiled: bool = False) -> dict:
    """Greedy tokens and logits of the engine vs transformers on fresh random prompts of mixed lengths.

    In bf16 two correct implementations drift apart by rounding alone, so where memory allows the same
    prompts also run through transformers in fp32 on upcast weights: the engine's and transformers' bf16
    errors against that reference say whether the engine is any less exact than the framework itself.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, min(512, model.spec.max_positions - new_tokens), (num_seqs,), generator=gen).tolist()
    prompts = [torch.randint(3, model.spec.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    engine = Generator(model)
    ours = engine.generate(prompts, GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True), keep_logits=True)
    ref_tokens, ref_logits = hf_greedy(model.hf_model, prompts, max_new_tokens=new_tokens)

    result = {"model": model.source, "dtype": str(model.dtype), "num_seqs": num_seqs, "new_tokens": new_tokens,
              "prompt_lengths": lengths, "attention": engine.attention_why,
              **compare_greedy(ours.token_ids, ours.logits, ref_tokens, ref_logits)}
    if compiled:  # the compiled step against transformers too (fused kernels round differently)
        settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True, compile=True)
        fused = engine.generate(prompts, settings, keep_logits=True)
        result["compiled_vs_transformers"] = compare_greedy(fused.token_ids, fused.logits, ref_tokens, ref_logits)
    if fp32_reference and model.dtype != torch.float32:
        import copy

        try:
            reference = copy.deepcopy(model.hf_model).float()
            fp_tokens, fp_logits = hf_greedy(reference, prompts, max_new_tokens=new_tokens)
            del reference
            result["ours_vs_fp32"] = compare_greedy(ours.token_ids, ours.logits, fp_tokens, fp_logits)
            result["transformers_bf16_vs_fp32"] = compare_greedy(ref_tokens, ref_logits, fp_tokens, fp_logits)
        except torch.OutOfMemoryError:
            result["fp32_reference"] = "skipped: the fp32 copy did not fit in GPU memory"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


VARIANTS = ("auto", "torch attention", "triton attention", "auto, eager (no graph)", "compiled")


def _wanted_variants(args) -> list[str]:
    """--ours as a list, checked before any model is loaded."""
    wanted = [v.strip() for v in args.ours.split(",") if v.strip()] or list(VARIANTS)
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown --ours variant(s) {unknown}; choose from {list(VARIANTS)}")
    return wanted


def run(args) -> SuiteResult:
    _wanted_variants(args)
    # The suite targets the GPU; on a CPU it runs too (fp32), so the harness itself is testable anywhere.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    copy_gb_s = device_copy_gb_s()
    model = load_model(args.model, device=device, dtype=dtype)
    spec = model.spec
    notes = [f"device-to-device copy bandwidth measured in this run: {copy_gb_s:.0f} GB/s (read + write)"]
    details: dict = {"copy_gb_s": copy_gb_s, "model": model.card()}
    headlines: list[Headline] = []

    exact = []
    if args.exact_seqs:
        exact.append(exactness(model, num_seqs=args.exact_seqs, new_tokens=args.exact_tokens))
        for extra in filter(None, args.exact_models.split(",")):
            other = load_model(extra, device=device, dtype=dtype)
            # Small models compile in seconds: check the compiled step against transformers on them too.
            exact.append(exactness(other, num_seqs=args.exact_seqs, new_tokens=args.exact_tokens,
                                   compiled=other.spec.num_params < 1e9))
            del other
        details["exactness"] = exact
        for e in exact:
            notes.append(f"exactness {e['model']}: {e['match_fraction']:.0%} of {e['num_seqs']} sequences match "
                         f"transformers for {e['new_tokens']} greedy tokens; logits rel. error max "
                         f"{e['max_logits_rel_err']:.2e}, median {e['median_logits_rel_err']:.2e}, "
                         f"median at the prefill {e['median_prefill_logits_rel_err']:.2e}")
            for key, who in (("compiled_vs_transformers", "ours compiled vs transformers"),
                             ("ours_vs_fp32", "ours vs transformers fp32"),
                             ("transformers_bf16_vs_fp32", "transformers vs its own fp32")):
                if key in e:
                    f = e[key]
                    notes.append(f"  {who}: {f['match_fraction']:.0%} of sequences match; "
                                 f"logits rel. error median {f['median_logits_rel_err']:.2e}, at the prefill "
                                 f"{f['median_prefill_logits_rel_err']:.2e}, max {f['max_logits_rel_err']:.2e}")
        # The headline is taken on trained weights where the run has them: with random weights the logits are
        # nearly flat, and bf16 rounding alone flips their argmax (transformers' own bf16 against its fp32 shows it).
        trained = next((e for e in exact if not e["model"].startswith("synthetic:")), exact[0])
        headlines.append(Headline("gpu_exact_tokens_match", trained["match_fraction"],
                                  f"fraction of sequences, first {trained['new_tokens']} greedy tokens ({trained['model']}, bf16)",
                                  peer="transformers generate (bf16, same weights)"))
        headlines.append(Headline("gpu_exact_logits_max_rel_err", trained["max_logits_rel_err"],
                                  f"relative L2 error of logits vs transformers ({trained['model']}, bf16; target <= 2e-2)",
                                  peer="transformers generate (bf16, same weights)"))
        for e in exact:
            if e is not trained and "transformers_bf16_vs_fp32" in e:
                headlines.append(Headline(
                    f"gpu_exact_tokens_match_{e['model'].removeprefix('synthetic:').replace('-', '_').replace('.', '_')}",
                    e["ours_vs_fp32"]["match_fraction"], f"fraction matching transformers fp32 ({e['model']}, random weights)",
                    peer="transformers bf16 vs its own fp32", peer_value=e["transformers_bf16_vs_fp32"]["match_fraction"]))

    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, spec.vocab_size, (args.batch, args.prompt_len), generator=gen)
    prompt_lists = prompts.tolist()
    engine = Generator(model)

    def ours(n: int, graph: bool = True, attention: str = "auto", compile: bool = False, keep_logits: bool = False):
        settings = GenerationSettings(max_new_tokens=n, ignore_eos=True, cuda_graph=graph, attention=attention,
                                      compile=compile)
        return engine.generate(prompt_lists, settings, keep_logits=keep_logits)

    # Bytes one decode step must read: every weight except the embedding table (only B rows of it are
    # gathered), plus each sequence's K/V at the step's mean length.
    embed_params = model.hf_model.get_input_embeddings().weight.numel()
    weight_bytes = (spec.num_params - embed_params) * spec.dtype_bytes
    mean_len = args.prompt_len + args.new_tokens / 2
    kv_bytes = int(args.batch * mean_len * spec.kv_bytes_per_token)
    step_bytes = weight_bytes + kv_bytes
    floor_ms = step_bytes / (copy_gb_s * 1e9) * 1e3
    notes.append(f"bytes per step: weights {weight_bytes / 1e9:.2f} GB + KV {kv_bytes / 1e9:.2f} GB; "
                 f"roofline {floor_ms:.2f} ms/step")

    ours(2)
    auto_why = engine.attention_why
    notes.append(f"attention 'auto' chose: {auto_why}")
    variants = {"auto": dict(attention="auto")}
    if device == "cuda":  # both backends side by side; 'auto' is what a user gets
        variants["torch attention"] = dict(attention="torch")
        variants["triton attention"] = dict(attention="triton")
    variants["auto, eager (no graph)"] = dict(attention="auto", graph=False)
    # torch.compile'd step (inductor), captured by our CUDA graph. Compiling is per (batch, cache length):
    # warm up with the timed length so the compile (tens of seconds) happens once, outside the samples;
    # run(1) never compiles (no decode step).
    variants["compiled"] = dict(attention="auto", compile=True)
    if args.ours:
        variants = {name: kw for name, kw in variants.items() if name in _wanted_variants(args)}
    ours_ms: dict[str, float] = {}
    compile_log: list[str] = []  # what each compiled run with a decode step did: compiled, or reused

    def run_variant(n: int, kw: dict) -> None:
        ours(n, **kw)
        if kw.get("compile") and n > 1:
            compile_log.append(engine.compile_why)

    for name, kwargs in variants.items():
        warmup = args.new_tokens if kwargs.get("compile") else 2
        try:
            ours_ms[name], details[f"ours_{name}_samples_ms"] = _step_ms(lambda n, kw=kwargs: run_variant(n, kw),
                                                                        args.new_tokens, args.repeat,
                                                                        warmup_tokens=warmup)
        except CompileError as exc:  # a compile that fails here is reported, not fatal to the other rows
            notes.append(f"variant '{name}' did not run: {exc}")
    if compile_log:
        details["compile_log"] = compile_log
        reused = sum(why.startswith("reused") for why in compile_log[1:])
        notes.append(f"compiled variant: {compile_log[0]}; {reused} of {len(compile_log) - 1} timed runs reused it")
    if "compiled" in ours_ms and "auto" in ours_ms:
        details["compiled_vs_auto"] = _compiled_vs_eager(ours, args.new_tokens)
        c = details["compiled_vs_auto"]
        notes.append(f"compiled vs auto (same prompts, {args.new_tokens} greedy tokens): {c['match_fraction']:.0%} of "
                     f"sequences token-identical; logits rel. error median {c['median_logits_rel_err']:.2e}, "
                     f"max {c['max_logits_rel_err']:.2e} (fused kernels round differently from eager)")
    internal = ours(args.new_tokens)
    details["ours_internal_step_ms_median"] = statistics.median(internal.step_ms)
    details["ours_prefill_ms"] = internal.prefill_ms

    peers: dict[str, float] = {}
    input_ids = prompts.to(device)
    for peer in filter(None, args.peers.split(",")):
        kwargs = {} if peer == "dynamic" else {"cache_implementation": peer}

        def hf(n: int, kwargs=kwargs):
            with torch.no_grad():
                model.hf_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        pad_token_id=0, **kwargs)

        try:
            # A static cache makes transformers compile its forward on the first full-length run: warm up with one.
            warmup = args.new_tokens if peer == "static" else 2
            peers[peer], samples = _step_ms(hf, args.new_tokens, args.repeat, warmup_tokens=warmup)
            details[f"transformers_{peer}_samples_ms"] = samples
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            notes.append(f"transformers {peer} cache did not run: {type(exc).__name__}: {str(exc)[:300]}")

    def row(case: str, ms: float, peer: str | None = None) -> Row:
        return Row(case=case, ms=ms, tok_s=args.batch / (ms * 1e-3), bytes_moved=step_bytes,
                   pct_roofline=100 * floor_ms / ms, peer=f"transformers {peer}" if peer else None,
                   peer_ms=peers.get(peer) if peer else None)

    rows: list[Row] = []
    main_peer = "dynamic" if "dynamic" in peers else next(iter(peers), None)
    shape = f"B{args.batch} P{args.prompt_len} N{args.new_tokens}"
    graph_label = "CUDA graph" if device == "cuda" else "no graph on CPU"
    for name, ms in ours_ms.items():
        label = name if "eager" in name else f"{name}, {graph_label}"
        rows.append(row(f"ours, {label} ({shape})", ms, main_peer))
    for peer, ms in peers.items():
        rows.append(row(f"transformers generate, {peer} cache", ms))
    # The headline is the fastest way the engine offers (compile=True where it ran), named in its unit.
    best = "compiled" if "compiled" in ours_ms else "auto" if "auto" in ours_ms else next(iter(ours_ms), None)
    if best is not None and not args.tag:
        headline_ms, how = ours_ms[best], f"{best} decode step, CUDA graph" if device == "cuda" else best
        tok_s = args.batch / (headline_ms * 1e-3)
        headlines.append(Headline("gpu_decode_tok_s", tok_s, f"tok/s ({how}; {shape})",
                                  peer="transformers generate (dynamic cache), same run",
                                  peer_value=args.batch / (peers["dynamic"] * 1e-3) if "dynamic" in peers else None))
        headlines.append(Headline("gpu_decode_pct_roofline", 100 * floor_ms / headline_ms, f"% ({how})",
                                  peer="roofline ms: weight + KV bytes per step / measured copy bandwidth",
                                  peer_value=floor_ms))
    return SuiteResult(suite="decode" + (f"_{args.tag}" if args.tag else ""), rows=rows, headlines=headlines, notes=notes, details=details)
