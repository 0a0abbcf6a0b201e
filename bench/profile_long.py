"""A Profile run at the scale the lab exists for, through the app's session, watched as the page watches it.

    python bench/profile_long.py --model synthetic:llama-3.1-8b --placement hybrid --batch 8 \
        --prompt-len 131064 --new-tokens 8

Loads the model, applies the settings (the same checks as the Settings panel's Apply), and runs one profiling
session in a thread while this thread polls the live view once a second exactly as the Profile page does
(`panels.live_view.live_delta` with the page's 12-step window and its cursor). It records what a user would see
and wait for: the progress line with its time left through the long prefill, how long each poll took and how many
bytes it sent, the final whole-run draw, and the exported trace's size. Results: `profile_long.json` + `.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import RESULTS_DIR, Headline, Row, SuiteResult, command_line, write_results  # noqa: E402
from engine.lab.session import LabSession  # noqa: E402
from engine.settings import GenerationSettings, OffloadSettings, RunShape  # noqa: E402
from panels.live_view import Cursor, live_delta  # noqa: E402

PAGE_WINDOW_STEPS = 12  # the page's live window (panels/profile_panel.py)


def _poll(session: LabSession, cursor: Cursor, *, window: int) -> tuple[dict | None, Cursor, float, int]:
    """One poll of the live view as the page makes it -> (delta, cursor after, seconds, JSON bytes)."""
    began = time.perf_counter()
    live = session.live_run()
    if live is None:
        return None, cursor, time.perf_counter() - began, 0
    delta, after = live_delta(live, cursor, on_gpu=True, window=window)
    payload = json.dumps(delta, default=str)
    return delta, after, time.perf_counter() - began, len(payload)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-3.1-8b")
    parser.add_argument("--placement", default="hybrid")
    parser.add_argument("--split", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=131064)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--poll-s", type=float, default=1.0, help="the page's poll period")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="profile_long")
    args = parser.parse_args(argv)

    session = LabSession()
    card = session.load(args.model)
    print(f"loaded {card['name']} on {card['device']} in {card['load_s']:.1f} s", flush=True)
    split = args.split if args.split == "auto" else float(args.split)
    settings = GenerationSettings(max_new_tokens=args.new_tokens,
                                  offload=OffloadSettings(placement=args.placement, split=split))
    shape = RunShape(batch=args.batch, prompt_tokens=args.prompt_len)
    applied = session.apply_settings(settings, shape)
    print("applied:", str(applied)[:600], flush=True)

    outcome: dict = {}

    def run() -> None:
        try:
            for update in session.profile(settings, batch=shape.batch, prompt_tokens=shape.prompt_tokens):
                if update.record is not None:
                    outcome["record"] = update.record
        except Exception as exc:  # noqa: BLE001 - recorded and reported below
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    began = time.monotonic()
    worker = threading.Thread(target=run, name="profile", daemon=True)
    worker.start()
    cursor, polls, stages = Cursor(), [], []
    while worker.is_alive():
        time.sleep(args.poll_s)
        delta, cursor, seconds, size = _poll(session, cursor, window=PAGE_WINDOW_STEPS)
        live = session.live_run()
        line = live.stage().line() if live is not None else "no run yet"
        t = time.monotonic() - began
        polls.append({"t_s": round(t, 2), "poll_ms": round(seconds * 1e3, 3), "bytes": size, "stage": line})
        if not stages or stages[-1]["stage"] != line:
            stages.append({"t_s": round(t, 2), "stage": line})
            print(f"{t:7.1f} s  poll {seconds * 1e3:7.2f} ms  {size:>9,} B  {line}", flush=True)
    worker.join()
    wall_s = time.monotonic() - began
    if "error" in outcome or "record" not in outcome:
        print("profile failed:", outcome.get("error", "no record"), flush=True)
        Path(args.results_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.results_dir) / f"{args.name}_failed.json").write_text(json.dumps(
            {"error": outcome.get("error"), "polls": polls, "stages": stages}, indent=1))
        return 1
    record = outcome["record"]
    # What the page draws when the run ends: the whole run from an empty cursor, merged to its bar limit.
    t0 = time.perf_counter()
    final, _ = live_delta(session.live_run(), Cursor(), on_gpu=True, window=0)
    final_bytes = len(json.dumps(final, default=str))
    final_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    trace = session.export_trace(record.run_id)
    export_s = time.perf_counter() - t0
    summary = record.summary()
    prefill_lines = [s for s in stages if s["stage"].startswith("prefill")]
    with_eta = [s for s in prefill_lines if "left" in s["stage"]]
    poll_ms = [p["poll_ms"] for p in polls]
    poll_bytes = [p["bytes"] for p in polls]
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}, indent=1, default=str)[:3000], flush=True)

    rows = [Row(case=f"{card['name']} {args.placement} B{args.batch} x {args.prompt_len:,} + {args.new_tokens}: "
                     "median decode step", ms=summary.get("median_step_ms"), tok_s=summary.get("tokens_per_s"),
                extra={"wall_s": wall_s})]
    headlines = [
        Headline("profile_long_poll_ms_max", max(poll_ms), f"ms, the slowest of {len(polls)} live-view polls (the "
                 f"page's, once a second) during the run, prefill included"),
        Headline("profile_long_poll_bytes_max", float(max(poll_bytes)), "bytes of JSON in the largest live-view poll"),
        Headline("profile_long_trace_bytes", float(trace.stat().st_size), "bytes of the exported Perfetto trace"),
    ]
    notes = [
        f"{len(polls)} polls over {wall_s:.0f} s: median {statistics.median(poll_ms):.2f} ms, max {max(poll_ms):.2f} "
        f"ms; median {statistics.median(poll_bytes):,.0f} B, max {max(poll_bytes):,} B",
        f"{len(prefill_lines)} distinct prefill progress lines, {len(with_eta)} with the time left; first: "
        f"{prefill_lines[0]['stage'] if prefill_lines else 'none'}; last: "
        f"{prefill_lines[-1]['stage'] if prefill_lines else 'none'}",
        f"final whole-run draw: {final_ms:.1f} ms to build, {final_bytes:,} B; "
        f"{final.get('bars_note', 'every span drawn as its own bar')}",
        f"trace {trace.name}: {trace.stat().st_size:,} B, exported in {export_s:.2f} s",
        f"applied: {str(applied)[:400]}",
    ]
    result = SuiteResult(suite=args.name, rows=rows, headlines=headlines, notes=notes,
                         details={"stages": stages, "polls": polls, "summary": summary})
    write_results(result, results_dir=args.results_dir, command=command_line(program="python bench/profile_long.py"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
