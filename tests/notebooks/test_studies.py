"""The study notebooks execute without error on the committed sample result tables.

Each notebook in notebooks/ that reads a study (its name is an experiments/*.toml stem) is
run with nbclient in a fresh kernel of this interpreter (a kernel spec written under tmp_path,
so no `jupyter kernelspec install` is needed), reading experiments/samples/STUDY and writing
its PNGs under tmp_path; the test checks that every cell ran and that the figures were written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from notebook_kernel import install_kernel

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TOP = Path(__file__).parents[2]
STUDIES = sorted(path.stem for path in (TOP / "experiments").glob("*.toml"))
KERNEL = "workbench-studies"


def _study_notebooks() -> list[str]:
    return [study for study in STUDIES if (TOP / "notebooks" / f"{study}.ipynb").exists()]


def test_every_study_has_a_notebook_and_a_sample_and_is_kept_without_outputs() -> None:
    assert _study_notebooks() == STUDIES
    for study in STUDIES:
        assert (TOP / "experiments" / "samples" / study / "trials.parquet").exists(), study
        notebook = nbformat.read(TOP / "notebooks" / f"{study}.ipynb", as_version=4)
        nbformat.validate(notebook)
        kept = [cell.id for cell in notebook.cells if cell.get("outputs")]
        assert not kept, f"{study}.ipynb is stored with outputs in cells {kept}; clear them"


@pytest.mark.slow
@pytest.mark.parametrize("study", _study_notebooks())
def test_study_notebook_runs_on_its_sample(
    study: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKBENCH_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("WORKBENCH_RESULTS", str(TOP / "experiments" / "samples" / study))
    install_kernel(tmp_path, monkeypatch, KERNEL)
    path = TOP / "notebooks" / f"{study}.ipynb"
    notebook = nbformat.read(path, as_version=4)

    client = nbclient.NotebookClient(
        notebook,
        timeout=180,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()

    outputs = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    ]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    assert list((tmp_path / "figures").glob("*.png")), "the notebook saved no figure"
    assert os.environ["WORKBENCH_RESULTS"].endswith(study)
