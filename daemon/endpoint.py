"""Shared by the local API server and its client: errors, helpers, and one
end of a framed connection (a `Connection` over a byte stream).

`_Endpoint` is written with anyio primitives so the client runs under
asyncio and trio alike; under trio (the daemon, the CLI, the MCP server)
anyio's trio backend makes them trio's own. The server stays on trio: it
hands the endpoint trio streams, whose errors it catches itself.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Sequence

import anyio
import anyio.lowlevel
import trio

from daemon.paths import HomePaths
from sync.connection import NEED_DATA, Connection, ConnectionClosed, Received, State
from sync.errors import ErrorCode, RemoteProtocolError, error_code_from_wire
from sync.merkle import merkle_root
from sync.messages import ExpandResponse, Goodbye, Message
from sync.model import ExpandedContext, MemoryAtom, fit_budget, is_id
from sync.refs import RefUpdate, RefValue, check_ref_name
from sync.store import NotFound, StoreError


logger = logging.getLogger("daemon.localapi")

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
# Ref watches one client may hold open (each also counts as a request in
# progress): half the requests, so a client watching still has room to ask.
# Each costs the node one callback per ref change and, while its client does
# not read, at most one pending change per watched ref.
MAX_WATCHES_PER_CLIENT = 16
# A stream's chunks are built in the store thread in batches: one thread hop
# carries up to this many chunks or atoms, and never more bytes than the
# client's window has room for (but one chunk). The first batch is one
# chunk, so the first chunk is not delayed by its followers.
STREAM_BATCH_CHUNKS = 32
STREAM_BATCH_ATOMS = 4096
# What the reader may queue for sending (CREDIT, PONG, refusals) while the
# peer reads nothing: far above honest use (a CREDIT is 15 bytes), small
# enough that a peer flooding PINGs without reading costs little memory.
MAX_CONTROL_BACKLOG = 1024 * 1024
# Contexts larger than this are decoded in a worker thread, off the event loop.
INLINE_DECODE_BYTES = 64 * 1024
LISTEN_BACKLOG = 64
# Clients connected at once (the node's config may say otherwise); more are
# told LIMIT_EXCEEDED and closed. Each may pin its window (32 MiB) plus
# sync.connection.MAX_CONTROL_BUFFERED of partial messages.
MAX_LOCAL_CLIENTS = 64
# sun_path holds 108 bytes on Linux, NUL included.
MAX_SOCKET_PATH = 107
CLIENT_NODE_ID = bytes(32)
# What a byte stream raises once it can carry no more: trio's (the server's
# streams) and anyio's (the client's, under asyncio or trio).
TRANSPORT_ERRORS = (
    trio.BrokenResourceError, trio.ClosedResourceError, anyio.BrokenResourceError, anyio.ClosedResourceError,
)
# Shortest id prefix accepted where an id is asked for (git's minimum too).
MIN_ID_PREFIX = 4
# Candidates an ambiguous prefix's refusal names: enough to choose from,
# short enough for one ERROR message.
MAX_PREFIX_CANDIDATES = 8


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


class NoSuchPrefix(NotFound):
    """No context id starts with this prefix."""

    def __init__(self, prefix: str) -> None:
        StoreError.__init__(self, f"no context with id prefix {prefix}")
        self.context_id = prefix


class NoSuchName(NotFound):
    """No ref has this name (and it is no id or id prefix)."""

    def __init__(self, name: str, message: str) -> None:
        StoreError.__init__(self, message)
        self.context_id = name


class AmbiguousPrefix(ValueError):
    """More than one context id starts with this prefix."""

    def __init__(self, prefix: str, candidates: Sequence[str]) -> None:
        more = "…" if len(candidates) > MAX_PREFIX_CANDIDATES else ""
        shown = ", ".join(c[:16] for c in candidates[:MAX_PREFIX_CANDIDATES])
        super().__init__(f"id prefix {prefix} is ambiguous ({shown}{more}); give more digits")
        self.candidates = tuple(candidates)


class _Abandoned(Exception):
    """The client gave up on this request (ERROR on its stream)."""


# --------------------------------------------------------------------------
# helpers shared by the server, the client and the CLI
# --------------------------------------------------------------------------


def atom_root(atoms: Sequence[MemoryAtom]) -> bytes:
    """RFC 6962 root over the atoms' ids (32 bytes each), in the given order."""
    return merkle_root([bytes.fromhex(a.content_hash) for a in atoms])


