"""The local API: AI clients on this machine talk to the daemon over a Unix socket.

The socket (`HomePaths.api_socket`, mode 0600) carries the peer protocol's
frames through the same sans-IO `Connection`: HELLO both ways first (a
client's node id is 32 zero bytes), then one request per stream, opened by
the client. The server answers on that stream and forgets it:

    PUSH_CONTEXT    -> ACK(ids) once committed, or ERROR; a push of many is
                       one stream, `more` on all but the last, committed
                       whole in one transaction (daemon/pushes.py)
    EXPAND_REQUEST  -> EXPAND_RESPONSE, or ERROR (LIMIT_EXCEEDED: stream it)
    STREAM_REQUEST  -> STREAM_CHUNK... (flow-controlled) then STREAM_END, or ERROR
    QUERY_REQUEST   -> QUERY_RESPONSE, or ERROR
    STATUS_REQUEST  -> STATUS_RESPONSE
    REF_SET         -> ACK(update ids) once committed and announced, or ERROR
                       (BAD_REQUEST: bad name; MISSING_BASE: target not held;
                       NOT_FOUND: deleting a ref that does not exist)
    REFS_REQUEST    -> REFS_RESPONSE, or ERROR (NOT_FOUND: no such ref)
    REFS_WATCH      -> REFS_RESPONSE (the watched refs now), then REF_CHANGED
                       per change of a watched ref's value, until abandoned
    REF_APPEND      -> ACK(context id, update ids) once the delta is stored on
                       the ref's value and the ref moved, atomically; or ERROR
                       (BAD_REQUEST: bad name, ref in conflict, unknown atom)
    RESOLVE         -> RESOLVED(id) for an id, ref name or unique prefix; or
                       ERROR (NOT_FOUND; BAD_REQUEST: not one, or ambiguous)
    PEER_FORGET     -> PEER_FORGOTTEN(peers dropped from the peer table), or
                       ERROR (NOT_FOUND: no peer matches; BAD_REQUEST: one
                       is connected, or an id prefix names several)
    PING -> PONG and GOODBYE -> GOODBYE, on stream 0.

A client abandons a stream by sending ERROR (code NO_ERROR) on it; the
server stops producing chunks for it. A protocol error ends only the client
that made it. Store and expander are touched only through `node.run_sync`.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from datetime import datetime, timezone
from typing import Any

import anyio
import attrs
import trio

from daemon.logs import RateLimitedLog, forget_traceback as _forget_traceback
from daemon.paths import HomePaths
from sync import frames, fulltext
from sync.codec import DecodeError
from sync.connection import Connection, ConnectionClosed, Received, State
from sync.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from sync.expand import StreamCursor
from sync.flow import FlowStatistics
from sync.messages import (
    FLOW_CONTROLLED,
    MAX_ATOMS_PER_MESSAGE,
    MAX_IDS_PER_MESSAGE,
    MAX_REASON_LENGTH,
    MAX_REFS_PER_MESSAGE,
    Ack,
    Credit,
    Error,
    ExpandRequest,
    ExpandResponse,
    Goodbye,
    Hello,
    Message,
    PeerForget,
    PeerForgotten,
    Ping,
    Pong,
    PushContext,
    QueryRequest,
    QueryResponse,
    RefAppend,
    RefChanged,
    RefSet,
    RefsRequest,
    RefsResponse,
    RefsWatch,
    Resolve,
    Resolved,
    StatusRequest,
    StatusResponse,
    StreamChunk,
    StreamEnd,
    StreamRequest,
    encode_payload,
    make_hello,
)
from sync.model import check_id, is_id
from sync.query import ContextQuery
from sync.refs import RefValue, check_ref_name, is_ref_update_bytes
from sync.store import CorruptObject, MissingBase, NotFound, StoreError, StoreUnavailable

from daemon.endpoint import (
    ConnectionLost,
    DaemonAlreadyRunning,
    DaemonNotRunning,
    HELLO_TIMEOUT,
    LISTEN_BACKLOG,
    LOCK_TIMEOUT,
    LocalApiError,
    MAX_REQUESTS_PER_CLIENT,
    MAX_WATCHES_PER_CLIENT,
    PROBE_TIMEOUT,
    STREAM_BATCH_ATOMS,
    STREAM_BATCH_CHUNKS,
    MAX_LOCAL_CLIENTS,
    _Abandoned,
    _Endpoint,
    _socket_path,
    atom_root,
    send_and_close,
    filter_expansion,
    logger,
    read_ref_values,
    read_refs,
    ref_value_to_json,
    resolve_context_id,
)
from daemon.pushes import ArrivingPush, PushRefused, Spool
from daemon.client import ChunkStream, LocalClient, RefChange, RefWatch

# The client lives in daemon/client.py; it is re-exported here so callers
# can take everything about the local API from one module.
__all__ = [
    "ChunkStream", "ConnectionLost", "DaemonAlreadyRunning", "DaemonNotRunning", "LocalApiError",
    "LocalApiServer", "LocalClient", "RefChange", "RefWatch", "serve_local_api",
]

# --------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------

_refusals = RateLimitedLog(logger)
_errors = RateLimitedLog(logger, interval=600.0)  # our bugs: once per class per 10 min


@attrs.frozen(kw_only=True)
class ClientStatistics:
    requests: int  # in progress, queued pushes included
    chunks_produced: int  # stream chunks built in the store thread
    chunks_sent: int
    waiting_for_credit: int  # requests blocked on the client's flow-control window
    watches: int  # ref watches open (counted in requests too)
    watch_pending: int  # names marked changed, not yet read and told (all watches): at most one per watched ref each
    flow: FlowStatistics | None


@attrs.frozen(kw_only=True)
class LocalApiStatistics:
    clients_connected: int
    clients_served: int
    clients: tuple[ClientStatistics, ...]


async def serve_local_api(node: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the local API of `node` until cancelled."""
    config = getattr(node, "config", None)
    limit = config.max_local_clients if config is not None else MAX_LOCAL_CLIENTS
    await LocalApiServer(node, max_clients=limit).serve(task_status=task_status)


