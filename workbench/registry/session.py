"""A registry session: the client, the block cache and the trio loop that runs them.

The layer stack reads synchronously; registry blobs are read asynchronously. A
`RegistrySession` owns one `TrioPortal` (a trio loop in a thread), one `RegistryClient` (one
connection pool) and, unless told otherwise, one `BlockCache`, and hands out
`RemoteBlobFile`s: random-access files of registry blobs that the LSMT, ZFile and tar layers
read like local files. Every blob of a session shares the pool and the cache.

Blobs are named the way OverlayBD's config names them, by a blob URL
``http(s)://host/v2/<repository>/blobs`` (config.v1.json's ``repoBlobUrl``) and a digest, or by
an image reference and a digest.

Caveats:
- one session per cache directory and process (the cache locks its directory);
- the default session (`default_session()`) lives until the process exits; tools that open
  many images should make their own session and close it.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from workbench.blobs.cache import BlockCache, CachedBlob, Fetch, default_cache_dir
from workbench.blobs.remote import RemoteBlobFile, TrioPortal
from workbench.errors import ImageReferenceError
from workbench.registry.auth import Credentials
from workbench.registry.client import DEFAULT_INSECURE, RegistryClient, RetryPolicy
from workbench.registry.reference import ImageReference

log = logging.getLogger(__name__)

__all__ = [
    "RegistrySession",
    "current_default_session",
    "default_session",
    "reference_from_blob_url",
]


def reference_from_blob_url(url: str) -> tuple[ImageReference, bool]:
    """The repository a ``scheme://host/v2/<repository>/blobs`` URL names, and whether it is
    plain HTTP.

    Raises `ImageReferenceError` naming the expected shape for anything else.
    """
    parts = urlsplit(url.rstrip("/"))
    path = parts.path
    if parts.scheme not in ("http", "https") or not path.startswith("/v2/"):
        raise ImageReferenceError(
            f"{url!r} is not a registry blob URL; expected http(s)://HOST/v2/REPOSITORY/blobs"
        )
    repository = path[len("/v2/") :]
    if repository.endswith("/blobs"):
        repository = repository[: -len("/blobs")]
    reference = ImageReference.parse(f"{parts.netloc}/{repository}")
    return reference, parts.scheme == "http"


class RegistrySession:
    """Open registry blobs as random-access files through one client and one block cache.

    Parameters
    ----------
    cache_dir
        The block cache's directory (default: `default_cache_dir()`); None with
        ``use_cache=False`` reads straight from the registry.
    capacity_bytes, refill_size
        Passed to `BlockCache`.
    credentials
        A `Credentials` or the path of a docker config.json / OverlayBD cred.json.
    insecure
        Extra hosts to reach over plain HTTP (loopback hosts always are).
    retry
        The client's `RetryPolicy` (attempts, backoff, per-attempt timeout, deadline).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        use_cache: bool = True,
        capacity_bytes: int = 4 << 30,
        refill_size: int = 256 << 10,
        credentials: Credentials | str | os.PathLike[str] | None = None,
        insecure: tuple[str, ...] = (),
        readahead: bool = True,
        retry: RetryPolicy | None = None,
    ) -> None:
        if isinstance(credentials, str | os.PathLike):
            credentials = Credentials.from_file(credentials)
        self._credentials = credentials
        self._insecure = tuple(DEFAULT_INSECURE) + tuple(insecure)
        self._cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._use_cache = use_cache
        self._capacity = capacity_bytes
        self._refill = refill_size
        self._readahead = readahead
        self._retry = retry
        self._portal = TrioPortal("workbench-registry")
        self._client: RegistryClient | None = None
        self.cache: BlockCache | None = None
        self._lock = threading.Lock()

    # Life cycle

    def start(self) -> RegistrySession:
        with self._lock:
            if self._client is not None:
                return self
            self._portal.start()
            try:
                self._client = self._portal.run(self._open_client)
                if self._use_cache:
                    self.cache = self._portal.run(self._open_cache)
            except BaseException:
                self._portal.close()
                raise
        return self

    async def _open_client(self) -> RegistryClient:
        client = RegistryClient(
            credentials=self._credentials, insecure=self._insecure, retry=self._retry
        )
        await client.__aenter__()
        return client

    async def _open_cache(self) -> BlockCache:
        return await BlockCache.create(
            self._cache_dir,
            capacity_bytes=self._capacity,
            refill_size=self._refill,
            nursery=self._portal.nursery,
        )

    def close(self) -> None:
        with self._lock:
            if self._client is None:
                return
            client, self._client = self._client, None
            try:
                if self.cache is not None:
                    self._portal.run(self.cache.drain)
                self._portal.run(client.aclose)
            finally:
                if self.cache is not None:
                    self.cache.close()
                    self.cache = None
                self._portal.close()

    def __enter__(self) -> RegistrySession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            raise RuntimeError("the registry session is not started; use it as a context manager")
        return self._client

    def run(self, fn, *args):
        """Run `await fn(*args)` on the session's loop (e.g. a client call) and return it."""
        self.start()
        return self._portal.run(fn, *args)

    # Blobs

    def open_blob(
        self,
        reference: ImageReference | str,
        digest: str,
        size: int | None = None,
        *,
        fetch: Fetch | None = None,
    ) -> RemoteBlobFile:
        """A random-access file of blob `digest` in `reference`'s repository.

        `reference` is an `ImageReference`, an image reference text, or a blob URL
        (``http(s)://host/v2/repo/blobs``). The size is asked of the registry unless given.
        `fetch` (an async ``fetch(offset, length)`` run on the session's loop) replaces the
        registry read as the source of missing blocks, e.g. a P2P parent (`workbench.p2p`).
        """
        self.start()
        reference = self._reference(reference)
        if size is None or size <= 0:
            size = self._portal.run(self.client.blob_size, reference, digest)

        if fetch is None:
            fetch = functools.partial(self.client.read_blob, reference, digest)
        name = f"{reference.registry}/{reference.repository}@{digest}"
        if self.cache is None:
            return RemoteBlobFile(name, size, fetch, self._portal)

        blob: CachedBlob = self.cache.open_blob(digest, size, fetch, readahead=self._readahead)
        return CachedBlobFile(name, size, blob, self._portal, on_close=blob.close, evict=blob.evict)

    def _reference(self, reference: ImageReference | str) -> ImageReference:
        if isinstance(reference, ImageReference):
            return reference
        if "://" in reference:
            parsed, plain_http = reference_from_blob_url(reference)
            if plain_http and parsed.registry not in self._insecure:
                # The config asks for plain HTTP; honour it for this host.
                self._insecure += (parsed.registry,)
                self._portal.run(self._reopen_client)
            return parsed
        return ImageReference.parse(reference)

    async def _reopen_client(self) -> None:
        old = self._client
        self._client = await self._open_client()
        if old is not None:
            await old.aclose()


