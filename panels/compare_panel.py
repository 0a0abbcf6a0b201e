"""Compare panel: profiling runs side by side (settings that differ, tok/s, step ms, % of the PCIe floor, deltas
against the first run picked), exportable as CSV or JSON.

On screen the table is turned so that each run is a column and each setting or figure a row: runs are few and
settings many, so it fits the page and its headers are run numbers, not setting names broken letter by letter.
The CSV keeps one row per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import gradio as gr
import pandas as pd
from gradio.utils import get_upload_folder, is_in_or_equal

from engine.errors import InvalidSettingsError
from engine.lab.compare import CompareTable
from engine.lab.session import LabSession
from panels.api import PRIVATE, endpoint
from panels.errors import shown

EMPTY = ("_No runs yet: run a profile in the Profile tab (or import one there), then pick two or more runs here; the "
         "first picked is the baseline of the deltas._")


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
    """The table turned: one column per run (the baseline first), one row per differing setting and figure."""
    runs = [row[0] + (" (baseline)" if n == 0 else "") for n, row in enumerate(table.rows)]
    rows = [[column, *("—" if row[i] is None else row[i] for row in table.rows)]
            for i, column in enumerate(table.columns) if column != "run"]
    return pd.DataFrame(rows, columns=["", *runs]).astype(str)


def diff_markdown(table: CompareTable) -> str:
    differing = ", ".join(f"`{key}`" for key in table.differing) or "nothing (same settings and shape)"
    note = f" _{table.note}._" if table.note else ""
    return f"Baseline: run #{table.baseline_run_id} (deltas are against it). Differing: {differing}.{note}"


def build(session: LabSession, *, app: gr.Blocks) -> None:
    with gr.Row():
        picker = gr.Dropdown(run_choices(session), multiselect=True, allow_custom_value=True,
                             label="Runs (the first picked is the baseline)", scale=4)
        refresh = gr.Button("Refresh runs", scale=1)
    compare = gr.Button("Compare", variant="primary")
    table = gr.Dataframe(interactive=False, wrap=False, show_search="none", max_height=520, visible=False)
    diff = gr.Markdown(EMPTY)
    with gr.Row():
        fmt = gr.Radio(["csv", "json"], value="csv", label="Export format")
        export = gr.Button("Export")
        peers = gr.UploadButton("Import peers' runs (bench/results/peers*.json)", file_types=[".json"],
                                file_count="single")
    exported = gr.File(label="Comparison", interactive=False, height=120, visible=False)

    def on_refresh():
        choices = run_choices(session)
        recent = [value for _, value in choices[-2:]]
        note = f"{len(choices)} runs kept (every tab's)." if choices else EMPTY
        return gr.Dropdown(choices=choices, value=recent), note

    def on_compare(selected):
        try:
            result = session.compare(run_ids(selected))
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            return gr.skip(), f"**Error:** {shown(exc)}"
        return gr.update(value=table_frame(result), visible=True), diff_markdown(result)

    def on_export(selected, file_format):
        try:
            return gr.update(value=str(session.export_compare(run_ids(selected), fmt=file_format)), visible=True), \
                gr.skip()
        except Exception as exc:  # noqa: BLE001
            return gr.update(value=None, visible=False), f"**Error:** {shown(exc)}"

    def on_import_peers(file):
        path = getattr(file, "name", file)
        if not path:
            return gr.skip(), "No file was uploaded: choose the peers.json that `python -m bench peers` wrote."
        try:
            records = session.import_peer_runs(path)
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            return gr.skip(), f"**Error:** {shown(exc)}"
        engines = ", ".join(sorted({r.settings.get("peer", "?") for r in records}))
        return (gr.Dropdown(choices=run_choices(session), value=[str(r.run_id) for r in records[:2]]),
                f"Imported {len(records)} runs from {Path(path).name} ({engines}): pick them beside your own.")

    refresh.click(on_refresh, None, [picker, diff], queue=False, **PRIVATE)
    peers.upload(on_import_peers, peers, [picker, diff], queue=False, **PRIVATE)
    picker.focus(lambda: gr.update(choices=run_choices(session)), None, picker, queue=False, **PRIVATE)
    compare.click(on_compare, picker, [table, diff], queue=False, **PRIVATE)
    export.click(on_export, [picker, fmt], [exported, diff], queue=False, **PRIVATE)
    app.load(lambda: (gr.update(choices=run_choices(session)), EMPTY if not session.runs else ""), None,
             [picker, diff], queue=False, **PRIVATE)

    def compare_api(run_ids: list[int]) -> dict:
        """Kept runs side by side, the first the baseline: the settings that differ and each run's tok/s, step ms,
        predicted ms and % of the PCIe floor (GPU runs only), with deltas against the baseline."""
        result = session.compare(_ids(run_ids))
        return {"columns": list(result.columns), "rows": [list(row) for row in result.rows],
                "differing": list(result.differing), "baseline_run_id": result.baseline_run_id, "note": result.note}

    def export_compare(run_ids: list[int], format: Literal["csv", "json"] = "csv") -> gr.FileData:  # noqa: A002
        """The comparison as CSV (the table, one row per run) or JSON (the table and every run's full record)."""
        return gr.FileData(path=str(session.export_compare(_ids(run_ids), fmt=format)))

    def import_peer_runs(results: gr.FileData) -> dict:
        """Keep the runs of a peers suite result (bench/results/peers.json: KV Lab, KVPR's code, FlexGen on one GPU)
        beside this session's runs, for /compare: {"runs": one {run_id, label, peer, tok_s, step_ms} per finished
        run}."""
        path = results.get("path") if isinstance(results, dict) else getattr(results, "path", results)
        if not isinstance(path, str) or not is_in_or_equal(path, get_upload_folder()):
            raise InvalidSettingsError("results must be a file uploaded with this request (gradio_client: "
                                       "handle_file('peers.json')).")
        return {"runs": [{"run_id": r.run_id, "label": r.label, "peer": r.settings.get("peer"), "tok_s": r.tokens_per_s,
                          "step_ms": r.median_step_ms} for r in session.import_peer_runs(path)]}

    endpoint(compare_api, api_name="compare", output="table", queue=False)
    endpoint(import_peer_runs, api_name="import_peer_runs", output="runs", queue=False)
    endpoint(export_compare, api_name="export_compare", output="comparison", queue=False)


def _ids(values) -> list[int]:
    if not isinstance(values, list):
        raise InvalidSettingsError(f"run_ids must be a list of run numbers, got {values!r}: e.g. [1, 2].")
    return run_ids(values)
