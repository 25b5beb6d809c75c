"""Protocol version 2: objects move on request, each one once per node.

Real nodes on loopback sockets (tests/node_helpers.py). What is counted is
what holders sent a node (their ACKed ids), so a copy sent twice shows.
"""

from __future__ import annotations

import collections

import attrs
import trio

from daemon.node import SYNC_TURN_WAIT, Node
from daemon.peer import PeerSession
from node_helpers import context, start_node, wait_converged

COUNT = 120


def _sent_to(holders: list[Node], node_id: str) -> int:
    return sum(p["objects_sent"] for h in holders for p in h.status()["peers"] if p["node_id"] == node_id)


async def _acked(holders: list[Node], node_id: str, count: int) -> int:
    """What the holders sent the node, once `count` are ACKed: the last ACKs
    may trail the roots meeting (a copy sent twice still shows as more)."""
    with trio.move_on_after(10):
        while _sent_to(holders, node_id) < count:
            await trio.sleep(0.01)
    return _sent_to(holders, node_id)


async def _holders(nursery, tmp_path, names, count=COUNT, **overrides) -> tuple[list[Node], list[str]]:
    first = await start_node(nursery, tmp_path, names[0], **overrides)
    rest = [await start_node(nursery, tmp_path, name, peers=[first.listen_address], **overrides) for name in names[1:]]
    ids = await first.add_contexts([context(f"held {i}") for i in range(count)])
    await wait_converged([first, *rest])
    return [first, *rest], ids


async def test_a_node_takes_each_object_once_however_many_neighbours_hold_it(tmp_path):
    async with trio.open_nursery() as nursery:
        holders, ids = await _holders(nursery, tmp_path, ["h1", "h2", "h3"])
        newcomer = await start_node(nursery, tmp_path, "new", peers=[h.listen_address for h in holders])
        await wait_converged([*holders, newcomer])
        assert all(s.pull for s in newcomer.sessions.values()) and len(newcomer.sessions) == 3
        assert await newcomer.run_sync(lambda: sorted(newcomer.store.ids())) == sorted(ids)
        # Version 1 would have each holder push all of them: up to 3 × COUNT.
        assert await _acked(holders, newcomer.node_id, COUNT) == COUNT
        assert newcomer.fetches.owed() == 0
        nursery.cancel_scope.cancel()


async def test_a_write_fans_out_with_each_node_taking_it_once(tmp_path):
    async with trio.open_nursery() as nursery:
        # A full mesh of four: every node hears the new root from several.
        nodes = [await start_node(nursery, tmp_path, "m0")]
        for i in range(1, 4):
            nodes.append(await start_node(nursery, tmp_path, f"m{i}", peers=[n.listen_address for n in nodes]))
        await wait_converged(nodes)
        await nodes[0].add_contexts([context(f"fan {i}") for i in range(COUNT)])
        await wait_converged(nodes)
        for node in nodes[1:]:
            assert await _acked(nodes, node.node_id, COUNT) == COUNT
        nursery.cancel_scope.cancel()


class _Version1Node(Node):
    """A node of an older release: it speaks protocol version 1 only."""

    def hello(self):
        return attrs.evolve(super().hello(), versions=(1,))


async def test_a_version_1_peer_still_gets_and_gives_everything(tmp_path):
    async with trio.open_nursery() as nursery:
        new = await start_node(nursery, tmp_path, "v2")
        old = await start_node(nursery, tmp_path, "v1", peers=[new.listen_address], node_class=_Version1Node)
        [from_new] = await new.add_contexts([context("written on the new node")])
        [from_old] = await old.add_contexts([context("written on the old node")])
        await wait_converged([new, old])
        assert not new.sessions[old.node_id].pull and not old.sessions[new.node_id].pull
        for node in (new, old):
            assert await node.run_sync(lambda n=node: set(n.store.ids())) == {from_new, from_old}
        nursery.cancel_scope.cancel()


