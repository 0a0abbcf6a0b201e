"""Out of memory on the GPU, for real: the run fails with a message, its memory is released, the next run works.

Ways a run can be too big: a KV cache the memory check refuses before allocating, a prefill whose activations
run out of memory inside torch (the check cannot see those), an offloaded store larger than host memory, and an
offloaded run whose pinned store and GPU staging fit but whose prefill then runs out of GPU memory. For each,
the allocated GPU memory and the process's resident host memory before the run and after the error are
recorded, then a normal run (and an offloaded one) must succeed.
"""

from __future__ import annotations

import time

import torch

from bench.report import Headline, Row, SuiteResult
from engine import GenerationSettings, Generator, KVLabError, OutOfMemoryError, load_model
from engine.settings import OffloadSettings


def _rss_gib() -> float:
    """The process's resident host memory (the pinned store's pages count while it lives)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="synthetic:llama-2-7b")
    # GQA: its K/V are small beside its prefill activations, so the check's headroom cannot hold the prefill.
    parser.add_argument("--gqa-model", default="synthetic:llama-3-8b")


def _attempt(engine: Generator, prompts, settings) -> dict:
    torch.cuda.synchronize()
    before, rss_before = torch.cuda.memory_allocated(), _rss_gib()
    start = time.perf_counter()
    try:
        engine.generate(prompts, settings)
        outcome, message = "ran", ""
    except OutOfMemoryError as exc:
        outcome, message = "OutOfMemoryError", str(exc)
    except KVLabError as exc:
        outcome, message = type(exc).__name__, str(exc)
    torch.cuda.synchronize()
    return {"outcome": outcome, "message": message, "allocated_before_gib": before / 2**30,
            "allocated_after_gib": torch.cuda.memory_allocated() / 2**30, "seconds": time.perf_counter() - start,
            "host_rss_before_gib": rss_before, "host_rss_after_gib": _rss_gib()}


def run(args) -> SuiteResult:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_oom needs a CUDA GPU")
    model = load_model(args.model, device="cuda", dtype="bfloat16")
    engine = Generator(model)
    free, total = torch.cuda.mem_get_info()
    kv_per_token = model.spec.kv_bytes_per_token
    # (1) a KV cache about twice the free memory, inside the model's context: refused before allocating
    tokens = min(4000, model.spec.max_positions)
    big_batch = int(2 * free / (kv_per_token * tokens)) + 1
    cases = {f"KV cache of {big_batch} x {tokens} tokens, ~2x free memory (refused before allocating)":
             ([[7] * 100] * big_batch, GenerationSettings(max_new_tokens=tokens - 100, ignore_eos=True))}
    # (2) a prefill that runs out of memory inside torch: a ballast tensor (standing for other work on the GPU)
    # leaves just enough for the KV cache to pass the check, not for the prefill's activations beside it.
    # Prefill runs its per-token stages in slices (engine/decode/forward.py), so its peak is modest; a GQA model's K/V
    # are a quarter of an MHA model's, so the check's 10 % headroom over them cannot hold its prefill.
    gqa = load_model(args.gqa_model, device="cuda", dtype="bfloat16")
    gqa_engine = Generator(gqa)
    batch, prompt_len = 16, 4000
    kv_bytes = batch * (prompt_len + 2) * gqa.spec.kv_bytes_per_token
    cases[f"{gqa.source} prefill of {batch} x {prompt_len} tokens beside a ballast (out of memory inside torch)"] = (
        [[7] * prompt_len] * batch, GenerationSettings(max_new_tokens=2, ignore_eos=True))
    # (3) an offloaded store far larger than host memory: refused before anything is pinned
    host_tokens = 4000
    host_batch = 128
    cases[f"all K/V on the CPU for {host_batch} x {host_tokens} tokens, more than host memory (refused)"] = (
        [[7] * (host_tokens - 100)] * host_batch,
        GenerationSettings(max_new_tokens=100, ignore_eos=True, offload=OffloadSettings(placement="cpu")))
    # (4) an offloaded run whose store fits but whose prefill runs out of GPU memory beside a ballast
    off_batch, off_prompt = 8, 2048
    off_settings = GenerationSettings(max_new_tokens=8, ignore_eos=True, offload=OffloadSettings(placement="cpu"))
    cases[f"offloaded prefill of {off_batch} x {off_prompt} tokens beside a ballast (out of memory inside torch)"] = (
        [[7] * off_prompt] * off_batch, off_settings)
    rows, details, notes = [], {"free_gib_at_start": free / 2**30, "total_gib": total / 2**30}, []
    for name, (prompts, settings) in cases.items():
        ballast = None
        if "ballast" in name:
            if settings.offload.offloaded:  # room for staging (~1.3 GiB at this shape), not for the prefill
                leave = 2 << 30
            else:
                leave = int(kv_bytes / 0.9) + (128 << 20)
            ballast = torch.empty(torch.cuda.mem_get_info()[0] - leave, dtype=torch.uint8, device="cuda")
        result = _attempt(gqa_engine if name.startswith(gqa.source) else engine, prompts, settings)
        del ballast
        after_ok = _attempt(engine, [[7] * 64] * 4, GenerationSettings(max_new_tokens=16, ignore_eos=True))
        after_off = _attempt(engine, [[7] * 64] * 4, GenerationSettings(
            max_new_tokens=16, ignore_eos=True, offload=OffloadSettings(placement="cpu", split=0.5)))
        result["next_run"] = after_ok["outcome"] if after_off["outcome"] == "ran" else f"offloaded: {after_off['outcome']}"
        details[name] = result
        leak = result["allocated_after_gib"] - result["allocated_before_gib"]
        rows.append(Row(case=name, ms=result["seconds"] * 1e3,
                        extra={"outcome": result["outcome"], "leak_gib": leak, "next_run": after_ok["outcome"]}))
        notes.append(f"{name}: {result['outcome']}; allocated {result['allocated_before_gib']:.2f} GiB before, "
                     f"{result['allocated_after_gib']:.2f} GiB after; host RSS {result['host_rss_before_gib']:.2f} -> "
                     f"{result['host_rss_after_gib']:.2f} GiB; next run (GPU-resident, then offloaded): "
                     f"{result['next_run']}; message: {result['message'][:300]}")
    worst_leak = max(d["allocated_after_gib"] - d["allocated_before_gib"] for d in details.values() if isinstance(d, dict) and "outcome" in d)
    all_ok = all(d["next_run"] == "ran" and d["outcome"] != "ran" for d in details.values() if isinstance(d, dict) and "outcome" in d)
    headlines = [Headline("gpu_oom_worst_leak_gib", worst_leak, "GiB still allocated after an out-of-memory run",
                          peer="runs that recovered", peer_value=float(all_ok))]
    return SuiteResult(suite="gpu_oom", rows=rows, headlines=headlines, notes=notes, details=details)
