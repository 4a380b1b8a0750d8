"""DADI's peer-to-peer blob distribution: a root and agents that serve blobs to each other.

Each peer is an HTTP server that speaks the read half of the OCI distribution API (``GET /v2/``,
``HEAD``/``GET`` of blobs with one Range, ``GET`` of manifests), so that anything that reads a
registry reads a peer instead: a device mounts ``127.0.0.1:PORT/repo:tag`` of its host's agent
(`workbench mount`) and its lazy reads become Range requests to the agent.

A peer keeps a persistent `BlockCache` (the session's, 256 KiB refill blocks by default) and
fills its missing blocks from its upstream:

- the **root** reads from the registry (through `RegistryClient`), the only peer that does;
- an **agent** reads from its parent, another agent or the root, per blob; blocks are cached on
  the way, so a block crosses each link of the tree once and the registry serves it once
  (concurrent readers of a missing block share one fetch: `CachedBlob`'s fills).

The topology is the root's (`Topology`): per blob a tree in join order, each node at most
`fanout` children, the root first. An agent asks the root for a parent (``GET /p2p/parent``)
when it first needs a blob, unless it was given a fixed ``--parent``. When a parent fails (a
connection error, a timeout, a 5xx), the agent reports it to the root (``failed=URL``), which
marks it dead in every tree and answers with a new parent that is not the agent's own
descendant; the read is retried there, so children of a killed parent finish their reads.

Control endpoints (JSON): ``GET /p2p/info`` (role, url, root), ``GET /p2p/stats`` (bytes served
and fetched, per-blob cache counters, the root's trees), ``GET /p2p/parent?digest=D&peer=URL``
[``&parent=URL`` to record a fixed parent, ``&failed=URL``] (root only).

Caveats:
- manifests are forwarded to the root (or, at the root, the registry) on every request, not
  cached; they are a few KiB;
- a dead peer stays dead for the root's lifetime; the paper's 20-minute topology expiry and
  re-joining of a restarted agent are not modelled;
- the device's own block cache sits above the agent's (the same bytes are kept twice on a host);
  DADI's agent bypasses the device cache instead;
- no authentication between peers; a peer trusts its parent's bytes (the blob digest is not
  checked per block; the cache's CRC guards the disk, not the wire).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

import httpx

from workbench.errors import BlobNotFoundError, ManifestNotFoundError, PeerError, RegistryError
from workbench.registry.client import RetryPolicy
from workbench.registry.reference import ImageReference
from workbench.registry.server import (
    ApiError,
    _Counters,
    _Handler,
    _Server,
    check_digest,
    check_name,
)
from workbench.registry.session import RegistrySession

__all__ = ["DEFAULT_FANOUT", "Peer", "Topology"]

log = logging.getLogger(__name__)

DEFAULT_FANOUT = 4
"""Children per node of a blob's tree (the root included)."""

SERVE_CHUNK = 4 << 20
"""A large Range is read from the cache and sent in pieces of this size."""

MAX_RESELECTIONS = 4
"""Parents tried for one fetch before the read fails."""

PEER_RETRY = RetryPolicy(attempts=2, backoff_s=0.05, timeout_s=10.0, deadline_s=20.0)
"""Reads from a parent fail fast: a dead parent is replaced instead of retried."""

Role = Literal["root", "agent"]


# Topology ------------------------------------------------------------------------------------


class Topology:
    """The root's record of every blob's tree: who joined, whose child, who is dead.

    Thread-safe (the root's HTTP handlers run in threads). Parents are assigned breadth-first in
    join order: the first live node with fewer than `fanout` children, so the tree stays
    shallow (depth log_fanout N), the way the paper's root assigns.
    """

    def __init__(self, root_url: str, fanout: int = DEFAULT_FANOUT) -> None:
        if fanout < 1:
            raise ValueError(f"fanout {fanout} must be at least 1; give each node 1 or more")
        self.root_url = root_url
        self.fanout = fanout
        self._parents: dict[str, dict[str, str]] = {}
        """digest -> {peer url -> parent url}, in join order (dicts keep insertion order)."""
        self._dead: set[str] = set()
        self._lock = threading.Lock()

    def parent(
        self, digest: str, peer: str, *, fixed: str | None = None, failed: str | None = None
    ) -> str:
        """The parent `peer` should read blob `digest` from (recorded)."""
        with self._lock:
            tree = self._parents.setdefault(digest, {})
            if failed is not None and failed != self.root_url:
                self._mark_dead(failed)
            current = tree.get(peer)
            if fixed is not None and fixed not in self._dead and failed is None:
                tree[peer] = fixed
            elif current is None or current in self._dead or current == failed:
                tree[peer] = self._choose(tree, peer)
            return tree[peer]

    def _mark_dead(self, url: str) -> None:
        if url not in self._dead:
            log.warning("peer %s reported failed; its children are re-parented", url)
        self._dead.add(url)
        for tree in self._parents.values():
            tree.pop(url, None)

    def _choose(self, tree: dict[str, str], peer: str) -> str:
        below = self._descendants(tree, peer) | {peer}
        children: dict[str, int] = {}
        for parent in tree.values():
            children[parent] = children.get(parent, 0) + 1
        for candidate in (self.root_url, *tree):
            if candidate in below or candidate in self._dead:
                continue
            if children.get(candidate, 0) < self.fanout:
                return candidate
        return self.root_url  # everyone is full: the root takes one more

    @staticmethod
    def _descendants(tree: dict[str, str], peer: str) -> set[str]:
        found: set[str] = set()
        frontier = {peer}
        while frontier:
            frontier = {child for child, parent in tree.items() if parent in frontier} - found
            found |= frontier
        return found

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "fanout": self.fanout,
                "dead": sorted(self._dead),
                "trees": {digest: dict(tree) for digest, tree in self._parents.items()},
            }


