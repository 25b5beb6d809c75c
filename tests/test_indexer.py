"""Tests for daemon.indexer: when the full-text catch-up runs (after writes
settle, bounded under writes that never pause) and how (page by page)."""

from __future__ import annotations

import trio

from daemon.indexer import MAX_DEFER_SECONDS, QUIET_SECONDS, TextIndexer
from sync.store import StoreUnavailable


class FakeStore:
    """Pages to index (contexts per page), and when each page was asked for."""

    def __init__(self, pages=()) -> None:
        self.pages = list(pages)
        self.calls: list[float] = []
        self.fail_next = False

    async def index_page(self) -> int:
        self.calls.append(trio.current_time())
        if self.fail_next:
            self.fail_next = False
            raise StoreUnavailable("disk full", disk_full=True)
        return self.pages.pop(0) if self.pages else 0

    def add(self, *pages: int) -> None:
        self.pages += pages


async def started(nursery, store: FakeStore) -> TextIndexer:
    text_indexer = TextIndexer(store.index_page)
    await nursery.start(text_indexer.run)
    return text_indexer


async def test_a_poke_is_indexed_page_by_page_after_the_quiet_period(autojump_clock):
    store = FakeStore([256, 256, 7])
    async with trio.open_nursery() as nursery:
        text_indexer = await started(nursery, store)
        start = trio.current_time()
        text_indexer.poke()
        await trio.sleep(QUIET_SECONDS * 0.9)
        assert store.calls == [] and text_indexer.statistics().pending
        await trio.sleep(QUIET_SECONDS)
        # Each page its own call (its own hop to the store thread), until one finds nothing.
        assert store.calls == [start + QUIET_SECONDS] * 4
        stats = text_indexer.statistics()
        assert (stats.pages, stats.contexts, stats.pending) == (3, 519, False)
        nursery.cancel_scope.cancel()


async def test_pokes_while_writes_go_on_postpone_the_catch_up(autojump_clock):
    store = FakeStore([3])
    async with trio.open_nursery() as nursery:
        text_indexer = await started(nursery, store)
        start = trio.current_time()
        for _ in range(4):
            text_indexer.poke()
            await trio.sleep(QUIET_SECONDS / 2)
        last = start + 3 * QUIET_SECONDS / 2
        await trio.sleep(2 * QUIET_SECONDS)
        assert store.calls[0] == last + QUIET_SECONDS
        nursery.cancel_scope.cancel()


async def test_writes_that_never_pause_are_indexed_within_the_bound(autojump_clock):
    store = FakeStore()
    async with trio.open_nursery() as nursery:
        text_indexer = await started(nursery, store)
        start = trio.current_time()
        while trio.current_time() < start + 2.5 * MAX_DEFER_SECONDS:
            store.add(1)
            text_indexer.poke()
            await trio.sleep(QUIET_SECONDS / 4)
        rounds = sorted(set(store.calls))
        assert len(rounds) == 2 and rounds[0] == start + MAX_DEFER_SECONDS
        # The next round's bound runs from the first write after the first round.
        assert MAX_DEFER_SECONDS <= rounds[1] - rounds[0] <= MAX_DEFER_SECONDS + QUIET_SECONDS / 4
        nursery.cancel_scope.cancel()


async def test_a_store_that_cannot_be_written_pauses_indexing_until_the_next_poke(autojump_clock, caplog):
    store = FakeStore([5, 5])
    store.fail_next = True
    async with trio.open_nursery() as nursery:
        text_indexer = await started(nursery, store)
        text_indexer.poke()
        await trio.sleep(2 * QUIET_SECONDS)
        assert len(store.calls) == 1 and text_indexer.statistics().contexts == 0
        assert "full-text indexing paused" in caplog.text
        await trio.sleep(10 * QUIET_SECONDS)
        assert len(store.calls) == 1  # no retry loop against a full disk
        text_indexer.poke()
        await trio.sleep(2 * QUIET_SECONDS)
        assert text_indexer.statistics().contexts == 10
        nursery.cancel_scope.cancel()



async def test_settled_runs_after_each_catch_up_never_while_writes_go_on(autojump_clock):
    store = FakeStore([256, 7])
    settled: list[tuple[float, int]] = []

    def note_settled() -> None:
        settled.append((trio.current_time(), len(store.calls)))

    async with trio.open_nursery() as nursery:
        text_indexer = TextIndexer(store.index_page, settled=note_settled)
        await nursery.start(text_indexer.run)
        start = trio.current_time()
        for _ in range(3):
            text_indexer.poke()
            await trio.sleep(QUIET_SECONDS / 2)
        assert settled == []  # writes still coming
        await trio.sleep(QUIET_SECONDS)
        # Once, after the whole catch-up (three pages asked for, the last empty).
        assert settled == [(start + QUIET_SECONDS * 2, 3)]
        text_indexer.poke()
        await trio.sleep(QUIET_SECONDS * 2)
        assert len(settled) == 2 and not text_indexer.statistics().pending
        nursery.cancel_scope.cancel()
