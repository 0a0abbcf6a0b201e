"""KV Lab: `python app.py [--model M] [--host 127.0.0.1] [--port N] [--auth user:password]`.

Opens on the embedded demo model, so it works offline with no GPU. In Jupyter, `from app import lab;
lab()` builds the app and shows it inline. Scripts drive it through its API (the README's "The app from a
script"): every endpoint is listed by `gradio_client.Client(url).view_api()`.

What is shared and what is not: the loaded model is one for everyone connected (there is one device to run it
on); each browser tab and each API client has its own applied settings, chat and run in view.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import gradio as gr

from engine.lab.access import is_loopback
from engine.errors import KVLabError
from engine.lab.session import LabSession
from panels import (chat_panel, compare_panel, explorer_panel, hardware_panel, kernel_panel, model_panel, profile_panel,
                    settings_panel)

# Gradio summarises every finished event with pandas over the last 10,000 events, for its monitoring dashboard (off
# here): tens of ms per event once a page has watched a long run. Summarise never (read when its queue is made).
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**12))

# Uploads are exported traces (the Profile panel's import): a long run's gzipped trace is a few MB.
MAX_UPLOAD = "64mb"
# Pinned, not left to Gradio's defaults (which environment variables such as GRADIO_MCP_SERVER can change).
SAFE_DEFAULTS = dict(share=False, run_history=False, enable_monitoring=False, mcp_server=False,
                     max_file_size=MAX_UPLOAD)


def build_app(session: LabSession) -> gr.Blocks:
    with gr.Blocks(title="KV Lab") as app:
        gr.Markdown("# KV Lab\nSee and speed up LLM decoding when the KV cache outgrows the GPU. _The loaded model "
                    "is shared by everyone connected; settings, chat and the run shown are this tab's own._")
        saved_settings = settings_panel.browser_memory()
        with gr.Tab("Model") as tab:
            model_key = model_panel.build(session, app=app, tab=tab)
        with gr.Tab("Settings"):
            settings_panel.build(session, app=app, model_key=model_key, saved=saved_settings)
        with gr.Tab("Chat"):
            chat_panel.build(session)
        with gr.Tab("Profile") as tab:
            profile_panel.build(session, app=app, tab=tab, model_key=model_key)
        with gr.Tab("Scheduler explorer"):
            explorer_panel.build(session, app=app, model_key=model_key)
        with gr.Tab("Compare"):
            compare_panel.build(session, app=app)
        with gr.Tab("Hardware"):
            hardware_panel.build(session)
        with gr.Tab("Kernels"):
            kernel_panel.build(session)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="KV Lab: an interactive lab for LLM decoding with offloaded KV caches.")
    parser.add_argument("--model", default="demo", help="demo (default), synthetic:<preset>, a local directory or a hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--auth", default=None, help="user:password; required when --host is not a loopback address")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when a GPU is visible)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of the engine (default on a machine without a GPU: one fewer than its cores, "
                             "so that the server and a page watching a run do not slow the run down)")
    parser.add_argument("--models-dir", default=None,
                        help="the directory clients on other machines may load models from (by folder name); "
                             "without it they may load only demo, synthetic presets and hub ids")
    return parser.parse_args(argv)


def engine_threads(threads: int | None = None) -> int:
    """Set the engine's CPU threads: `threads`, else, on a machine without a GPU, one fewer than its cores. There the
    model computes on the same cores as the server and the browser watching it, and torch's threads wait for each
    other at every operation: on 2 cores a neighbour using 15 % of one core cost a 2-thread run 29 % of its
    tokens/s, and a 1-thread run nothing (bench/results/profile_watched.md). Returns the number set."""
    import torch

    if threads is None:
        if torch.cuda.is_available():
            return torch.get_num_threads()
        threads = max(1, (os.cpu_count() or 1) - 1)
    if threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {threads}.")
    torch.set_num_threads(threads)
    return threads


# How long a Python thread may hold the GIL while another waits for it (CPython's default: 5 ms). The engine's decode
# thread releases the GIL inside every torch operation and must take it back after each; while a server thread answers
# a poll in pure Python, every one of those reacquisitions waits out the interval. On 2 CPU cores a Python neighbour
# busy 10 % of the time cost a demo-model decode 10 % of its speed at 5 ms and nothing measurable at 0.5, 0.2 and 0.1 ms.
GIL_SWITCH_INTERVAL_S = 0.0002


def share_the_gil() -> None:
    """Let the engine's thread take the GIL back quickly from the threads serving the page (process-wide)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def checked_auth(args: argparse.Namespace) -> tuple[str, str] | None:
    """--auth as (user, password); SystemExit for a malformed one, or for a non-loopback --host without it."""
    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise SystemExit("--auth must look like user:password (both non-empty).")
        auth = (user, password)
    if not is_loopback(args.host) and auth is None:
        raise SystemExit(f"Refusing to bind to {args.host} without --auth: anyone who can reach it could run the "
                         "model. Add --auth user:password, or bind to 127.0.0.1.")
    return auth


