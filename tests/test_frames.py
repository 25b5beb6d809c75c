"""Tests for sync.frames: header layout, the bounded decoder, reassembly."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    error_code_from_wire,
)
from sync.frames import (
    FLAG_MORE,
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    MAX_STREAM_ID,
    MIN_FRAME_SIZE,
    PRE_HELLO_MAX_FRAME_SIZE,
    Frame,
    FrameDecoder,
    Message,
    MessageAssembler,
    encode_frame,
    first_stream_id,
    fragment,
    next_stream_id,
    opened_by_dialer,
    validate_peer_max_frame_size,
)


def drain(decoder: FrameDecoder) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def feed(decoder: FrameDecoder, data: bytes, chunk: int) -> list[Frame]:
    frames = []
    for i in range(0, len(data), chunk):
        decoder.receive_data(data[i : i + chunk])
        frames += drain(decoder)
    return frames


def assemble(frames: list[Frame], assembler: MessageAssembler | None = None) -> list[Message]:
    assembler = assembler or MessageAssembler()
    return [m for f in frames if (m := assembler.add_frame(f)) is not None]


# --- Header layout and round trips ------------------------------------------


def test_header_layout_is_big_endian_10_bytes():
    frame = Frame(type=0xAB, flags=FLAG_MORE, stream_id=0x01020304, payload=b"xyz")
    data = encode_frame(frame)
    assert HEADER_SIZE == 10
    assert data == bytes([0xAB, 0x01, 1, 2, 3, 4, 0, 0, 0, 3]) + b"xyz"


@pytest.mark.parametrize(
    "frame",
    [
        Frame(type=0, flags=0, stream_id=0, payload=b""),
        Frame(type=255, flags=FLAG_MORE, stream_id=MAX_STREAM_ID, payload=b"\x00" * 1000),
        Frame(type=7, flags=0, stream_id=3, payload=bytes(range(256))),
    ],
)
def test_round_trip(frame):
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(frame))
    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None
    assert decoder.buffered_size == 0


def test_byte_by_byte_feeding():
    frames = [Frame(type=i, flags=0, stream_id=i * 2 + 1, payload=b"p" * i) for i in range(20)]
    data = b"".join(map(encode_frame, frames))
    decoder = FrameDecoder()
    got = []
    for i in range(len(data)):
        decoder.receive_data(data[i : i + 1])
        got += drain(decoder)
        assert decoder.buffered_size <= HEADER_SIZE + 19
    assert got == frames


def test_many_frames_in_one_receive():
    frames = [Frame(type=1, flags=0, stream_id=n, payload=n.to_bytes(4, "big")) for n in range(4000)]
    data = b"".join(map(encode_frame, frames))
    decoder = FrameDecoder(max_receive_size=len(data))
    decoder.receive_data(data)
    assert drain(decoder) == frames
    assert decoder.buffered_size == 0


# --- Bounds -------------------------------------------------------------------


def test_4_gib_header_rejected_after_10_bytes():
    decoder = FrameDecoder(max_frame_size=MAX_FRAME_SIZE)
    header = struct.pack(">BBII", 1, 0, 1, 2**32 - 1)
    for byte in header[:-1]:
        decoder.receive_data(bytes([byte]))
        assert decoder.next_frame() is None
    decoder.receive_data(header[-1:])
    assert decoder.buffered_size == HEADER_SIZE
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert decoder.buffered_size == 0
    # The decoder stays failed, and does not hoard what else arrives.
    decoder.receive_data(b"\x00" * 1000)
    assert decoder.buffered_size == 0
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


def test_length_checked_without_waiting_for_payload():
    decoder = FrameDecoder(max_frame_size=100)
    decoder.receive_data(struct.pack(">BBII", 1, 0, 1, 101) + b"x" * 50)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_frame_at_exact_cap_accepted():
    decoder = FrameDecoder(max_frame_size=100)
    frame = Frame(type=1, flags=0, stream_id=1, payload=b"x" * 100)
    decoder.receive_data(encode_frame(frame))
    assert decoder.next_frame() == frame


@pytest.mark.parametrize("bit", [0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80])
def test_reserved_flags_rejected(bit):
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">BBII", 1, bit | FLAG_MORE, 1, 0))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.PROTOCOL_ERROR
    with pytest.raises(LocalProtocolError):
        encode_frame(Frame(type=1, flags=bit, stream_id=1, payload=b""))


def test_feeding_without_draining_is_local_error():
    decoder = FrameDecoder(max_frame_size=MIN_FRAME_SIZE, max_receive_size=1024)
    decoder.receive_data(b"\x00" * decoder.buffer_limit)
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"\x00")
    assert decoder.buffered_size == decoder.buffer_limit


def test_max_frame_size_raised_after_hello():
    hello = Frame(type=1, flags=0, stream_id=0, payload=b"hello")
    big = Frame(type=2, flags=0, stream_id=1, payload=b"b" * 100 * 1024)
    decoder = FrameDecoder()
    assert decoder.max_frame_size == PRE_HELLO_MAX_FRAME_SIZE
    decoder.receive_data(encode_frame(hello) + encode_frame(big))
    assert decoder.next_frame() == hello
    decoder.max_frame_size = 1024 * 1024
    assert decoder.next_frame() == big


def test_big_frame_before_hello_rejected():
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(Frame(type=2, flags=0, stream_id=1, payload=b"b" * 65537)))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_eof():
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(Frame(type=1, flags=0, stream_id=1, payload=b"ab")))
    decoder.receive_data(b"")
    assert decoder.eof_received
    assert decoder.next_frame() is not None
    assert decoder.next_frame() is None  # clean close at a frame boundary
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"more")

    cut = FrameDecoder()
    cut.receive_data(encode_frame(Frame(type=1, flags=0, stream_id=1, payload=b"abc"))[:-1])
    cut.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        cut.next_frame()


def test_encode_rejects_bad_fields():
    for frame in [
        Frame(type=256, flags=0, stream_id=1, payload=b""),
        Frame(type=1, flags=0, stream_id=2**32, payload=b""),
        Frame(type=1, flags=0, stream_id=-1, payload=b""),
    ]:
        with pytest.raises(LocalProtocolError):
            encode_frame(frame)
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(Frame(type=1, flags=0, stream_id=1, payload=b"xx"), max_frame_size=1)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


# --- Fragmentation and reassembly -----------------------------------------------


def test_10_mb_fragmented_at_64_kib_reassembles_exactly():
    payload = bytes(range(256)) * (10_000_000 // 256) + b"tail"
    frames_bytes = list(fragment(9, 5, payload, 64 * 1024))
    assert len(frames_bytes) == -(-len(payload) // (64 * 1024))
    decoder = FrameDecoder(max_frame_size=64 * 1024)
    frames = feed(decoder, b"".join(frames_bytes), 64 * 1024)
    assert all(f.more for f in frames[:-1]) and not frames[-1].more
    assert all(len(f.payload) == 64 * 1024 for f in frames[:-1])
    assert assemble(frames) == [Message(type=9, stream_id=5, payload=payload)]


@pytest.mark.parametrize("size,count", [(0, 1), (1, 1), (100, 1), (101, 2), (200, 2), (201, 3)])
def test_fragment_counts(size, count):
    frames = list(fragment(1, 1, b"x" * size, 100))
    assert len(frames) == count
    assert [f[1] for f in frames] == [FLAG_MORE] * (count - 1) + [0]


def test_over_limit_message_rejected_without_buffering_it():
    assembler = MessageAssembler(max_message_size=1000)
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(fragment(3, 1, b"x" * 5000, 400)))
    frames = drain(decoder)
    assert assembler.add_frame(frames[0]) is None
    assert assembler.add_frame(frames[1]) is None
    with pytest.raises(RemoteProtocolError) as info:
        assembler.add_frame(frames[2])
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    assert assembler.buffered_size == 800
    with pytest.raises(RemoteProtocolError):  # an unfragmented one, too
        MessageAssembler(max_message_size=10).add_frame(Frame(type=1, flags=0, stream_id=1, payload=b"x" * 11))


def test_total_reassembly_bound_and_stream_count():
    assembler = MessageAssembler(max_message_size=100, max_buffered_size=150, max_streams=3)
    assembler.add_frame(Frame(type=1, flags=FLAG_MORE, stream_id=1, payload=b"x" * 100))
    with pytest.raises(RemoteProtocolError) as info:
        assembler.add_frame(Frame(type=1, flags=FLAG_MORE, stream_id=3, payload=b"x" * 51))
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    assembler = MessageAssembler(max_streams=2)
    for sid in (1, 3):
        assembler.add_frame(Frame(type=1, flags=FLAG_MORE, stream_id=sid, payload=b"x"))
    with pytest.raises(RemoteProtocolError) as info:
        assembler.add_frame(Frame(type=1, flags=FLAG_MORE, stream_id=5, payload=b"x"))
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    assert assembler.streams_in_progress == 2
    assert assembler.discard(1) == 1 and assembler.buffered_size == 1


def test_interleaved_streams_reassemble_separately():
    a = list(fragment(4, 1, b"A" * 250, 100))
    b = list(fragment(4, 3, b"B" * 150, 100))
    ping = encode_frame(Frame(type=6, flags=0, stream_id=0, payload=b"p"))
    decoder = FrameDecoder()
    decoder.receive_data(b"".join([a[0], b[0], ping, a[1], b[1], a[2]]))
    messages = assemble(drain(decoder))
    assert messages == [
        Message(type=6, stream_id=0, payload=b"p"),
        Message(type=4, stream_id=3, payload=b"B" * 150),
        Message(type=4, stream_id=1, payload=b"A" * 250),
    ]


def test_other_type_mid_message_rejected():
    assembler = MessageAssembler()
    assembler.add_frame(Frame(type=4, flags=FLAG_MORE, stream_id=1, payload=b"x"))
    with pytest.raises(RemoteProtocolError) as info:
        assembler.add_frame(Frame(type=5, flags=0, stream_id=1, payload=b"y"))
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


def test_empty_non_final_fragment_rejected():
    with pytest.raises(RemoteProtocolError):
        MessageAssembler().add_frame(Frame(type=4, flags=FLAG_MORE, stream_id=1, payload=b""))


# --- Stream ids and negotiation ---------------------------------------------------


def test_stream_ids():
    assert first_stream_id(dialer=True) == 1 and opened_by_dialer(1)
    assert first_stream_id(dialer=False) == 2 and not opened_by_dialer(2)
    assert next_stream_id(1) == 3 and next_stream_id(2) == 4
    assert next_stream_id(MAX_STREAM_ID - 2) == MAX_STREAM_ID
    for last in (MAX_STREAM_ID, MAX_STREAM_ID - 1):
        with pytest.raises(LocalProtocolError) as info:
            next_stream_id(last)
        assert info.value.code == ErrorCode.LIMIT_EXCEEDED


def test_validate_peer_max_frame_size():
    assert validate_peer_max_frame_size(MIN_FRAME_SIZE) == MIN_FRAME_SIZE
    assert validate_peer_max_frame_size(MAX_FRAME_SIZE) == MAX_FRAME_SIZE
    for bad in (0, MIN_FRAME_SIZE - 1, MAX_FRAME_SIZE + 1):
        with pytest.raises(RemoteProtocolError):
            validate_peer_max_frame_size(bad)


# --- Properties -----------------------------------------------------------------------

# Mostly-valid frames (random flags sometimes) mixed with raw junk, so that
# fuzzing reaches deep into the decoder and the assembler.
wire_pieces = st.one_of(
    st.builds(
        lambda t, f, s, p: struct.pack(">BBII", t, f, s, len(p)) + p,
        st.integers(0, 3),
        st.sampled_from([0, 0, FLAG_MORE, FLAG_MORE, 0x02, 0xFF]),
        st.integers(0, 4),
        st.binary(max_size=80),
    ),
    st.binary(max_size=40),
)


@settings(max_examples=300)
@given(
    pieces=st.lists(wire_pieces, max_size=30),
    chunk=st.integers(1, 64),
    max_frame_size=st.integers(1, 100),
    data=st.data(),
)
def test_fuzz_only_frames_or_protocol_errors_and_bounded(pieces, chunk, max_frame_size, data):
    decoder = FrameDecoder(max_frame_size=max_frame_size, max_receive_size=chunk)
    assembler = MessageAssembler(max_message_size=150, max_buffered_size=200, max_streams=3)
    blob = b"".join(pieces)
    try:
        for i in range(0, len(blob), chunk):
            decoder.receive_data(blob[i : i + chunk])
            assert decoder.buffered_size <= decoder.buffer_limit
            assert decoder.buffered_size <= HEADER_SIZE + max_frame_size + chunk
            while (frame := decoder.next_frame()) is not None:
                assert isinstance(frame, Frame) and len(frame.payload) <= max_frame_size
                message = assembler.add_frame(frame)
                assert message is None or len(message.payload) <= 150
                assert assembler.buffered_size <= 200
            if data.draw(st.booleans()):
                decoder.max_frame_size = data.draw(st.integers(1, 100))
                max_frame_size = max(max_frame_size, decoder.max_frame_size)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


messages_strategy = st.lists(
    st.tuples(st.integers(0, 255), st.integers(0, 5), st.binary(max_size=300)), max_size=12
)


@settings(max_examples=200)
@given(messages=messages_strategy, frame_size=st.integers(1, 64), chunk=st.integers(1, 200), data=st.data())
def test_round_trip_with_random_interleaving(messages, frame_size, chunk, data):
    # Per stream, messages go in order; across streams, frames interleave.
    queues: dict[int, list[bytes]] = {}
    for msg_type, stream_id, payload in messages:
        queues.setdefault(stream_id, []).extend(fragment(msg_type, stream_id, payload, frame_size))
    wire = []
    while queues:
        stream_id = data.draw(st.sampled_from(sorted(queues)))
        wire.append(queues[stream_id].pop(0))
        if not queues[stream_id]:
            del queues[stream_id]
    decoder = FrameDecoder(max_frame_size=frame_size, max_receive_size=chunk)
    got = assemble(feed(decoder, b"".join(wire), chunk))
    for stream_id in range(6):
        expected = [Message(type=t, stream_id=s, payload=p) for t, s, p in messages if s == stream_id]
        assert [m for m in got if m.stream_id == stream_id] == expected


def test_protocol_error_is_abstract():
    with pytest.raises(TypeError):
        ProtocolError(ErrorCode.INTERNAL, "x")
    exc = RemoteProtocolError(ErrorCode.DECODE_ERROR, "bad")
    assert exc.code is ErrorCode.DECODE_ERROR and "DECODE_ERROR" in str(exc)


def test_unknown_wire_error_code_maps_to_internal():
    assert error_code_from_wire(5) is ErrorCode.FLOW_CONTROL
    assert error_code_from_wire(60000) is ErrorCode.INTERNAL
