"""The frame layer: header encoding, a bounded decoder, fragmentation.

Wire layout, big-endian: a 10-byte header, then the payload::

    offset  size  field
         0     1  type       message type, opaque here (see below)
         1     1  flags      bit 0 FLAG_MORE; bits 1-7 reserved, must be 0
         2     4  stream id  0 = the connection itself; see "Stream ids"
         6     4  length     payload bytes that follow; <= max frame size
        10  length payload

A message larger than the receiver's max frame size travels as several
frames with the same type and stream id; all but the last carry FLAG_MORE.
Fragments of *different* streams may interleave; on one stream, fragments of
a message are contiguous (a different type mid-message is an error).

The message type byte is not this layer's business: it is passed up
untouched, and the connection decides what an unknown type means.

Stream ids: 0 is the connection (HELLO, PING/PONG, connection CREDIT,
GOODBYE). The dialer opens odd ids, the listener even ones (both peers open
streams; parity avoids collisions, as in HTTP/2). Ids only increase and are
never reused on a connection, so a late frame is never taken for a newer
stream's; after 2**31 streams `next_stream_id` raises: GOODBYE, reconnect.

Negotiation: our decoder starts at PRE_HELLO_MAX_FRAME_SIZE. Right after the
peer's HELLO is decoded, set `decoder.max_frame_size` to the value we
advertised in our HELLO. HELLO itself must be one unfragmented frame
<= PRE_HELLO_MAX_FRAME_SIZE; until the peer's HELLO tells us its cap we send
nothing larger than MIN_FRAME_SIZE.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import attrs

from sync.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE", "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_REASSEMBLING_STREAMS", "DEFAULT_MAX_REASSEMBLY_SIZE",
    "DEFAULT_MAX_RECEIVE_SIZE", "FLAG_MORE", "HEADER_SIZE", "MAX_FRAME_SIZE",
    "MAX_STREAM_ID", "MIN_FRAME_SIZE", "PRE_HELLO_MAX_FRAME_SIZE",
    "Frame", "FrameDecoder", "Message", "MessageAssembler", "encode_frame",
    "first_stream_id", "fragment", "next_stream_id", "opened_by_dialer",
    "validate_peer_max_frame_size",
]

_HEADER = struct.Struct(">BBII")
HEADER_SIZE = _HEADER.size  # 10 = type 1 + flags 1 + stream id 4 + length 4

FLAG_MORE = 0x01  # more fragments of this message follow
_KNOWN_FLAGS = FLAG_MORE

MAX_STREAM_ID = 2**32 - 1  # largest value of the 4-byte field
# HTTP/2's floor (2**14): every peer must accept frames this large, so it is
# the safe size before the peer's HELLO is known; the 10-byte header is then
# still < 0.1 % overhead. Lowest max frame size a peer may advertise.
MIN_FRAME_SIZE = 16 * 1024
# HTTP/2's ceiling (2**24, rounded): the largest single allocation a peer can
# make us do per frame. Bigger frames buy no throughput (the header is
# already negligible) and delay control frames queued behind them.
MAX_FRAME_SIZE = 16 * 1024 * 1024
# HELLO is ~100 bytes; until the peer has said who it is and which version it
# speaks we accept frames with room for HELLO to grow, and no more.
PRE_HELLO_MAX_FRAME_SIZE = 64 * 1024
# What we advertise by default: a 1 MiB frame takes ~1 ms at 1 GB/s, which
# bounds how long a PING or CREDIT waits behind one; header overhead 1e-5.
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024
# A flow-controlled message is deliverable only if it fits in one stream
# window (flow.DEFAULT_STREAM_WINDOW is 16 MiB): the receiver cannot release
# credit for half a message. Bigger payloads must be split into messages.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# Total bytes held in partial messages across all streams. Must be at least
# the connection receive window (flow.DEFAULT_CONNECTION_WINDOW, 32 MiB: the
# most flow-controlled data a compliant peer can have in flight) plus room
# for control messages, else a compliant peer could trip it.
DEFAULT_MAX_REASSEMBLY_SIZE = 64 * 1024 * 1024
# Bookkeeping bound on streams mid-reassembly (each costs a dict entry and a
# list even for one byte); should be >= the concurrent streams we allow.
DEFAULT_MAX_REASSEMBLING_STREAMS = 64
# trio's SocketStream default receive size. The reader must pass it as
# max_bytes (SSLStream.receive_some(None) may return more).
DEFAULT_MAX_RECEIVE_SIZE = 64 * 1024


@attrs.frozen(kw_only=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def more(self) -> bool:
        return bool(self.flags & FLAG_MORE)


@attrs.frozen(kw_only=True)
class Message:
    """A whole message: the payloads of its frames, concatenated."""

    type: int
    stream_id: int
    payload: bytes


def _check_header_fields(msg_type: int, flags: int, stream_id: int) -> None:
    if not (0 <= msg_type <= 0xFF and 0 <= stream_id <= MAX_STREAM_ID and 0 <= flags <= 0xFF):
        raise LocalProtocolError(
            ErrorCode.PROTOCOL_ERROR, f"bad header: type {msg_type}, stream {stream_id}"
        )
    if flags & ~_KNOWN_FLAGS:
        raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, f"reserved flags {flags:#x}")


def encode_frame(frame: Frame, *, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """One frame's bytes. Pass the peer's max frame size once it is known."""
    _check_header_fields(frame.type, frame.flags, frame.stream_id)
    if len(frame.payload) > max_frame_size:
        raise LocalProtocolError(ErrorCode.FRAME_TOO_LARGE, f"payload over {max_frame_size} bytes")
    header = _HEADER.pack(frame.type, frame.flags, frame.stream_id, len(frame.payload))
    return header + frame.payload


def fragment(
    msg_type: int, stream_id: int, payload: bytes | bytearray | memoryview, max_frame_size: int
) -> Iterator[bytes]:
    """Split one message into frames of at most `max_frame_size` payload bytes.

    Arguments are checked now, frames built lazily (one copy of each slice).
    An empty message is one empty frame.
    """
    _check_header_fields(msg_type, 0, stream_id)
    if not 1 <= max_frame_size <= MAX_FRAME_SIZE:
        raise ValueError(f"max_frame_size {max_frame_size} out of range")
    view = memoryview(payload).cast("B")
    return _fragments(msg_type, stream_id, view, max_frame_size)


def _fragments(msg_type: int, stream_id: int, view: memoryview, size: int) -> Iterator[bytes]:
    total = len(view)
    for start in range(0, max(total, 1), size):
        end = min(start + size, total)
        flags = FLAG_MORE if end < total else 0
        yield b"".join((_HEADER.pack(msg_type, flags, stream_id, end - start), view[start:end]))


def first_stream_id(*, dialer: bool) -> int:
    return 1 if dialer else 2


def next_stream_id(current: int) -> int:
    """The next id of the same parity; raises when the id space is exhausted."""
    following = current + 2
    if following > MAX_STREAM_ID:
        raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, "stream ids exhausted; reconnect")
    return following


def opened_by_dialer(stream_id: int) -> bool:
    return stream_id % 2 == 1


def validate_peer_max_frame_size(value: int) -> int:
    """Check the max frame size a peer advertised in its HELLO."""
    if not MIN_FRAME_SIZE <= value <= MAX_FRAME_SIZE:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"max frame size {value} out of range")
    return value


class FrameDecoder:
    """Sans-IO frame parser: `receive_data(bytes)`, then `next_frame()` until None.

    Memory bound: the buffer never exceeds `buffer_limit` = HEADER_SIZE +
    max frame size + `max_receive_size`. A declared length is checked as soon
    as its 10 header bytes are buffered, before any payload is awaited, so a
    header announcing 4 GiB costs 10 bytes. Feeding more than the bound
    without draining is our bug and raises LocalProtocolError; a caller that
    drains with next_frame() after every receive of <= max_receive_size bytes
    never hits it.

    `receive_data(b"")` signals EOF: next_frame() then raises if a frame was
    cut short, and returns None at a frame boundary (check `eof_received`).
    After a RemoteProtocolError the decoder stays failed.
    """

    def __init__(
        self,
        *,
        max_frame_size: int = PRE_HELLO_MAX_FRAME_SIZE,
        max_receive_size: int = DEFAULT_MAX_RECEIVE_SIZE,
    ) -> None:
        self.max_frame_size = max_frame_size
        self.max_receive_size = max_receive_size
        # Parsed bytes stay in front of _offset until the next receive_data
        # compacts them away: no O(n^2) slicing when one chunk holds many frames.
        self._buffer = bytearray()
        self._offset = 0
        self._header: tuple[int, int, int, int] | None = None  # accepted, awaiting payload
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def max_frame_size(self) -> int:
        """Cap on declared payload length; applies to headers parsed from now on."""
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        if not 1 <= value <= MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size {value} out of range")
        self._max_frame_size = value

    @property
    def buffered_size(self) -> int:
        """Bytes held in memory (including parsed ones not yet compacted)."""
        return len(self._buffer)

    @property
    def buffer_limit(self) -> int:
        pending = self._header[3] if self._header is not None else 0
        return HEADER_SIZE + max(self._max_frame_size, pending) + self.max_receive_size

    @property
    def eof_received(self) -> bool:
        return self._eof

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise LocalProtocolError(ErrorCode.INTERNAL, "receive_data after EOF")
        if not data:
            self._eof = True
            return
        if self._error is not None:
            return  # nothing more will be parsed; do not let it pile up
        if self._offset:
            del self._buffer[: self._offset]
            self._offset = 0
        if len(self._buffer) + len(data) > self.buffer_limit:
            raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, "drain next_frame() first")
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more data is needed."""
        if self._error is not None:
            raise RemoteProtocolError(self._error.code, self._error.message)
        try:
            return self._parse()
        except RemoteProtocolError as exc:
            self._error = exc
            self._buffer = bytearray()
            self._offset = 0
            raise

    def _parse(self) -> Frame | None:
        buffer = self._buffer
        if self._header is None:
            if len(buffer) - self._offset < HEADER_SIZE:
                return self._need_data()
            header = _HEADER.unpack_from(buffer, self._offset)
            flags, length = header[1], header[3]
            if flags & ~_KNOWN_FLAGS:
                raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"reserved flags {flags:#04x}")
            if length > self._max_frame_size:
                raise RemoteProtocolError(
                    ErrorCode.FRAME_TOO_LARGE, f"frame of {length} > {self._max_frame_size} bytes"
                )
            self._offset += HEADER_SIZE
            self._header = header
        msg_type, flags, stream_id, length = self._header
        start = self._offset
        if len(buffer) - start < length:
            return self._need_data()
        with memoryview(buffer) as view:
            payload = bytes(view[start : start + length])
        self._offset = start + length
        self._header = None
        if self._offset == len(buffer):
            buffer.clear()
            self._offset = 0
        return Frame(type=msg_type, flags=flags, stream_id=stream_id, payload=payload)

    def _need_data(self) -> None:
        if self._eof and (self._header is not None or self._offset < len(self._buffer)):
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "connection closed mid-frame")


