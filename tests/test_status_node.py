"""The peer table a running node keeps for `ctxfs status`: who left, who is
gone, what can be forgotten, where inbound peers listen.

Real nodes on 127.0.0.1 in one process; every wait is bounded only so that
a broken node fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime as dt

import pytest
import trio

from daemon import peers as peers_module
from daemon import security, tls
from daemon.localapi import LocalApiError, LocalClient
from daemon.node import PeerInfo
from hostile_helpers import HostileMember
from node_helpers import context, make_home, start_node, wait_converged
from sync.errors import ErrorCode

BOUND = 30


async def until(predicate, bound: float = BOUND):
    """Poll `predicate` until it is truthy; its value."""
    with trio.fail_after(bound):
        while not (value := predicate()):
            await trio.sleep(0.01)
    return value


async def connected(*nodes) -> None:
    """Until every node has a session with every other (static peers dial
    in the background), then until they converge."""
    ids = {n.node_id for n in nodes}
    await until(lambda: all(ids - {n.node_id} <= set(n.sessions) for n in nodes))
    await wait_converged(list(nodes))


def row_of(node, node_id: str) -> dict | None:
    return next((p for p in node.status()["peers"] if p["node_id"] == node_id), None)


def dead_address() -> tuple[str, int]:
    """A loopback port nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()


def age(node, by: float) -> None:
    """Make every peer of `node` look absent for `by` seconds longer."""
    for info in node.peers.values():
        info.absent_since -= by


# --------------------------------------------------------------------------
# a peer that leaves on purpose
# --------------------------------------------------------------------------


async def test_a_peer_that_stops_shows_as_left_not_as_lost(tmp_path):
    """It says GOODBYE on the way out; the row said "connection lost" (the
    GOODBYE was never sent: a group of Cancelled slipped past the session)."""
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        async with trio.open_nursery() as b_nursery:
            b = await start_node(b_nursery, tmp_path, "b", peers=[a.listen_address])
            await connected(a, b)
            assert row_of(a, b.node_id)["goodbye"] is None
            b_nursery.cancel_scope.cancel()
        row = await until(lambda: (r := row_of(a, b.node_id)) and r["state"] != "connected" and r)
        assert row["goodbye"] == "node stopping"
        assert row["error"] is None and row["in_sync"] is False
        assert dt.datetime.fromisoformat(row["disconnected_at"]) <= dt.datetime.now(dt.timezone.utc)
        nursery.cancel_scope.cancel()


async def test_a_dialled_peer_that_left_keeps_saying_so_while_it_is_dialled_again(tmp_path):
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as a_nursery:
            a = await start_node(a_nursery, tmp_path, "a")
            listen = a.listen_address
            c = await start_node(nursery, tmp_path, "c", peers=[listen])
            await connected(a, c)
            a_nursery.cancel_scope.cancel()
        row = await until(lambda: (r := row_of(c, a.node_id)) and r["error"] and r)
        assert row["goodbye"] == "node stopping" and row["state"] != "connected"
        assert row["error"] == "cannot connect: connection refused"
        # Back on the same address: the goodbye is history.
        a = await start_node(nursery, tmp_path, "a", listen=listen)
        await connected(a, c)
        row = row_of(c, a.node_id)
        assert row["state"] == "connected" and row["goodbye"] is None and row["disconnected_at"] is None
        assert row["error"] is None
        nursery.cancel_scope.cancel()


