"""Tests for sync.connection: the handshake, the GOODBYE state table, flow
control across a pair of connections, streams, and fuzzing after HELLO.

Two `Connection`s talk through `protocol_helpers.feed`, which delivers bytes
in pieces no larger than the connection reads (optionally of random sizes)
and drains events after each piece, as the daemon's reader task does.
"""

from __future__ import annotations

import random
import struct
from collections import Counter, defaultdict, deque

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol_helpers import (
    MiB,
    NODE_A,
    NODE_B,
    drain,
    feed,
    forge,
    frame_headers,
    handshake,
    hello,
    messages_of,
    objects,
    open_pair,
    pair,
    raw_frame,
)
from sync import frames
from sync.connection import (
    MAX_PEER_STREAMS,
    MIN_WINDOW,
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Received,
    State,
)
from sync.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from sync.frames import HEADER_SIZE, MIN_FRAME_SIZE, PRE_HELLO_MAX_FRAME_SIZE, FrameDecoder
from sync.messages import (
    ID_BYTES,
    PROTOCOL_VERSIONS,
    Credit,
    Error,
    Goodbye,
    MessageType,
    Objects,
    Ping,
    Pong,
    PushContext,
    Root,
    StreamChunk,
    Want,
    decode_payload,
    encode_payload,
)

ID1 = b"\x01" * ID_BYTES


def expect_remote_error(conn: Connection, data: bytes, code: ErrorCode) -> RemoteProtocolError:
    """Feeding `data` (no EOF after it) raises a RemoteProtocolError with `code`."""
    with pytest.raises(RemoteProtocolError) as info:
        feed(conn, data)
    assert info.value.code == code, info.value
    assert conn.state is State.ERROR
    return info.value


def decode_error_frame(data: bytes) -> Error:
    """The single ERROR frame `failure_bytes` produced, read as the peer would."""
    decoder = FrameDecoder()
    decoder.receive_data(data)
    frame = decoder.next_frame()
    assert frame is not None and decoder.next_frame() is None
    assert frame.type == MessageType.ERROR and frame.stream_id == 0 and not frame.more
    assert len(frame.payload) <= MIN_FRAME_SIZE  # fits any peer's frame cap
    error = decode_payload(frame.type, frame.payload)
    assert isinstance(error, Error)
    return error


def objects_of_size(n: int, rng: random.Random | None = None) -> Objects:
    return objects((rng or random.Random(n)).randbytes(n))


def payload_size(message) -> int:
    return len(encode_payload(message))


# ---------------------------------------------------------------- handshake


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_handshake_opens_both_sides(seed):
    a, b = pair(hello(NODE_A), hello(NODE_B, max_frame_size=MIN_FRAME_SIZE))
    assert a.statistics() is None and b.statistics() is None
    got_a, got_b = handshake(a, b, None if seed is None else random.Random(seed))
    assert a.state is State.OPEN and b.state is State.OPEN
    assert a.version == b.version == max(PROTOCOL_VERSIONS)
    assert a.peer_hello == b.our_hello and b.peer_hello == a.our_hello
    assert got_a == Received(stream_id=0, message=b.our_hello, size=payload_size(b.our_hello))
    assert got_b == Received(stream_id=0, message=a.our_hello, size=payload_size(a.our_hello))
    assert a.statistics().send_available == b.our_hello.connection_window
    assert b.statistics().receive_available == b.our_hello.connection_window


def test_handshake_in_either_order_and_with_bytes_in_flight():
    a, b = pair()
    a_hello, b_hello = a.start(), b.start()
    # B's HELLO reaches A first; A opens and sends at once, so its HELLO and
    # its first message reach B in one piece.
    feed(a, b_hello)
    assert a.state is State.OPEN and b.state is State.HANDSHAKE
    data = a_hello + a.send(Ping(nonce=9))
    b.receive_data(data)
    events = drain(b)
    assert messages_of(events) == [a.our_hello, Ping(nonce=9)]
    assert b.state is State.OPEN


def test_version_is_the_highest_common_one():
    a, b = pair(hello(NODE_A, versions=(*PROTOCOL_VERSIONS, 99, 1000)), hello(NODE_B))
    handshake(a, b)
    assert a.version == b.version == max(PROTOCOL_VERSIONS)


def test_next_event_before_start_is_a_local_error():
    a, b = pair()
    a.receive_data(b.start())
    with pytest.raises(LocalProtocolError):
        a.next_event()


def test_start_twice_is_a_local_error():
    a, _ = pair()
    first = a.start()
    assert frame_headers(first) == [(MessageType.HELLO, 0, 0, len(first) - HEADER_SIZE)]
    with pytest.raises(LocalProtocolError):
        a.start()


