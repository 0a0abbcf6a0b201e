"""The default decode path on a GPU (settings.fused="auto": the fast adapter) against the plain adapter, for every
placement and every family with a fast adapter, on the GPU, in one process:

    python bench/fused_default_check.py --out DIR

Per tiny preset (fp32, random weights, mixed prompt lengths) and placement (gpu, cpu with split auto and 0, hybrid
with a budget cutting every sequence mid-way), CUDA graphs on: greedy tokens and per-step logits of the default
run against fused=False on the same prompts, and what each run said it did (fast adapter, graphs, attention).
Then one chat reply on the demo model through the lab session with the default settings. Writes
DIR/fused_default.json and .md; exits 1 when a default run differs from the plain one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import GenerationSettings, Generator, load_model  # noqa: E402
from engine.fast import fuse, why_not_fused  # noqa: E402
from engine.hf_reference import rel_err  # noqa: E402
from engine.settings import OffloadSettings  # noqa: E402

PRESETS = ("tiny-llama", "tiny-llama3.1", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3",
           "tiny-phi3")
MAX_LOGITS_REL_ERR = 1e-4  # fp32: the fused kernels round differently from torch's ops, by ~1e-6


def placements(spec, lens: list[int]) -> dict[str, OffloadSettings]:
    # a hybrid budget that keeps about half of the shortest prompt on the GPU
    slot_gib = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4 * len(lens) / 2**30
    return {"gpu": OffloadSettings(), "cpu auto": OffloadSettings(placement="cpu"),
            "cpu split 0": OffloadSettings(placement="cpu", split=0.0),
            "hybrid": OffloadSettings(placement="hybrid", gpu_kv_budget_gib=slot_gib * min(lens) / 2)}


def compare(preset: str, new_tokens: int, device: str, fold_norm: bool = False) -> list[dict]:
    model = load_model(f"synthetic:{preset}", device=device, dtype="float32")
    gen = torch.Generator().manual_seed(len(preset))
    lens = [37, 20, 9]
    prompts = [torch.randint(3, model.spec.vocab_size, (n,), generator=gen).tolist() for n in lens]
    engine = plain_engine = Generator(model)
    if fold_norm:  # the opt-in folded norms: the fast adapter built with them stands in for the default one
        engine = Generator(dataclasses.replace(model, adapter=fuse(model.adapter, fold_norm=True)))
    rows = []
    for name, offload in placements(model.spec, lens).items():
        row = {"preset": preset, "placement": name, "fast_adapter": why_not_fused(model.adapter) or "yes"}
        try:
            runs = {}
            for fused in ("auto", False):
                settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True, fused=fused, offload=offload)
                t0 = time.perf_counter()
                runner = engine if fused else plain_engine
                runs[fused] = runner.generate(prompts, settings, keep_logits=True)
                row[f"{fused}_s"] = time.perf_counter() - t0
                row[f"{fused}_why"] = runner.fused_why + (" (folded norms)" if fused and fold_norm else "")
            mine, plain = runs["auto"], runs[False]
            row["tokens_equal"] = mine.token_ids == plain.token_ids
            row["max_logits_rel_err"] = max(rel_err(a, b) for a, b in zip(mine.logits, plain.logits))
            row["ok"] = row["tokens_equal"] and row["max_logits_rel_err"] <= MAX_LOGITS_REL_ERR
        except Exception as exc:  # noqa: BLE001 - recorded: a failing placement is a finding
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        rows.append(row)
    del model, engine, plain_engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def chat_check(device: str) -> dict:
    """Two replies on the demo model through the lab session with its default settings (a new Generator each)."""
    from engine.lab.session import LabSession

    session = LabSession()
    session.load("demo", device=device)
    out = {}
    for turn in ("first", "second"):
        t0 = time.perf_counter()
        last = list(session.chat([], "Tell me about the sea.", GenerationSettings(max_new_tokens=40)))[-1]
        out[turn] = {"s": round(time.perf_counter() - t0, 3), "tokens": last.num_tokens,
                     "finish": last.finish_reason, "decode_tok_s": round(last.decode_tok_s, 1), "reply": last.reply[:120]}
    out["same_reply"] = out["first"]["reply"] == out["second"]["reply"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma list of tiny presets")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script (the default is plain there)")
    parser.add_argument("--fold-norm", action="store_true",
                        help="the default run with the norms folded into the GEMMs (engine.fast.fuse fold_norm)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for preset in args.presets.split(",")
            for row in compare(preset, args.new_tokens, args.device, args.fold_norm)]
    try:
        chat = chat_check(args.device)
    except Exception as exc:  # noqa: BLE001
        chat = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        traceback.print_exc()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    device = f"{name} (torch {torch.__version__})"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python bench/fused_default_check.py", "--out DIR",
                        *(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                          for k, v in vars(args).items() if k != "out" and v != parser.get_default(k))])
    payload = {"device": device, "date": date, "command": command,
               "rows": rows, "chat": chat}
    stem = "fused_default_fold_norm" if args.fold_norm else "fused_default"
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    title = "The default with folded norms" if args.fold_norm else "The default (fused=\"auto\")"
    lines = [f"# {title} against the plain adapter on the GPU", "", f"- device: {device}",
             f"- date: {date}", f"- command: `{command}`", "",
             "| preset | placement | default run | tokens equal | max logits rel. err | ok |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['placement']} | {r.get('auto_why', r.get('error', ''))[:90]} | "
                     f"{r.get('tokens_equal', '-')} | {r.get('max_logits_rel_err', float('nan')):.1e} | {r['ok']} |")
    lines += ["", f"- chat on the demo model with the default settings: {json.dumps(chat)[:400]}"]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} runs equal to the plain adapter's; chat: {json.dumps(chat)[:300]}")
    return 1 if bad or "error" in chat or not chat.get("same_reply") else 0


if __name__ == "__main__":
    raise SystemExit(main())
