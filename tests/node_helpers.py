"""Start real nodes (real sockets on 127.0.0.1, real SQLite) inside a test."""

from __future__ import annotations

import io
import random
from datetime import datetime, timezone
from pathlib import Path

import trio

from daemon import cli, security
from daemon.config import NodeConfig
from daemon.node import Node
from daemon.paths import HomePaths
from sync import T_STRING, CompressedContext, MemoryAtom

WHEN = datetime(2026, 11, 24, 10, tzinfo=timezone.utc)


def make_home(root: Path, name: str, cluster_key: Path | None = None) -> tuple[HomePaths, str]:
    """A node home in the cluster whose key is `cluster_key` (default: one
    shared by every node made under `root`)."""
    if cluster_key is None:
        cluster_key = root / "cluster.key"
        if not cluster_key.exists():
            security.write_cluster_key(cluster_key, security.new_cluster_key())
    home = root / name
    assert cli.main(["--home", str(home), "init", "--cluster-key-file", str(cluster_key)], out=io.StringIO()) == 0
    return HomePaths(home), security.node_id(security.read_node_key(home / "node.key"))


def fast_config(peers=(), **overrides) -> NodeConfig:
    settings = dict(
        listen=("127.0.0.1", 0), peers=tuple(peers), mdns=False,
        anti_entropy_seconds=2.0, reconnect_min_seconds=0.05, reconnect_max_seconds=0.5,
    )
    settings.update(overrides)
    return NodeConfig(**settings)


async def start_node(nursery: trio.Nursery, root: Path, name: str, peers=(), cluster_key: Path | None = None,
                     node_class: type[Node] = Node, **overrides) -> Node:
    paths, node_id = make_home(root, name, cluster_key)
    node = node_class(paths=paths, config=fast_config(peers, **overrides), node_id=node_id)
    await nursery.start(node.run)
    return node


def context(text: str, base: str | None = None, relevance: float = 0.5) -> CompressedContext:
    return CompressedContext(base, [MemoryAtom(text, T_STRING, WHEN, "test", relevance)])


async def wait_converged(nodes: list[Node], *, bound: float = 60, poll: float = 0.02) -> None:
    """Until every node holds the same root and says it is in sync with every connected peer.

    `bound` only keeps a broken sync from hanging the suite; on expiry the
    statuses are in the failure message.
    """
    with trio.move_on_after(bound):
        while True:
            roots = {n.root() for n in nodes}
            if len(roots) == 1 and all(
                p["in_sync"] for n in nodes for p in n.status()["peers"] if p["state"] == "connected"
            ):
                return
            await trio.sleep(poll)
    raise AssertionError("no convergence: " + repr([n.status() for n in nodes]))


async def random_writes(nodes: list[Node], count: int, rng: random.Random) -> list[str]:
    """Write `count` contexts on random nodes, building chains on local heads."""
    ids = []
    for i in range(count):
        node = rng.choice(nodes)
        heads = await node.run_sync(node.store.heads)
        base = rng.choice(heads) if heads and rng.random() < 0.7 else None
        ids += await node.add_contexts([context(f"write {i} on {node.node_id[:6]}", base, rng.random())])
    return ids
