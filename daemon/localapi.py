"""The local API: AI clients on this machine talk to the daemon over a Unix socket.

The socket (`HomePaths.api_socket`, mode 0600) carries the peer protocol's
frames through the same sans-IO `Connection`: HELLO both ways first (a
client's node id is 32 zero bytes), then one request per stream, opened by
the client. The server answers on that stream and forgets it:

    PUSH_CONTEXT    -> ACK(ids) once committed, or ERROR
    EXPAND_REQUEST  -> EXPAND_RESPONSE, or ERROR (LIMIT_EXCEEDED: stream it)
    STREAM_REQUEST  -> STREAM_CHUNK... (flow-controlled) then STREAM_END, or ERROR
    QUERY_REQUEST   -> QUERY_RESPONSE, or ERROR
    STATUS_REQUEST  -> STATUS_RESPONSE
    PING -> PONG and GOODBYE -> GOODBYE, on stream 0.

A client abandons a stream by sending ERROR (code NO_ERROR) on it; the
server stops producing chunks for it. A protocol error ends only the client
that made it. Store and expander are touched only through `node.run_sync`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import trio

from daemon.paths import HomePaths
from sync import frames
from sync.codec import DecodeError, decode_context, encode_context
from sync.connection import NEED_DATA, Connection, ConnectionClosed, Received, State
from sync.errors import ErrorCode, LocalProtocolError, RemoteProtocolError, error_code_from_wire
from sync.expand import stream_expansion
from sync.flow import DEFAULT_CONNECTION_WINDOW, DEFAULT_STREAM_WINDOW, FlowStatistics
from sync.merkle import merkle_root
from sync.messages import (
    FLOW_CONTROLLED,
    MAGIC,
    MAX_ATOMS_PER_MESSAGE,
    MAX_REASON_LENGTH,
    PROTOCOL_VERSIONS,
    Ack,
    Credit,
    Error,
    ExpandRequest,
    ExpandResponse,
    Goodbye,
    Hello,
    Message,
    Ping,
    Pong,
    PushContext,
    QueryRequest,
    QueryResponse,
    StatusRequest,
    StatusResponse,
    StreamChunk,
    StreamEnd,
    StreamRequest,
    encode_payload,
)
from sync.model import ExpandedContext, MemoryAtom, TypeSignature, check_id, is_id
from sync.query import ContextQuery
from sync.store import MissingBase, NotFound, StoreError

__all__ = [
    "ChunkStream",
    "ClientStatistics",
    "ConnectionLost",
    "DaemonAlreadyRunning",
    "DaemonNotRunning",
    "LocalApiError",
    "LocalApiServer",
    "LocalApiStatistics",
    "LocalClient",
    "atom_root",
    "expanded_from_response",
    "filter_expansion",
    "serve_local_api",
]

logger = logging.getLogger(__name__)

# A client that connects must say HELLO within this; a local process that
# needs longer is stuck, and each silent connection holds a task.
HELLO_TIMEOUT = 5.0
# GOODBYE and final frames are sent under a shield for at most this long:
# a peer that does not read must not hold up a shutdown.
CLOSE_TIMEOUT = 1.0
# How long a live daemon may take to accept the probe connection.
PROBE_TIMEOUT = 1.0
# Another daemon of this home holds the socket lock only while it checks and
# binds (milliseconds); waiting longer means something is wrong.
LOCK_TIMEOUT = 5.0
# Requests one client may have in progress (pushes queued included). More are
# refused with LIMIT_EXCEEDED, as HTTP/2 refuses streams over its limit:
# never blocking the reader keeps CREDIT frames flowing.
MAX_REQUESTS_PER_CLIENT = 32
# A stream's chunks are built in the store thread in batches: one thread hop
# carries up to this many chunks or atoms. The first batch is one chunk, so
# the first chunk is not delayed by its followers. What the server holds
# beyond the client's window is at most one batch.
STREAM_BATCH_CHUNKS = 32
STREAM_BATCH_ATOMS = 4096
# What the reader may queue for sending (CREDIT, PONG, refusals) while the
# peer reads nothing: far above honest use (a CREDIT is 15 bytes), small
# enough that a peer flooding PINGs without reading costs little memory.
MAX_CONTROL_BACKLOG = 1024 * 1024
# Contexts larger than this are decoded in a worker thread, off the event loop.
INLINE_DECODE_BYTES = 64 * 1024
LISTEN_BACKLOG = 64
# sun_path holds 108 bytes on Linux, NUL included.
MAX_SOCKET_PATH = 107
CLIENT_NODE_ID = bytes(32)


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


class LocalApiError(Exception):
    """The daemon refused a request (or the connection to it failed)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = error_code_from_wire(int(code))
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"


class ConnectionLost(LocalApiError):
    """The connection to the daemon (or to a client) ended."""


class DaemonNotRunning(Exception):
    """Nobody answers on this home's API socket."""


class DaemonAlreadyRunning(Exception):
    """Another daemon serves this home's API socket."""


class _Abandoned(Exception):
    """The client gave up on this request (ERROR on its stream)."""


