"""A peer session's boundary: what a member sends ends at most its own session."""

from __future__ import annotations

import trio

from sync.messages import Want

from hostile_helpers import HostileMember
from node_helpers import context, start_node, wait_converged

BOUND = 30


async def test_a_request_on_a_stream_already_answered_ends_no_node(tmp_path):
    """WANT is not served to peers: the node answers ERROR and closes the
    stream. The same WANT again on that closed stream once stopped the node
    (it tried to answer on a stream that was no longer open)."""
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        hostile = await HostileMember.connect(a.listen_address, tmp_path, "hostile")
        await hostile.send(Want(ids=()), stream_id=1)
        await trio.sleep(0.3)
        await hostile.send(Want(ids=()), stream_id=1)
        await hostile.send(Want(ids=()), stream_id=2)  # one of the node's own, never opened
        await hostile.read_until_closed(1)
        await hostile.aclose()
        # The node lives on and still syncs with an honest peer.
        await a.add_contexts([context("still here")])
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        await wait_converged([a, b], bound=BOUND)
        assert len(b.index) == 1
        nursery.cancel_scope.cancel()


async def test_an_ended_session_is_freed_without_the_cycle_collector(tmp_path, monkeypatch):
    """A member that sends half of some large messages and leaves: its
    session (and the megabytes it buffered) must go with the last
    reference, not wait for gc (an exception's traceback once kept it)."""
    import gc
    import weakref

    from daemon import peer
    from sync.messages import MessageType

    sessions: list[weakref.ref] = []
    original_init = peer.PeerSession.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        sessions.append(weakref.ref(self))

    monkeypatch.setattr(peer.PeerSession, "__init__", recording_init)
    gc.collect()
    gc.disable()
    try:
        async with trio.open_nursery() as nursery:
            a = await start_node(nursery, tmp_path, "a")
            for round_ in range(3):
                hostile = await HostileMember.connect(a.listen_address, tmp_path, f"hostile{round_}")
                for stream_id in (1, 3, 5):
                    await hostile.send_partial(MessageType.RECONCILE, stream_id, 1024 * 1024)
                    await hostile.send_partial(MessageType.OBJECTS, stream_id + 6, 1024 * 1024)
                await trio.sleep(0.2)
                await hostile.aclose()
                with trio.fail_after(BOUND):
                    while a.sessions:
                        await trio.sleep(0.01)
            await trio.sleep(0.2)  # let the serving tasks finish
            alive = [ref for ref in sessions if ref() is not None]
            assert not alive, f"{len(alive)} of {len(sessions)} ended sessions are still referenced"
            nursery.cancel_scope.cancel()
    finally:
        gc.enable()


async def test_a_silent_peer_is_dropped_while_the_root_keeps_changing(tmp_path):
    """The idle check once sat behind the announce: a peer that says
    nothing stayed connected as long as our root changed often enough."""
    async with trio.open_nursery() as nursery:
        # No anti-entropy round in the test's time: a reconciliation the
        # silent peer never answers would hold the root still.
        a = await start_node(nursery, tmp_path, "a", ping_seconds=0.2, idle_timeout_seconds=1.0,
                             anti_entropy_seconds=60.0)
        # Its HELLO claims our root: no reconciliation starts (one it never
        # answered would hold the root still for seconds).
        hostile = await HostileMember.connect(a.listen_address, tmp_path, "silent", root=a.root())
        with trio.fail_after(BOUND):
            while not a.sessions:
                await trio.sleep(0.01)
        base = None
        with trio.move_on_after(8):  # old code: connected all along
            while a.sessions:
                [base] = await a.add_contexts([context(f"churn {trio.current_time()}", base)])
                await trio.sleep(0.05)
        assert not a.sessions
        row = a.status()["peers"]
        assert any("no word from the peer" in (p["error"] or "") for p in row)
        await hostile.aclose()
        nursery.cancel_scope.cancel()