@pytest.mark.parametrize(
    ("message", "stream_id"),
    [
        (Ping(nonce=1), 0), (Pong(nonce=1), 0), (Root(root=ID1, count=1), 0), (Want(ids=(ID1,)), 1),
        (Goodbye(code=0), 0), (Credit(increment=1), 0), (objects(b"x"), 1),
        (PushContext(context=b"x"), 1), (Error(code=1, message="x"), 0),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, int) else str(v),
)
def test_sending_before_the_peers_hello_is_a_local_error(message, stream_id):
    a, b = pair()
    a.start()
    b.start()
    with pytest.raises(LocalProtocolError):
        a.send(message, stream_id=stream_id)
    assert a.state is State.HANDSHAKE
    for call in (a.open_stream, lambda: a.send_capacity(1), lambda: a.release(1, 0)):
        with pytest.raises(LocalProtocolError):
            call()


def test_hello_is_only_sent_by_start():
    a, b = open_pair()
    with pytest.raises(LocalProtocolError):
        a.send(a.our_hello)
    assert a.state is State.OPEN


@pytest.mark.parametrize(
    "bad",
    [dict(max_frame_size=1000), dict(max_frame_size=frames.MAX_FRAME_SIZE + 1), dict(stream_window=1000),
     dict(connection_window=MIN_WINDOW - 1), dict(stream_window=2**31)],
    ids=["frame-small", "frame-large", "stream-window-small", "connection-window-small", "stream-window-large"],
)
def test_our_own_unacceptable_hello_is_our_error(bad):
    # Every peer would refuse this HELLO with PROTOCOL_ERROR; the mistake is
    # ours and should be reported as ours, before anything is sent.
    with pytest.raises((LocalProtocolError, ValueError)):
        Connection(hello=hello(NODE_A, **bad), dialer=True)


# ---------------------------------------------------------------- bad first bytes


NOT_CTXFS = {
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "tls": bytes.fromhex("160301020001000001fc0303") + b"\x00" * 32,
    "ssh": b"SSH-2.0-OpenSSH_9.6\r\n",
    "zeros": b"\x00" * 64,
}


@pytest.mark.parametrize("data", NOT_CTXFS.values(), ids=NOT_CTXFS.keys())
def test_a_peer_that_does_not_speak_ctxfs_gets_bad_magic_and_nothing_back(data):
    _, b = pair()
    b.start()
    error = expect_remote_error(b, data, ErrorCode.BAD_MAGIC)
    assert b.failure_bytes(error) == b""


@pytest.mark.parametrize(
    "first",
    [
        forge(Want(ids=(ID1,)), 1),
        forge(Ping(nonce=1)),
        raw_frame(MessageType.HELLO, 1, encode_payload(hello())),  # HELLO on a stream
        raw_frame(MessageType.HELLO, 0, encode_payload(hello())[:10], flags=frames.FLAG_MORE),  # fragmented
    ],
    ids=["want", "ping", "hello-on-stream", "hello-fragment"],
)
def test_a_first_frame_that_is_not_a_hello_is_bad_magic(first):
    _, b = pair()
    b.start()
    error = expect_remote_error(b, first, ErrorCode.BAD_MAGIC)
    assert b.failure_bytes(error) == b""
    assert b.state is State.ERROR


def test_hello_with_the_wrong_magic_is_bad_magic():
    _, b = pair()
    b.start()
    wrong = Connection(hello=hello(NODE_A, magic=b"HTTP"), dialer=True).start()
    error = expect_remote_error(b, wrong, ErrorCode.BAD_MAGIC)
    assert b.failure_bytes(error) == b""


def test_hello_with_no_common_version_gets_an_error_listing_ours():
    a, b = pair(hello(NODE_A, versions=(99,)), hello(NODE_B))
    b.start()
    error = expect_remote_error(b, a.start(), ErrorCode.UNSUPPORTED_VERSION)
    sent = decode_error_frame(b.failure_bytes(error))
    assert sent.code == ErrorCode.UNSUPPORTED_VERSION
    for version in PROTOCOL_VERSIONS:
        assert str(version) in sent.message


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        (dict(max_frame_size=MIN_FRAME_SIZE - 1), ErrorCode.PROTOCOL_ERROR),
        (dict(max_frame_size=frames.MAX_FRAME_SIZE + 1), ErrorCode.PROTOCOL_ERROR),
        (dict(stream_window=MIN_WINDOW - 1), ErrorCode.PROTOCOL_ERROR),
        (dict(connection_window=2**31), ErrorCode.PROTOCOL_ERROR),
        (dict(versions=()), ErrorCode.UNSUPPORTED_VERSION),
    ],
    ids=["frame-small", "frame-large", "stream-window-small", "connection-window-large", "no-versions"],
)
def test_hello_with_unacceptable_parameters(fields, code):
    _, b = pair()
    b.start()
    # Forged: hello() would refuse some of these values... and so would the
    # Connection constructor, ideally (see test_our_own_unacceptable_hello_is_our_error).
    their_hello = attrs.evolve(hello(NODE_A), **fields)
    error = expect_remote_error(b, raw_frame(MessageType.HELLO, 0, encode_payload(their_hello)), code)
    assert decode_error_frame(b.failure_bytes(error)).code == code


