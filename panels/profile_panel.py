"""Profile panel: run a profiling session under the applied settings and watch it live, then download its trace.

The run streams its progress on the GPU queue; the plots are redrawn by a timer (once a second while a run
goes on) that reads the session's live view without waiting for the device, and skips a redraw when
nothing changed. Drawing takes the GIL from the thread that launches the engine's work, so the timer does
not tick faster than the eye needs. Every figure keeps the user's zoom across redraws of the same run
(`uirevision`).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from engine.lab_runs import LiveView, ProfileUpdate
from engine.session import LabSession
from panels.errors import GPU_QUEUE, describe
from panels.plots import pcie_figure, step_figure, timeline_figure

POLL_S = 1.0


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f} ms"


def progress_line(update: ProfileUpdate) -> str:
    if update.step == 0:
        return f"Run #{update.run_id}: prefill done, decoding {update.num_steps} steps ..."
    payload = ", ".join(f"{d.upper()} {gb:.2f}" for d, gb in update.payload_gb_s.items())
    link = ", ".join(f"{d.upper()} {gb:.2f}" for d, gb in update.link_gb_s.items()) if update.link_gb_s else None
    line = (f"Run #{update.run_id}: step {update.step}/{update.num_steps} · {_ms(update.step_ms)} "
            f"(predicted {_ms(update.predicted_ms)}) · {update.tokens_per_s or 0:.1f} tok/s · payload GB/s: {payload}")
    return line + (f" · link GB/s: {link}" if link else "")


def sources_markdown(view: LiveView) -> str:
    return f"**PCIe link:** {view.link_note or '—'}  \n**L2 hit rate:** {view.l2_note or '—'}"


def summary_markdown(view: LiveView) -> str:
    head = f"**Run #{view.run_id}: {view.status}**, {view.step}/{view.num_steps} decode steps measured."
    record = view.record
    if record is None:
        return head
    ratio = (f" (measured / predicted = {record.median_step_ms / record.predicted_ms:.2f})"
             if record.predicted_ms else "")
    floor = (f"{_ms(record.pcie_floor_ms)}, measured step at {record.pct_of_floor:.1f} % of the floor's speed"
             if record.pct_of_floor is not None else "nothing offloaded")
    rows = [("model", f"{record.model} on {record.device_name or record.device}"),
            ("shape", f"batch {record.batch} × prompt {record.prompt_tokens}, {record.new_tokens} new tokens, "
                      f"seed {record.seed}"),
            ("tokens/s (decode)", f"{record.tokens_per_s:,.1f}"),
            ("median step", f"{_ms(record.median_step_ms)}{ratio}"),
            ("predicted step (plan)", _ms(record.predicted_ms)),
            ("PCIe floor (plan)", floor),
            ("mean recompute split", "—" if record.split is None else f"{record.split:.2f}"),
            ("prefill", _ms(record.prefill_ms)),
            ("plan", record.plan_reason)]
    notes = "".join(f"\n- {note}" for note in record.notes)
    return head + "\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + notes


def build(session: LabSession) -> None:
    gr.Markdown("Decodes `batch` seeded random prompts under the applied settings (Settings tab) with the "
                "recorder attached: every layer's copies, recomputation, attention and MLP on their lanes.")
    with gr.Row():
        run = gr.Button("Run profile", variant="primary")
        stop = gr.Button("Stop")
        export = gr.Button("Download trace (Perfetto)")
        show = gr.Button("Show last run")
        upload = gr.UploadButton("Import a run (exported trace)", file_types=[".json", ".gz"], file_count="single")
    counters = gr.Checkbox(True, label="Sample GPU counters with CUPTI where available (PCIe, DRAM, L2 every 1 ms; "
                                       "on an H100 this slowed an offloaded step by about a fifth)")
    progress = gr.Markdown("")
    timeline = gr.Plot(label="Timeline", show_label=False)
    with gr.Row():
        pcie = gr.Plot(label="PCIe GB/s", show_label=False)
        steps = gr.Plot(label="Step time and tokens/s", show_label=False)
    sources = gr.Markdown("")
    summary = gr.Markdown("")
    trace_file = gr.File(label="Trace: open in ui.perfetto.dev or chrome://tracing", interactive=False, height=120)
    # "run_id:version" of what the plots show. A hidden textbox, not gr.State: State would make every page hold a
    # heartbeat connection open for the whole visit.
    drawn = gr.Textbox("", visible=False)
    timer = gr.Timer(POLL_S, active=False)

    def on_run(gpu_counters: bool = True):
        settings, shape = session.settings, session.shape
        line = "Starting the run (a device never measured before is measured first) ..."
        yield line, gr.Timer(active=True)
        last = None
        try:
            for last in session.profile(settings, batch=shape.batch, prompt_tokens=shape.prompt_tokens,
                                        seed=shape.seed, gpu_counters=bool(gpu_counters)):
                if last.record is None:
                    yield progress_line(last), gr.skip()
        except Exception as exc:  # noqa: BLE001 - shown in the panel; the model stays loaded
            kept = f" The loaded model ({session.model.name}) is kept." if session.model else ""
            yield f"**Error:** {describe(exc)}{kept}", gr.Timer(active=False)
            return
        if last is not None and last.record is not None:
            record = last.record
            line = (f"Run #{record.run_id} done: {record.tokens_per_s:,.1f} tok/s, median step "
                    f"{record.median_step_ms:.3f} ms (predicted {_ms(record.predicted_ms)}).")
        elif last is not None:
            line = f"Run #{last.run_id} stopped after {last.step}/{last.num_steps} decode steps; no record kept."
        yield line, gr.Timer(active=False)

    def on_stop():
        stopping = session.stop_profile()
        return ("Stopping after the current step ..." if stopping else "No profile is running."), gr.Timer(active=False)

    def on_view(drawn_key: str):
        view = session.live()
        if view is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), "_No profiling run yet: press Run profile, or import a run exported earlier._", drawn_key
        key = f"{view.run_id}:{view.version}"
        if key == drawn_key:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), drawn_key
        pm = view.record.pm_counters if view.record is not None else None
        return (timeline_figure(view.spans, run_id=view.run_id),
                pcie_figure(view.steps, view.link, run_id=view.run_id, pm_counters=pm),
                step_figure(view.steps, run_id=view.run_id), sources_markdown(view), summary_markdown(view), key)

    def on_import(file):
        path = getattr(file, "name", file)
        if not path:
            return "No file was uploaded: choose a .trace.json(.gz) exported by this panel.", ""
        try:
            record = session.import_run(path, note=f"imported from {Path(path).name}")
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            return f"**Error:** {describe(exc)}", ""
        return (f"Imported run #{record.run_id}: {record.label}, measured on {record.device_name or record.device} at {record.created_at}, "
                f"{record.tokens_per_s:,.1f} tok/s."), ""

    def on_export():
        try:
            return str(session.export_trace()), ""
        except Exception as exc:  # noqa: BLE001
            return None, f"**Error:** {describe(exc)}"

    view_outputs = [timeline, pcie, steps, sources, summary, drawn]
    job = run.click(on_run, counters, [progress, timer], concurrency_id=GPU_QUEUE, concurrency_limit=1, api_name="profile")
    job.then(on_view, drawn, view_outputs, api_name=False, show_progress="hidden")
    timer.tick(on_view, drawn, view_outputs, concurrency_id="telemetry", concurrency_limit=1, trigger_mode="once",
               show_progress="hidden", api_name="profile_view")
    show.click(lambda: on_view(""), None, view_outputs, queue=False, api_name="profile_show")
    upload.upload(on_import, upload, [progress, drawn], queue=False, api_name="profile_import").then(
        on_view, drawn, view_outputs, api_name=False, show_progress="hidden")
    # The session stops the run between steps (an API client's stop reaches it too); `cancels` ends the stream.
    stop.click(on_stop, None, [progress, timer], cancels=[job], queue=False,
               api_name="stop_profile").then(on_view, drawn, view_outputs, api_name=False, show_progress="hidden")
    export.click(on_export, None, [trace_file, progress], api_name="export_trace")