async def test_a_member_that_never_says_hello_ends_its_session_only(tmp_path):
    """TLS done, then silence: the HELLO timeout ends that connection (it
    once escaped as TooSlowError into the node's nursery)."""
    from daemon import security, tls
    from node_helpers import make_home

    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a", hello_timeout_seconds=0.3)
        paths, _ = make_home(tmp_path, "mute")
        stream = await trio.open_tcp_stream(*a.listen_address)
        secure = await tls.wrap_client(stream, tls.client_context(security.load_identity(paths)))
        await trio.sleep(1.0)
        await trio.aclose_forcefully(secure)
        await a.add_contexts([context("alive")])
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        await wait_converged([a, b], bound=BOUND)
        nursery.cancel_scope.cancel()


async def test_members_over_the_inbound_limit_are_told_and_closed(tmp_path):
    from sync.connection import NEED_DATA
    from sync.errors import ErrorCode
    from sync.messages import Error

    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a", max_inbound_peers=2)
        first = await HostileMember.connect(a.listen_address, tmp_path, "m1", root=a.root())
        second = await HostileMember.connect(a.listen_address, tmp_path, "m2", root=a.root())
        third = await HostileMember.connect(a.listen_address, tmp_path, "m3", root=a.root())
        rest = await third.read_until_closed(5)
        if rest:
            third.conn.receive_data(rest)
        event = third.conn.next_event()
        assert event is not NEED_DATA and isinstance(event.message, Error)
        assert event.message.code == ErrorCode.LIMIT_EXCEEDED and "at most 2 inbound" in event.message.message
        assert len(a.sessions) == 2
        await first.aclose()
        with trio.fail_after(BOUND):
            while len(a.sessions) != 1:
                await trio.sleep(0.01)
        fourth = await HostileMember.connect(a.listen_address, tmp_path, "m4", root=a.root())
        with trio.fail_after(BOUND):  # the freed place is taken
            while len(a.sessions) != 2:
                await trio.sleep(0.01)
        await second.aclose()
        await fourth.aclose()
        nursery.cancel_scope.cancel()


async def test_status_forgets_old_inbound_peers(tmp_path):
    """100 one-off connections once left 100 status rows, never pruned."""
    from daemon.peers import MAX_DISCONNECTED_INBOUND

    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        for i in range(MAX_DISCONNECTED_INBOUND + 5):
            member = await HostileMember.connect(a.listen_address, tmp_path, f"once{i}", root=a.root())
            with trio.fail_after(BOUND):
                while not a.sessions:
                    await trio.sleep(0.01)
            await member.aclose()
            with trio.fail_after(BOUND):
                while a.sessions:
                    await trio.sleep(0.01)
        rows = a.status()["peers"]
        assert len(rows) == MAX_DISCONNECTED_INBOUND
        assert all(row["state"] == "disconnected" for row in rows)
        nursery.cancel_scope.cancel()


async def test_a_full_disk_pauses_receiving_and_sync_resumes_by_itself(tmp_path, monkeypatch):
    """A full store once ended the daemon ("cannot rollback - no transaction
    is active"). Now receiving pauses, status says why, reads go on, and
    once space is back the node catches up without a restart."""
    from daemon import node as node_module

    monkeypatch.setattr(node_module, "STORE_RETRY_SECONDS", 0.2)
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        [kept] = await a.add_contexts([context("kept before the disk filled")])
        pages = await a.run_sync(lambda: a.store._db.execute("PRAGMA page_count").fetchone()[0])
        await a.run_sync(lambda: a.store._db.execute(f"PRAGMA max_page_count = {pages}"))
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        # More than one stream window (16 MiB): a refused push once went on
        # sending, ran out of stream credit the receiver never grants for a
        # closed stream, and stopped B's pusher for good.
        filler = " ".join(f"word{i}" for i in range(60_000))  # ~600 KB
        await b.add_contexts([context(f"{filler} {i}") for i in range(40)])
        with trio.fail_after(BOUND):
            while a.status()["store_error"] != "disk full":
                await trio.sleep(0.02)
        row = next(p for p in b.status()["peers"] if p["node_id"] == a.node_id)
        assert a.sessions and row["state"] == "connected"  # paused, not dropped
        assert (await a.run_sync(a.expander.expand, kept)).atoms  # reads are served
        assert len(a.index) == 1
        await a.run_sync(lambda: a.store._db.execute(f"PRAGMA max_page_count = {pages * 100_000}"))
        await wait_converged([a, b], bound=BOUND)
        assert len(a.index) == 41 and a.status()["store_error"] is None
        assert await a.run_sync(lambda: list(a.store.fsck())) == []
        nursery.cancel_scope.cancel()


