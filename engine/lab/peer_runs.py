"""The peers suite's results (bench/results/peers.json) -> RunRecords that Compare shows beside the session's runs.

`python -m bench peers` runs KVPR's published code, FlexGen and KV Lab on one GPU, models and shapes; its JSON keeps
every run under details.runs (bench/peers/results.py says what a run holds). `peer_records` makes one RunRecord per
run that finished: the engine that ran it as settings["peer"] (so Compare shows it as a column when runs differ in
it), its settings under the panel's flat keys, tok/s, decode step ms, its PCIe floor and split; no steps, spans or
counters (a peer's timeline is not recorded). `peer_failures` says, one line each, which peers did not run and why.
Pure: no device, no files written.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.errors import InvalidSettingsError
from engine.lab.runs import RunRecord

# Keys every record carries, so the Compare table and the explorer find them on peers' records too.
COMMON_SETTINGS = ("peer", "offload.placement", "offload.split", "offload.gpu_kv_budget_gib", "offload.chunk_tokens",
                   "peer.attention", "peer.dtype", "peer.weights")
_REQUIRED = ("engine", "label", "model", "batch", "prompt_tokens", "new_tokens", "status")


def read_peer_results(path: str | Path) -> dict[str, Any]:
    """The JSON the peers suite wrote; InvalidSettingsError when the file is not one."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidSettingsError(f"Could not read peer results from {path.name}: {exc}. Import the peers.json "
                                   "that `python -m bench peers` wrote.") from exc
    check_peer_results(payload)
    return payload


def check_peer_results(payload: Any) -> None:
    if not isinstance(payload, dict) or not str(payload.get("suite", "")).startswith("peers"):
        raise InvalidSettingsError("This JSON is not the peers suite's results (its 'suite' is not 'peers'): import "
                                   "bench/results/peers.json.")
    runs = payload.get("details", {}).get("runs") if isinstance(payload.get("details"), dict) else None
    if not isinstance(runs, list):
        raise InvalidSettingsError("These peer results hold no runs (details.runs is missing): import the peers.json "
                                   "that `python -m bench peers` wrote, unedited.")
    for i, run in enumerate(runs):
        missing = [k for k in _REQUIRED if not isinstance(run, dict) or k not in run]
        if missing:
            raise InvalidSettingsError(f"Run {i} of these peer results lacks {', '.join(missing)}: import the "
                                       "peers.json that `python -m bench peers` wrote, unedited.")


def _created_at(date: str) -> str:
    """The suite's "2026-12-01 10:00 UTC" as ISO date-time (the records' format); kept as given if it is not that."""
    try:
        return datetime.strptime(date, "%Y-%m-%d %H:%M UTC").replace(tzinfo=timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError):
        return str(date)


def _settings(run: dict[str, Any]) -> dict[str, Any]:
    settings = {key: None for key in COMMON_SETTINGS} | dict(run.get("settings") or {})
    settings["peer"] = settings["peer"] or run["label"]
    if settings["offload.placement"] is None:
        settings["offload.placement"] = "cpu"
    if run["engine"] != "kvlab" and run.get("split") is not None:  # the split the peer chose, as a number
        settings["offload.split"] = round(float(run["split"]), 3)
    if settings.get("offload.split") is None:
        settings["offload.split"] = 0.0
    return settings


def _record(run: dict[str, Any], *, run_id: int, device_name: str, created_at: str, command: str) -> RunRecord:
    where = f"{run['label']}: {run.get('variant', '')}".rstrip(": ")
    notes = [f"measured by the peers suite (`{command}`) on {device_name}, {created_at}: {where}"]
    if run.get("projected"):
        notes.append(f"decode time projected by the peer from its first {run.get('cut_gen_len')} steps "
                     "(--cut-gen-len)")
    if run.get("recompute_tokens") is not None:
        notes.append(f"recompute_len {run['recompute_tokens']} of {run['prompt_tokens']} prompt tokens "
                     "(the peer's own choice)")
    if run.get("h2d_bytes_per_step") is not None:
        notes.append(f"{run['h2d_bytes_per_step'] / 1e9:.2f} GB host-to-device per step"
                     + (" (computed from the peer's schedule)" if run["engine"] != "kvlab" else ""))
    source = run.get("source") or f"peer:{run['engine']}:{run['model']}"
    device = "cpu" if device_name.startswith("CPU") else "cuda"  # bench.report.device_name's two forms
    return RunRecord(
        run_id=run_id, model=f"{run['model']} ({run['label']})", source=source, device=device,
        batch=int(run["batch"]), prompt_tokens=int(run["prompt_tokens"]), new_tokens=int(run["new_tokens"]),
        seed=1 if run["engine"] == "kvlab" else 0, settings=_settings(run), tokens_per_s=float(run["tok_s"]),
        median_step_ms=float(run["step_ms"]), predicted_ms=run.get("predicted_ms"),
        pcie_floor_ms=run.get("pcie_floor_ms"), split=run.get("split"),
        plan_reason=run.get("reason") or where, prefill_ms=float(run.get("prefill_ms") or 0.0), steps=(), spans=(),
        link=(), link_note="no link samples: measured by the peers suite", l2_note="no L2 samples: measured by the "
        "peers suite", l2_hit_pct=None, notes=tuple(notes), created_at=created_at, device_name=device_name)


def peer_records(payload: dict[str, Any], *, first_run_id: int) -> list[RunRecord]:
    """One RunRecord per finished run (KV Lab's and the peers'), numbered from `first_run_id`, in the file's order."""
    check_peer_results(payload)
    device_name = str(payload.get("device", ""))
    created_at = _created_at(payload.get("date", ""))
    command = str(payload.get("command", "python -m bench peers"))
    done = [r for r in payload["details"]["runs"] if r["status"] == "ok" and r.get("tok_s") and r.get("step_ms")]
    return [_record(run, run_id=first_run_id + i, device_name=device_name, created_at=created_at, command=command)
            for i, run in enumerate(done)]


def peer_failures(payload: dict[str, Any]) -> list[str]:
    """'<peer> (<variant>) on <model> <shape>: <status>: <error>' for every run that did not finish."""
    check_peer_results(payload)
    return [f"{r['label']} ({r.get('variant', '')}) on {r['model']} B{r['batch']} P{r['prompt_tokens']} "
            f"N{r['new_tokens']}: {r['status']}: {r.get('error') or 'no error recorded'}"
            for r in payload["details"]["runs"] if r["status"] != "ok"]


__all__ = ["check_peer_results", "peer_failures", "peer_records", "read_peer_results"]
