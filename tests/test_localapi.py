"""Tests for daemon.localapi: the Unix-socket API, its server and its client.

The node is a small fake with the interface daemon/node.py offers (node_id,
paths, store, expander, run_sync, add_contexts, status) over an in-memory
store (or SQLite where the CLI must see the same store). Real Unix sockets
in tmp_path; no test asserts on wall-clock time.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import struct
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
import trio

from daemon import cli, localapi
from daemon.localapi import (
    ConnectionLost,
    DaemonAlreadyRunning,
    DaemonNotRunning,
    LocalApiError,
    LocalApiServer,
    LocalClient,
    serve_local_api,
)
from daemon.paths import HomePaths
from helpers import T0, atom, delta, root
from sync import frames
from sync.codec import context_to_json, encode_context
from sync.connection import NEED_DATA, Connection, ConnectionClosed
from sync.errors import ErrorCode
from sync.expand import ExpanderFunctor, stream_expansion
from sync.merkle import merkle_root
from sync.messages import (
    MAGIC,
    PROTOCOL_VERSIONS,
    Ack,
    Error,
    ExpandRequest,
    Goodbye,
    Hello,
    Ping,
    Pong,
    PushContext,
    StatusRequest,
    StatusResponse,
    Want,
)
from sync.model import T_INT, T_STRING, CompressedContext
from sync.query import ContextQuery
from sync.store import InMemoryContextStore, SQLiteContextStore

# A safety net against a hung test, not a timing assertion.
GUARD = 30
NODE_ID = "ab" * 32
PEER_ID = "cd" * 32


# --------------------------------------------------------------------------
# the fake node
# --------------------------------------------------------------------------


class FakeNode:
    """The node interface the local API codes against (see daemon/node.py)."""

    def __init__(self, paths: HomePaths, store=None) -> None:
        self.node_id = NODE_ID
        self.paths = paths
        self.store = store if store is not None else InMemoryContextStore()
        self.expander = ExpanderFunctor(self.store)
        self._store_thread = trio.CapacityLimiter(1)
        self.pushed: list[list[str]] = []
        self.thread_hops = 0
        self._objects = len(self.store)

    async def run_sync(self, fn, *args):
        self.thread_hops += 1
        return await trio.to_thread.run_sync(fn, *args, limiter=self._store_thread)

    async def add_contexts(self, contexts: list[CompressedContext]) -> list[str]:
        ids = await self.run_sync(self.store.put_many, contexts)
        self._objects = await self.run_sync(len, self.store)
        self.pushed.append(ids)
        return ids

    async def add_batches(self, batches) -> list[str]:
        ids = await self.run_sync(lambda: self.store.put_encoded_batches(batches()))
        self._objects = await self.run_sync(len, self.store)
        self.pushed.append(ids)
        return ids

    def status(self) -> dict:
        return {
            "schema": 2,
            "node_id": self.node_id,
            "listen": "127.0.0.1:7787",
            "root": merkle_root([bytes.fromhex(i) for i in sorted(self.store.ids())]).hex(),
            "objects": self._objects,
            "store_error": None,
            "refs": 0,
            "conflicts": [],
            "peers": [
                {
                    "node_id": PEER_ID,
                    "address": "10.0.0.2:7787",
                    "source": "mdns",
                    "state": "connected",
                    "root": None,
                    "in_sync": False,
                    "last_sync": None,
                    "objects_sent": 3,
                    "objects_received": 1,
                    "error": None,
                }
            ],
        }


# --------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------


@pytest.fixture
def node(paths) -> FakeNode:
    return FakeNode(paths)


@pytest.fixture
async def server(node, nursery) -> LocalApiServer:
    srv = LocalApiServer(node)
    await nursery.start(srv.serve)
    return srv


ROOT = root(
    atom("User prefers Python", 0.9),
    atom("Project uses trio", 0.5),
    atom("42", 0.7, T_INT),
    atom("Likes short answers", 0.2),
    source="root",
)
CHILD = delta(ROOT, atom("Deadline is Friday", 0.95), source="child")


def big_context(n: int = 3000) -> CompressedContext:
    return root(*(atom(f"fact number {i} " + "word " * 20, (i % 100) / 100) for i in range(n)))


class RawClient:
    """A hand-driven protocol client for malformed and low-level traffic."""

    def __init__(self, stream: trio.SocketStream, *, stream_window: int = 16 * 2**20,
                 connection_window: int = 32 * 2**20) -> None:
        self.stream = stream
        self.conn = Connection(
            hello=Hello(
                magic=MAGIC, versions=PROTOCOL_VERSIONS, node_id=bytes(32), max_frame_size=frames.DEFAULT_MAX_FRAME_SIZE,
                stream_window=stream_window, connection_window=connection_window, root=bytes(32), count=0,
            ),
            dialer=True,
        )

    @classmethod
    async def open(cls, paths: HomePaths, **kw) -> RawClient:
        return cls(await trio.open_unix_socket(str(paths.api_socket)), **kw)

    async def handshake(self) -> Hello:
        await self.stream.send_all(self.conn.start())
        event = await self.event()
        return event.message

    async def event(self):
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(self.conn.max_receive_size))

    async def send(self, message, stream_id: int = 0) -> None:
        await self.stream.send_all(self.conn.send(message, stream_id))

    async def read_all(self) -> bytes:
        """Everything until the server closes its side."""
        data = b""
        while chunk := await self.stream.receive_some():
            data += chunk
        return data


# --------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------


async def test_push_then_expand_round_trip(server, node, paths):
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            ids = await client.push([ROOT, CHILD])
            assert ids == [ROOT.id, CHILD.id]
            assert node.pushed == [[ROOT.id, CHILD.id]]  # one commit for the push
            response = await client.expand(CHILD.id)
    expected = ExpanderFunctor(node.store).expand(CHILD.id)
    assert response.atoms == expected.atoms
    assert [a.content for a in response.atoms][:2] == ["Deadline is Friday", "User prefers Python"]
    assert response.expansion_path == (bytes.fromhex(ROOT.id), bytes.fromhex(CHILD.id))
    assert response.total_tokens == expected.total_tokens_estimate
    assert response.type_summary == {"String": 4, "Int": 1}
    assert response.atom_root == merkle_root([bytes.fromhex(a.content_hash) for a in expected.atoms])


async def test_expand_applies_min_relevance_and_max_tokens(server, node, paths):
    node.store.put_many([ROOT, CHILD])
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            response = await client.expand(CHILD.id, min_relevance=0.6, max_tokens=4)
    # Worked out here, not by the server's own helper: atoms at or above
    # 0.6, most relevant first, each taken if it still fits 4 tokens.
    kept, spent = [], 0
    for item in ExpanderFunctor(node.store).expand(CHILD.id).atoms:
        if item.relevance_score < 0.6:
            continue
        if spent + item.tokens > 4:
            continue
        kept.append(item)
        spent += item.tokens
    assert response.atoms == tuple(kept)
    # "User prefers Python" (3 tokens) no longer fits after the deadline (3); "42" (1) does.
    assert [a.content for a in kept] == ["Deadline is Friday", "42"]
    assert response.total_tokens == spent
    summary = {}
    for item in kept:
        summary[str(item.type_sig)] = summary.get(str(item.type_sig), 0) + 1
    assert response.type_summary == summary
    assert response.atom_root == merkle_root([bytes.fromhex(a.content_hash) for a in kept])


async def test_stream_round_trip_matches_local_stream(server, node, paths):
    node.store.put_many([ROOT, CHILD])
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            chunks = [c async for c in client.expand_stream(CHILD.id, chunk_size=2, relevance_threshold=0.3)]
            # The connection is still usable after a finished stream.
            assert (await client.status())["schema"] == 2
    local = list(stream_expansion(node.store, CHILD.id, chunk_size=2, relevance_threshold=0.3))
    assert [c.atoms for c in chunks] == [c.atoms for c in local]
    assert [(c.chunk_id, c.is_final, c.cumulative_tokens, c.progress) for c in chunks] == [
        (c.chunk_id, c.is_final, c.cumulative_tokens, c.expansion_progress) for c in local
    ]
    assert chunks[-1].is_final and [len(c.atoms) for c in chunks] == [2, 2]


async def test_stream_of_empty_expansion_is_one_final_chunk(server, node, paths):
    empty = root(source="empty")
    node.store.put(empty)
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            chunks = [c async for c in client.expand_stream(empty.id)]
    assert [(c.atoms, c.is_final) for c in chunks] == [((), True)]


async def test_stream_chunks_are_built_in_batches(server, node, paths):
    node.store.put(big_context(2000))
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            hops_before = node.thread_hops
            chunks = [c async for c in client.expand_stream(big_context(2000).id, chunk_size=5)]
    assert len(chunks) == 400
    # 400 chunks: one first chunk alone, then batches of STREAM_BATCH_CHUNKS.
    assert node.thread_hops - hops_before <= 2 + 400 // localapi.STREAM_BATCH_CHUNKS


async def test_query_round_trip_uses_the_servers_clock(server, node, paths):
    node.store.put_many([ROOT, CHILD])
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            hits = await client.query(CHILD.id, type_filter=T_STRING, min_relevance=0.3, limit=2)
            aged = await client.query(CHILD.id, max_age_seconds=60.0)
    expected = ContextQuery(type_filter=T_STRING, min_relevance=0.3, limit=2).execute(
        ExpanderFunctor(node.store).expand(CHILD.id), datetime.now(timezone.utc)
    )
    assert hits == expected
    assert [a.content for a in hits] == ["Deadline is Friday", "User prefers Python"]
    # The atoms date from T0 (2024): none is younger than a minute by the server's clock.
    assert T0 < datetime.now(timezone.utc) and aged == []


@pytest.fixture
async def sqlite_node(paths, tmp_path, nursery) -> FakeNode:
    """A node on an SQLite store (its full-text index), serving the local API."""
    store = SQLiteContextStore(tmp_path / "store.db")
    node = FakeNode(paths, store)
    await nursery.start(LocalApiServer(node).serve)
    yield node
    store.close()


async def test_text_query_round_trip(sqlite_node, paths):
    node = sqlite_node
    node.store.put_many([ROOT, CHILD])
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            hits = await client.query(CHILD.id, text="python deadline")
            typed = await client.query(CHILD.id, text="python deadline", min_relevance=0.92)
            hostile = await client.query(CHILD.id, text='" OR * NEAR( python')
            blank = await client.query(CHILD.id, text="  ")
            everything = await client.query(CHILD.id)
    assert [a.content for a in hits] == ["Deadline is Friday", "User prefers Python"]
    assert [a.content for a in typed] == ["Deadline is Friday"]
    assert [a.content for a in hostile] == ["User prefers Python"]
    assert blank == everything


async def test_text_query_finds_what_a_peer_sent(sqlite_node, paths):
    node = sqlite_node
    # The peer path stores through put_encoded: indexed in the same commit.
    sent = delta(ROOT, atom("Arrived from a peer over OBJECTS", 0.4), source="peer")
    node.store.put_encoded([encode_context(ROOT), encode_context(sent)])
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            hits = await client.query(sent.id, text="arrive peers")
    assert [a.content for a in hits] == ["Arrived from a peer over OBJECTS"]


async def test_status_round_trip(server, node, paths):
    node.store.put(ROOT)
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            status = await client.status()
            assert client.server_hello.node_id == bytes.fromhex(NODE_ID)
    assert status == node.status()
    assert status["peers"][0]["objects_sent"] == 3


async def test_ping_pong_and_goodbye(server, paths):
    with trio.fail_after(GUARD):
        raw = await RawClient.open(paths)
        await raw.handshake()
        await raw.send(Ping(nonce=77))
        event = await raw.event()
        assert event.message == Pong(nonce=77)
        await raw.send(Goodbye(code=0))
        event = await raw.event()
        assert isinstance(event.message, Goodbye) and event.message.code == 0
        closed = await raw.event()
        assert closed == ConnectionClosed(clean=True)


# --------------------------------------------------------------------------
# refused requests
# --------------------------------------------------------------------------


async def test_push_with_missing_base_is_refused_and_stores_nothing(server, node, paths):
    node.store.put(ROOT)
    orphan = delta("ee" * 32, atom("orphan"))
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            with pytest.raises(LocalApiError) as info:
                await client.push([orphan])
            assert info.value.code is ErrorCode.MISSING_BASE
            assert "ee" * 32 in info.value.message
            # The client is still served afterwards.
            assert await client.push([CHILD]) == [CHILD.id]
    assert sorted(node.store.ids()) == sorted([ROOT.id, CHILD.id])


async def test_push_of_non_canonical_bytes_is_a_decode_error(server, node, paths):
    with trio.fail_after(GUARD):
        raw = await RawClient.open(paths)
        await raw.handshake()
        for stream_id, data in ((1, b"\x93\x01\x02"), (3, encode_context(ROOT) + b"\x00")):
            await raw.send(PushContext(context=data), raw.conn.open_stream())
            event = await raw.event()
            while not isinstance(event.message, Error):  # CREDITs come first
                event = await raw.event()
            assert event.stream_id == stream_id
            assert event.message.code == ErrorCode.DECODE_ERROR
    assert len(node.store) == 0


async def test_push_credit_comes_back_after_the_commit(server, node, paths):
    with trio.fail_after(GUARD):
        raw = await RawClient.open(paths)
        await raw.handshake()
        stream_id = raw.conn.open_stream()
        await raw.send(PushContext(context=encode_context(ROOT)), stream_id)
        assert raw.conn.statistics().send_unacknowledged > 0
        seen = []
        while not any(isinstance(m, Ack) for m in seen):
            seen.append((await raw.event()).message)
        assert seen[-1] == Ack(ids=(bytes.fromhex(ROOT.id),))
        while raw.conn.statistics().send_unacknowledged:
            await raw.event()
    assert node.store.has(ROOT.id)


async def test_unknown_ids_are_not_found(server, paths):
    missing = "0f" * 32
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            for call in (
                lambda: client.expand(missing),
                lambda: client.query(missing),
                lambda: anext(aiter(client.expand_stream(missing))),
            ):
                with pytest.raises(LocalApiError) as info:
                    await call()
                assert info.value.code is ErrorCode.NOT_FOUND
                assert missing in info.value.message


async def test_expansion_too_large_for_one_message_says_stream_it(node, paths, nursery):
    server = LocalApiServer(node, max_message_size=64 * 1024)
    await nursery.start(server.serve)
    big = big_context(2000)
    node.store.put(big)
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            with pytest.raises(LocalApiError) as info:
                await client.expand(big.id)
            assert info.value.code is ErrorCode.LIMIT_EXCEEDED
            assert "STREAM_REQUEST" in info.value.message
            chunks = [c async for c in client.expand_stream(big.id, chunk_size=50)]
    assert sum(len(c.atoms) for c in chunks) == 2000


async def test_sync_messages_are_bad_requests_on_their_stream(server, paths):
    with trio.fail_after(GUARD):
        raw = await RawClient.open(paths)
        await raw.handshake()
        stream_id = raw.conn.open_stream()
        await raw.send(Want(ids=(bytes(32),)), stream_id)
        event = await raw.event()
        assert event.stream_id == stream_id
        assert event.message.code == ErrorCode.BAD_REQUEST and "WANT" in event.message.message
        await raw.send(StatusRequest(), raw.conn.open_stream())
        assert isinstance((await raw.event()).message, StatusResponse)


# --------------------------------------------------------------------------
# flow control and fairness
# --------------------------------------------------------------------------


async def test_stalled_stream_reader_bounds_the_server_and_others_are_served(server, node, paths):
    big = big_context(3000)  # ~ 350 KB of chunks, several times the window
    node.store.put(big)
    window = 64 * 1024  # the smallest window a client may grant
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths, stream_window=window, connection_window=window) as slow:
            chunks = slow.expand_stream(big.id, chunk_size=10)
            first = await anext(chunks)  # ...and read no more
            assert first.chunk_id == 0
            while not server.statistics().clients or not server.statistics().clients[0].waiting_for_credit:
                await trio.sleep(0.01)
            (stalled,) = server.statistics().clients
            total_chunks = len(list(stream_expansion(node.store, big.id, chunk_size=10)))
            assert total_chunks == 300
            assert stalled.chunks_sent < total_chunks // 3
            assert stalled.flow.send_unacknowledged <= window
            assert stalled.chunks_produced <= stalled.chunks_sent + localapi.STREAM_BATCH_CHUNKS

            # Another client is served meanwhile, start to end.
            async with LocalClient.connect(paths) as other:
                assert (await other.status())["objects"] == node.status()["objects"]
                response = await other.expand(big.id, max_tokens=100)
                assert response.atoms
                streamed = [c async for c in other.expand_stream(big.id, chunk_size=100)]
                assert sum(len(c.atoms) for c in streamed) == 3000

            # The stalled stream made no progress: nothing was released.
            again = [s for s in server.statistics().clients if s.waiting_for_credit]
            assert again and again[0].chunks_sent == stalled.chunks_sent

            # Reading on resumes it to the end.
            rest = [c async for c in chunks]
            assert len(rest) == total_chunks - 1 and rest[-1].is_final


async def test_abandoned_stream_stops_the_server_and_frees_the_window(server, node, paths):
    big = big_context(3000)
    node.store.put(big)
    window = 64 * 1024
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths, stream_window=window, connection_window=window) as client:
            async with client.expand_stream(big.id, chunk_size=10) as chunks:
                async for chunk in chunks:
                    if chunk.chunk_id == 3:
                        break
            while server.statistics().clients[0].requests:
                await trio.sleep(0.01)
            # The connection window came back: a second full stream fits through it.
            streamed = [c async for c in client.expand_stream(big.id, chunk_size=10)]
            assert len(streamed) == 300
            assert client.conn.statistics().receive_unreleased == 0


async def test_too_many_requests_at_once_are_refused_not_queued(server, node, paths):
    big = big_context(3000)
    node.store.put(big)
    window = 64 * 1024
    # Room for every stream's window: one stalled stream must not starve the rest.
    connection_window = window * (localapi.MAX_REQUESTS_PER_CLIENT + 1)
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths, stream_window=window, connection_window=connection_window) as client:
            streams = []
            for _ in range(localapi.MAX_REQUESTS_PER_CLIENT):
                s = client.expand_stream(big.id, chunk_size=10)
                await anext(s)  # each holds the connection window it got
                streams.append(s)
            with pytest.raises(LocalApiError) as info:
                await client.status()
            assert info.value.code is ErrorCode.LIMIT_EXCEEDED
            for s in streams:
                await s.aclose()
            while server.statistics().clients[0].requests:
                await trio.sleep(0.01)
            assert (await client.status())["schema"] == 2


# --------------------------------------------------------------------------
# the socket
# --------------------------------------------------------------------------


async def test_socket_is_private_and_removed_on_exit(node, paths):
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_local_api, node)
            info = os.lstat(paths.api_socket)
            assert stat.S_ISSOCK(info.st_mode)
            assert stat.S_IMODE(info.st_mode) == 0o600
            nursery.cancel_scope.cancel()
    assert not paths.api_socket.exists()
    with pytest.raises(DaemonNotRunning, match="no daemon is running for"):
        async with LocalClient.connect(paths):
            pass


async def test_second_server_on_the_same_home_fails_clearly(server, node, paths):
    with trio.fail_after(GUARD):
        with pytest.raises(DaemonAlreadyRunning, match=f"a daemon already runs for HOME {paths.root}"):
            await serve_local_api(FakeNode(paths))
        # The first is untouched.
        async with LocalClient.connect(paths) as client:
            assert (await client.status())["node_id"] == NODE_ID


async def test_stale_socket_file_is_replaced(node, paths, nursery):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(paths.api_socket))
    stale.close()  # the file stays, nobody listens: a daemon killed with -9
    with pytest.raises(DaemonNotRunning):
        async with LocalClient.connect(paths):
            pass
    with trio.fail_after(GUARD):
        await nursery.start(serve_local_api, node)
        async with LocalClient.connect(paths) as client:
            assert (await client.status())["node_id"] == NODE_ID


async def test_a_file_that_is_not_a_socket_is_left_alone(node, paths):
    paths.api_socket.write_text("precious")
    with pytest.raises(OSError, match="not a socket"):
        await serve_local_api(node)
    assert paths.api_socket.read_text() == "precious"


async def test_client_close_is_idempotent_and_ends_requests(server, paths):
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            await client.aclose()
            await client.aclose()
            with pytest.raises(ConnectionLost):
                await client.status()
        while server.statistics().clients_connected:
            await trio.sleep(0.01)


async def test_server_shutdown_tells_clients(node, paths, nursery):
    daemon = trio.CancelScope()

    async def run_daemon(task_status=trio.TASK_STATUS_IGNORED):
        with daemon:
            await serve_local_api(node, task_status=task_status)

    with trio.fail_after(GUARD):
        await nursery.start(run_daemon)
        async with LocalClient.connect(paths) as client:
            await client.status()
            daemon.cancel()
            while client._lost is None:
                await trio.sleep(0.01)
            with pytest.raises(ConnectionLost) as info:
                await client.status()
    assert info.value.code is ErrorCode.SHUTTING_DOWN
    assert "stopping" in info.value.message
    assert not paths.api_socket.exists()


# --------------------------------------------------------------------------
# misbehaving clients end only themselves
# --------------------------------------------------------------------------


async def test_garbage_bytes_end_that_client_only(server, node, paths):
    node.store.put(ROOT)
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as good:
            bad = await trio.open_unix_socket(str(paths.api_socket))
            await bad.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\xff" * 1000)
            received = b""
            while chunk := await bad.receive_some():
                received += chunk
            # Only our HELLO, sent before anything was read: no ERROR to a non-ctxfs peer.
            assert received[0] == 0x10
            assert len(received) == frames.HEADER_SIZE + struct.unpack(">I", received[6:10])[0]
            assert (await good.expand(ROOT.id)).atoms


async def test_protocol_error_after_hello_gets_an_error_then_close(server, node, paths):
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as good:
            raw = await RawClient.open(paths)
            await raw.handshake()
            await raw.stream.send_all(struct.pack(">BBII", 0x7E, 0, 1, 2) + b"\x80\x80")  # unknown type
            event = await raw.event()
            assert event.stream_id == 0 and event.message.code == ErrorCode.UNKNOWN_MESSAGE
            assert await raw.read_all() == b""
            # A request on stream 0 is a protocol error too.
            raw2 = await RawClient.open(paths)
            await raw2.handshake()
            await raw2.send(ExpandRequest(id=bytes.fromhex(ROOT.id)), 0)
            event = await raw2.event()
            assert event.message.code == ErrorCode.PROTOCOL_ERROR and "stream" in event.message.message
            # So is a second request on a finished stream.
            raw3 = await RawClient.open(paths)
            await raw3.handshake()
            reused = raw3.conn.open_stream()
            await raw3.send(StatusRequest(), reused)
            assert isinstance((await raw3.event()).message, StatusResponse)
            await raw3.send(StatusRequest(), reused)
            event = await raw3.event()
            assert event.message.code == ErrorCode.PROTOCOL_ERROR and "already" in event.message.message
            assert await raw3.read_all() == b""
            assert (await good.status())["schema"] == 2


async def test_silent_client_is_dropped_after_the_hello_timeout(server, paths, autojump_clock):
    raw = await trio.open_unix_socket(str(paths.api_socket))
    start = trio.current_time()
    data = b""
    while chunk := await raw.receive_some():
        data += chunk
    assert trio.current_time() - start >= localapi.HELLO_TIMEOUT
    assert data[0] == 0x10  # our HELLO, then the close
    assert server.statistics().clients_connected == 0


async def test_daemon_not_running_when_no_socket(paths):
    with pytest.raises(DaemonNotRunning, match=str(paths.root)):
        async with LocalClient.connect(paths):
            pass
    with pytest.raises(DaemonNotRunning):
        async with LocalClient.connect(paths.root / "no" / "such" / "home"):
            pass


async def test_server_errors_surface_with_their_code_inside_the_client_block(server, paths):
    # The client's nursery must not turn a LocalApiError into an ExceptionGroup.
    with pytest.raises(LocalApiError) as info:
        async with LocalClient.connect(paths) as client:
            await client.expand("12" * 32)
    assert info.value.code is ErrorCode.NOT_FOUND


# --------------------------------------------------------------------------
# the CLI through a running daemon: same output as without it
# --------------------------------------------------------------------------


class DaemonThread:
    """serve_local_api for a FakeNode over the home's SQLite store, in its own thread and trio run."""

    def __init__(self, home: Path) -> None:
        self.paths = HomePaths(home)
        self.node: FakeNode | None = None
        self._ready = threading.Event()
        self._token = None
        self._scope = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main():
            self.node = FakeNode(self.paths, SQLiteContextStore(self.paths.store))
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(serve_local_api, self.node)
                    self._ready.set()
            self.node.store.close()

        try:
            trio.run(main)
        except BaseException as exc:  # reported by stop()
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> DaemonThread:
        self._thread.start()
        assert self._ready.wait(GUARD)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc_info) -> None:
        if self._token is not None:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(GUARD)
        if self._error is not None:
            raise self._error