def test_a_second_hello_is_a_protocol_error():
    a, b = open_pair()
    error = expect_remote_error(b, forge(a.our_hello), ErrorCode.PROTOCOL_ERROR)
    assert decode_error_frame(b.failure_bytes(error)).code == ErrorCode.PROTOCOL_ERROR
    with pytest.raises(LocalProtocolError):
        b.next_event()  # a failed connection yields nothing more


def test_a_frame_over_the_pre_hello_cap_fails_on_its_header():
    _, b = pair()
    b.start()
    header = struct.pack(">BBII", MessageType.HELLO, 0, 0, PRE_HELLO_MAX_FRAME_SIZE + 1)
    b.receive_data(header[:-1])
    assert b.next_event() is NEED_DATA
    b.receive_data(header[-1:])
    with pytest.raises(RemoteProtocolError) as info:
        b.next_event()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_a_frame_at_the_pre_hello_cap_is_awaited():
    _, b = pair()
    b.start()
    b.receive_data(struct.pack(">BBII", MessageType.HELLO, 0, 0, PRE_HELLO_MAX_FRAME_SIZE))
    assert b.next_event() is NEED_DATA


def test_after_hello_the_cap_is_the_one_we_advertised():
    a, b = open_pair(hello(NODE_A, max_frame_size=MiB), hello(NODE_B, max_frame_size=MIN_FRAME_SIZE))
    # B advertised 16 KiB: a header announcing one byte more fails at once.
    b.receive_data(struct.pack(">BBII", MessageType.OBJECTS, 0, 1, MIN_FRAME_SIZE + 1))
    with pytest.raises(RemoteProtocolError) as info:
        b.next_event()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert b.failure_bytes(info.value)  # a ctxfs peer is told
    # A advertised 1 MiB: 1 MiB is awaited, 1 MiB + 1 is refused.
    a.receive_data(struct.pack(">BBII", MessageType.OBJECTS, 0, 2, MiB))
    assert a.next_event() is NEED_DATA
    c, _ = open_pair(hello(NODE_A, max_frame_size=MiB), hello(NODE_B, max_frame_size=MIN_FRAME_SIZE))
    c.receive_data(struct.pack(">BBII", MessageType.OBJECTS, 0, 2, MiB + 1))
    with pytest.raises(RemoteProtocolError) as info:
        c.next_event()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_the_new_cap_applies_to_frames_right_behind_the_hello():
    a, b = pair(hello(NODE_A), hello(NODE_B, max_frame_size=MiB))
    a_hello, b_hello = a.start(), b.start()
    feed(a, b_hello)
    big = objects_of_size(200_000)  # one frame: larger than the pre-HELLO cap
    data = a_hello + a.send(big, stream_id=a.open_stream())
    assert len(frame_headers(data)) == 2
    assert messages_of(feed(b, data)) == [a.our_hello, big]


# ---------------------------------------------------------------- GOODBYE


def test_goodbye_state_table():
    a, b = open_pair()
    bye = a.send(Goodbye(code=0, reason="done"))
    assert a.state is State.LOCAL_CLOSING
    for message in (Ping(nonce=1), Goodbye(code=0)):
        with pytest.raises(LocalProtocolError):
            a.send(message)
        assert a.state is State.LOCAL_CLOSING
    # What B sent before it saw the GOODBYE still reaches A.
    in_flight = b.send(Ping(nonce=2))
    assert messages_of(feed(a, in_flight)) == [Ping(nonce=2)]
    assert a.state is State.LOCAL_CLOSING

    assert messages_of(feed(b, bye)) == [Goodbye(code=0, reason="done")]
    assert b.state is State.REMOTE_CLOSING
    stream = b.open_stream()
    for message, stream_id in [(Ping(nonce=3), 0), (Pong(nonce=2), 0), (Root(root=ID1, count=1), 0),
                               (Want(ids=()), stream), (objects(), stream), (Credit(increment=5), 0)]:
        with pytest.raises(LocalProtocolError):
            b.send(message, stream_id=stream_id)
        assert b.state is State.REMOTE_CLOSING
    bye_back = b.send(Goodbye(code=0))
    assert b.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        b.send(Goodbye(code=0))

    assert messages_of(feed(a, bye_back)) == [Goodbye(code=0)]
    assert a.state is State.CLOSED
    for conn in (a, b):
        conn.receive_data(b"")
        assert drain(conn) == [ConnectionClosed(clean=True)]
        assert conn.state is State.CLOSED


def test_anything_after_the_peers_goodbye_is_a_protocol_error():
    a, b = open_pair()
    ping_after_bye = b"".join(forge(m) for m in (Goodbye(code=0), Ping(nonce=1)))
    expect_remote_error(a, ping_after_bye, ErrorCode.PROTOCOL_ERROR)


def test_anything_after_both_goodbyes_is_a_protocol_error():
    a, b = open_pair()
    feed(b, a.send(Goodbye(code=0)))
    feed(a, b.send(Goodbye(code=0)))
    assert a.state is State.CLOSED
    expect_remote_error(a, forge(Ping(nonce=1)), ErrorCode.PROTOCOL_ERROR)


