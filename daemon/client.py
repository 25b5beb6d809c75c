"""The local API client: what AI tools import to talk to a running daemon.

Written with anyio, so it runs in asyncio programs (`asyncio.run`,
`anyio.run`) and in trio ones (`trio.run`: the daemon's CLI and MCP
server) alike. Transport errors become LocalApiError/ConnectionLost here,
at one boundary.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.abc
import attrs

from daemon.paths import HomePaths, resolve_home
from sync.codec import DecodeError, context_from_json, encode_context
from sync.connection import Connection, ConnectionClosed, Received, State
from sync.errors import ErrorCode, RemoteProtocolError, error_code_from_wire
from sync.flow import DEFAULT_CONNECTION_WINDOW, DEFAULT_STREAM_WINDOW
from sync.messages import (
    FLOW_CONTROLLED,
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
from sync.model import CompressedContext, MemoryAtom, TypeSignature, check_id, is_id
from sync.refs import check_ref_name

from daemon.endpoint import (
    CLIENT_NODE_ID,
    CLOSE_TIMEOUT,
    ConnectionLost,
    DaemonNotRunning,
    HELLO_TIMEOUT,
    LocalApiError,
    MIN_ID_PREFIX,
    TRANSPORT_ERRORS,
    _Abandoned,
    _Endpoint,
    _socket_path,
    _sole,
    atom_root,
)

# --------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------

# Bytes of PUSH_CONTEXT messages handed to one send: a quarter of the
# daemon's stream window, so a write carries real work and credit coming
# back keeps the pipe full.
PUSH_GROUP_BYTES = 4 * 1024 * 1024


class _ByteStream:
    """An anyio byte stream with the interface _Endpoint speaks (trio's
    Stream): send_all, receive_some (b"" at the end of the stream), aclose."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream

    async def send_all(self, data: bytes) -> None:
        await self._stream.send(data)

    async def receive_some(self, max_bytes: int) -> bytes:
        try:
            return await self._stream.receive(max_bytes)
        except anyio.EndOfStream:
            return b""

    async def aclose(self) -> None:
        await self._stream.aclose()