# --------------------------------------------------------------------------
# helpers shared by the server, the client and the CLI
# --------------------------------------------------------------------------


def atom_root(atoms: Sequence[MemoryAtom]) -> bytes:
    """RFC 6962 root over the atoms' ids (32 bytes each), in the given order."""
    return merkle_root([bytes.fromhex(a.content_hash) for a in atoms])


def filter_expansion(expanded: ExpandedContext, min_relevance: float, max_tokens: int | None) -> ExpandedContext:
    """The expansion cut by relevance and token budget, summaries recomputed.

    The same cut as `ctxfs expand` applies locally (daemon.cli._filtered), so
    that output is identical through the daemon or not.
    """
    atoms = []
    spent = 0
    for atom in expanded.atoms:
        if atom.relevance_score < min_relevance:
            continue
        if max_tokens is not None and spent + atom.tokens > max_tokens:
            break
        spent += atom.tokens
        atoms.append(atom)
    summary: dict[str, int] = {}
    for atom in atoms:
        summary[str(atom.type_sig)] = summary.get(str(atom.type_sig), 0) + 1
    return ExpandedContext(atoms, expanded.molecules, expanded.expansion_path, spent, summary)


def expanded_from_response(response: ExpandResponse) -> ExpandedContext:
    return ExpandedContext(
        response.atoms,
        response.molecules,
        tuple(p.hex() for p in response.expansion_path),
        response.total_tokens,
        response.type_summary,
    )


def _socket_path(paths: HomePaths) -> str:
    path = str(paths.api_socket)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise OSError(
            errno.ENAMETOOLONG,
            f"the API socket path is longer than {MAX_SOCKET_PATH} bytes; use a home with a shorter path",
            path,
        )
    return path


