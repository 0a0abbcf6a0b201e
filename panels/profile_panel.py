"""Profile panel: run a profiling session under this tab's applied settings, watch it live, download its trace.

Three views of a run, drawn by the page itself (panels/live_plots.js) from the small deltas its timer fetches once
a second while a run goes on (panels/live_poll.js: one plain POST to /profile_live, no Gradio event; panels/live_view.py): the whole run's lanes per layer with the PCIe series under
them; one step (the latest, or one picked) per layer, where the copies overlap recompute and attention, with the
PCIe and L2 series under it on the same axis; and the step time, whose axis leaves out the warm-up and capture
steps (marked). Watching costs the run nothing measurable: the server sends only what is new, bounded per
update, and nothing it has sent is rebuilt; a user's zoom is never reset.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder, is_in_or_equal

from engine.errors import InvalidSettingsError
from engine.lab.live import LiveRun
from engine.lab.runs import NO_GPU_PREDICTION, RunRecord
from engine.lab.session import LabSession
from panels.api import PRIVATE, endpoint, owner
from panels.errors import DEVICE_QUEUE, as_markdown, describe, shown
from panels.live_view import Cursor, live_delta
from panels.plots import placeholder

POLL_S = 1.0
LIVE_WINDOW = 12  # steps of the run timeline the page draws while a run goes on (panels/live_plots.js WINDOW)
PROGRESS_S = 1.0  # how often /profile streams its progress to an API client
APPLY_JS = (Path(__file__).with_name("live_plots.js")).read_text()
# The timer's tick, run in the page (APPLY_JS inside it draws what it fetched).
POLL_JS = (Path(__file__).with_name("live_poll.js")).read_text().replace("__APPLY__", APPLY_JS.strip()) \
    .replace("__WINDOW__", str(LIVE_WINDOW))
# Which Gradio session the page is (its requests' session_hash), for the timer's own requests.
SESSION_JS = "(key) => { (window.__kvlab = window.__kvlab || {cursor: ''}).session = key; }"
# The page's drawn cursor is the page script's (the timer advances it without Gradio events).
CURSOR_JS = "(drawn, step) => [(window.__kvlab && window.__kvlab.session) ? window.__kvlab.cursor : drawn, step]"
PLOTS = {"kvlab-timeline": ("The run's lanes per layer", "No run yet: choose the shape in the Settings tab, then press "
                            "Run profile, or import a trace exported earlier."),
         "kvlab-onestep": ("One decode step, per layer", "One step of the run, per layer, appears here: the copies "
                           "overlapping recompute and attention, with PCIe and L2 under them."),
         "kvlab-steps": ("Step time and tokens/s", "Each decode step's time appears here as the run goes; warm-up and "
                         "capture steps are marked and left off the axis.")}


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f} ms"


def who_started(live: LiveRun, who: str | None) -> str:
    if live.status == "imported":
        return "imported"
    return "started here" if live.owner is not None and live.owner == who else "started elsewhere"


def progress_line(live: LiveRun, who: str | None) -> str:
    """Where the run this tab views is: its stage (waiting, prefill layer k of n, decode step k of n, with the time
    left), its tokens/s so far, or its end."""
    read = live.head()
    stage = read.stage
    head = f"Run #{live.run_id} ({who_started(live, who)})"
    if read.finished:
        record = read.record
        if record is not None:
            return f"{head}: {live.status}, {record.tokens_per_s:,.1f} tok/s, median step {record.median_step_ms:.3f} ms."
        return f"{head}: {live.status} after {read.step} of {read.num_steps} decode steps; no record kept."
    return f"{head}: {stage.line()}."


def summary_markdown(record: RunRecord) -> str:
    """The finished run's figures: what was measured, what the plan predicted (on a GPU only), and its notes."""
    on_gpu = record.on_gpu
    steady = (f"{record.tokens_per_s:,.1f} (the steps after {record.warmup_steps} warm-up step"
              f"{'s' if record.warmup_steps != 1 else ''}; {record.tokens_per_s_all:,.1f} with them)"
              if record.warmup_steps and record.tokens_per_s_all is not None else f"{record.tokens_per_s:,.1f}")
    if on_gpu:
        ratio = (f" (measured / predicted = {record.median_step_ms / record.predicted_ms:.2f})"
                 if record.predicted_ms else "")
        predicted = _ms(record.predicted_ms)
        floor = (f"{_ms(record.pcie_floor_ms)}; the measured step ran at {record.pct_of_floor:.1f} % of the speed "
                 "the link allows" if record.pct_of_floor is not None else "nothing offloaded")
        plan = record.plan_reason
    else:
        ratio, predicted = "", f"— ({NO_GPU_PREDICTION})"
        floor = "— (no PCIe link: the model ran on the CPU)"
        plan = record.plan_reason if record.settings.get("offload.placement") != "gpu" else \
            "nothing offloaded: the KV cache is resident"
    where = record.device_name or record.device
    rows = [("model", f"{record.model} on {where}"),
            ("measured", record.created_at),
            ("shape", f"batch {record.batch} × prompt {record.prompt_tokens}, {record.new_tokens} new tokens, "
                      f"seed {record.seed}"),
            ("tokens/s (decode)", steady),
            ("median step", f"{_ms(record.median_step_ms)}{ratio}"),
            ("predicted step (plan)", predicted),
            ("PCIe floor (plan)", floor),
            ("mean recompute split", "—" if record.split is None else f"{record.split:.2f}"),
            ("prefill", _ms(record.prefill_ms)),
            ("plan", plan)]
    notes = "".join(f"\n- {note}" for note in record.notes)
    return (f"**Run #{record.run_id}: {record.label}**\n\n| figure | value |\n|---|---|\n"
            + "\n".join(f"| {k} | {v} |" for k, v in rows) + notes)


