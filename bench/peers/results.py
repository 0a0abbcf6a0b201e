"""A peer run's outcome -> the suite's run dict; run dicts -> the table's rows and the summary's ratios.

A run dict (bench/results/peers.json, details.runs; engine.lab.peer_runs reads it) has: engine, label, variant,
model, shape, batch, prompt_tokens, new_tokens, status ("ok", "failed", "timeout", "skipped"), error, settings
(flat, as the Compare panel shows them), tok_s (decode tokens of all sequences per second), step_ms (decode step),
prefill_ms, h2d_bytes_per_step, pcie_floor_ms (those bytes at the best measured H2D bandwidth), pct_pcie_floor,
split (recomputed fraction; KVPR's: recompute_len over the prompt), and for peers the command and output tails.
"""

from __future__ import annotations

from bench.peers.commands import LABELS, NEEDS, VARIANTS
from bench.peers.runner import PeerOutcome
from bench.peers.shapes import OptModel, Shape, full_kv_bytes_per_step, h2d_bytes_per_step
from bench.report import Headline, Row

ENGINE_ORDER = ("kvlab", "flexgen", "flexgen-cpu", "kvpr", "kvpr-hf")
PEER_GROUPS = {"vs_kvpr_code_ratio": ("kvpr", "kvpr-hf"), "vs_flexgen_ratio": ("flexgen", "flexgen-cpu")}
GROUP_NAMES = {"vs_kvpr_code_ratio": "KVPR's code (best of its FlexGen and transformers paths)",
               "vs_flexgen_ratio": "FlexGen 0.1.8 (best of attention on the GPU and on the CPU)"}


def peer_base(peer: str, model: OptModel, shape: Shape) -> dict:
    return {"engine": peer, "label": LABELS[peer], "variant": VARIANTS[peer], "model": model.name,
            "shape": shape.name, "batch": shape.batch, "prompt_tokens": shape.prompt_tokens,
            "new_tokens": shape.new_tokens, "dtype": "float16"}


def peer_run(base: dict, outcome: PeerOutcome, *, model: OptModel, shape: Shape, peak_h2d_gb_s: float) -> dict:
    """The run dict of a finished peer run: its own figures, and its schedule's bytes (shapes.h2d_bytes_per_step)."""
    run = base | {"status": outcome.status, "wall_s": outcome.wall_s, "returncode": outcome.returncode,
                  "errors_seen": list(outcome.errors_seen), "note": outcome.note}
    if not outcome.ok:
        return run | {"error": outcome.error, "needs": NEEDS[base["engine"]], "stdout_tail": outcome.stdout_tail,
                      "stderr_tail": outcome.stderr_tail}
    log = outcome.log
    recompute = log.recompute_tokens or 0
    h2d = h2d_bytes_per_step(base["engine"], model, shape, recompute_tokens=recompute)
    step_ms = log.step_ms(new_tokens=shape.new_tokens)
    floor_ms = h2d / (peak_h2d_gb_s * 1e9) * 1e3 if peak_h2d_gb_s else None
    run |= {"tok_s": log.decode_tok_s, "step_ms": step_ms,
            "prefill_ms": log.prefill_latency_s * 1e3 if log.prefill_latency_s is not None else None,
            "projected": log.projected, "peak_gpu_mem_gb": log.peak_gpu_mem_gb, "h2d_bytes_per_step": h2d,
            "full_kv_bytes_per_step": full_kv_bytes_per_step(model, shape), "pcie_floor_ms": floor_ms,
            "pct_pcie_floor": 100 * floor_ms / step_ms if floor_ms and step_ms else None,
            "stdout_tail": outcome.stdout_tail}
    if log.recompute_tokens is not None:
        run |= {"recompute_tokens": log.recompute_tokens, "split": log.recompute_tokens / shape.prompt_tokens}
    return run