async def test_a_frame_that_breaks_the_protocol_gets_a_declared_error_then_close(tmp_path):
    import struct

    from sync.connection import NEED_DATA
    from sync.errors import ErrorCode
    from sync.messages import Error

    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        hostile = await HostileMember.connect(a.listen_address, tmp_path, "hostile", root=a.root())
        await hostile.send_raw(struct.pack(">BBII", 0x7E, 0, 0, 1) + b"\x90")  # a type nobody knows
        rest = await hostile.read_until_closed(5)
        if rest:
            hostile.conn.receive_data(rest)
        events = []
        while (event := hostile.conn.next_event()) is not NEED_DATA:
            events.append(event)
            if not hasattr(event, "message"):
                break
        errors = [e.message for e in events if hasattr(e, "message") and isinstance(e.message, Error)]
        assert errors and errors[-1].code == ErrorCode.UNKNOWN_MESSAGE
        nursery.cancel_scope.cancel()


async def test_strangers_holding_connections_do_not_take_members_places(tmp_path, monkeypatch):
    """max_inbound_peers once counted TCP connections before TLS: strangers
    with no key, connecting and saying nothing, locked every member out."""
    from daemon import node as node_module

    monkeypatch.setattr(node_module, "MAX_HANDSHAKES_PER_HOST", 64)  # all of them come from 127.0.0.1 here
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a", max_inbound_peers=2)
        strangers = [await trio.open_tcp_stream(*a.listen_address) for _ in range(20)]
        member = await HostileMember.connect(a.listen_address, tmp_path, "member", root=a.root())
        with trio.fail_after(BOUND):
            while not a.sessions:
                await trio.sleep(0.01)
        assert member.conn.peer_hello is not None and len(a.sessions) == 1
        await member.aclose()
        for stream in strangers:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_handshakes_from_one_address_are_bounded(tmp_path, monkeypatch):
    from daemon import node as node_module

    monkeypatch.setattr(node_module, "MAX_HANDSHAKES_PER_HOST", 4)
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        held = [await trio.open_tcp_stream(*a.listen_address) for _ in range(4)]
        await trio.sleep(0.2)  # the node has accepted them and is waiting for their TLS
        extra = await trio.open_tcp_stream(*a.listen_address)
        with trio.fail_after(BOUND):
            assert await extra.receive_some(100) == b""  # closed at once, no TLS spent on it
        for stream in held + [extra]:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_bug_in_one_session_ends_that_session_only_and_is_logged_once(tmp_path, monkeypatch, caplog):
    """An exception nobody expected (our bug) while serving a peer: that
    session ends, the node lives and syncs on, one log line per class."""
    import logging

    from daemon import peer

    original = peer.PeerSession._dispatch
    calls = 0

    async def buggy(self, event, nursery):
        nonlocal calls
        if isinstance(event.message, peer.Ping) and self.info.source == "inbound":
            calls += 1
            raise RuntimeError("a bug in the ping handler")
        await original(self, event, nursery)

    monkeypatch.setattr(peer.PeerSession, "_dispatch", buggy)
    monkeypatch.setattr(peer._errors, "_last", {})  # what earlier tests logged does not count
    caplog.set_level(logging.ERROR, logger="daemon.peer")
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        for i in range(3):
            hostile = await HostileMember.connect(a.listen_address, tmp_path, f"pinger{i}", root=a.root())
            await hostile.send(peer.Ping(nonce=i))
            await hostile.read_until_closed(5)  # the node ends this session
            await hostile.aclose()
        assert calls == 3
        errors = [r for r in caplog.records if "internal error" in r.getMessage()]
        assert len(errors) == 1  # once per class, not once per session
        assert "internal error: RuntimeError" in (a.status()["peers"][-1]["error"] or "")
        await a.add_contexts([context("still syncing")])
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address], ping_seconds=60.0)
        await wait_converged([a, b], bound=BOUND)
        nursery.cancel_scope.cancel()
