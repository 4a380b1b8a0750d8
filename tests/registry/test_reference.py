"""ImageReference: Docker Hub defaults, registries with ports, tags, digests, and the rules."""

from __future__ import annotations

import pytest

from workbench.errors import ImageReferenceError
from workbench.registry.reference import ImageReference, is_loopback

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("user/app:1.0", "docker.io", "user/app", "1.0", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("127.0.0.1:5000/a/b/c:v1", "127.0.0.1:5000", "a/b/c", "v1", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("ghcr.io/org/app@" + DIGEST, "ghcr.io", "org/app", None, DIGEST),
        ("ghcr.io/org/app:v2@" + DIGEST, "ghcr.io", "org/app", "v2", DIGEST),
        ("[::1]:5000/app:x", "[::1]:5000", "app", "x", None),
        ("reg.example:443/a__b/c-d.e", "reg.example:443", "a__b/c-d.e", "latest", None),
    ],
)
def test_parse_fields(text: str, registry: str, repository: str, tag: str, digest: str) -> None:
    ref = ImageReference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert ImageReference.parse(str(ref)) == ref


def test_api_base_scheme_and_hub_host() -> None:
    assert ImageReference.parse("busybox").api_base == "https://registry-1.docker.io/v2"
    assert ImageReference.parse("127.0.0.1:5000/a").api_base == "http://127.0.0.1:5000/v2"
    assert ImageReference.parse("[::1]:5000/a").api_base == "http://[::1]:5000/v2"
    assert ImageReference.parse("ghcr.io/a").api_base == "https://ghcr.io/v2"
    mirror = ImageReference.parse("mirror.lan:5000/a")
    assert mirror.base_url(["mirror.lan"]) == "http://mirror.lan:5000/v2"
    assert mirror.base_url(["mirror.lan:5000"]) == "http://mirror.lan:5000/v2"


def test_manifest_reference_prefers_digest() -> None:
    assert ImageReference.parse("a/b:v1").manifest_reference == "v1"
    assert ImageReference.parse("a/b:v1@" + DIGEST).manifest_reference == DIGEST
    assert ImageReference.parse("a/b").with_digest(DIGEST).manifest_reference == DIGEST


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.2:80") and is_loopback("localhost:5000") and is_loopback("[::1]")
    assert not is_loopback("10.0.0.1") and not is_loopback("example.com")


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("", "empty"),
        (" busybox", "padded"),
        ("Busybox", "lowercase"),
        ("a//b", "component ''"),
        ("a/b:", "tag ''"),
        ("a/b:-x", "tag '-x' must match"),
        ("a/b@sha256:1234", "64 lowercase hex"),
        ("a/b@md5:" + "0" * 32, "64 lowercase hex"),
        ("host:99999/a", "port '99999'"),
        ("host:x/a", "port"),
        ("[zz]:5000/a", "bracketed IPv6"),
        ("a_/b", "component 'a_'"),
        ("x.io/" + "a" * 256, "at most 255"),
    ],
)
def test_invalid_references_name_the_rule(text: str, rule: str) -> None:
    with pytest.raises(ImageReferenceError, match=rule.replace("(", r"\(")):
        ImageReference.parse(text)
