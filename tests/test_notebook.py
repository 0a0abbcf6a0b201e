"""notebooks/kv_lab.ipynb: valid nbformat 4 JSON with no stored outputs, and every code cell but the inline app's runs
on the CPU, in order, from the notebook's own folder."""

from __future__ import annotations

import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "kv_lab.ipynb"


def _cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text())["cells"]


def test_the_notebook_is_valid_nbformat_4_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 0
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    ids = [cell["id"] for cell in notebook["cells"]]
    assert len(set(ids)) == len(ids)
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["metadata"], dict)
        assert all(isinstance(line, str) for line in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    sources = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert any("lab()" in source for source in sources), "the notebook shows the app inline"


def test_the_notebooks_code_runs_on_the_cpu(profile_cache, monkeypatch, capsys):
    monkeypatch.chdir(NOTEBOOK.parent)
    namespace: dict = {}
    sources = ["".join(cell["source"]) for cell in _cells() if cell["cell_type"] == "code"]
    ran = 0
    for n, source in enumerate(sources):
        if "lab()" in source:  # the inline app is served by test_app's notebook entry-point test
            continue
        exec(compile(source, f"{NOTEBOOK.name} code cell {n}", "exec"), namespace)
        ran += 1
    assert ran == len(sources) - 1
    out = capsys.readouterr().out
    assert "plan:" in out and "predicted" in out and "measured" in out and "trace:" in out
    record = namespace["record"]
    assert record.spans and Path(namespace["session"].export_trace(record.run_id)).is_file()

