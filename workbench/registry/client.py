"""An async OCI distribution client for lazy reads: manifests, blob sizes, byte ranges.

    async with RegistryClient() as client:
        manifest = await client.resolve(ImageReference.parse("127.0.0.1:5000/app:v1"))
        layer = manifest.layers[0]
        head = await client.read_blob(ref, layer.digest, 0, 4096)

Transport. One pooled `httpx.AsyncClient` (HTTP/1.1, `max_connections` sockets) on trio, so
many reads are in flight at once. Redirects are followed here, not by httpx: a blob's
`Location` is cached for `REDIRECT_TTL_S`, and requests to a host other than the registry's
carry no Authorization header (a signed storage URL must not see the registry's token).

Contract of the calls:
- `resolve` GETs the manifest with an Accept header naming OCI manifest, OCI index, Docker
  schema 2 manifest and Docker manifest list; the sha256 of the bytes must equal the
  requested digest or, for a tag, `Docker-Content-Digest`; an index is resolved to the
  platform ("os/arch[/variant]", default linux/amd64).
- `blob_size` HEADs the blob (Content-Length), falling back to `GET Range: bytes=0-0` and the
  total of `Content-Range` as OverlayBD does. Sizes are cached: blobs are immutable.
- `read_blob(offset, length)` returns exactly `length` bytes, fewer only where the blob ends.
  It sends `Range: bytes=a-b` and requires `206` with `Content-Range: bytes a-b/size`
  exactly; a `200` is accepted only if its body is the whole blob, which is then sliced.
  Concurrent calls for the same range share one request (`_coalesced`).
- `fetch_blob` GETs the whole blob and checks its sha256.

Failures. Each call has bounded attempts (`RetryPolicy.attempts`), each attempt a time limit
(`timeout_s`, covering a slow drip too) and the call a total deadline (`deadline_s`).
Retried: 5xx, 429 (after `Retry-After` when it is at most `retry_after_max_s`), timeouts,
connection errors and resets, short bodies, a wrong Content-Range, a digest mismatch, and a
failing cached redirect (dropped first). Not retried: other 4xx. A 401 triggers one token
refresh per call. Past the bound a `RegistryError` names registry, repository, digest, byte
range, the last status or exception and the attempts. A partial body is never returned.

Tracing: one event per HTTP request, layer "registry", op "get"/"head"/"put"/"post"/"token",
target the digest (manifest reference, or token scope), offset/length the byte range (0, 0
without one), nbytes the body size, hit None.

Caveats:
- bodies are buffered in memory (a whole-blob fetch holds the blob); no streaming API yet;
- multi-range requests and `Content-Encoding` are not used (Accept-Encoding: identity);
- tokens are fetched with GET only (no OAuth2 POST refresh tokens), see `auth`;
- pushes are monolithic (POST then one PUT), enough for tests and small conversions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import trio

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
from workbench.registry.auth import (
    Challenge,
    Credentials,
    TokenCache,
    basic_header,
    parse_challenge,
    parse_token_response,
)
from workbench.registry.reference import DEFAULT_INSECURE, ImageReference
from workbench.tracing import core as trace

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Descriptor",
    "Manifest",
    "RegistryClient",
    "RegistryStatistics",
    "RetryPolicy",
]

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ACCEPT_MANIFESTS = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

REDIRECT_TTL_S = 300.0
"""How long a blob's redirect target is reused (OverlayBD keeps it at least 300 s)."""

MAX_REDIRECTS = 5
"""Hops followed for one request; registries redirect once, to storage."""

MAX_MANIFEST_BYTES = 4 << 20
"""Largest manifest accepted (the distribution spec suggests registries cap at 4 MiB)."""

MAX_ERROR_BODY = 64 << 10
"""Error bodies are read up to this much, for the message, then dropped."""

