"""Ref watches on the local API (REFS_WATCH / REF_CHANGED) against real nodes
(in-process, real SQLite and Unix sockets), and the ref summary in status."""

from __future__ import annotations

import gc

import pytest
import trio

from daemon import localapi
from daemon.endpoint import MAX_WATCHES_PER_CLIENT
from daemon.localapi import LocalApiError, LocalClient, RefChange
from node_helpers import context, start_node, wait_converged
from sync.errors import ErrorCode

GUARD = 60  # a safety net against a hung test, not a timing assertion


def _sessions(node) -> list:
    """The node's local API sessions (white-box: the server is the node's own)."""
    return [o for o in gc.get_objects() if isinstance(o, localapi._Session) and o.node is node]


def _watches_on(node) -> int:
    return sum(1 for cb in node._ref_watchers if isinstance(getattr(cb, "__self__", None), localapi._Watch))


async def _until(predicate, poll: float = 0.01) -> None:
    while not predicate():
        await trio.sleep(poll)


async def test_a_local_change_reaches_a_watching_client(tmp_path):
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, tmp_path, "a")
        first, second = context("first"), context("second")
        await node.add_contexts([first, second])
        await node.set_ref("kept", first.id)
        with trio.fail_after(GUARD):
            async with LocalClient.connect(node.paths) as client:
                async with client.watch_refs() as changes, client.watch_refs(["main"]) as main_only:
                    assert [r["name"] for r in changes.snapshot] == ["kept"]
                    assert main_only.snapshot == []
                    await node.set_ref("main", first.id)
                    assert await changes.__anext__() == RefChange(
                        name="main", old=None, new=first.id, conflict=False, candidates=(first.id,))
                    await node.set_ref("main", first.id)  # same value: not a change
                    await node.set_ref("other", second.id)
                    await node.set_ref("main", second.id)
                    assert await changes.__anext__() == RefChange(
                        name="other", old=None, new=second.id, conflict=False, candidates=(second.id,))
                    change = await changes.__anext__()
                    assert (change.name, change.old, change.new) == ("main", first.id, second.id)
                    await node.delete_ref("main")
                    change = await changes.__anext__()
                    assert (change.name, change.old, change.new, change.candidates) == ("main", second.id, None, ())
                    # The named watch saw main only, never "other"; unread, its
                    # three changes coalesced into one (from nothing to nothing).
                    await _until(lambda: main_only._inbox.changes["main"].new is None)
                    assert main_only.pending == 1
                    change = await main_only.__anext__()
                    assert (change.name, change.old, change.new) == ("main", None, None)
                    assert main_only.pending == 0
                with pytest.raises(ValueError):
                    client.watch_refs(["a/../b"])
        nursery.cancel_scope.cancel()


