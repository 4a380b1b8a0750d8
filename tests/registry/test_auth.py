"""Credentials files, challenge parsing, token answers and the token cache."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from workbench.errors import AuthenticationError
from workbench.registry.auth import (
    Credentials,
    TokenCache,
    basic_header,
    parse_challenge,
    parse_token_response,
)


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_docker_config_auth_and_username_forms(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": _auth("hub", "h:pw")},
                    "reg.example:5000": {"username": "u", "password": "p"},
                    "other.example/team": {"auth": _auth("team", "t")},
                    "empty.example": {},
                }
            }
        )
    )
    credentials = Credentials.from_file(path)
    assert credentials.lookup("registry-1.docker.io", "library/busybox") == ("hub", "h:pw")
    assert credentials.lookup("reg.example:5000", "a/b") == ("u", "p")
    assert credentials.lookup("other.example", "team/app") == ("team", "t")
    assert credentials.lookup("other.example", "solo/app") is None
    assert credentials.lookup("empty.example", "a") is None


def test_first_matching_member_wins_as_overlaybd() -> None:
    credentials = Credentials.from_mapping(
        {
            "auths": {
                "reg.example/ns/repo": {"username": "repo", "password": "1"},
                "reg.example": {"username": "host", "password": "2"},
            }
        }
    )
    assert credentials.lookup("reg.example", "ns/repo") == ("repo", "1")
    assert credentials.lookup("reg.example", "ns/other") == ("host", "2")


def test_bad_credentials_files_are_named(tmp_path: Path) -> None:
    broken = tmp_path / "cred.json"
    broken.write_text("{not json")
    with pytest.raises(AuthenticationError, match=r"cred.json: cannot be read as JSON"):
        Credentials.from_file(broken)
    with pytest.raises(AuthenticationError, match="not base64"):
        Credentials.from_mapping({"auths": {"h": {"auth": "!!!"}}})
    with pytest.raises(AuthenticationError, match="without a ':'"):
        Credentials.from_mapping({"auths": {"h": {"auth": base64.b64encode(b"nocolon").decode()}}})
    with pytest.raises(AuthenticationError, match="'auths' must be an object"):
        Credentials.from_mapping({"auths": []})


def test_parse_bearer_and_basic_challenges() -> None:
    challenge = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.example/token"
    assert challenge.params["scope"] == "repository:a/b:pull,push"
    assert parse_challenge('Basic realm="x"').scheme == "basic"


def test_token_response_forms() -> None:
    assert parse_token_response(b'{"token": "t", "expires_in": 120}', "r") == ("t", 120.0)
    assert parse_token_response(b'{"access_token": "a"}', "r") == ("a", 60.0)
    with pytest.raises(AuthenticationError, match="neither 'token' nor 'access_token'"):
        parse_token_response(b"{}", "https://auth.example/token")
    with pytest.raises(AuthenticationError, match="not a JSON object"):
        parse_token_response(b"<html>", "r")


def test_token_cache_expires_with_margin() -> None:
    cache = TokenCache()
    key = ("realm", "svc", "repository:a:pull")
    cache.put(key, "tok", 60.0, now=100.0)
    assert cache.get(key, 150.0) == "tok"
    assert cache.get(key, 156.0) is None
    cache.put(key, "short", 1.0, now=0.0)
    assert cache.get(key, 0.5) == "short"
    cache.drop(key)
    assert cache.get(key, 0.5) is None


def test_basic_header() -> None:
    assert basic_header("u", "p") == "Basic " + _auth("u", "p")
