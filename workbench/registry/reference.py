"""Image references: `host[:port]/name[:tag][@digest]`, parsed and validated.

Grammar (the one Docker and the OCI distribution spec use, reduced to what a reader needs):

    reference  := [registry "/"] repository [":" tag] ["@" digest]
    registry   := host [":" port]          host = DNS name, IPv4, or "[" IPv6 "]"
    repository := component ("/" component)*   component = [a-z0-9]+ ([._]|__|-+ [a-z0-9]+)*
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest     := "sha256:" 64 lowercase hex digits

The first path component is a registry only when it looks like one: it contains a "." or a
":", or it is "localhost", and more components follow. Otherwise the registry is Docker Hub:
`busybox` means `docker.io/library/busybox:latest`, whose API lives at registry-1.docker.io.
The tag defaults to "latest" unless a digest is given; with both, the digest decides.

Scheme. HTTPS unless the host is a loopback address (127.0.0.0/8, ::1, localhost) or the
caller lists it as insecure; `api_base` applies the loopback rule, `base_url(insecure)` the
caller's list.

Caveats:
- only sha256 digests are accepted (the registries and OverlayBD use nothing else);
- the 255-character limit on a whole name is checked, the per-component DNS limits are not.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from workbench.errors import ImageReferenceError

__all__ = [
    "DEFAULT_INSECURE",
    "DOCKER_HUB",
    "DOCKER_HUB_API_HOST",
    "ImageReference",
    "is_loopback",
]

DOCKER_HUB = "docker.io"
"""The registry name a reference without a registry part means."""

DOCKER_HUB_API_HOST = "registry-1.docker.io"
"""Where Docker Hub's distribution API is served."""

DEFAULT_INSECURE = ("127.0.0.1", "localhost", "[::1]")
"""Hosts spoken to over plain HTTP by default (loopback; any port)."""

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_MAX_NAME = 255


@dataclass(frozen=True)
class ImageReference:
    """One parsed reference; `registry` is the host[:port] as written (docker.io for the Hub)."""

    registry: str
    repository: str
    tag: str | None = "latest"
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Parse `text`; raises ImageReferenceError naming the rule that failed."""
        if not text or text != text.strip():
            raise ImageReferenceError(f"image reference {text!r}: empty or padded with spaces")

        # The digest is split first: it is the only part that may contain "@".
        name, _, digest = text.partition("@")
        if "@" in text and not _DIGEST.fullmatch(digest):
            raise ImageReferenceError(
                f"image reference {text!r}: digest {digest!r} is not 'sha256:' followed by "
                "64 lowercase hex digits"
            )

        # The tag is after the last ":" that follows the last "/" (a ":" before it is a port).
        tag: str | None = None
        slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > slash:
            name, tag = name[:colon], name[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise ImageReferenceError(
                    f"image reference {text!r}: tag {tag!r} must match [A-Za-z0-9_][A-Za-z0-9_.-]* "
                    "and be at most 128 characters"
                )

        registry, repository = _split_registry(name, text)
        _check_repository(repository, text)
        if tag is None and not digest:
            tag = "latest"
        return cls(registry, repository, tag, digest or None)

    @property
    def host(self) -> str:
        """The host[:port] that serves the API (registry-1.docker.io for docker.io)."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def api_base(self) -> str:
        """`http(s)://host/v2`, plain HTTP only for loopback hosts."""
        return self.base_url(DEFAULT_INSECURE)

    def base_url(self, insecure: Iterable[str] = DEFAULT_INSECURE) -> str:
        """`http(s)://host/v2`: plain HTTP for loopback hosts and for hosts listed in `insecure`.

        An entry of `insecure` matches the host with or without its port.
        """
        listed = set(insecure)
        plain = self.host in listed or _hostname(self.host) in listed or is_loopback(self.host)
        return f"{'http' if plain else 'https'}://{self.host}/v2"

    @property
    def manifest_reference(self) -> str:
        """What goes after /manifests/: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> ImageReference:
        """The same repository, pinned to `digest`."""
        return ImageReference(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses, with or without a port."""
    name = _hostname(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostname(host: str) -> str:
    """`host` without its port; IPv6 keeps its brackets."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.partition(":")[0]


def _split_registry(name: str, text: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    looks_like_host = "." in first or ":" in first or first == "localhost" or first.startswith("[")
    if not slash or not looks_like_host:
        # Docker Hub: official images live under "library/".
        return DOCKER_HUB, name if slash else f"library/{name}"

    _check_registry(first, text)
    if first in (DOCKER_HUB, "index.docker.io", DOCKER_HUB_API_HOST):
        return DOCKER_HUB, rest if "/" in rest else f"library/{rest}"
    return first, rest


def _check_registry(registry: str, text: str) -> None:
    if registry.startswith("["):
        address, _, port = registry[1:].partition("]")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ImageReferenceError(
                f"image reference {text!r}: registry {registry!r} is not a bracketed IPv6 address"
            ) from None
        port = port.removeprefix(":")
    else:
        host, _, port = registry.partition(":")
        if not _DOMAIN.fullmatch(host):
            raise ImageReferenceError(
                f"image reference {text!r}: registry host {host!r} is not a DNS name or address"
            )
    if ":" in registry.rsplit("]", 1)[-1] and not (port.isdigit() and 0 < int(port) < 65536):
        raise ImageReferenceError(
            f"image reference {text!r}: registry port {port!r} must be a number from 1 to 65535"
        )


def _check_repository(repository: str, text: str) -> None:
    if len(repository) > _MAX_NAME:
        raise ImageReferenceError(
            f"image reference {text!r}: repository is {len(repository)} characters, "
            f"at most {_MAX_NAME} allowed"
        )
    for component in repository.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise ImageReferenceError(
                f"image reference {text!r}: repository component {component!r} must be "
                "lowercase letters and digits, separated by '.', '_', '__' or dashes"
            )