def filter_expansion(expanded: ExpandedContext, min_relevance: float, max_tokens: int | None) -> ExpandedContext:
    """The expansion cut by relevance and token budget (`model.fit_budget`:
    the most relevant atoms that fit), summaries recomputed.

    The CLI applies the same cut when it reads the store itself, so that
    output is identical through the daemon or not.
    """
    atoms, spent = fit_budget((a for a in expanded.atoms if a.relevance_score >= min_relevance), max_tokens)
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


def ref_value_to_json(value: RefValue) -> dict:
    """A ref as `ctxfs ref list|show --json` prints it (and REFS_RESPONSE carries it)."""
    return {
        "name": value.name,
        "target": value.target,
        "conflict": value.conflict,
        "candidates": list(value.candidates),
        "updated": value.updated.isoformat(),
        "node_id": value.node_id,
    }


def ref_update_to_json(update: RefUpdate) -> dict:
    """One update of a ref as `ctxfs ref log --json` prints it; target None: a deletion."""
    return {
        "id": update.id,
        "name": update.name,
        "target": update.target,
        "supersedes": list(update.supersedes),
        "node_id": update.node_id,
        "time": update.time.isoformat(),
    }


def read_refs(store, name: str | None, log: bool = False) -> list[dict]:
    """What REFS_REQUEST asks, from a store (blocking): every ref's value
    (`name` None), one ref's value, or every update of `name` (`log`),
    newest first. NotFound for a ref with no value (no update, for `log`);
    ValueError for a bad name."""
    if name is None:
        if log:
            raise ValueError("a ref log needs a ref name")
        table = store.ref_table()
        return [ref_value_to_json(table.value(n)) for n in table.names()]
    check_ref_name(name)
    if log:
        updates = store.ref_updates_of(name)
        if not updates:
            raise NotFound(name, "ref")
        return [ref_update_to_json(u) for u in updates]
    value = store.ref_value(name)
    if value is None:
        raise NotFound(name, "ref")
    return [ref_value_to_json(value)]


def read_ref_values(store, names: frozenset[str] | None) -> dict[str, RefValue]:
    """The values of refs `names` that exist (None: every ref), from a store
    (blocking): what a ref watch starts from and compares changes with."""
    if names is None:
        table = store.ref_table()
        return {name: table.value(name) for name in table.names()}
    return {name: value for name in sorted(names) if (value := store.ref_value(name)) is not None}


def resolve_context_id(store, text: str) -> tuple[str, RefValue | None]:
    """The context id that `text` names (blocking, reads the store), and
    the ref's value if a ref named it. In this order:

    1. 64 hex characters: always that id (never a ref name);
    2. the name of a ref that exists: its target (the winner if the ref is
       in conflict: the caller may warn);
    3. a unique prefix of at least MIN_ID_PREFIX hex digits of a context id
       (ref update ids share the id space, and are skipped).

    So a ref named like a prefix (`cafe`) hides that prefix: give more
    digits. NotFound (NoSuchPrefix) or ValueError (AmbiguousPrefix) else.
    """
    lowered = text.strip().lower()
    if is_id(lowered):
        if not store.has(lowered):
            raise NotFound(lowered)
        return lowered, None
    try:
        check_ref_name(text)
        is_name = True
    except ValueError:
        is_name = False
    value = store.ref_value(text) if is_name else None
    if value is not None:
        return value.target, value
    shown, text = text, lowered
    if len(text) < MIN_ID_PREFIX or len(text) > 64 or not all(c in "0123456789abcdef" for c in text):
        message = (
            f"not a context id or ref name: {shown!r:.80} (64 hex characters, a unique prefix of at least "
            f"{MIN_ID_PREFIX}, or the name of a ref)"
        )
        # A name a ref could have is not found; anything else is a bad request.
        raise (NoSuchName(shown, message) if is_name else ValueError(message))
    start = text + "0" * (64 - len(text))
    matches = []
    for oid in store.ids(start):
        if not oid.startswith(text) or len(matches) > MAX_PREFIX_CANDIDATES:
            break
        if store.has(oid):  # a context, not a ref update
            matches.append(oid)
    if not matches:
        raise NoSuchPrefix(text)
    if len(matches) > 1:
        raise AmbiguousPrefix(text, matches)
    return matches[0], None