class Run:
    def __init__(self, capsys) -> None:
        self.capsys = capsys

    def __call__(self, home: Path, *args: str, stdin: bytes | None = None):
        out = io.StringIO()
        self.capsys.readouterr()
        saved = sys.stdin
        if stdin is not None:
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        try:
            code = cli.main(["--home", str(home), *args], out=out)
        finally:
            sys.stdin = saved
        return code, out.getvalue(), self.capsys.readouterr().err


@pytest.fixture
def run(capsys, monkeypatch):
    monkeypatch.delenv("CTXFS_HOME", raising=False)
    return Run(capsys)


@pytest.fixture
def home(tmp_path, run) -> Path:
    h = tmp_path / "node"
    assert run(h, "init")[0] == 0
    return h


def jsonl(*contexts: CompressedContext) -> str:
    return "".join(json.dumps(context_to_json(c)) + "\n" for c in contexts)


def test_cli_push_goes_through_the_daemon(home, tmp_path, run):
    (tmp_path / "in.jsonl").write_text(jsonl(ROOT, CHILD))
    with DaemonThread(home) as daemon:
        code, out, err = run(home, "push", str(tmp_path / "in.jsonl"))
        assert (code, err) == (0, "")
        assert out.splitlines() == [ROOT.id, CHILD.id]
        assert daemon.node.pushed == [[ROOT.id, CHILD.id]]  # one transaction