async def test_a_change_from_a_peer_reaches_a_watching_client_and_status_counts_conflicts(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        b = await start_node(nursery, tmp_path, "b")
        [on_a] = await a.add_contexts([context("a's view")])
        [on_b] = await b.add_contexts([context("b's view")])
        await a.set_ref("main", on_a)
        await b.set_ref("main", on_b)
        await b.set_ref("notes", on_b)
        with trio.fail_after(GUARD):
            await _until(lambda: b.status()["refs"] == 2)
            assert a.status()["refs"] == 1 and a.status()["conflicts"] == []
            async with LocalClient.connect(b.paths) as client:
                async with client.watch_refs(["main"]) as changes:
                    assert [r["target"] for r in changes.snapshot] == [on_b]
                    nursery.start_soon(b._dial_forever, a.listen_address, "static")  # the partition heals
                    change = await changes.__anext__()
                    assert change.name == "main" and change.old == on_b and change.conflict
                    assert change.candidates == tuple(sorted([on_a, on_b])) and change.new in change.candidates
                    await wait_converged([a, b])
                    for node in (a, b):
                        await _until(lambda: node.status()["conflicts"] == ["main"])
                        assert node.status()["refs"] == 2
                    # Resolved on a: b's watcher hears it from the peer.
                    await a.set_ref("main", on_a)
                    change = await changes.__anext__()
                    assert (change.new, change.conflict, change.candidates) == (on_a, False, (on_a,))
                    await _until(lambda: b.status()["conflicts"] == [])
        nursery.cancel_scope.cancel()


async def test_a_client_that_does_not_read_gets_the_latest_value_and_costs_one_pending_change(tmp_path):
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, tmp_path, "a")
        targets = [c.id for c in (context("even"), context("odd"))]
        await node.add_contexts([context("even"), context("odd")])
        await node.set_ref("main", targets[1])
        with trio.fail_after(GUARD):
            async with LocalClient.connect(node.paths) as client:
                async with client.watch_refs(["main"]) as changes:
                    [session] = _sessions(node)
                    assert session.statistics().watches == 1
                    # The server cannot send to this client meanwhile (as if
                    # it did not read its socket); nor does the consumer read.
                    async with session._send_lock:
                        for i in range(1000):
                            await node.set_ref("main", targets[i % 2])
                            assert session.statistics().watch_pending <= 1
                        await trio.sleep(0.05)  # let the watch task reach its send
                        assert session.statistics().watch_pending <= 1
                    last = targets[999 % 2]
                    await _until(lambda: changes.pending and changes._inbox.changes["main"].new.hex() == last)
                    assert changes.pending == 1  # coalesced in the client too
                    change = await changes.__anext__()
                    assert change.name == "main" and change.new == last and change.old == targets[1]
                    assert session.statistics().watch_pending == 0
        nursery.cancel_scope.cancel()


async def test_abandoning_a_watch_frees_its_request_slot_and_the_limit_holds(tmp_path):
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, tmp_path, "a")
        [cid] = await node.add_contexts([context("x")])
        baseline = _watches_on(node)
        with trio.fail_after(GUARD):
            async with LocalClient.connect(node.paths) as client:
                async with client.watch_refs():
                    [session] = _sessions(node)
                    assert session.statistics().requests == 1 and _watches_on(node) == baseline + 1
                await _until(lambda: session.statistics().requests == 0)
                assert session.statistics().watches == 0 and _watches_on(node) == baseline

                watches = [client.watch_refs([f"r{i}"]) for i in range(MAX_WATCHES_PER_CLIENT)]
                for watch in watches:
                    await watch.start()
                with pytest.raises(LocalApiError) as info:
                    async with client.watch_refs():
                        pass
                assert info.value.code is ErrorCode.LIMIT_EXCEEDED
                await watches[0].aclose()
                await _until(lambda: session.statistics().watches == MAX_WATCHES_PER_CLIENT - 1)
                async with client.watch_refs(["r0"]) as again:
                    await node.set_ref("r0", cid)
                    assert (await again.__anext__()).new == cid
                for watch in watches[1:]:
                    await watch.aclose()
            # The client left: every watch it had is gone from the node.
            await _until(lambda: _watches_on(node) == baseline)
        nursery.cancel_scope.cancel()


async def test_status_counts_refs_from_memory_and_reads_them_once_at_start(tmp_path):
    from daemon.node import Node
    from node_helpers import fast_config

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            node = await start_node(nursery, tmp_path, "a")
            assert (node.status()["schema"], node.status()["refs"], node.status()["conflicts"]) == (2, 0, [])
            [cid] = await node.add_contexts([context("x")])
            await node.set_ref("main", cid)
            await node.set_ref("notes", cid)
            await _until(lambda: node.status()["refs"] == 2)
            await node.delete_ref("notes")
            await _until(lambda: node.status()["refs"] == 1)
            paths, node_id = node.paths, node.node_id
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            again = Node(paths=paths, config=fast_config(), node_id=node_id)
            await nursery.start(again.run)
            # Read at start: right at once, before any change.
            assert (again.status()["refs"], again.status()["conflicts"]) == (1, [])
            nursery.cancel_scope.cancel()