class LocalApiServer:
    def __init__(self, node: Any, *, max_message_size: int = frames.DEFAULT_MAX_MESSAGE_SIZE,
                 max_clients: int = MAX_LOCAL_CLIENTS) -> None:
        self.node = node
        self.max_message_size = max_message_size
        self.max_clients = max_clients
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
        self._served += 1
        if len(self._sessions) >= self.max_clients:
            await self._refuse(stream)
            return
        session = _Session(self, stream)
        self._sessions.add(session)
        try:
            await session.run()
        except Exception as exc:
            # A bug serving one client must not take the daemon down; its
            # traceback must not keep the session alive either.
            _errors.error(type(exc).__name__, "local API client failed", exc_info=exc)
            _forget_traceback(exc)
            del exc
        finally:
            self._sessions.discard(session)
            await trio.aclose_forcefully(stream)

    async def _refuse(self, stream: trio.abc.Stream) -> None:
        _refusals.warning("clients", "local API: refused a client, %d connected already", self.max_clients)
        refusal = Connection(hello=_server_hello(self.node), dialer=False).refuse(
            ErrorCode.LIMIT_EXCEEDED, f"the daemon serves at most {self.max_clients} local clients at once; try again later")
        await send_and_close(stream, refusal)


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
    return make_hello(
        node_id=bytes.fromhex(check_id(node.node_id, "node id")),
        root=bytes.fromhex(root) if is_id(root) else bytes(32),
        count=count if type(count) is int and count >= 0 else 0,
    )


def _error_reply(exc: Exception) -> Error:
    if isinstance(exc, LocalApiError):
        code = exc.code
    elif isinstance(exc, StoreUnavailable):
        code = ErrorCode.UNAVAILABLE
    elif isinstance(exc, CorruptObject):
        code = ErrorCode.INVALID_OBJECT  # a stored object's bytes no longer match its id
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


