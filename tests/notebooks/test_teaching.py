"""The teaching notebooks (notebooks/teach/) run top to bottom, each in a fresh kernel.

Each notebook runs with nbclient in a kernel of this interpreter (the venv's python, through
a kernel spec written under tmp_path, so a fresh clone needs no `jupyter kernelspec install`),
with its work folder (`WORKBENCH_NOTEBOOK_DIR`) and mount state (`WORKBENCH_RUN_DIR`) under
tmp_path. A cell that raises fails the test with the cell's error. The lazy-loading notebook
mounts the image, so it needs root: skipped otherwise, except under CI, which runs as root.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from notebook_kernel import install_kernel

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks" / "teach").glob("*.ipynb"))
KERNEL = "workbench-teach"
NEEDS_ROOT = {"4-lazy-loading"}


def test_the_series_is_there_without_outputs() -> None:
    import nbformat

    assert [path.stem for path in NOTEBOOKS] == [
        "1-why-blocks",
        "2-writing",
        "3-zfile",
        "4-lazy-loading",
    ]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        kept = [cell.id for cell in notebook.cells if cell.get("outputs")]
        assert not kept, f"{path.name} is stored with outputs in cells {kept}; clear them"
        assert "WORKBENCH_NOTEBOOK_DIR" in notebook.cells[1].source  # parameters come first


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kernel spec for this interpreter, and the environment the notebooks read."""
    install_kernel(tmp_path, monkeypatch, KERNEL)
    monkeypatch.setenv("WORKBENCH_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("WORKBENCH_RUN_DIR", str(tmp_path / "run"))
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_teaching_notebook_runs(path: Path, kernel_env: Path) -> None:
    if path.stem in NEEDS_ROOT and os.geteuid() != 0:
        if os.environ.get("CI"):
            raise RuntimeError(f"{path.name} mounts an image and needs root; CI runs as root")
        pytest.skip(f"{path.name} mounts an image (FUSE, loop, ext4): needs root")

    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=KERNEL,
        timeout=120,
        resources={"metadata": {"path": str(kernel_env)}},
    )
    client.execute()

    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    figures = sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert figures >= 1, f"{path.name} drew no figure"
