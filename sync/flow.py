"""Credit-based flow control, per stream and per connection (HTTP/2's model).

What counts: the payload bytes of frames whose message type carries data
(which types those are is the connection's call: OBJECTS, STREAM_CHUNK...).
Headers and control messages (CREDIT, PING, ERROR, HELLO...) are not counted,
so that a CREDIT can never be stuck behind missing credit. Every counted byte
is charged to its stream's window *and* the connection window; a send needs
room in both.

Receiver: charge each frame as it arrives (`on_data`, before reassembly
buffers it); call `release(stream, n)` once the application has durably
stored n bytes; send one CREDIT per `Grant` that `take_grants()` returns
(stream id 0 = the connection window). A window's released bytes are granted
back when any of these holds (the batching rule):
  * at least `grant_threshold` (default: half the window) is pending: bulk
    transfer sends one CREDIT per half window, not per chunk;
  * the application has released everything it received: an idle receiver
    always restores the peer's full window;
  * the peer has no credit left at all: it is blocked, so even a small
    grant is worth a frame.

Sender: reserve a whole message (`consume(stream, size)`) before sending its
first frame, i.e. send a message only when `send_capacity(stream) >= size`.
The receiver cannot release half a message, so a half-sent message waiting
for credit would pin the connection window, and two of them can deadlock.
With whole-message reservation, no deadlock is possible provided every
flow-controlled message is <= min(stream window, connection window): at
quiescence every message has arrived and been released, so the second rule
hands the sender its full windows back. (Enforce that size cap at HELLO.)
A sender with a single active stream may instead send fragments as credit
trickles in; the third rule keeps that live too.
"""

from __future__ import annotations

import attrs

from sync.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_CONNECTION_WINDOW",
    "DEFAULT_STREAM_WINDOW",
    "MAX_WINDOW",
    "FlowController",
    "FlowStatistics",
    "Grant",
    "ReceiveWindow",
    "SendWindow",
]

# HTTP/2's limit: windows and credits fit a signed 32-bit integer everywhere.
MAX_WINDOW = 2**31 - 1
# Must hold the largest flow-controlled message (frames.DEFAULT_MAX_MESSAGE_SIZE)
# and cover a storage commit: ~10 ms of fsync at ~1.5 GB/s of loopback.
DEFAULT_STREAM_WINDOW = 16 * 1024 * 1024
# Two full streams at once; also the most unreleased data a peer can make us
# hold, so it bounds receiver memory (frames.DEFAULT_MAX_REASSEMBLY_SIZE >= it).
DEFAULT_CONNECTION_WINDOW = 32 * 1024 * 1024


def _check_size(name: str, value: int) -> None:
    if not 0 <= value <= MAX_WINDOW:
        raise ValueError(f"{name} {value} outside [0, {MAX_WINDOW}]")


class SendWindow:
    """Credit the peer has granted us for one stream or the connection."""

    def __init__(self, initial: int) -> None:
        _check_size("initial window", initial)
        self._initial = initial
        self._available = initial

    @property
    def available(self) -> int:
        return self._available

    @property
    def unacknowledged(self) -> int:
        """Bytes sent whose credit has not come back (0 if the peer over-granted)."""
        return max(0, self._initial - self._available)

    def check_consume(self, n: int) -> None:
        if n < 0:
            raise ValueError("negative byte count")
        if n > self._available:
            raise LocalProtocolError(
                ErrorCode.FLOW_CONTROL, f"sending {n} bytes with {self._available} granted"
            )

    def consume(self, n: int) -> None:
        """We are about to send n counted bytes; never more than granted."""
        self.check_consume(n)
        self._available -= n

    def grant(self, n: int) -> None:
        """A CREDIT of n bytes arrived."""
        if n <= 0:
            raise RemoteProtocolError(ErrorCode.FLOW_CONTROL, f"credit of {n} bytes")
        if self._available + n > MAX_WINDOW:
            raise RemoteProtocolError(ErrorCode.FLOW_CONTROL, "credit overflows the window")
        self._available += n


