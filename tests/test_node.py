"""Many nodes in one process over real loopback sockets: they must converge."""

from __future__ import annotations

import random

import pytest
import trio

from daemon import indexer
from node_helpers import WHEN, context, random_writes, start_node, wait_converged
from sync import fulltext
from sync.query import ContextQuery

# Generous bound so a broken sync fails the test instead of hanging it; the
# runs themselves take well under a second or two.
CONVERGE_BOUND = 60


async def test_a_push_reaches_the_end_of_a_chain(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        c = await start_node(nursery, tmp_path, "c", peers=[b.listen_address])
        await wait_converged([a, b, c])
        [cid] = await a.add_contexts([context("pushed on a")])
        await wait_converged([a, b, c])
        assert await c.run_sync(c.store.has, cid)
        status = c.status()
        assert status["objects"] == 1 and status["root"] == a.root().hex()
        [peer] = status["peers"]
        assert peer["node_id"] == b.node_id and peer["in_sync"] and peer["objects_received"] == 1
        nursery.cancel_scope.cancel()


async def test_lineage_arrives_parents_first(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        base = None
        ids = []
        for i in range(50):
            [base] = await a.add_contexts([context(f"step {i}", base)])
            ids.append(base)
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        await wait_converged([a, b])
        assert await b.run_sync(b.store.get_lineage, ids[-1]) == ids
        assert list(await b.run_sync(lambda: list(b.store.fsck()))) == []
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("seed", [1, 2])
async def test_random_writes_on_random_nodes_with_link_drops_converge(tmp_path, seed):
    rng = random.Random(seed)
    size = 8
    async with trio.open_nursery() as nursery:
        nodes = []
        for i in range(size):
            # Each new node dials one or two earlier ones: a connected graph.
            earlier = [n.listen_address for n in nodes]
            peers = rng.sample(earlier, min(len(earlier), rng.choice([1, 2])))
            nodes.append(await start_node(nursery, tmp_path, f"n{i}", peers=peers))
        for _round in range(3):
            written = await random_writes(nodes, 20, rng)
            # Cut a few live links; dialers reconnect on their own.
            for node in rng.sample(nodes, 3):
                for session in list(node.sessions.values())[:1]:
                    await trio.aclose_forcefully(session.stream)
        await wait_converged(nodes)
        expected = set(await nodes[0].run_sync(lambda: list(nodes[0].store.ids())))
        assert set(written) <= expected and len(expected) == 60
        for node in nodes:
            assert set(await node.run_sync(lambda n=node: list(n.store.ids()))) == expected
        nursery.cancel_scope.cancel()


async def test_both_sides_dialling_keep_one_connection(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        # Now make a dial b as well: both directions at once.
        nursery.start_soon(a._dial_forever, b.listen_address, "static")
        await a.add_contexts([context("x")])
        await wait_converged([a, b])
        await trio.sleep(0.5)  # let the losing dial be refused
        assert list(a.sessions) == [b.node_id] and list(b.sessions) == [a.node_id]
        assert len(a.status()["peers"]) == 1 and a.status()["peers"][0]["state"] == "connected"
        nursery.cancel_scope.cancel()


async def test_a_peer_sending_forged_objects_is_refused(tmp_path):
    """An OBJECTS message whose id does not match its bytes stores nothing."""
    from sync.codec import encode_context
    from sync.messages import Objects

    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        with trio.fail_after(CONVERGE_BOUND):
            while a.node_id not in b.sessions or b.node_id not in a.sessions:
                await trio.sleep(0.01)
        session = b.sessions[a.node_id]
        good = encode_context(context("genuine"))
        forged = Objects(ids=(bytes(32),), objects=(good,), final=True)
        await session.send_flow(forged, session.conn.open_stream())
        with trio.fail_after(CONVERGE_BOUND):
            while a.status()["peers"][0]["error"] is None:
                await trio.sleep(0.01)
        assert "do not match" in a.status()["peers"][0]["error"]
        assert len(a.index) == 0 and await a.run_sync(len, a.store) == 0
        nursery.cancel_scope.cancel()


async def test_two_nodes_pushing_bulk_to_each_other_do_not_deadlock(tmp_path):
    """Both sides push megabytes at once: neither reader may stop reading
    while its writer waits for the other side to read."""
    rng = random.Random(5)

    def big(tag: str, i: int):
        text = " ".join(f"{tag}{i}w{rng.getrandbits(32):x}" for _ in range(40_000))  # ~600 KB
        return context(text)

    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a", ping_seconds=0.2)
        await a.add_contexts([big("a", i) for i in range(20)])
        b = await start_node(nursery, tmp_path, "b", ping_seconds=0.2)
        await b.add_contexts([big("b", i) for i in range(20)])
        nursery.start_soon(b._dial_forever, a.listen_address, "static")
        await wait_converged([a, b], bound=120)
        assert len(a.index) == len(b.index) == 40
        nursery.cancel_scope.cancel()


async def test_a_node_of_another_cluster_never_gets_in(tmp_path):
    other_key = tmp_path / "other.key"
    from daemon import security

    security.write_cluster_key(other_key, security.new_cluster_key())
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        [secret] = await a.add_contexts([context("members only")])
        intruder = await start_node(nursery, tmp_path, "x", peers=[a.listen_address], cluster_key=other_key)
        await intruder.add_contexts([context("from outside")])
        with trio.fail_after(CONVERGE_BOUND):
            while intruder.status()["peers"][0]["error"] is None:
                await trio.sleep(0.01)
        row = intruder.status()["peers"][0]
        assert "not a cluster member" in row["error"] and row["state"] != "connected"
        await trio.sleep(0.5)  # a few more dial attempts
        assert not await intruder.run_sync(intruder.store.has, secret)
        assert len(a.index) == 1 and a.sessions == {} and a.status()["peers"] == []
        nursery.cancel_scope.cancel()


async def test_a_plaintext_ctxfs_hello_gets_no_protocol_byte_back(tmp_path):
    """Without TLS and a member certificate nothing of the protocol is spoken."""
    from sync.connection import Connection

    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        stream = await trio.open_tcp_stream(*a.listen_address)
        probe = Connection(hello=a.hello(), dialer=True)
        await stream.send_all(probe.start())
        received = b""
        with trio.move_on_after(2):
            while chunk := await stream.receive_some(65536):
                received += chunk
        await stream.aclose()
        assert b"CTXF" not in received  # no HELLO of ours; at most a TLS alert
        assert received[:1] in (b"", b"\x15")  # 0x15: a TLS alert record
        nursery.cancel_scope.cancel()


async def test_a_chain_longer_than_one_push_batch_arrives_whole(tmp_path):
    """More missing contexts than fit one OBJECTS message (4096 ids): every
    base must still travel before its children, or the receiver refuses."""
    chain, base = [], None
    for i in range(5000):
        ctx = context(f"link {i}", base)
        chain.append(ctx)
        base = ctx.id
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        await a.add_contexts(chain)
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        await wait_converged([a, b])
        assert len(b.index) == 5000
        assert await b.run_sync(b.store.get_lineage, base) == [c.id for c in chain]
        nursery.cancel_scope.cancel()


async def test_objects_stored_through_the_node_are_indexed_before_any_query(tmp_path, monkeypatch):
    """Puts leave the full-text index behind; the node's indexer catches it
    up once writes settle, so a text query then finds nothing to index."""
    monkeypatch.setattr(indexer, "QUIET_SECONDS", 0.05)
    chain, base = [], None
    for i in range(300):  # more than one page of the catch-up
        ctx = context(f"entry {i}" + (" mentions zebras" if i % 100 == 7 else ""), base)
        chain.append(ctx)
        base = ctx.id
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        await a.add_contexts(chain[:150])  # a push
        await a.add_contexts(chain[150:])
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        await wait_converged([a, b])  # b stored them from a peer's OBJECTS
        for node in (a, b):
            with trio.fail_after(CONVERGE_BOUND):
                while node.text_indexer.statistics().contexts < len(chain):
                    await trio.sleep(0.02)
            stats = node.text_indexer.statistics()
            assert stats.contexts == len(chain) and stats.pages >= 2
            assert await node.run_sync(node.store.text_index_state) == fulltext.CURRENT
            assert await node.run_sync(node.store.index_text_page) == 0  # nothing left for a query

            def query(node=node):
                expanded = node.expander.expand(base)
                return fulltext.run_query(node.store, expanded, ContextQuery(text="zebra"), WHEN)

            hits = await node.run_sync(query)
            assert sorted(hit.content for hit in hits) == [f"entry {i} mentions zebras" for i in (107, 207, 7)]
        nursery.cancel_scope.cancel()


async def test_a_node_keeps_no_list_of_the_ids_it_loaded_at_start(tmp_path):
    """The id set holds the ids packed in leaves; the list they were read
    into must not outlive the start (100k ids would pin ~8 MB)."""
    import gc

    from node_helpers import make_home
    from sync.codec import encode_context
    from sync.store import SQLiteContextStore

    paths, _node_id = make_home(tmp_path, "a")
    contexts = [context(f"stored before the start {i}") for i in range(300)]
    store = SQLiteContextStore(paths.store)
    store.put_encoded([encode_context(c) for c in contexts])
    store.close()
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, tmp_path, "a")
        assert len(node.index) == 300
        wanted = {bytes.fromhex(c.id) for c in contexts}
        gc.collect()
        lists = [o for o in gc.get_objects() if type(o) is list and len(o) == 300 and wanted.issuperset(o)]
        assert lists == []
        nursery.cancel_scope.cancel()
