"""Checking received objects in a worker process: the node's second core.

A newcomer taking a holder's 100k contexts is CPU-bound under one GIL: the
event loop (TLS, frames, messages) and the store thread, half of whose work
is checking each context's bytes (`store.check_blobs`: unpack, the model's
rules, atom ids and index, the re-encode comparison) before inserting it.
That half needs no database, so a large received message is checked in a
worker process while the store thread inserts the message before it
(daemon/transfer.py, `_prechecker`), and the store takes the worker's
verdict (`put_encoded_batches(checked=...)`). What crosses to the worker is
the message's one buffer and end offsets; what comes back, one
CheckedContext or RefUpdate per object, or the DecodeError the store would
have raised.

One worker per node, one message at a time, started when a session claims
a large request (`prepare`: its ~0.5 s start overlaps the request) or on
the first large message, and stopped after WORKER_IDLE_SECONDS without one
(and when the node stops). It is a new interpreter running
daemon/checkworker.py over two pipes (never a fork of a process that runs
threads; no multiprocessing helper processes). If it will not start, dies
or takes longer than CHECK_TIMEOUT_SECONDS (then it is killed), that
message is checked in the store thread as before, and so is everything
for WORKER_RETRY_SECONDS. A check the node no longer waits for (its
session ended) still runs to its end, so the pipe stays in step. A
message of fewer than CHECK_MIN_OBJECTS objects is always checked in the
store thread (the round trip would cost more than it saves).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from multiprocessing.connection import Connection

import trio

from daemon.logs import RateLimitedLog
from sync.packed import PackedBlobs

log = logging.getLogger(__name__)
_warn = RateLimitedLog(log)

# A received message of fewer objects is checked in the store thread.
CHECK_MIN_OBJECTS = 512
# The worker exits after this long without a message to check: it costs
# tens of MB while it lives (an interpreter, msgpack, cryptography for ref
# update signatures), so it lives through a bulk transfer, not after it.
WORKER_IDLE_SECONDS = 5.0
# One message is at most 4 MiB (~0.1 s for 4,096 small contexts here): a
# check taking longer than this means a stuck worker.
CHECK_TIMEOUT_SECONDS = 60.0
# How long a stopping worker may take to exit before it is killed.
STOP_SECONDS = 5.0
# After a worker fails (will not start, dies, stalls), the store thread
# checks everything for this long: a broken worker is not respawned for
# every message.
WORKER_RETRY_SECONDS = 60.0


class _Worker:
    """One worker process (daemon/checkworker.py) and its two pipes."""

    def __init__(self) -> None:
        worker_reads, node_writes = os.pipe()
        node_reads, worker_writes = os.pipe()
        try:
            # Its own interpreter, not a fork of one that runs threads; the
            # node's import path, so that it checks with the same code (-P:
            # not the working directory's packages first).
            # Its own session: a terminal's Ctrl-C is the node's to handle.
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
            code = f"from daemon.checkworker import serve; serve({worker_reads}, {worker_writes})"
            self._process = subprocess.Popen([sys.executable, "-P", "-c", code], pass_fds=(worker_reads, worker_writes),
                                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             start_new_session=True)
        except BaseException:
            os.close(node_writes)
            os.close(node_reads)
            raise
        finally:
            os.close(worker_reads)
            os.close(worker_writes)
        self._requests = Connection(node_writes, readable=False)
        self._replies = Connection(node_reads, writable=False)

    @property
    def pid(self) -> int:
        return self._process.pid

    def round_trip(self, parts: tuple) -> tuple[bool, object]:
        self._requests.send(parts)
        return self._replies.recv()

    def kill(self) -> None:
        """Ends a round trip in progress (its read sees the pipe close)."""
        self._process.kill()

    def stop(self) -> None:
        """Close its pipe (the worker exits), then wait; kill if it does not.
        Only once no round trip is in progress: the pipe's descriptors close."""
        self._requests.close()
        self._replies.close()
        try:
            self._process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class Checker:
    """The node's checking worker (see the module docs). Every use of the
    worker holds the lock, and a round trip, once begun, is waited for
    (shielded, bounded by CHECK_TIMEOUT_SECONDS): the pipe never holds a
    reply that nobody reads, and its descriptors are closed only when no
    thread reads them."""

    def __init__(self) -> None:
        self._worker: _Worker | None = None
        self._lock = trio.Lock()
        self._last_used = 0.0
        self._retry_at = 0.0  # after a failure, no worker before this
        self._running = trio.Event()  # a worker exists: run() watches it
        self._wanted = trio.Event()  # prepare(): run() starts one

    def _usable(self) -> bool:
        return trio.current_time() >= self._retry_at

    def prepare(self, coming: int) -> None:
        """`coming` objects were asked for: if that many are worth a worker,
        start it now, so that its start (~0.5 s) does not hold up the first."""
        if coming >= CHECK_MIN_OBJECTS and self._worker is None and self._usable():
            self._last_used = trio.current_time()
            self._wanted.set()

    async def check(self, blobs: PackedBlobs) -> list | None:
        """The checked objects of `blobs`, or None: check them in the store
        thread (too few to send, or no worker). Raises what the store would
        for bytes it refuses (DecodeError, naming the first)."""
        if len(blobs) < CHECK_MIN_OBJECTS or not self._usable():
            return None
        async with self._lock:
            self._last_used = trio.current_time()
            try:
                await self._start()
                assert self._worker is not None
                with trio.CancelScope(shield=True):
                    ok, value = await _round_trip(self._worker, blobs.parts())
            except Exception as exc:  # would not start, died, or stalled and was killed
                await self._failed(exc)
                return None
            finally:
                self._last_used = trio.current_time()
        if ok:
            return value  # type: ignore[return-value]
        raise value  # type: ignore[misc]

    async def run(self) -> None:
        """Start the worker when prepared; stop it once idle for
        WORKER_IDLE_SECONDS, and at the end."""
        try:
            while True:
                await _first(self._running.wait, self._wanted.wait)
                if self._wanted.is_set():
                    self._wanted = trio.Event()
                    async with self._lock:
                        try:
                            await self._start()
                        except OSError as exc:
                            await self._failed(exc)
                    continue
                await trio.sleep_until(self._last_used + WORKER_IDLE_SECONDS)
                async with self._lock:  # a check in progress is waited for, not polled
                    if self._worker is not None and trio.current_time() >= self._last_used + WORKER_IDLE_SECONDS:
                        await self._stop()
        finally:
            with trio.CancelScope(shield=True):
                async with self._lock:
                    await self._stop()

    async def _start(self) -> None:
        if self._worker is None:
            self._worker = await trio.to_thread.run_sync(_Worker)
            self._running.set()

    async def _failed(self, exc: Exception) -> None:
        _warn.warning("checker", "the checking worker failed (%s: %s); checking in the store thread for %g s",
                      exc.__class__.__name__, exc, WORKER_RETRY_SECONDS)
        self._retry_at = trio.current_time() + WORKER_RETRY_SECONDS
        with trio.CancelScope(shield=True):
            await self._stop()

    async def _stop(self) -> None:
        worker, self._worker = self._worker, None
        self._running = trio.Event()
        if worker is not None:
            await trio.to_thread.run_sync(worker.stop)


async def _round_trip(worker: _Worker, parts: tuple) -> tuple[bool, object]:
    """The worker's reply to one message; after CHECK_TIMEOUT_SECONDS the
    worker is killed, which ends the wait (EOFError). The thread that waits
    is never abandoned."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_kill_after, worker, CHECK_TIMEOUT_SECONDS)
        try:
            return await trio.to_thread.run_sync(worker.round_trip, parts)
        finally:
            nursery.cancel_scope.cancel()


async def _kill_after(worker: _Worker, seconds: float) -> None:
    await trio.sleep(seconds)
    worker.kill()


async def _first(*waits) -> None:
    """Return once the first of the waits returns."""
    async with trio.open_nursery() as nursery:
        async def one(wait) -> None:
            await wait()
            nursery.cancel_scope.cancel()
        for wait in waits:
            nursery.start_soon(one, wait)
