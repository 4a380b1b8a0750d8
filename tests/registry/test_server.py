"""The embedded registry speaks the distribution API as Debian's docker-registry does.

Tests taking `url` run against both registries (parametrized); where the reference answers
differently in a detail the spec leaves open, the test says so. Tests of storage, validation
and crash safety run against the embedded one only. The skopeo round trip here and the
`ctr image pull` tests in test_ctr_pull.py show that real clients work against it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from registries import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    REGISTRIES,
    embedded_registry,
    push_blob,
    push_image,
    sha256_digest,
    start_registry,
)

from workbench.registry.server import OCI_INDEX, ApiError, EmbeddedRegistry, RegistryStorage

MISSING = "sha256:" + "0" * 64


@pytest.fixture(params=REGISTRIES)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with start_registry(request.param, tmp_path) as base_url:
        yield base_url


@pytest.fixture
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def error_code(response: httpx.Response) -> str:
    return response.json()["errors"][0]["code"]


def tar_layer(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# -- base and blobs


def test_base_endpoint_announces_the_api_version(http: httpx.Client) -> None:
    response = http.get("/v2/")
    assert response.status_code == 200
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"


def test_blob_head_and_get(url: str, http: httpx.Client) -> None:
    data = bytes(range(256)) * 100
    digest = push_blob(url, "lib/nested/repo", data)

    head = http.head(f"/v2/lib/nested/repo/blobs/{digest}")
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(data))
    assert head.headers["docker-content-digest"] == digest
    assert head.headers["accept-ranges"] == "bytes"
    assert head.content == b""

    got = http.get(f"/v2/lib/nested/repo/blobs/{digest}")
    assert got.status_code == 200
    assert got.content == data


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [("bytes=10-19", 10, 19), ("bytes=25000-", 25000, 25599), ("bytes=-6", 25594, 25599)],
)
def test_blob_single_range(
    url: str, http: httpx.Client, header: str, first: int, last: int
) -> None:
    data = bytes(range(256)) * 100
    digest = push_blob(url, "lib/range", data)

    response = http.get(f"/v2/lib/range/blobs/{digest}", headers={"Range": header})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {first}-{last}/{len(data)}"
    assert response.content == data[first : last + 1]


def test_range_past_the_end_is_clipped(url: str, http: httpx.Client) -> None:
    digest = push_blob(url, "lib/range", b"0123456789")
    response = http.get(f"/v2/lib/range/blobs/{digest}", headers={"Range": "bytes=8-100"})
    assert response.status_code == 206
    assert response.headers["content-range"] == "bytes 8-9/10"
    assert response.content == b"89"


def test_unsatisfiable_range_is_416(url: str, http: httpx.Client) -> None:
    digest = push_blob(url, "lib/range", b"0123456789")
    # docker-registry announces a body it never sends here: read the status and headers only
    path = f"/v2/lib/range/blobs/{digest}"
    with http.stream("GET", path, headers={"Range": "bytes=10-20"}) as response:
        assert response.status_code == 416
        assert response.headers["content-range"] == "bytes */10"


def test_missing_blob_is_404_blob_unknown(http: httpx.Client) -> None:
    response = http.get(f"/v2/lib/none/blobs/{MISSING}")
    assert response.status_code == 404
    assert error_code(response) == "BLOB_UNKNOWN"
    assert http.head(f"/v2/lib/none/blobs/{MISSING}").status_code == 404


def test_blob_is_visible_only_in_its_repository(url: str, http: httpx.Client) -> None:
    digest = push_blob(url, "lib/one", b"private to one")
    assert http.head(f"/v2/lib/one/blobs/{digest}").status_code == 200
    assert http.head(f"/v2/lib/two/blobs/{digest}").status_code == 404


# -- uploads


def test_monolithic_post_with_digest(tmp_path: Path) -> None:
    """The spec lets registries answer 202 here instead; docker-registry 2.8 does, we don't."""
    data = b"in one request"
    digest = sha256_digest(data)
    with embedded_registry(tmp_path) as base_url, httpx.Client(base_url=base_url) as http:
        response = http.post(f"/v2/lib/mono/blobs/uploads/?digest={digest}", content=data)
        assert response.status_code == 201
        assert response.headers["docker-content-digest"] == digest
        assert http.get(response.headers["location"]).content == data


