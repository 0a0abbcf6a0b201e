"""The app in a real headless Chromium (Debian's package, driven by Playwright), as a new user meets it: chat, the
Model card, a reload and a second tab, a profile of every placement drawn live with the zoom kept, and what a CPU
machine shows in the place of GPU figures.

Skips, saying why, when Playwright or the chromium binary is absent (CI installs both). Screenshots are kept under
tests/artifacts/.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# Chromium on a machine with no network: no background connections, no sandbox (root in CI); WebGL without a GPU
# through Chromium's software rasteriser (SwiftShader), which backs Plotly's scattergl.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
PLOT = "document.querySelector('#{id} [data-testid=\"plotly\"]')"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def served(served_demo_app, profile_cache):
    demo, session = served_demo_app
    yield demo, session
    session.load("demo", device="cpu")


def _page(browser, url, *, context=None):
    page = (context or browser.new_context(viewport={"width": 1280, "height": 1000})).new_page()
    page.goto(url, wait_until="networkidle")  # the page's load events answered: what it shows is the server's
    page.get_by_text("KV bytes per token").wait_for(timeout=30_000)
    return page


def _owner(session, before: set) -> str:
    """The session hash of the page that appeared since `before` (the clients the session knew)."""
    new = [o for o in session.clients._states if o is not None and o not in before]
    assert new, "the page never reached the server"
    return new[-1]


def _load(page, source: str, name: str) -> None:
    page.get_by_role("tab", name="Model").click()
    field = page.get_by_label("Model")
    field.fill(source)
    field.press("Enter")
    page.get_by_role("button", name="Load model").click()
    status = page.locator("p", has_text=re.compile(r"^(Loaded|Could not load)"))
    status.wait_for(timeout=60_000)
    assert f"Loaded {name}" in status.inner_text(), status.inner_text()


def _apply(page, *, placement: str | None = None, split: str | None = None, **numbers) -> None:
    """Fill the Settings form (labels as on the page) and press Apply."""
    page.get_by_role("tab", name="Settings").click()
    if placement:
        page.get_by_role("radio", name=placement, exact=True).check()
    if split is not None:
        page.get_by_role("radio", name="manual").check()
        field = page.get_by_label("manual split (fraction of offloaded tokens recomputed)").first
        field.fill(split)
        field.press("Enter")
    labels = {"batch": "batch (profiling)", "prompt": "prompt length, tokens (profiling)", "new": "new tokens",
              "chunk": "activation chunk (tokens)"}
    for key, value in numbers.items():
        page.get_by_label(labels[key]).fill(str(value))
    page.get_by_role("button", name="Apply settings").click()
    page.get_by_text(re.compile(r"^Applied\.")).wait_for(timeout=30_000)


def _run_profile(page, timeout_ms: int = 120_000) -> None:
    page.get_by_role("tab", name="Profile").click()
    drawn = page.evaluate("() => (window.__kvlab && window.__kvlab.cursor) || ''")
    page.get_by_role("button", name="Run profile").click()
    # The page's script has drawn a new run to its end: the cursor names another run, and its last field is set.
    page.wait_for_function("""(drawn) => { const c = (window.__kvlab && window.__kvlab.cursor) || '';
        return /:1$/.test(c) && c.split(':')[0] !== drawn.split(':')[0]; }""", arg=drawn, timeout=timeout_ms)
    page.get_by_text(re.compile(r"Run #\d+ \(started here\): done")).wait_for(timeout=30_000)


def _traces(page, elem_id: str) -> dict:
    """{trace name: number of points} of a plot the page drew."""
    return page.evaluate(f"""() => {{ const d = {PLOT.format(id=elem_id)};
        return Object.fromEntries((d && d.data || []).map((t, i) => [t.name || `#${{i}}`, (t.x || []).length])); }}""")


def test_chat_in_the_browser_streams_a_reply(browser, served):
    demo, _ = served
    page = _page(browser, demo.local_url)
    page.get_by_role("tab", name="Chat").click()
    page.get_by_placeholder("Say something to the model").fill("How now, my lord?")
    page.get_by_role("button", name="Send", exact=True).click()
    page.get_by_text("finished:").wait_for(timeout=60_000)  # the stats line, once the reply has streamed
    bubbles = page.locator(".message")
    assert bubbles.count() >= 2
    reply = bubbles.nth(bubbles.count() - 1).inner_text().strip()
    assert reply and reply != "How now, my lord?"
    assert "demo" in page.get_by_text("tok/s decode").first.inner_text()  # the line names the model
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
    page.context.close()


def test_a_new_user_meets_the_card_the_empty_panels_and_clear_refusals(browser, served):
    demo, session = served
    page = _page(browser, demo.local_url)
    card = page.locator("table").first.inner_text()
    assert card.startswith("model") and "demo (Shakespeare)" in card  # no empty header row: the first row is the model
    assert "Hugging Face tokenizer" in card and "TokenizersBackend" not in card
    field = page.get_by_label("Model")
    for source, words in (("/no/such/dir", "does not exist"), ("z" * 300, "File name too long")):
        field.fill(source)
        field.press("Enter")
        page.get_by_role("button", name="Load model").click()
        status = page.locator("p", has_text="Could not load").filter(has_text=words)
        status.wait_for(timeout=30_000)
        text = status.inner_text()
        assert words in text and text.count("is kept") == 1 and len(text) < 400, text
    assert session.model.source == "demo"
    # What each empty panel says, on this CPU machine.
    page.get_by_role("tab", name="Profile").click()
    page.get_by_text("No run yet: choose the shape in the Settings tab").wait_for(timeout=30_000)
    counters = page.get_by_label("Sample GPU counters with CUPTI (PCIe, DRAM, L2 every 1 ms)")
    assert counters.is_disabled() and not counters.is_checked()
    assert page.get_by_text("no GPU here: CUPTI samples GPU counters").is_visible()
    page.get_by_role("tab", name="Settings").click()
    assert page.get_by_role("radio", name="on", exact=True).is_disabled()  # L2 prefetch: a Triton-kernel feature
    assert page.get_by_label("GPU KV budget, GiB (hybrid)").is_disabled()
    page.get_by_role("tab", name="Scheduler explorer").click()
    assert page.get_by_text("No predictions here: the model runs on the CPU.").is_visible()
    assert page.get_by_role("button", name="Predict for the applied settings").is_disabled()
    page.get_by_role("tab", name="Compare").click()
    assert page.get_by_text("No runs yet: run a profile in the Profile tab").is_visible()
    page.get_by_role("tab", name="Hardware").click()
    assert page.get_by_text("Press Show measurements").is_visible()
    page.get_by_role("button", name="Show measurements").click()
    page.get_by_text("No GPU here: these are the CPU's own figures").wait_for(timeout=60_000)
    page.wait_for_function("() => document.body.innerText.includes('not measured: no GPU, no PCIe link')",
                           timeout=30_000)
    shown = page.locator("[role=tabpanel]:visible").inner_text()
    assert "GFLOP/s" in shown and not re.search(r"(?<![\d.])0\.0 (GB|TFLOP)/s", shown), shown
    page.context.close()


def test_a_reload_and_a_second_tab_show_what_will_run(browser, served):
    """The page shows the server's model and this browser's applied settings after a reload; Apply changes only what
    was changed; another tab's Apply does not change this tab's runs."""
    demo, session = served
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    known = set(session.clients._states)
    page = _page(browser, demo.local_url, context=context)
    _load(page, "synthetic:tiny-qwen2", "tiny-qwen2")
    _apply(page, placement="cpu", split="0.3", prompt=32, new=5, chunk=8)
    page.reload(wait_until="networkidle")
    # The server's model, not the startup one (the page asks for it as it loads).
    page.locator("table").first.filter(has_text="tiny-qwen2").wait_for(timeout=30_000)
    page.get_by_role("tab", name="Settings").click()
    page.get_by_text("Restored this browser's last applied settings.").wait_for(timeout=30_000)
    assert page.get_by_role("radio", name="cpu", exact=True).is_checked()
    assert page.get_by_label("activation chunk (tokens)").input_value() == "8"
    assert page.get_by_label("prompt length, tokens (profiling)").input_value() == "32"
    owner = _owner(session, known)
    _apply(page, placement="hybrid")  # only the placement changed: the rest is what was applied
    settings, shape = session.settings_for(owner)
    assert (settings.offload.placement, settings.offload.split, settings.offload.chunk_tokens) == ("hybrid", 0.3, 8)
    assert (shape.prompt_tokens, settings.max_new_tokens) == (32, 5)
    # A second browser applies placement gpu; this tab's chat still runs under its own (hybrid).
    known = set(session.clients._states)
    other = _page(browser, demo.local_url)
    other.get_by_role("tab", name="Settings").click()
    assert other.get_by_text("Defaults (nothing applied in this browser yet).").is_visible()
    _apply(other, placement="gpu")
    assert session.settings_for(_owner(session, known))[0].offload.placement == "gpu"
    page.get_by_role("tab", name="Chat").click()
    page.get_by_placeholder("Say something to the model").fill("abc")
    page.get_by_role("button", name="Send", exact=True).click()
    page.get_by_text("finished:").wait_for(timeout=60_000)
    assert "KV cache: hybrid" in page.get_by_text("tok/s decode").first.inner_text()
    assert session.settings_for(owner)[0].offload.placement == "hybrid"
    other.context.close()
    context.close()


def test_profiles_of_every_placement_are_drawn_live_and_explained(browser, served):
    """An offloaded run and a GPU-resident one: the run timeline, the one-step pipeline view and the step-time plot
    are drawn by the page; the summary says why there is no prediction on a CPU; Compare turns its table."""
    demo, session = served
    page = _page(browser, demo.local_url)
    _load(page, "synthetic:tiny-llama", "tiny-llama")
    _apply(page, placement="cpu", batch=2, prompt=32, new=8, chunk=16)
    _run_profile(page)
    timeline = _traces(page, "kvlab-timeline")
    copies = timeline["H2D KV"] + timeline["H2D activations"]
    assert copies > 0 and timeline["attention"] > 0 and timeline["steps (even)"] > 0, timeline
    one = _traces(page, "kvlab-onestep")
    assert one["H2D KV"] + one["H2D activations"] > 0 and one["attention"] > 0 and one["payload H2D GB/s"] > 0, one
    assert page.evaluate(f"() => {PLOT.format(id='kvlab-onestep')}.layout.xaxis.title.text") == "ms since step 7 began"
    steps = _traces(page, "kvlab-steps")
    assert steps["measured ms"] + steps["warm-up / capture steps (off the axis)"] == 7 and "predicted ms" not in steps
    assert page.get_by_text("predicted step (plan)").is_visible()
    assert page.get_by_text("— (no GPU: the cost model predicts GPU steps").is_visible()
    assert "% of the speed" not in page.locator("body").inner_text()  # no PCIe floor ratio without a PCIe link
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "profile.png"), full_page=True)
    # GPU-resident: a timeline too, with the attention and compute lanes per layer.
    _apply(page, placement="gpu")
    _run_profile(page)
    timeline = _traces(page, "kvlab-timeline")
    assert timeline["steps (even)"] > 0 and timeline["attention"] > 0 and timeline["MLP / other compute"] > 0
    assert timeline["H2D KV"] == 0 and _traces(page, "kvlab-onestep")["attention"] > 0
    # Compare: one column per run, each setting once.
    first, second = session.runs[-2:]
    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("button", name="Refresh runs").click()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.get_by_text(f"Baseline: run #{first.run_id}").wait_for(timeout=30_000)
    headers = page.locator("table").last.locator("th").all_inner_texts()
    assert [h.strip() for h in headers][1:] == [f"#{first.run_id} (baseline)", f"#{second.run_id}"]
    lines = [line.strip() for line in page.locator("[role=tabpanel]:visible").inner_text().splitlines()]
    assert lines.count("model") == 1 and lines.count("offload.placement") == 1, lines  # each setting once
    page.context.close()


def test_zoom_is_kept_while_a_run_is_drawn_and_stop_confirms(browser, served):
    demo, session = served
    page = _page(browser, demo.local_url)
    _load(page, "synthetic:tiny-llama", "tiny-llama")
    _apply(page, placement="cpu", split="0.5", batch=2, prompt=32, new=400, chunk=16)  # slow: RoPE interpreted
    page.get_by_role("tab", name="Profile").click()
    page.get_by_role("button", name="Run profile").click()
    # The latest time drawn on the attention lane (the live timeline is a window of the last steps: it moves on).
    count = f"() => Math.max(...{PLOT.format(id='kvlab-timeline')}.data[{{lane}}].x.filter(x => x !== null))"
    page.wait_for_function(f"() => {{ const d = {PLOT.format(id='kvlab-steps')}; "
                           "return !!(d && d.data && d.data[0] && d.data[0].x.length >= 3); }", timeout=120_000)
    page.evaluate(f"""() => {{ window.Plotly.relayout({PLOT.format(id='kvlab-timeline')}, {{'xaxis.range': [1, 2]}});
                             window.Plotly.relayout({PLOT.format(id='kvlab-steps')}, {{'yaxis.range': [0, 1000]}}); }}""")
    before = page.evaluate(count.format(lane=3))
    page.wait_for_function(f"() => ({count.format(lane=3)})() > {before}", timeout=60_000)  # a redraw since
    assert page.evaluate(f"() => {PLOT.format(id='kvlab-timeline')}.layout.xaxis.range") == [1, 2]
    time.sleep(1.5)  # another redraw of the step plot
    assert page.evaluate(f"() => {PLOT.format(id='kvlab-steps')}.layout.yaxis.range") == [0, 1000]
    page.get_by_role("button", name="Stop").click()
    # The progress line says the run is stopping (unless it ended before the timer's next read), then how it ended,
    # once: the line above it is left empty (nothing written by Stop lands after how the run ended).
    try:
        page.get_by_text(re.compile(r"Run #\d+ \(started here\): (stopping after the current step|stopped after)"))\
            .first.wait_for(timeout=30_000)
        ended = re.compile(r"Run #\d+ \(started here\): stopped after \d+ of 399 decode steps; no record kept\.")
        page.get_by_text(ended).wait_for(timeout=60_000)
        page.wait_for_function("() => !document.body.innerText.includes('Starting a run')", timeout=30_000)
        assert page.get_by_text(re.compile(r"stopped after \d+ of 399")).count() == 1
        page.screenshot(path=str(ARTIFACTS / "profile_stopped.png"), full_page=True)
    except Exception:
        raise AssertionError(page.locator("[role=tabpanel]:visible").inner_text()[:1500]) from None
    page.get_by_role("button", name="Stop").click()  # nothing runs now: Stop says so
    page.get_by_text("No profile of this tab is running.").wait_for(timeout=30_000)
    page.context.close()


def test_the_live_timer_costs_the_page_one_fetch_a_second_and_no_gradio_event(browser, served):
    """While a run goes on the page's timer asks /profile_live itself (one plain POST a second, its own session) and
    writes the progress line: no Gradio event per tick (each re-renders its outputs). The run's end goes through the
    server once (the hidden Finish event): its summary and the final line."""
    demo, session = served
    page = _page(browser, demo.local_url)
    _load(page, "synthetic:tiny-llama", "tiny-llama")
    _apply(page, placement="cpu", split="0.5", batch=8, prompt=32, new=160, chunk=16)  # seconds: RoPE interpreted
    page.get_by_role("tab", name="Profile").click()
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url.split("/gradio_api/", 1)[-1].split("?")[0])
            if r.method == "POST" and "/gradio_api/" in r.url else None)
    page.get_by_role("button", name="Run profile").click()
    live_line = page.locator("#kvlab-live-line .kvlab-line")
    seen = set()
    deadline = time.monotonic() + 120
    while not page.get_by_text(re.compile(r"Run #\d+ \(started here\): done")).count():
        seen.add(live_line.text_content())
        assert time.monotonic() < deadline, (seen, posts)
        page.wait_for_timeout(200)
    # The live line said where the run was while it ran.
    assert any(re.search(r"decode step \d+ of 159", line or "") for line in seen), (seen, posts)
    assert page.evaluate("() => window.__kvlab.lastError || ''") == ""
    page.wait_for_timeout(1500)  # the timer is off: no more polls
    settled = len(posts)
    page.wait_for_timeout(2500)
    polls = [p for p in posts if p == "run/profile_live"]
    others = [p for p in posts if p != "run/profile_live" and not p.startswith(("upload", "heartbeat"))]
    assert len(polls) >= 2, posts
    # The Run click's queued event and the end's Finish event; never one per tick.
    assert len(others) <= 4, others
    assert len(posts) == settled, posts[settled:]  # nothing once the run is drawn
    assert live_line.text_content() == ""  # the end line is the server's, in the progress line
    assert "median step" in page.locator("[role=tabpanel]:visible").inner_text()  # the summary came back
    page.context.close()
