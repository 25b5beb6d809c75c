"""One peer session: HELLO, reconcile, push and receive objects under flow control.

Tasks of a session, all in its own nursery:
  reader     bytes -> Connection events -> dispatch (answers PING, feeds
             reconcilers, queues received OBJECTS for the storer)
  fetcher, pusher, storer
             the objects half: asking, pushing, storing (daemon/transfer.py)
  syncer     initiates a reconciliation whenever the roots differ (on a ROOT
             announce, after a local change, and every anti-entropy period)
  keepalive  PINGs an idle link, announces our root when it changes, drops
             a peer that has been silent too long
  writer     the only task that writes to the socket: control frames first
             (CREDIT, ACK, PONG, reconciliation), then one bulk message at a time
No task but the writer ever waits on the socket's send side, and the reader
never waits at all except for bytes: if it did, two nodes pushing to each
other could each stop reading while their writers wait for the other to
read. Control frames are small and their backlog is capped; received
OBJECTS are bounded by our flow-control window.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Callable

import trio

from daemon import tls
from daemon.logs import RateLimitedLog, forget_traceback as _forget_traceback
from daemon.synclog import SyncReport, SyncTally
from daemon.transfer import ObjectTransfer, PushRefused
from sync import reconcile
from sync.connection import NEED_DATA, Connection, ConnectionClosed, Received
from sync.errors import ErrorCode, RemoteProtocolError
from sync.messages import (
    PULL_VERSION,
    Ack,
    Credit,
    Error,
    Goodbye,
    Hello,
    Message,
    Objects,
    Ping,
    Pong,
    Reconcile,
    Root,
    Want,
    encode_payload,
)

log = logging.getLogger(__name__)
_warn = RateLimitedLog(log)
_errors = RateLimitedLog(log, interval=600.0)  # internal errors: once per class per 10 min

# Control frames queued while the peer reads nothing. Honest use stays far
# below this (a CREDIT is 16 bytes, an ACK of 4096 ids 128 KiB); a peer that
# stops reading for good is dropped rather than buffered for.
MAX_CONTROL_BACKLOG = 4 * 1024 * 1024
# A reconciliation step from the peer takes milliseconds; one that has not
# come in this long is lost (the session is dropped and tried again).
RECONCILE_STEP_TIMEOUT = 30.0
# How long GOODBYE may take on the way out.
CLOSE_DEADLINE = 1.0

def _first_cause(group: BaseExceptionGroup) -> BaseException:
    for leaf in _leaves(group):
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    # Only cancellations: the session is being stopped. One Cancelled, not
    # the group, so that run() sees it and says GOODBYE (a group of them
    # once slipped past it: peers saw every stop as "connection lost").
    return next(_leaves(group), group)


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


class PeerGone(Exception):
    """The session ends: the message says why (for status and logs)."""


class Duplicate(PeerGone):
    pass


async def run_session(node, stream: trio.abc.Stream, info, *, dialer: bool) -> None:
    """Run one peer session to its end. Never raises but for cancellation.

    This is the session's one boundary: every exception class it can end
    with is mapped here to the peer's fault (a declared ERROR, then close),
    the connection's end, or our own bug (logged once, session ended). No
    peer input reaches the node's nursery.
    """
    session = PeerSession(node, stream, info, dialer=dialer)
    last_words = b""
    try:
        await session.run()
    except Exception as exc:  # mapped class by class in _map_failure
        last_words = _map_failure(session, info, exc)
        _forget_traceback(exc)
        del exc  # nothing may keep the session's frames alive (see _forget_traceback)
    finally:
        session.detach()
        with trio.CancelScope(shield=True):
            if last_words:
                with trio.move_on_after(CLOSE_DEADLINE):
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        await stream.send_all(last_words)
            await trio.aclose_forcefully(stream)


def _map_failure(session: PeerSession, info, exc: Exception) -> bytes:
    """Record why the session ended (for status and logs); the bytes to send last."""
    if session.peer_left:
        info.error = None  # it said GOODBYE: what broke after that is its leaving, not a failure
    elif isinstance(exc, Duplicate):
        info.error = None
    elif isinstance(exc, PeerGone):
        info.error = str(exc)
    elif isinstance(exc, RemoteProtocolError):
        info.error = f"protocol error: {exc.message}"
        _warn.warning(info.address, "peer %s: %s", info.address, exc.message)
        if not session.torn_write:  # (the connection is in ERROR already: it raised)
            return session.conn.failure_bytes(exc)
    elif isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
        refused = tls.refusal(exc)
        if refused is not None:
            info.error = refused.message
        else:
            info.error = f"connection lost: {exc}" if str(exc) else "connection lost"
    elif isinstance(exc, trio.TooSlowError):
        info.error = f"no HELLO within {session.node.config.hello_timeout_seconds:g} s"
    else:
        # Ours (LocalProtocolError, a store failure nobody expected, a bug):
        # the session ends, the node goes on.
        info.error = f"internal error: {type(exc).__name__}: {exc}"
        _errors.error(type(exc).__name__, "peer %s: session ended by an internal error", info.address, exc_info=exc)
    return b""


class PeerSession(ObjectTransfer):
    def __init__(self, node, stream: trio.abc.Stream, info, *, dialer: bool) -> None:
        self.node = node
        self.stream = stream
        self.info = info
        self.dialer = dialer
        self.conn = Connection(hello=node.hello(), dialer=dialer)
        self.peer_id: str | None = None
        self._control: collections.deque[bytes] = collections.deque()
        self._control_bytes = 0
        self._bulk: tuple[bytes, trio.Event] | None = None
        self._bulk_free = trio.Event()
        self._writer_wake = trio.Event()
        self._writer_idle = trio.Event()
        self.torn_write = False  # a write was cut off: the stream is unusable
        self.peer_left = False  # the peer said GOODBYE (status: it left, not lost)
        self._credit = trio.Event()
        self._want_sync = trio.Event()
        self._announce = trio.Event()
        self._last_heard = trio.current_time()
        self._replies: dict[int, trio.MemorySendChannel] = {}  # our reconcile streams
        self._responders: dict[int, reconcile.Reconciler] = {}
        # Protocol version 2 (objects on request), known once HELLOs are in.
        self.pull = False
        self._init_transfer()
        self._unwatch = None
        self._registered = False
        self._scope = trio.CancelScope()
        self._leaving = "node stopping"  # the GOODBYE's reason when cancelled
        self._tally = SyncTally()  # what moved since the last sync log line

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        with self._scope:
            try:
                await self._run()
            except trio.Cancelled:
                # Shutdown (or replacement): say GOODBYE, briefly, then go.
                # Every task of the session is gone, so writing here is safe.
                with trio.move_on_after(CLOSE_DEADLINE) as scope:
                    scope.shield = True
                    if self.conn.state.value == "open" and not self.torn_write:
                        goodbye = self.conn.send(Goodbye(code=int(ErrorCode.SHUTTING_DOWN), reason=self._leaving))
                        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                                                 RemoteProtocolError):
                            await self.stream.send_all(goodbye)
                            await self._until_goodbye()
                raise

    async def _until_goodbye(self) -> None:
        """After our GOODBYE, read (and drop) what comes until the peer's.

        Closing a socket with bytes unread makes the kernel reset the
        connection, and a reset may take our GOODBYE with it before the
        peer reads it: the peer would then show "connection lost" for a
        node that left on purpose.
        """
        while True:
            event = self.conn.next_event()
            if isinstance(event, ConnectionClosed) or self.conn.state.value == "closed":
                return
            if event is NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(self.conn.max_receive_size))

    async def _run(self) -> None:
        await self.stream.send_all(self.conn.start())  # before any task exists
        with trio.fail_after(self.node.config.hello_timeout_seconds):
            hello = await self._receive_hello()
        self.peer_id = hello.node_id.hex()
        if isinstance(self.stream, trio.SSLStream):
            # The id that counts is the one the peer proved in TLS.
            proven = tls.peer_node_id(self.stream)
            if proven != self.peer_id:
                raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"HELLO names node {self.peer_id[:12]}, TLS proved {proven[:12]}")
        if self.peer_id == self.node.node_id:
            raise PeerGone("this is our own address")
        self.info.node_id = self.peer_id
        self.pull = self.conn.version >= PULL_VERSION
        self._register()
        self.info.state = "connected"
        self.info.error = None
        self.info.root = hello.root
        self.node.note_sync(self.info)
        self._unwatch = self.node.watch(self._on_local_change)
        if hello.root != self.node.root() and (self.dialer or not self.pull):
            # One reconciliation tells both sides what they lack, and under
            # version 2 each asks for its part: the dialer starts it. (The
            # listener reconciles on its own at anti-entropy, or on a ROOT.)
            self._want_sync.set()
        if self.conn.our_hello.root != self.node.root():
            self._announce.set()  # our root moved on since our HELLO was made
        log.info("peer %s connected (%s)", self.peer_id[:12], self.info.address)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._reader, nursery)
                nursery.start_soon(self._prechecker)
                nursery.start_soon(self._storer)
                nursery.start_soon(self._syncer)
                nursery.start_soon(self._pusher)
                nursery.start_soon(self._keepalive)
                if self.pull:
                    nursery.start_soon(self._fetcher)
                    nursery.start_soon(self._stall_watch)
        except BaseExceptionGroup as group:
            # One task's failure ends the session; report that one reason.
            raise _first_cause(group) from None

    def _register(self) -> None:
        """One connection per pair: when both dial, keep the smaller id's dial."""
        existing = self.node.sessions.get(self.peer_id)
        if existing is not None:
            ours_wins = (self.node.node_id < self.peer_id) == self.dialer
            if not ours_wins:
                raise Duplicate("already connected the other way")
            existing.replaced()
        self.node.sessions[self.peer_id] = self
        self._registered = True
        self.info.node_id = self.peer_id
        if self.info.source == "inbound":
            key = f"inbound:{self.peer_id}"
            self.node.peers.pop(key, None)  # the newest last: old rows are pruned first
            self.node.peers[key] = self.info
        else:
            self.node.choose_peers()  # a static peer's id may be news

    def replaced(self) -> None:
        """A connection that wins the one-per-pair rule takes over; this one ends."""
        self._registered = False
        self._scope.cancel()

    def retire(self, reason: str) -> None:
        """End the session with a GOODBYE saying why (the node stays up)."""
        self._leaving = reason
        self._scope.cancel()

    def detach(self) -> None:
        for stream_id in list(self._responders):
            self._end_responder(stream_id)
        self.node.release_fetches(self, resync=True)
        if self._unwatch is not None:
            # The closure holds our bound method: keeping it would be a cycle.
            unwatch, self._unwatch = self._unwatch, None
            unwatch()
        if self._registered and self.node.sessions.get(self.peer_id) is self:
            del self.node.sessions[self.peer_id]
        self._log_sync(self._tally.ended(trio.current_time()))
        if self.info.state == "connected":
            self.info.state = "disconnected"
            log.info("peer %s disconnected", (self.peer_id or "?")[:12])

    def _on_local_change(self) -> None:
        self._announce.set()

    def _note_sync(self) -> None:
        """Both roots may be equal now: status's last_sync, and the sync's log line."""
        self.node.note_sync(self.info)
        if self.info.root == self.node.root():
            self._log_sync(self._tally.in_sync(trio.current_time()))

    def _log_sync(self, report: SyncReport | None) -> None:
        if report is not None:
            log.log(report.level, "%s", report.message(f"{(self.peer_id or '?')[:12]} ({self.info.address})"))

    def resync(self) -> None:
        """Reconcile with the peer soon (e.g. our store can take data again)."""
        self._want_sync.set()

    # ------------------------------------------------------------ sending

    def _queue(self, data: bytes) -> None:
        """Hand control bytes to the writer; never blocks."""
        if not data:
            return
        self._control.append(data)
        self._control_bytes += len(data)
        if self._control_bytes > MAX_CONTROL_BACKLOG:
            raise PeerGone("the peer stopped reading")
        self._writer_wake.set()

    async def send(self, message: Message, stream_id: int = 0) -> None:
        """Queue a control message (anything not flow-controlled)."""
        self._check_sendable(message)
        self._queue(self.conn.send(message, stream_id))
        await trio.lowlevel.checkpoint()

    def _check_sendable(self, message: Message) -> None:
        # Once either side said GOODBYE only our GOODBYE may follow; a task
        # that still had something to say finds the session ending.
        if self.conn.state.value != "open" and not isinstance(message, Goodbye):
            raise PeerGone("the session is closing")

    async def answer(self, message: Message, stream_id: int) -> None:
        """Reply on a stream the peer opened, unless it is closed already.

        A peer may repeat a request on a stream we answered and closed (or
        name one of ours that ended): the reply to that is silence.
        """
        if self.conn.is_stream_open(stream_id):
            await self.send(message, stream_id)

    async def send_flow(self, message: Message, stream_id: int, *, refused: Callable[[], bool] | None = None) -> None:
        """Send a flow-controlled message once the peer's credit allows it,
        returning when the writer has written it (one bulk message at a time).

        `refused()` true while waiting raises PushRefused: a receiver that
        refused the stream closed it and grants no more credit for it.
        """
        size = len(encode_payload(message))
        while self.conn.send_capacity(stream_id) < size:
            if refused is not None and refused():
                raise PushRefused
            self._credit = trio.Event() if self._credit.is_set() else self._credit
            await self._credit.wait()
            self._check_sendable(message)
        while self._bulk is not None:
            await self._bulk_free.wait()
        self._check_sendable(message)
        written = trio.Event()
        self._bulk = (self.conn.send(message, stream_id), written)
        self._writer_wake.set()
        await written.wait()

    async def _writer(self) -> None:
        while True:
            bulk = False
            if self._control:
                data = self._control.popleft()
                self._control_bytes -= len(data)
            elif self._bulk is not None:
                data, bulk = self._bulk[0], True
            else:
                self._writer_idle.set()
                self._writer_wake = trio.Event()
                await self._writer_wake.wait()
                self._writer_idle = trio.Event()
                continue
            self.torn_write = True
            await self.stream.send_all(data)
            self.torn_write = False
            if bulk:
                self._bulk[1].set()
                self._bulk = None
                self._bulk_free.set()
                self._bulk_free = trio.Event()

    # ------------------------------------------------------------ receiving

    async def _receive_some(self) -> bytes:
        data = await self.stream.receive_some(self.conn.max_receive_size)
        self._last_heard = trio.current_time()
        return data

    async def _receive_hello(self) -> Hello:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                self.conn.receive_data(await self._receive_some())
                continue
            if isinstance(event, ConnectionClosed):
                raise PeerGone("closed during HELLO")
            return event.message

    async def _reader(self, nursery: trio.Nursery) -> None:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                self._queue(self.conn.take_credit())
                data = await self._receive_some()
                self.conn.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                nursery.cancel_scope.cancel()
                if not event.clean:
                    raise PeerGone("connection closed")
                return
            await self._dispatch(event, nursery)

    async def _dispatch(self, event: Received, nursery: trio.Nursery) -> None:
        message, stream_id = event.message, event.stream_id
        if isinstance(message, Ping):
            await self.send(Pong(nonce=message.nonce))
        elif isinstance(message, Root):
            self.info.root = message.root
            self._note_sync()
            if message.root != self.node.root():
                self._want_sync.set()
        elif isinstance(message, Reconcile):
            await self._on_reconcile(stream_id, message)
        elif isinstance(message, Objects):
            self._on_objects(stream_id, event.size, message)
        elif isinstance(message, Ack):
            self._on_ack(stream_id, message)
        elif isinstance(message, Credit):
            self._credit.set()
        elif isinstance(message, Want) and self.pull:
            self._on_want(message)
        elif isinstance(message, Error):
            if stream_id == 0:
                raise PeerGone(f"peer reported: {message.message}")
            channel = self._replies.pop(stream_id, None)
            if channel is not None:
                channel.close()
            self._end_responder(stream_id)  # the initiator gave up on its session
            self._on_push_refused(stream_id)
            if message.code == ErrorCode.RETRY:
                log.debug("peer %s: stream %d: %s", self.info.address, stream_id, message.message)
                return
            _warn.warning(f"{self.info.address}:error", "peer %s: stream %d: %s", self.info.address, stream_id, message.message)
            self.info.error = message.message
        elif isinstance(message, Goodbye):
            self.peer_left = True
            self.info.goodbye = message.reason
            self.info.error = None
            await self.send(Goodbye(code=int(ErrorCode.NO_ERROR)))
            with trio.move_on_after(CLOSE_DEADLINE):
                await self._writer_idle.wait()  # let our GOODBYE out
            nursery.cancel_scope.cancel()
        elif not isinstance(message, Pong):
            await self.answer(Error(code=int(ErrorCode.BAD_REQUEST), message=f"{message.TYPE.name} is not served to peers"), stream_id)
            self.conn.close_stream(stream_id)

    # ------------------------------------------------------------ reconciliation

    async def _on_reconcile(self, stream_id: int, message: Reconcile) -> None:
        try:
            wire = reconcile.from_wire(list(message.body))
        except reconcile.ReconcileError as exc:
            raise RemoteProtocolError(ErrorCode.DECODE_ERROR, f"RECONCILE: {exc}") from None
        channel = self._replies.get(stream_id)
        if channel is not None:  # a reply in a session we started
            await channel.send(wire)
            return
        responder = self._responders.get(stream_id)
        if responder is None:
            if not isinstance(wire, reconcile.ReconcileStart):
                return  # a late step of a session we already dropped
            self.node.begin_reconcile()
            self._tally.reconciling(trio.current_time())
            responder = self._responders[stream_id] = reconcile.Reconciler(self.node.index, initiator=False)
        try:
            reply = responder.receive(wire)
        except reconcile.ReconcileStateError:
            # Our index changed under the session; the peer retries.
            self._end_responder(stream_id)
            await self.answer(Error(code=int(ErrorCode.RETRY), message="set changed, retry"), stream_id)
            self.conn.close_stream(stream_id)
            return
        except reconcile.ReconcileError as exc:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"RECONCILE: {exc}") from None
        if reply is not None:
            await self.answer(Reconcile(body=tuple(reconcile.to_wire(reply))), stream_id)
        if responder.done:
            self._end_responder(stream_id)
            self.conn.close_stream(stream_id)
            self._reconciled(responder)

    def _end_responder(self, stream_id: int) -> None:
        if self._responders.pop(stream_id, None) is not None:
            self.node.end_reconcile()

    def _reconciled(self, reconciler: reconcile.Reconciler) -> None:
        # The session told us the peer's root as it was then: fresher than
        # any announce we might have missed.
        if reconciler.peer_root is not None and not reconciler.to_request and not reconciler.to_send:
            self.info.root = reconciler.peer_root
            self._note_sync()
        self._take_result(reconciler)

    async def _syncer(self) -> None:
        while True:
            with trio.move_on_after(self.node.config.anti_entropy_seconds):
                await self._want_sync.wait()
            self._want_sync = trio.Event()
            if self.info.root == self.node.root():
                self._note_sync()
                continue
            if self._serving_request():
                continue
            async with self.node.sync_turn():
                # What another session brought meanwhile may have made
                # the roots equal: then there is nothing to reconcile.
                if self.info.root == self.node.root():
                    self._note_sync()
                    continue
                await self._initiate()

    async def _initiate(self) -> None:
        stream_id = self.conn.open_stream()
        send_replies, replies = trio.open_memory_channel(1)
        self._replies[stream_id] = send_replies
        self.node.begin_reconcile()
        self._tally.reconciling(trio.current_time())
        reconciler = reconcile.Reconciler(self.node.index, initiator=True, nonce=os.urandom(16))
        try:
            step = reconciler.initial_message()
            while True:
                await self.send(Reconcile(body=tuple(reconcile.to_wire(step))), stream_id)
                if reconciler.done:
                    break
                wire = None
                with trio.move_on_after(RECONCILE_STEP_TIMEOUT):
                    try:
                        wire = await replies.receive()
                    except trio.EndOfChannel:
                        pass  # the peer refused (its set changed)
                if wire is None:
                    self._want_sync.set()
                    await trio.sleep(0.05)
                    return
                try:
                    step = reconciler.receive(wire)
                except reconcile.ReconcileStateError:
                    # Our set changed: tell the peer to drop its side, start over.
                    await self.send(Error(code=int(ErrorCode.RETRY), message="set changed, retry"), stream_id)
                    self._want_sync.set()
                    return
                except reconcile.ReconcileError as exc:
                    raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"RECONCILE: {exc}") from None
                if step is None:
                    break
        finally:
            self.node.end_reconcile()
            self._replies.pop(stream_id, None)
            self.conn.close_stream(stream_id)
        self._reconciled(reconciler)

    # ------------------------------------------------------------ liveness

    async def _keepalive(self) -> None:
        # Announcing, pinging and the idle check each keep their own clock:
        # a root that changes all the time must neither starve the idle
        # check (a silent peer would stay "connected") nor the pings (an
        # honest peer with nothing to say would look silent).
        config = self.node.config
        nonce = 0
        next_ping = trio.current_time() + config.ping_seconds
        while True:
            with trio.move_on_at(next_ping):
                await self._announce.wait()
            now = trio.current_time()
            self._log_sync(self._tally.due(now))  # summed syncs whose line waited
            silent = now - self._last_heard
            if silent > config.idle_timeout_seconds:
                raise PeerGone(f"no word from the peer for {silent:.0f} s")
            if self._announce.is_set():
                self._announce = trio.Event()
                await self.send(Root(root=self.node.root(), count=len(self.node.index)))
                self._note_sync()
            if now >= next_ping:
                nonce += 1
                await self.send(Ping(nonce=nonce))
                next_ping = now + config.ping_seconds