def test_chunked_upload_with_status_and_ranges(http: httpx.Client) -> None:
    parts = [b"a" * 1000, b"b" * 2000, b"c" * 5]
    data = b"".join(parts)
    started = http.post("/v2/lib/chunks/blobs/uploads/")
    assert started.status_code == 202
    assert started.headers["range"] == "0-0"
    assert started.headers["docker-upload-uuid"]
    location = started.headers["location"]

    offset = 0
    for part in parts[:2]:
        content_range = f"{offset}-{offset + len(part) - 1}"
        patched = http.patch(location, content=part, headers={"Content-Range": content_range})
        assert patched.status_code == 202
        offset += len(part)
        assert patched.headers["range"] == f"0-{offset - 1}"
        location = patched.headers["location"]

    status = http.get(location)
    assert status.status_code == 204
    assert status.headers["range"] == "0-2999"

    separator = "&" if "?" in location else "?"
    digest = sha256_digest(data)
    finished = http.put(f"{location}{separator}digest={digest}", content=parts[2])
    assert finished.status_code == 201
    assert finished.headers["docker-content-digest"] == digest
    assert http.get(f"/v2/lib/chunks/blobs/{digest}").content == data


def test_patch_with_chunked_transfer_encoding(http: httpx.Client) -> None:
    """Go clients (skopeo, containerd) stream PATCH bodies of unknown length as chunked."""
    pieces = [b"x" * 70000, b"y" * 3, b"z" * 100000]
    location = http.post("/v2/lib/stream/blobs/uploads/").headers["location"]

    patched = http.patch(location, content=iter(pieces))
    assert patched.status_code == 202
    assert patched.headers["range"] == f"0-{sum(map(len, pieces)) - 1}"

    location = patched.headers["location"]
    separator = "&" if "?" in location else "?"
    digest = sha256_digest(b"".join(pieces))
    assert http.put(f"{location}{separator}digest={digest}").status_code == 201
    assert http.get(f"/v2/lib/stream/blobs/{digest}").content == b"".join(pieces)


def test_digest_mismatch_is_rejected(http: httpx.Client) -> None:
    location = http.post("/v2/lib/bad/blobs/uploads/").headers["location"]
    separator = "&" if "?" in location else "?"
    wrong = sha256_digest(b"something else")
    response = http.put(f"{location}{separator}digest={wrong}", content=b"the content")
    assert response.status_code == 400
    assert error_code(response) == "DIGEST_INVALID"
    assert http.head(f"/v2/lib/bad/blobs/{wrong}").status_code == 404


def test_cross_repository_mount(url: str, http: httpx.Client) -> None:
    digest = push_blob(url, "lib/source", b"shared layer")
    mounted = http.post(f"/v2/lib/target/blobs/uploads/?mount={digest}&from=lib/source")
    assert mounted.status_code == 201
    assert mounted.headers["docker-content-digest"] == digest
    assert http.get(f"/v2/lib/target/blobs/{digest}").content == b"shared layer"


def test_mount_of_an_unknown_blob_starts_an_upload(http: httpx.Client) -> None:
    response = http.post(f"/v2/lib/target/blobs/uploads/?mount={MISSING}&from=lib/source")
    assert response.status_code == 202
    assert "/blobs/uploads/" in response.headers["location"]


def test_cancelled_upload_is_gone(http: httpx.Client) -> None:
    location = http.post("/v2/lib/cancel/blobs/uploads/").headers["location"]
    patched = http.patch(location, content=b"partial")
    assert patched.status_code == 202
    location = patched.headers["location"]
    assert http.delete(location).status_code == 204
    response = http.get(location)
    assert response.status_code == 404
    assert error_code(response) == "BLOB_UPLOAD_UNKNOWN"


# -- manifests, tags, catalog


