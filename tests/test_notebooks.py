"""The example notebooks run top to bottom in a real Jupyter kernel (nbclient + ipykernel), offline."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
PLOTLY_MIME = "application/vnd.plotly.v1+json"
#: Seconds a cell may take: the quick tour's model load and learned predictors take ~1 min on a loaded 2-core box.
CELL_TIMEOUT = 600


def run_notebook(path: Path, monkeypatch) -> nbformat.NotebookNode:
    """Execute ``path`` in a fresh python3 kernel, in its own folder, with this checkout first on the path."""
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def test_the_examples_are_there():
    assert {p.name for p in NOTEBOOKS} >= {"quick_tour.ipynb", "results_tables.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs are not stripped"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    nb = run_notebook(path, monkeypatch)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if o.output_type in ("display_data", "execute_result") and PLOTLY_MIME in o.data]
    if path.name == "quick_tour.ipynb":
        # Plotly's mimetype bundle is what JupyterLab (the jupyterlab-plotly extension inside plotly) and
        # VS Code draw inline, with no RequireJS: every figure cell must have produced one.
        assert len(figures) == 5  # overview, head, head with a prediction, Pareto, clusters × POS
        assert all(f.data[PLOTLY_MIME]["data"] for f in figures)
    if path.name == "results_tables.ipynb":
        assert "rows match docs/results.md" in "".join(o.get("text", "") for o in outputs)


def test_a_cell_that_raises_fails_the_run(tmp_path, monkeypatch):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import sparsefinder as sf\nx = 1"),
        nbformat.v4.new_code_cell("sf.no_such_function()"),
        nbformat.v4.new_code_cell("x = 2"),
    ])
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(CellExecutionError, match="no attribute 'no_such_function'"):
        run_notebook(path, monkeypatch)
