"""The checking worker (daemon/checker.py): a real process, real nodes."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from daemon import checker
from node_helpers import context, start_node, wait_converged
from sync.codec import DecodeError, encode_context
from sync.packed import PackedBlobs
from sync.store import check_blobs


def _blobs(n: int, tag: str = "fact") -> PackedBlobs:
    return PackedBlobs([encode_context(context(f"{tag} {i}")) for i in range(n)])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:  # gone and reaped
        return False
    return True


@pytest.fixture
def small_messages_too(monkeypatch):
    monkeypatch.setattr(checker, "CHECK_MIN_OBJECTS", 4)


async def _with_checker(body) -> list[int]:
    """Run `body(checker)` beside the checker's own task; the pids of the
    workers it saw (every one gone once the checker stops, as with its node)."""
    pids: list[int] = []
    start = checker._Worker.__init__

    def record(worker) -> None:
        start(worker)
        pids.append(worker.pid)

    checker._Worker.__init__ = record
    try:
        async with trio.open_nursery() as nursery:
            c = checker.Checker()
            nursery.start_soon(c.run)
            await body(c)
            nursery.cancel_scope.cancel()
    finally:
        checker._Worker.__init__ = start
    assert pids and not any(map(_alive, pids))
    return pids


async def test_a_large_message_is_checked_in_the_worker_as_the_store_would(small_messages_too):
    async def body(c):
        blobs = _blobs(40)
        assert await c.check(blobs) == check_blobs(blobs)
        assert c._worker is not None and _alive(c._worker.pid)
        assert await c.check(_blobs(3)) is None  # below CHECK_MIN_OBJECTS: the store thread's

    assert len(await _with_checker(body)) == 1  # one worker for both


async def test_bytes_the_store_refuses_are_refused_by_the_worker_with_its_words(small_messages_too):
    bad = PackedBlobs([*_blobs(10), b"\x93\x01\x02\x03"])
    with pytest.raises(DecodeError) as here:
        check_blobs(bad)

    async def body(c):
        with pytest.raises(DecodeError) as there:
            await c.check(bad)
        assert str(there.value) == str(here.value)
        assert await c.check(_blobs(8)) == check_blobs(_blobs(8))  # the worker goes on

    await _with_checker(body)


async def test_a_worker_that_dies_is_replaced_after_a_pause_and_its_messages_checked_here(small_messages_too,
                                                                                            monkeypatch):
    monkeypatch.setattr(checker, "WORKER_RETRY_SECONDS", 0.3)

    async def body(c):
        await c.check(_blobs(8))
        first = c._worker
        os.kill(first.pid, signal.SIGKILL)
        first._process.wait()
        assert await c.check(_blobs(8)) is None  # the store thread checks this one
        assert await c.check(_blobs(8)) is None and c._worker is None  # and the next, for a while
        await trio.sleep(0.3)
        assert await c.check(_blobs(8)) == check_blobs(_blobs(8))  # then a new worker

    assert len(await _with_checker(body)) == 2


async def test_a_worker_that_will_not_start_leaves_the_node_running(small_messages_too, monkeypatch):
    monkeypatch.setattr(checker, "WORKER_RETRY_SECONDS", 0.3)
    attempts: list[int] = []
    start = checker._Worker.__init__

    def failing(worker) -> None:
        attempts.append(1)
        if len(attempts) <= 2:
            raise OSError(24, "Too many open files")
        start(worker)

    monkeypatch.setattr(checker._Worker, "__init__", failing)
    async with trio.open_nursery() as nursery:
        c = checker.Checker()
        nursery.start_soon(c.run)
        c.prepare(8)  # run() starts it: the failure is logged, run() goes on
        with trio.fail_after(10):
            while not attempts:
                await trio.sleep(0.01)
        await trio.sleep(0.05)
        assert await c.check(_blobs(8)) is None and len(attempts) == 1  # not retried at once
        await trio.sleep(0.3)
        assert await c.check(_blobs(8)) is None and len(attempts) == 2
        await trio.sleep(0.3)
        assert await c.check(_blobs(8)) == check_blobs(_blobs(8)) and len(attempts) == 3
        nursery.cancel_scope.cancel()


async def test_a_check_nobody_waits_for_runs_to_its_end_and_the_pipe_stays_in_step(small_messages_too):
    async def body(c):
        await c.check(_blobs(8))
        pid = c._worker.pid
        with trio.move_on_after(0.001):  # the session ends mid-check
            await c.check(_blobs(4000, "abandoned"))
        theirs = _blobs(9, "next")
        assert await c.check(theirs) == check_blobs(theirs)  # its own verdict, not the abandoned one's
        assert c._worker.pid == pid

    assert len(await _with_checker(body)) == 1


async def test_the_checker_waits_for_a_long_check_without_spinning(small_messages_too, monkeypatch):
    monkeypatch.setattr(checker, "WORKER_IDLE_SECONDS", 0.01)
    laps: list[int] = []
    first = checker._first

    async def counted(*waits):
        laps.append(1)
        await first(*waits)

    monkeypatch.setattr(checker, "_first", counted)

    async def body(c):
        for _ in range(3):
            await c.check(_blobs(3000))  # each outlasts the idle time many times over

    await _with_checker(body)
    assert len(laps) < 30


async def test_the_worker_starts_when_prepared_and_stops_once_idle(small_messages_too, monkeypatch):
    monkeypatch.setattr(checker, "WORKER_IDLE_SECONDS", 0.3)

    async def body(c):
        c.prepare(3)  # too few to be worth a worker
        await trio.sleep(0.2)
        assert c._worker is None
        c.prepare(8)
        with trio.fail_after(10):
            while c._worker is None:
                await trio.sleep(0.01)
        first = c._worker.pid
        with trio.fail_after(10):  # stopped and reaped
            while c._worker is not None or _alive(first):
                await trio.sleep(0.05)
        assert await c.check(_blobs(8)) == check_blobs(_blobs(8))  # started again when needed

    assert len(await _with_checker(body)) == 2


async def test_a_newcomer_takes_a_bulk_request_checked_in_the_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(checker, "CHECK_MIN_OBJECTS", 16)
    async with trio.open_nursery() as nursery:
        holder = await start_node(nursery, tmp_path, "holder")
        ids = await holder.add_contexts([context(f"held {i}") for i in range(300)])
        newcomer = await start_node(nursery, tmp_path, "new", peers=[holder.listen_address])
        checked: list[int] = []
        check = newcomer.checker.check

        async def counted(blobs):
            result = await check(blobs)
            checked.append(0 if result is None else len(result))
            return result

        monkeypatch.setattr(newcomer.checker, "check", counted)
        # What this process checks itself (the worker has its own copy of the module).
        import sync.store
        decode = sync.store._decode_batch
        here: list[int] = []
        monkeypatch.setattr(sync.store, "_decode_batch", lambda blobs, **kw: here.append(len(blobs)) or decode(blobs, **kw))
        await wait_converged([holder, newcomer])
        assert await newcomer.run_sync(lambda: sorted(newcomer.store.ids())) == sorted(ids)
        assert sum(checked) == 300 and sum(here) == 0  # every object checked in the worker, and only there
        assert await newcomer.run_sync(lambda: list(newcomer.store.fsck())) == []
        nursery.cancel_scope.cancel()


async def test_a_large_message_with_one_bad_object_is_refused_whole(tmp_path, small_messages_too):
    from sync.messages import Objects

    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        with trio.fail_after(30):
            while a.node_id not in b.sessions or b.node_id not in a.sessions:
                await trio.sleep(0.01)
        session = b.sessions[a.node_id]
        good = [encode_context(context(f"genuine {i}")) for i in range(20)]
        await session.send_flow(Objects(ids=(), objects=(*good, b"\x93\x01\x02\x03"), final=True),
                                session.conn.open_stream())
        with trio.fail_after(30):
            while a.status()["peers"][0]["error"] is None:
                await trio.sleep(0.01)
        assert "invalid object" in a.status()["peers"][0]["error"]
        assert len(a.index) == 0 and await a.run_sync(len, a.store) == 0
        nursery.cancel_scope.cancel()
