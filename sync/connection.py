"""The protocol connection: a sans-IO state machine (h11/wsproto style).

    conn = Connection(hello=our_hello, dialer=True)
    transport.send(conn.start())             # our HELLO, always first
    conn.receive_data(await transport.receive())
    while (event := conn.next_event()) is not NEED_DATA: ...
    transport.send(conn.send(Want(ids=...), stream_id=conn.open_stream()))

It owns the frame decoder, reassembly and flow control; the caller owns the
socket, the tasks and the clock. Connection-level states follow one table
(`_RECEIVE`, `_SEND`). Receiving a message not in it is a
`RemoteProtocolError` (the peer's fault: the connection goes to ERROR, and
`failure_bytes(exc)` is what to send before closing — an ERROR frame, or
nothing if the peer is not ctxfs). Sending one is a `LocalProtocolError`
(our bug: nothing is produced and the state does not change).

Credit: `release()` returns the CREDIT frames it makes; credit owed for
other reasons (data dropped on a closed stream) comes from `take_credit()`,
which the caller checks after each batch of events.
"""

from __future__ import annotations

import collections
import enum

import attrs

from sync import frames
from sync.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from sync.flow import MAX_WINDOW, FlowController
from sync.messages import (
    FLOW_CONTROLLED,
    MAGIC,
    MAX_REASON_LENGTH,
    PROTOCOL_VERSIONS,
    Credit,
    Error,
    Hello,
    Message,
    MessageType,
    decode_payload,
    encode_payload,
)

# Streams the peer may hold open at once. Each costs two small window
# objects; a peer that never closes its streams hits this, not our memory.
MAX_PEER_STREAMS = 256
# Closed peer streams remembered, so late frames for them are dropped.
RECENTLY_CLOSED = 1024
# Smallest window a peer may advertise: one MIN_FRAME_SIZE frame of data
# and room for a small OBJECTS message. Smaller windows only make traffic.
MIN_WINDOW = 64 * 1024
# Reassembly room beyond the connection window, for control messages (not
# flow-controlled) that are half-sent. Honest ones are far smaller (a
# RECONCILE step is ~100 KiB); a peer that leaves messages unfinished pins
# at most our window plus this.
MAX_CONTROL_BUFFERED = 4 * 1024 * 1024


class State(enum.Enum):
    HANDSHAKE = "handshake"  # HELLO sent (or to be sent), the peer's not yet received
    OPEN = "open"
    LOCAL_CLOSING = "local-closing"  # we said GOODBYE; the peer's GOODBYE ends it
    REMOTE_CLOSING = "remote-closing"  # the peer said GOODBYE; ours ends it
    CLOSED = "closed"
    ERROR = "error"


class _Need:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _Need()


@attrs.frozen(kw_only=True)
class Received:
    stream_id: int
    message: Message
    # Payload bytes the message took on the wire. For a flow-controlled
    # message, release exactly this much once it is durably handled.
    size: int


@attrs.frozen(kw_only=True)
class ConnectionClosed:
    """The peer closed its side (end of input at a frame boundary)."""

    clean: bool  # True when GOODBYEs were exchanged first


Event = Received | ConnectionClosed

_OTHER = "other"  # any message type but HELLO and GOODBYE


def _kind(msg_type: MessageType) -> MessageType | str:
    return msg_type if msg_type in (MessageType.HELLO, MessageType.GOODBYE) else _OTHER


# (state, message kind) -> next state. Anything absent is a protocol error.
_RECEIVE = {
    (State.HANDSHAKE, MessageType.HELLO): State.OPEN,
    (State.OPEN, _OTHER): State.OPEN,
    (State.OPEN, MessageType.GOODBYE): State.REMOTE_CLOSING,
    (State.LOCAL_CLOSING, _OTHER): State.LOCAL_CLOSING,
    (State.LOCAL_CLOSING, MessageType.GOODBYE): State.CLOSED,
}
_SEND = {
    (State.OPEN, _OTHER): State.OPEN,
    (State.OPEN, MessageType.GOODBYE): State.LOCAL_CLOSING,
    (State.REMOTE_CLOSING, MessageType.GOODBYE): State.CLOSED,
}


