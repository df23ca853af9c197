"""Executes notebooks/exploration.ipynb at its small size (GDN_NOTEBOOK_SMALL=1); any cell error fails."""
from __future__ import annotations

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is in the test extras")
nbclient = pytest.importorskip("nbclient", reason="nbclient is in the test extras")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "exploration.ipynb"


@pytest.mark.slow
def test_exploration_notebook_runs(monkeypatch):
    monkeypatch.setenv("GDN_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent.parent)}})
    client.execute()  # raises CellExecutionError on any failing cell
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    ran = sum(c.cell_type == "code" and c.get("execution_count") is not None for c in nb.cells)
    assert ran == n_code > 0