async def test_what_a_lost_session_owed_is_asked_of_another(tmp_path, monkeypatch):
    async with trio.open_nursery() as nursery:
        holders, ids = await _holders(nursery, tmp_path, ["h1", "h2"])
        mute = holders[0]
        answer = PeerSession._on_want
        # h1 takes requests and never answers them.
        monkeypatch.setattr(PeerSession, "_on_want", lambda self, m: None if self.node is mute else answer(self, m))
        newcomer = await start_node(nursery, tmp_path, "new", peers=[mute.listen_address])
        with trio.fail_after(30):
            while newcomer.fetches.owed() < COUNT:
                await trio.sleep(0.01)
        # Another holder appears: what is on its way (as far as we know) is
        # not asked of it...
        nursery.start_soon(newcomer._dial_forever, holders[1].listen_address, "static")
        with trio.fail_after(30):
            while holders[1].node_id not in newcomer.sessions:
                await trio.sleep(0.01)
        await trio.sleep(SYNC_TURN_WAIT + 0.5)  # its turn to reconcile has come
        while newcomer._initiating:
            await trio.sleep(0.01)
        assert newcomer.fetches.owed() == COUNT and len(newcomer.index) == 0
        # ...until the session it was asked of ends: then it is.
        await trio.aclose_forcefully(newcomer.sessions[mute.node_id].stream)
        with trio.fail_after(30):
            while len(newcomer.index) < COUNT:
                await trio.sleep(0.01)
        assert await newcomer.run_sync(lambda: sorted(newcomer.store.ids())) == sorted(ids)
        assert newcomer.fetches.owed() == 0
        nursery.cancel_scope.cancel()


def _count_initiations(monkeypatch) -> collections.Counter[str]:
    """Reconciliations each node starts from now on, by node id."""
    started: collections.Counter[str] = collections.Counter()
    initiate = PeerSession._initiate

    async def counted(self):
        started[self.node.node_id] += 1
        await initiate(self)

    monkeypatch.setattr(PeerSession, "_initiate", counted)
    return started


async def test_a_holder_does_not_reconcile_on_every_root_of_a_peer_taking_its_request(tmp_path, monkeypatch):
    # Small messages: the request arrives as many commits, each a new root
    # the taker announces. Those roots tell the holder nothing it needs to
    # reconcile for; the taker asks for anything else itself.
    import daemon.transfer

    monkeypatch.setattr(daemon.transfer, "MAX_OBJECTS_PER_MESSAGE", 50)
    started = _count_initiations(monkeypatch)
    async with trio.open_nursery() as nursery:
        holder = await start_node(nursery, tmp_path, "holder")
        await holder.add_contexts([context(f"bulk {i}") for i in range(1000)])
        taker = await start_node(nursery, tmp_path, "taker", peers=[holder.listen_address])
        await wait_converged([holder, taker])
        assert taker.status()["peers"][0]["objects_received"] == 1000
        # One when they met (the roots differed), at most one once the push
        # drained: not one per stored message (20 of them).
        assert started[holder.node_id] <= 2
        nursery.cancel_scope.cancel()


async def test_peers_that_meet_reconcile_once_and_both_take_what_they_lack(tmp_path, monkeypatch):
    started = _count_initiations(monkeypatch)
    async with trio.open_nursery() as nursery:
        listener = await start_node(nursery, tmp_path, "listener")
        dialer_home_only = await start_node(nursery, tmp_path, "dialer")
        await listener.add_contexts([context(f"listener's {i}") for i in range(30)])
        await dialer_home_only.add_contexts([context(f"dialer's {i}") for i in range(20)])
        nursery.start_soon(dialer_home_only._dial_forever, listener.listen_address, "static")
        await wait_converged([listener, dialer_home_only])
        for node in (listener, dialer_home_only):
            assert len(node.index) == 50
        # The dialer's reconciliation served both: each asked for its part.
        assert started == {dialer_home_only.node_id: 1}
        nursery.cancel_scope.cancel()


async def _slow_first_commit(monkeypatch, node: Node, calls: list[int], poison: set[str] = frozenset()):
    """The node's first received commit takes a while (so the rest of the
    push queues up behind it); a commit with a poisoned blob is refused."""
    from sync.codec import bytes_id
    from sync.store import StoreError

    add = node.add_received

    async def slow(batches, checked=None):
        blobs = [blob for batch in batches for blob in batch]
        calls.append(len(blobs))
        if len(calls) == 1:
            await trio.sleep(0.5)
        if poison & {bytes_id(b) for b in blobs}:
            raise StoreError("poisoned")
        return await add(batches, checked)

    monkeypatch.setattr(node, "add_received", slow)