def sources_markdown(read) -> str:
    return f"**PCIe link:** {read.link_note or '—'}  \n**L2 hit rate:** {read.l2_note or '—'}"


def run_choices(session: LabSession) -> list[tuple[str, str]]:
    return [(record.label, str(record.run_id)) for record in reversed(session.runs)]


def _with_kept(message: str, session: LabSession) -> str:
    if session.model is None or "is kept" in message:
        return message
    return f"{message} The loaded model ({session.model.name}) is kept."


def build(session: LabSession, *, app: gr.Blocks, tab: gr.Tab, model_key: gr.Textbox) -> None:
    gr.Markdown("Decodes `batch` seeded random prompts under this tab's applied settings (Settings tab) with the "
                "recorder attached: every layer's copies, recomputation, attention and MLP on their lanes. One run "
                "uses the device at a time; a run asked for while another job runs waits for it, and says so.")
    with gr.Row():
        run = gr.Button("Run profile", variant="primary")
        stop = gr.Button("Stop")
        export = gr.Button("Download trace (Perfetto)")
        upload = gr.UploadButton("Import a run (exported trace)", file_types=[".json", ".gz"], file_count="single")
    with gr.Row():
        picker = gr.Dropdown([], label="Run shown (this tab's)", allow_custom_value=False, scale=3)
        show_step = gr.Number(0, precision=0, minimum=0, label="step in the one-step view (0: the latest)", scale=1)
        counters = gr.Checkbox(False, label="Sample GPU counters with CUPTI (PCIe, DRAM, L2 every 1 ms)", scale=2)
    status = gr.Markdown("")
    progress = gr.Markdown("")
    # The progress line while a run goes on: written by the page's timer (live_poll.js), never by an event.
    gr.HTML("<span class='kvlab-line'></span>", elem_id="kvlab-live-line", padding=False)
    # Drawn by the page (live_plots.js) into these plots' elements: no event ever sets their values.
    for elem_id, height in (("kvlab-timeline", 430), ("kvlab-onestep", 470), ("kvlab-steps", 330)):
        gr.Plot(placeholder(*PLOTS[elem_id], height=height), elem_id=elem_id, show_label=False)
    sources = gr.Markdown("")
    summary = gr.Markdown("")
    trace_file = gr.File(label="Trace: open in ui.perfetto.dev or chrome://tracing", interactive=False, height=120,
                         visible=False)
    # The page's state, as hidden textboxes (gr.State would hold a heartbeat connection open all visit): the delta
    # to draw, and the cursor of what is drawn (set by the page's script once it has drawn a delta).
    delta = gr.Textbox("", visible=False)
    cursor = gr.Textbox("", visible=False)
    timer = gr.Timer(POLL_S, active=False)
    page_key = gr.Textbox("", visible=False)
    finish = gr.Button("Finish", visible="hidden", elem_id="kvlab-finish")

    def counters_control():
        model = session.model
        if model is not None and model.device.type == "cuda":
            return gr.update(interactive=True, info="costs about a fifth of an offloaded step on an H100")
        return gr.update(value=False, interactive=False,
                         info="no GPU here: CUPTI samples GPU counters (the model runs on the CPU)")

    def on_poll(drawn: str, step, request: gr.Request):
        """The delta this page has not drawn yet; the summary when the run ends; the timer off once all is drawn."""
        who = owner(request)
        live = session.live_run(who)
        if live is None:
            return gr.skip(), "", gr.skip(), gr.skip(), gr.Timer(active=False)
        before = Cursor.parse(drawn)
        device = session.model.device.type if session.model is not None else "cpu"
        data, after = live_delta(live, before, show_step=int(step or 0), on_gpu=device == "cuda", window=LIVE_WINDOW)
        head = live.head()
        ended = data["finished"] or (after.final and not before.final)
        text = summary_markdown(head.record) if head.record is not None and (data["reset"] or ended) else \
            "" if data["reset"] else gr.skip()
        # The page asks for the whole run once it has ended (it drew a bounded part while it ran): the timer stops
        # once that is sent.
        done = data["finished"] and data["reset"]
        return (json.dumps(data, separators=(",", ":")), progress_line(live, who), text,
                sources_markdown(head) if data["reset"] or ended else gr.skip(),
                gr.Timer(active=False) if done else gr.skip())

    def on_finish(request: gr.Request):
        """The run the page has drawn whole: its end line, summary and sources; the timer off."""
        who = owner(request)
        live = session.live_run(who)
        if live is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        head = live.head()
        if not head.finished:  # another run began since: keep polling
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return (progress_line(live, who), summary_markdown(head.record) if head.record is not None else "",
                sources_markdown(head), gr.Timer(active=False))

    def on_run(gpu_counters: bool, request: gr.Request):
        who = owner(request)
        settings, shape = session.settings_for(who)
        first = "" if session.has_hardware() else " This device is measured first (once per device; some seconds)."
        yield f"Starting a run: batch {shape.batch} × prompt {shape.prompt_tokens}, {settings.max_new_tokens} new " \
              f"tokens, KV {settings.offload.placement}.{first}", gr.Timer(active=True), gr.skip(), ""
        last = None
        try:
            for last in session.profile(settings, batch=shape.batch, prompt_tokens=shape.prompt_tokens,
                                        seed=shape.seed, gpu_counters=bool(gpu_counters), owner=who):
                pass  # the timer draws the run; this stream says only how it ends
        except Exception as exc:  # noqa: BLE001 - shown in the panel; the model stays loaded
            yield f"**Error:** {as_markdown(_with_kept(describe(exc), session))}", gr.Timer(active=True), gr.skip(), \
                gr.skip()
            return
        if last is not None and last.step == 0 and not last.new_steps and last.record is None:
            line = f"Run #{last.run_id} stopped before it started; no record kept."
        elif last is not None:
            line = ""  # the progress line says how it ended: done with its figures, or stopped after step k of n
        else:
            line = "Stopped; no record kept."
        shown = str(last.run_id) if last is not None and last.record is not None else None
        # The timer draws the rest, then stops itself.
        yield line, gr.Timer(active=True), gr.update(choices=run_choices(session), value=shown), gr.skip()

    def on_stop(request: gr.Request):
        # The progress line says "stopping after the current step" (the page's timer reads it within a second), and
        # the run's own last line says how it ended: a reply here could land after that line and hide it.
        if session.stop_profile(owner(request)):
            return gr.skip()
        return "No profile of this tab is running."

    def on_pick(value, request: gr.Request):
        try:
            session.view_run(int(value), owner(request))
        except (TypeError, ValueError):
            return gr.skip(), gr.skip()
        except Exception as exc:  # noqa: BLE001
            return f"**Error:** {shown(exc)}", gr.skip()
        return "", gr.Timer(active=True)

    def on_import(file, request: gr.Request):
        path = getattr(file, "name", file)
        if not path:
            return "No file was uploaded: choose a .trace.json(.gz) exported by this panel.", gr.skip(), gr.skip()
        try:
            record = session.import_run(path, note=f"imported from {Path(path).name}", owner=owner(request))
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            return f"**Error:** {shown(exc)}", gr.skip(), gr.skip()
        return (f"Imported run #{record.run_id}: {record.label}, measured on {record.device_name or record.device} "
                f"at {record.created_at}."), gr.Timer(active=True), \
            gr.update(choices=run_choices(session), value=str(record.run_id))

    def on_export(request: gr.Request):
        try:
            live = session.live_run(owner(request))
            shown = live.head().record if live is not None else None
            path = session.export_trace(shown.run_id if shown is not None else None)
            return gr.update(value=str(path), visible=True), ""
        except Exception as exc:  # noqa: BLE001
            return gr.update(value=None, visible=False), f"**Error:** {shown(exc)}"

    def on_page(request: gr.Request):
        live = session.live_run(owner(request))
        running = live is not None and not live.head().finished
        return gr.update(choices=run_choices(session)), counters_control(), gr.Timer(active=running), \
            owner(request) or ""

    poll_outputs = [delta, progress, summary, sources, timer]
    draw = dict(fn=None, inputs=[delta, cursor], outputs=cursor, js=APPLY_JS, **PRIVATE)
    # The tick runs in the page alone (no Gradio event, no outputs re-rendered): see live_poll.js.
    timer.tick(None, [show_step], None, js=POLL_JS, queue=False, trigger_mode="once", show_progress="hidden",
               **PRIVATE)
    finish.click(on_finish, None, [progress, summary, sources, timer], queue=False, show_progress="hidden", **PRIVATE)
    show_step.change(on_poll, [cursor, show_step], poll_outputs, js=CURSOR_JS, queue=False, show_progress="hidden",
                     **PRIVATE).then(**draw)
    tab.select(on_poll, [cursor, show_step], poll_outputs, js=CURSOR_JS, queue=False, show_progress="hidden",
               **PRIVATE).then(**draw)
    # No Gradio progress animation over the run's outputs: it repaints every frame for the whole run (the panel's
    # own progress line says where the run is).
    run.click(on_run, counters, [status, timer, picker, progress], concurrency_id=DEVICE_QUEUE, concurrency_limit=16,
              show_progress="hidden", **PRIVATE)
    stop.click(on_stop, None, status, queue=False, **PRIVATE)
    picker.focus(lambda: gr.update(choices=run_choices(session)), None, picker, queue=False, **PRIVATE)
    picker.input(on_pick, picker, [status, timer], queue=False, **PRIVATE)
    upload.upload(on_import, upload, [status, timer, picker], queue=False, **PRIVATE)
    export.click(on_export, None, [trace_file, status], **PRIVATE)
    app.load(on_page, None, [picker, counters, timer, page_key], queue=False, **PRIVATE).then(
        None, [page_key], None, js=SESSION_JS, **PRIVATE)
    model_key.change(counters_control, None, counters, queue=False, **PRIVATE)

    register_api(session)


