"""Screenshot the app's Profile panel showing an imported run (e.g. one measured on an H100), or its Kernels panel.

    python bench/screenshot_app.py bench/results/runs/h100_app_profile_run.trace.json.gz assets/profile_h100.png \
        [--step 6 --step-png assets/profile_step_h100.png]
    python bench/screenshot_app.py --kernels 1,32,8,131072 assets/kernels_h200.png

Starts the app on this machine (loopback, demo model), opens the Profile tab in Debian's chromium (headless,
Playwright), imports the run with the panel's "Import a run" button, waits until the page has drawn it, and saves
the page; `--step-png` also saves the one-step view of decode step `--step` alone. `--kernels B,Hq,Hkv,S` instead
opens the Kernels tab, enters that shape, runs the variants (on this CPU: the committed GPU figures of the shape) and
saves the panel's bars.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import app as lab_app  # noqa: E402
from engine.lab.session import LabSession  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, nargs="?", help="the run to import (not with --kernels)")
    parser.add_argument("png", type=Path)
    parser.add_argument("--kernels", default=None, help="B,Hq,Hkv,S: screenshot the Kernels panel on this shape")
    parser.add_argument("--tab", default="Profile")
    parser.add_argument("--step", type=int, default=0, help="the step in the one-step view (0: the last)")
    parser.add_argument("--step-png", type=Path, default=None, help="also save the one-step view alone here")
    args = parser.parse_args(argv)
    if (args.trace is None) == (args.kernels is None):
        parser.error("give a trace to import, or --kernels B,Hq,Hkv,S")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("Debian's chromium is needed (apt-get install chromium)")
    session = LabSession()
    session.load("demo", device="cpu")
    demo = lab_app.build_app(session)
    options = lab_app.launch_kwargs(lab_app.parse_args([]), export_dir=session.export_dir)
    demo.queue(default_concurrency_limit=1).launch(prevent_thread_lock=True, quiet=True, **options)
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(demo.local_url, wait_until="networkidle")
            if args.kernels:
                _kernels(page, args.kernels, args.png)
                browser.close()
                return 0
            page.get_by_role("tab", name=args.tab).click()
            # Import through the panel's own upload button, as a user would.
            with page.expect_file_chooser() as chooser:
                page.get_by_role("button", name="Import a run (exported trace)").click()
            chooser.value.set_files(str(args.trace))
            page.get_by_text("Imported run #").wait_for(timeout=60_000)
            # The page's script has drawn the whole run (its cursor's last field is set once the end is drawn).
            page.wait_for_function("() => window.__kvlab && /:1$/.test(window.__kvlab.cursor || '')", timeout=60_000)
            if args.step:
                box = page.get_by_label("step in the one-step view (0: the latest)")
                box.fill(str(args.step))
                box.press("Enter")
                page.wait_for_function("(k) => { const d = document.querySelector('#kvlab-onestep [data-testid=\"plotly\"]');"
                                       " return d && d.layout.title.text.startsWith(`Step ${k}`); }", arg=args.step,
                                       timeout=60_000)
            page.wait_for_timeout(2000)
            args.png.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.png), full_page=True)
            if args.step_png:
                page.locator("#kvlab-onestep").screenshot(path=str(args.step_png))
            browser.close()
    finally:
        demo.close()
    record = session.run()
    print(f"wrote {args.png}: run #{record.run_id} {record.label}")
    return 0


def _kernels(page, shape: str, png: Path) -> None:
    batch, heads, kv_heads, seq_len = (int(x) for x in shape.split(","))
    page.get_by_role("tab", name="Kernels").click()
    for label, value in (("batch B", batch), ("query heads Hq", heads), ("KV heads Hkv", kv_heads),
                         ("keys per sequence S", seq_len)):
        page.get_by_label(label).fill(str(value))
    page.get_by_role("button", name="Run the variants").click()
    page.wait_for_function("(s) => [...document.querySelectorAll('[data-testid=\"plotly\"]')].some(d => d.layout && "
                           "d.layout.title && d.layout.title.text && d.layout.title.text.includes(s))",
                           arg=f"S{seq_len} ", timeout=60_000)
    page.wait_for_timeout(1500)
    png.parent.mkdir(parents=True, exist_ok=True)
    page.locator("[data-testid='plotly']").filter(has_text="L2 hit").first.screenshot(path=str(png))
    print(f"wrote {png}: Kernels panel, B{batch} Hq{heads} Hkv{kv_heads} S{seq_len}")


if __name__ == "__main__":
    raise SystemExit(main())
