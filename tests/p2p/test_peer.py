"""P2P peers on loopback: a root over the embedded registry, agents in a tree, failover."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from registries import push_blob, push_image

from workbench.errors import PeerError
from workbench.p2p.peer import Peer, Topology
from workbench.registry.server import EmbeddedRegistry

KiB, MiB = 1 << 10, 1 << 20
REPO = "tests/p2p"


def pattern(length: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, np.uint8).tobytes()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[EmbeddedRegistry]:
    with EmbeddedRegistry(tmp_path / "registry") as served:
        yield served


@contextlib.contextmanager
def peers(tmp_path: Path, registry: EmbeddedRegistry, agents: int, **kw) -> Iterator[list[Peer]]:
    """A root and `agents` agents that the root places (fan-out 2 unless given)."""
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(
            Peer("root", tmp_path / "root", registry=registry.url, fanout=kw.pop("fanout", 2))
        )
        made = [root]
        for number in range(agents):
            agent = Peer("agent", tmp_path / f"agent{number}", root=root.url, **kw)
            made.append(stack.enter_context(agent))
        yield made


def read(peer: Peer, digest: str, offset: int, length: int) -> bytes:
    url = f"{peer.url}/v2/{REPO}/blobs/{digest}"
    headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
    reply = httpx.get(url, headers=headers, timeout=30)
    assert reply.status_code == 206, reply.text
    return reply.content


def test_agents_serve_ranges_and_the_registry_serves_each_block_once(
    tmp_path: Path, registry: EmbeddedRegistry
) -> None:
    data = pattern(3 * MiB + 5, 1)
    digest = push_blob(registry.url, REPO, data)
    registry.served.clear()

    with peers(tmp_path, registry, agents=5) as (root, *agents):
        for agent in agents:
            for offset in (0, 300 * KiB, 3 * MiB - 10):
                assert read(agent, digest, offset, 4096) == data[offset : offset + 4096]
        stats = root.statistics()

    block = 256 * KiB
    blocks = [
        n
        for _d, start, end in registry.served.reads
        for n in range(start // block, -(-end // block))
    ]
    # blocks 0, 1, 11 and the 5-byte block 12 (the last read straddles 11 and 12), each once
    assert registry.served.total() == 3 * 256 * KiB + 5
    assert sorted(blocks) == [0, 1, 11, 12]
    trees = stats["topology"]["trees"][digest]
    assert sum(parent == root.url for parent in trees.values()) == 2  # fan-out 2
    assert len(trees) == 5


def test_a_whole_blob_and_a_head_and_a_manifest_pass_through_an_agent(
    tmp_path: Path, registry: EmbeddedRegistry
) -> None:
    layer = pattern(600 * KiB, 2)
    manifest_digest = push_image(registry.url, REPO, "v1", [layer])

    with (
        peers(tmp_path, registry, agents=1) as (_root, agent),
        httpx.Client(base_url=agent.url, timeout=30) as http,
    ):
        manifest = http.get(f"/v2/{REPO}/manifests/v1")
        assert manifest.status_code == 200
        assert manifest.headers["docker-content-digest"] == manifest_digest
        digest = manifest.json()["layers"][0]["digest"]
        assert http.head(f"/v2/{REPO}/blobs/{digest}").headers["content-length"] == str(len(layer))
        assert http.get(f"/v2/{REPO}/blobs/{digest}").content == layer
        missing = http.get(f"/v2/{REPO}/blobs/sha256:{'0' * 64}")
        assert missing.status_code == 404
        assert http.put(f"/v2/{REPO}/manifests/v2", content=b"{}").status_code == 405


def test_children_of_a_killed_parent_finish_through_a_new_parent(
    tmp_path: Path, registry: EmbeddedRegistry
) -> None:
    data = pattern(2 * MiB, 3)
    digest = push_blob(registry.url, REPO, data)

    with contextlib.ExitStack() as stack:
        root = stack.enter_context(Peer("root", tmp_path / "root", registry=registry.url))
        middle = Peer("agent", tmp_path / "middle", parent=root.url).start()
        stack.callback(middle.stop)
        leaf = stack.enter_context(Peer("agent", tmp_path / "leaf", parent=middle.url))
        assert leaf.root == root.url  # learned from its parent

        assert read(leaf, digest, 0, 4096) == data[:4096]
        assert leaf.statistics()["parents"][digest] == middle.url
        middle.stop()

        assert read(leaf, digest, MiB, 8192) == data[MiB : MiB + 8192]
        stats = leaf.statistics()
        assert stats["parents"][digest] == root.url
        assert stats["reselections"] == 1
        assert middle.url in root.statistics()["topology"]["dead"]


def test_the_topology_never_makes_a_peer_its_own_ancestor() -> None:
    topology = Topology("http://root", fanout=1)
    digest = "sha256:" + "a" * 64
    chain = [topology.parent(digest, f"http://p{n}") for n in range(4)]
    assert chain == ["http://root", "http://p0", "http://p1", "http://p2"]

    # p1 dies: p2 may not be placed under p3, its own child
    assert topology.parent(digest, "http://p2", failed="http://p1") in ("http://p0", "http://root")
    assert topology.parent(digest, "http://p2") != "http://p3"


def test_a_peer_without_an_upstream_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PeerError, match="needs a parent or a root"):
        Peer("agent", tmp_path / "a")
    with pytest.raises(PeerError, match="needs the registry"):
        Peer("root", tmp_path / "r")
    with pytest.raises(PeerError, match="needs advertise"):
        Peer("root", tmp_path / "r", registry="http://127.0.0.1:1", listen="0.0.0.0:0").start()