def _hello_problem(hello: Hello) -> str | None:
    if not frames.MIN_FRAME_SIZE <= hello.max_frame_size <= frames.MAX_FRAME_SIZE:
        return f"max frame size {hello.max_frame_size} out of range"
    for name in ("stream_window", "connection_window"):
        if not MIN_WINDOW <= getattr(hello, name) <= MAX_WINDOW:
            return f"{name} out of range"
    return None


def _check_own_hello(hello: Hello) -> None:
    problem = _hello_problem(hello)
    if problem is not None:
        raise LocalProtocolError(ErrorCode.INTERNAL, f"our HELLO: {problem}")


class Connection:
    def __init__(
        self,
        *,
        hello: Hello,
        dialer: bool,
        max_message_size: int = frames.DEFAULT_MAX_MESSAGE_SIZE,
        max_control_buffered: int = MAX_CONTROL_BUFFERED,
    ) -> None:
        _check_own_hello(hello)
        self.our_hello = hello
        self.dialer = dialer
        self.state = State.HANDSHAKE
        self.peer_hello: Hello | None = None
        self.version: int | None = None
        self._decoder = frames.FrameDecoder()
        # Partial messages held at once, all streams together: our
        # connection window (what flow control admits anyway) plus a little
        # for control messages, never the assembler's generic 64 MiB.
        self._assembler = frames.MessageAssembler(
            max_message_size=max_message_size,
            max_buffered_size=hello.connection_window + max_control_buffered,
        )
        self._max_message_size = max_message_size
        self._flow: FlowController | None = None
        self._peer_max_frame_size = frames.MIN_FRAME_SIZE
        self._next_stream = frames.first_stream_id(dialer=dialer)
        self._peer_streams: set[int] = set()
        self._started = False
        self._preamble: bytes | None = b""  # the first two bytes, until seen
        self._bad_preamble = False
        self._closed_event: ConnectionClosed | None = None
        # Peer streams we closed, most recent last: frames still in flight
        # for them are dropped, not taken for new streams. Bounded: a peer
        # does not send on a stream long after its end.
        self._peer_closed: collections.OrderedDict[int, None] = collections.OrderedDict()

    # ------------------------------------------------------------ sending

    def start(self) -> bytes:
        """Our HELLO: the first bytes on the wire, sent before anything is read."""
        if self._started:
            raise LocalProtocolError(ErrorCode.INTERNAL, "start() called twice")
        self._started = True
        return frames.encode_frame(
            frames.Frame(type=MessageType.HELLO, flags=0, stream_id=0, payload=encode_payload(self.our_hello)),
            max_frame_size=frames.MIN_FRAME_SIZE,
        )

    def send(self, message: Message, stream_id: int = 0) -> bytes:
        """The bytes that carry `message` on `stream_id`; state and credit checked."""
        msg_type = message.TYPE
        if msg_type is MessageType.HELLO:
            raise LocalProtocolError(ErrorCode.INTERNAL, "HELLO is sent by start()")
        next_state = _SEND.get((self.state, _kind(msg_type)))
        if next_state is None:
            raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, f"cannot send {msg_type.name} in state {self.state.value}")
        if stream_id != 0 and not self._flow.is_open(stream_id):
            raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, f"stream {stream_id} is not open")
        payload = encode_payload(message)
        if len(payload) > self._max_message_size:
            raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{msg_type.name} of {len(payload)} bytes is too large")
        if msg_type in FLOW_CONTROLLED:
            if stream_id == 0:
                raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, f"{msg_type.name} needs a stream")
            self._flow.consume(stream_id, len(payload))
        self.state = next_state
        return b"".join(frames.fragment(msg_type, stream_id, payload, self._peer_max_frame_size))

    def failure_bytes(self, exc: ProtocolError) -> bytes:
        """What to send before closing after `exc` (may be empty); state -> ERROR.

        A peer whose first bytes were not a ctxfs HELLO gets nothing: it is
        not speaking this protocol, and nothing of ours should reach it.
        """
        self.state = State.ERROR
        if exc.code is ErrorCode.BAD_MAGIC or not self._started:
            return b""
        error = Error(code=int(exc.code), message=exc.message[:MAX_REASON_LENGTH])
        payload = encode_payload(error)
        return frames.encode_frame(
            frames.Frame(type=MessageType.ERROR, flags=0, stream_id=0, payload=payload),
            max_frame_size=self._peer_max_frame_size,
        )

    def refuse(self, code: ErrorCode, reason: str) -> bytes:
        """All we send a peer we will not serve (say, over a session limit):
        our HELLO, then ERROR on stream 0; the connection is done (ERROR)."""
        hello = self.start()
        self.state = State.ERROR
        payload = encode_payload(Error(code=int(code), message=reason[:MAX_REASON_LENGTH]))
        return hello + frames.encode_frame(
            frames.Frame(type=MessageType.ERROR, flags=0, stream_id=0, payload=payload),
            max_frame_size=frames.MIN_FRAME_SIZE,
        )

    # ------------------------------------------------------------ streams and credit

    def open_stream(self) -> int:
        """A new stream id of ours (the dialer's are odd, the listener's even)."""
        self._require_open()
        stream_id = self._next_stream
        self._next_stream = frames.next_stream_id(stream_id)
        self._flow.open_stream(stream_id)
        return stream_id

    def close_stream(self, stream_id: int) -> None:
        """Forget a finished stream (ours or the peer's); late frames are dropped.

        Credit for bytes dropped with it is granted back through
        `take_credit()`.
        """
        if self._flow is None or not self._flow.is_open(stream_id):
            return
        partial = self._assembler.discard(stream_id)
        if partial:
            self._flow.release(stream_id, partial)
        self._flow.close_stream(stream_id)
        if stream_id in self._peer_streams:
            self._peer_streams.discard(stream_id)
            self._peer_closed[stream_id] = None
            while len(self._peer_closed) > RECENTLY_CLOSED:
                self._peer_closed.popitem(last=False)

    def is_stream_open(self, stream_id: int) -> bool:
        """Whether a message may be sent on `stream_id` now (stream 0: once HELLO is in).

        A peer may send a request on a stream we already answered and
        closed; the answer to that is silence, never a send that fails.
        """
        if self._flow is None or self.state is not State.OPEN:
            return False
        return stream_id == 0 or self._flow.is_open(stream_id)

    def take_credit(self) -> bytes:
        """CREDIT frames owed but not yet handed out (e.g. for data dropped on
        closed streams). Call after handling a batch of events."""
        if self._flow is None:
            return b""
        return self._grants()

    def send_capacity(self, stream_id: int) -> int:
        """The largest flow-controlled message that may be sent on the stream now."""
        self._require_open()
        return self._flow.send_capacity(stream_id)

    @property
    def max_flow_message(self) -> int:
        """The largest flow-controlled message the peer can ever accept."""
        self._require_open()
        hello = self.peer_hello
        return min(hello.stream_window, hello.connection_window, self._max_message_size)

    def release(self, stream_id: int, n: int) -> bytes:
        """The application has durably consumed n bytes: CREDIT frames to send."""
        self._require_open()
        self._flow.release(stream_id, n)
        return self._grants()

    def _grants(self) -> bytes:
        # Once either side has said GOODBYE, credit is moot (and a peer in
        # REMOTE_CLOSING may not receive it).
        if self.state is not State.OPEN:
            return b""
        return b"".join(
            frames.encode_frame(
                frames.Frame(
                    type=MessageType.CREDIT, flags=0, stream_id=grant.stream_id,
                    payload=encode_payload(Credit(increment=grant.amount)),
                ),
                max_frame_size=self._peer_max_frame_size,
            )
            for grant in self._flow.take_grants()
        )

    def statistics(self):
        return None if self._flow is None else self._flow.statistics()

    def _require_open(self) -> None:
        if self._flow is None or self.state in (State.CLOSED, State.ERROR):
            raise LocalProtocolError(ErrorCode.INTERNAL, f"connection is {self.state.value}")

    # ------------------------------------------------------------ receiving

    @property
    def max_receive_size(self) -> int:
        """How much to read from the transport per receive_data() call."""
        return self._decoder.max_receive_size

    def receive_data(self, data: bytes) -> None:
        """Bytes from the transport; b"" means the peer closed its side."""
        if self._preamble is not None and data:
            # Judge the first two bytes before the frame layer does, so that
            # an HTTP or TLS client is told apart from a broken ctxfs peer
            # (and gets no reply at all).
            self._preamble += data[: 2 - len(self._preamble)]
            if self._preamble[:1] not in (b"", bytes([MessageType.HELLO])) or self._preamble[1:2] not in (b"", b"\x00"):
                self._bad_preamble = True
            if len(self._preamble) >= 2:
                self._preamble = None
        self._decoder.receive_data(data)

    def next_event(self) -> Event | _Need:
        if not self._started:
            raise LocalProtocolError(ErrorCode.INTERNAL, "call start() before reading")
        if self.state is State.ERROR:
            raise LocalProtocolError(ErrorCode.INTERNAL, "connection has failed")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self.state = State.ERROR
            raise

    def _next_event(self) -> Event | _Need:
        if self._closed_event is not None:
            return self._closed_event
        if self._bad_preamble:
            raise RemoteProtocolError(ErrorCode.BAD_MAGIC, "the peer does not speak ctxfs")
        while True:
            frame = self._decoder.next_frame()
            if frame is None:
                if self._decoder.eof_received:
                    self._closed_event = ConnectionClosed(clean=self.state is State.CLOSED)
                    self.state = State.CLOSED
                    return self._closed_event
                return NEED_DATA
            if self.state is State.HANDSHAKE:
                return self._receive_hello(frame)
            self._check_stream(frame)
            if frame.type in FLOW_CONTROLLED:
                if frame.stream_id == 0:
                    raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"{MessageType(frame.type).name} on stream 0")
                self._flow.on_data(frame.stream_id, len(frame.payload))
                if not self._flow.is_open(frame.stream_id):
                    # A stream we closed: drop it, but free the connection credit.
                    self._flow.release(frame.stream_id, len(frame.payload))
                    continue
            whole = self._assembler.add_frame(frame)
            if whole is None:
                continue
            message = decode_payload(whole.type, whole.payload)
            next_state = _RECEIVE.get((self.state, _kind(message.TYPE)))
            if next_state is None:
                raise RemoteProtocolError(
                    ErrorCode.PROTOCOL_ERROR, f"{message.TYPE.name} is not allowed in state {self.state.value}"
                )
            self.state = next_state
            if isinstance(message, Credit):
                self._flow.on_credit(whole.stream_id, message.increment)
            return Received(stream_id=whole.stream_id, message=message, size=len(whole.payload))

    def _receive_hello(self, frame: frames.Frame) -> Received:
        if frame.type != MessageType.HELLO or frame.more or frame.stream_id != 0:
            raise RemoteProtocolError(ErrorCode.BAD_MAGIC, "the first frame is not a HELLO")
        message = decode_payload(frame.type, frame.payload)
        if message.magic != MAGIC:
            raise RemoteProtocolError(ErrorCode.BAD_MAGIC, "wrong magic in HELLO")
        common = set(self.our_hello.versions) & set(message.versions)
        if not common:
            supported = ", ".join(map(str, self.our_hello.versions))
            raise RemoteProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"no common protocol version; this node speaks {supported}")
        problem = _hello_problem(message)
        if problem is not None:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"HELLO: {problem}")
        self.version = max(common)
        self.peer_hello = message
        self._peer_max_frame_size = message.max_frame_size
        self._decoder.max_frame_size = self.our_hello.max_frame_size
        self._flow = FlowController(
            send_connection_window=message.connection_window,
            send_stream_window=message.stream_window,
            receive_connection_window=self.our_hello.connection_window,
            receive_stream_window=self.our_hello.stream_window,
        )
        self.state = _RECEIVE[(State.HANDSHAKE, MessageType.HELLO)]
        return Received(stream_id=0, message=message, size=len(frame.payload))

    def _check_stream(self, frame: frames.Frame) -> None:
        """Streams: ours must have been opened; the peer's open at first use."""
        stream_id = frame.stream_id
        if stream_id == 0 or stream_id in self._peer_streams or self._flow.is_open(stream_id):
            return
        peer_parity = frames.opened_by_dialer(stream_id) != self.dialer
        if not peer_parity:
            if stream_id >= self._next_stream:
                raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"stream {stream_id} was never opened")
            return  # one of ours, already closed: late frames are dropped or ignored
        if stream_id in self._peer_closed:
            return  # the peer's, already closed
        if len(self._peer_streams) >= MAX_PEER_STREAMS:
            raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, f"more than {MAX_PEER_STREAMS} open streams")
        self._peer_streams.add(stream_id)
        self._flow.open_stream(stream_id)