_REDIRECT_STATUSES = frozenset((301, 302, 303, 307, 308))
_DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one call tries: attempts, backoff between them, and its time limits.

    Backoff before attempt n+1 is `backoff_s * 2**(n-1)`, capped at `backoff_max_s`, times a
    random factor in [0.5, 1] so that many readers retrying together spread out.
    """

    attempts: int = 5
    backoff_s: float = 0.05
    backoff_max_s: float = 2.0
    timeout_s: float = 30.0
    deadline_s: float = 120.0
    retry_after_max_s: float = 5.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None and 0 <= retry_after <= self.retry_after_max_s:
            return retry_after
        ceiling = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a config, a layer or a child manifest."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, str] | None = None

    @classmethod
    def from_json(cls, document: Any, where: str) -> Descriptor:
        try:
            return cls(
                media_type=str(document.get("mediaType", "")),
                digest=str(document["digest"]),
                size=int(document["size"]),
                annotations=dict(document.get("annotations") or {}),
                platform=document.get("platform"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(
                f"{where}: descriptor {document!r} lacks a digest or an integer size ({exc})"
            ) from exc


@dataclass(frozen=True)
class Manifest:
    """An image manifest, resolved from a tag, a digest or an index entry."""

    digest: str
    media_type: str
    raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RegistryStatistics:
    """Counters since the client was made.

    `requests` counts HTTP exchanges (token fetches and redirect hops included), `bytes` the
    body bytes received, `retries` attempts repeated after a failure, `coalesced` calls served
    by another call's request, `errors` failures by HTTP status ("503") or exception name.
    """

    requests: int
    bytes: int
    retries: int
    coalesced: int
    redirects: int
    tokens: int
    errors: Mapping[str, int]


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(
        self,
        reason: str,
        status: int | None = None,
        retry_after: float | None = None,
        final: type[RegistryError] = RegistryError,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.final = final


@dataclass
class _Reply:
    status: int
    headers: httpx.Headers
    body: bytes
    url: str


@dataclass
class _Call:
    """One logical request, as retried by `_perform`."""

    ref: ImageReference
    method: str
    url: str
    op: str
    target: str
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    byte_range: tuple[int, int] | None = None  # (offset, length) for messages and tracing
    max_body: int | None = None
    action: str = "pull"
    redirect_key: tuple[str, str, str] | None = None
    not_found: type[RegistryError] = BlobNotFoundError
    check: Callable[[_Reply], None] | None = None
    ok_statuses: tuple[int, ...] = (200, 206)

    def describe(self) -> str:
        what = f"blob {self.target}" if self.target.startswith("sha256:") else self.target
        text = f"registry {self.ref.host}, repository {self.ref.repository}, {what}"
        if self.byte_range is not None:
            offset, length = self.byte_range
            text += f", bytes {offset}-{offset + length - 1}"
        return text


class _Flight:
    """A request other callers can wait for: set `done` once `result` or `error` is known."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class RegistryClient:
    """Reads manifests and blob ranges from OCI registries; see the module docstring."""

    def __init__(
        self,
        credentials: Credentials | None = None,
        insecure: Iterable[str] = DEFAULT_INSECURE,
        retry: RetryPolicy | None = None,
        max_connections: int = 32,
        user_agent: str = "dadi-workbench",
    ) -> None:
        self.credentials = credentials or Credentials()
        self.insecure = tuple(insecure)
        self.retry = retry or RetryPolicy()
        self.max_connections = max_connections
        self.user_agent = user_agent
        self._http: httpx.AsyncClient | None = None

        self._tokens = TokenCache()
        self._token_locks: dict[tuple[str, str, str], trio.Lock] = {}
        self._challenges: dict[str, Challenge] = {}
        self._locations: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._sizes: dict[tuple[str, str, str], int] = {}
        self._in_flight: dict[tuple[Any, ...], _Flight] = {}

        self._requests = 0
        self._bytes = 0
        self._retries = 0
        self._coalesced_calls = 0
        self._redirects = 0
        self._token_fetches = 0
        self._errors: dict[str, int] = {}

    async def __aenter__(self) -> RegistryClient:
        limits = httpx.Limits(
            max_connections=self.max_connections, max_keepalive_connections=self.max_connections
        )
        self._http = httpx.AsyncClient(
            http1=True,
            http2=False,
            follow_redirects=False,
            limits=limits,
            timeout=httpx.Timeout(self.retry.timeout_s),
            headers={"User-Agent": self.user_agent, "Accept-Encoding": "identity"},
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def statistics(self) -> RegistryStatistics:
        return RegistryStatistics(
            requests=self._requests,
            bytes=self._bytes,
            retries=self._retries,
            coalesced=self._coalesced_calls,
            redirects=self._redirects,
            tokens=self._token_fetches,
            errors=MappingProxyType(dict(self._errors)),
        )

    async def ping(self, ref: ImageReference) -> int:
        """One `GET /v2/` (no retry, no token flow); its status, 200 or 401 when it answers.

        The cheapest request a registry serves: the floor that benchmarks compare reads with.
        """
        url = f"{ref.base_url(self.insecure)}/"
        call = _Call(ref, "GET", url, "get", "/v2/", ok_statuses=(200, 401), max_body=1 << 16)
        reply = await self._exchange(call, url, {})
        return reply.status

    # ---------------------------------------------------------------- manifests

    async def resolve(self, ref: ImageReference, platform: str = "linux/amd64") -> Manifest:
        """The image manifest `ref` names; an index is resolved to `platform`."""
        reference = ref.manifest_reference
        for _ in range(3):
            raw, media_type, digest = await self.get_manifest(ref, reference)
            if media_type in MANIFEST_TYPES:
                return _parse_manifest(raw, media_type, digest, f"manifest {ref}")
            if media_type not in INDEX_TYPES:
                raise ManifestError(
                    f"manifest {ref} ({digest}): media type {media_type!r} is not supported; "
                    f"expected one of {ACCEPT_MANIFESTS}"
                )
            reference = _select_platform(raw, platform, f"index {ref} ({digest})").digest
        raise ManifestError(f"manifest {ref}: indexes nested more than 2 deep")

    async def get_manifest(self, ref: ImageReference, reference: str) -> tuple[bytes, str, str]:
        """(raw bytes, media type, digest) of one manifest or index, digest checked."""
        requested = reference if reference.startswith("sha256:") else None

        def check(reply: _Reply) -> None:
            digest = "sha256:" + hashlib.sha256(reply.body).hexdigest()
            claimed = requested or reply.headers.get("docker-content-digest", "")
            if claimed.startswith("sha256:") and claimed != digest:
                raise _Retry(
                    f"manifest bytes hash to {digest}, expected {claimed}",
                    final=DigestMismatchError,
                )

        call = _Call(
            ref,
            "GET",
            f"{ref.base_url(self.insecure)}/{ref.repository}/manifests/{reference}",
            op="get",
            target=f"manifest {reference}",
            headers={"Accept": ACCEPT_MANIFESTS},
            max_body=MAX_MANIFEST_BYTES,
            not_found=ManifestNotFoundError,
            check=check,
            ok_statuses=(200,),
        )
        reply = await self._perform(call)
        digest = "sha256:" + hashlib.sha256(reply.body).hexdigest()
        return reply.body, _media_type(reply, f"manifest {ref.repository}:{reference}"), digest

    # ---------------------------------------------------------------- blobs

    async def blob_size(self, ref: ImageReference, digest: str) -> int:
        """The blob's size in bytes (cached per registry, repository and digest)."""
        key = (ref.host, ref.repository, digest)
        size = self._sizes.get(key)
        if size is None:
            size = await self._coalesced(("size", *key), lambda: self._probe_size(ref, digest))
            self._sizes[key] = size
        return size

    async def read_blob(self, ref: ImageReference, digest: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, fewer only where the blob ends."""
        if offset < 0 or length < 0:
            raise RangeError(
                f"registry {ref.host}, repository {ref.repository}, blob {digest}: "
                f"offset {offset} and length {length} must not be negative"
            )
        size = await self.blob_size(ref, digest)
        if offset > size:
            raise RangeError(
                f"registry {ref.host}, repository {ref.repository}, blob {digest}: "
                f"offset {offset} is past the end of the blob ({size} bytes)"
            )
        length = min(length, size - offset)
        if length == 0:
            return b""

        key = ("range", ref.host, ref.repository, digest, offset, length)
        return await self._coalesced(
            key, lambda: self._read_range(ref, digest, offset, length, size)
        )

    async def fetch_blob(self, ref: ImageReference, digest: str) -> bytes:
        """The whole blob, its sha256 checked against `digest`."""

        def check(reply: _Reply) -> None:
            actual = "sha256:" + hashlib.sha256(reply.body).hexdigest()
            if actual != digest:
                raise _Retry(
                    f"body of {len(reply.body)} bytes hashes to {actual}",
                    final=DigestMismatchError,
                )

        call = self._blob_call(ref, digest, "GET", check=check)
        call.ok_statuses = (200,)
        reply = await self._coalesced(
            ("blob", ref.host, ref.repository, digest), lambda: self._perform(call)
        )
        self._sizes[(ref.host, ref.repository, digest)] = len(reply.body)
        return reply.body

    async def push_blob(self, ref: ImageReference, data: bytes) -> str:
        """Upload `data` as a blob of `ref.repository` (POST then PUT); returns its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        base = f"{ref.base_url(self.insecure)}/{ref.repository}/blobs/uploads/"
        start = _Call(ref, "POST", base, "post", digest, action="pull,push", ok_statuses=(202,))
        reply = await self._perform(start)
        location = reply.headers.get("location")
        if not location:
            raise RegistryError(f"{start.describe()}: upload start answered without a Location")

        upload = urljoin(reply.url, location)
        upload += ("&" if "?" in upload else "?") + f"digest={digest}"
        finish = _Call(
            ref,
            "PUT",
            upload,
            "put",
            digest,
            headers={"Content-Type": "application/octet-stream"},
            content=data,
            action="pull,push",
            ok_statuses=(201,),
        )
        await self._perform(finish)
        return digest

    async def push_manifest(
        self, ref: ImageReference, raw: bytes, media_type: str = OCI_MANIFEST
    ) -> str:
        """PUT `raw` as the manifest `ref` names (its tag, or its digest); returns the digest."""
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        call = _Call(
            ref,
            "PUT",
            f"{ref.base_url(self.insecure)}/{ref.repository}/manifests/{ref.manifest_reference}",
            "put",
            f"manifest {ref.manifest_reference}",
            headers={"Content-Type": media_type},
            content=raw,
            action="pull,push",
            not_found=ManifestNotFoundError,
            ok_statuses=(201,),
        )
        await self._perform(call)
        return digest

    async def _probe_size(self, ref: ImageReference, digest: str) -> int:
        head = await self._perform(self._blob_call(ref, digest, "HEAD", ok=(200,)))
        length = head.headers.get("content-length", "")
        if length.isdigit():
            return int(length)

        # No usable Content-Length on HEAD: ask for one byte and read the total, as OverlayBD.
        def check(reply: _Reply) -> None:
            if _content_range_total(reply) is None and reply.status != 200:
                raise _Retry(f"Content-Range {reply.headers.get('content-range')!r} has no total")

        probe = self._blob_call(ref, digest, "GET", byte_range=(0, 1), check=check)
        reply = await self._perform(probe)
        total = _content_range_total(reply)
        return total if total is not None else len(reply.body)

    async def _read_range(
        self, ref: ImageReference, digest: str, offset: int, length: int, size: int
    ) -> bytes:
        expected_range = f"bytes {offset}-{offset + length - 1}/{size}"

        def check(reply: _Reply) -> None:
            if reply.status == 206:
                got = reply.headers.get("content-range")
                if got != expected_range:
                    raise _Retry(f"Content-Range {got!r}, expected {expected_range!r}")
                if len(reply.body) != length:
                    raise _Retry(f"206 body of {len(reply.body)} bytes, expected {length}")
            elif len(reply.body) != size:
                # A 200 ignores the Range; its body is usable only if it is the whole blob.
                raise _Retry(f"200 body of {len(reply.body)} bytes, blob has {size}")

        call = self._blob_call(ref, digest, "GET", byte_range=(offset, length), check=check)
        reply = await self._perform(call)
        if reply.status == 200:
            return reply.body[offset : offset + length]
        return reply.body

    def _blob_call(
        self,
        ref: ImageReference,
        digest: str,
        method: str,
        byte_range: tuple[int, int] | None = None,
        check: Callable[[_Reply], None] | None = None,
        ok: tuple[int, ...] = (200, 206),
    ) -> _Call:
        headers = {}
        if byte_range is not None:
            offset, length = byte_range
            headers["Range"] = f"bytes={offset}-{offset + length - 1}"
        return _Call(
            ref,
            method,
            f"{ref.base_url(self.insecure)}/{ref.repository}/blobs/{digest}",
            op=method.lower(),
            target=digest,
            headers=headers,
            byte_range=byte_range,
            redirect_key=(ref.host, ref.repository, digest),
            check=check,
            ok_statuses=ok,
        )

    # ---------------------------------------------------------------- coalescing

    async def _coalesced(self, key: tuple[Any, ...], work: Callable[[], Awaitable[Any]]) -> Any:
        """Run `work` unless an identical call is in flight; then share its outcome.

        The first caller (the leader) runs the request; later callers wait on its Event. If
        the leader is cancelled, its followers loop and one of them leads a new request.
        """
        while (flight := self._in_flight.get(key)) is not None:
            self._coalesced_calls += 1
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.result is not None:
                return flight.result

        flight = _Flight()
        self._in_flight[key] = flight
        try:
            flight.result = await work()
            return flight.result
        except trio.Cancelled:
            raise
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._in_flight[key]
            flight.done.set()

    # ---------------------------------------------------------------- retries

    async def _perform(self, call: _Call) -> _Reply:
        """Run `call` with retries, auth and redirects until it succeeds or must fail."""
        policy = self.retry
        deadline = trio.current_time() + policy.deadline_s
        attempts = 0
        refreshed = False
        last: _Retry | None = None

        while True:
            attempts += 1
            try:
                reply = await self._attempt_in_time(call, deadline)
                if reply.status in call.ok_statuses:
                    if call.check is not None:
                        call.check(reply)
                    return reply
                if reply.status == 401 and not refreshed:
                    await self._authenticate(call, reply)
                    refreshed = True
                    attempts -= 1  # a token refresh is not a failed attempt
                    continue
                self._raise_for_status(call, reply, attempts)
            except _Retry as exc:
                last = exc
            except httpx.TransportError as exc:
                self._count_error(type(exc).__name__)
                last = _Retry(f"{type(exc).__name__}: {exc or 'no detail'}")

            assert last is not None
            if attempts >= policy.attempts:
                raise last.final(self._give_up(call, last, attempts)) from last
            delay = policy.delay(attempts, last.retry_after)
            if trio.current_time() + delay >= deadline:
                raise RegistryTimeoutError(
                    self._give_up(call, last, attempts, f"deadline of {policy.deadline_s:g} s")
                ) from last
            self._retries += 1
            log.debug("%s: retrying in %.3f s after %s", call.describe(), delay, last.reason)
            await trio.sleep(delay)

    async def _attempt_in_time(self, call: _Call, deadline: float) -> _Reply:
        """One attempt, cut off after `timeout_s` (a slow drip too) or at the call's deadline."""
        limit = self.retry.timeout_s
        with trio.move_on_at(min(deadline, trio.current_time() + limit)):
            return await self._attempt(call)
        self._count_error("timeout")
        if trio.current_time() >= deadline:
            raise RegistryTimeoutError(
                self._give_up(
                    call,
                    _Retry("no complete answer"),
                    1,
                    f"deadline of {self.retry.deadline_s:g} s",
                )
            )
        raise _Retry(f"no complete answer within {limit:g} s")

    def _raise_for_status(self, call: _Call, reply: _Reply, attempts: int) -> None:
        status = reply.status
        detail = _error_detail(reply)
        if status in (401, 403):
            raise AuthenticationError(
                f"{call.describe()}: HTTP {status} after {attempts} attempt(s){detail}; "
                "check the credentials file for this registry"
            )
        if status == 404:
            raise call.not_found(f"{call.describe()}: HTTP 404, not found{detail}")
        if status == 416:
            raise RangeError(f"{call.describe()}: HTTP 416, range not satisfiable{detail}")
        if status == 429 or status >= 500:
            raise _Retry(f"HTTP {status}{detail}", status, _retry_after(reply))
        if status in call.ok_statuses or 200 <= status < 300:
            raise _Retry(f"unexpected HTTP {status}, expected {call.ok_statuses}", status)
        raise RegistryError(f"{call.describe()}: HTTP {status}{detail}, not retried")

    def _give_up(self, call: _Call, last: _Retry, attempts: int, why: str = "") -> str:
        bound = f" within the {why}" if why else ""
        return (
            f"{call.describe()}: gave up after {attempts} attempt(s){bound}; "
            f"last error: {last.reason}"
        )

    # ---------------------------------------------------------------- one attempt

    async def _attempt(self, call: _Call) -> _Reply:
        """Send `call` once, following redirects by hand; auth only to the registry's host."""
        registry_origin = _origin(call.url)
        url = call.url
        from_cache = False
        if call.redirect_key is not None:
            cached = self._locations.get(call.redirect_key)
            if cached is not None and cached[1] > trio.current_time():
                url, from_cache = cached[0], True

        for _ in range(MAX_REDIRECTS + 1):
            headers = dict(call.headers)
            on_registry = _origin(url) == registry_origin
            if on_registry:
                authorization = await self._authorization(call)
                if authorization:
                    headers["Authorization"] = authorization
            reply = await self._exchange(call, url, headers)

            location = reply.headers.get("location")
            if reply.status in _REDIRECT_STATUSES and location:
                url = urljoin(url, location)
                self._redirects += 1
                if call.redirect_key is not None:
                    self._locations[call.redirect_key] = (url, trio.current_time() + REDIRECT_TTL_S)
                continue

            if not on_registry and reply.status not in call.ok_statuses:
                # A storage URL that stopped working (expired signature, moved data): go back
                # through the registry on the next attempt.
                if call.redirect_key is not None:
                    self._locations.pop(call.redirect_key, None)
                why = "cached redirect" if from_cache else "redirect"
                raise _Retry(f"{why} to {_origin(url)} answered HTTP {reply.status}", reply.status)
            return reply
        raise RegistryError(f"{call.describe()}: more than {MAX_REDIRECTS} redirects, last {url}")

    async def _exchange(self, call: _Call, url: str, headers: dict[str, str]) -> _Reply:
        """One HTTP request and its whole body; a body shorter than Content-Length is an error."""
        assert self._http is not None, "RegistryClient used outside 'async with'"
        recorder = trace.recorder
        if recorder is not None:
            start_ns = time.perf_counter_ns()
        offset, length = call.byte_range or (0, 0)

        # The body is kept as the list of chunks httpcore hands over and joined once at the
        # end: appending to a bytearray and converting it to bytes copied every byte twice
        # more (and the bytearray's growth copied it again): about a quarter of the client's
        # CPU in a py-spy profile of loopback reads.
        chunks: list[bytes] = []
        received = 0
        self._requests += 1
        try:
            async with self._http.stream(
                call.method, url, headers=headers, content=call.content
            ) as response:
                status = response.status_code
                if call.method != "HEAD" and status not in _REDIRECT_STATUSES:
                    limit = call.max_body if status in call.ok_statuses else MAX_ERROR_BODY
                    async for chunk in response.aiter_raw():
                        chunks.append(chunk)
                        received += len(chunk)
                        if limit is not None and received > limit:
                            if status in call.ok_statuses:
                                raise RegistryError(
                                    f"{call.describe()}: body larger than {limit} bytes"
                                )
                            break
                    declared = response.headers.get("content-length", "")
                    if (
                        status in call.ok_statuses
                        and declared.isdigit()
                        and int(declared) != received
                    ):
                        raise _Retry(f"short body: {received} of {declared} bytes", status)
        finally:
            self._bytes += received
            if recorder is not None:
                recorder.emit("registry", call.op, call.target, offset, length, start_ns, received)

        if status >= 400:
            self._count_error(str(status))
        log.debug("%s %s -> %d (%d bytes)", call.method, url, status, received)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return _Reply(status, response.headers, body, url)

    # ---------------------------------------------------------------- auth

    async def _authorization(self, call: _Call) -> str | None:
        """The Authorization header for the registry, fetching a token if one is due."""
        challenge = self._challenges.get(call.ref.host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            found = self.credentials.lookup(call.ref.host, call.ref.repository)
            return basic_header(*found) if found else None

        key = self._token_key(call, challenge)
        token = self._tokens.get(key, trio.current_time())
        if token is None:
            lock = self._token_locks.setdefault(key, trio.Lock())
            async with lock:
                token = self._tokens.get(key, trio.current_time())
                if token is None:
                    token = await self._fetch_token(call, challenge, key)
        return f"Bearer {token}"

    async def _authenticate(self, call: _Call, reply: _Reply) -> None:
        """Act on a 401: learn the challenge, drop a refused token and fetch a new one."""
        header = reply.headers.get("www-authenticate", "")
        challenge = parse_challenge(header) if header else None
        if challenge is None or challenge.scheme not in ("basic", "bearer"):
            raise AuthenticationError(
                f"{call.describe()}: HTTP 401 with WWW-Authenticate {header!r}, "
                "which names neither Basic nor Bearer"
            )
        if challenge.scheme == "basic":
            if self.credentials.lookup(call.ref.host, call.ref.repository) is None:
                raise AuthenticationError(
                    f"{call.describe()}: HTTP 401, the registry wants Basic credentials and the "
                    "credentials file has none for it"
                )
            self._challenges[call.ref.host] = challenge
            return

        if not challenge.realm:
            raise AuthenticationError(f"{call.describe()}: Bearer challenge without a realm")
        self._challenges[call.ref.host] = challenge
        key = self._token_key(call, challenge)
        self._tokens.drop(key)
        await self._fetch_token(call, challenge, key)

    def _token_key(self, call: _Call, challenge: Challenge) -> tuple[str, str, str]:
        scope = f"repository:{call.ref.repository}:{call.action}"
        return challenge.realm, challenge.params.get("service", ""), scope

    async def _fetch_token(
        self, call: _Call, challenge: Challenge, key: tuple[str, str, str]
    ) -> str:
        assert self._http is not None, "RegistryClient used outside 'async with'"
        realm, service, scope = key
        headers = {}
        found = self.credentials.lookup(call.ref.host, call.ref.repository)
        if found is not None:
            headers["Authorization"] = basic_header(*found)
        params = {"scope": scope}
        if service:
            params["service"] = service

        recorder = trace.recorder
        if recorder is not None:
            start_ns = time.perf_counter_ns()
        self._requests += 1
        self._token_fetches += 1
        try:
            response = await self._http.get(realm, params=params, headers=headers)
        finally:
            if recorder is not None:
                recorder.emit("registry", "token", scope, 0, 0, start_ns, 0)

        self._bytes += len(response.content)
        if response.status_code in (401, 403):
            self._count_error(str(response.status_code))
            raise AuthenticationError(
                f"{call.describe()}: token endpoint {realm} refused scope {scope} with HTTP "
                f"{response.status_code}; check the credentials file for {call.ref.host}"
            )
        if response.status_code != 200:
            self._count_error(str(response.status_code))
            raise _Retry(
                f"token endpoint {realm} answered HTTP {response.status_code}", response.status_code
            )
        token, lifetime = parse_token_response(response.content, realm)
        self._tokens.put(key, token, lifetime, trio.current_time())
        return token

    def _count_error(self, name: str) -> None:
        self._errors[name] = self._errors.get(name, 0) + 1


# -------------------------------------------------------------------- manifest parsing


def _media_type(reply: _Reply, where: str) -> str:
    """The manifest's media type: its own mediaType field, else Content-Type, else its shape."""
    try:
        document = json.loads(reply.body)
    except ValueError as exc:
        raise ManifestError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise ManifestError(f"{where}: not a JSON object")
    if document.get("schemaVersion") == 1:
        raise ManifestError(
            f"{where}: Docker schema 1 manifests are not supported; re-push the image"
        )

    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    content_type = reply.headers.get("content-type", "").split(";")[0].strip()
    if content_type in (*MANIFEST_TYPES, *INDEX_TYPES):
        return content_type
    return OCI_INDEX if "manifests" in document else OCI_MANIFEST


def _parse_manifest(raw: bytes, media_type: str, digest: str, where: str) -> Manifest:
    document = json.loads(raw)
    if "config" not in document or not isinstance(document.get("layers"), list):
        raise ManifestError(f"{where}: an image manifest needs 'config' and a 'layers' list")
    return Manifest(
        digest=digest,
        media_type=media_type,
        raw=raw,
        config=Descriptor.from_json(document["config"], where),
        layers=tuple(Descriptor.from_json(layer, where) for layer in document["layers"]),
        annotations=dict(document.get("annotations") or {}),
    )


def _select_platform(raw: bytes, platform: str, where: str) -> Descriptor:
    """The index entry for "os/arch[/variant]"; without a variant the arch's default wins."""
    wanted_os, _, rest = platform.partition("/")
    wanted_arch, _, wanted_variant = rest.partition("/")
    if not wanted_os or not wanted_arch:
        raise ManifestError(f"{where}: platform {platform!r} is not 'os/arch[/variant]'")

    entries = json.loads(raw).get("manifests")
    if not isinstance(entries, list):
        raise ManifestError(f"{where}: an index needs a 'manifests' list")
    candidates = []
    offered = []
    for entry in entries:
        descriptor = Descriptor.from_json(entry, where)
        spec = descriptor.platform or {}
        arch = spec.get("architecture", "")
        variant = spec.get("variant") or _DEFAULT_VARIANTS.get(arch, "")
        offered.append(
            "/".join(part for part in (spec.get("os", ""), arch, spec.get("variant")) if part)
        )
        if spec.get("os") != wanted_os or arch != wanted_arch:
            continue
        if wanted_variant and variant != wanted_variant:
            continue
        candidates.append((variant != _DEFAULT_VARIANTS.get(arch, ""), descriptor))

    if not candidates:
        raise ManifestError(
            f"{where}: no manifest for platform {platform}; "
            f"the index offers {', '.join(offered) or 'none'}"
        )
    # Stable sort: entries with the arch's default variant first, then index order.
    candidates.sort(key=lambda pair: pair[0])
    return candidates[0][1]


def _content_range_total(reply: _Reply) -> int | None:
    total = reply.headers.get("content-range", "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _retry_after(reply: _Reply) -> float | None:
    value = reply.headers.get("retry-after", "")
    try:
        return float(value)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _error_detail(reply: _Reply) -> str:
    text = reply.body[:200].decode("utf-8", "replace").strip()
    return f" ({text})" if text else ""


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()
