"""The local API's bounds: clients at once, memory per client, ended
sessions freed, and a client that leaves is no error of ours.

Uses the fake node and the raw client of test_localapi.
"""

from __future__ import annotations

import gc
import logging
import tracemalloc
import weakref

import pytest
import trio

from daemon import localapi
from daemon.localapi import ConnectionLost, LocalApiServer, LocalClient
from sync.errors import ErrorCode
from sync.expand import ExpanderFunctor
from sync.messages import MessageType, StreamRequest

from test_localapi import GUARD, RawClient, big_context, node, server  # noqa: F401


def _record_sessions(monkeypatch) -> list[weakref.ref]:
    sessions: list[weakref.ref] = []
    original = localapi._Session.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sessions.append(weakref.ref(self))

    monkeypatch.setattr(localapi._Session, "__init__", recording)
    return sessions


async def test_ended_client_sessions_are_freed_without_the_cycle_collector(server, node, paths, monkeypatch):
    """Clients that leave mid-stream or mid-message: each session must go
    with its last reference (a traceback or a table of bound methods once
    kept them until the cyclic collector ran)."""
    big = big_context(2000)
    node.store.put(big)
    sessions = _record_sessions(monkeypatch)
    gc.collect()
    gc.disable()
    try:
        with trio.fail_after(GUARD):
            for _ in range(3):
                raw = await RawClient.open(paths, stream_window=64 * 1024)
                await raw.handshake()
                await raw.send(StreamRequest(id=bytes.fromhex(big.id), chunk_size=10), raw.conn.open_stream())
                await raw.event()  # a chunk: the stream is under way
                partial = localapi.frames.Frame(type=MessageType.PUSH_CONTEXT, flags=localapi.frames.FLAG_MORE,
                                                stream_id=raw.conn.open_stream(), payload=b"\x00" * 100_000)
                await raw.stream.send_all(localapi.frames.encode_frame(partial))
                await raw.stream.aclose()
            while server.statistics().clients_connected:
                await trio.sleep(0.01)
            await trio.sleep(0.1)
        alive = [ref for ref in sessions if ref() is not None]
        assert not alive, f"{len(alive)} of {len(sessions)} ended client sessions are still referenced"
    finally:
        gc.enable()


async def test_stalled_stream_readers_hold_no_expansion_of_their_own(server, node, paths):
    """32 streams of a context not yet expanded, never read: each once kept
    its own heap of every live atom (1.2 GB for 40,000 atoms). Now a stalled
    stream holds a cursor, and all of them share the expander's one copy."""
    big = big_context(5000)
    node.store.put(big)
    tracemalloc.start()
    try:
        ExpanderFunctor(node.store).ordered(big.id)  # what one expansion costs
        one_expansion = tracemalloc.get_traced_memory()[1]
        gc.collect()
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        with trio.fail_after(GUARD):
            # A window the socket buffer holds: the server waits for credit,
            # never inside a write.
            raw = await RawClient.open(paths, stream_window=64 * 1024, connection_window=64 * 1024)
            await raw.handshake()
            for _ in range(localapi.MAX_REQUESTS_PER_CLIENT):
                await raw.send(StreamRequest(id=bytes.fromhex(big.id), chunk_size=10), raw.conn.open_stream())
            while True:  # every stream has filled its window and waits
                clients = server.statistics().clients
                if clients and clients[0].waiting_for_credit == localapi.MAX_REQUESTS_PER_CLIENT:
                    break
                await trio.sleep(0.05)
            held = tracemalloc.get_traced_memory()[0] - before
        (stalled,) = server.statistics().clients
        # What was built went out, but at most one chunk per stream that waits for room.
        assert stalled.chunks_produced - stalled.chunks_sent <= localapi.MAX_REQUESTS_PER_CLIENT
        assert held < 3 * one_expansion, f"{held} bytes held; one expansion is {one_expansion}"
        await raw.stream.aclose()
    finally:
        tracemalloc.stop()


async def test_a_client_leaving_mid_stream_is_not_an_error(server, node, paths, caplog):
    big = big_context(3000)
    node.store.put(big)
    caplog.set_level(logging.INFO)
    with trio.fail_after(GUARD):
        for _ in range(3):
            raw = await RawClient.open(paths, stream_window=64 * 1024)
            await raw.handshake()
            await raw.send(StreamRequest(id=bytes.fromhex(big.id), chunk_size=10), raw.conn.open_stream())
            await raw.event()
            await raw.stream.aclose()
        while server.statistics().clients_connected:
            await trio.sleep(0.01)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("daemon")]
    assert not errors, [r.getMessage() for r in errors]


async def test_clients_over_the_limit_are_told_and_closed(node, paths, nursery):
    srv = LocalApiServer(node, max_clients=2)
    await nursery.start(srv.serve)
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as first, LocalClient.connect(paths) as second:
            with pytest.raises(ConnectionLost) as refused:
                async with LocalClient.connect(paths) as third:
                    await third.status()
            assert refused.value.code == ErrorCode.LIMIT_EXCEEDED and "at most 2 local clients" in str(refused.value)
            assert (await first.status())["schema"] == (await second.status())["schema"] == 2
        while srv.statistics().clients_connected:
            await trio.sleep(0.01)
        async with LocalClient.connect(paths) as later:  # places free again
            assert (await later.status())["schema"] == 2