class _Inbox:
    """What arrived on one stream, for its one consumer.

    Not a bounded channel on purpose: the reader must never block on one
    stream (CREDITs for the others arrive behind it). Flow-controlled items
    are bounded by the stream window, which the Connection enforces; the
    others are one final answer per request.
    """

    def __init__(self) -> None:
        self.items: deque[Received] = deque()
        self._wakeup = anyio.Event()
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
            self._wakeup = anyio.Event()
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
    """A client of a running daemon's local API, under asyncio or trio.

        async with LocalClient.connect(home) as client:   # a HomePaths, str or path
            ids = await client.push([ctx])                 # contexts or interchange-JSON dicts
            async for chunk in client.expand_stream("main"): ...   # id, prefix or ref name

    Raises DaemonNotRunning when nobody answers on the socket; requests the
    daemon refuses raise LocalApiError(code, message).
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        *,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
    ) -> None:
        hello = make_hello(
            node_id=CLIENT_NODE_ID, root=bytes(32), count=0,
            stream_window=stream_window, connection_window=connection_window,
        )
        super().__init__(_ByteStream(stream), Connection(hello=hello, dialer=True))
        self.server_hello: Hello | None = None
        self._inboxes: dict[int, _Inbox] = {}
        self._reader_done = anyio.Event()
        self._lost_is_guess = False
        self._closing = False

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        home: HomePaths | str | os.PathLike | None = None,
        *,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
    ) -> AsyncIterator[LocalClient]:
        """Connect to the daemon of `home` (None: as the CLI finds it without
        --home: $CTXFS_HOME, else the user data dir); closed on leaving."""
        paths = home if isinstance(home, HomePaths) else HomePaths(resolve_home(home))
        path = _socket_path(paths)
        try:
            stream = await anyio.connect_unix(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise DaemonNotRunning(f"no daemon is running for {paths.root}") from None
        client = cls(stream, stream_window=stream_window, connection_window=connection_window)
        try:
            with anyio.fail_after(HELLO_TIMEOUT):
                await client._handshake()
        except TimeoutError:
            await anyio.aclose_forcefully(stream)
            raise ConnectionLost(ErrorCode.INTERNAL, f"the daemon for {paths.root} did not answer within {HELLO_TIMEOUT} s") from None
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(client._read_responses)
                tasks.start_soon(client._flush_forever)
                try:
                    yield client
                finally:
                    await client.aclose()
                    tasks.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _sole(group) from None

    async def _handshake(self) -> None:
        try:
            async with self._send_lock:
                await self._write(self.conn.start())
            event = await self.next_event()
        except RemoteProtocolError as exc:
            raise ConnectionLost(exc.code, f"the daemon does not speak this protocol: {exc.message}") from None
        except TRANSPORT_ERRORS:
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
                        if isinstance(message, Error):
                            self._credit_arrived()  # a sender waiting on that stream stops
        except RemoteProtocolError as exc:
            error = ConnectionLost(exc.code, f"the daemon broke the protocol: {exc.message}")
            await self._send_failure(exc)
        except (*TRANSPORT_ERRORS, ConnectionLost):
            pass
        finally:
            self._fail_all(error)
            self._reader_done.set()

    def _on_broken(self) -> None:
        self._fail_all(ConnectionLost(ErrorCode.INTERNAL, "the connection to the daemon broke while sending"), guess=True)

    def _fail_all(self, error: LocalApiError, *, guess: bool = False) -> None:
        # A write that broke is only a symptom; the daemon's own ERROR or
        # GOODBYE, read after it, says why, and replaces it.
        if self._lost is None or (self._lost_is_guess and not guess):
            self._lost = error
            self._lost_is_guess = guess
        for inbox in self._inboxes.values():
            inbox.fail(self._lost)
        self._credit_arrived()  # flow waiters look at _lost

    async def aclose(self) -> None:
        """Say GOODBYE (shielded, short deadline) and close. Safe to repeat."""
        if self._closing:
            return
        self._closing = True
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            if self._lost is None and self.conn.state is State.OPEN:
                await self._send_goodbye(ErrorCode.NO_ERROR)
                await self._reader_done.wait()
        self._fail_all(ConnectionLost(ErrorCode.INTERNAL, "the client is closed"))
        await anyio.aclose_forcefully(self.stream)

    # ------------------------------------------------------------ requests

    def _open(self) -> tuple[int, _Inbox]:
        if self._closing:
            raise ConnectionLost(ErrorCode.INTERNAL, "the client is closed")
        self._check_open()
        stream_id = self.conn.open_stream()
        inbox = self._inboxes[stream_id] = _Inbox()
        return stream_id, inbox

    async def abandon(self, stream_id: int, reason: str) -> None:
        """Tell the daemon we gave up on a stream (ERROR NO_ERROR on it):
        shielded, within CLOSE_TIMEOUT, and silent if the connection is gone."""
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            with contextlib.suppress(LocalApiError, *TRANSPORT_ERRORS):
                await self.send(Error(code=int(ErrorCode.NO_ERROR), message=reason), stream_id)

    def _forget(self, stream_id: int) -> None:
        self._inboxes.pop(stream_id, None)
        self.conn.close_stream(stream_id)

    async def _call(self, message: Message, answer: type) -> Any:
        stream_id, inbox = self._open()
        try:
            await self._sending(self.send(message, stream_id))
            return _expect(await inbox.get(), answer)
        finally:
            self._forget(stream_id)

    async def _sending(self, sent: Awaitable[None]) -> None:
        """Await a send; if the daemon closed under it, raise why it did."""
        try:
            await sent
        except TRANSPORT_ERRORS:
            with anyio.move_on_after(CLOSE_TIMEOUT):
                await self._reader_done.wait()  # it may have read the daemon's reason
            lost = self._lost or ConnectionLost(ErrorCode.INTERNAL, "the daemon closed the connection")
            raise type(lost)(lost.code, lost.message) from None

    async def push(
        self,
        contexts: Sequence[CompressedContext | dict],
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """Store contexts through the daemon, all or nothing; their ids, in order.

        Each is a CompressedContext or an interchange-JSON dict (what
        `ctxfs push` reads); all are checked before any is sent, so a bad
        one (DecodeError naming its field) stores nothing. The push is one
        stream, sent as the daemon's window allows and committed by it in
        one transaction once whole; if this call fails or is cancelled
        before the ACK, nothing of it is stored. `progress(sent, total)` is
        called as contexts go out.
        """
        if isinstance(contexts, (dict, CompressedContext)):
            raise TypeError("push takes a list of contexts (CompressedContext or interchange-JSON dicts)")
        checked = [_as_context(c, i) for i, c in enumerate(contexts)]
        if not checked:
            return []
        last = len(checked) - 1
        stream_id, inbox = self._open()
        acked = False
        try:
            start = 0
            while start <= last:
                # Enough messages per send to fill a good part of a window
                # in one write, few enough that progress moves.
                group, size = [], 0
                for k in range(start, last + 1):
                    message = PushContext(context=encode_context(checked[k]), more=k < last)
                    group.append((message, len(encode_payload(message))))
                    size += group[-1][1]
                    if size >= PUSH_GROUP_BYTES:
                        break
                try:
                    # An early answer is the daemon's refusal: stop sending.
                    await self._sending(self.send_flow(group, stream_id, abandoned=lambda: bool(inbox.items)))
                except _Abandoned:
                    _expect(await inbox.get(), Ack)
                    raise LocalApiError(ErrorCode.PROTOCOL_ERROR, "the daemon acknowledged a push before its end") from None
                start += len(group)
                if progress is not None:
                    progress(start, len(checked))
            ids: list[str] = []
            while len(ids) < len(checked):
                ids += (i.hex() for i in _expect(await inbox.get(), Ack).ids)
            acked = True
        finally:
            if not acked and stream_id in self._inboxes and self._lost is None:
                # Given up before the commit (cancelled, or an error here):
                # the daemon drops what it spooled.
                await self.abandon(stream_id, "push abandoned")
            self._forget(stream_id)
        expected = [c.id for c in checked]
        if ids != expected:
            raise LocalApiError(ErrorCode.INTERNAL, f"the daemon acknowledged {len(ids)} ids that are not the {len(expected)} pushed")
        return ids

    async def context_id(self, id_or_ref: str) -> bytes:
        """A context id, read as the CLI reads an ID: 64 hex digits are that
        id; anything else is resolved by the daemon (RESOLVE): the value of
        a ref of that name (its winner, if in conflict), else the one
        context whose id starts with that prefix of 4+ hex digits.
        NOT_FOUND if none; BAD_REQUEST if the prefix is ambiguous (the
        message names candidates); ValueError, before asking, for text
        that is neither an id, a prefix nor a valid ref name."""
        if is_id(id_or_ref):
            return bytes.fromhex(id_or_ref)
        if not _is_id_prefix(id_or_ref):
            check_ref_name(id_or_ref)  # ValueError here, without asking: neither a prefix nor a name
        return (await self._call(Resolve(text=id_or_ref), Resolved)).id

    async def resolve(self, id_or_ref: str) -> str:
        """The full id (64 hex characters) that an id, prefix or ref name names."""
        return (await self.context_id(id_or_ref)).hex()

    async def expand(self, context_id: str, *, min_relevance: float = 0.0, max_tokens: int | None = None) -> ExpandResponse:
        """The expansion of a context, by id, unique id prefix or ref name."""
        request = ExpandRequest(id=await self.context_id(context_id), min_relevance=min_relevance, max_tokens=max_tokens)
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
            id=bytes(32),  # a placeholder: the id (or the ref's value) is resolved when the stream starts
            relevance_threshold=relevance_threshold,
            chunk_size=chunk_size,
            max_tokens_per_chunk=max_tokens_per_chunk,
        )
        return ChunkStream(self, request, context_id)

    async def query(
        self,
        context_id: str,
        *,
        type_filter: TypeSignature | None = None,
        min_relevance: float = 0.0,
        max_age_seconds: float | None = None,
        limit: int | None = None,
        text: str | None = None,
    ) -> list[MemoryAtom]:
        """The ContextQuery over the context's expansion, run by the node.
        `text`: keep atoms whose content matches any of its words, best text
        match first, then most relevant (sync/fulltext.py); None or blank:
        no text filter."""
        request = QueryRequest(
            id=await self.context_id(context_id),
            type_filter=type_filter,
            min_relevance=min_relevance,
            max_age_seconds=max_age_seconds,
            limit=limit,
            text=text,
        )
        return list((await self._call(request, QueryResponse)).atoms)

    async def status(self) -> dict:
        return (await self._call(StatusRequest(), StatusResponse)).status

    async def peer_forget(self, peer: str) -> list[dict]:
        """Drop the peers that `peer` names (a node id, a unique prefix of
        one, or an address) from the daemon's peer table; they are no longer
        dialled. Returns `[{node_id, address}]` of those dropped;
        LocalApiError NOT_FOUND if none matches, BAD_REQUEST if one is
        connected or a prefix names several."""
        return list((await self._call(PeerForget(peer=peer), PeerForgotten)).peers)

    # ------------------------------------------------------------ refs

    async def ref_set(self, name: str, target: str) -> list[str]:
        """Point ref `name` at context `target` (held by the daemon); the ids of
        the update(s) the daemon signed, committed and announced to its peers."""
        request = RefSet(name=check_ref_name(name), target=bytes.fromhex(check_id(target, "ref target")))
        return [i.hex() for i in (await self._call(request, Ack)).ids]

    async def ref_delete(self, name: str) -> list[str]:
        """Delete ref `name`; LocalApiError NOT_FOUND if it does not exist."""
        request = RefSet(name=check_ref_name(name), target=None)
        return [i.hex() for i in (await self._call(request, Ack)).ids]

    async def ref_append(
        self,
        name: str,
        atoms: Sequence[MemoryAtom] = (),
        removed_hashes: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
    ) -> tuple[str, list[str]]:
        """Append one delta to ref `name` (adding `atoms`, removing atom ids
        `removed_hashes`) on top of its value, and move the ref: atomic in
        the daemon, so concurrent appends never lose atoms. Returns (the new
        context id, the ref update ids). BAD_REQUEST if the ref is in
        conflict, the delta is empty, or a removed id is not in the ref."""
        message = RefAppend(
            name=check_ref_name(name),
            delta_atoms=tuple(atoms),
            removed_hashes=tuple(bytes.fromhex(check_id(h, "atom hash")) for h in removed_hashes),
            metadata=dict(metadata or {}),
        )
        stream_id, inbox = self._open()
        try:
            await self._sending(self.send_flow([(message, len(encode_payload(message)))], stream_id))
            ack = _expect(await inbox.get(), Ack)
        finally:
            self._forget(stream_id)
        if not ack.ids:
            raise LocalApiError(ErrorCode.PROTOCOL_ERROR, "the daemon acknowledged an append without a context id")
        return ack.ids[0].hex(), [i.hex() for i in ack.ids[1:]]

    async def refs(self) -> list[dict]:
        """Every ref that exists, by name: {name, target, conflict, candidates, updated, node_id}."""
        return list((await self._call(RefsRequest(), RefsResponse)).refs)

    async def ref(self, name: str) -> dict:
        """One ref's value (as in `refs()`); LocalApiError NOT_FOUND if it does not exist."""
        response = await self._call(RefsRequest(name=check_ref_name(name)), RefsResponse)
        if len(response.refs) != 1:
            raise LocalApiError(ErrorCode.PROTOCOL_ERROR, f"the daemon answered {len(response.refs)} refs, not 1")
        return response.refs[0]

    async def ref_log(self, name: str) -> list[dict]:
        """Every update of ref `name`, newest first: {id, name, target (None:
        deleted), supersedes, node_id, time}; NOT_FOUND if it has none."""
        return list((await self._call(RefsRequest(name=check_ref_name(name), log=True), RefsResponse)).refs)

    def watch_refs(self, names: Sequence[str] | None = None) -> RefWatch:
        """Changes of refs `names` (None: every ref) as they happen, made here
        or arriving from a peer:

            async with client.watch_refs(["main"]) as changes:
                changes.snapshot            # the watched refs when the watch began
                async for change in changes:  # RefChange(name, old, new, conflict, candidates)
                    ...

        Every change after `snapshot` is told; a consumer that falls behind
        gets, per ref, one change from what it last saw to the latest value
        (changes coalesce, here and in the daemon). Leaving the `async with`
        ends the watch in the daemon.
        """
        if names is not None:
            names = tuple(check_ref_name(n) for n in names)
        return RefWatch(self, RefsWatch(names=names))

    async def ping(self, nonce: int = 0) -> None:
        await self._sending(self.send(Ping(nonce=nonce)))


