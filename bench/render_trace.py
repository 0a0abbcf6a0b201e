"""Render a committed trace as the Profile panel draws it: lanes per layer, then PCIe GB/s, as one PNG.

    python bench/render_trace.py bench/results/offload_trace.json.gz assets/offload_timeline_h100.png [--steps 2]

The figures come from panels/plots.py (the app's own), fed the trace's spans and counters; Debian's chromium,
driven headless by Playwright, turns the page into the PNG. `--steps` keeps the last N decode steps, so the
per-layer lanes stay readable.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.telemetry.export import COUNTER_LINK, COUNTER_PM_PCIE, read_trace, spans_from_trace  # noqa: E402
from panels.plots import timeline_figure  # noqa: E402

CHROMIUM_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]


def counter_track(trace: dict, name: str) -> list[tuple[float, dict]]:
    return [(e["ts"], e["args"]) for e in trace["traceEvents"] if e.get("ph") == "C" and e.get("name") == name]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--steps", type=int, default=2, help="last decode steps to draw (0: all)")
    args = parser.parse_args(argv)
    import plotly.graph_objects as go

    trace = read_trace(args.trace)
    spans = spans_from_trace(trace)
    steps = sorted({s.step for s in spans if s.step >= 0})
    keep = set(steps[-args.steps:]) if args.steps else set(steps)
    spans = [s for s in spans if s.step in keep]
    t0, t1 = min(s.start_us for s in spans), max(s.end_us for s in spans)
    meta = trace.get("metadata", {})
    timeline = timeline_figure(spans, run_id=0)
    timeline.update_layout(title=f"{meta.get('model', '')} {meta.get('shape', '')}, placement {meta.get('placement')}, "
                                 f"split {meta.get('split')}: lanes per layer, last {len(keep)} decode steps",
                           width=1400, height=380)
    pcie = go.Figure()
    for name, keys in ((COUNTER_PM_PCIE, ("read", "write")), (COUNTER_LINK, ("rx", "tx"))):
        points = [(ts, a) for ts, a in counter_track(trace, name) if t0 <= ts <= t1]
        for key in keys:
            if points and key in points[0][1]:
                pcie.add_trace(go.Scatter(x=[ts / 1e3 for ts, _ in points], y=[a[key] for _, a in points],
                                          mode="lines", name=f"{name}: {key}"))
    pcie.update_layout(title="PCIe GB/s over the same steps (CUPTI PM sampling every 1 ms; NVML link)", width=1400,
                       height=300, template="plotly_white", legend=dict(orientation="h", y=-0.3))
    pcie.update_xaxes(title="ms since the run started", range=[t0 / 1e3, t1 / 1e3])
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "trace.html"
        page.write_text("<html><body style='margin:0'>" + timeline.to_html(full_html=False, include_plotlyjs=True)
                        + pcie.to_html(full_html=False, include_plotlyjs=False) + "</body></html>")
        from playwright.sync_api import sync_playwright

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise SystemExit("Debian's chromium is needed (apt-get install chromium)")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            tab = browser.new_page(viewport={"width": 1420, "height": 720})
            tab.goto(page.as_uri())
            tab.wait_for_selector(".js-plotly-plot .plot-container", timeout=30_000)
            tab.wait_for_timeout(1500)
            args.png.parent.mkdir(parents=True, exist_ok=True)
            tab.screenshot(path=str(args.png), full_page=True)
            browser.close()
    print(f"wrote {args.png} ({len(spans)} spans of steps {sorted(keep)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