def _damage(home: Path, context_id: str) -> None:
    """Change one stored row's bytes behind the store's back (still MessagePack)."""
    import sqlite3

    db = sqlite3.connect(home / "store.db")
    try:
        with db:
            (data,) = db.execute("SELECT data FROM contexts WHERE id = ?", (bytes.fromhex(context_id),)).fetchone()
            altered = data.replace(b"Deadline", b"Deadlink")
            assert altered != data
            db.execute("UPDATE contexts SET data = ? WHERE id = ?", (altered, bytes.fromhex(context_id)))
    finally:
        db.close()


@pytest.mark.parametrize(
    "args",
    [["expand", "CHILD"], ["expand", "--json", "CHILD"], ["expand", "--stream", "--json", "CHILD"], ["query", "CHILD"]],
    ids=lambda a: " ".join(a),
)
def test_the_daemon_never_serves_an_object_whose_bytes_do_not_match_its_id(home, tmp_path, run, args):
    (tmp_path / "in.jsonl").write_text(jsonl(ROOT, CHILD))
    assert run(home, "push", str(tmp_path / "in.jsonl"))[0] == 0
    _damage(home, CHILD.id)
    args = [{"CHILD": CHILD.id}.get(a, a) for a in args]
    with DaemonThread(home) as daemon:
        code, out, err = run(home, *args)
        assert daemon.node.thread_hops > 0, "the daemon was not asked"
        # What is sound is still served.
        assert run(home, "expand", ROOT.id)[0] == 0
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"ctxfs: object {CHILD.id} is damaged in the store (its bytes do not match its id); run `ctxfs fsck`"]


