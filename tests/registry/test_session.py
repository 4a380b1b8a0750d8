"""Images whose layers live in a registry: read lazily through the session and the cache.

Every test runs against the embedded registry and against Debian's docker-registry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from reference import TESTDATA, manifest, needs_testdata
from registries import REGISTRIES, push_blob, start_registry

from workbench.cli import cli
from workbench.formats.config import ImageConfig, LowerConfig
from workbench.formats.zfile import compress
from workbench.image.open import open_image
from workbench.registry.session import RegistrySession, reference_from_blob_url

pytestmark = needs_testdata

MiB = 1 << 20
REPO = "workbench/layers"


@pytest.fixture(params=REGISTRIES)
def registry(request: pytest.FixtureRequest, tmp_path: Path):
    with start_registry(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def pushed_layers(registry: str, tmp_path: Path) -> tuple[str, list[tuple[str, int]]]:
    """Layers 1 and 2 pushed as OverlayBD pushes them: tar(ZFile(LSMT)); (blob URL, blobs)."""
    blobs = []
    for name, algorithm in (("layer1", "lz4"), ("layer2", "zstd")):
        wrapped = tmp_path / f"{name}.tar"
        compress(TESTDATA / f"{name}.lsmt", wrapped, algorithm=algorithm, tar=True)
        data = wrapped.read_bytes()
        blobs.append((push_blob(registry, REPO, data), len(data)))
    return f"{registry}/v2/{REPO}/blobs", blobs


def remote_config(blob_url: str, blobs: list[tuple[str, int]], where: Path) -> Path:
    config = ImageConfig(
        repo_blob_url=blob_url,
        lowers=[LowerConfig(digest=digest, size=size) for digest, size in blobs],
    )
    path = where / "config.v1.json"
    config.dump(path)
    return path


def test_a_remote_image_reads_back_to_the_manifest(pushed_layers, tmp_path: Path) -> None:
    blob_url, blobs = pushed_layers
    config = remote_config(blob_url, blobs, tmp_path)
    expected = manifest()["expected"]["merged_layer1_layer2"]["chunk_sha256"]

    with (
        RegistrySession(tmp_path / "cache") as session,
        open_image(config, session=session) as image,
    ):
        chunks = [
            hashlib.sha256(image.pread(i * MiB, MiB)).hexdigest() for i in range(image.size // MiB)
        ]

    assert chunks == expected


def test_a_read_fetches_only_the_blocks_it_needs(pushed_layers, tmp_path: Path) -> None:
    blob_url, blobs = pushed_layers
    config = remote_config(blob_url, blobs, tmp_path)
    total = sum(size for _, size in blobs)

    with RegistrySession(tmp_path / "cache", readahead=False) as session:
        with open_image(config, session=session) as image:
            image.pread(10 * MiB, 64 * 1024)
        fetched = session.cache.statistics().bytes_fetched

    # Opening reads headers, trailers and indexes; the read adds a few refill blocks.
    assert 0 < fetched < total / 2


def test_a_second_session_reads_from_the_cache(pushed_layers, tmp_path: Path) -> None:
    blob_url, blobs = pushed_layers
    config = remote_config(blob_url, blobs, tmp_path)

    with (
        RegistrySession(tmp_path / "cache") as session,
        open_image(config, session=session) as image,
    ):
        first = image.pread(0, image.size)
    with RegistrySession(tmp_path / "cache") as session:
        with open_image(config, session=session) as image:
            again = image.pread(0, image.size)
        statistics = session.cache.statistics()

    assert again == first
    assert statistics.fetches == 0
    assert statistics.hits > 0


def test_blob_cat_reads_a_range(pushed_layers, tmp_path: Path) -> None:
    blob_url, blobs = pushed_layers
    digest, size = blobs[0]
    data = (tmp_path / "layer1.tar").read_bytes()

    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            *("blob", "cat", blob_url, digest),
            *("--offset", "1000", "--length", "5000", "--cache-dir", str(tmp_path / "cache")),
        ],
    )
    whole = runner.invoke(cli, ["blob", "cat", blob_url, digest, "--no-cache"])

    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == data[1000:6000]
    assert whole.stdout_bytes == data
    assert size == len(data)


def test_export_of_a_remote_image(pushed_layers, tmp_path: Path, monkeypatch) -> None:
    blob_url, blobs = pushed_layers
    config = remote_config(blob_url, blobs, tmp_path)
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "default-cache"))
    monkeypatch.setattr("workbench.registry.session._default", None)

    result = CliRunner().invoke(cli, ["export", str(config), str(tmp_path / "disk.img")])

    assert result.exit_code == 0, result.output
    data = (tmp_path / "disk.img").read_bytes()
    chunks = [hashlib.sha256(data[i : i + MiB]).hexdigest() for i in range(0, len(data), MiB)]
    assert chunks == manifest()["expected"]["merged_layer1_layer2"]["chunk_sha256"]


def test_a_missing_blob_names_the_registry_and_digest(registry: str, tmp_path: Path) -> None:
    missing = "sha256:" + "0" * 64
    blob_url = f"{registry}/v2/{REPO}/blobs"
    config = tmp_path / "config.v1.json"
    config.write_text(json.dumps({"repoBlobUrl": blob_url, "lowers": [{"digest": missing}]}))

    with (
        RegistrySession(tmp_path / "cache") as session,
        pytest.raises(FileNotFoundError, match=missing),
    ):
        open_image(config, session=session)


@pytest.mark.parametrize(
    ("url", "host", "repository", "plain"),
    [
        ("http://127.0.0.1:5000/v2/library/redis/blobs", "127.0.0.1:5000", "library/redis", True),
        ("https://registry.example/v2/a/b/c/blobs/", "registry.example", "a/b/c", False),
    ],
)
def test_blob_urls_name_their_repository(url: str, host: str, repository: str, plain: bool):
    reference, plain_http = reference_from_blob_url(url)

    assert (reference.registry, reference.repository, plain_http) == (host, repository, plain)


def test_a_url_that_is_not_a_blob_url_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not a registry blob URL"):
        reference_from_blob_url("ftp://example/v2/x/blobs")
