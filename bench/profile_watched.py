"""Does watching a profile change what it measures? The same profiling run, unwatched and watched, interleaved.

    python bench/profile_watched.py [--model demo] [--placement cpu] [--batch 4] [--prompt-len 512] \
        [--new-tokens 160] [--pairs 10]

Serves the app on loopback (this process) and runs the same profile `--pairs` times each way, alternating:
unwatched (started through the API, nobody looking) and watched (started from the Profile tab of a page open in
Debian's headless chromium, which draws it live, while an API client polls /profile_live once a second as the
page's timer does; unwatched: no page open, no poller). Each run's decode tokens/s after its warm-up steps is the figure; the headline
`profile_watched_ratio` is the median watched tok/s over the median unwatched tok/s. Results go to
bench/results/profile_watched.json and .md (device, date, command) and the headline into summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import RESULTS_DIR, Headline, Row, SuiteResult, command_line, write_results  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-gpu",
                 "--no-first-run", "--disable-background-networking"]
POLL_S = 1.0


POLLER = r"""
import json, sys, time
import httpx

url, seconds, after = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])  # watch the first run after `after`
# One client: a session of its own, kept (each call without one would be a new client, with its own state made).
session = "profile-watched-poller"
cursor, polls, bars = "", 0, 0
with httpx.Client(base_url=url, timeout=30) as web:  # one connection, reused: a script's poller
    while True:
        began = time.monotonic()
        # The cursor back, step 0 (the latest), the page's window: what the page's timer asks for. One POST: the
        # endpoint is not queued.
        answer = web.post("/gradio_api/run/profile_live", json={"data": [cursor, 0, 12], "session_hash": session})
        if answer.status_code == 200:
            live = answer.json()["data"][0]
            if live["run"] <= after:  # not started yet: the previous run is the newest
                cursor = ""
                time.sleep(max(0.0, seconds - (time.monotonic() - began)))
                continue
            cursor, polls, bars = live["cursor"], polls + 1, bars + len(live["bars"]["lane"])
            if live["finished"] and live["status"] == "done":
                break
        time.sleep(max(0.0, seconds - (time.monotonic() - began)))
