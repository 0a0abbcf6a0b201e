"""The app in a real headless Chromium (Debian's package, driven by Playwright): chat with the demo model.

Skips, saying why, when Playwright or the chromium binary is absent (CI installs both). The screenshot is
kept under tests/artifacts/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# Chromium on a machine with no network: no background connections, no sandbox (root in CI).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def page_url(served_demo_app):
    return served_demo_app[0].local_url


def test_chat_in_the_browser_streams_a_reply(page_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(page_url, wait_until="networkidle")
            page.get_by_role("tab", name="Chat").click()
            box = page.get_by_placeholder("Say something to the model")
            box.fill("How now, my lord?")
            page.get_by_role("button", name="Send", exact=True).click()
            # The stats line appears once the reply has finished streaming.
            page.get_by_text("finished:").wait_for(timeout=60_000)
            bubbles = page.locator(".message")  # Gradio's chat bubbles
            assert bubbles.count() >= 2
            reply = bubbles.nth(bubbles.count() - 1).inner_text().strip()
            assert reply and reply != "How now, my lord?"
            assert "tok/s" in page.get_by_text("tok/s").first.inner_text()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
            assert (ARTIFACTS / "chat.png").stat().st_size > 10_000
        finally:
            browser.close()


def test_model_tab_shows_the_card_and_reports_a_bad_path(page_url):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(page_url, wait_until="networkidle")
            assert page.get_by_text("KV bytes per token").is_visible()
            field = page.get_by_label("Model")
            field.fill("/no/such/dir")
            field.press("Enter")
            page.get_by_role("button", name="Load model").click()
            page.get_by_text("Could not load").wait_for(timeout=30_000)
            assert page.get_by_text("does not exist").first.is_visible()
            assert page.get_by_text("demo (Shakespeare)").first.is_visible()  # the loaded model is kept
        finally:
            browser.close()


def test_profile_in_the_browser_draws_the_webgl_timeline(served_demo_app, profile_cache):
    """Load the tiny model, chat with it, apply an offloaded placement, run a profile: the timeline renders."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    demo, session = served_demo_app
    # WebGL without a GPU: Chromium's software rasteriser (SwiftShader) backs Plotly's scattergl.
    args = [*CHROMIUM_ARGS, "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.goto(demo.local_url, wait_until="networkidle")
                field = page.get_by_label("Model")
                field.fill("synthetic:tiny-llama")
                field.press("Enter")
                page.get_by_role("button", name="Load model").click()
                page.get_by_text("Loaded tiny-llama").wait_for(timeout=30_000)

                page.get_by_role("tab", name="Chat").click()
                page.get_by_placeholder("Say something to the model").fill("abc")
                page.get_by_role("button", name="Send", exact=True).click()
                page.get_by_text("finished:").wait_for(timeout=60_000)
                assert page.locator(".message").count() >= 2 and "tok/s" in page.get_by_text("tok/s").first.inner_text()

                page.get_by_role("tab", name="Settings").click()
                page.get_by_role("radio", name="cpu").check()
                for label, value in (("batch (profiling)", "2"), ("prompt length, tokens (profiling)", "32"),
                                     ("new tokens", "8"), ("activation chunk (tokens)", "16")):
                    page.get_by_label(label).fill(value)
                page.get_by_role("button", name="Apply settings").click()
                page.get_by_text("Applied.").wait_for(timeout=30_000)
                assert session.settings.offload.placement == "cpu" and session.shape.prompt_tokens == 32

                page.get_by_role("tab", name="Profile").click()
                page.get_by_role("button", name="Run profile").click()
                page.get_by_text("done:").wait_for(timeout=60_000)
                # The timeline is a Plotly plot whose traces are WebGL line segments, drawn on a WebGL canvas.
                page.wait_for_function("""() => [...document.querySelectorAll('.js-plotly-plot')].some(
                    p => (p.data || []).some(t => t.type === 'scattergl') && p.querySelector('canvas'))""",
                                       timeout=30_000)
                lanes = page.evaluate("""() => [...document.querySelectorAll('.js-plotly-plot')]
                    .filter(p => (p.data || []).some(t => t.type === 'scattergl'))[0].data.map(t => t.name)""")
                assert "H2D KV" in lanes and "attention" in lanes
                assert page.get_by_text("predicted step (plan)").is_visible()
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "profile.png"), full_page=True)
                assert (ARTIFACTS / "profile.png").stat().st_size > 10_000
            finally:
                browser.close()
    finally:
        session.load("demo", device="cpu")
