"""The peer table a running node keeps for `ctxfs status`: who left, and why.

Real nodes on 127.0.0.1 in one process; every wait is bounded only so that
a broken node fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime as dt

import trio

from hostile_helpers import HostileMember
from node_helpers import context, start_node, wait_converged

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
        assert row["error"] == "cannot connect: Connection refused"
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
        assert row["error"] == "cannot connect: Connection refused"  # was "cannot connect: OSError"
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