def test_credit_granted_while_closing_is_acceptable_to_the_peer():
    # B's data is in flight when A says GOODBYE; A still stores it and
    # releases it, and release() returns CREDIT frames in LOCAL_CLOSING.
    # Whatever release() returns must be something B accepts.
    a, b = open_pair()
    data = b.send(objects_of_size(1000), stream_id=b.open_stream())
    (got,) = feed(a, data)
    bye = a.send(Goodbye(code=0))
    credit = a.release(got.stream_id, got.size)
    feed(b, bye + credit)
    assert b.state is State.REMOTE_CLOSING
    feed(a, b.send(Goodbye(code=0)))
    assert a.state is State.CLOSED


@pytest.mark.parametrize("closing", [False, True])
def test_eof_without_goodbye_is_unclean(closing):
    a, b = open_pair()
    if closing:
        feed(b, a.send(Goodbye(code=0)))  # B said nothing back
    for conn in (a, b):
        conn.receive_data(b"")
        assert drain(conn) == [ConnectionClosed(clean=False)]


def test_eof_before_hello_is_unclean():
    a, _ = pair()
    a.start()
    a.receive_data(b"")
    assert a.next_event() == ConnectionClosed(clean=False)


def test_the_closed_event_does_not_change_when_asked_again():
    a, b = open_pair()
    a.receive_data(b"")
    first = a.next_event()
    assert first == ConnectionClosed(clean=False)
    assert a.next_event() == first


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 3])
def test_eof_mid_frame_is_a_remote_error(cut):
    a, b = open_pair()
    data = a.send(Ping(nonce=12345))
    b.receive_data(data[:cut])
    assert b.next_event() is NEED_DATA
    b.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        b.next_event()


# ---------------------------------------------------------------- flow control


def test_a_10_mb_object_crosses_in_many_frames_within_the_window():
    window = 16 * MiB
    a, b = open_pair(hello(NODE_A), hello(NODE_B, max_frame_size=MiB, stream_window=window, connection_window=32 * MiB))
    rng = random.Random(1)
    blobs = [rng.randbytes(10_000_000) for _ in range(2)]
    messages = deque(objects(blob, final=i == 1) for i, blob in enumerate(blobs))
    stream = a.open_stream()
    wire = bytearray()
    received, sent, credited = [], 0, 0

    def check(_events=()):
        # What A has in flight never exceeds what B granted, at every step.
        assert sent - credited <= window
        assert a.statistics().send_unacknowledged == sent - credited
        assert a.send_capacity(stream) == window - (sent - credited)
        assert b.statistics().receive_unreleased <= window

    while messages or wire:
        check()
        size = payload_size(messages[0]) if messages else None
        if size is not None and size <= a.send_capacity(stream):
            data = a.send(messages.popleft(), stream_id=stream)
            sent += size
            headers = frame_headers(data)
            assert len(headers) >= 10
            assert all(h[:3] == (MessageType.OBJECTS, frames.FLAG_MORE, stream) for h in headers[:-1])
            assert headers[-1][:3] == (MessageType.OBJECTS, 0, stream)
            assert all(h[3] <= MiB for h in headers) and sum(h[3] for h in headers) == size
            wire += data
            continue
        if size is not None:  # no room: the send is refused and changes nothing
            before = a.statistics()
            with pytest.raises(LocalProtocolError) as info:
                a.send(messages[0], stream_id=stream)
            assert info.value.code == ErrorCode.FLOW_CONTROL
            assert a.statistics() == before
        events = feed(b, bytes(wire), rng, after_piece=check)
        wire.clear()
        for event in events:
            received.append(event.message)
            credit = b.release(event.stream_id, event.size)
            assert credit
            for got in feed(a, credit):
                assert isinstance(got.message, Credit)
                if got.stream_id == stream:  # (stream 0's credit is the connection's)
                    credited += got.message.increment
        check()
    assert [m.objects[0] == blob for m, blob in zip(received, blobs)] == [True, True]
    assert [m.final for m in received] == [False, True]
    assert a.statistics().send_unacknowledged == 0


def _small_window_pair(stream_window=MIN_WINDOW, connection_window=MIN_WINDOW + 32 * 1024):
    return open_pair(
        hello(NODE_A, max_frame_size=MIN_FRAME_SIZE),
        hello(NODE_B, max_frame_size=MIN_FRAME_SIZE, stream_window=stream_window, connection_window=connection_window),
    )