async def test_a_connection_that_breaks_without_goodbye_is_not_a_leave(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        member = await HostileMember.connect(a.listen_address, tmp_path, "m", root=a.root())
        await until(lambda: a.sessions)
        await member.aclose()  # no GOODBYE
        row = await until(lambda: (r := a.status()["peers"][0]) and r["state"] != "connected" and r)
        assert row["goodbye"] is None and row["error"].startswith("connection")
        nursery.cancel_scope.cancel()


async def test_a_failed_dial_says_what_the_system_said(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a", peers=[dead_address()])
        row = await until(lambda: a.status()["peers"] and (r := a.status()["peers"][0])["error"] and r)
        assert row["error"] == "cannot connect: connection refused"  # was "cannot connect: OSError"
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# in sync means nothing is waiting to be announced
# --------------------------------------------------------------------------


async def test_a_context_stored_but_not_yet_in_the_root_is_not_in_sync(tmp_path):
    """While a reconciliation runs, new ids wait outside the root: the
    roots still match, but the peer lacks what was just stored."""
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        await connected(a, b)
        a.begin_reconcile()
        await a.add_contexts([context("just stored")])
        assert row_of(a, b.node_id)["root"] == a.root().hex()  # the roots agree...
        assert row_of(a, b.node_id)["in_sync"] is False  # ...and yet b lacks it
        a.end_reconcile()
        await wait_converged([a, b])
        assert len(b.index) == 1
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# peers gone for long are dropped
# --------------------------------------------------------------------------


async def test_peers_absent_for_longer_than_the_bound_leave_the_table(tmp_path):
    bound = peers_module.FORGET_ABSENT_PEERS_SECONDS
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a", peers=[dead_address()])
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        member = await HostileMember.connect(a.listen_address, tmp_path, "m", root=a.root())
        await until(lambda: len(a.sessions) == 2)
        await member.aclose()
        await until(lambda: len(a.sessions) == 1)
        advertised = dead_address()
        a.discovered("ee" * 32, advertised, "mdns")
        mdns_key = f"127.0.0.1:{advertised[1]}"
        await until(lambda: len(a.status()["peers"]) == 4)  # static, b, the member, the mDNS one
        age(a, bound - 60)
        assert len(a.status()["peers"]) == 4  # not yet
        age(a, 61)
        rows = a.status()["peers"]
        # The static peer is configuration and b is connected: both stay.
        assert sorted(r["source"] for r in rows) == ["inbound", "static"]
        assert row_of(a, b.node_id)["state"] == "connected"
        # The mDNS one is no longer dialled; discovery may propose it again.
        await until(lambda: mdns_key not in a._dialing and mdns_key not in a._diallers)
        a.discovered("ee" * 32, advertised, "mdns")
        await until(lambda: any(r["source"] == "mdns" for r in a.status()["peers"]))
        nursery.cancel_scope.cancel()


async def test_a_peer_is_absent_since_its_latest_session_whichever_row_held_it(tmp_path):
    """An old mDNS row of a peer that was connected inbound until now is not
    dropped when the inbound session ends."""
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        b_paths, b_id = make_home(tmp_path, "b")
        old = PeerInfo(address="127.0.0.1:9", source="mdns", node_id=b_id, state="disconnected")
        old.absent_since -= peers_module.FORGET_ABSENT_PEERS_SECONDS + 1
        a.peers["127.0.0.1:9"] = old
        fresh = PeerInfo(address="127.0.0.1:50000", source="inbound", node_id=b_id, state="disconnected")
        a.peers[f"inbound:{b_id}"] = fresh
        assert len(a.status()["peers"]) == 1
        assert len(a.peers) == 2
        fresh.absent_since -= peers_module.FORGET_ABSENT_PEERS_SECONDS + 1
        assert a.status()["peers"] == [] and a.peers == {}
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# peer forget
# --------------------------------------------------------------------------


async def test_forget_a_peer_that_left_by_id_prefix(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        async with trio.open_nursery() as b_nursery:
            b = await start_node(b_nursery, tmp_path, "b", peers=[a.listen_address])
            await connected(a, b)
            with pytest.raises(ValueError, match="is connected"):
                a.forget_peer(b.node_id[:12])
            assert row_of(a, b.node_id) is not None  # nothing dropped on a refusal
            b_nursery.cancel_scope.cancel()
        await until(lambda: not a.sessions)
        [forgotten] = a.forget_peer(b.node_id[:12].upper())
        assert forgotten["node_id"] == b.node_id and forgotten["address"].startswith("127.0.0.1:")
        assert a.status()["peers"] == []
        with pytest.raises(LookupError, match="no peer matches"):
            a.forget_peer(b.node_id[:12])
        nursery.cancel_scope.cancel()


async def test_forget_a_static_peer_by_address_stops_dialling_it(tmp_path):
    dead = dead_address()
    key = f"127.0.0.1:{dead[1]}"
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a", peers=[dead])
        await until(lambda: a.status()["peers"] and a.status()["peers"][0]["error"])
        assert a.forget_peer(key) == [{"node_id": None, "address": key}]
        await until(lambda: key not in a._dialing and key not in a._diallers)
        await trio.sleep(0.3)  # several backoff periods of the test config
        assert a.status()["peers"] == [] and a.peers == {}
        nursery.cancel_scope.cancel()


async def test_forget_matching_rules(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        one, two = "abcd0" + "0" * 59, "abcd1" + "1" * 59
        a.peers["x"] = PeerInfo(address="[::1]:7787", source="inbound", node_id=one, state="disconnected")
        a.peers["y"] = PeerInfo(address="10.0.0.9:50000", source="inbound", node_id=two, state="disconnected",
                                listen="10.0.0.9:7787")
        with pytest.raises(ValueError, match="2 peers have ids starting with abcd"):
            a.forget_peer("abcd")
        assert len(a.peers) == 2
        with pytest.raises(LookupError):
            a.forget_peer("abc")  # too short to be an id: an address, and none matches
        assert a.forget_peer("[::1]:7787") == [{"node_id": one, "address": "[::1]:7787"}]
        assert a.forget_peer(" 10.0.0.9:7787 ") == [{"node_id": two, "address": "10.0.0.9:50000"}]  # its listen
        assert a.peers == {}
        nursery.cancel_scope.cancel()


async def test_forget_through_the_local_api(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        await connected(a, b)
        a.peers["gone"] = PeerInfo(address="10.0.0.9:7787", source="mdns", node_id="ef" * 32, state="disconnected")
        async with LocalClient.connect(a.paths) as client:
            assert await client.peer_forget("efefefef") == [{"node_id": "ef" * 32, "address": "10.0.0.9:7787"}]
            with pytest.raises(LocalApiError) as missing:
                await client.peer_forget("efefefef")
            assert missing.value.code is ErrorCode.NOT_FOUND and "no peer matches" in missing.value.message
            with pytest.raises(LocalApiError) as refused:
                await client.peer_forget(b.node_id)
            assert refused.value.code is ErrorCode.BAD_REQUEST and "is connected" in refused.value.message
            assert row_of(a, b.node_id)["state"] == "connected"
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# where an inbound peer listens
# --------------------------------------------------------------------------


async def test_an_inbound_peer_shows_the_address_it_listens_on(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        await connected(a, b)
        row = row_of(a, b.node_id)
        assert row["source"] == "inbound"
        assert row["listen"] == f"127.0.0.1:{b.listen_address[1]}"
        assert row["address"] != row["listen"]  # where the connection came from
        # The dialler's row for a: the address it dials.
        assert row_of(b, a.node_id)["listen"] == row_of(b, a.node_id)["address"] == f"127.0.0.1:{a.listen_address[1]}"
        nursery.cancel_scope.cancel()


class _Certified:
    """What peer_listen_address reads of a TLS stream: the peer's certificate."""

    def __init__(self, pem: bytes | None) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        self.der = None if pem is None else x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self.der


@pytest.mark.parametrize(
    ("listen", "shown"),
    [("10.0.0.5:7787", "10.0.0.5:7787"), ("0.0.0.0:7787", "192.168.1.20:7787"), ("[::]:7787", "192.168.1.20:7787"),
     ("[fd00::5]:7000", "[fd00::5]:7000"), (None, None), ("10.0.0.5:0", None), ("10.0.0.5:x", None)],
)
def test_the_listen_address_in_a_certificate(listen, shown):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = security.new_cluster_key()
    pem = security.issue_node_cert(key, Ed25519PrivateKey.generate(), listen=listen)
    assert tls.peer_listen_address(_Certified(pem), "192.168.1.20") == shown
    assert tls.peer_listen_address(_Certified(None), "192.168.1.20") is None