def _sole(group: BaseExceptionGroup) -> BaseException:
    """The one exception a nursery wrapped, so callers can catch it by type."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]
    return group


# --------------------------------------------------------------------------
# one end of a connection: transport, send lock, credit
# --------------------------------------------------------------------------


class _Endpoint:
    """A Connection over a trio stream: one reader, one send lock, credit waits.

    The reader never waits for the send lock. If it did, a writer blocked on
    a peer that is itself blocked writing to us (its reader waiting on its
    own lock) would never be read from again: a deadlock of the two
    directions. What the reader must send (CREDIT, PONG, refusals) goes to
    a control buffer that the next writer, or the flusher task, sends first.
    """

    def __init__(self, stream: trio.abc.Stream, conn: Connection) -> None:
        self.stream = stream
        self.conn = conn
        self._send_lock = trio.Lock()
        # True while a send_all is under way; left True if one was cancelled
        # midway, when the byte stream is cut mid-frame and unusable.
        self._send_broken = False
        self._credit = trio.Event()
        self._lost: LocalApiError | None = None
        self._control = bytearray()
        self._control_queued = trio.Event()

    def _queue(self, data: bytes) -> None:
        """Bytes for the flusher (never blocks)."""
        if not data:
            return
        self._control += data
        if len(self._control) > MAX_CONTROL_BACKLOG:
            raise RemoteProtocolError(
                ErrorCode.LIMIT_EXCEEDED, "the peer keeps asking for answers it does not read"
            )
        self._control_queued.set()

    def send_nowait(self, message: Message, stream_id: int = 0, *, close: bool = False, release: int = 0) -> None:
        """`send` for the reader: queued, sent by the flusher."""
        self._check_open()
        data = self.conn.send(message, stream_id)
        if close:
            self.conn.close_stream(stream_id)
        if release:
            data += self.conn.release(stream_id, release)
        self._queue(data)

    async def _flush_forever(self) -> None:
        """The flusher task: sends what the reader queued."""
        try:
            while True:
                await self._control_queued.wait()
                self._control_queued = trio.Event()
                async with self._send_lock:
                    await self._write(b"")
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionLost):
            pass

    async def _write(self, data: bytes) -> None:
        """Caller holds the send lock. Queued control bytes go first."""
        if self._control:
            data = bytes(self._control) + data
            self._control.clear()
        if not data:
            return
        if self._send_broken:
            raise ConnectionLost(ErrorCode.INTERNAL, "the connection broke while sending")
        # A cancellation delivered here leaves the stream intact; one that
        # interrupts send_all (the peer stopped reading) may cut a frame.
        await trio.lowlevel.checkpoint_if_cancelled()
        self._send_broken = True
        try:
            await self.stream.send_all(data)
        except BaseException:
            self._on_broken()
            raise
        self._send_broken = False

    def _on_broken(self) -> None:
        """The byte stream can carry no more frames: end what waits on it."""

    def _check_open(self) -> None:
        if self._lost is not None:
            raise type(self._lost)(self._lost.code, self._lost.message)
        if self.conn.state is not State.OPEN:
            raise ConnectionLost(ErrorCode.INTERNAL, f"the connection is {self.conn.state.value}")

    async def send(self, message: Message, stream_id: int = 0, *, close: bool = False, release: int = 0) -> None:
        """Send a message; with `close`, forget the stream and free `release` bytes of it."""
        async with self._send_lock:
            self._check_open()
            data = self.conn.send(message, stream_id)
            if close:
                self.conn.close_stream(stream_id)
            if release:
                data += self.conn.release(stream_id, release)
            await self._write(data)

    async def send_flow(
        self,
        messages: Sequence[tuple[Message, int]],
        stream_id: int,
        *,
        abandoned: Callable[[], bool] | None = None,
    ) -> None:
        """Send flow-controlled (message, payload size) pairs, in order, as credit allows.

        Whole messages only (sync.flow: a half-sent message could pin the
        window); as many as the credit covers go in one write. `abandoned()`
        true, checked on every wakeup, raises _Abandoned instead.
        """
        limit = self.conn.max_flow_message
        for message, size in messages:
            if size > limit:
                raise LocalApiError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"{message.TYPE.name} of {size} bytes is larger than the peer accepts ({limit} bytes)",
                )
        sent = 0
        while sent < len(messages):
            # The lock is never held while waiting for credit.
            while True:
                self._check_open()
                if abandoned is not None and abandoned():
                    raise _Abandoned
                arrived = self._credit
                if self.conn.send_capacity(stream_id) >= messages[sent][1]:
                    break
                await self._wait_credit(arrived)
            async with self._send_lock:
                self._check_open()
                data = []
                while sent < len(messages) and self.conn.send_capacity(stream_id) >= messages[sent][1]:
                    data.append(self.conn.send(messages[sent][0], stream_id))
                    sent += 1
                await self._write(b"".join(data))
                self._sent_flow(len(data))

    def _sent_flow(self, count: int) -> None:
        """Hook: `count` flow-controlled messages went out."""

    async def _wait_credit(self, arrived: trio.Event) -> None:
        await arrived.wait()

    def _credit_arrived(self) -> None:
        self._credit.set()
        self._credit = trio.Event()

    async def release(self, stream_id: int, n: int) -> None:
        """The application is done with n flow-controlled bytes: grant them back."""
        async with self._send_lock:
            if self.conn.state not in (State.OPEN, State.LOCAL_CLOSING) or self._send_broken:
                return
            await self._write(self.conn.release(stream_id, n))

    async def next_event(self) -> Received | ConnectionClosed:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            if self.conn.state is State.OPEN:
                # Credit not made by release(): data dropped on closed streams.
                self._queue(self.conn.take_credit())
            data = await self.stream.receive_some(self.conn.max_receive_size)
            self.conn.receive_data(data)

    async def _send_goodbye(self, code: ErrorCode, reason: str = "") -> None:
        """GOODBYE under a shield with a short deadline; never raises."""
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            async with self._send_lock:
                if self.conn.state not in (State.OPEN, State.REMOTE_CLOSING) or self._send_broken:
                    return
                try:
                    await self._write(self.conn.send(Goodbye(code=int(code), reason=reason), 0))
                except (trio.BrokenResourceError, trio.ClosedResourceError, LocalApiError):
                    pass

    async def _send_failure(self, exc: RemoteProtocolError) -> None:
        data = self.conn.failure_bytes(exc)
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            async with self._send_lock:
                if not self._send_broken:
                    try:
                        await self._write(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, LocalApiError):
                        pass


# --------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ClientStatistics:
    requests: int  # in progress, queued pushes included
    chunks_produced: int  # stream chunks built in the store thread
    chunks_sent: int
    waiting_for_credit: int  # requests blocked on the client's flow-control window
    flow: FlowStatistics | None


@attrs.frozen(kw_only=True)
class LocalApiStatistics:
    clients_connected: int
    clients_served: int
    clients: tuple[ClientStatistics, ...]


async def serve_local_api(node: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the local API of `node` until cancelled."""
    await LocalApiServer(node).serve(task_status=task_status)


