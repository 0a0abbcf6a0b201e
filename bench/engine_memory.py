"""Memory across many chat replies through the engine alone (no web server, no clients), per decode variant.

    python -m bench.engine_memory --model demo --chats 150 --results-dir DIR

After 20 warm-up replies, `--chats` greedy replies of 24 tokens run one after another on one LabSession; before and
after, the process's resident set (after a collection and glibc's malloc_trim, so memory the C allocator merely
keeps does not count), the GPU's allocated and reserved bytes, and the page-locked bytes of offload stores. Beside
`python -m bench reliability --parts load`, whose resident set also holds the web server and four API clients, it
says how much of a drift is the engine's. Writes engine_memory.json and engine_memory.md to DIR (default bench/results).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.chat_load import rss_bytes
from bench.report import command_line, device_name
from engine.offload.store import pinned_bytes
from engine.lab.session import LabSession
from engine.settings import GenerationSettings, OffloadSettings, SamplingSettings


def _settle() -> dict:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    cuda = torch.cuda.is_available()
    return {"rss": rss_bytes(), "allocated": torch.cuda.memory_allocated() if cuda else 0,
            "reserved": torch.cuda.memory_reserved() if cuda else 0, "pinned_store": pinned_bytes()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--chats", type=int, default=150)
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    session = LabSession()
    session.load(args.model)
    base = GenerationSettings(max_new_tokens=24, sampling=SamplingSettings(temperature=0.0))
    variants = {"KV on the device, CUDA-graphed steps": base,
                "KV on the device, eager steps": replace(base, cuda_graph=False),
                "KV offloaded, CUDA-graphed layers": replace(base, offload=OffloadSettings(placement="cpu")),
                "KV offloaded, eager layers": replace(base, cuda_graph=False, offload=OffloadSettings(placement="cpu"))}
    rows = []
    for name, settings in variants.items():
        session.hardware()
        for i in range(20):
            list(session.chat([], f"warm-up {i}", settings))
        before = _settle()
        start = time.perf_counter()
        for i in range(args.chats):
            list(session.chat([], f"turn {i}: what news from the court?", settings))
        seconds = time.perf_counter() - start
        after = _settle()
        row = {"variant": name, "chats": args.chats, "seconds": round(seconds, 2)} | {
            f"{key}_delta_mib": round((after[key] - before[key]) / 2**20, 2) for key in before}
        rows.append(row)
        print(row, flush=True)
    result = {"device": device_name(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": command_line(argv, program="python -m bench.engine_memory"), "model": args.model, "rows": rows}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "engine_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Engine memory across {args.chats} chat replies", "",
             f"{result['device']}, {result['date']}, `{result['command']}`", "",
             "| variant | s | RSS Δ MiB (after trim) | GPU allocated Δ MiB | GPU reserved Δ MiB | page-locked Δ MiB |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['seconds']} | {r['rss_delta_mib']} | {r['allocated_delta_mib']} | "
              f"{r['reserved_delta_mib']} | {r['pinned_store_delta_mib']} |" for r in rows]
    (args.results_dir / "engine_memory.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
