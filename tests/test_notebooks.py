"""The notebooks in notebooks/: committed without outputs, and each runs end to end on tiny
settings (JOINTGEN_TINY=1) in a fresh kernel."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NAMES = [p.stem for p in NOTEBOOKS]


def test_the_four_notebooks_exist():
    assert NAMES == ["01_quickstart", "02_nvae", "03_seje_retrieval", "04_sweep_analysis"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i}"


@pytest.mark.slow  # a kernel and a tiny training run each: 15-60 s
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_runs_on_tiny_settings(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # the kernel inherits the environment: tiny settings, outputs under tmp_path, one thread
    monkeypatch.setenv("JOINTGEN_TINY", "1")
    monkeypatch.setenv("JOINTGEN_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("JOINTGEN_ROOT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("JOINTGEN_SWEEP_DIR", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert images, "every notebook shows at least one figure or grid"