def kvlab_figures(run: dict, *, model: OptModel, shape: Shape) -> dict:
    """KV Lab's run dict completed with the same derived fields as a peer's."""
    if run.get("status") != "ok":
        return run
    floor = run.get("pcie_floor_ms")
    return run | {"pct_pcie_floor": 100 * floor / run["step_ms"] if floor else None,
                  "full_kv_bytes_per_step": full_kv_bytes_per_step(model, shape)}


def _key(run: dict) -> tuple:
    return run["model"], run["shape"]


def kvlab_reference(runs: list[dict]) -> dict[tuple, dict]:
    """(model, shape) -> KV Lab's all-CPU auto-split run, the figure every peer is compared with."""
    return {_key(r): r for r in runs if r["engine"] == "kvlab" and r.get("placement") == "cpu" and r["status"] == "ok"}


def table_rows(runs: list[dict]) -> list[Row]:
    """One row per run, grouped by model and shape; a peer row's ratio is its step time over KV Lab's (cpu, auto)."""
    reference = kvlab_reference(runs)
    rows = []
    order = sorted(runs, key=lambda r: (r["model"], r["shape"], ENGINE_ORDER.index(r["engine"])
                                        if r["engine"] in ENGINE_ORDER else 99))
    for run in order:
        shape = f"B{run['batch']} P{run['prompt_tokens']} N{run['new_tokens']}"
        projected = ", projected from its first steps" if run.get("projected") else ""
        case = f"{run['label']}: {run['variant']} ({run['model']} {shape}{projected})"
        if run["status"] != "ok":
            rows.append(Row(case=f"{case} - {run['status']}", extra={"error": run.get("error")}))
            continue
        ref = reference.get(_key(run)) if run["engine"] != "kvlab" else None
        extra = {k: run[k] for k in ("split", "recompute_tokens", "prefill_ms", "projected") if run.get(k) is not None}
        rows.append(Row(case=case, ms=run["step_ms"], tok_s=run["tok_s"], bytes_moved=run.get("h2d_bytes_per_step"),
                        pct_roofline=run.get("pct_pcie_floor"), peer="KV Lab, K/V on the CPU, auto" if ref else None,
                        peer_ms=ref["step_ms"] if ref else None,
                        ratio=run["step_ms"] / ref["step_ms"] if ref else None, extra=extra))
    return rows


def ratios(runs: list[dict]) -> dict[str, list[dict]]:
    """Per summary key, per (model, shape) where KV Lab and the peer both ran: KV Lab tok/s over the peer's best."""
    reference = kvlab_reference(runs)
    out: dict[str, list[dict]] = {}
    for key, engines in PEER_GROUPS.items():
        for pair, ours in reference.items():
            theirs = [r for r in runs if _key(r) == pair and r["engine"] in engines and r["status"] == "ok"]
            if theirs:
                best = max(theirs, key=lambda r: r["tok_s"])
                out.setdefault(key, []).append({
                    "model": pair[0], "shape": pair[1], "kvlab_tok_s": ours["tok_s"], "peer_tok_s": best["tok_s"],
                    "peer": f"{best['label']}: {best['variant']}", "ratio": ours["tok_s"] / best["tok_s"]})
    return out


def headlines(runs: list[dict], shapes: dict[str, Shape]) -> list[Headline]:
    """`vs_kvpr_code_ratio`, `vs_flexgen_ratio`: the minimum over the (model, shape) pairs both ran."""
    out = []
    for key, pairs in ratios(runs).items():
        worst = min(pairs, key=lambda p: p["ratio"])
        shape = shapes[worst["shape"]].label if worst["shape"] in shapes else worst["shape"]
        unit = (f"x (KV Lab decode tok/s, all K/V on the CPU, auto split, over {GROUP_NAMES[key]}, same GPU, model "
                f"and shape; min over {len(pairs)} (model, shape): worst {worst['model']} {shape})")
        out.append(Headline(key, worst["ratio"], unit, peer=worst["peer"], peer_value=worst["peer_tok_s"]))
    return out
