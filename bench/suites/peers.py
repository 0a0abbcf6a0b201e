"""The anchors side by side: KVPR's published code and FlexGen 0.1.8 against KV Lab, same GPU, models and shapes.

Models: OPT-6.7B and OPT-13B (the only family both peers load); dummy weights for the peers, random ones for KV Lab
(`synthetic:opt-6.7b`, `synthetic:opt-13b`). Shapes (--shapes; bench/peers/shapes.py says where each comes from):
kvpr B32 P256 N32, flexgen B32 P512 N32, suite B8 P1984 N64 (the suite's P2048 N64 does not fit OPT's 2048
positions). Every peer runs with the weights on the GPU and the K/V cache on the CPU:
- flexgen / flexgen-cpu: FlexGen 0.1.8, attention on the GPU / on the CPU (--cpu-cache-compute);
- kvpr: KVPR's FlexGen fork with --kv-partial; kvpr-hf: KVPR's run_hf_ds.py --kv-partial (its transformers 4.47).
KV Lab runs all K/V on the CPU with split 0 and auto, and a hybrid with half the K/V on the GPU.

Each peer runs in its own subprocess (its own PYTHONPATH, offline, a time limit); one that fails is recorded with
its error and what it needs, and never stops the suite. Runs go in priority order (the first model's KV Lab runs
and peers, then the next model's, the costliest peers of later models last) within --budget-s; what the budget
leaves out is recorded as skipped. Peers' step time is their own decode latency over N - 1 steps (projected by
their --cut-gen-len from the first steps where the suite cuts a long run); their PCIe bytes are computed from
their schedules (bench/peers/shapes.py). Results: bench/results/peers.json (details.runs: every run) and peers.md.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.peers import commands, kvlab, results
from bench.peers.runner import run_peer
from bench.peers.shapes import OPT_POSITIONS, QUICK_SHAPE, SHAPES, OptModel, Shape, opt_model
from bench.peers.workdir import dummy_weights_root, prepare_workdir
from bench.report import SuiteResult
from engine.offload.profiler import hardware_profile

DEFAULT_BUDGET_S = 420.0  # the whole suite, so that install + suite fit one 8-minute GPU call
COSTLY = ("flexgen-cpu", "kvpr-hf")  # beyond the first model's first shape, these run after every other run


def add_arguments(parser) -> None:
    parser.add_argument("--models", default="opt-6.7b,opt-13b", help="comma list of OPT models")
    parser.add_argument("--shapes", default="kvpr,suite", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--peers", default=",".join(commands.PEERS),
                        help=f"comma list of {', '.join(commands.PEERS)}, or 'none'")
    parser.add_argument("--placements", default=",".join(kvlab.PLACEMENTS), help="KV Lab's placements")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock budget of the suite")
    parser.add_argument("--repeat", type=int, default=1, help="KV Lab runs per configuration")
    parser.add_argument("--cut-gen-len", type=int, default=-1,
                        help="peers' --cut-gen-len (-1: 8 steps with attention on the CPU, 16 on the GPU for runs "
                             "of more than 32 new tokens; 0: never cut; KVPR's transformers path is never cut)")
    parser.add_argument("--kvpr-dir", type=Path, default=Path("/tmp/peers/kvpr"), help="KVPR's tree at 1712a52")
    parser.add_argument("--kvpr-site", type=Path, default=Path("/tmp/peers-site/kvpr"))
    parser.add_argument("--flexgen-site", type=Path, default=Path("/tmp/peers-site/flexgen"))
    parser.add_argument("--work-dir", type=Path, default=None, help="the peers' working folder (default: a temp dir)")
    parser.add_argument("--keep-work", action="store_true", help="keep the working folder (logs, dummy weights)")
    parser.add_argument("--progress-file", type=Path, default=None,
                        help="rewritten after every run with the runs so far (kept if the suite is stopped)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run, not the issue's figures")
    parser.add_argument("--tag", default="", help="suffix of the result files' name (peers_<tag>)")


def _names(text: str, allowed, what: str) -> list[str]:
    names = [] if text.strip() == "none" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return names


def plan_jobs(models: list[OptModel], shapes: list[Shape], peers: list[str]) -> list[tuple]:
    """("kvlab", model, None, None) and ("peer", model, shape, peer) in the order they run: every model's KV Lab runs
    and its FlexGen (GPU attention) and KVPR-fork runs first, model by model, with all four peers on the first
    model's first shape; then the CPU-attention and transformers-path runs of the rest. A run the budget cannot fit
    is skipped and the next one tried, so the cheap comparisons of every model come before the costly ones."""
    first, later = [], []
    for i, model in enumerate(models):
        first.append(("kvlab", model, None, None))
        for j, shape in enumerate(shapes):
            for peer in peers:
                costly = peer in COSTLY and (i, j) != (0, 0)
                (later if costly else first).append(("peer", model, shape, peer))
    return first + later


def _cut(peer: str, shape: Shape, option: int) -> int | None:
    """The peer's own --cut-gen-len (it times the first steps and projects the rest, as FlexGen's benchmark scripts
    do): 8 steps with attention on the CPU (each step reads the whole cache at host-memory speed), 16 on the GPU
    when the run has more than 32; never for KVPR's transformers path, whose static cache is sized by the tokens it
    generates, so a cut run would copy less per step than a full one."""
    if option == 0 or peer == "kvpr-hf":
        return None
    if option > 0:
        return option if option < shape.new_tokens else None
    limit = 8 if peer == "flexgen-cpu" else (16 if shape.new_tokens > 32 else None)
    return limit if limit and limit < shape.new_tokens else None


def _estimate_s(peer: str, model: OptModel, shape: Shape, cut: int | None, *, weights_written: bool) -> float:
    """A rough wall time for the budget check: start-up, weights, warm-up, decode at pessimistic link rates."""
    steps = (cut or shape.new_tokens) - 1
    full_kv = model.kv_bytes_per_token * shape.batch * (shape.prompt_tokens + shape.new_tokens / 2)
    per_step_s = full_kv / (6e9 if peer == "flexgen-cpu" else 15e9)
    weights_s = model.weight_bytes / (3e9 if peer != "kvpr-hf" else (1.5e9 if weights_written else 0.4e9))
    return 15 + weights_s + (steps + 2) * per_step_s


def run(args) -> SuiteResult:
    start = time.monotonic()
    time_left = lambda: args.budget_s - (time.monotonic() - start)  # noqa: E731
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    peers = _names(args.peers, commands.PEERS, "peers")
    placements = _names(args.placements, kvlab.PLACEMENTS, "placements")
    if quick:  # KV Lab's tiny OPT; the peers' smallest OPT, so a run without a GPU reaches their CUDA start quickly
        models, shapes, kvlab_sources = [opt_model("opt-125m")], [QUICK_SHAPE], {"opt-125m": "synthetic:tiny-opt"}
    else:
        models = [opt_model(n) for n in _names(args.models, ("opt-6.7b", "opt-13b"), "models")]
        shapes = [SHAPES[n] for n in _names(args.shapes, SHAPES, "shapes")]
        kvlab_sources = {m.name: m.kvlab_source for m in models}
    notes, details = [], {"shapes": {s.name: {"batch": s.batch, "prompt_tokens": s.prompt_tokens,
                                              "new_tokens": s.new_tokens, "why": s.why} for s in shapes}}
    too_long = [s for s in shapes if s.max_tokens > OPT_POSITIONS]
    shapes = [s for s in shapes if s.max_tokens <= OPT_POSITIONS]
    for s in too_long:
        notes.append(f"shape {s.name} ({s.label}) not run: {s.max_tokens} positions exceed OPT's {OPT_POSITIONS}")
    profile = hardware_profile(device, refresh=True)
    peak_h2d = profile.peak_h2d_gb_s
    details["profile"] = json.loads(profile.to_json())
    notes.append(f"H2D bandwidth measured in this run: {peak_h2d:.1f} GB/s best (pinned); every PCIe floor below "
                 "is a run's host-to-device bytes per step at that rate")
    install = commands.PeerInstall(kvpr_dir=args.kvpr_dir, kvpr_site=args.kvpr_site, flexgen_site=args.flexgen_site)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kvlab-peers-"))
    prepare_workdir(work, models)
    weights_root = dummy_weights_root(work, needed_bytes=max(m.weight_bytes for m in models)) \
        if "kvpr-hf" in peers else None
    runs, probes, weights_written = [], {}, set()
    jobs = plan_jobs(models, shapes, peers)
    details["order"] = [f"{kind} {model.name}" + (f" {shape.name} {peer}" if shape else "")
                        for kind, model, shape, peer in jobs]
    try:
        for index, (kind, model, shape, peer) in enumerate(jobs):
            _say(f"{time_left():.0f} s left: {details['order'][index]}")
            if kind == "kvlab":
                for r in kvlab.run_kvlab(kvlab_sources[model.name], model_name=model.name, shapes=shapes,
                                         placements=placements, device=device, dtype=dtype, repeat=args.repeat,
                                         time_left_s=time_left):
                    runs.append(results.kvlab_figures(r, model=model, shape=next(s for s in shapes
                                                                                  if s.name == r["shape"])))
                    _progress(args.progress_file, runs)
                continue
            runs.append(_run_peer(peer, model, shape, install=install, work=work, weights_root=weights_root,
                                  probes=probes, weights_written=weights_written, time_left=time_left,
                                  cut_option=args.cut_gen_len, peak_h2d=peak_h2d, quick=quick))
            if peer == "kvpr-hf" and not any(p == "kvpr-hf" and m == model for _, m, _, p in jobs[index + 1:]):
                # run_hf_ds.py's --dummy folder: the model's last transformers-path run is done, give back its memory
                shutil.rmtree(weights_root / f"{model.hf_name.replace('/', '-')}-hf-weights", ignore_errors=True)
            _progress(args.progress_file, runs)
    finally:
        if weights_root is not None and not args.keep_work:  # 13-26 GB of dummy weights, in memory on /dev/shm
            shutil.rmtree(weights_root, ignore_errors=True)
        if args.work_dir is None and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    details |= {"runs": runs, "peer_environments": probes, "budget_s": args.budget_s,
                "elapsed_s": time.monotonic() - start, "work_dir": str(work) if args.keep_work else None,
                "ratios": results.ratios(runs)}
    _notes(notes, runs)
    headlines = results.headlines(runs, {s.name: s for s in shapes})
    if quick:  # small shapes are a smoke run: their figures never reach summary.json
        notes.append("quick run: KV Lab runs synthetic:tiny-opt where the peers run opt-125m; headlines not "
                     "recorded: " + ("; ".join(f"{h.key}={h.value:.4g}" for h in headlines) or "none"))
        headlines = []
    suite = "peers_quick" if quick else "peers" + (f"_{args.tag}" if args.tag else "")
    return SuiteResult(suite=suite, rows=results.table_rows(runs), headlines=headlines, notes=notes, details=details)


def _run_peer(peer: str, model: OptModel, shape: Shape, *, install, work: Path, weights_root, probes: dict,
              weights_written: set, time_left, cut_option: int, peak_h2d: float, quick: bool) -> dict:
    """One peer run (after its environment's probe) -> its run dict; never raises for what the peer does."""
    base = results.peer_base(peer, model, shape)
    cut = _cut(peer, shape, cut_option)
    name = f"{peer}-{model.name}-{shape.name}"
    command = commands.peer_command(peer, model, shape, install=install, cwd=work, name=name, cut_gen_len=cut,
                                    weights_root=weights_root)
    base |= {"settings": commands.peer_settings(peer, cut_gen_len=cut), "cut_gen_len": cut,
             "command": command.shell_line}
    env = "flexgen" if peer.startswith("flexgen") else "kvpr"
    missing = install.missing(peer)
    if missing:
        return base | {"status": "failed", "error": missing, "needs": commands.NEEDS[peer]}
    if env not in probes:
        outcome = run_peer(install.probe(peer, cwd=work), name=f"probe-{env}", timeout_s=min(120.0, time_left()))
        line = next((l for l in outcome.stdout_tail.splitlines()[::-1] if l.startswith("PROBE ")), None)
        probes[env] = json.loads(line[6:]) if line else {"error": outcome.error or "no probe line"}
    if "error" in probes[env]:
        return base | {"status": "failed", "error": f"its environment does not import: {probes[env]['error']}",
                       "needs": commands.NEEDS[peer]}
    estimate = _estimate_s(peer, model, shape, cut, weights_written=model.name in weights_written)
    left = time_left()
    if left < estimate:
        return base | {"status": "skipped", "error": f"the suite's time budget: {left:.0f} s left, this run needs "
                                                     f"~{estimate:.0f} s"}
    outcome = run_peer(command, name=name, timeout_s=max(10.0, min(left - 5, max(90.0, 3 * estimate))),
                       hang_grace_s=10.0 if quick else 20.0)
    if peer == "kvpr-hf" and outcome.ok:
        weights_written.add(model.name)
    return results.peer_run(base, outcome, model=model, shape=shape, peak_h2d_gb_s=peak_h2d)


def _say(message: str) -> None:
    print(f"[peers] {message}", file=sys.stderr, flush=True)


def _progress(path: Path | None, runs: list[dict]) -> None:
    """The runs so far, for a call that may be stopped before the suite writes its results; and one line each."""
    last = runs[-1] if runs else None
    if last is not None:
        figure = f"{last['tok_s']:.1f} tok/s, {last['step_ms']:.1f} ms/step" if last["status"] == "ok" else \
            str(last.get("error"))[:160]
        _say(f"  {last['label']} {last.get('variant', '')} {last['model']} {last['shape']}: {last['status']}: {figure}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"suite": "peers_progress", "runs": runs}, indent=1, default=str))


def _notes(notes: list[str], runs: list[dict]) -> None:
    notes.append("ratio column: the row's decode step over KV Lab's (all K/V on the CPU, auto split) on the same "
                 "model and shape (> 1: KV Lab is faster); KV Lab runs bf16 random weights, the peers fp16 dummy ones")
    notes.append("peers' bytes moved: computed from their copy schedules (bench/peers/shapes.py), not counted; "
                 "FlexGen keeps its host K/V pageable (init_cache_one_gpu_batch: pin_memory=False), KVPR's "
                 "transformers path pins it and prefetches each layer's whole static buffer")
    for run in runs:
        where = f"{run['label']} ({run['variant']}) on {run['model']} {run['shape']}"
        if run["status"] != "ok":
            needs = f"; needs: {run['needs']}" if run.get("needs") else ""
            notes.append(f"{where}: {run['status']}: {run.get('error')}{needs}")
        elif run.get("recompute_tokens") is not None:
            notes.append(f"{where}: chose recompute_len {run['recompute_tokens']} of {run['prompt_tokens']} prompt "
                         f"tokens (split {run['split']:.2f})")
        elif run["engine"] == "kvlab" and run.get("split") is not None and run.get("placement") != "cpu0":
            notes.append(f"{where}: KV Lab's split {run['split']:.2f}: {run.get('reason', '')[:200]}")