def _is_id_prefix(text: str) -> bool:
    return MIN_ID_PREFIX <= len(text) <= 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def _as_context(context: CompressedContext | dict, index: int) -> CompressedContext:
    if isinstance(context, CompressedContext):
        return context
    if isinstance(context, dict):
        try:
            return context_from_json(context)
        except DecodeError as exc:
            raise DecodeError(f"contexts[{index}]: {exc}") from None
    raise TypeError(f"contexts[{index}]: a CompressedContext or an interchange-JSON dict, not {type(context).__name__}")


class ChunkStream:
    """An async iterator of StreamChunk; also an async context manager."""

    def __init__(self, client: LocalClient, request: StreamRequest, target: str) -> None:
        self._client = client
        self._request = request
        self._target = target  # an id or a ref name, resolved at the first chunk
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
            request = attrs.evolve(self._request, id=await client.context_id(self._target))
            self._stream_id, self._inbox = client._open()
            await client._sending(client.send(request, self._stream_id))
        if self._held:
            held, self._held = self._held, 0
            await client._sending(client.release(self._stream_id, held))
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
            await client.abandon(self._stream_id, "cancelled")
        finally:
            # Chunks already here are released now (no await between the
            # count and the close); those still on their way are dropped
            # and credited back by the Connection.
            unread = self._held + sum(r.size for r in self._inbox.items if r.message.TYPE in FLOW_CONTROLLED)
            client._forget(self._stream_id)
            if unread:
                with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    with contextlib.suppress(LocalApiError, *TRANSPORT_ERRORS):
                        await client.release(self._stream_id, unread)