class CachedBlobFile(RemoteBlobFile):
    """A `RemoteBlobFile` over a `CachedBlob` that serves fully cached reads in the caller's
    thread (`CachedBlob.read_ready`, one `os.pread`) and everything else on the loop.

    The hop into the trio thread costs tens of microseconds per read, as much as reading a
    4 KiB block from the page cache many times over; the fast path skips it.
    """

    def __init__(
        self, name: str, size: int, blob: CachedBlob, portal: TrioPortal, **kw: Any
    ) -> None:
        super().__init__(name, size, blob.pread, portal, **kw)
        self._blob = blob

    @property
    def blob(self) -> CachedBlob:
        """The cached blob underneath: its `presence()` map and `statistics()`."""
        return self._blob

    def pread(self, offset: int, length: int) -> bytes:
        data = self._blob.read_ready(offset, length)
        if data is not None:
            return data
        return super().pread(offset, length)


_default: RegistrySession | None = None
_default_lock = threading.Lock()


def default_session() -> RegistrySession:
    """The process-wide session (default cache directory), started on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = RegistrySession().start()
            atexit.register(_default.close)
            log.info("registry session started, block cache in %s", _default._cache_dir)
        return _default


def current_default_session() -> RegistrySession | None:
    """The process-wide session if something has started it, else None (never starts one):
    for observers (metrics, the debug view) that must not open a cache of their own."""
    return _default