class LocalApiServer:
    def __init__(self, node: Any, *, max_message_size: int = frames.DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.node = node
        self.max_message_size = max_message_size
        self._sessions: set[_Session] = set()
        self._served = 0

    def statistics(self) -> LocalApiStatistics:
        return LocalApiStatistics(
            clients_connected=len(self._sessions),
            clients_served=self._served,
            clients=tuple(s.statistics() for s in self._sessions),
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        path = _socket_path(self.node.paths)
        sock, identity = await _bind_api_socket(self.node.paths)
        try:
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._serve_client, [listener])
                logger.info("local API listening on %s", path)
                task_status.started()
        finally:
            sock.close()
            _remove_if_ours(path, identity)

    async def _serve_client(self, stream: trio.abc.Stream) -> None:
        session = None
        self._served += 1
        try:
            session = _Session(self, stream)
            self._sessions.add(session)
            await session.run()
        except Exception:
            # A bug serving one client must not take the daemon down.
            logger.exception("local API client failed")
        finally:
            self._sessions.discard(session)


async def _bind_api_socket(paths: HomePaths) -> tuple[trio.socket.SocketType, tuple[int, int]]:
    """A listening socket at the API path, replacing a stale one; (socket, file identity)."""
    path = _socket_path(paths)
    # Two daemons starting at once must not both see "stale" and unlink each
    # other's fresh socket: the check-unlink-bind runs under an flock.
    lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        with trio.fail_after(LOCK_TIMEOUT):
            while True:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await trio.sleep(0.05)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(info.st_mode):
                raise OSError(errno.EEXIST, "exists and is not a socket; move it away", path)
            if await _answers(path):
                raise DaemonAlreadyRunning(f"a daemon already runs for HOME {paths.root}")
            logger.info("removing stale API socket %s", path)
            os.unlink(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            # Nobody can connect before listen(): restricting the mode here,
            # not through the process-wide umask, leaves no window open.
            os.chmod(path, 0o600)
            sock.listen(LISTEN_BACKLOG)
            info = os.stat(path)
        except BaseException:
            sock.close()
            raise
        return sock, (info.st_dev, info.st_ino)
    finally:
        os.close(lock_fd)


async def _answers(path: str) -> bool:
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(PROBE_TIMEOUT):
            await probe.connect(path)
            return True
        return True  # a listener too busy to accept is still alive
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()


def _remove_if_ours(path: str, identity: tuple[int, int]) -> None:
    try:
        info = os.stat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)
    except OSError:
        pass


def _server_hello(node: Any) -> Hello:
    status = node.status()
    root = status.get("root")
    count = status.get("objects")
    return Hello(
        magic=MAGIC,
        versions=PROTOCOL_VERSIONS,
        node_id=bytes.fromhex(check_id(node.node_id, "node id")),
        max_frame_size=frames.DEFAULT_MAX_FRAME_SIZE,
        stream_window=DEFAULT_STREAM_WINDOW,
        connection_window=DEFAULT_CONNECTION_WINDOW,
        root=bytes.fromhex(root) if is_id(root) else bytes(32),
        count=count if type(count) is int and count >= 0 else 0,
    )


def _error_reply(exc: Exception) -> Error:
    if isinstance(exc, LocalApiError):
        code = exc.code
    elif isinstance(exc, MissingBase):
        code = ErrorCode.MISSING_BASE
    elif isinstance(exc, NotFound):
        code = ErrorCode.NOT_FOUND
    elif isinstance(exc, DecodeError):
        code = ErrorCode.DECODE_ERROR
    elif isinstance(exc, (StoreError, ValueError)):
        code = ErrorCode.BAD_REQUEST
    else:
        logger.exception("local API request failed")
        return Error(code=int(ErrorCode.INTERNAL), message=f"internal error ({type(exc).__name__}); see the daemon's log")
    return Error(code=int(code), message=str(exc)[:MAX_REASON_LENGTH])


@attrs.define
class _Request:
    abandoned: bool = False


class _Session(_Endpoint):
    """One client: a reader loop dispatching requests to tasks of its nursery."""

    def __init__(self, server: LocalApiServer, stream: trio.abc.Stream) -> None:
        self.node = server.node
        conn = Connection(hello=_server_hello(self.node), dialer=False, max_message_size=server.max_message_size)
        super().__init__(stream, conn)
        self._requests: dict[int, _Request] = {}
        # Pushes commit one at a time, in arrival order; the channel never
        # fills, as no more than MAX_REQUESTS_PER_CLIENT are admitted.
        self._push_send, self._push_receive = trio.open_memory_channel(MAX_REQUESTS_PER_CLIENT)
        self._nursery: trio.Nursery | None = None
        self._handlers = {
            ExpandRequest: self._expand,
            StreamRequest: self._stream,
            QueryRequest: self._query,
            StatusRequest: self._status,
        }
        self._client_left = False
        # Stream ids only grow and are never reused (sync.frames): a request
        # on an id at or below this one is on a finished stream.
        self._last_request_stream = 0
        self.chunks_produced = 0
        self.chunks_sent = 0
        self.waiting_for_credit = 0

    def _on_broken(self) -> None:
        # Frames may be cut: nothing more can be said to this client.
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            requests=len(self._requests),
            chunks_produced=self.chunks_produced,
            chunks_sent=self.chunks_sent,
            waiting_for_credit=self.waiting_for_credit,
            flow=self.conn.statistics(),
        )

    async def run(self) -> None:
        try:
            async with self._send_lock:
                await self._write(self.conn.start())
            with trio.fail_after(HELLO_TIMEOUT):
                first = await self.next_event()
            if isinstance(first, ConnectionClosed):
                self._client_left = True
                return  # a probe, or a client that changed its mind
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._push_worker)
                nursery.start_soon(self._flush_forever)
                ending = await self._read_requests()
                nursery.cancel_scope.cancel()
            if isinstance(ending, RemoteProtocolError):
                logger.info("local API client broke the protocol: %s", ending)
                await self._send_failure(ending)
            elif ending is Goodbye:
                await self._send_goodbye(ErrorCode.NO_ERROR)
        except trio.TooSlowError:
            logger.info("local API client sent no HELLO within %s s", HELLO_TIMEOUT)
        except RemoteProtocolError as exc:
            logger.info("local API client broke the protocol: %s", exc)
            await self._send_failure(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionLost):
            pass
        finally:
            # Still open and the client still there: we are the ones ending
            # it (shutdown, or our bug). Say so rather than just vanish.
            if self.conn.state is State.OPEN and not self._client_left:
                await self._send_goodbye(ErrorCode.SHUTTING_DOWN, "the daemon is stopping")

    async def _read_requests(self) -> object:
        """Dispatch until the client leaves: returns Goodbye, Error (it gave
        up), None (it is gone) or the RemoteProtocolError it made."""
        try:
            while True:
                event = await self.next_event()
                if isinstance(event, ConnectionClosed):
                    self._client_left = True
                    return None
                ending = self._dispatch(event)
                if ending is not None:
                    return ending
        except RemoteProtocolError as exc:
            return exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionLost):
            self._client_left = True
            return None

    def _dispatch(self, event: Received) -> object:
        message, stream_id = event.message, event.stream_id
        if isinstance(message, Credit):
            self._credit_arrived()
        elif isinstance(message, Ping):
            self.send_nowait(Pong(nonce=message.nonce))
        elif isinstance(message, Pong):
            pass
        elif isinstance(message, Goodbye):
            return Goodbye
        elif isinstance(message, Error):
            if stream_id == 0:
                logger.info("local API client gave up: %s", message.message)
                self._client_left = True
                return Error
            request = self._requests.get(stream_id)
            if request is not None:
                # Not a cancel scope: cancelling a task inside send_all
                # could cut a frame and break the whole connection.
                request.abandoned = True
                self._credit_arrived()
        elif stream_id == 0:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{message.TYPE.name} needs a stream of its own")
        elif stream_id <= self._last_request_stream:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"stream {stream_id} already carried a request")
        else:
            self._last_request_stream = stream_id
            self._admit(event)
        return None

    def _admit(self, event: Received) -> None:
        message, stream_id = event.message, event.stream_id
        held = event.size if message.TYPE in FLOW_CONTROLLED else 0
        if not isinstance(message, PushContext) and type(message) not in self._handlers:
            error = Error(code=int(ErrorCode.BAD_REQUEST), message=f"the local API does not take {message.TYPE.name}")
        elif len(self._requests) >= MAX_REQUESTS_PER_CLIENT:
            error = Error(
                code=int(ErrorCode.LIMIT_EXCEEDED),
                message=f"more than {MAX_REQUESTS_PER_CLIENT} requests in progress; wait for some to finish",
            )
        elif isinstance(message, PushContext):
            self._requests[stream_id] = _Request()
            self._push_send.send_nowait((stream_id, message, held))
            return
        else:
            request = self._requests[stream_id] = _Request()
            self._nursery.start_soon(self._run_request, self._handlers[type(message)], stream_id, message, request)
            return
        self.send_nowait(error, stream_id, close=True, release=held)

    async def _run_request(self, handler, stream_id: int, message: Message, request: _Request) -> None:
        try:
            try:
                reply = await handler(stream_id, message, request)
            except (ConnectionLost, _Abandoned):
                reply = None
            except Exception as exc:
                reply = _error_reply(exc)
            if reply is None or request.abandoned:
                self.conn.close_stream(stream_id)
                return
            try:
                await self.send(reply, stream_id, close=True)
            except LocalProtocolError as exc:
                # The answer could not be encoded; nothing was sent.
                if exc.code is ErrorCode.LIMIT_EXCEEDED:
                    text = f"the answer is too large for one message ({exc.message}); use a STREAM_REQUEST"
                else:
                    logger.error("local API cannot encode its answer: %s", exc)
                    text = "internal error: the answer cannot be encoded; see the daemon's log"
                await self.send(Error(code=int(exc.code), message=text), stream_id, close=True)
        except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
            self._on_broken()
        finally:
            self._requests.pop(stream_id, None)

    # ------------------------------------------------------------ requests

    async def _push_worker(self) -> None:
        async for stream_id, message, size in self._push_receive:
            try:
                reply = await self._commit(message)
                # Credit goes back only now, after the commit: an ACK and the
                # freed window both mean "durably stored".
                await self.send(reply, stream_id, close=True, release=size)
            except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
                self._on_broken()
                return
            finally:
                self._requests.pop(stream_id, None)

    async def _commit(self, message: PushContext) -> Ack | Error:
        try:
            data = message.context
            if len(data) > INLINE_DECODE_BYTES:
                context = await trio.to_thread.run_sync(decode_context, data)
            else:
                context = decode_context(data, verify=True)
            ids = await self.node.add_contexts([context])
            return Ack(ids=tuple(bytes.fromhex(i) for i in ids))
        except Exception as exc:
            return _error_reply(exc)

    async def _expand(self, stream_id: int, request: ExpandRequest, _req: _Request) -> ExpandResponse:
        node = self.node
        context_id = request.id.hex()

        def build() -> ExpandResponse:
            expanded = filter_expansion(node.expander.expand(context_id), request.min_relevance, request.max_tokens)
            if len(expanded.atoms) > MAX_ATOMS_PER_MESSAGE:
                raise LocalApiError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"the expansion has {len(expanded.atoms)} atoms, over {MAX_ATOMS_PER_MESSAGE} per message; "
                    "use a STREAM_REQUEST",
                )
            return ExpandResponse(
                id=request.id,
                atoms=expanded.atoms,
                molecules=expanded.molecules,
                expansion_path=tuple(bytes.fromhex(p) for p in expanded.expansion_path),
                total_tokens=expanded.total_tokens_estimate,
                type_summary=dict(expanded.type_summary),
                atom_root=atom_root(expanded.atoms),
            )

        return await node.run_sync(build)

    async def _stream(self, stream_id: int, request: StreamRequest, progress: _Request) -> StreamEnd:
        if request.chunk_size > MAX_ATOMS_PER_MESSAGE:
            raise LocalApiError(ErrorCode.LIMIT_EXCEEDED, f"chunk_size is at most {MAX_ATOMS_PER_MESSAGE}")
        chunks = stream_expansion(
            self.node.store,
            request.id.hex(),
            relevance_threshold=request.relevance_threshold,
            chunk_size=request.chunk_size,
            max_tokens_per_chunk=request.max_tokens_per_chunk,
            expander=self.node.expander,
        )
        batch_chunks = 1
        while True:
            batch = await self.node.run_sync(_next_batch, chunks, batch_chunks, STREAM_BATCH_ATOMS)
            batch_chunks = STREAM_BATCH_CHUNKS
            self.chunks_produced += len(batch)
            await self.send_flow(batch, stream_id, abandoned=lambda: progress.abandoned)
            if not batch or batch[-1][0].is_final:
                return StreamEnd()

    def _sent_flow(self, count: int) -> None:
        self.chunks_sent += count

    async def _wait_credit(self, arrived: trio.Event) -> None:
        self.waiting_for_credit += 1
        try:
            await arrived.wait()
        finally:
            self.waiting_for_credit -= 1

    async def _query(self, stream_id: int, request: QueryRequest, _req: _Request) -> QueryResponse:
        node = self.node
        context_id = request.id.hex()
        query = ContextQuery(
            type_filter=request.type_filter,
            min_relevance=request.min_relevance,
            max_age_seconds=request.max_age_seconds,
            limit=request.limit,
        )
        now = datetime.now(timezone.utc)
        atoms = await node.run_sync(lambda: query.execute(node.expander.expand(context_id), now))
        if len(atoms) > MAX_ATOMS_PER_MESSAGE:
            raise LocalApiError(ErrorCode.LIMIT_EXCEEDED, f"{len(atoms)} atoms match; ask for a limit")
        return QueryResponse(atoms=tuple(atoms))

    async def _status(self, stream_id: int, request: StatusRequest, _req: _Request) -> StatusResponse:
        return StatusResponse(status=self.node.status())


