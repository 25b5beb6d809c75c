"""Refs between real nodes (loopback sockets, SQLite): a ref update syncs like
a context, the root commits to it, concurrent writes are a conflict on every
node, and a forged update is refused."""

from __future__ import annotations

import attrs
import pytest
import trio

from node_helpers import context, start_node, wait_converged
from sync.codec import bytes_id
from sync.messages import Objects
from sync.refs import decode_update, encode_update
from sync.store import MissingTarget

BOUND = 60  # only keeps a broken sync from hanging the suite


async def _value(node, name="main"):
    return await node.run_sync(node.store.ref_value, name)


async def _connected(a, b) -> None:
    with trio.fail_after(BOUND):
        while a.node_id not in b.sessions or b.node_id not in a.sessions:
            await trio.sleep(0.01)


async def test_a_ref_set_on_one_node_reaches_its_peer(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        heard_on_a, heard_on_b = [], []
        a.watch_refs(heard_on_a.append)
        b.watch_refs(heard_on_b.append)
        [cid] = await a.add_contexts([context("the main line")])
        [uid] = await a.set_ref("main", cid)
        assert heard_on_a == ["main"]
        await wait_converged([a, b])
        assert heard_on_b == ["main"]
        value = await _value(b)
        assert value == await _value(a) and value.target == cid and value.update_id == uid
        assert value.node_id == a.node_id  # signed with a's node key
        assert a.status()["objects"] == b.status()["objects"] == 2
        assert await b.run_sync(lambda: list(b.store.fsck())) == []
        # A deletion travels the same way.
        await a.delete_ref("main")
        await wait_converged([a, b])
        assert await _value(b) is None and heard_on_b == ["main", "main"]
        nursery.cancel_scope.cancel()


async def test_a_node_lacking_one_ref_update_is_not_in_sync_until_it_has_it(tmp_path):
    shared = context("held by both")
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        b = await start_node(nursery, tmp_path, "b")
        await a.add_contexts([shared])
        await b.add_contexts([shared])
        assert a.root() == b.root()
        [uid] = await a.set_ref("main", shared.id)
        # The same contexts, one ref update apart: the roots differ.
        assert a.root() != b.root() and len(a.index) == len(b.index) + 1
        nursery.start_soon(b._dial_forever, a.listen_address, "static")
        await wait_converged([a, b])
        assert a.root() == b.root() and await b.run_sync(b.store.holds, uid)
        assert (await _value(b)).update_id == uid
        [row] = b.status()["peers"]
        assert row["in_sync"] and row["objects_received"] == 1
        nursery.cancel_scope.cancel()


async def test_partitioned_writers_conflict_on_both_nodes_until_a_new_set(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        b = await start_node(nursery, tmp_path, "b")
        [on_a] = await a.add_contexts([context("a's view")])
        [on_b] = await b.add_contexts([context("b's view")])
        await a.set_ref("main", on_a)
        await b.set_ref("main", on_b)
        nursery.start_soon(b._dial_forever, a.listen_address, "static")
        await wait_converged([a, b])
        for node in (a, b):
            value = await _value(node)
            assert value.conflict and value.candidates == tuple(sorted([on_a, on_b]))
        assert await _value(a) == await _value(b)  # the same winner shown everywhere
        # A set on one side supersedes the whole frontier it sees: resolved on both.
        await b.set_ref("main", on_a)
        await wait_converged([a, b])
        for node in (a, b):
            value = await _value(node)
            assert not value.conflict and value.target == on_a and value.node_id == b.node_id
        nursery.cancel_scope.cancel()


async def test_set_ref_refuses_a_missing_target_and_a_bad_name(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        root_before = a.root()
        with pytest.raises(MissingTarget):
            await a.set_ref("main", context("never stored").id)
        [cid] = await a.add_contexts([context("stored")])
        with pytest.raises(ValueError, match="reserved"):
            await a.set_ref("main~1", cid)
        assert len(a.index) == 1 and a.root() != root_before
        assert len(await a.run_sync(a.store.ref_table)) == 0
        nursery.cancel_scope.cancel()


async def test_a_peer_sending_a_forged_ref_update_is_refused_and_nothing_is_stored(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        [cid] = await a.add_contexts([context("shared")])
        await wait_converged([a, b])
        # b writes an update as if a had: a's node id and key, b's signature.
        [genuine] = await b.set_ref("main", cid)
        await wait_converged([a, b])
        honest = decode_update(await b.run_sync(lambda: b.store.get_many_bytes([genuine])[0]))
        a_key = a._node_key.public_key().public_bytes_raw()
        forged = attrs.evolve(honest, node_id=a.node_id, public_key=a_key, target=cid, supersedes=[honest.id])
        data = encode_update(forged)  # b's signature over other fields: does not verify
        await _connected(a, b)
        index_before = len(a.index)
        session = b.sessions[a.node_id]
        message = Objects(ids=(bytes.fromhex(bytes_id(data)),), objects=(data,), final=True)
        await session.send_flow(message, session.conn.open_stream())
        with trio.fail_after(BOUND):
            while a.status()["peers"][0]["error"] is None:
                await trio.sleep(0.01)
        assert "signature" in a.status()["peers"][0]["error"]
        assert len(a.index) == index_before
        assert not await a.run_sync(a.store.holds, bytes_id(data))
        assert [u.id for u in await a.run_sync(a.store.ref_updates_of, "main")] == [genuine]
        # b was told: an ERROR on the stream, and the session goes on.
        with trio.fail_after(BOUND):
            while session.info.error is None:
                await trio.sleep(0.01)
        assert "signature" in session.info.error and a.node_id in b.sessions
        nursery.cancel_scope.cancel()
