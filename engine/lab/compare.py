"""Runs side by side: the settings that differ, tok/s, step ms, % of the PCIe floor, deltas against the first run.

`compare_runs` makes the table the Compare panel shows; `write_compare` writes it as CSV (the table) or
JSON (the table and every run's full record: settings, figures and per-step metrics). Values that are equal as
numbers (0 and 0.0) are not differences; a prediction or PCIe floor of a run without a GPU is left blank (there is
nothing for it to mean), and the table's note says so.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InvalidSettingsError
from engine.lab.runs import RunRecord

# What identifies a run besides its settings; shown as columns when they differ between the runs.
SHAPE_KEYS = ("model", "device", "batch", "prompt_tokens", "new_tokens", "seed")
FIGURE_COLUMNS = ("tok/s", "Δ tok/s %", "step ms", "Δ step ms %", "predicted ms", "% of PCIe floor", "mean split")


@dataclass(frozen=True)
class CompareTable:
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    differing: tuple[str, ...]  # settings and shape keys whose values differ between the runs
    baseline_run_id: int  # deltas are against this run (the first one given)
    note: str = ""  # what is left blank, and why


def _values(record: RunRecord) -> dict[str, Any]:
    shape = {key: getattr(record, key) for key in SHAPE_KEYS}
    return shape | record.settings


def _same_key(value: Any) -> str:
    """`value` as compared between runs: numbers by value (0 == 0.0), everything else by its JSON."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return json.dumps(value, default=str)


def _delta_pct(value: float, base: float) -> float | None:
    return 100.0 * (value - base) / base if base else None


def _round(value: Any, digits: int = 2) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def compare_runs(records: Sequence[RunRecord]) -> CompareTable:
    """One row per run, in the order given; the first run is the baseline of the deltas."""
    if not records:
        raise InvalidSettingsError("No runs to compare: run a profile first, then pick one or more runs.")
    values = [_values(r) for r in records]
    keys = list(dict.fromkeys(key for v in values for key in v))
    differing = tuple(k for k in keys if len({_same_key(v.get(k)) for v in values}) > 1)
    shown = tuple(k for k in differing if k != "model")  # the model has its own column
    base = records[0]
    rows = []
    for record, value in zip(records, values):
        gpu = record.on_gpu
        figures = (record.tokens_per_s, _delta_pct(record.tokens_per_s, base.tokens_per_s), record.median_step_ms,
                   _delta_pct(record.median_step_ms, base.median_step_ms), record.predicted_ms if gpu else None,
                   record.pct_of_floor if gpu else None, record.split)
        rows.append((f"#{record.run_id}", record.model, *(value.get(k) for k in shown),
                     *(_round(f) for f in figures)))
    cpu = [f"#{r.run_id}" for r in records if not r.on_gpu]
    note = (f"predicted ms and % of PCIe floor are blank for {', '.join(cpu)}: runs without a GPU have no prediction "
            "or PCIe floor to compare with") if cpu else ""
    return CompareTable(columns=("run", "model", *shown, *FIGURE_COLUMNS), rows=tuple(rows), differing=differing,
                        baseline_run_id=base.run_id, note=note)


def write_compare(path: str | Path, records: Sequence[RunRecord]) -> Path:
    """Write the comparison to `path`: CSV (the table) when it ends in .csv, JSON (table and records) in .json."""
    path = Path(path)
    table = compare_runs(records)
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(table.columns)
            writer.writerows(["" if cell is None else cell for cell in row] for row in table.rows)
    elif path.suffix == ".json":
        doc = {"baseline_run_id": table.baseline_run_id, "differing": list(table.differing),
               "columns": list(table.columns), "rows": [list(row) for row in table.rows], "note": table.note,
               "runs": [record.summary() for record in records]}
        path.write_text(json.dumps(doc, indent=1, default=str))
    else:
        raise InvalidSettingsError(f"Cannot export a comparison as {path.suffix or 'a file without a suffix'}: "
                                   "use .csv or .json.")
    return path


__all__ = ["CompareTable", "compare_runs", "write_compare"]