class ReceiveWindow:
    """What we let the peer send; always available + unreleased + pending == size."""

    def __init__(self, size: int, *, grant_threshold: int | None = None) -> None:
        _check_size("window", size)
        self.size = size
        self.grant_threshold = max(1, size // 2) if grant_threshold is None else grant_threshold
        if self.grant_threshold < 1:
            raise ValueError("grant_threshold must be positive")
        self._available = size  # the peer may still send this much
        self._unreleased = 0  # received, not yet durably consumed
        self._pending = 0  # released, not yet granted back

    @property
    def available(self) -> int:
        return self._available

    @property
    def unreleased(self) -> int:
        return self._unreleased

    @property
    def pending(self) -> int:
        return self._pending

    def check_data(self, n: int) -> None:
        if n > self._available:
            raise RemoteProtocolError(
                ErrorCode.FLOW_CONTROL, f"peer sent {n} bytes with {self._available} granted"
            )

    def on_data(self, n: int) -> None:
        """The peer sent n counted bytes."""
        self.check_data(n)
        self._available -= n
        self._unreleased += n

    def check_release(self, n: int) -> None:
        if not 0 <= n <= self._unreleased:
            raise LocalProtocolError(
                ErrorCode.FLOW_CONTROL, f"releasing {n} bytes, {self._unreleased} unreleased"
            )

    def release(self, n: int) -> None:
        self.check_release(n)
        self._unreleased -= n
        self._pending += n

    def pending_grant(self) -> int:
        """What `take_grant` would return now (see the module docstring)."""
        if self._pending and (
            self._pending >= self.grant_threshold or not self._unreleased or not self._available
        ):
            return self._pending
        return 0

    def take_grant(self) -> int:
        """Commit to sending a CREDIT for the returned amount (0: send none)."""
        amount = self.pending_grant()
        self._pending -= amount
        self._available += amount
        return amount


@attrs.frozen(kw_only=True)
class Grant:
    """Send a CREDIT of `amount` bytes for `stream_id` (0 = connection)."""

    stream_id: int
    amount: int


@attrs.frozen(kw_only=True)
class FlowStatistics:
    """Connection-level numbers; per-stream windows are always within them."""

    open_streams: int
    send_available: int  # credit we may still use
    send_unacknowledged: int  # sent, credit not yet back: our bytes in flight
    receive_available: int  # the peer may still send this much
    receive_unreleased: int  # received, not yet durably stored
    receive_pending_grant: int  # released, CREDIT not yet sent


class FlowController:
    """Both directions of one connection: per-stream windows plus stream 0's.

    Streams are opened and closed explicitly by the connection. After a
    stream closes: a CREDIT for it is ignored (a normal race); data for it is
    still charged to the connection window (the connection, having dropped
    it, must `release` it at once); `release` for it frees connection credit.
    """

    def __init__(
        self,
        *,
        send_connection_window: int,
        send_stream_window: int,
        receive_connection_window: int = DEFAULT_CONNECTION_WINDOW,
        receive_stream_window: int = DEFAULT_STREAM_WINDOW,
    ) -> None:
        _check_size("send stream window", send_stream_window)
        _check_size("receive stream window", receive_stream_window)
        self._send_stream_window = send_stream_window
        self._receive_stream_window = receive_stream_window
        self._send = SendWindow(send_connection_window)
        self._receive = ReceiveWindow(receive_connection_window)
        self._streams: dict[int, tuple[SendWindow, ReceiveWindow]] = {}
        self._dirty: set[int] = set()  # windows that may owe a grant

    def open_stream(self, stream_id: int) -> None:
        if stream_id == 0 or stream_id in self._streams:
            raise LocalProtocolError(ErrorCode.INTERNAL, f"cannot open stream {stream_id}")
        self._streams[stream_id] = (
            SendWindow(self._send_stream_window),
            ReceiveWindow(self._receive_stream_window),
        )

    def close_stream(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        self._dirty.discard(stream_id)

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def send_capacity(self, stream_id: int) -> int:
        """The largest message we may send on this stream now."""
        return min(self._stream(stream_id)[0].available, self._send.available)

    def consume(self, stream_id: int, n: int) -> None:
        """Reserve n bytes (a whole message) on the stream and the connection."""
        stream = self._stream(stream_id)[0]
        self._send.check_consume(n)  # check both before changing either
        stream.consume(n)
        self._send.consume(n)

    def on_credit(self, stream_id: int, amount: int) -> None:
        if stream_id == 0:
            self._send.grant(amount)
        elif stream_id in self._streams:
            self._streams[stream_id][0].grant(amount)
        elif amount <= 0:
            raise RemoteProtocolError(ErrorCode.FLOW_CONTROL, f"credit of {amount} bytes")

    def on_data(self, stream_id: int, n: int) -> None:
        """Charge n received payload bytes; raises if the peer overran."""
        stream = self._streams.get(stream_id)
        self._receive.check_data(n)
        if stream is not None:
            stream[1].on_data(n)
            self._dirty.add(stream_id)
        self._receive.on_data(n)
        self._dirty.add(0)

    def release(self, stream_id: int, n: int) -> None:
        """The application has durably consumed n bytes of this stream."""
        stream = self._streams.get(stream_id)
        self._receive.check_release(n)
        if stream is not None:
            stream[1].release(n)
            self._dirty.add(stream_id)
        self._receive.release(n)
        self._dirty.add(0)

    def take_grants(self) -> list[Grant]:
        """CREDITs to send now; stream grants first, the connection's last."""
        grants = []
        for stream_id in sorted(self._dirty, reverse=True):  # 0, the connection, last
            window = self._receive if stream_id == 0 else self._streams[stream_id][1]
            amount = window.take_grant()
            if amount:
                grants.append(Grant(stream_id=stream_id, amount=amount))
        self._dirty.clear()
        return grants

    def statistics(self) -> FlowStatistics:
        return FlowStatistics(
            open_streams=len(self._streams),
            send_available=self._send.available,
            send_unacknowledged=self._send.unacknowledged,
            receive_available=self._receive.available,
            receive_unreleased=self._receive.unreleased,
            receive_pending_grant=self._receive.pending,
        )

    def _stream(self, stream_id: int) -> tuple[SendWindow, ReceiveWindow]:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise LocalProtocolError(ErrorCode.INTERNAL, f"stream {stream_id} is not open") from None
