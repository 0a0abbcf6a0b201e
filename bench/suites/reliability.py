"""Reliability on a real device: faults inside runs, and chat load on the served app.

    python -m bench reliability [--parts faults,load] [--model synthetic:llama-2-7b] [--turns 50]

faults (GPU only): each case runs on the session the app uses and must fail with KV Lab's message, give back its
memory (allocated GPU bytes, page-locked store bytes, measured before the run and after the failure) and leave
the next run giving the tokens it gave before any fault:
  - out of memory in prefill, KV cache on the GPU and offloaded: a memory budget (torch's per-process fraction)
    that holds the weights, the KV cache or the offload store's GPU buffers, and 32 MiB more (256 MiB offloaded:
    with 32 the runtime's own buffers already run out, a case of its own);
  - out of memory in a decode step, KV cache on the GPU and offloaded (eager steps: a CUDA-graphed step allocates
    nothing per step): after the prefill the budget is cut to what the process holds, the free part of it filled;
  - a page-lock failure: the store's second cudaHostRegister answers cudaErrorMemoryAllocation (injected: the
    store refuses a size the host cannot hold before it asks, so a real one needs another process's pressure);
  - an error inside a kernel launch: the decode-attention kernel launched with 1024-key tiles, which Triton's
    compiler refuses (shared memory), eager and during CUDA-graph capture;
  - telemetry failures during a profile run: the NVML sampler's reads start failing mid-run (injected into the real
    sampler thread), and the span recorder's CUDA-event reads fail mid-run.
load (any device): the app served on loopback with the demo model, 4 API clients x `--turns` turns each, greedy,
KV cache on the device and then offloaded; every reply checked against the same conversation run alone, memory
sampled on the server (bench/chat_load.py).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

import torch

from bench.chat_load import MemoryProbe, replay, rss_bytes, run_load
from bench.report import Headline, Row, SuiteResult
from engine.errors import KVLabError
from engine.memory import release_run_memory
from engine.offload.store import pinned_bytes
from engine.lab.session import LabSession
from engine.settings import GenerationSettings, OffloadSettings, RunShape, SamplingSettings

GiB = 2**30


def add_arguments(parser) -> None:
    parser.add_argument("--parts", default="faults,load")
    parser.add_argument("--model", default="synthetic:llama-2-7b", help="model of the fault cases")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--turns", type=int, default=50, help="turns per client in the load part")
    parser.add_argument("--reply-tokens", type=int, default=24)
    parser.add_argument("--placements", default="gpu,cpu", help="KV placements the load part runs, in turn")
    parser.add_argument("--tag", default="", help="suffix of the result files' name (reliability_<tag>)")


# ---- faults --------------------------------------------------------------------------------------------------


def _memory() -> dict:
    """What the process holds now, measured like for like: cuBLAS workspaces of earlier runs (which a failed run
    clears) and cached blocks returned first."""
    release_run_memory("cuda")
    torch.cuda.empty_cache()
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
            "pinned_store": pinned_bytes(), "rss": rss_bytes()}


@contextlib.contextmanager
def _budget(extra_bytes: int):
    """Let this process reserve only what it reserves now plus `extra_bytes` (torch's per-process fraction)."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + extra_bytes) / total))
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def _tokens(session: LabSession, prompts, settings) -> list[list[int]]:
    from engine import Generator

    generator = Generator(session.model)
    generator.profile = session.hardware()
    return generator.generate(prompts, settings).token_ids


def _run_case(session, prompts, settings, *, during=None, before=None) -> dict:
    """One faulty run: `before()` arms the fault (a context manager), `during(event)` may act after each event
    (and has a `release()`, called before memory is measured again)."""
    from engine import Generator

    mem_before = _memory()
    outcome, message, stage = "ran", "", ""
    start = time.perf_counter()
    with (before() if before is not None else contextlib.nullcontext()):
        generator = Generator(session.model)
        generator.profile = session.hardware()
        try:
            for event in generator.stream(prompts, settings, stream_text=False):
                if during is not None:
                    during(event)
        except KVLabError as exc:
            outcome, message = type(exc).__name__, str(exc)
        stage = generator.stage
        del generator
    if during is not None:
        during.release()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    mem_after = _memory()
    return {"outcome": outcome, "stage": stage, "message": message, "seconds": time.perf_counter() - start,
            "before": mem_before, "after": mem_after}


class _DecodeBudget:
    """After the prefill's event, cap the process's budget at what it has reserved and fill every free block of
    that with ballast (largest pieces first): the next decode step's first fresh tensor runs out of memory."""

    SIZES = (256 << 20, 32 << 20, 4 << 20, 1 << 20, 128 << 10, 16 << 10, 2 << 10, 512)

    def __init__(self):
        self.ballast: list[torch.Tensor] = []
        self.armed = False

    def __call__(self, event) -> None:
        if self.armed or event.step != 0:
            return
        self.armed = True
        torch.cuda.synchronize()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved() / total)
        for size in self.SIZES:
            while True:
                try:
                    self.ballast.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
                except torch.OutOfMemoryError:
                    break

    def release(self) -> None:
        self.ballast.clear()
        self.armed = False
        torch.cuda.set_per_process_memory_fraction(1.0)