def _next_batch(chunks, max_chunks: int, max_atoms: int) -> list[tuple[StreamChunk, int]]:
    """Runs in the store thread: the next chunks as messages, with their sizes."""
    batch = []
    atoms = 0
    for chunk in chunks:
        message = StreamChunk(
            chunk_id=chunk.chunk_id,
            atoms=chunk.atoms,
            is_final=chunk.is_final,
            cumulative_tokens=chunk.cumulative_tokens,
            progress=chunk.expansion_progress,
        )
        batch.append((message, len(encode_payload(message))))
        atoms += len(chunk.atoms)
        if chunk.is_final or len(batch) >= max_chunks or atoms >= max_atoms:
            break
    return batch


# --------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------


class _Inbox:
    """What arrived on one stream, for its one consumer.

    Not a bounded channel on purpose: the reader must never block on one
    stream (CREDITs for the others arrive behind it). Flow-controlled items
    are bounded by the stream window, which the Connection enforces; the
    others are one final answer per request.
    """

    def __init__(self) -> None:
        self.items: deque[Received] = deque()
        self._wakeup = trio.Event()
        self._error: LocalApiError | None = None

    def put(self, item: Received) -> None:
        self.items.append(item)
        self._wakeup.set()

    def fail(self, error: LocalApiError) -> None:
        self._error = error
        self._wakeup.set()

    async def get(self) -> Received:
        while not self.items:
            if self._error is not None:
                raise self._error
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        return self.items.popleft()


