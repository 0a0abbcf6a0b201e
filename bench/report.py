"""The one record a bench suite produces, its table, and the committed results files.

A suite returns a `SuiteResult`: rows for the table (one per measured case) and headline figures that
go into `bench/results/summary.json`. `write_results` prints the table and writes
`bench/results/<suite>.json` and `.md` with the device, the date and the exact command.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (row attribute, column header, format) in the order the table prints them.
COLUMNS = (
    ("case", "case", "{}"),
    ("ms", "ms/step", "{:.3f}"),
    ("tok_s", "tok/s", "{:.1f}"),
    ("bytes_moved", "bytes moved", "{}"),
    ("gb_s", "GB/s", "{:.1f}"),
    ("pct_roofline", "% roofline", "{:.1f}"),
    ("peer", "peer", "{}"),
    ("peer_ms", "peer ms", "{:.3f}"),
    ("ratio", "ratio", "{:.2f}x"),
)


@dataclass
class Row:
    """One measured case. `ratio` is peer time / our time (> 1 means we are faster)."""

    case: str
    ms: float | None = None
    tok_s: float | None = None
    bytes_moved: int | None = None
    gb_s: float | None = None
    pct_roofline: float | None = None
    peer: str | None = None
    peer_ms: float | None = None
    ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gb_s is None and self.bytes_moved and self.ms:
            self.gb_s = self.bytes_moved / (self.ms * 1e-3) / 1e9
        if self.ratio is None and self.peer_ms and self.ms:
            self.ratio = self.peer_ms / self.ms


@dataclass
class Headline:
    """A figure for summary.json: `value` in `unit`, beside the peer it is compared with."""

    key: str
    value: float
    unit: str
    peer: str | None = None
    peer_value: float | None = None


@dataclass
class SuiteResult:
    suite: str
    rows: list[Row]
    headlines: list[Headline] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)  # further markdown tables, after the rows' and headlines'


def device_name() -> str:
    """The accelerator the figures were measured on (or the CPU when there is none)."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return f"{props.name} ({props.multi_processor_count} SMs, torch {torch.__version__})"
    except Exception:  # noqa: BLE001 - the name is informative only
        pass
    import platform

    return f"CPU {platform.processor() or platform.machine()}"


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec == "{}" and isinstance(value, int):
        return _human_bytes(value)
    return spec.format(value)


def _human_bytes(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def markdown_table(rows: list[Row]) -> str:
    used = [c for c in COLUMNS if any(getattr(r, c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in used) + " |", "|" + "---|" * len(used)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(getattr(row, a), f) for a, _, f in used) + " |")
    return "\n".join(lines)


def command_line(argv: list[str] | None = None, *, program: str = "python -m bench") -> str:
    """The command that reproduces a run; where its files went (--results-dir) is left out."""
    args, kept = list(sys.argv[1:] if argv is None else argv), []
    while args:
        arg = args.pop(0)
        if arg == "--results-dir":
            args = args[1:]
        elif not arg.startswith("--results-dir="):
            kept.append(arg)
    return " ".join([program, *(shlex.quote(a) for a in kept)])


def write_results(result: SuiteResult, *, results_dir: Path = RESULTS_DIR, command: str | None = None) -> dict:
    """Print the table; write `<suite>.json`, `<suite>.md`; merge headlines into summary.json."""
    results_dir.mkdir(parents=True, exist_ok=True)
    device = device_name()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = command or command_line()
    table = markdown_table(result.rows)
    print(table)
    for note in result.notes:
        print(f"- {note}")
    payload = {
        "suite": result.suite,
        "device": device,
        "date": date,
        "command": command,
        "rows": [dataclasses.asdict(r) for r in result.rows],
        "headlines": [dataclasses.asdict(h) for h in result.headlines],
        "notes": result.notes,
        "details": result.details,
        "tables": result.tables,
    }
    (results_dir / f"{result.suite}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (results_dir / f"{result.suite}.md").write_text(markdown_of(payload))
    update_summary(result.headlines, device=device, date=date, command=command, results_dir=results_dir)
    (results_dir / f"{result.suite}.partial.json").unlink(missing_ok=True)  # the whole run replaces its partial
    return payload


def write_partial(results_dir: Path, suite: str, payload: dict) -> Path:
    """`<suite>.partial.json`: a long suite's results so far, rewritten as it goes (write_results removes it), so a
    run stopped by a time limit or a crash keeps what it measured."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{suite}.partial.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def markdown_of(payload: dict) -> str:
    """The .md of a results payload (what write_results writes beside the .json; also re-renders a .json)."""
    rows = [Row(**{k: v for k, v in r.items()}) for r in payload["rows"]]
    md = [f"# bench suite `{payload['suite']}`", "", f"- device: {payload['device']}", f"- date: {payload['date']}",
          f"- command: `{payload['command']}`", "", markdown_table(rows), ""]
    headlines = [Headline(**h) for h in payload.get("headlines", [])]
    if headlines:
        md += ["| headline | value | unit | peer | peer value |", "|---|---|---|---|---|"]
        for h in headlines:
            md.append(f"| `{h.key}` | {h.value:.4g} | {h.unit} | {h.peer or '-'} | {_fmt(h.peer_value, '{:.4g}')} |")
        md.append("")
    for extra_table in payload.get("tables", []):
        md += [extra_table, ""]
    md += [f"- {n}" for n in payload.get("notes", [])]
    return "\n".join(md) + "\n"


def update_summary(headlines: list[Headline], *, device: str, date: str, command: str, results_dir: Path) -> None:
    path = results_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    for h in headlines:
        summary[h.key] = {
            "value": h.value,
            "unit": h.unit,
            "peer": h.peer,
            "peer_value": h.peer_value,
            "device": device,
            "date": date,
            "command": command,
        }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(summary.items())), indent=2) + "\n")
    os.replace(tmp, path)
