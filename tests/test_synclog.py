"""One log line per sync with a peer: objects and bytes each way, the time
it took; nothing at INFO for rounds that move nothing; busy peers summed."""

from __future__ import annotations

import logging

import pytest
import trio

from daemon import synclog
from daemon.config import format_address
from daemon.synclog import SyncTally, format_bytes
from node_helpers import context, start_node, wait_converged

BOUND = 60  # only keeps a broken sync from hanging the suite


# --------------------------------------------------------------------------
# the tally, with the time given
# --------------------------------------------------------------------------


def test_nothing_happened_nothing_to_say():
    tally = SyncTally()
    assert tally.in_sync(5.0) is None and tally.due(100.0) is None and tally.ended(100.0) is None


def test_one_sync_one_info_line_with_both_directions_and_its_time():
    tally = SyncTally()
    tally.reconciling(10.0)
    tally.received(21740, 50_000_000, 11.0)
    tally.sent(2, 3000, 11.5)
    report = tally.in_sync(12.5)
    assert report.level == logging.INFO
    assert report.message("3f0c1a2b4c5d (10.0.0.2:7787)") == (
        "peer 3f0c1a2b4c5d (10.0.0.2:7787): in sync after 2.50 s: "
        "received 21740 objects (47.7 MiB), sent 2 objects (2.9 KiB)"
    )
    assert tally.in_sync(13.0) is None  # told once


def test_a_round_that_moves_nothing_is_debug():
    tally = SyncTally()
    tally.reconciling(0.0)
    report = tally.in_sync(0.01)
    assert report.level == logging.DEBUG
    assert report.message("p") == "peer p: in sync after 0.01 s: nothing to move (1 reconciliation)"


def test_syncs_of_a_busy_peer_are_summed_into_one_line_per_interval():
    tally = SyncTally()
    tally.received(1, 100, 0.0)
    assert tally.in_sync(0.5).level == logging.INFO  # the first is told at once
    for start in (1.0, 2.0, 3.0):
        tally.received(1, 100, start)
        assert tally.in_sync(start + 0.1) is None  # within MIN_INTERVAL of the last line
    assert tally.due(synclog.MIN_INTERVAL) is None  # not yet
    report = tally.due(0.5 + synclog.MIN_INTERVAL)
    assert report.level == logging.INFO
    assert report.message("p") == "peer p: in sync; 3 syncs in 2.10 s: received 3 objects (300 B), sent 0 objects (0 B)"
    assert tally.due(1000.0) is None


def test_a_sync_after_the_interval_is_told_at_once_with_the_summed_ones():
    tally = SyncTally()
    tally.received(1, 10, 0.0)
    tally.in_sync(0.1)
    tally.received(1, 10, 1.0)
    tally.in_sync(1.1)
    tally.received(1, 10, 50.0)
    report = tally.in_sync(50.2)
    assert report is not None and report.syncs == 2 and report.objects_received == 2


def test_a_sync_under_way_is_not_cut_by_due():
    tally = SyncTally()
    tally.received(1, 10, 0.0)
    tally.in_sync(0.1)
    tally.received(1, 10, 1.0)
    tally.in_sync(1.1)  # summed, waiting
    tally.received(5, 50, 2.0)  # another sync begins
    assert tally.due(100.0) is None
    assert tally.in_sync(101.0).objects_received == 6


def test_a_session_that_ends_mid_sync_says_so():
    tally = SyncTally()
    tally.reconciling(3.0)
    tally.sent(100, 1 << 20, 4.0)
    report = tally.ended(5.0)
    assert report.level == logging.INFO and not report.in_sync
    assert report.message("p") == (
        "peer p: session ended 2.00 s into a sync, before the roots were equal: "
        "received 0 objects (0 B), sent 100 objects (1.0 MiB)"
    )


def test_a_session_that_ends_with_summed_syncs_tells_them():
    tally = SyncTally()
    tally.received(1, 10, 0.0)
    tally.in_sync(0.1)
    tally.received(1, 10, 1.0)
    tally.in_sync(1.5)
    report = tally.ended(2.0)
    assert report.in_sync and report.objects_received == 1 and report.seconds == pytest.approx(0.5)


@pytest.mark.parametrize("count, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                         (5 * 1024 * 1024, "5.0 MiB"), (3 << 40, "3072.0 GiB")])
def test_format_bytes(count, text):
    assert format_bytes(count) == text


# --------------------------------------------------------------------------
# nodes on 127.0.0.1
# --------------------------------------------------------------------------


def sync_lines(caplog, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "daemon.peer" and r.levelno == level and ": in sync" in r.getMessage()]


async def wait_for(predicate, what: str) -> None:
    with trio.move_on_after(BOUND):
        while not predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"not within {BOUND} s: {what}")