def _pinning_fails():
    """The store's first cudaHostRegister goes to CUDA; the second answers cudaErrorMemoryAllocation (2)."""
    real = torch.cuda.cudart()

    class Cudart:
        calls = 0

        def cudaHostRegister(self, ptr, size, flags):
            Cudart.calls += 1
            return real.cudaHostRegister(ptr, size, flags) if Cudart.calls == 1 else 2

        def __getattr__(self, name):
            return getattr(real, name)

    return _patched(torch.cuda, "cudart", lambda: Cudart())


@contextlib.contextmanager
def _patched(target, attr, value):
    original = getattr(target, attr)
    setattr(target, attr, value)
    try:
        yield
    finally:
        setattr(target, attr, original)


def _huge_tiles():
    """The decode-attention kernel launched with 1024-key tiles: more shared memory than any GPU has."""
    import kernels.decode_attention as kernel

    original = kernel.choose_launch
    return _patched(kernel, "choose_launch",
                    lambda *a, **k: replace(original(*a, **k), block_n=1024, num_stages=3, prefetch=False))


def _failing_after(target, attr, calls: int, error: Exception):
    """`target.attr` working for `calls` calls, then raising `error` every time."""
    original = getattr(target, attr)
    count = [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise error
        return original(*args, **kwargs)
    return _patched(target, attr, wrapped)


def faults(args, rows, notes, details) -> bool:
    session = LabSession()
    session.load(args.model, device="cuda", dtype="bfloat16")
    spec = session.model.spec
    prompts = [[7 + (b * 131 + i * 17) % 30000 for i in range(args.prompt_len - 8 * b)] for b in range(args.batch)]
    greedy = GenerationSettings(max_new_tokens=16, ignore_eos=True, sampling=SamplingSettings(temperature=0.0))
    resident, offloaded = greedy, replace(greedy, offload=OffloadSettings(placement="cpu", split=0.5))
    short = [p[:256] for p in prompts[:2]]
    baseline = {"gpu": _tokens(session, short, resident), "cpu": _tokens(session, short, offloaded)}
    kv_bytes = args.batch * (args.prompt_len + 16) * spec.kv_bytes_per_token

    def offload_store_bytes() -> int:
        from engine.offload.store import OffloadStore
        from engine.offload.placement import plan_for

        plan = plan_for(spec, offloaded.offload, device=session.model.device, batch=args.batch,
                        prompt_tokens=args.prompt_len, new_tokens=16, profile=session.hardware())
        store = OffloadStore(spec, plan, dtype=session.model.dtype, device=session.model.device)
        try:
            return store.gpu_bytes
        finally:
            store.release()

    decode_budget = _DecodeBudget()
    cases = [
        ("out of memory in prefill, KV cache on the GPU", "gpu", resident, dict(before=lambda: _budget(kv_bytes + (32 << 20)))),
        ("out of memory building an offloaded run (its GPU buffers)", "cpu", offloaded,
         dict(before=lambda: _budget(offload_store_bytes() + (32 << 20)))),
        ("out of memory in prefill, KV cache offloaded", "cpu", offloaded,
         dict(before=lambda: _budget(offload_store_bytes() + (256 << 20)))),
        ("out of memory in a decode step, KV cache on the GPU (eager steps)", "gpu", replace(resident, cuda_graph=False),
         dict(during=decode_budget)),
        ("out of memory in a decode step, KV cache offloaded (eager layers)", "cpu", replace(offloaded, cuda_graph=False),
         dict(during=decode_budget)),
        ("page-lock (cudaHostRegister) failure of the offload store", "cpu", offloaded, dict(before=_pinning_fails)),
        ("kernel launch refused by Triton (1024-key tiles), eager decode", "gpu",
         replace(resident, attention="triton", cuda_graph=False), dict(before=_huge_tiles)),
        ("kernel launch refused by Triton (1024-key tiles), during CUDA-graph capture", "gpu",
         replace(resident, attention="triton"), dict(before=_huge_tiles)),
    ]
    all_ok = True
    for (name, placement, settings, hooks), round_ in [(case, r) for case in cases for r in (1, 2)]:
        # Twice each: the second round shows whether anything a failure keeps piles up.
        name = f"{name} (round {round_})"
        result = _run_case(session, prompts, settings, **hooks)
        next_tokens = _tokens(session, short, resident if placement == "gpu" else offloaded)
        result["next_run_same_tokens"] = next_tokens == baseline[placement]
        leak = result["after"]["allocated"] - result["before"]["allocated"]
        pinned_left = result["after"]["pinned_store"]
        ok = result["outcome"] != "ran" and leak <= 0 and pinned_left == 0 and result["next_run_same_tokens"]
        all_ok &= ok
        details[name] = result
        rows.append(Row(case=name, ms=result["seconds"] * 1e3, extra={
            "outcome": result["outcome"], "stage": result["stage"], "leak_bytes": leak, "pinned_left_bytes": pinned_left,
            "reserved_after_gib": round(result["after"]["reserved"] / GiB, 2),
            "rss_delta_mib": round((result["after"]["rss"] - result["before"]["rss"]) / 2**20, 1),
            "next_run": "same tokens" if result["next_run_same_tokens"] else "DIFFERENT"}))
        notes.append(f"{name}: {result['outcome']} during {result['stage']}; allocated {result['before']['allocated'] / GiB:.2f} "
                     f"-> {result['after']['allocated'] / GiB:.2f} GiB, page-locked {result['after']['pinned_store']} B left; "
                     f"next run {'gave the same tokens' if result['next_run_same_tokens'] else 'DIFFERED'}; "
                     f"message: {result['message'][:400]}")
    all_ok &= _telemetry_faults(session, rows, notes, details)
    return all_ok


def _telemetry_faults(session, rows, notes, details) -> bool:
    from engine.telemetry import NvmlSampler

    settings = GenerationSettings(max_new_tokens=24, ignore_eos=True, sampling=SamplingSettings(temperature=0.0),
                                  offload=OffloadSettings(placement="cpu"))
    shape = RunShape(batch=4, prompt_tokens=1024)
    ok = True
    cases = [
        ("NVML sampler fails mid-run (reads raise after 5 samples)",
         lambda: _failing_after(NvmlSampler, "_read_pcie_raw", 5, RuntimeError("NVML: GPU is lost"))),
        ("span recorder's CUDA-event reads fail mid-run (after 400 reads)",
         lambda: _failing_after(torch.cuda.Event, "elapsed_time", 400, RuntimeError("CUDA error: unspecified launch failure"))),
    ]
    for name, fault in cases:
        before = _memory()
        runs = len(session.runs)
        start = time.perf_counter()
        outcome, record, message = "ran", None, ""
        with fault():
            try:
                for update in session.profile(settings, batch=shape.batch, prompt_tokens=shape.prompt_tokens,
                                              gpu_counters=False):
                    record = update.record or record
            except KVLabError as exc:
                outcome, message = type(exc).__name__, str(exc)
        torch.cuda.empty_cache()
        after = _memory()
        *_, again = session.profile(settings, batch=shape.batch, prompt_tokens=shape.prompt_tokens, gpu_counters=False)
        kept = record is not None and len(session.runs) >= runs + 1
        said = message or (" | ".join([record.link_note, *record.notes]) if record is not None else "")
        reported = ("failed" in said) or bool(message)
        leak = after["allocated"] - before["allocated"]
        case_ok = reported and leak <= 0 and after["pinned_store"] == 0 and again.record is not None
        ok &= case_ok
        details[name] = {"outcome": outcome if outcome != "ran" else ("kept with a note" if kept else "no record"),
                         "said": said[:600], "before": before, "after": after,
                         "steps_recorded": len(record.steps) if record is not None else 0,
                         "next_run_ok": again.record is not None}
        rows.append(Row(case=name, ms=(time.perf_counter() - start) * 1e3, extra={
            "outcome": details[name]["outcome"], "leak_bytes": leak, "pinned_left_bytes": after["pinned_store"],
            "next_run": "recorded" if again.record is not None else "FAILED"}))
        notes.append(f"{name}: {details[name]['outcome']}; said: {said[:300]}; allocated {before['allocated'] / GiB:.2f} -> "
                     f"{after['allocated'] / GiB:.2f} GiB; next profile run recorded: {again.record is not None}")
    return ok


# ---- load ----------------------------------------------------------------------------------------------------


def _rss_after_trim() -> int | None:
    """The resident set after glibc returns the free memory it holds to the OS (None off glibc)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return rss_bytes()


def load(args, rows, notes, details) -> tuple[bool, dict]:
    import app as lab_app

    device = "cuda" if torch.cuda.is_available() else "cpu"
    session = LabSession()
    session.load("demo", device=device)
    demo = lab_app.build_app(session)
    demo.queue(default_concurrency_limit=1).launch(
        prevent_thread_lock=True, quiet=True, **lab_app.launch_kwargs(lab_app.parse_args([]), export_dir=session.export_dir))
    all_ok, figures = True, {}
    try:
        for placement in [p.strip() for p in args.placements.split(",") if p.strip()]:
            session.apply_settings(replace(session.settings, offload=OffloadSettings(placement=placement)))
            session.hardware()  # measured (or read from the cache) before the clock starts
            probe = MemoryProbe(device, period_s=0.25)
            report = run_load(demo.local_url, clients=4, turns=args.turns, max_new_tokens=args.reply_tokens, probe=probe)
            mismatches = replay(session, report.transcripts, max_new_tokens=args.reply_tokens)
            memory = report.memory
            ok = not report.problems and report.answered == 4 * args.turns and not mismatches
            all_ok &= ok
            where = "KV cache on the device" if placement == "gpu" else "KV cache offloaded to pinned host memory"
            name = f"4 clients x {args.turns} turns, {where}"
            details[name] = {"answered": report.answered, "problems": report.problems[:20], "mismatches": mismatches[:20],
                             "seconds": report.seconds, "latency_ms": report.latency_ms(), "memory": memory}
            extra = {"answered": report.answered, "errors": len(report.problems), "replies_differing_alone": len(mismatches),
                     "held_drift_bytes": memory["held_bytes"]["drift"],
                     "held_peak_over_start_mib": round((memory["held_bytes"]["max"] - memory["held_bytes"]["first"]) / 2**20, 1),
                     "pinned_store_max_mib": round(memory["pinned_store_bytes"]["max"] / 2**20, 1),
                     "pinned_store_last_bytes": memory["pinned_store_bytes"]["last"],
                     "rss_drift_since_warm_mib": round(memory["rss_bytes"]["drift_since_warm"] / 2**20, 1)}
            # How much of the resident set's growth the C allocator is merely keeping (freed, not returned): trim it.
            trimmed = _rss_after_trim()
            if trimmed is not None:
                extra["rss_drift_since_warm_after_trim_mib"] = round((trimmed - memory["rss_bytes"]["warm"]) / 2**20, 1)
            if device == "cuda":
                extra["reserved_drift_since_warm_mib"] = round(memory["cuda_reserved_bytes"]["drift_since_warm"] / 2**20, 1)
                extra["pinned_cached_drift_since_warm_mib"] = round(
                    memory["pinned_cached_bytes"]["drift_since_warm"] / 2**20, 1)
            rows.append(Row(case=name, ms=report.latency_ms().get("median"), tok_s=None, extra=extra))
            figures[placement] = extra | {"seconds": round(report.seconds, 1), "latency_ms": report.latency_ms()}
            notes.append(f"{name}: {report.answered} answered in {report.seconds:.1f} s, {len(report.problems)} errors, "
                         f"{len(mismatches)} replies differing from the conversation run alone; memory {extra}")
    finally:
        demo.close()
    return all_ok, figures


def run(args) -> SuiteResult:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    rows, notes, details, headlines = [], [], {}, []
    if "faults" in parts:
        if not torch.cuda.is_available():
            raise SystemExit("the faults part needs a CUDA GPU (the CPU's are tests/test_faults.py)")
        ok = faults(args, rows, notes, details)
        headlines.append(Headline("reliability_faults_survived", float(ok), "1 = every fault reported, allocated GPU "
                                  "bytes after <= before, nothing left page-locked, next run same tokens"))
    if "load" in parts:
        ok, figures = load(args, rows, notes, details)
        headlines.append(Headline("reliability_load_ok", float(ok), "1 = every turn answered in order, no errors, "
                                  "replies equal to the conversation alone"))
    return SuiteResult(suite="reliability" + (f"_{args.tag}" if args.tag else ""), rows=rows, headlines=headlines, notes=notes, details=details)
