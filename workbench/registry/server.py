"""An embedded OCI registry: the distribution API served from a local directory.

    with EmbeddedRegistry(root_dir) as registry:      # port 0: the kernel picks a free port
        registry.url                                   # "http://127.0.0.1:PORT"

It is the workbench's default registry when none is given, and the peer tests run against: a
stdlib ThreadingHTTPServer (HTTP/1.1, keep-alive) on a background thread, one thread per
connection. Blobs are content-addressed and shared by all repositories; a repository sees a
blob only once it is linked there (uploaded, mounted), as in the reference registry.

Storage layout under root_dir:

    blobs/sha256/<hex>                        blob bytes (manifests included), named by digest
    repositories/<name>/_layers/<hex>         empty file: the blob is part of the repository
    repositories/<name>/_manifests/<hex>      the manifest's media type (its bytes are a blob)
    repositories/<name>/_tags/<tag>           "sha256:<hex>" of the tagged manifest
    uploads/<uuid>/data, uploads/<uuid>/repo  an upload in progress and the repository it is for
    uploads/tmp-*                             scratch files, renamed into place when complete

The underscore prefixes keep metadata apart from nested repository names: a path component of
a name always starts with a letter or digit. Every file appears by rename of a complete file
in the same file system (uploads are fsynced and their sha256 checked first), so a crash or a
concurrent writer never leaves a partial or wrong blob, tag or link behind; a crash only leaves
garbage under uploads/.

API (https://github.com/opencontainers/distribution-spec): GET /v2/; HEAD/GET blobs with a
single Range (206, 416); uploads (POST monolithic with ?digest=, POST + PATCH* + PUT, status GET,
DELETE, cross-repository mount); PUT/GET/HEAD manifests by tag or digest; tags/list and
_catalog with n/last pagination. Errors carry the OCI JSON body {"errors": [{code, message,
detail}]}. Names, tags, digests and upload ids are checked against the spec's grammars before
they touch a path, and every path is checked to stay inside root_dir.

Caveats:
- no authentication, no TLS, no deletion of blobs or manifests (405 UNSUPPORTED), no garbage
  collection of unreferenced blobs or abandoned uploads.
- only sha256 digests; a Range header with several ranges is answered with the whole blob
  (allowed by RFC 9110), where the reference registry sends multipart/byteranges.
- manifests are stored as pushed; no schema conversion on GET whatever the Accept header says.
- an upload's digest is computed at finalize by reading the upload back (one sequential pass).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger(__name__)

API_VERSION = "registry/2.0"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_MANIFESTS = (OCI_INDEX, DOCKER_MANIFEST_LIST)

MAX_MANIFEST_BYTES = 4 << 20  # the reference registry's limit too
COPY_CHUNK = 1 << 20
IDLE_TIMEOUT_S = 120  # an idle keep-alive connection is closed after this

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"sha256:([a-f0-9]{64})")
UPLOAD_RE = re.compile(r"[a-f0-9]{32}")
ROUTE_RE = re.compile(
    r"/v2/(?P<name>.+?)/(?:"
    r"blobs/uploads/(?P<upload>[^/]*)"
    r"|blobs/(?P<digest>[^/]+)"
    r"|manifests/(?P<reference>[^/]+)"
    r"|(?P<tags>tags/list))"
)


class ApiError(Exception):
    """An answer of the distribution API's error form: HTTP status, error code, detail."""

    def __init__(self, status: int, code: str, message: str, detail: object = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail

    def body(self) -> bytes:
        error = {"code": self.code, "message": self.message, "detail": self.detail}
        return json.dumps({"errors": [error]}).encode()


@dataclass(frozen=True)
class StoredManifest:
    digest: str
    media_type: str
    path: Path


class RegistryStorage:
    """The directory behind the registry; every method is safe to call from many threads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        for sub in ("blobs/sha256", "repositories", "uploads"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- paths: only ever built from checked names, and checked again to stay inside root

    def _inside(self, path: Path) -> Path:
        if not path.resolve().is_relative_to(self.root):
            raise ApiError(400, "NAME_INVALID", "path leaves the registry directory", str(path))
        return path

    def blob_path(self, digest: str) -> Path:
        return self._inside(self.root / "blobs" / "sha256" / check_digest(digest))

    def repo_path(self, name: str) -> Path:
        return self._inside(self.root / "repositories" / check_name(name))

    def upload_path(self, upload: str) -> Path:
        if not UPLOAD_RE.fullmatch(upload):
            raise ApiError(404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry", upload)
        return self._inside(self.root / "uploads" / upload)

    def scratch_file(self) -> Path:
        return self.root / "uploads" / f"tmp-{uuid.uuid4().hex}"

    def _publish(self, data: bytes, target: Path) -> None:
        """Writes a small file by rename, so readers see the old or the new content, never half."""
        scratch = self.scratch_file()
        scratch.write_bytes(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch, target)

    # -- blobs

    def blob_in_repo(self, name: str, digest: str) -> Path | None:
        hex_digest = check_digest(digest)
        path = self.blob_path(digest)
        if not (self.repo_path(name) / "_layers" / hex_digest).is_file() or not path.is_file():
            return None
        return path

    def link_blob(self, name: str, digest: str) -> None:
        link = self.repo_path(name) / "_layers" / check_digest(digest)
        if not link.exists():
            self._publish(b"", link)

    def mount_blob(self, name: str, digest: str, source: str) -> bool:
        if self.blob_in_repo(source, digest) is None:
            return False
        self.link_blob(name, digest)
        return True

    # -- uploads

    def start_upload(self, name: str) -> str:
        upload = uuid.uuid4().hex
        directory = self.upload_path(upload)
        directory.mkdir()
        (directory / "data").touch()
        (directory / "repo").write_text(check_name(name))
        return upload

    def upload_data(self, name: str, upload: str) -> Path:
        directory = self.upload_path(upload)
        try:
            owner = (directory / "repo").read_text()
        except FileNotFoundError:
            owner = None
        if owner != name:
            raise ApiError(404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry", upload)
        return directory / "data"

    def finish_upload(self, name: str, upload: str, digest: str) -> None:
        """Verifies the upload's sha256 against digest and moves it into blobs/ by rename."""
        data = self.upload_data(name, upload)
        expected = check_digest(digest)
        sha = hashlib.sha256()
        with data.open("rb") as stream:
            while chunk := stream.read(COPY_CHUNK):
                sha.update(chunk)
            os.fsync(stream.fileno())
        if sha.hexdigest() != expected:
            self.cancel_upload(name, upload)
            raise ApiError(
                400,
                "DIGEST_INVALID",
                "provided digest did not match uploaded content",
                {"expected": digest, "actual": "sha256:" + sha.hexdigest()},
            )

        os.replace(data, self.blob_path(digest))
        self.link_blob(name, digest)
        self.cancel_upload(name, upload)

    def cancel_upload(self, name: str, upload: str) -> None:
        directory = self.upload_path(upload)
        self.upload_data(name, upload)
        for child in ("data", "repo"):
            (directory / child).unlink(missing_ok=True)
        directory.rmdir()

    # -- manifests and tags

    def put_manifest(self, name: str, reference: str, body: bytes, media_type: str) -> str:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if DIGEST_RE.fullmatch(reference) and reference != digest:
            raise ApiError(
                400,
                "DIGEST_INVALID",
                "manifest digest did not match its content",
                {"expected": reference, "actual": digest},
            )
        if not DIGEST_RE.fullmatch(reference):
            check_tag(reference)
        self._check_references(name, body, media_type)

        blob = self.blob_path(digest)
        if not blob.is_file():
            self._publish(body, blob)
        repo = self.repo_path(name)
        self._publish(media_type.encode(), repo / "_manifests" / check_digest(digest))
        if not DIGEST_RE.fullmatch(reference):
            self._publish(digest.encode(), repo / "_tags" / reference)
        return digest

    def _check_references(self, name: str, body: bytes, media_type: str) -> None:
        """Image manifests need their blobs in the repository, indexes their manifests."""
        try:
            document = json.loads(body)
            if not isinstance(document, dict):
                raise ValueError("not a json object")
            if media_type in IMAGE_MANIFESTS:
                blobs = [document["config"], *document.get("layers", [])]
                missing = [d["digest"] for d in blobs if not self._has_blob(name, d["digest"])]
            elif media_type in INDEX_MANIFESTS:
                children = document.get("manifests", [])
                missing = [d["digest"] for d in children if not self._has_manifest(name, d)]
            else:
                missing = []
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(400, "MANIFEST_INVALID", "manifest invalid", str(exc)) from exc
        if missing:
            raise ApiError(400, "MANIFEST_BLOB_UNKNOWN", "blob unknown to registry", missing[0])

    def _has_blob(self, name: str, digest: str) -> bool:
        return (
            DIGEST_RE.fullmatch(digest) is not None and self.blob_in_repo(name, digest) is not None
        )

    def _has_manifest(self, name: str, descriptor: dict) -> bool:
        digest = descriptor["digest"]
        return (
            DIGEST_RE.fullmatch(digest) is not None and self._manifest_link(name, digest).is_file()
        )

    def _manifest_link(self, name: str, digest: str) -> Path:
        return self.repo_path(name) / "_manifests" / check_digest(digest)

    def get_manifest(self, name: str, reference: str) -> StoredManifest:
        unknown = ApiError(404, "MANIFEST_UNKNOWN", "manifest unknown", {"reference": reference})
        if DIGEST_RE.fullmatch(reference):
            digest = reference
        else:
            try:
                digest = (self.repo_path(name) / "_tags" / check_tag(reference)).read_text()
            except FileNotFoundError:
                raise unknown from None
        try:
            media_type = self._manifest_link(name, digest).read_text()
        except FileNotFoundError:
            raise unknown from None
        return StoredManifest(digest, media_type, self.blob_path(digest))

    def tags(self, name: str) -> list[str]:
        tags = self.repo_path(name) / "_tags"
        if not self.repo_path(name).is_dir():
            raise ApiError(404, "NAME_UNKNOWN", "repository name not known to registry", name)
        return sorted(path.name for path in tags.iterdir()) if tags.is_dir() else []

    def repositories(self) -> list[str]:
        """Every directory under repositories/ that holds a manifest or a blob link."""
        top = self.root / "repositories"
        names = []
        for directory, subdirs, _files in os.walk(top):
            if "_manifests" in subdirs or "_layers" in subdirs:
                names.append(Path(directory).relative_to(top).as_posix())
            subdirs[:] = [sub for sub in subdirs if not sub.startswith("_")]
        return sorted(names)


def check_digest(digest: str) -> str:
    """The hex part of a sha256 digest; DIGEST_INVALID for anything else."""
    match = DIGEST_RE.fullmatch(digest)
    if match is None:
        raise ApiError(400, "DIGEST_INVALID", "digest must be sha256:<64 lowercase hex>", digest)
    return match.group(1)


def check_name(name: str) -> str:
    if len(name) > 255 or not NAME_RE.fullmatch(name):
        raise ApiError(400, "NAME_INVALID", "invalid repository name", name)
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise ApiError(400, "TAG_INVALID", "manifest tag did not match the tag grammar", tag)
    return tag


def paginate(items: list[str], query: dict[str, list[str]]) -> list[str]:
    """The n/last pagination of tags/list and _catalog (items are sorted)."""
    if "last" in query:
        items = [item for item in items if item > query["last"][0]]
    if "n" in query:
        try:
            items = items[: max(0, int(query["n"][0]))]
        except ValueError as exc:
            raise ApiError(400, "PAGINATION_NUMBER_INVALID", "invalid n", query["n"][0]) from exc
    return items


class _Body:
    """The request body as a stream: Content-Length or chunked transfer coding (Go clients)."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self.rfile = handler.rfile
        self.chunked = "chunked" in handler.headers.get("Transfer-Encoding", "").lower()
        length = handler.headers.get("Content-Length")
        self.remaining = int(length) if length and not self.chunked else 0
        self.done = not self.chunked and self.remaining == 0

    def read(self, limit: int = COPY_CHUNK) -> bytes:
        if self.done:
            return b""
        if self.chunked:
            return self._read_chunk(limit)
        data = self.rfile.read(min(limit, self.remaining))
        if not data:
            raise ConnectionError("client closed the connection inside the request body")
        self.remaining -= len(data)
        self.done = self.remaining == 0
        return data

    def _read_chunk(self, limit: int) -> bytes:
        if self.remaining == 0:
            size_line = self.rfile.readline(1024)
            if not size_line:
                raise ConnectionError("client closed the connection inside a chunked body")
            self.remaining = int(size_line.split(b";")[0].strip(), 16)
            if self.remaining == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers, ignored
                self.done = True
                return b""
        data = self.rfile.read(min(limit, self.remaining))
        if not data:
            raise ConnectionError("client closed the connection inside a chunked body")
        self.remaining -= len(data)
        if self.remaining == 0:
            self.rfile.readline(16)  # the CRLF after the chunk
        return data

    def copy_to(self, stream: BinaryIO) -> int:
        written = 0
        while chunk := self.read():
            stream.write(chunk)
            written += len(chunk)
        return written

    def read_all(self, limit: int) -> bytes:
        parts, size = [], 0
        while chunk := self.read():
            size += len(chunk)
            if size > limit:
                raise ApiError(400, "MANIFEST_INVALID", "manifest too large", {"limit": limit})
            parts.append(chunk)
        return b"".join(parts)

    def drain(self) -> None:
        while self.read():
            pass


@dataclass(frozen=True)
class ServerStatistics:
    """Requests answered since the registry started: all, blob GETs, and blob bytes sent."""

    requests: int
    blob_gets: int
    blob_bytes: int


class _Counters:
    """Thread-safe counters of one registry (one handler thread per connection)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = self.blob_gets = self.blob_bytes = 0

    def add(self, requests: int = 0, blob_gets: int = 0, blob_bytes: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.blob_gets += blob_gets
            self.blob_bytes += blob_bytes

    def snapshot(self) -> ServerStatistics:
        with self._lock:
            return ServerStatistics(self.requests, self.blob_gets, self.blob_bytes)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "workbench-registry"
    timeout = IDLE_TIMEOUT_S
    storage: RegistryStorage  # set on the subclass EmbeddedRegistry makes
    counters: _Counters  # likewise
    served: BlobReads  # likewise

    # -- plumbing

    def setup(self) -> None:
        super().setup()
        # headers and body leave in separate writes; with Nagle on, the body of a small answer
        # waits for the client's delayed ACK (40 ms per request on Linux)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        self.counters.add(requests=1)
        self.body = _Body(self)
        url = urlsplit(self.path)
        path, self.query = unquote(url.path), parse_qs(url.query)
        try:
            self._route(method, path)
        except ApiError as exc:
            self._error(exc)
        except ConnectionError as exc:
            log.debug("%s %s: connection lost: %s", method, path, exc)
            self.close_connection = True

    def _error(self, exc: ApiError) -> None:
        if not self.body.done:
            self.close_connection = True  # the body is unread; the stream can't be reused
        log.debug("%s %s -> %d %s", self.command, self.path, exc.status, exc.code)
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if isinstance(exc, _RangeNotSatisfiable):
            headers["Content-Range"] = f"bytes */{exc.size}"
        self._respond(exc.status, exc.body(), headers)

    def _respond(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Docker-Distribution-API-Version", API_VERSION)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _route(self, method: str, path: str) -> None:
        if path in ("/v2", "/v2/"):
            return self._respond(200, b"{}", {"Content-Type": "application/json"})
        if path == "/v2/_catalog" and method == "GET":
            names = paginate(self.storage.repositories(), self.query)
            return self._json({"repositories": names})

        match = ROUTE_RE.fullmatch(path)
        if match is None:
            raise ApiError(404, "NOT_FOUND", "no such endpoint", path)
        name = check_name(match["name"])
        handlers = {
            ("upload", "POST"): self._start_upload,
            ("upload", "PATCH"): self._patch_upload,
            ("upload", "PUT"): self._finish_upload,
            ("upload", "GET"): self._upload_status,
            ("upload", "DELETE"): self._cancel_upload,
            ("digest", "GET"): self._get_blob,
            ("digest", "HEAD"): self._get_blob,
            ("reference", "GET"): self._get_manifest,
            ("reference", "HEAD"): self._get_manifest,
            ("reference", "PUT"): self._put_manifest,
            ("tags", "GET"): self._tags,
        }
        group = next(
            key for key in ("upload", "digest", "reference", "tags") if match[key] is not None
        )
        handler = handlers.get((group, method))
        if handler is None:
            raise ApiError(405, "UNSUPPORTED", "the operation is unsupported", f"{method} {path}")
        argument = match[group] if group != "tags" else None
        return handler(name, argument) if argument is not None else handler(name)

    def _json(self, document: object) -> None:
        self._respond(200, json.dumps(document).encode(), {"Content-Type": "application/json"})

    # -- blobs

    def _get_blob(self, name: str, digest: str) -> None:
        path = self.storage.blob_in_repo(name, digest)
        if path is None:
            raise ApiError(404, "BLOB_UNKNOWN", "blob unknown to registry", digest)
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            first, last = self._range(size)
            headers = {
                "Content-Type": "application/octet-stream",
                "Docker-Content-Digest": digest,
                "Accept-Ranges": "bytes",
                "Content-Length": last - first + 1,
                "ETag": f'"{digest}"',
            }
            status = 200
            if (first, last) != (0, size - 1):
                status = 206
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            self._respond(status, headers=headers)
            if self.command == "GET" and last >= first:
                self.counters.add(blob_gets=1, blob_bytes=last - first + 1)
                self._send_file(stream, first, last - first + 1)
                self.served.record(digest, first, last + 1)

    def _range(self, size: int) -> tuple[int, int]:
        """(first, last) byte of the answer: one range from the Range header, or the whole blob."""
        header = self.headers.get("Range", "")
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
        if match is None or match.groups() == ("", ""):
            return 0, size - 1  # absent, several ranges or malformed: the whole blob
        start, end = match.groups()
        if start == "":
            first, last = max(0, size - int(end)), size - 1
            satisfiable = int(end) > 0 and size > 0
        else:
            first = int(start)
            last = min(int(end), size - 1) if end else size - 1
            satisfiable = first < size and first <= last
        if not satisfiable:
            raise _RangeNotSatisfiable(size)
        return first, last

    def _send_file(self, stream: BinaryIO, offset: int, count: int) -> None:
        try:
            self.connection.sendfile(stream, offset, count)
        except (OSError, ValueError):
            stream.seek(offset)
            while count > 0 and (chunk := stream.read(min(count, COPY_CHUNK))):
                self.wfile.write(chunk)
                count -= len(chunk)

    # -- uploads

    def _upload_headers(self, name: str, upload: str, size: int) -> dict:
        return {
            "Location": f"/v2/{name}/blobs/uploads/{upload}",
            "Docker-Upload-UUID": upload,
            "Range": f"0-{max(size - 1, 0)}",
        }

    def _blob_created(self, name: str, digest: str) -> None:
        headers = {"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest}
        self._respond(201, headers=headers)

    def _start_upload(self, name: str, upload: str = "") -> None:
        if upload:
            raise ApiError(405, "UNSUPPORTED", "POST goes to blobs/uploads/ only", upload)
        if "mount" in self.query:
            digest = self.query["mount"][0]
            source = self.query.get("from", [""])[0]
            if source and self.storage.mount_blob(name, digest, check_name(source)):
                self.body.drain()
                return self._blob_created(name, digest)

        upload = self.storage.start_upload(name)
        if "digest" in self.query:  # monolithic: the whole blob in this request
            self._append(name, upload)
            self.storage.finish_upload(name, upload, self.query["digest"][0])
            return self._blob_created(name, self.query["digest"][0])
        self.body.drain()
        self._respond(202, headers=self._upload_headers(name, upload, 0))

    def _append(self, name: str, upload: str) -> int:
        """Appends the request body to the upload; a Content-Range must start at its end."""
        data = self.storage.upload_data(name, upload)
        with data.open("ab") as stream:
            size = stream.tell()
            content_range = self.headers.get("Content-Range")
            if content_range is not None:
                match = re.fullmatch(r"\s*(?:bytes )?(\d+)-(\d+)(?:/\S+)?\s*", content_range)
                if match is None or int(match[1]) != size:
                    detail = {"content_range": content_range, "upload_size": size}
                    raise ApiError(416, "BLOB_UPLOAD_INVALID", "chunk out of order", detail)
            return size + self.body.copy_to(stream)

    def _patch_upload(self, name: str, upload: str) -> None:
        size = self._append(name, upload)
        self._respond(202, headers=self._upload_headers(name, upload, size))

    def _finish_upload(self, name: str, upload: str) -> None:
        digest = self.query.get("digest", [""])[0]
        check_digest(digest)
        self._append(name, upload)
        self.storage.finish_upload(name, upload, digest)
        self._blob_created(name, digest)

    def _upload_status(self, name: str, upload: str) -> None:
        size = self.storage.upload_data(name, upload).stat().st_size
        self._respond(204, headers=self._upload_headers(name, upload, size))

    def _cancel_upload(self, name: str, upload: str) -> None:
        self.storage.cancel_upload(name, upload)
        self._respond(204)

    # -- manifests and tags

    def _put_manifest(self, name: str, reference: str) -> None:
        body = self.body.read_all(MAX_MANIFEST_BYTES)
        media_type = self.headers.get("Content-Type", "").split(";")[0].strip()
        if media_type in ("", "application/octet-stream", "application/json"):
            media_type = _declared_media_type(body) or OCI_MANIFEST
        digest = self.storage.put_manifest(name, reference, body, media_type)
        headers = {"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": digest}
        self._respond(201, headers=headers)

    def _get_manifest(self, name: str, reference: str) -> None:
        manifest = self.storage.get_manifest(name, reference)
        body = manifest.path.read_bytes()
        headers = {
            "Content-Type": manifest.media_type,
            "Docker-Content-Digest": manifest.digest,
            "ETag": f'"{manifest.digest}"',
        }
        self._respond(200, body, headers)

    def _tags(self, name: str) -> None:
        self._json({"name": name, "tags": paginate(self.storage.tags(name), self.query)})


class _RangeNotSatisfiable(ApiError):
    def __init__(self, size: int) -> None:
        super().__init__(416, "RANGE_INVALID", "requested range not satisfiable", {"size": size})
        self.size = size


def _declared_media_type(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    media_type = document.get("mediaType") if isinstance(document, dict) else None
    return media_type if isinstance(media_type, str) else None


class BlobReads:
    """What the registry served: one (digest, start, end) per blob GET, end exclusive.

    Tests and benchmarks count registry bytes with it (`total`, `by_digest`); thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reads: list[tuple[str, int, int]] = []

    def record(self, digest: str, start: int, end: int) -> None:
        with self._lock:
            self.reads.append((digest, start, end))

    def total(self) -> int:
        with self._lock:
            return sum(end - start for _digest, start, end in self.reads)

    def clear(self) -> None:
        with self._lock:
            self.reads.clear()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not hold up stop()


class _Server6(_Server):
    address_family = socket.AF_INET6


class EmbeddedRegistry:
    """The registry server over root_dir, on a background thread while started."""

    def __init__(self, root_dir: Path | str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.storage = RegistryStorage(Path(root_dir))
        self.served = BlobReads()
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._counters = _Counters()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the embedded registry is not started; call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> EmbeddedRegistry:
        attributes = {"storage": self.storage, "counters": self._counters, "served": self.served}
        handler = type("Handler", (_Handler,), attributes)
        server_class = _Server6 if ":" in self.host else _Server
        self._server = server_class((self.host, self.port), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"registry:{self.port}", daemon=True
        )
        self._thread.start()
        log.info("embedded registry serving %s at %s", self.storage.root, self.url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        log.info("embedded registry at port %d stopped", self.port)
        self._server = self._thread = None

    def statistics(self) -> ServerStatistics:
        """Requests, blob GETs and blob bytes sent since this object was made."""
        return self._counters.snapshot()

    def __enter__(self) -> EmbeddedRegistry:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