# Request type -> the _Session method serving it. Names, not bound methods
# kept on the session: those would make every session a reference cycle.
_HANDLERS = {
    ExpandRequest: "_expand",
    StreamRequest: "_stream",
    QueryRequest: "_query",
    StatusRequest: "_status",
    RefSet: "_ref_set",
    RefsRequest: "_refs",
    RefsWatch: "_watch",
    Resolve: "_resolve",
    PeerForget: "_peer_forget",
}


class _Watch:
    """One ref watch's pending changes: the set of watched names whose value
    may have changed since it was last read. A name is in it once however
    many updates arrive, so what a client that does not read costs is
    bounded by the refs it watches, not by the number of changes."""

    def __init__(self, names: frozenset[str] | None) -> None:
        self.names = names
        self.pending: set[str] = set()
        self._wakeup = trio.Event()

    def changed(self, name: str) -> None:
        """The node's watch_refs callback (synchronous, never blocks)."""
        if self.names is None or name in self.names:
            self.pending.add(name)
            self._wakeup.set()

    def wake(self) -> None:
        self._wakeup.set()

    async def wait(self, request: _Request) -> set[str]:
        """The names changed since the last call (taken), or _Abandoned."""
        while not self.pending:
            if request.abandoned:
                raise _Abandoned
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        if request.abandoned:
            raise _Abandoned
        names, self.pending = self.pending, set()
        return names