@attrs.define
class _Partial:
    type: int
    chunks: list[bytes] = attrs.Factory(list)
    size: int = 0


class MessageAssembler:
    """Reassembles fragments into whole messages, within bounds.

    Kept apart from FrameDecoder on purpose: the connection must charge each
    frame to flow control *before* its bytes are buffered here.

    Rules (violations raise RemoteProtocolError):
    * per stream, one message at a time; a frame of another type on a stream
      mid-message is PROTOCOL_ERROR; an empty non-final fragment too;
    * a message over `max_message_size` is LIMIT_EXCEEDED as soon as the
      fragment that crosses the line arrives (it is not buffered);
    * bytes held across all streams <= `max_buffered_size`, and at most
      `max_streams` streams mid-message: LIMIT_EXCEEDED otherwise.
    After an error, discard the assembler with the connection.
    """

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_buffered_size: int = DEFAULT_MAX_REASSEMBLY_SIZE,
        max_streams: int = DEFAULT_MAX_REASSEMBLING_STREAMS,
    ) -> None:
        self.max_message_size = max_message_size
        self.max_buffered_size = max_buffered_size
        self.max_streams = max_streams
        self._partials: dict[int, _Partial] = {}
        self._buffered = 0

    @property
    def buffered_size(self) -> int:
        return self._buffered

    @property
    def streams_in_progress(self) -> int:
        return len(self._partials)

    def discard(self, stream_id: int) -> int:
        """Drop a stream's partial message; returns its size, which the caller
        must release to flow control or the connection window shrinks for good."""
        partial = self._partials.pop(stream_id, None)
        if partial is None:
            return 0
        self._buffered -= partial.size
        return partial.size

    def add_frame(self, frame: Frame) -> Message | None:
        """Feed one frame; returns the message it completes, if any."""
        stream_id, size = frame.stream_id, len(frame.payload)
        partial = self._partials.get(stream_id)
        if partial is None and not frame.more:  # the common case: no copy
            self._check_message_size(stream_id, size)
            return Message(type=frame.type, stream_id=stream_id, payload=frame.payload)
        if partial is not None and frame.type != partial.type:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"stream {stream_id}: type changed")
        if frame.more and size == 0:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"stream {stream_id}: empty frame")
        held = partial.size if partial is not None else 0
        self._check_message_size(stream_id, held + size)
        if not frame.more:
            assert partial is not None
            del self._partials[stream_id]
            self._buffered -= partial.size
            partial.chunks.append(frame.payload)
            return Message(type=frame.type, stream_id=stream_id, payload=b"".join(partial.chunks))
        if self._buffered + size > self.max_buffered_size:
            raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, "reassembly buffer full")
        if partial is None:
            if len(self._partials) >= self.max_streams:
                raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, "too many streams mid-message")
            partial = self._partials[stream_id] = _Partial(type=frame.type)
        partial.chunks.append(frame.payload)
        partial.size += size
        self._buffered += size
        return None

    def _check_message_size(self, stream_id: int, size: int) -> None:
        if size > self.max_message_size:
            limit = self.max_message_size
            raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, f"stream {stream_id}: message > {limit}")
