"""mDNS discovery in one process: nodes on distinct loopback addresses find each other.

Each node listens on its own 127.a.b.N and runs mDNS on that address only
(several mDNS responders sharing 127.0.0.1 steal each other's replies). The
127.a.b prefix is random per test, so concurrent test runs on one machine do
not share addresses; their adverts may still be seen, and nodes of another
run are never members, so every assertion is about our own nodes. Every wait
is bounded; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable

import pytest
import trio

from daemon import cli
from daemon.config import ConfigError, NodeConfig, load_config
from daemon.discovery import (
    SERVICE_TYPE,
    TXT_UPDATE_MIN_SECONDS,
    Discovery,
    advertised_addresses,
    best_address,
    mdns_interfaces,
    run_discovery,
)
from node_helpers import context, start_node, wait_converged
from sync.messages import PROTOCOL_VERSIONS

BOUND = 20.0  # only keeps a broken discovery from hanging the suite


def loopback_prefix() -> str:
    return f"127.{random.randint(16, 250)}.{random.randint(0, 255)}."


class FakeNode:
    """What run_discovery uses of a Node, recording the peers it is handed."""

    def __init__(self, address: str, port: int = 9) -> None:
        self.node_id = secrets.token_hex(32)
        self.listen_address = (address, port)
        self._root = bytes(32)
        self._watchers: set[Callable[[], None]] = set()
        self.proposed: list[tuple[str, tuple[str, int]]] = []

    def root(self) -> bytes:
        return self._root

    def set_root(self, root: bytes) -> None:
        self._root = root
        for callback in list(self._watchers):
            callback()

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._watchers.add(callback)
        return lambda: self._watchers.discard(callback)

    def discovered(self, node_id: str, address: tuple[str, int], source: str = "mdns") -> None:
        self.proposed.append((node_id, address))


async def wait_for(predicate: Callable[[], object], message: Callable[[], str] | str = "condition not met",
                   bound: float = BOUND) -> None:
    with trio.move_on_after(bound):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"not within {bound} s: {message() if callable(message) else message}")


def connected_ids(node) -> set[str]:
    return {p["node_id"] for p in node.status()["peers"] if p["state"] == "connected"}


async def start_mdns_node(nursery: trio.Nursery, tmp_path, name: str, address: str, **overrides):
    return await start_node(nursery, tmp_path, name, listen=(address, 0), mdns=True,
                            mdns_interfaces=(address,), mdns_announce_seconds=1.0, **overrides)


# --------------------------------------------------------------------------
# nodes finding each other
# --------------------------------------------------------------------------


async def test_three_nodes_find_each_other_and_converge_after_a_push(tmp_path):
    prefix = loopback_prefix()
    async with trio.open_nursery() as nursery:
        nodes = [await start_mdns_node(nursery, tmp_path, f"n{i}", f"{prefix}{i}") for i in (1, 2, 3)]
        ids = {n.node_id for n in nodes}
        await wait_for(lambda: all(connected_ids(n) >= ids - {n.node_id} for n in nodes),
                       lambda: repr([n.status() for n in nodes]))
        for node in nodes:
            rows = [p for p in node.status()["peers"] if p["node_id"] in ids]
            assert all(p["source"] in ("mdns", "inbound") for p in rows), rows
        # Nobody was given a peer: each connection was dialled by a node that found the other.
        assert sum(p["source"] == "mdns" for n in nodes for p in n.status()["peers"] if p["node_id"] in ids) >= 3

        await nodes[1].add_contexts([context("found on loopback")])
        await wait_converged(nodes, bound=BOUND)
        assert all(len(n.index) == 1 for n in nodes)
        nursery.cancel_scope.cancel()


async def test_a_late_joiner_is_found_and_catches_up(tmp_path):
    prefix = loopback_prefix()
    async with trio.open_nursery() as nursery:
        a = await start_mdns_node(nursery, tmp_path, "a", f"{prefix}1")
        await a.add_contexts([context("before b came")])
        b = await start_mdns_node(nursery, tmp_path, "b", f"{prefix}2")
        await wait_for(lambda: b.node_id in connected_ids(a) and a.node_id in connected_ids(b))
        await wait_converged([a, b], bound=BOUND)
        assert len(b.index) == 1
        nursery.cancel_scope.cancel()


async def test_the_advert_carries_id_version_and_the_current_root(tmp_path):
    prefix = loopback_prefix()
    async with trio.open_nursery() as nursery:
        node = await start_mdns_node(nursery, tmp_path, "n", f"{prefix}1")
        observer = FakeNode(f"{prefix}9")
        handle: Discovery = await nursery.start(lambda task_status: run_discovery(
            observer, interfaces=(f"{prefix}9",), task_status=task_status))
        assert handle is not None

        def seen():
            return next((s for s in handle.services.values() if s.node_id == node.node_id), None)

        await wait_for(lambda: seen() is not None and seen().root == node.root().hex(), lambda: repr(handle.services))
        sighting = seen()
        assert sighting.txt["id"] == node.node_id
        assert sighting.txt["v"] == str(max(PROTOCOL_VERSIONS))
        assert (sighting.address, sighting.port) == node.listen_address
        # Proposed to the observer's node (after DIAL_GRACE_SECONDS if the observer's id is the larger).
        await wait_for(lambda: (node.node_id, node.listen_address) in observer.proposed, lambda: repr(observer.proposed))

        await node.add_contexts([context("a new root")])
        await wait_for(lambda: seen().root == node.root().hex(), lambda: repr(seen()))
        nursery.cancel_scope.cancel()


async def test_discovery_skips_itself_and_rate_limits_root_updates(tmp_path):
    prefix = loopback_prefix()
    async with trio.open_nursery() as nursery:
        me = FakeNode(f"{prefix}1")
        other = FakeNode(f"{prefix}2")
        mine: Discovery = await nursery.start(lambda task_status: run_discovery(
            me, interfaces=(f"{prefix}1",), task_status=task_status))
        theirs: Discovery = await nursery.start(lambda task_status: run_discovery(
            other, interfaces=(f"{prefix}2",), task_status=task_status))
        await wait_for(lambda: mine.seen_self and any(s.node_id == other.node_id for s in mine.services.values()))
        assert all(node_id != me.node_id for node_id, _ in me.proposed)
        assert all(s.node_id != me.node_id for s in mine.services.values())

        # Many root changes in a burst: the TXT follows, but not once per change.
        start = trio.current_time()
        for i in range(50):
            me.set_root(i.to_bytes(32, "big"))
            await trio.sleep(0.001)
        elapsed = trio.current_time() - start
        last = (49).to_bytes(32, "big").hex()

        def their_view():
            return next((s for s in theirs.services.values() if s.node_id == me.node_id), None)

        await wait_for(lambda: their_view() is not None and their_view().root == last, lambda: repr(their_view()))
        assert mine.updates <= 2 + elapsed / TXT_UPDATE_MIN_SECONDS
        assert mine.updates < 50
        nursery.cancel_scope.cancel()


async def test_a_stopped_node_says_goodbye(tmp_path):
    prefix = loopback_prefix()
    async with trio.open_nursery() as nursery:
        observer = FakeNode(f"{prefix}9")
        handle: Discovery = await nursery.start(lambda task_status: run_discovery(
            observer, interfaces=(f"{prefix}9",), task_status=task_status))
        leaver = FakeNode(f"{prefix}1")
        scope = trio.CancelScope()

        async def run_leaver(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await run_discovery(leaver, interfaces=(f"{prefix}1",), task_status=task_status)

        await nursery.start(run_leaver)
        await wait_for(lambda: any(s.node_id == leaver.node_id for s in handle.services.values()))
        scope.cancel()
        # Unregistering sends goodbyes: gone from the observer's table without waiting for TTLs.
        await wait_for(lambda: all(s.node_id != leaver.node_id for s in handle.services.values()),
                       lambda: repr(handle.services))
        nursery.cancel_scope.cancel()


async def test_a_node_whose_mdns_cannot_start_warns_once_and_keeps_its_static_peers(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="daemon.discovery")
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        # 198.51.100.0/24 is TEST-NET-2: no interface of this machine has it.
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address], mdns=True,
                             mdns_interfaces=("198.51.100.254",))
        await a.add_contexts([context("static peers still work")])
        await wait_converged([a, b], bound=BOUND)
        await wait_for(lambda: any("mDNS discovery off" in r.getMessage() for r in caplog.records))
        off = [r for r in caplog.records if "mDNS discovery off" in r.getMessage()]
        assert len(off) == 1 and off[0].levelno == logging.WARNING
        assert "198.51.100.254" in off[0].getMessage() and "static peers still work" in off[0].getMessage()
        nursery.cancel_scope.cancel()


async def test_run_discovery_reports_failure_through_task_status(tmp_path):
    node = FakeNode("198.51.100.254")
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(lambda task_status: run_discovery(node, task_status=task_status))
        assert handle is None
    assert not node._watchers  # nothing left behind


# --------------------------------------------------------------------------
# addresses, settings, command line
# --------------------------------------------------------------------------


def test_service_type():
    assert SERVICE_TYPE == "_ctxfs._tcp.local."


def test_where_mdns_runs_and_what_it_advertises():
    assert mdns_interfaces("10.0.0.5", ()) == (["10.0.0.5"], None)
    assert mdns_interfaces("0.0.0.0", ("10.0.0.5", "10.1.0.5")) == (["10.0.0.5", "10.1.0.5"], None)
    choice, version = mdns_interfaces("0.0.0.0", ())
    assert not isinstance(choice, list) and version is not None  # every IPv4 interface
    assert advertised_addresses("10.0.0.5", ("10.1.0.5",)) == ["10.0.0.5"]  # only the listen address accepts
    assert advertised_addresses("0.0.0.0", ("10.1.0.5",)) == ["10.1.0.5"]
    everything = advertised_addresses("0.0.0.0", ())
    assert everything and all(":" not in a for a in everything)


def test_best_address_prefers_our_own_network():
    import ipaddress

    ours = [ipaddress.ip_network("10.77.0.0/24")]
    assert best_address(["192.168.1.9", "10.77.0.3"], ours) == "10.77.0.3"
    assert best_address(["fe80::1%3", "192.168.1.9"], ours) == "192.168.1.9"
    assert best_address(["127.0.0.1", "fe80::1%3"], ours) == "fe80::1%3"
    assert best_address(["127.0.0.1"], [ipaddress.ip_network("127.0.0.0/8")]) == "127.0.0.1"
    assert best_address([], ours) is None


def test_mdns_interfaces_setting(tmp_path):
    assert NodeConfig().mdns_interfaces == ()
    config = load_config(tmp_path / "none.toml", {"mdns_interfaces": ["10.0.0.5", "10.1.0.5"]})
    assert config.mdns_interfaces == ("10.0.0.5", "10.1.0.5")
    path = tmp_path / "config.toml"
    path.write_text('mdns_interfaces = ["10.2.0.5"]\nmdns_announce_seconds = 3\n')
    config = load_config(path, {})
    assert config.mdns_interfaces == ("10.2.0.5",) and config.mdns_announce_seconds == 3
    with pytest.raises(ConfigError, match="mdns interface"):
        load_config(tmp_path / "none.toml", {"mdns_interfaces": ["eth0"]})
    path.write_text("mdns_announce_seconds = 0\n")
    with pytest.raises(ConfigError, match="mdns_announce_seconds"):
        load_config(path, {})


def test_daemon_takes_repeatable_mdns_interface():
    args = cli.build_parser().parse_args(
        ["daemon", "--mdns-interface", "10.0.0.5", "--mdns-interface", "10.1.0.5"])
    assert args.mdns_interface == ["10.0.0.5", "10.1.0.5"]
    assert cli.build_parser().parse_args(["daemon"]).mdns_interface is None