async def test_a_damaged_object_is_refused_with_invalid_object(paths, nursery):
    store = SQLiteContextStore(paths.store)
    store.put_many([ROOT, CHILD])
    _damage(paths.root, CHILD.id)
    node = FakeNode(paths, store)
    await nursery.start(LocalApiServer(node).serve)
    try:
        with trio.fail_after(GUARD):
            async with LocalClient.connect(paths) as client:
                for call in (lambda: client.expand(CHILD.id), lambda: client.query(CHILD.id)):
                    with pytest.raises(LocalApiError) as info:
                        await call()
                    assert info.value.code is ErrorCode.INVALID_OBJECT
                    assert CHILD.id in info.value.message and "ctxfs fsck" in info.value.message
                with pytest.raises(LocalApiError) as info:
                    async with client.expand_stream(CHILD.id) as chunks:
                        async for _chunk in chunks:
                            pass
                assert info.value.code is ErrorCode.INVALID_OBJECT
                assert (await client.expand(ROOT.id)).atoms  # the sound root still is
    finally:
        store.close()


def test_cli_push_unknown_base_through_the_daemon_names_the_line_and_stores_nothing(home, tmp_path, run):
    orphan = delta("ee" * 32, atom("orphan"))
    (tmp_path / "in.jsonl").write_text(jsonl(ROOT, orphan))
    with DaemonThread(home) as daemon:
        code, out, err = run(home, "push", str(tmp_path / "in.jsonl"))
        assert daemon.node.pushed == []
    assert code == 1 and out == ""
    assert err.splitlines() == [f"ctxfs: line 2: context {orphan.id} names base {'ee' * 32}, which is not in the store"]
    # Without the daemon: the very same line.
    assert run(home, "push", str(tmp_path / "in.jsonl"))[2] == err