async def test_a_sync_logs_one_line_each_side_and_idle_rounds_none(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="daemon.peer")
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a", anti_entropy_seconds=0.05)
        contexts = [context(f"fact {i}") for i in range(50)]
        await a.add_contexts(contexts)
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address], anti_entropy_seconds=0.05)
        await wait_converged([a, b])
        await wait_for(lambda: len(sync_lines(caplog)) >= 2, "a sync line on each side")
        size = sum(len(c.delta_atoms[0].content) for c in contexts)  # a lower bound of the bytes
        on_b = [line for line in sync_lines(caplog) if line.startswith(f"peer {a.node_id[:12]} ")]
        on_a = [line for line in sync_lines(caplog) if line.startswith(f"peer {b.node_id[:12]} ")]
        assert len(on_b) == len(on_a) == 1, sync_lines(caplog)
        assert f"({format_address(*a.listen_address)}): in sync after " in on_b[0]
        assert "received 50 objects (" in on_b[0] and on_b[0].endswith("sent 0 objects (0 B)")
        assert "received 0 objects (0 B), sent 50 objects (" in on_a[0]
        received_bytes = int(float(on_b[0].split("received 50 objects (")[1].split(" KiB")[0]) * 1024)
        assert received_bytes > size

        # Idle: many anti-entropy periods, nothing more at INFO.
        await trio.sleep(0.5)
        assert len(sync_lines(caplog)) == 2

        # A round that moves nothing (b believes a's root is stale): DEBUG only.
        session = b.sessions[a.node_id]
        session.info.root = bytes(32)
        session.resync()
        await wait_for(lambda: any("nothing to move" in m for m in sync_lines(caplog, logging.DEBUG)),
                       "a DEBUG line for a round that moved nothing")
        assert len(sync_lines(caplog)) == 2
        nursery.cancel_scope.cancel()


async def test_writes_in_quick_succession_are_summed(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="daemon.peer")
    monkeypatch.setattr(synclog, "MIN_INTERVAL", 3600.0)
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a", ping_seconds=0.05)
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address], ping_seconds=0.05)
        await a.add_contexts([context("first")])
        await wait_converged([a, b])
        await wait_for(lambda: len(sync_lines(caplog)) >= 2, "the first sync's lines")
        for i in range(3):
            await a.add_contexts([context(f"then {i}")])
            await wait_converged([a, b])
        await trio.sleep(0.3)  # several keepalive ticks: the summed line still waits
        assert len(sync_lines(caplog)) == 2
        monkeypatch.setattr(synclog, "MIN_INTERVAL", 0.0)
        await wait_for(lambda: len(sync_lines(caplog)) >= 4, "the summed lines")
        summed = [line for line in sync_lines(caplog)[2:] if line.startswith(f"peer {a.node_id[:12]} ")]
        assert len(summed) == 1 and "received 3 objects" in summed[0], sync_lines(caplog)
        nursery.cancel_scope.cancel()


async def test_a_connection_cut_mid_sync_is_one_line_not_a_traceback(tmp_path, caplog):
    """A peer that goes away mid-transfer is a normal end: the session says
    what had moved, and nothing logs a warning or a traceback."""
    caplog.set_level(logging.DEBUG, logger="daemon")
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        await a.add_contexts([context(f"{i} " + "x" * 600_000) for i in range(12)])
        b = await start_node(nursery, tmp_path, "b")
        store = b.add_encoded

        async def slow_store(blobs):  # each OBJECTS message takes a while: room to cut
            await trio.sleep(0.3)
            return await store(blobs)

        b.add_encoded = slow_store
        nursery.start_soon(b._dial_forever, a.listen_address, "static")
        await wait_for(lambda: a.node_id in b.sessions and b.sessions[a.node_id].info.objects_received > 0,
                       "the first objects on b")
        await trio.aclose_forcefully(b.sessions[a.node_id].stream)
        await wait_for(lambda: any("session ended" in r.getMessage() for r in caplog.records), "the line")
        await wait_converged([a, b])  # b dials again and finishes
        nursery.cancel_scope.cancel()
    ended = [r.getMessage() for r in caplog.records if "session ended" in r.getMessage()]
    [on_b] = [line for line in ended if line.startswith(f"peer {a.node_id[:12]} ")]  # b, of its session with a
    assert "into a sync, before the roots were equal: received " in on_b and "received 0 objects" not in on_b
    loud = [r for r in caplog.records if r.name.startswith("daemon") and (r.levelno >= logging.WARNING or r.exc_info)]
    assert not loud, [r.getMessage() for r in loud]