async def _bulk_behind_a_slow_commit(nursery, tmp_path, monkeypatch) -> list[int]:
    """1,000 contexts in 50-object messages to a taker whose first commit
    is slow, until both agree; the objects of each of its commits."""
    import daemon.transfer

    monkeypatch.setattr(daemon.transfer, "MAX_OBJECTS_PER_MESSAGE", 50)
    holder = await start_node(nursery, tmp_path, "holder")
    ids = await holder.add_contexts([context(f"bulk {i}") for i in range(1000)])
    taker = await start_node(nursery, tmp_path, "taker")
    calls: list[int] = []
    await _slow_first_commit(monkeypatch, taker, calls)
    nursery.start_soon(taker._dial_forever, holder.listen_address, "static")
    await wait_converged([holder, taker])
    assert await taker.run_sync(lambda: sorted(taker.store.ids())) == sorted(ids)
    assert sum(calls) == 1000 and await _acked([holder], taker.node_id, 1000) == 1000  # every message ACKed
    return calls


async def test_messages_that_queue_behind_a_commit_are_committed_together(tmp_path, monkeypatch):
    async with trio.open_nursery() as nursery:
        calls = await _bulk_behind_a_slow_commit(nursery, tmp_path, monkeypatch)
        assert len(calls) < 20  # 20 messages, fewer commits
        nursery.cancel_scope.cancel()


async def test_a_joint_commit_takes_at_most_commit_max_objects(tmp_path, monkeypatch):
    import daemon.transfer

    monkeypatch.setattr(daemon.transfer, "COMMIT_MAX_OBJECTS", 120)
    async with trio.open_nursery() as nursery:
        calls = await _bulk_behind_a_slow_commit(nursery, tmp_path, monkeypatch)
        # Everything queued behind the slow first commit, yet no later
        # commit took more than two 50-object messages (120 would not fit a third).
        assert max(calls) == 100 and len(calls) >= 10
        nursery.cancel_scope.cancel()


async def test_a_refused_message_in_a_joint_commit_costs_only_itself(tmp_path, monkeypatch):
    import daemon.transfer

    monkeypatch.setattr(daemon.transfer, "MAX_OBJECTS_PER_MESSAGE", 50)
    async with trio.open_nursery() as nursery:
        holder = await start_node(nursery, tmp_path, "holder")
        await holder.add_contexts([context(f"bulk {i}") for i in range(500)])
        order = [cid for cid, _ in await holder.run_sync(holder.store.send_order, list(holder.store.ids()))]
        poisoned = set(order[250:300])  # the sixth message of the push
        taker = await start_node(nursery, tmp_path, "taker")
        calls: list[int] = []
        await _slow_first_commit(monkeypatch, taker, calls, poison={order[260]})
        nursery.start_soon(taker._dial_forever, holder.listen_address, "static")
        with trio.fail_after(30):
            while len(taker.index) < 450:
                await trio.sleep(0.01)
        held = set(await taker.run_sync(lambda: list(taker.store.ids())))
        assert held == set(order) - poisoned
        assert any(n > 50 for n in calls)  # it was tried jointly first
        nursery.cancel_scope.cancel()


async def test_a_peer_that_never_brings_what_was_asked_loses_the_request(tmp_path, monkeypatch):
    import daemon.fetches
    import daemon.transfer

    # Longer than the sync turn's wait: the second holder's session has
    # reconciled (finding everything claimed) before the claims stall.
    stall = SYNC_TURN_WAIT + 1.0
    monkeypatch.setattr(daemon.fetches, "FETCH_STALL_SECONDS", stall)
    monkeypatch.setattr(daemon.transfer, "FETCH_STALL_SECONDS", stall)
    async with trio.open_nursery() as nursery:
        # No anti-entropy to fall back on: only the stall watch can move the request.
        holders, ids = await _holders(nursery, tmp_path, ["h1", "h2"], anti_entropy_seconds=3600)
        mute = holders[0]
        answer = PeerSession._on_want
        monkeypatch.setattr(PeerSession, "_on_want", lambda self, m: None if self.node is mute else answer(self, m))
        newcomer = await start_node(nursery, tmp_path, "new", peers=[mute.listen_address], anti_entropy_seconds=3600)
        with trio.fail_after(30):
            while newcomer.fetches.owed() < COUNT:
                await trio.sleep(0.01)
        nursery.start_soon(newcomer._dial_forever, holders[1].listen_address, "static")
        with trio.fail_after(30):
            while len(newcomer.index) < COUNT:
                await trio.sleep(0.01)
        assert mute.node_id in newcomer.sessions  # it was not the session ending that did it
        assert await newcomer.run_sync(lambda: sorted(newcomer.store.ids())) == sorted(ids)
        nursery.cancel_scope.cancel()