def test_cli_push_removing_an_unheld_atom_through_the_daemon_stores_nothing(home, tmp_path, run):
    never = atom("never held").content_hash
    bad = delta(ROOT, atom("new"), removed={never})
    (tmp_path / "in.jsonl").write_text(jsonl(ROOT, bad))
    with DaemonThread(home) as daemon:
        code, out, err = run(home, "push", str(tmp_path / "in.jsonl"))
        assert daemon.node.pushed == []
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"ctxfs: line 2: context {bad.id} removes atom {never}, which its base {ROOT.id} does not hold"]
    assert run(home, "push", str(tmp_path / "in.jsonl"))[2] == err
    assert run(home, "heads")[1] == ""


@pytest.mark.parametrize(
    "args",
    [
        ["expand", "CHILD"],
        ["expand", "--json", "CHILD"],
        ["expand", "--json", "--min-relevance", "0.6", "CHILD"],
        ["expand", "--max-tokens", "5", "CHILD"],
        ["expand", "--max-tokens", "2", "--min-relevance", "0.9", "CHILD"],
        ["expand", "--stream", "--json", "--chunk-size", "2", "CHILD"],
        ["expand", "--stream", "--min-relevance", "0.5", "CHILD"],
        ["query", "CHILD", "--json"],
        ["query", "CHILD", "--type", "String", "--limit", "2"],
        ["query", "ROOT", "--min-relevance", "0.6", "--json"],
        ["query", "CHILD", "--text", "python deadline", "--json"],
        ["query", "CHILD", "--text", "uses python", "--type", "String", "--limit", "1"],
        ["query", "CHILD", "--text", '" OR * NEAR('],
        ["query", "CHILD", "--text", "   ", "--json"],
        ["expand", "--json", "feed"],
    ],
    ids=lambda a: " ".join(a),
)
def test_cli_output_is_the_same_with_and_without_the_daemon(home, tmp_path, run, args):
    (tmp_path / "in.jsonl").write_text(jsonl(ROOT, CHILD))
    assert run(home, "push", str(tmp_path / "in.jsonl"))[0] == 0
    args = [{"CHILD": CHILD.id, "ROOT": ROOT.id}.get(a, a) for a in args]
    without = run(home, *args)
    with DaemonThread(home) as daemon:
        hops = daemon.node.thread_hops
        through = run(home, *args)
        served = daemon.node.thread_hops > hops or daemon.node.pushed
    assert through == without
    if without[0] == 0:
        assert served, "the daemon was not used"
    if "--json" in args and "expand" in args and "--stream" not in args and without[0] == 0:
        doc = json.loads(without[1])
        hashes = [bytes.fromhex(a["hash"]) for a in doc["atoms"]]
        assert doc["atom_root"] == merkle_root(hashes).hex()