def _expect(received: Received, cls: type) -> Any:
    message = received.message
    if isinstance(message, Error):
        raise LocalApiError(message.code, message.message)
    if not isinstance(message, cls):
        raise LocalApiError(ErrorCode.PROTOCOL_ERROR, f"the daemon answered {message.TYPE.name}, not {cls.TYPE.name}")
    return message


class LocalClient(_Endpoint):
    """A client of a running daemon's local API.

        async with LocalClient.connect(HomePaths(home)) as client:
            ids = await client.push([ctx])
            async for chunk in client.expand_stream(ids[0]): ...

    Raises DaemonNotRunning when nobody answers on the socket; requests the
    daemon refuses raise LocalApiError(code, message).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
    ) -> None:
        hello = Hello(
            magic=MAGIC,
            versions=PROTOCOL_VERSIONS,
            node_id=CLIENT_NODE_ID,
            max_frame_size=frames.DEFAULT_MAX_FRAME_SIZE,
            stream_window=stream_window,
            connection_window=connection_window,
            root=bytes(32),
            count=0,
        )
        super().__init__(stream, Connection(hello=hello, dialer=True))
        self.server_hello: Hello | None = None
        self._inboxes: dict[int, _Inbox] = {}
        self._reader_done = trio.Event()
        self._closing = False

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        home: HomePaths | str | os.PathLike,
        *,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
    ) -> AsyncIterator[LocalClient]:
        paths = home if isinstance(home, HomePaths) else HomePaths(Path(home))
        path = _socket_path(paths)
        try:
            stream = await trio.open_unix_socket(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise DaemonNotRunning(f"no daemon is running for {paths.root}") from None
        client = cls(stream, stream_window=stream_window, connection_window=connection_window)
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                await client._handshake()
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise ConnectionLost(ErrorCode.INTERNAL, f"the daemon for {paths.root} did not answer within {HELLO_TIMEOUT} s") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._read_responses)
                nursery.start_soon(client._flush_forever)
                try:
                    yield client
                finally:
                    await client.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _sole(group) from None

    async def _handshake(self) -> None:
        try:
            async with self._send_lock:
                await self._write(self.conn.start())
            event = await self.next_event()
        except RemoteProtocolError as exc:
            raise ConnectionLost(exc.code, f"the daemon does not speak this protocol: {exc.message}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            event = None
        if not isinstance(event, Received):
            raise ConnectionLost(ErrorCode.INTERNAL, "the daemon closed the connection before its HELLO")
        self.server_hello = event.message

    async def _read_responses(self) -> None:
        error = ConnectionLost(ErrorCode.INTERNAL, "the daemon closed the connection")
        try:
            while True:
                event = await self.next_event()
                if isinstance(event, ConnectionClosed):
                    break
                message, stream_id = event.message, event.stream_id
                if isinstance(message, Credit):
                    self._credit_arrived()
                elif isinstance(message, Ping):
                    with contextlib.suppress(LocalApiError):
                        self.send_nowait(Pong(nonce=message.nonce))
                elif isinstance(message, Pong):
                    pass
                elif isinstance(message, Goodbye):
                    reason = message.reason or error_code_from_wire(message.code).name
                    error = ConnectionLost(message.code, f"the daemon closed the connection: {reason}")
                    self._fail_all(error)
                    if self.conn.state is State.REMOTE_CLOSING:
                        self._queue(self.conn.send(Goodbye(code=int(ErrorCode.NO_ERROR)), 0))
                elif stream_id == 0:
                    if isinstance(message, Error):
                        error = ConnectionLost(message.code, f"the daemon ended the connection: {message.message}")
                    else:
                        error = ConnectionLost(ErrorCode.PROTOCOL_ERROR, f"the daemon sent {message.TYPE.name} on stream 0")
                    break
                else:
                    # No inbox: the answer to a request its caller gave up
                    # on. (Flow-controlled data for it never gets here: the
                    # Connection drops it and credits it back.)
                    inbox = self._inboxes.get(stream_id)
                    if inbox is not None:
                        inbox.put(event)
        except RemoteProtocolError as exc:
            error = ConnectionLost(exc.code, f"the daemon broke the protocol: {exc.message}")
            await self._send_failure(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionLost):
            pass
        finally:
            self._fail_all(error)
            self._reader_done.set()

    def _on_broken(self) -> None:
        self._fail_all(ConnectionLost(ErrorCode.INTERNAL, "the connection to the daemon broke while sending"))

    def _fail_all(self, error: LocalApiError) -> None:
        if self._lost is None:
            self._lost = error
        for inbox in self._inboxes.values():
            inbox.fail(self._lost)
        self._credit_arrived()  # flow waiters look at _lost

    async def aclose(self) -> None:
        """Say GOODBYE (shielded, short deadline) and close. Safe to repeat."""
        if self._closing:
            return
        self._closing = True
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            if self._lost is None and self.conn.state is State.OPEN:
                await self._send_goodbye(ErrorCode.NO_ERROR)
                await self._reader_done.wait()
        self._fail_all(ConnectionLost(ErrorCode.INTERNAL, "the client is closed"))
        await trio.aclose_forcefully(self.stream)

    # ------------------------------------------------------------ requests

    def _open(self) -> tuple[int, _Inbox]:
        if self._closing:
            raise ConnectionLost(ErrorCode.INTERNAL, "the client is closed")
        self._check_open()
        stream_id = self.conn.open_stream()
        inbox = self._inboxes[stream_id] = _Inbox()
        return stream_id, inbox

    def _forget(self, stream_id: int) -> None:
        self._inboxes.pop(stream_id, None)
        self.conn.close_stream(stream_id)

    async def _call(self, message: Message, answer: type) -> Any:
        stream_id, inbox = self._open()
        try:
            await self.send(message, stream_id)
            return _expect(await inbox.get(), answer)
        finally:
            self._forget(stream_id)

    async def push(self, contexts: Sequence[Any]) -> list[str]:
        """Store contexts through the daemon, in order; each is committed before the next is sent."""
        ids = []
        for context in contexts:
            message = PushContext(context=encode_context(context))
            stream_id, inbox = self._open()
            try:
                await self.send_flow([(message, len(encode_payload(message)))], stream_id)
                ack = _expect(await inbox.get(), Ack)
            finally:
                self._forget(stream_id)
            if [i.hex() for i in ack.ids] != [context.id]:
                raise LocalApiError(ErrorCode.INTERNAL, f"the daemon acknowledged {[i.hex() for i in ack.ids]}, not {context.id}")
            ids.append(context.id)
        return ids

    async def expand(self, context_id: str, *, min_relevance: float = 0.0, max_tokens: int | None = None) -> ExpandResponse:
        request = ExpandRequest(id=bytes.fromhex(check_id(context_id, "context id")), min_relevance=min_relevance, max_tokens=max_tokens)
        response = await self._call(request, ExpandResponse)
        if atom_root(response.atoms) != response.atom_root:
            raise LocalApiError(ErrorCode.INVALID_OBJECT, "the expansion does not match its atom_root")
        return response

    def expand_stream(
        self,
        context_id: str,
        *,
        relevance_threshold: float = 0.0,
        chunk_size: int = 10,
        max_tokens_per_chunk: int = 500,
    ) -> ChunkStream:
        """The lazy expansion, chunk by chunk: `async for chunk in client.expand_stream(id)`.

        Credit for a chunk goes back when the next one is asked for, so the
        daemon runs at most a window ahead of the consumer. Leaving early:
        use `async with` (or call aclose()) so the daemon stops producing.
        """
        request = StreamRequest(
            id=bytes.fromhex(check_id(context_id, "context id")),
            relevance_threshold=relevance_threshold,
            chunk_size=chunk_size,
            max_tokens_per_chunk=max_tokens_per_chunk,
        )
        return ChunkStream(self, request)

    async def query(
        self,
        context_id: str,
        *,
        type_filter: TypeSignature | None = None,
        min_relevance: float = 0.0,
        max_age_seconds: float | None = None,
        limit: int | None = None,
    ) -> list[MemoryAtom]:
        request = QueryRequest(
            id=bytes.fromhex(check_id(context_id, "context id")),
            type_filter=type_filter,
            min_relevance=min_relevance,
            max_age_seconds=max_age_seconds,
            limit=limit,
        )
        return list((await self._call(request, QueryResponse)).atoms)

    async def status(self) -> dict:
        return (await self._call(StatusRequest(), StatusResponse)).status

    async def ping(self, nonce: int = 0) -> None:
        await self.send(Ping(nonce=nonce))


class ChunkStream:
    """An async iterator of StreamChunk; also an async context manager."""

    def __init__(self, client: LocalClient, request: StreamRequest) -> None:
        self._client = client
        self._request = request
        self._stream_id: int | None = None
        self._inbox: _Inbox | None = None
        self._held = 0  # bytes of the chunk the consumer holds, not yet released
        self._done = False

    def __aiter__(self) -> ChunkStream:
        return self

    async def __aenter__(self) -> ChunkStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def __anext__(self) -> StreamChunk:
        if self._done:
            raise StopAsyncIteration
        client = self._client
        if self._stream_id is None:
            self._stream_id, self._inbox = client._open()
            await client.send(self._request, self._stream_id)
        if self._held:
            held, self._held = self._held, 0
            await client.release(self._stream_id, held)
        received = await self._inbox.get()
        if isinstance(received.message, StreamChunk):
            self._held = received.size
            return received.message
        self._done = True
        client._forget(self._stream_id)
        if isinstance(received.message, StreamEnd):
            raise StopAsyncIteration
        _expect(received, StreamEnd)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Stop early: tell the daemon, and free the window of unread chunks."""
        if self._done:
            return
        self._done = True
        if self._stream_id is None:
            return
        client = self._client
        try:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                with contextlib.suppress(LocalApiError, trio.BrokenResourceError, trio.ClosedResourceError):
                    await client.send(Error(code=int(ErrorCode.NO_ERROR), message="cancelled"), self._stream_id)
        finally:
            # Chunks already here are released now (no await between the
            # count and the close); those still on their way are dropped
            # and credited back by the Connection.
            unread = self._held + sum(r.size for r in self._inbox.items if r.message.TYPE in FLOW_CONTROLLED)
            client._forget(self._stream_id)
            if unread:
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    with contextlib.suppress(LocalApiError, trio.BrokenResourceError, trio.ClosedResourceError):
                        await client.release(self._stream_id, unread)