def _socket_path(paths: HomePaths) -> str:
    path = str(paths.api_socket)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise OSError(
            errno.ENAMETOOLONG,
            f"the API socket path is longer than {MAX_SOCKET_PATH} bytes; use a home with a shorter path",
            path,
        )
    return path


async def send_and_close(stream: trio.abc.Stream, data: bytes) -> None:
    """Send our last words (a refusal), then close within CLOSE_TIMEOUT.

    A lingering close: what the other side sent meanwhile is read and
    dropped, since closing with unread bytes would reset the connection
    and could destroy our words before they are read.
    """
    with trio.move_on_after(CLOSE_TIMEOUT):
        try:
            await stream.send_all(data)
            while await stream.receive_some(64 * 1024):
                pass
        except (*TRANSPORT_ERRORS, OSError):
            pass
    await trio.aclose_forcefully(stream)


def _sole(group: BaseExceptionGroup) -> BaseException:
    """The one exception a nursery wrapped, so callers can catch it by type."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]
    return group


# --------------------------------------------------------------------------
# one end of a connection: transport, send lock, credit
# --------------------------------------------------------------------------


class _Endpoint:
    """A Connection over a byte stream with trio's Stream interface
    (send_all, receive_some, aclose): one reader, one send lock, credit waits.

    The reader never waits for the send lock. If it did, a writer blocked on
    a peer that is itself blocked writing to us (its reader waiting on its
    own lock) would never be read from again: a deadlock of the two
    directions. What the reader must send (CREDIT, PONG, refusals) goes to
    a control buffer that the next writer, or the flusher task, sends first.
    """

    def __init__(self, stream: trio.abc.Stream, conn: Connection) -> None:
        self.stream = stream
        self.conn = conn
        self._send_lock = anyio.Lock()
        # True while a send_all is under way; left True if one was cancelled
        # midway, when the byte stream is cut mid-frame and unusable.
        self._send_broken = False
        self._credit = anyio.Event()
        self._lost: LocalApiError | None = None
        self._control = bytearray()
        self._control_queued = anyio.Event()

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
                self._control_queued = anyio.Event()
                async with self._send_lock:
                    await self._write(b"")
        except (*TRANSPORT_ERRORS, ConnectionLost):
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
        await anyio.lowlevel.checkpoint_if_cancelled()
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
        self._check_open()
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

    async def wait_for_capacity(self, stream_id: int, *, abandoned: Callable[[], bool]) -> None:
        """Until the peer's window has room on the stream (raises _Abandoned
        if the request is given up meanwhile)."""
        while True:
            self._check_open()
            if abandoned():
                raise _Abandoned
            arrived = self._credit
            if self.conn.send_capacity(stream_id) > 0:
                return
            await self._wait_credit(arrived)

    def _sent_flow(self, count: int) -> None:
        """Hook: `count` flow-controlled messages went out."""

    async def _wait_credit(self, arrived: anyio.Event) -> None:
        await arrived.wait()

    def _credit_arrived(self) -> None:
        self._credit.set()
        self._credit = anyio.Event()

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
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            async with self._send_lock:
                if self.conn.state not in (State.OPEN, State.REMOTE_CLOSING) or self._send_broken:
                    return
                try:
                    await self._write(self.conn.send(Goodbye(code=int(code), reason=reason), 0))
                except (*TRANSPORT_ERRORS, LocalApiError):
                    pass

    async def _send_failure(self, exc: RemoteProtocolError) -> None:
        data = self.conn.failure_bytes(exc)
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            async with self._send_lock:
                if not self._send_broken:
                    try:
                        await self._write(data)
                    except (*TRANSPORT_ERRORS, LocalApiError):
                        pass