# The peer ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _PeerCounters:
    requests: int = 0
    bytes_served: int = 0
    upstream_fetches: int = 0
    upstream_bytes: int = 0
    reselections: int = 0


class Peer:
    """One P2P node: an HTTP server over a block cache that fills from its upstream.

    Parameters
    ----------
    role
        ``"root"`` (upstream: `registry`) or ``"agent"`` (upstream: `parent`, or the parent
        `root` assigns per blob).
    cache_dir
        The peer's persistent block cache (one process per directory).
    registry
        The registry's base URL (``http://host:port``); root only.
    parent, root
        An agent's fixed parent and the root that re-selects parents; an agent needs one of
        them (the root is asked of the parent when only the parent is given).
    listen
        ``host:port`` to bind (port 0: any free port).
    advertise
        The URL other peers reach this one at (default: from `listen`; required when listening
        on 0.0.0.0).
    """

    def __init__(
        self,
        role: Role,
        cache_dir: str | os.PathLike[str],
        *,
        registry: str | None = None,
        parent: str | None = None,
        root: str | None = None,
        listen: str = "127.0.0.1:0",
        advertise: str | None = None,
        fanout: int = DEFAULT_FANOUT,
        refill_size: int = 256 << 10,
        capacity_bytes: int = 4 << 30,
    ) -> None:
        if role == "root" and registry is None:
            raise PeerError("a root needs the registry it reads from; give registry=URL")
        if role == "agent" and parent is None and root is None:
            raise PeerError("an agent needs a parent or a root to read from; give one of them")
        self.role = role
        self.registry = _base(registry) if registry else None
        self.fixed_parent = _base(parent) if parent else None
        self.root = _base(root) if root else None
        self._listen = listen
        self._advertise = _base(advertise) if advertise else None
        self._fanout = fanout
        self.session = RegistrySession(
            Path(cache_dir),
            refill_size=refill_size,
            capacity_bytes=capacity_bytes,
            readahead=False,  # a peer fetches what its children ask for, no more
            retry=None if role == "root" else PEER_RETRY,
        )
        self.topology: Topology | None = None
        self.counters = _PeerCounters()
        self._http_counters = _Counters()  # the HTTP plumbing's own (requests answered)
        self._blobs: dict[str, Any] = {}
        self._parents: dict[str, str] = {}
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._server: _Server | None = None
        self._url: str | None = None
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self._control: httpx.AsyncClient | None = None

    # Life cycle

    @property
    def url(self) -> str:
        """The URL peers reach this one at (kept after `stop`, for reports)."""
        if self._url is None:
            raise RuntimeError("the peer is not started; call start() first")
        return self._url

    def start(self) -> Peer:
        host, _, port = self._listen.rpartition(":")
        if host in ("0.0.0.0", "") and self._advertise is None:
            raise PeerError(
                f"listening on {self._listen!r} needs advertise=URL, the address children "
                "reach this peer at"
            )
        self.session.start()
        attributes = {"peer": self, "counters": self._http_counters}
        handler = type("PeerHandler", (_PeerHandler,), attributes)
        try:
            self._server = _Server((host or "0.0.0.0", int(port)), handler)
        except OSError as exc:
            self.session.close()
            raise PeerError(f"cannot listen on {self._listen}: {exc}; pick a free port") from exc
        bound_host, bound_port = self._server.server_address[:2]
        self._url = self._advertise or f"http://{bound_host}:{bound_port}"
        self._trust(self.url, self.registry, self.fixed_parent, self.root)
        if self.role == "root":
            self.topology = Topology(self.url, self._fanout)
            self.root = self.url
        elif self.root is None:
            self.root = self._ask_root_of(self.fixed_parent)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"p2p-{self.role}", daemon=True
        )
        self._thread.start()
        log.info("p2p %s serving at %s (upstream %s)", self.role, self.url, self._upstream_text())
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            blobs, self._blobs = self._blobs, {}
            connections, self._connections = self._connections, set()
        for connection in connections:  # keep-alive clients must see this peer go away
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for blob in blobs.values():
            blob.close()
        if self._control is not None:
            self.session.run(self._control.aclose)
        self.session.close()
        self._server = self._thread = None
        log.info("p2p %s stopped", self.role)

    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _upstream_text(self) -> str:
        if self.role == "root":
            return f"registry {self.registry}"
        return f"parent {self.fixed_parent or 'assigned by the root'}, root {self.root}"

    def _trust(self, *urls: str | None) -> None:
        """Speak plain HTTP to these peers (they were given as http:// URLs)."""
        client = self.session.client
        for url in urls:
            if url and url.startswith("http://"):
                host = urlsplit(url).netloc
                if host not in client.insecure:
                    client.insecure = (*client.insecure, host)

    def _ask_root_of(self, parent: str | None) -> str:
        assert parent is not None
        try:
            info = httpx.get(f"{parent}/p2p/info", timeout=10.0).json()
        except (httpx.HTTPError, ValueError) as exc:
            raise PeerError(
                f"parent {parent} does not answer /p2p/info ({exc}); start it first or give "
                "the root's URL"
            ) from exc
        return _base(info["root"])

    # Statistics

    def statistics(self) -> dict[str, Any]:
        cache = self.session.cache
        blobs = []
        if cache is not None:
            blobs = [dataclasses.asdict(blob) for blob in cache.statistics().blobs]
        stats = {
            "role": self.role,
            "url": self.url,
            "root": self.root,
            **dataclasses.asdict(self.counters),
            "parents": dict(self._parents),
            "blobs": blobs,
        }
        if self.topology is not None:
            stats["topology"] = self.topology.snapshot()
        return stats

    # Reading blobs (handler threads)

    def blob_size(self, repository: str, digest: str) -> int:
        return self.session.run(self._size, repository, digest)

    def read(self, repository: str, digest: str, offset: int, length: int) -> bytes:
        return self._blob(repository, digest).pread(offset, length)

    def manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        upstream = self.registry if self.role == "root" else self.root
        ref = _reference(upstream, repository)
        return self.session.run(self.session.client.get_manifest, ref, reference)

    def _blob(self, repository: str, digest: str):
        blob = self._blobs.get(digest)
        if blob is not None:
            return blob

        with self._open_lock:  # one handle per blob, however many children ask at once
            blob = self._blobs.get(digest)
            if blob is None:
                size = self.blob_size(repository, digest)

                async def fetch(offset: int, length: int) -> bytes:
                    return await self._fetch(repository, digest, offset, length)

                reference = _reference(self.url, repository)
                blob = self.session.open_blob(reference, digest, size, fetch=fetch)
                with self._lock:
                    self._blobs[digest] = blob
        return blob

    # Upstream (the session's trio loop)

    async def _size(self, repository: str, digest: str) -> int:
        async def ask(upstream: str) -> int:
            return await self.session.client.blob_size(_reference(upstream, repository), digest)

        return await self._with_parent(digest, ask)

    async def _fetch(self, repository: str, digest: str, offset: int, length: int) -> bytes:
        async def read(upstream: str) -> bytes:
            ref = _reference(upstream, repository)
            return await self.session.client.read_blob(ref, digest, offset, length)

        data = await self._with_parent(digest, read)
        self.counters.upstream_fetches += 1
        self.counters.upstream_bytes += len(data)
        return data

    async def _with_parent(self, digest: str, work):
        """`await work(upstream)` against this blob's upstream, replacing a failed parent."""
        if self.role == "root":
            assert self.registry is not None
            return await work(self.registry)

        failed: str | None = None
        for _attempt in range(MAX_RESELECTIONS):
            parent = await self._parent(digest, failed)
            try:
                return await work(parent)
            except (BlobNotFoundError, ManifestNotFoundError):
                raise
            except RegistryError as exc:
                if parent == self.root:
                    raise
                log.warning("parent %s failed for %s (%s); asking the root", parent, digest, exc)
                self.counters.reselections += 1
                failed = parent
        raise PeerError(
            f"no parent answered for blob {digest} after {MAX_RESELECTIONS} tries; "
            f"check the root {self.root}"
        )

    async def _parent(self, digest: str, failed: str | None) -> str:
        known = self._parents.get(digest)
        if known is not None and failed is None:
            return known

        query = {"digest": digest, "peer": self.url}
        if failed is not None:
            query["failed"] = failed
        elif self.fixed_parent is not None:
            query["parent"] = self.fixed_parent
        parent = await self._ask_parent(query)

        self._trust(parent)
        self._parents[digest] = parent
        return parent

    async def _ask_parent(self, query: dict[str, str]) -> str:
        if self._control is None:
            self._control = httpx.AsyncClient(timeout=10.0)
        url = f"{self.root}/p2p/parent?{urlencode(query)}"
        try:
            reply = await self._control.get(url)
            reply.raise_for_status()
            return _base(reply.json()["parent"])
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            if "parent" in query:
                return query["parent"]  # a fixed parent works without the root
            raise PeerError(f"the root {self.root} did not assign a parent: {exc}") from exc


