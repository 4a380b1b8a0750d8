"""`workbench bench registry --quick`: runs against the embedded registry and prints every table."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from workbench.cli import cli


def test_bench_registry_quick_prints_every_table(tmp_path: Path) -> None:
    report = tmp_path / "registry.json"
    result = CliRunner().invoke(cli, ["bench", "registry", "--quick", "--json", str(report)])

    assert result.exit_code == 0, result.output
    for title in ("registry misses", "registry hits", "registry random reads"):
        assert title in result.output
    tables = json.loads(report.read_text())
    assert [len(table["rows"]) for table in tables] == [4, 3, 6]
