"""The full-text indexer: catches the store's text index up once writes settle.

Puts do not touch the full-text index (sync/fulltext.py): a text query
catches it up before it searches, so queries are exact whatever this task
does or has not done yet. Its job is that the first query after a burst of
writes — a bulk sync of a peer's 100k contexts — finds that work done
instead of doing it while the user waits.

The node calls `poke()` after each store. The task then waits until no
write has come for QUIET_SECONDS — or MAX_DEFER_SECONDS have passed since
the first write not yet indexed, so that writes which never pause are
indexed too — and runs the catch-up one page per hop to the store's
worker thread (`Node.run_sync`). A page is one short transaction
(fulltext.PAGE_CONTEXTS, PAGE_BYTES), and writes queue for that thread as
pages do, so they go on between pages: a write waits for one page at most.
Pokes during a catch-up are answered by another round once writes settle
again (often finding nothing left: one state check, no transaction).

A store that cannot be written (disk full) pauses indexing until the
next poke; the node's own watch (`Node._watch_store`) reports the state.

After each catch-up the task calls `settled()`, if given (it must not
block): writes have paused and the index is current, a moment for
housekeeping that should not run during a burst (the node hands free
heap back, daemon/heap.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

from daemon.logs import RateLimitedLog
from sync.store import StoreUnavailable

log = logging.getLogger(__name__)
_failures = RateLimitedLog(log)

# How long the store must go without a write before the catch-up starts:
# well above the gaps between the OBJECTS batches of one sync (milliseconds),
# so a bulk sync is received first and indexed after, off its critical
# path; short enough that a query a moment later finds the index current.
QUIET_SECONDS = 1.0
# Writes that never pause for QUIET_SECONDS (a steady trickle, a very long
# sync) delay the catch-up at most this long after the first of them: what
# a query may find left to index is bounded by what arrives in this time.
MAX_DEFER_SECONDS = 30.0


@attrs.frozen(kw_only=True)
class IndexerStatistics:
    pages: int  # pages indexed since the node started
    contexts: int  # contexts indexed since the node started
    pending: bool  # poked, or catching up: stored contexts may not be indexed yet


class TextIndexer:
    """Runs `index_page()` — one page of the catch-up in the store's thread,
    returning how many contexts it indexed (0: the index is current) — until
    it returns 0, after writes settle."""

    def __init__(self, index_page: Callable[[], Awaitable[int]],
                 settled: Callable[[], None] | None = None) -> None:
        self._index_page = index_page
        self._settled = settled
        self._poked = trio.Event()
        self._first_write: float | None = None  # the first write not yet indexed
        self._last_write = 0.0
        self._running = False
        self._pages = 0
        self._contexts = 0

    def poke(self) -> None:
        """Something was stored: index it once writes settle (never blocks)."""
        self._last_write = trio.current_time()
        if self._first_write is None:
            self._first_write = self._last_write
        self._poked.set()

    def statistics(self) -> IndexerStatistics:
        return IndexerStatistics(pages=self._pages, contexts=self._contexts,
                                 pending=self._poked.is_set() or self._running)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._poked.wait()
            while (due := self._due()) > trio.current_time():
                await trio.sleep_until(due)  # pokes meanwhile move `due` on
            self._poked = trio.Event()
            self._first_write = None
            self._running = True
            try:
                await self._catch_up()
                if self._settled is not None:
                    self._settled()
            finally:
                self._running = False

    def _due(self) -> float:
        assert self._first_write is not None
        return min(self._last_write + QUIET_SECONDS, self._first_write + MAX_DEFER_SECONDS)

    async def _catch_up(self) -> None:
        try:
            while indexed := await self._index_page():
                self._pages += 1
                self._contexts += indexed
        except StoreUnavailable as exc:
            _failures.warning("store", "full-text indexing paused until the next write: %s", exc)