def test_manifest_by_tag_and_by_digest(url: str, http: httpx.Client) -> None:
    layer = tar_layer({"hello.txt": b"hello\n"})
    digest = push_image(url, "lib/app", "v1", [layer])

    for reference in ("v1", digest):
        response = http.get(f"/v2/lib/app/manifests/{reference}", headers={"Accept": OCI_MANIFEST})
        assert response.status_code == 200
        assert response.headers["content-type"] == OCI_MANIFEST
        assert response.headers["docker-content-digest"] == digest
        assert sha256_digest(response.content) == digest
        assert json.loads(response.content)["layers"][0]["digest"] == sha256_digest(layer)

    head = http.head("/v2/lib/app/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert head.status_code == 200
    assert head.headers["docker-content-digest"] == digest
    assert int(head.headers["content-length"]) > 0


def test_manifest_put_by_digest_and_retag(url: str, http: httpx.Client) -> None:
    digest = push_image(url, "lib/app", "v1", [b"layer one"])
    body = http.get("/v2/lib/app/manifests/v1", headers={"Accept": OCI_MANIFEST}).content
    headers = {"Content-Type": OCI_MANIFEST}

    assert (
        http.put(f"/v2/lib/app/manifests/{digest}", content=body, headers=headers).status_code
        == 201
    )
    assert (
        http.put("/v2/lib/app/manifests/latest", content=body, headers=headers).status_code == 201
    )
    response = http.get("/v2/lib/app/manifests/latest", headers={"Accept": OCI_MANIFEST})
    assert response.headers["docker-content-digest"] == digest


def test_unknown_manifest_is_404(url: str, http: httpx.Client) -> None:
    push_image(url, "lib/app", "v1", [b"layer"])
    for reference in ("nope", MISSING):
        response = http.get(f"/v2/lib/app/manifests/{reference}", headers={"Accept": OCI_MANIFEST})
        assert response.status_code == 404
        assert error_code(response) == "MANIFEST_UNKNOWN"


def test_manifest_with_a_missing_blob_is_rejected(url: str, http: httpx.Client) -> None:
    config = push_blob(url, "lib/app", b"{}")
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config, "size": 2},
        "layers": [{"mediaType": OCI_LAYER, "digest": MISSING, "size": 5}],
    }
    response = http.put(
        "/v2/lib/app/manifests/v1",
        content=json.dumps(manifest).encode(),
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert response.status_code == 400
    assert error_code(response) == "MANIFEST_BLOB_UNKNOWN"


def test_index_of_pushed_manifests(url: str, http: httpx.Client) -> None:
    digest = push_image(url, "lib/multi", "amd64", [b"layer"])
    size = len(
        http.get(f"/v2/lib/multi/manifests/{digest}", headers={"Accept": OCI_MANIFEST}).content
    )
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": size,
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    body = json.dumps(index).encode()
    headers = {"Content-Type": OCI_INDEX}
    assert (
        http.put("/v2/lib/multi/manifests/latest", content=body, headers=headers).status_code == 201
    )

    response = http.get("/v2/lib/multi/manifests/latest", headers={"Accept": OCI_INDEX})
    assert response.headers["content-type"] == OCI_INDEX
    assert response.content == body


def test_tags_list_and_catalog(url: str, http: httpx.Client) -> None:
    push_image(url, "lib/app", "v1", [b"layer"])
    push_image(url, "lib/app", "v2", [b"layer"])
    push_image(url, "deep/er/name", "latest", [b"other"])

    tags = http.get("/v2/lib/app/tags/list").json()
    assert tags == {"name": "lib/app", "tags": ["v1", "v2"]}

    catalog = http.get("/v2/_catalog").json()["repositories"]
    assert {"lib/app", "deep/er/name"} <= set(catalog)


def test_tags_of_an_unknown_repository(http: httpx.Client) -> None:
    response = http.get("/v2/no/such/tags/list")
    assert response.status_code == 404
    assert error_code(response) == "NAME_UNKNOWN"


def test_concurrent_pushes_and_reads(url: str) -> None:
    blobs = [bytes([index]) * (50_000 + index) for index in range(24)]
    digests: dict[int, str] = {}
    failures: list[BaseException] = []

    def push_and_read(index: int) -> None:
        try:
            digests[index] = push_blob(url, f"lib/c{index % 3}", blobs[index])
            got = httpx.get(f"{url}/v2/lib/c{index % 3}/blobs/{digests[index]}", timeout=30)
            assert got.content == blobs[index]
        except BaseException as exc:  # reported in the main thread
            failures.append(exc)

    threads = [threading.Thread(target=push_and_read, args=(i,)) for i in range(len(blobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert all(digests[i] == sha256_digest(blobs[i]) for i in range(len(blobs)))


# -- embedded only: storage, validation, crash safety, lifecycle


def test_pagination(tmp_path: Path) -> None:
    """n and last, as in the spec (docker-registry 2.8 paginates only the catalog)."""
    with embedded_registry(tmp_path) as base_url, httpx.Client(base_url=base_url) as http:
        for tag in ("v1", "v2", "v3"):
            push_image(base_url, "lib/app", tag, [b"layer"])
        push_image(base_url, "lib/other", "v1", [b"layer"])

        assert http.get("/v2/lib/app/tags/list?n=1").json()["tags"] == ["v1"]
        assert http.get("/v2/lib/app/tags/list?n=5&last=v1").json()["tags"] == ["v2", "v3"]
        catalog = http.get("/v2/_catalog?n=1&last=lib/app").json()
        assert catalog == {"repositories": ["lib/other"]}
        response = http.get("/v2/_catalog?n=many")
        assert response.status_code == 400
        assert error_code(response) == "PAGINATION_NUMBER_INVALID"


def test_storage_layout(tmp_path: Path) -> None:
    with embedded_registry(tmp_path) as base_url:
        digest = push_image(base_url, "lib/app", "v1", [b"layer"])

    root = tmp_path / "embedded-registry"
    hex_digest = digest.removeprefix("sha256:")
    assert (root / "blobs" / "sha256" / hex_digest).is_file()
    assert (root / "repositories/lib/app/_tags/v1").read_text() == digest
    assert (root / "repositories/lib/app/_manifests" / hex_digest).read_text() == OCI_MANIFEST
    assert (root / "repositories/lib/app/_layers" / sha256_digest(b"layer")[7:]).is_file()
    assert list((root / "uploads").iterdir()) == []


@pytest.mark.parametrize(
    "path",
    [
        "/v2/../../etc/blobs/" + MISSING,
        "/v2/%2e%2e/%2e%2e/blobs/" + MISSING,
        "/v2/Upper/blobs/" + MISSING,
        "/v2/lib/app/blobs/sha256:..%2f..%2fetc",
        "/v2/lib/app/blobs/md5:" + "0" * 32,
        "/v2/lib/app/blobs/uploads/..%2f..%2frepositories",
        "/v2/lib/app/manifests/..%2fx",
    ],
)
def test_malformed_names_and_digests_are_refused(tmp_path: Path, path: str) -> None:
    with embedded_registry(tmp_path) as base_url:
        response = httpx.get(base_url + path)
    assert response.status_code in (400, 404)
    assert error_code(response) in (
        "NAME_INVALID",
        "DIGEST_INVALID",
        "TAG_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "NOT_FOUND",
    )


def test_storage_checks_every_input(tmp_path: Path) -> None:
    storage = RegistryStorage(tmp_path)
    with pytest.raises(ApiError, match="NAME_INVALID"):
        storage.repo_path("../escape")
    with pytest.raises(ApiError, match="DIGEST_INVALID"):
        storage.blob_path("sha256:../../etc/passwd")
    with pytest.raises(ApiError, match="BLOB_UPLOAD_UNKNOWN"):
        storage.upload_path("../blobs")


def test_interrupted_upload_leaves_no_blob(tmp_path: Path) -> None:
    """A client that dies in the middle of a monolithic upload leaves nothing under blobs/."""
    data = b"q" * 10_000
    digest = sha256_digest(data)
    with embedded_registry(tmp_path) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            request = (
                f"POST /v2/lib/crash/blobs/uploads/?digest={digest} HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nContent-Length: {len(data)}\r\n\r\n"
            ).encode()
            sock.sendall(request + data[:4000])
        assert httpx.head(f"{base_url}/v2/lib/crash/blobs/{digest}").status_code == 404
        assert httpx.get(f"{base_url}/v2/").status_code == 200  # still serving

    assert not (tmp_path / "embedded-registry/blobs/sha256" / digest[7:]).exists()


def test_keep_alive_serves_many_requests_on_one_connection(tmp_path: Path) -> None:
    with embedded_registry(tmp_path) as base_url:
        digest = push_blob(base_url, "lib/ka", b"kept alive")
        port = int(base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            request = f"GET /v2/lib/ka/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            sock.sendall(request * 3)
            received = b""
            while received.count(b"kept alive") < 3:
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
    assert received.count(b"HTTP/1.1 200") == 3


def test_large_blob_is_streamed_with_ranges(tmp_path: Path) -> None:
    data = hashlib.sha256(b"seed").digest() * (3 << 16)  # 6 MiB
    with embedded_registry(tmp_path) as base_url:
        digest = push_blob(base_url, "lib/big", data)
        whole = httpx.get(f"{base_url}/v2/lib/big/blobs/{digest}")
        part = httpx.get(
            f"{base_url}/v2/lib/big/blobs/{digest}", headers={"Range": "bytes=4194300-4194399"}
        )
    assert whole.content == data
    assert part.content == data[4194300:4194400]


def test_start_stop_and_url(tmp_path: Path) -> None:
    registry = EmbeddedRegistry(tmp_path / "r")
    with pytest.raises(RuntimeError, match="not started"):
        _ = registry.url
    with registry:
        assert registry.url.startswith("http://127.0.0.1:")
        assert httpx.get(registry.url + "/v2/").status_code == 200
    registry.stop()  # a second stop is harmless
    with pytest.raises(RuntimeError, match="not started"):
        _ = registry.url


def test_data_survives_a_restart(tmp_path: Path) -> None:
    with embedded_registry(tmp_path) as base_url:
        digest = push_image(base_url, "lib/app", "v1", [b"persisted"])
    with embedded_registry(tmp_path) as base_url:
        response = httpx.get(f"{base_url}/v2/lib/app/manifests/v1")
    assert response.headers["docker-content-digest"] == digest


# -- skopeo: the acceptance test


def write_oci_layout(directory: Path, tag: str, layer: bytes) -> str:
    """A one-layer OCI image layout, written by hand; returns the manifest digest."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = sha256_digest(data)
        (blobs / digest[7:]).write_bytes(data)
        return digest

    layer_digest = put(layer)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    config_bytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": put(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
    }
    manifest_bytes = json.dumps(manifest).encode()
    manifest_digest = put(manifest_bytes)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return manifest_digest


def skopeo(*args: str) -> None:
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_push_and_pull_round_trip(url: str, tmp_path: Path) -> None:
    layer = tar_layer(
        {"etc/hello.txt": b"hello from the registry\n", "big.bin": bytes(range(256)) * 8000}
    )
    write_oci_layout(tmp_path / "layout", "v1", layer)
    remote = "docker://" + url.removeprefix("http://") + "/lib/skopeo:v1"

    skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:v1", remote)
    skopeo("copy", "--src-tls-verify=false", remote, f"oci:{tmp_path / 'out'}:v1")

    pushed = httpx.get(url + "/v2/lib/skopeo/manifests/v1", headers={"Accept": OCI_MANIFEST})
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == pushed.headers["docker-content-digest"]

    blobs = tmp_path / "out" / "blobs" / "sha256"
    manifest = json.loads((blobs / pushed.headers["docker-content-digest"][7:]).read_bytes())
    for descriptor in [manifest["config"], *manifest["layers"]]:
        assert (
            sha256_digest((blobs / descriptor["digest"][7:]).read_bytes()) == descriptor["digest"]
        )
    pulled_layer = (blobs / manifest["layers"][0]["digest"][7:]).read_bytes()
    if manifest["layers"][0]["mediaType"].endswith("gzip"):  # skopeo compresses on push
        pulled_layer = gzip.decompress(pulled_layer)
    assert pulled_layer == layer


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_copies_between_repositories_by_mount(url: str, tmp_path: Path) -> None:
    digest = push_image(url, "lib/src", "v1", [tar_layer({"a": b"a"})])
    host = url.removeprefix("http://")
    skopeo(
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        f"docker://{host}/lib/src:v1",
        f"docker://{host}/lib/dst:v1",
    )
    response = httpx.get(url + "/v2/lib/dst/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert response.headers["docker-content-digest"] == digest