def test_a_message_bigger_than_the_capacity_is_refused_and_changes_nothing():
    a, b = _small_window_pair()
    one, two = a.open_stream(), a.open_stream()
    first = objects_of_size(40_000)
    first_bytes = a.send(first, stream_id=one)
    capacity = a.send_capacity(one)
    assert capacity == MIN_WINDOW - payload_size(first)
    stats = a.statistics()
    # Over the stream window of `one`; over the connection window (not the
    # stream window) for `two`; a STREAM_CHUNK is flow-controlled too.
    chunk = StreamChunk(chunk_id=0, atoms=(), is_final=False, cumulative_tokens=0, progress=0.0)
    for stream, message in [(one, objects_of_size(capacity)), (two, objects_of_size(60_000)),
                            (one, PushContext(context=b"x" * capacity))]:
        assert payload_size(message) > a.send_capacity(stream)
        with pytest.raises(LocalProtocolError) as info:
            a.send(message, stream_id=stream)
        assert info.value.code == ErrorCode.FLOW_CONTROL
        assert a.statistics() == stats and a.state is State.OPEN
        assert a.send_capacity(one) == capacity
    chunk_bytes = a.send(chunk, stream_id=one)  # a message that fits still goes
    assert a.send_capacity(one) == capacity - payload_size(chunk)
    # Stream two was refused for lack of *connection* credit; its own window
    # must not have been charged: with the connection credit back, it is whole.
    for event in feed(b, first_bytes + chunk_bytes):
        feed(a, b.release(event.stream_id, event.size))
    assert a.send_capacity(two) == MIN_WINDOW
    assert a.send_capacity(one) == MIN_WINDOW


def test_flow_controlled_messages_need_an_open_stream():
    a, b = open_pair()
    with pytest.raises(LocalProtocolError):
        a.send(objects(), stream_id=0)
    with pytest.raises(LocalProtocolError):
        a.send(objects(), stream_id=5)  # never opened
    assert a.state is State.OPEN and a.statistics().send_unacknowledged == 0


def test_a_message_over_the_size_limit_is_refused():
    a = Connection(hello=hello(NODE_A), dialer=True, max_message_size=1000)
    b = Connection(hello=hello(NODE_B), dialer=False)
    handshake(a, b)
    with pytest.raises(LocalProtocolError) as info:
        a.send(objects_of_size(2000), stream_id=a.open_stream())
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED


def test_control_messages_are_not_flow_controlled():
    a, b = _small_window_pair()
    stream = a.open_stream()
    a.send(objects_of_size(MIN_WINDOW - 100), stream_id=stream)
    stats = a.statistics()
    for _ in range(50):
        feed(b, a.send(Want(ids=(ID1,) * 100), stream_id=stream) + a.send(Ping(nonce=1)))
    assert a.statistics() == stats


def test_credit_flows_back_after_release():
    a, b = _small_window_pair()
    stream = a.open_stream()
    message = objects_of_size(50_000)
    size = payload_size(message)
    (got,) = feed(b, a.send(message, stream_id=stream))
    assert got == Received(stream_id=stream, message=message, size=size)
    assert a.send_capacity(stream) == MIN_WINDOW - size
    # Nothing is granted before the application says the bytes are stored.
    assert b.statistics().receive_unreleased == size
    # A partial release below the batching threshold may wait...
    credit = b.release(stream, 1000)
    credit += b.release(stream, size - 1000)
    # ...but releasing everything always returns the full window.
    grants = Counter()
    for event in feed(a, credit):
        assert isinstance(event.message, Credit)
        grants[event.stream_id] += event.message.increment
    assert grants == {stream: size, 0: size}
    assert a.send_capacity(stream) == MIN_WINDOW
    assert a.statistics().send_unacknowledged == 0
    assert b.statistics().receive_unreleased == 0
    with pytest.raises(LocalProtocolError):
        b.release(stream, 1)  # nothing left to release


def test_a_peer_sending_beyond_the_stream_window_is_a_flow_control_error():
    a, b = _small_window_pair(stream_window=MIN_WINDOW, connection_window=4 * MIN_WINDOW)
    # Forged frames on stream 1: four full 16 KiB frames fill the 64 KiB window.
    forged = list(frames.fragment(MessageType.OBJECTS, 1, b"\x00" * (MIN_WINDOW + 1), MIN_FRAME_SIZE))
    for frame in forged[:4]:
        b.receive_data(frame)
        assert b.next_event() is NEED_DATA
    b.receive_data(forged[4])
    with pytest.raises(RemoteProtocolError) as info:
        b.next_event()
    assert info.value.code == ErrorCode.FLOW_CONTROL
    assert decode_error_frame(b.failure_bytes(info.value)).code == ErrorCode.FLOW_CONTROL


def test_a_peer_sending_beyond_the_connection_window_is_a_flow_control_error():
    a, b = _small_window_pair(stream_window=MIN_WINDOW, connection_window=MIN_WINDOW + MIN_FRAME_SIZE)
    # Three non-final 16 KiB fragments on each of two streams: each stream
    # stays within its 64 KiB, but 96 KiB in all is over the 80 KiB granted.
    fragments = {
        stream: list(frames.fragment(MessageType.OBJECTS, stream, b"\x00" * (4 * MIN_FRAME_SIZE), MIN_FRAME_SIZE))[:3]
        for stream in (1, 3)
    }
    within = b"".join(fragments[1] + fragments[3][:2])  # exactly 80 KiB
    assert feed(b, within) == []
    expect_remote_error(b, fragments[3][2], ErrorCode.FLOW_CONTROL)


