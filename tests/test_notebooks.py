"""Every notebook runs top to bottom at small sizes (VQLIB_NOTEBOOK_SMALL=1), so none rots, and uses
the public API only."""

import json
import os
import pathlib
import re

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
EXPECTED = {"quickstart", "kmeans_real_data", "rate_distortion", "retrieval", "dkm_digits"}


def test_the_notebooks_are_there():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_uses_the_public_api_only(path):
    """No private module or name of vqlib (`vqlib._io`, `vqlib.codebooks._kmeans`, `vqlib.x._y`)."""
    code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    assert not re.findall(r"vqlib(?:\.\w+)*\._\w+", code)
    assert "VQLIB_NOTEBOOK_SMALL" in code  # the size switch the test below sets


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("VQLIB_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    notebook = nbformat.read(str(path), as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(path.parent)}}).execute()
