"""``python -m workbench.snapshotter --root DIR --socket PATH``: `workbench snapshotter serve`."""

import sys

from workbench.cli import cli

if __name__ == "__main__":
    cli(["snapshotter", "serve", *sys.argv[1:]], prog_name="python -m workbench.snapshotter")