@attrs.frozen(kw_only=True)
class RefChange:
    """A watched ref's value changed: `old` is the target last seen (the
    snapshot's, or the previous change's; None: it did not exist), `new`
    the target now (None: deleted). Ids are 64 hex characters."""

    name: str
    old: str | None
    new: str | None
    conflict: bool
    candidates: tuple[str, ...]


def _change(message: RefChanged) -> RefChange:
    return RefChange(
        name=message.name,
        old=message.old.hex() if message.old is not None else None,
        new=message.new.hex() if message.new is not None else None,
        conflict=message.conflict,
        candidates=tuple(c.hex() for c in message.candidates),
    )


class _ChangeInbox:
    """What arrived on a watch's stream: changes coalesced per ref name (one
    pending change per ref, keeping the oldest `old` and the latest value,
    so memory is bounded by the refs watched however many changes arrive
    unread), and anything else (the snapshot, an ERROR) in order."""

    def __init__(self) -> None:
        self.changes: dict[str, RefChanged] = {}  # insertion-ordered
        self.items: deque[Received] = deque()
        self._wakeup = anyio.Event()
        self._error: LocalApiError | None = None

    def put(self, item: Received) -> None:
        message = item.message
        if isinstance(message, RefChanged):
            earlier = self.changes.pop(message.name, None)
            if earlier is not None:
                message = attrs.evolve(message, old=earlier.old)
            self.changes[message.name] = message
        else:
            self.items.append(item)
        self._wakeup.set()

    def fail(self, error: LocalApiError) -> None:
        self._error = error
        self._wakeup.set()

    async def get(self) -> RefChanged | Received:
        while True:
            if self.changes:
                name = next(iter(self.changes))
                return self.changes.pop(name)
            if self.items:
                return self.items.popleft()
            if self._error is not None:
                raise self._error
            self._wakeup = anyio.Event()
            await self._wakeup.wait()


