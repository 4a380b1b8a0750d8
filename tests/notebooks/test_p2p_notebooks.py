"""The P2P notebooks (calibration, Figs 17, 20, 21) run top to bottom on small inputs.

Each runs with nbclient in a kernel of this interpreter (a kernel spec written under
tmp_path, so a fresh clone needs no `jupyter kernelspec install`), in the notebooks folder
(they read ../datasets/traces/), with WORKBENCH_NOTEBOOK_SMALL=1 (their first cell shrinks
every simulation) and WORKBENCH_FIGURES under tmp_path. A cell that raises fails the test;
each notebook must save its PNG.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from notebook_kernel import install_kernel

FOLDER = Path(__file__).parents[2] / "notebooks"
NOTEBOOKS = {
    "p2p-calibration": "p2p-calibration.png",
    "fig17-batch-start": "fig17-batch-start.png",
    "fig20-1000x10": "fig20-1000x10.png",
    "fig21-100k": "fig21-100k.png",
}
KERNEL = "workbench-p2p-tests"


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    install_kernel(tmp_path, monkeypatch, KERNEL)
    monkeypatch.setenv("WORKBENCH_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("WORKBENCH_FIGURES", str(tmp_path / "figures"))
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_p2p_notebook_runs_and_saves_its_figure(name: str, kernel_env: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(FOLDER / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        notebook, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(FOLDER)}}
    )
    client.execute()

    assert (kernel_env / "figures" / NOTEBOOKS[name]).stat().st_size > 10_000
    first = notebook.cells[1]
    assert "parameters" in first.metadata.get("tags", [])  # sizes live in the first code cell