def launch_kwargs(args: argparse.Namespace, *, export_dir: str | Path) -> dict:
    """Security defaults: loopback, no share link, no run history, no monitoring endpoint, no MCP server; the only
    extra path files may be served from is the session's export directory."""
    auth = checked_auth(args)
    return dict(server_name=args.host, server_port=args.port, auth=auth, **SAFE_DEFAULTS,
                footer_links=["api", "settings"], allowed_paths=_allowed_paths(export_dir))


def _allowed_paths(export_dir: str | Path) -> list[str]:
    # Never an empty list: Gradio reads an empty one as "unset" and takes GRADIO_ALLOWED_PATHS from the environment.
    if not str(export_dir):
        raise ValueError("the app serves files from its export directory only: pass one")
    return [str(export_dir)]


class Lab:
    """The app a notebook started: `.app` (the Blocks), `.session`, `.local_url`, `.close()`. Its repr is one line
    (a notebook prints the last value of a cell: the Blocks' own repr is its whole component tree)."""

    def __init__(self, app: gr.Blocks, session: LabSession) -> None:
        self.app, self.session = app, session

    @property
    def local_url(self) -> str:
        return self.app.local_url

    @property
    def share(self):
        return self.app.share

    def close(self) -> None:
        self.app.close()

    def __repr__(self) -> str:
        model = self.session.model.name if self.session.model is not None else "no model"
        return f"KV Lab at {self.app.local_url} ({model}); .close() stops it"


def lab(model: str = "demo", *, models_dir: str | None = None, **launch_options) -> Lab:
    """Build the app in a notebook and show it inline (loopback, same defaults as the command line; an outward
    `server_name` needs `auth=(user, password)`, as `--host` needs `--auth`)."""
    host = launch_options.setdefault("server_name", "127.0.0.1")  # not GRADIO_SERVER_NAME from the environment
    if not is_loopback(host) and not launch_options.get("auth"):
        raise ValueError(f"Refusing to serve on {host} without auth: anyone who can reach it could run the model. "
                         "Pass auth=(user, password), or keep the default 127.0.0.1.")
    if "threads" in launch_options:  # a notebook's torch is the user's: its threads change only when asked
        engine_threads(launch_options.pop("threads"))
    share_the_gil()  # the app serves from the notebook kernel's process, beside the engine
    session = LabSession(models_dir=models_dir)
    session.load(model)
    app = build_app(session)
    options = SAFE_DEFAULTS | dict(inline=True, quiet=True, allowed_paths=_allowed_paths(session.export_dir)) \
        | launch_options
    app.queue(default_concurrency_limit=1).launch(**options)
    return Lab(app, session)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checked_auth(args)  # refuses an unsafe address before anything is loaded
    threads = engine_threads(args.threads)
    share_the_gil()
    try:
        session = LabSession(models_dir=args.models_dir)
    except KVLabError as exc:
        raise SystemExit(str(exc)) from None
    try:
        card = session.load(args.model, device=args.device)
        print(f"Loaded {card['name']} on {card['device']} in {card['load_s']:.2f} s", flush=True)
    except Exception as exc:  # noqa: BLE001 - the app still opens; the Model panel can load another model
        print(f"Could not load {args.model!r}: {exc}", file=sys.stderr, flush=True)
    app = build_app(session).queue(default_concurrency_limit=1)
    # quiet: Gradio's own lines include "To create a public link, set share=True", which this app never does.
    app.launch(quiet=True, prevent_thread_lock=True, **launch_kwargs(args, export_dir=session.export_dir))
    where = "this machine only" if is_loopback(args.host) else f"{args.host}, with --auth"
    print(f"KV Lab running on {app.local_url} ({where}; no share link; the engine computes on {threads} CPU "
          f"thread{'s' if threads != 1 else ''}). Ctrl+C stops it.", flush=True)
    try:
        app.block_thread()
    except (KeyboardInterrupt, OSError):
        app.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
