"""The committed H200 peers results import into a session as runs Compare shows beside the session's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import InvalidSettingsError
from engine.lab.session import LabSession

PEERS = Path(__file__).resolve().parent.parent / "bench" / "results" / "peers.json"
PEERS_13B = PEERS.with_name("peers_13b.json")  # the OPT-13B call, where every variant ran


def test_the_committed_peer_results_become_comparable_runs(tmp_path):
    session = LabSession(export_dir=tmp_path)
    records = session.import_peer_runs(PEERS)
    engines = {r.settings["peer"] for r in records}
    assert engines == {"KV Lab", "FlexGen 0.1.8", "KVPR code 1712a52 (FlexGen path)",
                       "KVPR code 1712a52 (transformers path)"}
    assert len(records) == 14  # the runs that finished in that call (the skipped ones are not records)
    assert all(r.tokens_per_s > 0 and r.median_step_ms > 0 for r in records)
    assert [r.run_id for r in records] == list(range(1, len(records) + 1)) and session.runs[-1] is records[-1]
    table = session.compare([records[0].run_id, records[-1].run_id])
    assert table is not None


def test_the_opt_13b_results_import_beside_the_opt_6_7b_ones(tmp_path):
    session = LabSession(export_dir=tmp_path)
    first = session.import_peer_runs(PEERS)
    records = session.import_peer_runs(PEERS_13B)
    assert len(records) == 14 and all("opt-13b" in r.model for r in records)
    assert {r.settings["peer"] for r in records} == {"KV Lab", "FlexGen 0.1.8", "KVPR code 1712a52 (FlexGen path)",
                                                     "KVPR code 1712a52 (transformers path)"}
    assert [r.run_id for r in records] == list(range(len(first) + 1, len(first) + 15))  # numbered after the first file's
    kvpr_hf = [r for r in records if r.settings["peer"] == "KVPR code 1712a52 (transformers path)"]
    assert sorted(round(r.median_step_ms, 1) for r in kvpr_hf) == [124.7, 165.6]  # the README's table


def test_a_file_that_is_not_peer_results_is_refused(tmp_path):
    bad = tmp_path / "peers.json"
    bad.write_text('{"suite": "decode"}')
    with pytest.raises(InvalidSettingsError, match="peer"):
        LabSession(export_dir=tmp_path).import_peer_runs(bad)