def test_forged_traffic_within_the_window_is_accepted():
    # The converse of the two tests above: exactly the window is fine.
    a, b = _small_window_pair(stream_window=MIN_WINDOW, connection_window=MIN_WINDOW)
    payload = encode_payload(objects(b"\x00" * (MIN_WINDOW - 100)))
    assert len(payload) <= MIN_WINDOW
    (event,) = feed(b, b"".join(frames.fragment(MessageType.OBJECTS, 1, payload, MIN_FRAME_SIZE)))
    assert event.size == len(payload)
    assert b.statistics().receive_available == MIN_WINDOW - len(payload)


def test_credit_that_overflows_the_window_is_a_flow_control_error():
    a, b = open_pair()
    expect_remote_error(b, forge(Credit(increment=2**31 - 1)), ErrorCode.FLOW_CONTROL)


def test_a_flow_controlled_message_on_stream_zero_is_a_protocol_error():
    # send() refuses it ("needs a stream"); the receiver must not quietly
    # swallow what a compliant sender cannot produce.
    a, b = open_pair()
    expect_remote_error(b, forge(objects(b"x")), ErrorCode.PROTOCOL_ERROR)


_plans = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 60_000)), min_size=1, max_size=10)
_TRANSFER = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_TRANSFER
@given(plan=_plans, seed=st.integers(0, 2**32))
def test_random_transfers_stay_within_the_windows_and_arrive_in_order(plan, seed):
    # Streams are opened up front and first used in whatever order the
    # random schedule picks, as concurrent request handlers would.
    _random_transfer(plan, seed, announce_in_order=False)


def test_streams_may_be_first_used_in_any_order():
    # Two request handlers each open a stream; the second one sends first.
    a, b = open_pair()
    first, second = a.open_stream(), a.open_stream()
    early, late = objects(b"sent on the second stream"), objects(b"sent on the first stream")
    data = a.send(early, stream_id=second) + a.send(late, stream_id=first)
    got = feed(b, data)
    assert [(e.stream_id, e.message) for e in got] == [(second, early), (first, late)]


@_TRANSFER
@given(plan=_plans, seed=st.integers(0, 2**32))
def test_random_transfers_on_streams_first_used_in_opening_order(plan, seed):
    # The same with an empty WANT on each stream first, in opening order:
    # checks the windows independently of the stream-order bug above.
    _random_transfer(plan, seed, announce_in_order=True)


def _random_transfer(plan, seed: int, *, announce_in_order: bool) -> None:
    rng = random.Random(seed)
    stream_window, connection_window = MIN_WINDOW, MIN_WINDOW + 32 * 1024
    a, b = _small_window_pair(stream_window, connection_window)
    streams = [a.open_stream() for _ in range(3)]
    announced = b"".join(a.send(Want(ids=()), stream_id=s) for s in streams) if announce_in_order else b""
    assert len(feed(b, announced)) == (3 if announce_in_order else 0)
    queues = {s: deque() for s in streams}
    for index, size in plan:
        queues[streams[index]].append(objects_of_size(size, rng))
    expected = {s: list(q) for s, q in queues.items() if q}
    to_b, to_a = bytearray(), bytearray()
    sent, credited = Counter(), Counter()  # per stream id; 0 is the connection
    received = defaultdict(list)
    unreleased: list[list[int]] = []  # [stream, bytes not yet released]

    def in_flight(stream: int) -> int:
        return sent[stream] - credited[stream]

    def check():
        total = sum(sent[s] for s in streams) - credited[0]
        assert 0 <= total <= connection_window
        assert a.statistics().send_unacknowledged == total
        for s in streams:
            assert 0 <= in_flight(s) <= stream_window
            assert a.send_capacity(s) == min(stream_window - in_flight(s), connection_window - total)
        assert b.statistics().receive_unreleased <= connection_window

    def deliver(conn, wire):
        n = rng.randint(1, min(len(wire), conn.max_receive_size))
        piece = bytes(wire[:n])
        del wire[:n]
        conn.receive_data(piece)
        return drain(conn)

    for _step in range(20_000):
        if not (any(queues.values()) or to_b or to_a or unreleased):
            break
        action = rng.randrange(4)
        if action == 0:
            ready = [s for s in streams if queues[s]]
            if ready:
                s = rng.choice(ready)
                size = payload_size(queues[s][0])
                if size <= a.send_capacity(s):
                    to_b += a.send(queues[s].popleft(), stream_id=s)
                    sent[s] += size
        elif action == 1 and to_b:
            for event in deliver(b, to_b):
                received[event.stream_id].append(event.message)
                unreleased.append([event.stream_id, event.size])
        elif action == 2 and unreleased:
            entry = rng.choice(unreleased)
            n = rng.randint(1, entry[1]) if entry[1] else 0
            to_a += b.release(entry[0], n)
            entry[1] -= n
            if not entry[1]:
                unreleased.remove(entry)
        elif action == 3 and to_a:
            for event in deliver(a, to_a):
                assert isinstance(event.message, Credit)
                credited[event.stream_id] += event.message.increment
        check()
    else:
        pytest.fail("no progress: the transfer deadlocked")
    assert dict(received) == expected
    assert a.statistics().send_unacknowledged == 0
    assert all(a.send_capacity(s) == stream_window for s in streams)
    assert b.statistics().receive_available == connection_window