@attrs.define
class _Request:
    abandoned: bool = False
    watch: _Watch | None = None
    push: ArrivingPush | None = None  # a push of many, until its last message


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
        self._client_left = False
        self._build_lock = trio.Lock()  # see _stream
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
            watches=self._watch_count(),
            watch_pending=sum(len(r.watch.pending) for r in self._requests.values() if r.watch is not None),
            flow=self.conn.statistics(),
        )

    def _watch_count(self) -> int:
        return sum(1 for r in self._requests.values() if r.watch is not None)

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
                if request.watch is not None:
                    request.watch.wake()
                if request.push is not None:
                    request.push.wake()
                self._credit_arrived()
        elif stream_id == 0:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{message.TYPE.name} needs a stream of its own")
        elif stream_id <= self._last_request_stream:
            request = self._requests.get(stream_id)
            push = None if request is None else request.push
            if not isinstance(message, PushContext):
                raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"stream {stream_id} already carried a request")
            if push is not None and not push.complete:
                push.arrived(message, event.size)
            else:
                # Late: the push was refused, given up, or already complete.
                # Dropped, its credit returned (section 4: late frames never
                # fail a connection).
                self._queue(self.conn.release(stream_id, event.size))
        else:
            self._last_request_stream = stream_id
            self._admit(event)
        return None

    def _admit(self, event: Received) -> None:
        message, stream_id = event.message, event.stream_id
        held = event.size if message.TYPE in FLOW_CONTROLLED else 0
        if not isinstance(message, (PushContext, RefAppend)) and type(message) not in _HANDLERS:
            error = Error(code=int(ErrorCode.BAD_REQUEST), message=f"the local API does not take {message.TYPE.name}")
        elif len(self._requests) >= MAX_REQUESTS_PER_CLIENT:
            error = Error(
                code=int(ErrorCode.LIMIT_EXCEEDED),
                message=f"more than {MAX_REQUESTS_PER_CLIENT} requests in progress; wait for some to finish",
            )
        elif isinstance(message, RefsWatch) and self._watch_count() >= MAX_WATCHES_PER_CLIENT:
            error = Error(
                code=int(ErrorCode.LIMIT_EXCEEDED),
                message=f"more than {MAX_WATCHES_PER_CLIENT} ref watches open; abandon one first",
            )
        elif isinstance(message, PushContext) and message.more:
            # The first of a push of many: spooled as it comes, then
            # committed whole, in the order of the pushes' last messages.
            request = self._requests[stream_id] = _Request(push=ArrivingPush(Spool(self.node.paths.root)))
            request.push.arrived(message, held)
            self._nursery.start_soon(self._receive_push, stream_id, request)
            return
        elif isinstance(message, (PushContext, RefAppend)):
            # Writes that carry atoms: committed in arrival order, credit
            # returned once stored.
            self._requests[stream_id] = _Request()
            self._push_send.send_nowait((stream_id, message, held))
            return
        else:
            request = self._requests[stream_id] = _Request()
            if isinstance(message, RefsWatch):
                request.watch = _Watch(None if message.names is None else frozenset(message.names))
            handler = getattr(self, _HANDLERS[type(message)])
            self._nursery.start_soon(self._run_request, handler, stream_id, message, request)
            return
        self.send_nowait(error, stream_id, close=True, release=held)

    async def _run_request(self, handler, stream_id: int, message: Message, request: _Request) -> None:
        try:
            try:
                reply = await handler(stream_id, message, request)
            except (ConnectionLost, _Abandoned, trio.BrokenResourceError, trio.ClosedResourceError):
                reply = None  # the client gave up or left: a normal end, nothing to say
            except Exception as exc:
                # Left while we worked? Then whatever failed has no one to tell.
                reply = _error_reply(exc) if self.conn.state is State.OPEN else None
                del exc
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
                if isinstance(reply, list):  # a push of many: its ids, in ACKs that fit
                    for ack in reply[:-1]:
                        await self.send(ack, stream_id)
                    reply = reply[-1]
                await self.send(reply, stream_id, close=True, release=size)
            except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
                self._on_broken()
                return
            finally:
                if isinstance(message, Spool):
                    message.close()
                self._requests.pop(stream_id, None)

    async def _receive_push(self, stream_id: int, request: _Request) -> None:
        """Spool a push of many as it arrives, returning credit as it is
        written; once whole, queue it for the commit."""
        push = request.push
        try:
            while not request.abandoned:
                blobs, size = push.take()
                if blobs:
                    await trio.to_thread.run_sync(push.spool.write, blobs)
                    if push.complete and not push.waiting:
                        # The last message's credit goes back with the ACK.
                        request.push = None
                        self._push_send.send_nowait((stream_id, push.spool, size))
                        return
                    await self.release(stream_id, size)
                await push.wait()
            # The client gave up: nothing of it is stored. What arrived
            # and waits is credited back; what is still coming is dropped
            # (by _dispatch until the stream is closed, then by the
            # connection), with no wait in between to let frames slip by.
            request.push = None
            push.spool.close()
            rest = push.take()[1]
            self.conn.close_stream(stream_id)
            self._requests.pop(stream_id, None)
            if rest:
                await self.release(stream_id, rest)
        except (PushRefused, OSError) as exc:
            push.spool.close()
            request.push = None
            reply = _error_reply(StoreUnavailable(str(exc), disk_full=exc.errno == errno.ENOSPC)
                                 if isinstance(exc, OSError) else exc)
            with contextlib.suppress(ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
                # Closing the stream drops (and credits back) what is still coming.
                await self.send(reply, stream_id, close=True, release=size + push.take()[1])
            self._requests.pop(stream_id, None)
        except BaseException:
            push.spool.close()
            raise

    async def _commit(self, message: PushContext | RefAppend | Spool) -> Ack | Error | list[Ack]:
        try:
            if isinstance(message, Spool):
                ids = await self.node.add_batches(message.batches)
                return [Ack(ids=tuple(bytes.fromhex(i) for i in ids[k:k + MAX_IDS_PER_MESSAGE]))
                        for k in range(0, len(ids), MAX_IDS_PER_MESSAGE)]
            if isinstance(message, RefAppend):
                context_id, update_ids = await self.node.append_to_ref(
                    message.name, message.delta_atoms, [h.hex() for h in message.removed_hashes], message.metadata)
                return Ack(ids=tuple(bytes.fromhex(i) for i in [context_id, *update_ids]))
            # One context: the same path as a push of many (rules included).
            if is_ref_update_bytes(message.context):
                raise PushRefused("PUSH_CONTEXT carries contexts; this is a ref update (use REF_SET)")
            ids = await self.node.add_batches(lambda: [[message.context]])
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
        cursor = StreamCursor(
            target=request.id.hex(),
            relevance_threshold=request.relevance_threshold,
            chunk_size=request.chunk_size,
            max_tokens_per_chunk=request.max_tokens_per_chunk,
        )
        batch_chunks = 1  # the first chunk alone: its followers must not delay it
        abandoned = lambda: progress.abandoned  # noqa: E731
        while not cursor.done:
            # Build only for room the reader has opened: a stalled reader
            # costs its stream a cursor, nothing built. Streams of one client
            # share the connection window, so one builds and sends at a time,
            # and each sees the room the others left.
            await self.wait_for_capacity(stream_id, abandoned=abandoned)
            async with self._build_lock:
                budget = self.conn.send_capacity(stream_id)
                if not budget:
                    continue
                batch = await self.node.run_sync(
                    _next_batch, cursor, self.node.store, self.node.expander, batch_chunks, budget)
                batch_chunks = STREAM_BATCH_CHUNKS
                self.chunks_produced += len(batch)
                fits = sum(size for _, size in batch) <= budget
                if fits:
                    await self.send_flow(batch, stream_id, abandoned=abandoned)
            if not fits:  # one chunk larger than the room: it waits alone, lock released
                await self.send_flow(batch, stream_id, abandoned=abandoned)
        return StreamEnd()

    def _sent_flow(self, count: int) -> None:
        self.chunks_sent += count

    async def _wait_credit(self, arrived: anyio.Event) -> None:
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
            text=request.text,
        )
        now = datetime.now(timezone.utc)
        # With text, the store's full-text index answers (built first if it is missing).
        atoms = await node.run_sync(
            lambda: fulltext.run_query(node.store, node.expander.expand(context_id), query, now))
        if len(atoms) > MAX_ATOMS_PER_MESSAGE:
            raise LocalApiError(ErrorCode.LIMIT_EXCEEDED, f"{len(atoms)} atoms match; ask for a limit")
        return QueryResponse(atoms=tuple(atoms))

    async def _status(self, stream_id: int, request: StatusRequest, _req: _Request) -> StatusResponse:
        return StatusResponse(status=self.node.status())

    async def _ref_set(self, stream_id: int, request: RefSet, _req: _Request) -> Ack:
        # The node checks the name (ValueError: BAD_REQUEST) and the target
        # (MissingTarget: MISSING_BASE), signs with its key and announces.
        node = self.node
        if request.target is not None:
            ids = await node.set_ref(request.name, request.target.hex())
        else:
            check_ref_name(request.name)
            if await node.run_sync(node.store.ref_value, request.name) is None:
                raise NotFound(request.name, "ref")
            ids = await node.delete_ref(request.name)
        return Ack(ids=tuple(bytes.fromhex(i) for i in ids))

    async def _refs(self, stream_id: int, request: RefsRequest, _req: _Request) -> RefsResponse:
        node = self.node
        items = await node.run_sync(read_refs, node.store, request.name, request.log)
        if len(items) > MAX_REFS_PER_MESSAGE:
            raise LocalApiError(ErrorCode.LIMIT_EXCEEDED, f"{len(items)} refs, over {MAX_REFS_PER_MESSAGE} per message")
        return RefsResponse(refs=tuple(items))

    async def _resolve(self, stream_id: int, request: Resolve, _req: _Request) -> Resolved:
        node = self.node
        context_id, _value = await node.run_sync(resolve_context_id, node.store, request.text)
        return Resolved(id=bytes.fromhex(context_id))

    async def _peer_forget(self, stream_id: int, request: PeerForget, _req: _Request) -> PeerForgotten:
        try:
            forgotten = self.node.forget_peer(request.peer)
        except LookupError as exc:
            raise LocalApiError(ErrorCode.NOT_FOUND, str(exc)) from None
        return PeerForgotten(peers=tuple(forgotten))  # ValueError above: BAD_REQUEST

    async def _watch(self, stream_id: int, request: RefsWatch, progress: _Request) -> None:
        """REFS_RESPONSE with the watched refs now, then REF_CHANGED per real
        change of a watched ref's value (target, conflict or candidates),
        compared with what this client was last told. Runs until abandoned
        (_Abandoned) or the client leaves (cancelled).

        REF_CHANGED is a control message: while the client does not read, the
        send below waits and changes coalesce in the watch's pending set.
        """
        node, watch = self.node, progress.watch
        if watch.names is not None:
            for name in watch.names:
                check_ref_name(name)
        # Watching before reading the starting values: a change stored in
        # between is read again and, if it is in the snapshot, not told twice.
        stop = node.watch_refs(watch.changed)
        try:
            known = await node.run_sync(read_ref_values, node.store, watch.names)
            if len(known) > MAX_REFS_PER_MESSAGE:
                raise LocalApiError(ErrorCode.LIMIT_EXCEEDED, f"{len(known)} refs, over {MAX_REFS_PER_MESSAGE}; watch some by name")
            await self.send(RefsResponse(refs=tuple(ref_value_to_json(known[n]) for n in sorted(known))), stream_id)
            while True:
                names = sorted(await watch.wait(progress))
                store = node.store
                values = await node.run_sync(lambda: {n: store.ref_value(n) for n in names})
                for name in names:
                    old, new = known.get(name), values[name]
                    if _same_value(old, new):
                        continue
                    if new is None:
                        known.pop(name, None)
                    else:
                        known[name] = new
                    if progress.abandoned:
                        raise _Abandoned
                    await self.send(_ref_changed(name, old, new), stream_id)
        finally:
            stop()