times = __import__("os").times()
print(json.dumps({"polls": polls, "bars": bars, "cpu_s": times.user + times.system}))
"""


class Poller:
    """An API client in its own process reading /profile_live once a second over the REST API as the page's timer
    does (its cursor back, a window of 12 steps), until the run it watches is done."""

    def __init__(self, url: str, *, after_run: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", POLLER, url, str(POLL_S), str(after_run)],
                                     stdout=subprocess.PIPE, text=True)

    def result(self, timeout: float = 120) -> dict:
        out, _ = self.proc.communicate(timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])


def chromium_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by chromium's processes, by kind (renderer, gpu-process, ...)."""
    out: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split()
            if "chrom" not in fields[1]:
                continue
            # The browser's children rewrite their argv into one space-separated string.
            cmd = (stat.parent / "cmdline").read_bytes().decode(errors="replace").replace("\x00", " ").split()
            kind = next((a.split("=", 1)[1] for a in cmd if a.startswith("--type=")), "browser")
            out[kind] = out.get(kind, 0.0) + (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            continue
    return out


def server_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _open_page(browser, url: str, session, settings, shape):
    """A page on the Profile tab whose own applied settings are the run's (a page opened for one watched run)."""
    known = set(session.clients._states)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url, wait_until="load")
    page.get_by_text("KV bytes per token").wait_for(timeout=60_000)
    deadline = time.monotonic() + 60
    while not (new := [o for o in session.clients._states if o is not None and o not in known]):  # its load events
        if time.monotonic() > deadline:
            raise SystemExit("the page never reached the server")
        time.sleep(0.1)
    session.apply_settings(settings, shape, owner=new[-1])
    page.get_by_role("tab", name="Profile").click()
    # The page settles (its plots mounted, its first paint done) before the run, as a user's page would.
    settled, last = 0, chromium_cpu_s()
    for _ in range(30):
        page.wait_for_timeout(1000)
        now = chromium_cpu_s()
        busy = sum(now.values()) - sum(last.values())
        last = now
        settled = settled + 1 if busy < 0.15 else 0
        if settled >= 2:
            break
    return page


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--placement", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="the engine's CPU threads (default: what app.py sets on this machine, app.engine_threads)")
    parser.add_argument("--watchers", choices=["both", "page", "api", "idle-page"], default="both",
                        help="who watches the watched runs: the page and an API poller (default), or one of them; "
                             "idle-page: a page open on the Model tab that watches nothing (its mere presence)")
    parser.add_argument("--default-gil", action="store_true",
                        help="keep CPython's 5 ms GIL switch interval (app.py sets app.GIL_SWITCH_INTERVAL_S)")
    parser.add_argument("--name", default="profile_watched",
                        help="results file stem and headline key (profile_watched -> profile_watched_ratio)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("Debian's chromium is needed (apt-get install chromium)")
    from gradio_client import Client
    from playwright.sync_api import sync_playwright

    import app as lab_app
    from engine.lab.session import LabSession
    from engine.settings import GenerationSettings, OffloadSettings, RunShape

    threads = lab_app.engine_threads(args.threads)
    if not args.default_gil:
        lab_app.share_the_gil()  # as app.py serves
    session = LabSession()
    session.load(args.model)
    demo = lab_app.build_app(session)
    demo.queue(default_concurrency_limit=1).launch(prevent_thread_lock=True, quiet=True,
                                                   **lab_app.launch_kwargs(lab_app.parse_args([]),
                                                                           export_dir=session.export_dir))
    settings = GenerationSettings(max_new_tokens=args.new_tokens, offload=OffloadSettings(placement=args.placement))
    shape = RunShape(batch=args.batch, prompt_tokens=args.prompt_len)
    driver = Client(demo.local_url, verbose=False)
    driver.predict(placement=args.placement, batch=args.batch, prompt_tokens=args.prompt_len,
                   max_new_tokens=args.new_tokens, api_name="/apply_settings")
    runs: dict[str, list[dict]] = {"unwatched": [], "watched": []}
    load_before = os.getloadavg()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            driver.submit(api_name="/profile").result()  # warm: the hardware profile, first-touch allocations
            for pair in range(args.pairs):
                for condition in ("unwatched", "watched") if pair % 2 == 0 else ("watched", "unwatched"):
                    if condition == "unwatched":  # nobody looking: no page open, no poller
                        cpu0 = server_cpu_s()
                        done = driver.submit(api_name="/profile").result()
                        record = session.run(done["run"]["run_id"])
                        runs[condition].append({"tok_s": record.tokens_per_s, "median_step_ms": record.median_step_ms,
                                                "run_id": record.run_id, "server_cpu_s": server_cpu_s() - cpu0})
                        continue
                    page = _open_page(browser, demo.local_url, session, settings, shape) \
                        if args.watchers != "api" else None
                    if args.watchers == "idle-page":
                        page.get_by_role("tab", name="Model").click()
                        page.wait_for_timeout(2000)
                    before = len(session.runs)
                    last_id = session.runs[-1].run_id
                    # The poller is polling before the run starts, as a script watching the lab would be.
                    poller = Poller(demo.local_url, after_run=last_id) if args.watchers in ("both", "api") else None
                    if poller is not None:
                        time.sleep(3)
                    cpu0, chrome0 = server_cpu_s(), chromium_cpu_s()
                    if page is not None and args.watchers != "idle-page":
                        page.get_by_role("button", name="Run profile").click()
                    else:
                        job = driver.submit(api_name="/profile")
                    deadline = time.monotonic() + 600
                    while len(session.runs) == before and time.monotonic() < deadline:
                        time.sleep(0.2)
                    record = session.runs[-1]
                    cpu1, chrome1 = server_cpu_s(), chromium_cpu_s()  # over the run, not the drawing after it
                    drawn = None
                    if args.watchers == "idle-page":
                        job.result()
                        page.close()
                    elif page is not None:
                        page.wait_for_function("(id) => window.__kvlab && window.__kvlab.cursor.startsWith(id + ':') "
                                               "&& window.__kvlab.cursor.endsWith(':1')", arg=str(record.run_id),
                                               timeout=120_000)
                        drawn = page.evaluate("() => document.querySelector('#kvlab-timeline [data-testid=\"plotly\"]')"
                                              ".data.slice(0, 6).reduce((n, t) => n + t.x.length / 3, 0)")
                        page.close()
                    else:
                        job.result()
                    polled = poller.result() if poller is not None else {"polls": 0, "bars": 0, "cpu_s": 0.0}
                    runs[condition].append({"tok_s": record.tokens_per_s, "median_step_ms": record.median_step_ms,
                                            "run_id": record.run_id, "api_polls": polled["polls"],
                                            "api_bars": polled["bars"], "page_bars": drawn,
                                            "server_cpu_s": cpu1 - cpu0, "poller_cpu_s": polled["cpu_s"],
                                            "chromium_cpu_s": {k: round(v - chrome0.get(k, 0.0), 2)
                                                               for k, v in chrome1.items()}})
                print(f"pair {pair + 1}/{args.pairs}: unwatched {runs['unwatched'][-1]['tok_s']:.1f}, "
                      f"watched {runs['watched'][-1]['tok_s']:.1f} tok/s", flush=True)
            browser.close()
    finally:
        demo.close()
    load_after = os.getloadavg()
    med = {c: statistics.median(r["tok_s"] for r in rs) for c, rs in runs.items()}
    step = {c: statistics.median(r["median_step_ms"] for r in rs) for c, rs in runs.items()}
    ratio = med["watched"] / med["unwatched"]
    pair_ratios = [w["tok_s"] / u["tok_s"] for u, w in zip(runs["unwatched"], runs["watched"])]
    spans = len(session.runs[-1].spans)
    shape_line = f"{args.model}, placement {args.placement}, batch {args.batch} x prompt {args.prompt_len}, " \
                 f"{args.new_tokens} new tokens, {threads} engine thread{'s' if threads != 1 else ''} on " \
                 f"{os.cpu_count()} cores"
    rows = [Row(case="unwatched (API, nobody looking)", ms=step["unwatched"], tok_s=med["unwatched"]),
            Row(case="watched (page drawing it live + API poller at 1 Hz)", ms=step["watched"], tok_s=med["watched"],
                peer="unwatched", peer_ms=step["unwatched"])]
    result = SuiteResult(
        suite=args.name, rows=rows,
        headlines=[Headline(key=f"{args.name}_ratio", value=ratio,
                            unit=f"x (watched tok/s / unwatched tok/s, medians of {args.pairs} interleaved pairs; "
                                 f"{shape_line}; target >= 0.97)", peer="unwatched", peer_value=med["unwatched"])],
        notes=[f"{shape_line}: {spans:,} spans per run; tok/s is each run's decode tokens over its steps after the "
               "warm-up steps; medians over the runs of each condition",
               f"per-pair ratios (watched / unwatched): min {min(pair_ratios):.3f}, median "
               f"{statistics.median(pair_ratios):.3f}, max {max(pair_ratios):.3f}",
               "watched: a page opened in the same machine's headless chromium (software rendering) starts the run from "
               "its Profile tab and draws it live (run timeline, one-step view, step time), while a second client, "
               "in its own process, polls /profile_live over the REST API once a second with its cursor; unwatched: "
               "the run started through the API with no page open and no poller",
               f"load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
               f"{tuple(round(x, 2) for x in load_after)}"],
        details={"runs": runs, "pair_ratios": pair_ratios, "shape": shape_line, "spans_per_run": spans,
                 "engine_threads": threads, "gil_switch_interval_s": sys.getswitchinterval(), "cores": os.cpu_count(), "watchers": args.watchers,
                 "load_before": load_before, "load_after": load_after})
    write_results(result, results_dir=args.results_dir,
                  command=command_line(argv, program="python bench/profile_watched.py"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