# ---------------------------------------------------------------- streams


def test_stream_ids_have_the_openers_parity():
    a, b = open_pair()
    assert [a.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [b.open_stream() for _ in range(3)] == [2, 4, 6]
    assert a.statistics().open_streams == 3


def test_messages_on_streams_arrive_with_their_stream_id():
    a, b = open_pair()
    mine, theirs = a.open_stream(), b.open_stream()
    got = feed(b, a.send(Want(ids=(ID1,)), stream_id=mine))
    assert got == [Received(stream_id=mine, message=Want(ids=(ID1,)), size=payload_size(Want(ids=(ID1,))))]
    got = feed(a, b.send(Ping(nonce=4), stream_id=theirs) + b.send(Ping(nonce=5), stream_id=mine))
    assert [(e.stream_id, e.message) for e in got] == [(theirs, Ping(nonce=4)), (mine, Ping(nonce=5))]


def test_sending_on_a_stream_nobody_opened_is_a_local_error():
    # Two ways our own mistake would surface at the peer instead: an id of
    # the peer's parity it never used (its PROTOCOL_ERROR), or an id of ours
    # we skipped (the peer then takes our lower ids for closed streams and
    # silently drops what we send on them).
    a, b = open_pair()
    with pytest.raises(LocalProtocolError):
        a.send(Ping(nonce=1), stream_id=4)  # B's parity; B never used it
    with pytest.raises(LocalProtocolError):
        a.send(Want(ids=(ID1,)), stream_id=7)  # ours, never opened
    assert a.state is State.OPEN


def test_replying_on_a_peer_stream_is_allowed():
    a, b = open_pair()
    request = b.open_stream()
    (got,) = feed(a, b.send(Want(ids=(ID1,)), stream_id=request))
    assert got.stream_id == request
    reply = objects(b"ctx")
    (back,) = feed(b, a.send(reply, stream_id=request))
    assert (back.stream_id, back.message) == (request, reply)


def test_max_flow_message_is_the_smallest_of_the_limits():
    a, b = _small_window_pair(stream_window=MIN_WINDOW, connection_window=2 * MIN_WINDOW)
    assert a.max_flow_message == MIN_WINDOW
    assert b.max_flow_message == frames.DEFAULT_MAX_MESSAGE_SIZE  # A's windows are larger


@pytest.mark.parametrize("dialer_receives", [True, False])
def test_a_frame_on_a_stream_of_ours_we_never_opened_is_a_protocol_error(dialer_receives):
    a, b = open_pair()
    receiver = a if dialer_receives else b
    ours = receiver.open_stream()
    feed(receiver, forge(Ping(nonce=1), ours))  # opened: fine
    receiver.close_stream(ours)
    feed(receiver, forge(Ping(nonce=2), ours))  # closed: a late frame, fine
    expect_remote_error(receiver, forge(Ping(nonce=3), ours + 2), ErrorCode.PROTOCOL_ERROR)


def test_more_than_max_peer_streams_is_limit_exceeded():
    a, b = open_pair()
    data = b"".join(forge(Ping(nonce=i), 2 * i + 1) for i in range(MAX_PEER_STREAMS))
    assert len(feed(b, data)) == MAX_PEER_STREAMS
    expect_remote_error(b, forge(Ping(nonce=0), 2 * MAX_PEER_STREAMS + 1), ErrorCode.LIMIT_EXCEEDED)


def test_closing_a_peer_stream_frees_its_slot():
    a, b = open_pair()
    feed(b, b"".join(forge(Ping(nonce=i), 2 * i + 1) for i in range(MAX_PEER_STREAMS)))
    b.close_stream(1)
    assert len(feed(b, forge(Ping(nonce=0), 2 * MAX_PEER_STREAMS + 1))) == 1
    assert b.state is State.OPEN


def test_data_on_a_closed_stream_is_dropped_and_its_connection_credit_freed():
    full = MIN_WINDOW + 32 * 1024
    a, b = _small_window_pair(connection_window=full)
    stream, other = a.open_stream(), a.open_stream()
    (got,) = feed(b, a.send(objects_of_size(30_000), stream_id=stream))
    feed(a, b.release(stream, got.size))
    b.close_stream(stream)  # B is done with it; A has not heard yet
    late = objects_of_size(40_000)
    late_bytes = a.send(late, stream_id=stream)
    assert a.statistics().send_available == full - payload_size(late)
    assert feed(b, late_bytes) == []  # dropped silently
    stats = b.statistics()
    assert b.state is State.OPEN
    assert stats.receive_unreleased == 0  # nothing held against the window...
    assert stats.receive_pending_grant == payload_size(late)  # ...and it is owed back to A
    # The freed connection credit reaches A with B's next CREDIT.
    (small,) = feed(b, a.send(objects_of_size(10), stream_id=other))
    feed(a, b.release(other, small.size))
    assert a.statistics().send_unacknowledged == 0
    assert a.statistics().send_available == full
    assert a.send_capacity(other) == MIN_WINDOW


def test_closing_a_stream_mid_message_frees_its_connection_credit():
    # B closes a stream (say, a cancelled request) while a fragmented message
    # on it is half reassembled. Those bytes were charged to the connection
    # window; with the stream gone nobody can release them but the connection.
    full = MIN_WINDOW + 32 * 1024
    a, b = _small_window_pair(connection_window=full)
    stream = a.open_stream()
    message = objects_of_size(50_000)  # four 16 KiB frames
    data = a.send(message, stream_id=stream)
    half = 2 * (HEADER_SIZE + MIN_FRAME_SIZE)
    assert feed(b, data[:half]) == []
    b.close_stream(stream)
    assert feed(b, data[half:]) == []  # the rest is dropped
    assert b.statistics().receive_unreleased == 0
    # And the sender gets its connection window back, once B sends CREDIT.
    other = a.open_stream()
    (small,) = feed(b, a.send(objects_of_size(10), stream_id=other))
    feed(a, b.release(other, small.size))
    assert a.statistics().send_available == full


# ---------------------------------------------------------------- fuzz

_VALID_PAYLOADS = [
    encode_payload(m)
    for m in (
        Ping(nonce=1), Pong(nonce=2), Credit(increment=1000), Credit(increment=2**31 - 1), Goodbye(code=0),
        Root(root=ID1, count=5), Want(ids=(ID1,)), objects(b"abc"), Error(code=1, message="x"),
        hello(NODE_A), PushContext(context=b"ctx"),
        StreamChunk(chunk_id=1, atoms=(), is_final=True, cumulative_tokens=0, progress=1.0),
    )
]


@st.composite
def _payloads(draw):
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=200))
    payload = bytearray(draw(st.sampled_from(_VALID_PAYLOADS)))
    if kind == 2 and payload:
        for _ in range(draw(st.integers(1, 3))):
            payload[draw(st.integers(0, len(payload) - 1))] = draw(st.integers(0, 255))
    return bytes(payload)