async def test_push_and_stream_at_once_on_one_client_do_not_deadlock(server, node, paths):
    # Both directions busy at once: a large push going up while chunks come
    # down. A reader that waited for the send lock would deadlock this.
    streamed_context = big_context(20000)
    node.store.put(streamed_context)
    pushed = root(*(atom(f"pushed fact {i} " + "x" * 1000) for i in range(9000)))
    assert len(encode_context(pushed)) > 3 * 2**20
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            got = []

            async def consume():
                async for chunk in client.expand_stream(streamed_context.id, chunk_size=5):
                    got.append(chunk)

            for _ in range(3):
                got.clear()
                async with trio.open_nursery() as both:
                    both.start_soon(consume)
                    both.start_soon(client.push, [pushed])
                assert got[-1].is_final and sum(len(c.atoms) for c in got) == 20000
    assert node.store.has(pushed.id)


async def test_a_status_that_cannot_be_encoded_is_an_internal_error_not_a_crash(server, node, paths, monkeypatch):
    monkeypatch.setattr(node, "status", lambda: {"schema": 2, "bad": float("nan")})
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            with pytest.raises(LocalApiError) as info:
                await client.status()
            assert info.value.code is ErrorCode.INTERNAL
            # The connection survives it.
            with pytest.raises(LocalApiError):
                await client.status()
    assert server.statistics().clients_served == 1
