"""A Jupyter kernel of this interpreter for the notebook tests, with no install step.

    name = install_kernel(tmp_path, monkeypatch, "workbench-tests")
    NotebookClient(notebook, kernel_name=name).execute()

The kernel spec is written under tmp_path and `JUPYTER_PATH` points there, so nbclient starts
the venv's python (which has the workbench) on a fresh clone without `jupyter kernelspec
install`; `JUPYTER_PLATFORM_DIRS` silences jupyter_core's deprecation warning, which the
test settings turn into an error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


def install_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> str:
    """Write a kernel spec `name` for this interpreter under tmp_path; returns `name`."""
    spec = tmp_path / "jupyter" / "kernels" / name
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "workbench (tests)", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return name