_stream_ids = st.sampled_from([0, 1, 2, 3, 4, 5, 7, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)
_types = st.sampled_from(list(MessageType)) | st.integers(0, 255)
_frame_bytes = st.one_of(
    st.builds(raw_frame, _types, _stream_ids, _payloads(), st.sampled_from([0, 0, 0, frames.FLAG_MORE])),
    # A header only, announcing anything up to 4 GiB.
    st.builds(lambda t, s, f, n: struct.pack(">BBII", t, f, s, n), _types, _stream_ids, st.integers(0, 3),
              st.integers(0, 2**32 - 1)),
    st.binary(max_size=64),  # noise
)


def _feed_fuzz(conn: Connection, data: bytes, rng: random.Random, eof: bool) -> None:
    bound = HEADER_SIZE + conn.our_hello.max_frame_size + conn.max_receive_size
    try:
        for start in range(0, len(data), conn.max_receive_size):
            chunk = data[start : start + conn.max_receive_size]
            while chunk:
                n = rng.randint(1, len(chunk))
                conn.receive_data(chunk[:n])
                chunk = chunk[n:]
                drain(conn)
                # Internals, for want of a public figure: what the peer can
                # make us hold stays within the documented bounds.
                assert conn._decoder.buffered_size <= bound
                assert conn._assembler.buffered_size <= frames.DEFAULT_MAX_REASSEMBLY_SIZE
                stats = conn.statistics()
                assert stats.receive_unreleased <= conn.our_hello.connection_window
        if eof:
            conn.receive_data(b"")
            drain(conn)
    except RemoteProtocolError as exc:
        assert conn.state is State.ERROR
        reply = conn.failure_bytes(exc)
        assert decode_error_frame(reply).code == exc.code


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(_frame_bytes, max_size=12), rng=st.randoms(use_true_random=False), eof=st.booleans())
def test_fuzz_frames_after_handshake_raise_only_remote_errors(pieces, rng, eof):
    a, b = open_pair(hello(NODE_A), hello(NODE_B, max_frame_size=MIN_FRAME_SIZE, stream_window=MIN_WINDOW,
                                          connection_window=MIN_WINDOW))
    b.open_stream()  # stream 2 is ours and open
    _feed_fuzz(b, b"".join(pieces), rng, eof)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), rng=st.randoms(use_true_random=False), eof=st.booleans())
def test_fuzz_arbitrary_bytes_after_handshake_raise_only_remote_errors(data, rng, eof):
    a, b = open_pair()
    _feed_fuzz(a, data, rng, eof)


def test_a_large_declared_frame_is_buffered_within_the_bound():
    a, b = open_pair(hello(NODE_A), hello(NODE_B, max_frame_size=MiB))
    b.open_stream()
    data = raw_frame(MessageType.PING, 0, b"\x00" * MiB)
    _feed_fuzz(b, data, random.Random(0), eof=False)