def _same_value(old: RefValue | None, new: RefValue | None) -> bool:
    if old is None or new is None:
        return old is new
    return (old.target, old.conflict, old.candidates) == (new.target, new.conflict, new.candidates)


def _ref_changed(name: str, old: RefValue | None, new: RefValue | None) -> RefChanged:
    # Candidates beyond the message bound (only members minting updates
    # make so many) are cut; the winner is always in `new`.
    candidates = new.candidates[:MAX_IDS_PER_MESSAGE] if new is not None else ()
    return RefChanged(
        name=name,
        old=bytes.fromhex(old.target) if old is not None else None,
        new=bytes.fromhex(new.target) if new is not None else None,
        conflict=new.conflict if new is not None else False,
        candidates=tuple(bytes.fromhex(c) for c in candidates),
    )


def _next_batch(cursor: StreamCursor, store, expander, max_chunks: int, budget: int) -> list[tuple[StreamChunk, int]]:
    """Runs in the store thread: the next chunks as messages, with their sizes.

    As many as fit `budget` bytes (the reader's window now), and always at
    least one: a chunk larger than the window waits for it alone. The
    cursor moves past what is returned.
    """
    batch = []
    spent = 0
    for chunk in cursor.next_chunks(store, expander, max_chunks=max_chunks, max_atoms=STREAM_BATCH_ATOMS):
        message = StreamChunk(
            chunk_id=chunk.chunk_id,
            atoms=chunk.atoms,
            is_final=chunk.is_final,
            cumulative_tokens=chunk.cumulative_tokens,
            progress=chunk.expansion_progress,
        )
        size = len(encode_payload(message))
        if batch and spent + size > budget:
            break
        batch.append((message, size))
        spent += size
        cursor.advance(chunk)
    return batch