def run_summary(record: RunRecord, *, with_steps: bool = False) -> dict:
    out = record.summary(with_steps=with_steps)
    if not record.on_gpu:
        out |= {"predicted_ms": None, "pcie_floor_ms": None, "pct_of_floor": None, "prediction_note": NO_GPU_PREDICTION}
    return out


def register_api(session: LabSession) -> None:
    """The Profile panel's endpoints for scripts."""

    def profile(gpu_counters: bool = False, request: gr.Request = None) -> Iterator[dict]:
        """Run a profile under this client's applied settings (shape: batch, prompt_tokens, max_new_tokens) and
        stream its progress about once a second; the last state holds the run's record (`run`). `gpu_counters`:
        CUPTI sampling (GPU only). While another job holds the device, `waiting_for` says which. /profile_live
        shows the same run as the page draws it."""
        who = owner(request)
        settings, shape = session.settings_for(who)
        last_sent, update = 0.0, None
        for update in session.profile(settings, batch=shape.batch, prompt_tokens=shape.prompt_tokens, seed=shape.seed,
                                      gpu_counters=bool(gpu_counters), owner=who):
            now = time.monotonic()
            if update.record is None and now - last_sent >= PROGRESS_S:
                last_sent = now
                yield {"run_id": update.run_id, "status": "waiting" if update.waiting_for else "running",
                       "waiting_for": update.waiting_for, "step": update.step, "num_steps": update.num_steps,
                       "step_ms": update.step_ms, "tokens_per_s": update.tokens_per_s}
        if update is None:
            return
        if update.record is None:
            yield {"run_id": update.run_id, "status": "stopped", "step": update.step, "num_steps": update.num_steps}
            return
        yield {"run_id": update.run_id, "status": "done", "step": update.step, "num_steps": update.num_steps,
               "run": run_summary(update.record)}

    def stop_profile(request: gr.Request = None) -> dict:
        """Stop this client's profile (running or waiting) after its current step; it keeps no record."""
        stopping = session.stop_profile(owner(request))
        return {"stopping": stopping,
                "message": "Stopping after the current step." if stopping else "No profile of yours is running."}

    def profile_live(cursor: str = "", step: int = 0, window: int = 0, request: gr.Request = None) -> dict:
        """What the page draws of the run this client views, from `cursor` on (pass back the `cursor` of the
        previous answer; "" for the whole run): new steps, timeline bars, NVML samples, the one-step view of `step`
        (0: the latest), the stage with the time left (`progress`), `finished` once everything is sent. `window`:
        while the run goes on, only the spans of its last `window` steps (the page asks for 12; 0: all)."""
        live = session.live_run(owner(request))
        if live is None:
            raise InvalidSettingsError("No profiling run yet: start one with /profile or import one with /import_run.")
        device = session.model.device.type if session.model is not None else "cpu"
        data, _ = live_delta(live, Cursor.parse(cursor), show_step=int(step or 0), on_gpu=device == "cuda",
                             window=max(0, int(window or 0)))
        return data | {"progress": progress_line(live, owner(request))}

    def runs() -> dict:
        """The kept runs (every client's), newest first."""
        return {"runs": [{"run_id": r.run_id, "label": r.label, "model": r.model, "device": r.device_name or r.device,
                          "created_at": r.created_at, "tokens_per_s": r.tokens_per_s} for r in reversed(session.runs)]}

    def run_record(run_id: int | None = None) -> dict:
        """A kept run's record with its steps (None: the latest)."""
        return {"run": run_summary(session.run(run_id), with_steps=True)}

    def show_run(run_id: int, request: gr.Request = None) -> dict:
        """Make a kept run the one this client views (what /profile_live returns)."""
        session.view_run(int(run_id), owner(request))
        return {"run_id": int(run_id)}

    def export_trace(run_id: int | None = None) -> gr.FileData:
        """A kept run's Chrome/Perfetto trace (None: the latest), for ui.perfetto.dev or /import_run elsewhere."""
        return gr.FileData(path=str(session.export_trace(run_id)))

    def import_run(trace: gr.FileData, request: gr.Request = None) -> dict:
        """Keep a run from a trace exported by /export_trace (here or on another machine) beside this session's,
        and view it."""
        path = trace.get("path") if isinstance(trace, dict) else getattr(trace, "path", trace)
        if not isinstance(path, str) or not is_in_or_equal(path, get_upload_folder()):
            raise InvalidSettingsError("trace must be a file uploaded with this request (gradio_client: "
                                       "handle_file('run.trace.json.gz')).")
        record = session.import_run(path, note=f"imported from {Path(path).name}", owner=owner(request))
        return {"run": run_summary(record)}

    endpoint(profile, api_name="profile", output="progress", concurrency_id=DEVICE_QUEUE, concurrency_limit=16)
    endpoint(stop_profile, api_name="stop_profile", output="stop", queue=False)
    # Not queued: a read that never waits for the device, answered by one POST (/gradio_api/run/profile_live).
    endpoint(profile_live, api_name="profile_live", output="live", queue=False)
    endpoint(runs, api_name="runs", output="runs", queue=False)
    endpoint(run_record, api_name="run", output="run", queue=False)
    endpoint(show_run, api_name="show_run", output="shown", queue=False)
    endpoint(export_trace, api_name="export_trace", output="trace")
    endpoint(import_run, api_name="import_run", output="run")
