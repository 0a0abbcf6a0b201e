"""Compare panel: profiling runs side by side (settings that differ, tok/s, step ms, % of the PCIe floor, deltas
against the first run picked), exportable as CSV or JSON."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from engine.errors import InvalidSettingsError
from engine.run_compare import CompareTable
from engine.session import LabSession
from panels.errors import describe


def run_choices(session: LabSession) -> list[tuple[str, str]]:
    return [(record.label, str(record.run_id)) for record in session.runs]


def run_ids(selected) -> list[int]:
    values = selected if isinstance(selected, list) else [selected] if selected else []
    try:
        ids = [int(str(value).lstrip("#")) for value in values]
    except ValueError:
        raise InvalidSettingsError(f"Runs are picked by number, got {values!r}: pick runs from the list.") from None
    if not ids:
        raise InvalidSettingsError("No runs picked: pick one or more runs (the first is the baseline).")
    return ids


def table_frame(table: CompareTable) -> pd.DataFrame:
    rows = [["—" if cell is None else cell for cell in row] for row in table.rows]
    return pd.DataFrame(rows, columns=list(table.columns))


def diff_markdown(table: CompareTable) -> str:
    differing = ", ".join(f"`{key}`" for key in table.differing) or "nothing (same settings and shape)"
    return f"Baseline: run #{table.baseline_run_id} (deltas are against it). Differing: {differing}."


def build(session: LabSession) -> None:
    with gr.Row():
        picker = gr.Dropdown(run_choices(session), multiselect=True, allow_custom_value=True,
                             label="Runs (the first picked is the baseline)",
                             scale=4)
        refresh = gr.Button("Refresh runs", scale=1)
    compare = gr.Button("Compare", variant="primary")
    table = gr.Dataframe(interactive=False, wrap=True)
    diff = gr.Markdown("")
    with gr.Row():
        fmt = gr.Radio(["csv", "json"], value="csv", label="Export format")
        export = gr.Button("Export")
    exported = gr.File(label="Comparison", interactive=False, height=120)

    def on_refresh():
        choices = run_choices(session)
        recent = [value for _, value in choices[-2:]]
        return gr.Dropdown(choices=choices, value=recent), f"{len(choices)} runs in this session."

    def on_compare(selected):
        try:
            result = session.compare(run_ids(selected))
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            return gr.skip(), f"**Error:** {describe(exc)}"
        return table_frame(result), diff_markdown(result)

    def on_export(selected, file_format):
        try:
            return str(session.export_compare(run_ids(selected), fmt=file_format)), gr.skip()
        except Exception as exc:  # noqa: BLE001
            return None, f"**Error:** {describe(exc)}"

    refresh.click(on_refresh, None, [picker, diff], api_name="list_runs", queue=False)
    picker.focus(on_refresh, None, [picker, diff], api_name=False, queue=False)
    compare.click(on_compare, picker, [table, diff], api_name="compare", queue=False)
    export.click(on_export, [picker, fmt], [exported, diff], api_name="export_compare", queue=False)
