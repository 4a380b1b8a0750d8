"""A registry that misbehaves on request: one blob, a few manifests, and programmable faults.

    with FaultServer(blob) as server:
        server.faults.extend(["503", "reset", "short"])   # the next three blob GETs fail so
        ... RegistryClient reads ImageReference.parse(server.reference) ...
        assert server.count("GET", "/blobs/") == 4

The server is the standard library's ThreadingHTTPServer on 127.0.0.1 (a free port), run in
a thread, speaking HTTP/1.1 with keep-alive. Every request is logged (`requests`) with its
method, path and headers. GETs of the blob (under /v2/<repo>/blobs/<digest>, or /data/<digest>
when this server is a redirect target) take the next fault from `faults`; an empty queue
means a correct answer (206 for a Range, 200 otherwise).

Faults: "500", "503", "404", "429" (Retry-After: 0), "reset" (half the body, then a TCP
reset), "short" (correct Content-Length, half the body, then close), "wrong-range" (a
Content-Range one byte off), "full" (200 with the whole blob, Range ignored), "half-200" (200
whose body is half the blob), "corrupt" (one byte flipped), "corrupt-at:N" (the byte at blob
offset N flipped in the next answer whose range holds it; answers before it are correct and
leave the fault queued), "drip" (one byte every 50 ms),
"hang" (no answer for 30 s), "delay:S" (a correct answer after S seconds).

Auth: `auth="bearer"` requires `Authorization: Bearer <token>` on /v2/ paths and answers 401
with a challenge naming `/token` on this server; tokens live `token_lifetime` seconds and
`expire_tokens()` kills them all at once. `auth="basic"` requires the `users` credentials.
`redirect_to=other` makes blob GETs answer 307 to `other`'s /data/<digest>.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class LoggedRequest:
    method: str
    path: str
    headers: dict[str, str]


class FaultServer:
    def __init__(
        self,
        blob: bytes = b"",
        repository: str = "test/blob",
        *,
        auth: str | None = None,
        users: dict[str, str] | None = None,
        token_lifetime: float = 300.0,
        redirect_to: FaultServer | None = None,
        head_content_length: bool = True,
    ) -> None:
        self.blob = blob
        self.digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        self.repository = repository
        self.auth = auth
        self.users = users or {}
        self.token_lifetime = token_lifetime
        self.redirect_to = redirect_to
        self.head_content_length = head_content_length
        self.faults: deque[str] = deque()
        self.requests: list[LoggedRequest] = []
        self.manifests: dict[str, tuple[bytes, str, str | None]] = {}
        self.tokens: dict[str, float] = {}
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def __enter__(self) -> FaultServer:
        handler = type("Handler", (_Handler,), {"fault_server": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def reference(self) -> str:
        return f"{self.host}/{self.repository}:latest"

    # -- seeding and inspection

    def add_manifest(
        self,
        document: dict[str, Any] | bytes,
        media_type: str,
        tags: tuple[str, ...] = (),
        digest_header: str | None = "auto",
    ) -> str:
        """Serve `document` under its digest and `tags`; returns the digest."""
        raw = document if isinstance(document, bytes) else json.dumps(document).encode()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        header = digest if digest_header == "auto" else digest_header
        for reference in (digest, *tags):
            self.manifests[reference] = (raw, media_type, header)
        return digest

    def expire_tokens(self) -> None:
        with self._lock:
            self.tokens.clear()

    def count(self, method: str, path_part: str = "", header: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for request in self.requests
                if request.method == method
                and path_part in request.path
                and (header is None or header in request.headers)
            )

    def log(self, request: LoggedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def next_fault(self, start: int = 0, end: int = -1) -> str | None:
        """The fault for an answer of blob bytes [start, end]; None for a correct answer."""
        with self._lock:
            if not self.faults:
                return None
            fault = self.faults[0]
            if fault.startswith("corrupt-at:") and not start <= int(fault[11:]) <= end:
                return None
            return self.faults.popleft()

    def token_valid(self, token: str) -> bool:
        with self._lock:
            expires = self.tokens.get(token)
        return expires is not None and expires > time.monotonic()

    def issue_token(self) -> str:
        with self._lock:
            token = f"token-{len(self.tokens)}-{time.monotonic_ns()}"
            self.tokens[token] = time.monotonic() + self.token_lifetime
        return token


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fault_server: FaultServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the server's own request log is `requests`

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_GET(self) -> None:
        self._serve("GET")

    def _serve(self, method: str) -> None:
        server = self.fault_server
        path = urlsplit(self.path).path
        server.log(
            LoggedRequest(method, self.path, {k.lower(): v for k, v in self.headers.items()})
        )

        if path == "/token":
            return self._token()
        if path.startswith("/data/"):
            return self._blob(method, path.removeprefix("/data/"))
        if not path.startswith("/v2/"):
            return self._reply(404, b"not found")
        if not self._authorized():
            return None
        if path == "/v2/":
            return self._reply(200, b"{}", "application/json")

        repository, kind, reference = _split_v2(path)
        if repository != server.repository:
            return self._reply(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}', "application/json")
        if kind == "manifests":
            return self._manifest(method, reference)
        if kind == "blobs":
            if server.redirect_to is not None and method == "GET":
                target = f"{server.redirect_to.url}/data/{reference}"
                return self._reply(307, b"", headers={"Location": target})
            return self._blob(method, reference)
        return self._reply(404, b"not found")

    # -- auth

    def _authorized(self) -> bool:
        server = self.fault_server
        given = self.headers.get("Authorization", "")
        if server.auth == "bearer":
            if given.startswith("Bearer ") and server.token_valid(given.removeprefix("Bearer ")):
                return True
            challenge = (
                f'Bearer realm="{server.url}/token",service="faults",'
                f'scope="repository:{server.repository}:pull"'
            )
            self._reply(
                401,
                b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                headers={"WWW-Authenticate": challenge},
            )
            return False
        if server.auth == "basic":
            if given.startswith("Basic ") and self._basic_ok(given):
                return True
            self._reply(401, b"", headers={"WWW-Authenticate": 'Basic realm="faults"'})
            return False
        return True

    def _basic_ok(self, given: str) -> bool:
        user, _, password = base64.b64decode(given.removeprefix("Basic ")).decode().partition(":")
        return self.fault_server.users.get(user) == password

    def _token(self) -> None:
        server = self.fault_server
        given = self.headers.get("Authorization", "")
        if server.users and not (given.startswith("Basic ") and self._basic_ok(given)):
            return self._reply(401, b'{"details":"bad credentials"}')
        query = parse_qs(urlsplit(self.path).query)
        if query.get("scope") != [f"repository:{server.repository}:pull"]:
            return self._reply(400, b'{"details":"wrong scope"}')
        body = {"token": server.issue_token(), "expires_in": server.token_lifetime}
        return self._reply(200, json.dumps(body).encode(), "application/json")

    # -- content

    def _manifest(self, method: str, reference: str) -> None:
        found = self.fault_server.manifests.get(reference)
        if found is None:
            return self._reply(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}', "application/json")
        raw, media_type, digest = found
        headers = {"Docker-Content-Digest": digest} if digest else {}
        return self._reply(
            200, b"" if method == "HEAD" else raw, media_type, headers, length=len(raw)
        )

    def _blob(self, method: str, digest: str) -> None:
        server = self.fault_server
        if digest != server.digest:
            return self._reply(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}', "application/json")
        blob = server.blob
        if method == "HEAD":
            headers = {} if server.head_content_length else {"X-No-Length": "1"}
            length = len(blob) if server.head_content_length else None
            return self._reply(200, b"", "application/octet-stream", headers, length=length)

        start, end = 0, len(blob) - 1
        ranged = _parse_range(self.headers.get("Range"))
        if ranged is not None:
            start, end = ranged[0], min(ranged[1], len(blob) - 1)
            if start >= len(blob):
                return self._reply(416, b"", headers={"Content-Range": f"bytes */{len(blob)}"})
        fault = server.next_fault(start, end)
        self._faulty_blob(fault, blob, start, end, ranged is not None)

    def _faulty_blob(
        self, fault: str | None, blob: bytes, start: int, end: int, ranged: bool
    ) -> None:
        server = self.fault_server
        if fault in ("500", "503", "404"):
            return self._reply(int(fault), b"fault " + fault.encode())
        if fault == "429":
            return self._reply(429, b"slow down", headers={"Retry-After": "0"})
        if fault == "hang":
            server.stopping.wait(30)
            return self._reply(503, b"too late")
        if fault and fault.startswith("delay:"):
            server.stopping.wait(float(fault.partition(":")[2]))

        body = blob[start : end + 1]
        status = 206 if ranged else 200
        headers = {"Content-Range": f"bytes {start}-{end}/{len(blob)}"} if ranged else {}
        if fault == "full":
            status, body, headers = 200, blob, {}
        elif fault == "half-200":
            status, body, headers = 200, blob[: len(blob) // 2], {}
        elif fault == "wrong-range":
            headers = {"Content-Range": f"bytes {start + 1}-{end + 1}/{len(blob)}"}
        elif fault == "corrupt":
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        elif fault and fault.startswith("corrupt-at:"):
            at = int(fault.partition(":")[2]) - start
            if 0 <= at < len(body):
                body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]

        if fault in ("reset", "short"):
            self._send_head(status, "application/octet-stream", headers, len(body))
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            return self._hang_up(reset=fault == "reset")
        if fault == "drip":
            self._send_head(status, "application/octet-stream", headers, len(body))
            for index in range(len(body)):
                if server.stopping.wait(0.05):
                    break
                try:
                    self.wfile.write(body[index : index + 1])
                    self.wfile.flush()
                except OSError:
                    break
            return self._hang_up(reset=False)
        return self._reply(status, body, "application/octet-stream", headers)

    # -- wire

    def _send_head(
        self, status: int, content_type: str, headers: dict[str, str], length: int | None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _reply(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain",
        headers: dict[str, str] | None = None,
        length: int | None = -1,
    ) -> None:
        try:
            self._send_head(
                status, content_type, headers or {}, len(body) if length == -1 else length
            )
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _hang_up(self, reset: bool) -> None:
        if reset:
            # Linger 0: close() sends RST instead of FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.connection.close()
        self.close_connection = True
        self.wfile = io.BytesIO()  # finish() flushes wfile; the socket is gone


def _split_v2(path: str) -> tuple[str, str, str]:
    for kind in ("manifests", "blobs"):
        marker = f"/{kind}/"
        if marker in path:
            head, _, reference = path.partition(marker)
            return head.removeprefix("/v2/"), kind, reference
    return "", "", ""


def _parse_range(header: str | None) -> tuple[int, int] | None:
    if not header or not header.startswith("bytes="):
        return None
    first, _, last = header.removeprefix("bytes=").partition("-")
    return int(first), int(last)
