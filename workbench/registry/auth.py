"""Registry authentication: credential files, Basic, and the Bearer token flow.

Credentials file. Docker's `config.json` and OverlayBD's `cred.json` share one shape:

    {"auths": {"<key>": {"auth": base64("user:password")} | {"username": u, "password": p}}}

A key is matched against the prefixes of the blob's location, `host`, `host/namespace` and
`host/namespace/repo` (formats spec 4.2): the first member of "auths", in file order, that
equals one of them wins. Keys may carry a scheme and a trailing "/" or "/v1/" (Docker writes
`https://index.docker.io/v1/` for the Hub); those are dropped before comparing, and the Hub's
keys (index.docker.io, docker.io) also match registry-1.docker.io.

Challenges. A 401 carries `WWW-Authenticate`. `Basic realm=...` means: send the file's
credentials as Basic. `Bearer realm="...",service="...",scope="..."` means: GET the token
endpoint `realm?service=..&scope=..` (with Basic credentials if the file has some), read
`token` or `access_token` from the JSON answer, and send `Authorization: Bearer <token>`.
Tokens are cached per (realm, service, scope) until `expires_in` (default 60 s, as the token
spec says) minus a safety margin; the client drops a token the registry refuses and fetches a
new one once per call.

Caveats:
- `identitytoken` / refresh-token (OAuth2 POST) logins and credential helpers
  (`credsStore`, `credHelpers`) are not supported; only static "auths" entries;
- OverlayBD's http/https/uds credential services are not implemented.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import AuthenticationError

__all__ = [
    "Challenge",
    "Credentials",
    "TokenCache",
    "basic_header",
    "parse_challenge",
    "parse_token_response",
]

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME_S = 60.0
"""Lifetime assumed when a token endpoint gives no `expires_in` (distribution token spec)."""

TOKEN_MARGIN_S = 5.0
"""A token is dropped this long before it expires, so no request in flight carries a stale one."""

_HUB_KEYS = ("index.docker.io", "docker.io", "registry-1.docker.io")
_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@dataclass(frozen=True)
class Credentials:
    """A credentials file's "auths" entries, in file order: key -> (username, password)."""

    entries: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def from_file(cls, path: str | Path) -> Credentials:
        """Read a docker config.json or OverlayBD cred.json."""
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise AuthenticationError(
                f"credentials file {path}: cannot be read as JSON ({exc}); "
                'expected {"auths": {"host": {"auth": "base64(user:password)"}}}'
            ) from exc
        return cls.from_mapping(document, source=str(path))

    @classmethod
    def from_mapping(cls, document: Mapping[str, object], source: str = "<mapping>") -> Credentials:
        """Build from a parsed config; entries without usable credentials are skipped."""
        auths = document.get("auths", {}) if isinstance(document, Mapping) else None
        if not isinstance(auths, Mapping):
            raise AuthenticationError(f"credentials file {source}: 'auths' must be an object")

        entries = []
        for key, entry in auths.items():
            pair = _entry_credentials(entry, key, source)
            if pair is not None:
                entries.append((_normalize_key(key), *pair))
        return cls(tuple(entries))

    def lookup(self, host: str, repository: str) -> tuple[str, str] | None:
        """The (username, password) for `host/repository`, or None; first matching key wins."""
        prefixes = {host}
        parts = repository.split("/")
        for count in range(1, len(parts) + 1):
            prefixes.add(f"{host}/{'/'.join(parts[:count])}")

        for key, username, password in self.entries:
            if key in prefixes or (host in _HUB_KEYS and key in _HUB_KEYS):
                return username, password
        return None


@dataclass(frozen=True)
class Challenge:
    """A parsed `WWW-Authenticate` header: scheme ("basic"/"bearer") and its parameters."""

    scheme: str
    params: Mapping[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def parse_challenge(header: str) -> Challenge:
    """Parse the first challenge of a `WWW-Authenticate` header."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for match in _PARAM.finditer(rest):
        value = match.group(2) if match.group(2) is not None else match.group(3)
        params[match.group(1).lower()] = value.replace('\\"', '"')
    return Challenge(scheme.lower(), params)


def basic_header(username: str, password: str) -> str:
    """`Basic base64(user:password)`."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def parse_token_response(body: bytes, realm: str) -> tuple[str, float]:
    """(token, lifetime in seconds) from a token endpoint's JSON answer."""
    try:
        document = json.loads(body)
        token = document.get("token") or document.get("access_token")
        lifetime = float(document.get("expires_in") or DEFAULT_TOKEN_LIFETIME_S)
    except (ValueError, AttributeError, TypeError) as exc:
        raise AuthenticationError(
            f"token endpoint {realm}: answer is not a JSON object with a token ({exc})"
        ) from exc
    if not isinstance(token, str) or not token:
        raise AuthenticationError(
            f"token endpoint {realm}: answer has neither 'token' nor 'access_token'"
        )
    return token, lifetime


class TokenCache:
    """Bearer tokens by (realm, service, scope), each with the clock time it expires at.

    The clock is passed in (trio.current_time() in the client) so tests can drive it.
    """

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}

    def get(self, key: tuple[str, str, str], now: float) -> str | None:
        found = self._tokens.get(key)
        if found is None or found[1] <= now:
            return None
        return found[0]

    def put(self, key: tuple[str, str, str], token: str, lifetime_s: float, now: float) -> None:
        # Never cache for less than a few seconds: a registry saying expires_in=1 would
        # otherwise make every request fetch a token.
        keep = max(lifetime_s - TOKEN_MARGIN_S, min(lifetime_s, TOKEN_MARGIN_S))
        self._tokens[key] = (token, now + keep)

    def drop(self, key: tuple[str, str, str]) -> None:
        self._tokens.pop(key, None)


def _normalize_key(key: str) -> str:
    key = re.sub(r"^[a-z]+://", "", key.strip())
    key = key.removesuffix("/")
    return key.removesuffix("/v1").removesuffix("/v2")


def _entry_credentials(entry: object, key: str, source: str) -> tuple[str, str] | None:
    if not isinstance(entry, Mapping):
        return None
    if entry.get("username"):
        return str(entry["username"]), str(entry.get("password", ""))
    encoded = entry.get("auth")
    if not encoded:
        return None
    try:
        decoded = base64.b64decode(str(encoded), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise AuthenticationError(
            f"credentials file {source}: 'auth' of {key!r} is not base64 of 'user:password' ({exc})"
        ) from exc
    username, colon, password = decoded.partition(":")
    if not colon:
        raise AuthenticationError(
            f"credentials file {source}: 'auth' of {key!r} decodes without a ':' between "
            "user and password"
        )
    return username, password
