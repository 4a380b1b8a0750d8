"""RegistryClient against a fault-injecting server: bytes or a clear error, in bounded time."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from faults import FaultServer

from workbench.errors import (
    AuthenticationError,
    BlobNotFoundError,
    DigestMismatchError,
    ManifestError,
    ManifestNotFoundError,
    RangeError,
    RegistryError,
    RegistryTimeoutError,
)
from workbench.registry.auth import Credentials
from workbench.registry.client import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryClient,
    RetryPolicy,
)
from workbench.registry.reference import ImageReference
from workbench.tracing import core as trace

BLOB = random.Random(3).randbytes(200_000)
FAST = RetryPolicy(attempts=5, backoff_s=0.001, backoff_max_s=0.01, timeout_s=1.0, deadline_s=20)
BOUND_S = 15  # every call below finishes (bytes or error) well within this


def run(
    server: FaultServer,
    body: Callable[[RegistryClient, ImageReference], Awaitable[Any]],
    **options: Any,
) -> Any:
    """Run `body(client, ref)` on trio with a client for `server`, failing after BOUND_S."""
    options.setdefault("retry", FAST)

    async def main() -> Any:
        with trio.fail_after(BOUND_S):
            async with RegistryClient(**options) as client:
                return await body(client, ImageReference.parse(server.reference))

    return trio.run(main)


def read(offset: int, length: int) -> Callable[[RegistryClient, ImageReference], Awaitable[bytes]]:
    async def body(client: RegistryClient, ref: ImageReference) -> bytes:
        return await client.read_blob(
            ref, "sha256:" + hashlib.sha256(BLOB).hexdigest(), offset, length
        )

    return body


# ---------------------------------------------------------------- faults that heal


@pytest.mark.parametrize(
    "fault", ["500", "503", "429", "reset", "short", "wrong-range", "half-200", "drip", "hang"]
)
def test_one_fault_is_retried_into_correct_bytes(fault: str) -> None:
    with FaultServer(BLOB) as server:
        server.faults.append(fault)
        data = run(server, read(1000, 20_000))
        assert data == BLOB[1000:21_000]
        assert server.count("GET", "/blobs/") == 2


def test_full_body_200_is_accepted_and_sliced() -> None:
    with FaultServer(BLOB) as server:
        server.faults.append("full")
        assert run(server, read(7, 93)) == BLOB[7:100]
        assert server.count("GET", "/blobs/") == 1


def test_a_storm_of_faults_heals_when_attempts_remain() -> None:
    with FaultServer(BLOB) as server:
        server.faults.extend(["503", "reset", "short", "wrong-range"])
        assert run(server, read(0, 4096)) == BLOB[:4096]


# ---------------------------------------------------------------- faults that do not heal


@pytest.mark.parametrize(
    ("fault", "evidence"),
    [
        ("503", "HTTP 503"),
        ("500", "HTTP 500"),
        ("reset", "Error"),
        ("short", "Error"),
        ("wrong-range", "Content-Range 'bytes 11-5010/200000', expected 'bytes 10-5009/200000'"),
        ("half-200", "200 body of 100000 bytes, blob has 200000"),
    ],
)
def test_past_the_bound_the_error_names_everything(fault: str, evidence: str) -> None:
    with FaultServer(BLOB) as server:
        server.faults.extend([fault] * 5)
        with pytest.raises(RegistryError) as caught:
            run(server, read(10, 5000))
        message = str(caught.value)
        for part in (server.host, "repository test/blob", server.digest, "bytes 10-5009"):
            assert part in message
        assert "gave up after 5 attempt(s)" in message
        assert evidence in message
        assert server.count("GET", "/blobs/") == 5


def test_slow_drip_past_the_deadline_is_a_timeout() -> None:
    policy = RetryPolicy(attempts=10, backoff_s=0.001, timeout_s=0.3, deadline_s=1.0)
    with FaultServer(BLOB) as server:
        server.faults.extend(["drip"] * 10)
        with pytest.raises(RegistryTimeoutError, match=r"within the deadline of 1 s"):
            run(server, read(0, 100_000), retry=policy)


def test_404_is_not_retried() -> None:
    with FaultServer(BLOB) as server:
        server.faults.append("404")
        with pytest.raises(BlobNotFoundError, match=r"HTTP 404.*fault 404"):
            run(server, read(0, 10))
        assert server.count("GET", "/blobs/") == 1


def test_unknown_blob_is_blob_not_found() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> int:
        return await client.blob_size(ref, "sha256:" + "0" * 64)

    with FaultServer(BLOB) as server, pytest.raises(BlobNotFoundError, match="blob sha256:000"):
        run(server, body)


# ---------------------------------------------------------------- range semantics


def test_range_edges() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> None:
        digest = "sha256:" + hashlib.sha256(BLOB).hexdigest()
        assert await client.blob_size(ref, digest) == len(BLOB)
        assert await client.read_blob(ref, digest, len(BLOB) - 5, 100) == BLOB[-5:]
        assert await client.read_blob(ref, digest, len(BLOB), 100) == b""
        assert await client.read_blob(ref, digest, 3, 0) == b""
        with pytest.raises(RangeError, match="past the end of the blob"):
            await client.read_blob(ref, digest, len(BLOB) + 1, 1)
        with pytest.raises(RangeError, match="must not be negative"):
            await client.read_blob(ref, digest, -1, 1)

    with FaultServer(BLOB) as server:
        run(server, body)
        assert server.count("HEAD", "/blobs/") == 1  # sizes are cached
        assert server.count("GET", "/blobs/") == 1  # only the clipped tail needed a request
        tail = next(r for r in server.requests if r.method == "GET")
        assert tail.headers["range"] == f"bytes={len(BLOB) - 5}-{len(BLOB) - 1}"


def test_size_from_content_range_when_head_has_no_length() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> int:
        return await client.blob_size(ref, hashlib_digest(BLOB))

    with FaultServer(BLOB, head_content_length=False) as server:
        assert run(server, body) == len(BLOB)
        probe = next(r for r in server.requests if r.method == "GET")
        assert probe.headers["range"] == "bytes=0-0"


def hashlib_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_fetch_blob_verifies_the_digest() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> bytes:
        return await client.fetch_blob(ref, hashlib_digest(BLOB))

    with FaultServer(BLOB) as server:
        server.faults.append("corrupt")
        assert run(server, body) == BLOB
        server.faults.extend(["corrupt"] * 5)
        with pytest.raises(DigestMismatchError, match=r"hashes to sha256:"):
            run(server, body)


# ---------------------------------------------------------------- coalescing and pooling


def test_concurrent_identical_reads_share_one_request() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> list[bytes]:
        digest = hashlib_digest(BLOB)
        await client.blob_size(ref, digest)
        results: list[bytes] = []

        async def one(offset: int) -> None:
            results.append(await client.read_blob(ref, digest, offset, 4096))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one, 8192)
            nursery.start_soon(one, 0)
        assert client.statistics().coalesced == 9
        return results

    with FaultServer(BLOB) as server:
        server.faults.extend(["delay:0.3", "delay:0.3"])
        results = run(server, body)
        assert sorted(results) == sorted([BLOB[8192:12288]] * 10 + [BLOB[:4096]])
        assert server.count("GET", "/blobs/") == 2


def test_many_reads_in_flight_over_the_pool() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> dict[int, bytes]:
        digest = hashlib_digest(BLOB)
        out: dict[int, bytes] = {}

        async def one(offset: int) -> None:
            out[offset] = await client.read_blob(ref, digest, offset, 1000)

        with trio.fail_after(2):  # 16 reads of 0.3 s each finish together, not one by one
            async with trio.open_nursery() as nursery:
                for index in range(16):
                    nursery.start_soon(one, index * 1000)
        return out

    with FaultServer(BLOB) as server:
        server.faults.extend(["delay:0.3"] * 16)
        out = run(server, body, max_connections=16)
        assert all(out[offset] == BLOB[offset : offset + 1000] for offset in out)


# ---------------------------------------------------------------- redirects and auth


def test_redirect_is_cached_and_gets_no_authorization() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> None:
        digest = hashlib_digest(BLOB)
        assert await client.read_blob(ref, digest, 0, 100) == BLOB[:100]
        assert await client.read_blob(ref, digest, 100, 100) == BLOB[100:200]
        assert client.statistics().redirects == 1

    with (
        FaultServer(BLOB) as storage,
        FaultServer(BLOB, auth="bearer", redirect_to=storage) as server,
    ):
        run(server, body)
        assert server.count("HEAD", "/blobs/") == 2  # a 401 challenge, then with the token
        assert server.count("GET", "/blobs/", header="authorization") == 1  # the one redirect
        assert storage.count("GET", "/data/") == 2
        assert storage.count("GET", "/data/", header="authorization") == 0
        assert server.count("HEAD", "/blobs/", header="authorization") == 1


def test_failing_cached_redirect_goes_back_to_the_registry() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> None:
        digest = hashlib_digest(BLOB)
        assert await client.read_blob(ref, digest, 0, 100) == BLOB[:100]
        storage.faults.append("404")  # the signed URL expired
        assert await client.read_blob(ref, digest, 0, 200) == BLOB[:200]

    with FaultServer(BLOB) as storage, FaultServer(BLOB, redirect_to=storage) as server:
        run(server, body)
        assert server.count("GET", "/blobs/") == 2


def test_bearer_token_is_fetched_once_and_refreshed_once_when_expired() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> None:
        digest = hashlib_digest(BLOB)
        for offset in range(0, 5000, 1000):
            assert await client.read_blob(ref, digest, offset, 1000) == BLOB[offset : offset + 1000]
        assert client.statistics().tokens == 1
        server.expire_tokens()
        assert await client.read_blob(ref, digest, 9000, 10) == BLOB[9000:9010]
        assert client.statistics().tokens == 2

    server = FaultServer(BLOB, auth="bearer", users={"u": "p"})
    with server:
        # Credentials keys are host or host:port; this server's key needs its port.
        credentials = Credentials.from_mapping(
            {"auths": {server.host: {"username": "u", "password": "p"}}}
        )
        run(server, body, credentials=credentials)
        assert server.count("GET", "/token", header="authorization") == 2


def test_wrong_credentials_fail_fast_with_authentication_error() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> bytes:
        return await client.read_blob(ref, hashlib_digest(BLOB), 0, 10)

    with FaultServer(BLOB, auth="bearer", users={"u": "p"}) as server:
        bad = Credentials.from_mapping({"auths": {server.host: {"username": "u", "password": "x"}}})
        with pytest.raises(AuthenticationError, match=r"token endpoint .* refused scope"):
            run(server, body, credentials=bad)
        assert server.count("GET", "/token") == 1


def test_token_that_keeps_being_refused_is_an_authentication_error() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> bytes:
        server.expire_tokens()
        return await client.read_blob(ref, hashlib_digest(BLOB), 0, 10)

    class Expiring(FaultServer):
        def token_valid(self, token: str) -> bool:
            return False

    server = Expiring(BLOB, auth="bearer")
    with server, pytest.raises(AuthenticationError, match=r"HTTP 401 after 1 attempt"):
        run(server, body)


def test_basic_auth_from_credentials() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> bytes:
        return await client.read_blob(ref, hashlib_digest(BLOB), 0, 10)

    with FaultServer(BLOB, auth="basic", users={"u": "p"}) as server:
        good = Credentials.from_mapping(
            {"auths": {f"{server.host}/test": {"username": "u", "password": "p"}}}
        )
        assert run(server, body, credentials=good) == BLOB[:10]
        with pytest.raises(AuthenticationError, match="wants Basic credentials"):
            run(server, body)


# ---------------------------------------------------------------- manifests


def _descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": hashlib_digest(data), "size": len(data), **extra}


def _image(layer: bytes, media_type: str = OCI_MANIFEST) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": _descriptor("application/vnd.oci.image.config.v1+json", b"{}"),
        "layers": [
            _descriptor("application/vnd.oci.image.layer.v1.tar", layer, annotations={"k": "v"})
        ],
    }


def test_resolve_tag_and_digest() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> None:
        manifest = await client.resolve(ref)
        assert manifest.media_type == DOCKER_MANIFEST
        assert manifest.layers[0].digest == hashlib_digest(BLOB)
        assert manifest.layers[0].annotations == {"k": "v"}
        again = await client.resolve(ref.with_digest(manifest.digest))
        assert again == manifest

    with FaultServer(BLOB) as server:
        server.add_manifest(_image(BLOB, DOCKER_MANIFEST), DOCKER_MANIFEST, tags=("latest",))
        run(server, body)
        accept = next(r for r in server.requests if "/manifests/" in r.path).headers["accept"]
        for media_type in (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST):
            assert media_type in accept


@pytest.mark.parametrize(
    ("platform", "layer"),
    [
        ("linux/amd64", b"amd64"),
        ("linux/arm64", b"arm64-v8"),
        ("linux/arm64/v8", b"arm64-v8"),
        ("linux/arm/v6", b"arm-v6"),
        ("linux/arm", b"arm-v7"),
    ],
)
def test_index_resolves_to_the_platform(platform: str, layer: bytes) -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> bytes:
        manifest = await client.resolve(ref, platform=platform)
        return manifest.layers[0].digest

    with FaultServer(BLOB) as server:
        entries = []
        for name, spec in [
            (b"arm-v6", {"os": "linux", "architecture": "arm", "variant": "v6"}),
            (b"amd64", {"os": "linux", "architecture": "amd64"}),
            (b"arm64-v8", {"os": "linux", "architecture": "arm64", "variant": "v8"}),
            (b"arm-v7", {"os": "linux", "architecture": "arm", "variant": "v7"}),
        ]:
            raw = json.dumps(_image(name)).encode()
            server.add_manifest(raw, OCI_MANIFEST)
            entries.append(_descriptor(OCI_MANIFEST, raw, platform=spec))
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        server.add_manifest(index, OCI_INDEX, tags=("latest",))
        assert run(server, body) == hashlib_digest(layer)


def test_index_without_the_platform_lists_what_it_offers() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> None:
        await client.resolve(ref, platform="linux/s390x")

    with FaultServer(BLOB) as server:
        raw = json.dumps(_image(b"x")).encode()
        server.add_manifest(raw, OCI_MANIFEST)
        entry = _descriptor(OCI_MANIFEST, raw, platform={"os": "linux", "architecture": "amd64"})
        index = {"schemaVersion": 2, "manifests": [entry]}
        server.add_manifest(index, DOCKER_MANIFEST_LIST, tags=("latest",))
        with pytest.raises(
            ManifestError, match=r"no manifest for platform linux/s390x.*linux/amd64"
        ):
            run(server, body)


def test_manifest_digest_is_checked_against_the_header() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> None:
        await client.resolve(ref)

    with FaultServer(BLOB) as server:
        server.add_manifest(
            _image(BLOB), OCI_MANIFEST, tags=("latest",), digest_header="sha256:" + "1" * 64
        )
        with pytest.raises(
            DigestMismatchError, match=r"manifest bytes hash to sha256:\w+, expected sha256:1111"
        ):
            run(server, body)


def test_unknown_tag_and_schema1() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> None:
        await client.resolve(ref)

    with FaultServer(BLOB) as server, pytest.raises(ManifestNotFoundError, match="manifest latest"):
        run(server, body)
    with FaultServer(BLOB) as server:
        server.add_manifest({"schemaVersion": 1}, "application/json", tags=("latest",))
        with pytest.raises(ManifestError, match="schema 1 manifests are not supported"):
            run(server, body)


# ---------------------------------------------------------------- tracing and statistics


def test_one_trace_event_per_http_request() -> None:
    with FaultServer(BLOB) as server, trace.recording() as recorder:
        server.faults.append("503")
        run(server, read(100, 50))
        events = [event for event in recorder.events if event.layer == "registry"]
    assert [(e.op, e.offset, e.length) for e in events] == [
        ("head", 0, 0),
        ("get", 100, 50),
        ("get", 100, 50),
    ]
    assert events[-1].nbytes == 50 and events[0].target == hashlib_digest(BLOB)


def test_statistics_count_requests_bytes_retries_and_errors() -> None:
    async def body(client: RegistryClient, ref: ImageReference) -> Any:
        await client.read_blob(ref, hashlib_digest(BLOB), 0, 1000)
        return client.statistics()

    with FaultServer(BLOB) as server:
        server.faults.extend(["500", "429"])
        stats = run(server, body)
    assert (stats.requests, stats.retries) == (4, 2)
    assert stats.bytes >= 1000
    assert dict(stats.errors) == {"500": 1, "429": 1}


# ---------------------------------------------------------------- real registries


@pytest.mark.parametrize("kind", ["embedded", "docker-registry"])
def test_lazy_reads_against_a_real_registry(kind: str, tmp_path: Path) -> None:
    registries = pytest.importorskip("registries")
    start = registries.embedded_registry if kind == "embedded" else registries.docker_registry
    try:
        context = start(tmp_path)
        url = context.__enter__()
    except ImportError as exc:
        pytest.skip(f"{kind} registry not available yet: {exc}")

    try:
        digest = registries.push_blob(url, "lazy/blob", BLOB)
        host = url.removeprefix("http://")

        async def main() -> None:
            ref = ImageReference.parse(f"{host}/lazy/blob:latest")
            with trio.fail_after(BOUND_S):
                async with RegistryClient(retry=FAST) as client:
                    assert await client.blob_size(ref, digest) == len(BLOB)
                    for offset, length in [(0, 1), (4095, 8193), (len(BLOB) - 10, 100)]:
                        data = await client.read_blob(ref, digest, offset, length)
                        assert data == BLOB[offset : offset + length]
                    assert await client.fetch_blob(ref, digest) == BLOB

        trio.run(main)
    finally:
        context.__exit__(None, None, None)