class _PeerHandler(_Handler):
    """The embedded registry's HTTP plumbing, routed to a `Peer` instead of a directory."""

    server_version = "workbench-p2p"
    peer: Peer

    def setup(self) -> None:
        super().setup()
        with self.peer._lock:
            self.peer._connections.add(self.connection)

    def finish(self) -> None:
        with self.peer._lock:
            self.peer._connections.discard(self.connection)
        super().finish()

    def _route(self, method: str, path: str) -> None:
        if method not in ("GET", "HEAD"):
            raise ApiError(405, "UNSUPPORTED", "a p2p peer serves reads only", f"{method} {path}")
        if path in ("/v2", "/v2/"):
            return self._respond(200, b"{}", {"Content-Type": "application/json"})
        if path == "/p2p/info":
            peer = self.peer
            return self._json({"role": peer.role, "url": peer.url, "root": peer.root})
        if path == "/p2p/stats":
            return self._json(self.peer.statistics())
        if path == "/p2p/parent":
            return self._assign_parent()

        name, kind, argument = _split_route(path)
        try:
            if kind == "blobs":
                return self._serve_blob(name, _digest(argument))
            return self._serve_manifest(name, argument)
        except (BlobNotFoundError, ManifestNotFoundError) as exc:
            code = "BLOB_UNKNOWN" if kind == "blobs" else "MANIFEST_UNKNOWN"
            raise ApiError(404, code, "unknown upstream", str(exc)) from exc
        except (RegistryError, PeerError) as exc:
            log.warning("%s %s: upstream failed: %s", method, path, exc)
            raise ApiError(502, "UPSTREAM_FAILED", "the peer's upstream failed", str(exc)) from exc

    def _assign_parent(self) -> None:
        topology = self.peer.topology
        if topology is None:
            raise ApiError(404, "NOT_ROOT", "only the root assigns parents", self.peer.root)
        query = {key: values[0] for key, values in self.query.items()}
        if "digest" not in query or "peer" not in query:
            raise ApiError(400, "INVALID", "give digest= and peer=", query)
        parent = topology.parent(
            _digest(query["digest"]),
            _base(query["peer"]),
            fixed=_base(query["parent"]) if "parent" in query else None,
            failed=_base(query["failed"]) if "failed" in query else None,
        )
        self._json({"parent": parent})

    def _serve_blob(self, name: str, digest: str) -> None:
        peer = self.peer
        size = peer.blob_size(name, digest)
        first, last = self._range(size)
        headers = {
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": digest,
            "Accept-Ranges": "bytes",
            "Content-Length": last - first + 1,
        }
        status = 200
        if (first, last) != (0, size - 1):
            status = 206
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        if self.command == "HEAD":
            return self._respond(status, headers=headers)

        # the first piece is read before the status goes out, so a failing upstream is a 502
        offset = first
        piece = peer.read(name, digest, offset, min(SERVE_CHUNK, last + 1 - offset))
        self._respond(status, headers=headers)
        peer.counters.requests += 1
        while True:
            self.wfile.write(piece)
            peer.counters.bytes_served += len(piece)
            offset += len(piece)
            if offset > last or not piece:
                return
            piece = peer.read(name, digest, offset, min(SERVE_CHUNK, last + 1 - offset))

    def _serve_manifest(self, name: str, reference: str) -> None:
        body, media_type, digest = self.peer.manifest(name, reference)
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
        self._respond(200, body, headers)


def _split_route(path: str) -> tuple[str, str, str]:
    """(repository, "blobs" or "manifests", digest or reference) of a read path."""
    if path.startswith("/v2/"):
        head, _, argument = path[len("/v2/") :].rpartition("/")
        name, _, kind = head.rpartition("/")
        if kind in ("blobs", "manifests") and name and argument:
            return check_name(name), kind, argument
    raise ApiError(404, "NOT_FOUND", "no such endpoint", path)


def _digest(text: str) -> str:
    """`text` if it is a sha256 digest (DIGEST_INVALID otherwise)."""
    return "sha256:" + check_digest(text)


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url if "://" in url else f"http://{url}"


def _reference(base_url: str | None, repository: str) -> ImageReference:
    assert base_url is not None
    return ImageReference.parse(f"{urlsplit(base_url).netloc}/{repository}")
