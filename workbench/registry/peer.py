"""Debian's docker-registry (the CNCF distribution registry) as a local peer, for benchmarks.

    with docker_registry(workdir) as url:     # "http://127.0.0.1:PORT", storage under workdir
        ...

The registry runs as a child process with a temporary config: filesystem storage under
`workdir`, a free loopback port, warnings-only logging to `workdir/registry.log`. The context
waits until `GET /v2/` answers and kills the process on exit.

Caveats:
- the free port is found by binding port 0 and closing it; another process may take it before
  docker-registry binds, so the start is retried on a new port a few times;
- `available()` only checks that the binary is on PATH.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

__all__ = ["DockerRegistryError", "available", "docker_registry"]

log = logging.getLogger(__name__)

BINARY = "docker-registry"
START_ATTEMPTS = 5
START_TIMEOUT_S = 15.0


class DockerRegistryError(RuntimeError):
    """Raised when docker-registry is missing or does not start."""


def available() -> bool:
    return shutil.which(BINARY) is not None


@contextlib.contextmanager
def docker_registry(workdir: Path) -> Iterator[str]:
    """docker-registry on a free loopback port with storage under `workdir`; yields its URL."""
    binary = shutil.which(BINARY)
    if binary is None:
        raise DockerRegistryError(
            f"{BINARY} is not installed; apt-get install docker-registry, or skip this peer"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    for _attempt in range(START_ATTEMPTS):
        process, url = _start(binary, workdir)
        if process is not None:
            break
    else:
        raise DockerRegistryError(
            f"{BINARY} did not start after {START_ATTEMPTS} attempts; "
            f"see {workdir / 'registry.log'}"
        )

    log.info("docker-registry serving %s at %s", workdir, url)
    try:
        yield url
    finally:
        process.kill()
        process.wait(timeout=10)


def _start(binary: str, workdir: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    port = _free_port()
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: warn, fields: {service: registry}}\n"
        "storage:\n"
        f"  filesystem: {{rootdirectory: {workdir / 'data'}}}\n"
        "  delete: {enabled: true}\n"
        "  cache: {blobdescriptor: inmemory}\n"
        "http:\n"
        f"  addr: 127.0.0.1:{port}\n"
        "health:\n"
        "  storagedriver: {enabled: false}\n"
    )
    url = f"http://127.0.0.1:{port}"
    with (workdir / "registry.log").open("ab") as log_file:
        process = subprocess.Popen([binary, "serve", str(config)], stdout=log_file, stderr=log_file)

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None, url  # most likely lost the port race; the caller retries
        try:
            if httpx.get(url + "/v2/", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=10)
    return None, url


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