async def test_ids_stored_while_more_are_on_the_way_enter_the_root_together(tmp_path, monkeypatch):
    """A bulk fetch merges into the id set once, not once per commit; what
    never comes holds the rest up for MAX_INDEX_DELAY at most."""
    import daemon.node
    from sync.codec import encode_context

    monkeypatch.setattr(daemon.node, "MAX_INDEX_DELAY", 1.0)
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, tmp_path, "taker")
        contexts = [context(f"asked for {i}") for i in range(5)]
        ids = [bytes.fromhex(c.id) for c in contexts]
        node.fetches.claim("a session", ids[:4], trio.current_time())
        empty = node.root()
        await node.add_encoded([encode_context(c) for c in contexts[:2]])
        assert all(node.holds(i) for i in ids[:2]) and node.status()["objects"] == 2
        assert node.root() == empty and len(node.index) == 0  # two more on the way
        await node.add_encoded([encode_context(c) for c in contexts[2:4]])
        assert len(node.index) == 4  # the last of them: all in at once
        four = node.root()
        node.fetches.claim("a session", [bytes.fromhex(context("never comes").id)], trio.current_time())
        await node.add_encoded([encode_context(contexts[4])])  # one still owed: it waits...
        assert len(node.index) == 4 and node.holds(ids[4]) and node.status()["objects"] == 5
        with trio.fail_after(5):  # ...until the bound runs out (Node._apply_stale_ids)
            while len(node.index) < 5:
                await trio.sleep(0.05)
        assert node.root() not in (empty, four)
        nursery.cancel_scope.cancel()


async def test_a_holder_hands_free_heap_back_once_a_bulk_push_is_acked(tmp_path, monkeypatch):
    import daemon.heap
    import daemon.indexer
    import daemon.transfer

    monkeypatch.setattr(daemon.transfer, "BULK_PUSH_OBJECTS", 100)
    monkeypatch.setattr(daemon.indexer, "QUIET_SECONDS", 600.0)  # only pushes trim here
    trims: list[int] = []
    monkeypatch.setattr(daemon.heap, "trim", lambda: trims.append(1) or True)  # in a worker thread
    async with trio.open_nursery() as nursery:
        holder = await start_node(nursery, tmp_path, "holder")
        await holder.add_contexts([context(f"bulk {i}") for i in range(99)])
        small = await start_node(nursery, tmp_path, "small", peers=[holder.listen_address])
        await wait_converged([holder, small])
        await trio.sleep(0.2)
        assert trims == []  # 99 objects: not a bulk push
        await holder.add_contexts([context(f"more {i}") for i in range(150)])
        big = await start_node(nursery, tmp_path, "big", peers=[holder.listen_address])
        await wait_converged([holder, small, big])
        with trio.fail_after(5):
            while not trims:  # the holder's push of 249 to `big`, all ACKed
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


class _SmallWindowNode(Node):
    """A node that grants peers a 128 KiB stream window: a holder's
    messages to it carry at most 64 KiB of objects."""

    def hello(self):
        return attrs.evolve(super().hello(), stream_window=128 * 1024)


async def test_a_context_the_peers_window_cannot_take_is_skipped_and_the_rest_arrive(tmp_path):
    async with trio.open_nursery() as nursery:
        holder = await start_node(nursery, tmp_path, "holder")
        big, *small = await holder.add_contexts([context("x" * 100_000), *(context(f"small {i}") for i in range(5))])
        node = await start_node(nursery, tmp_path, "narrow", peers=[holder.listen_address], node_class=_SmallWindowNode)
        with trio.fail_after(30):
            while not all(node.holds(bytes.fromhex(i)) for i in small):
                await trio.sleep(0.02)
            while not holder.sessions or not next(iter(holder.sessions.values())).info.error:
                await trio.sleep(0.02)
        assert not node.holds(bytes.fromhex(big))
        (session,) = holder.sessions.values()
        assert "window is too small" in session.info.error
        # The skipped context is no longer waited on: no ACK for it ever comes.
        with trio.fail_after(10):
            while session._unacked or session._pushing:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


def test_the_holders_hex_view_of_a_request_holds_exactly_its_ids():
    from daemon.transfer import _HexIds

    ids = {bytes([k]) * 32 for k in (3, 1, 2)}
    view = _HexIds(ids)
    assert list(view) == sorted(i.hex() for i in ids) and len(view) == 3  # id order: the store's look-ups walk its index
    assert "01" * 32 in view and "04" * 32 not in view
    for malformed in ("AB" * 32, " ".join(["01"] * 32), "01" * 31, 1, None, b"\x01" * 32):
        assert malformed not in view
    ids.add(b"\xab" * 32)
    assert "ab" * 32 in view and "AB" * 32 not in view  # a view, not a copy; lowercase only
