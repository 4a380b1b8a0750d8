"""Shared pieces of the dataset tests: what a test needs from the machine, or a skip."""

from __future__ import annotations

import os
import shutil

import pytest


def need(condition: bool, reason: str) -> None:
    """Skip with `reason` unless `condition`; under CI a missing piece fails instead."""
    if condition:
        return
    if os.environ.get("CI"):
        raise RuntimeError(f"{reason}; CI installs it through scripts/setup.sh and runs as root")
    pytest.skip(reason)


def need_builder() -> None:
    """Root, unshare, chroot and umoci: what building and starting the tiny image take."""
    need(os.geteuid() == 0, "building dataset images needs root (mounts, chroot)")
    for tool in ("unshare", "chroot", "umoci"):
        need(shutil.which(tool) is not None, f"{tool} is not installed")
    need(os.path.exists("/bin/busybox"), "busybox-static is not installed (/bin/busybox)")