class RefWatch:
    """An async context manager and async iterator of RefChange (see
    LocalClient.watch_refs). Entering it starts the watch and waits until
    the daemon has taken its snapshot: a change made after that is told."""

    def __init__(self, client: LocalClient, request: RefsWatch) -> None:
        self._client = client
        self._request = request
        self._stream_id: int | None = None
        self._inbox: _ChangeInbox | None = None
        self._done = False
        self.snapshot: list[dict] = []  # the watched refs that existed when the watch began

    @property
    def pending(self) -> int:
        """Changes received and not yet iterated (at most one per ref)."""
        return len(self._inbox.changes) if self._inbox is not None else 0

    async def __aenter__(self) -> RefWatch:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Send the watch and wait for its snapshot (done by `async with`)."""
        if self._stream_id is not None:
            return
        client = self._client
        if client._closing:
            raise ConnectionLost(ErrorCode.INTERNAL, "the client is closed")
        client._check_open()
        self._stream_id = client.conn.open_stream()
        inbox = self._inbox = _ChangeInbox()
        client._inboxes[self._stream_id] = inbox  # type: ignore[assignment]
        try:
            await client._sending(client.send(self._request, self._stream_id))
            first = await inbox.get()
            if isinstance(first, RefChanged):  # never before the snapshot
                raise LocalApiError(ErrorCode.PROTOCOL_ERROR, "the daemon sent REF_CHANGED before the snapshot")
            self.snapshot = list(_expect(first, RefsResponse).refs)
        except BaseException:
            self._done = True
            client._forget(self._stream_id)
            raise

    def __aiter__(self) -> RefWatch:
        return self

    async def __anext__(self) -> RefChange:
        if self._done:
            raise StopAsyncIteration
        await self.start()
        received = await self._inbox.get()
        if isinstance(received, RefChanged):
            return _change(received)
        # The daemon ended the watch: an ERROR (e.g. it is stopping).
        self._done = True
        self._client._forget(self._stream_id)
        _expect(received, RefChanged)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """End the watch: tell the daemon (it frees the request slot)."""
        if self._done:
            return
        self._done = True
        if self._stream_id is None:
            return
        client = self._client
        try:
            await client.abandon(self._stream_id, "watch ended")
        finally:
            client._forget(self._stream_id)
