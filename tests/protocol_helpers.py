"""Shared pieces for the protocol tests (messages, connection): hellos,
a byte pump between two `Connection`s, frame forging and counting, and
hypothesis strategies for every message class.
"""

from __future__ import annotations

import hashlib
import random
import struct
from datetime import datetime, timezone

import msgpack
from hypothesis import strategies as st

from sync import codec, frames
from sync.connection import NEED_DATA, Connection, ConnectionClosed, Received
from sync.messages import MAX_AGE_SECONDS
from sync.messages import (
    ID_BYTES,
    MAGIC,
    PROTOCOL_VERSIONS,
    Ack,
    Credit,
    Error,
    ExpandRequest,
    ExpandResponse,
    Goodbye,
    Hello,
    MessageType,
    Objects,
    Ping,
    Pong,
    PushContext,
    QueryRequest,
    QueryResponse,
    Reconcile,
    Root,
    StatusRequest,
    StatusResponse,
    RefAppend,
    RefChanged,
    RefSet,
    RefsRequest,
    RefsResponse,
    RefsWatch,
    PeerForget,
    PeerForgotten,
    Resolve,
    Resolved,
    StreamChunk,
    StreamEnd,
    StreamRequest,
    Want,
    encode_payload,
)
from sync.model import Kind, MemoryAtom, MemoryMolecule, TypeSignature

MiB = 1024 * 1024
NODE_A = b"A" * ID_BYTES
NODE_B = b"B" * ID_BYTES
EMPTY_ROOT = b"\x00" * ID_BYTES


def hello(node_id: bytes = NODE_A, **fields) -> Hello:
    """A valid HELLO; keyword arguments override single fields."""
    values = dict(
        magic=MAGIC,
        versions=PROTOCOL_VERSIONS,
        node_id=node_id,
        max_frame_size=frames.DEFAULT_MAX_FRAME_SIZE,
        stream_window=16 * MiB,
        connection_window=32 * MiB,
        root=EMPTY_ROOT,
        count=0,
    )
    values.update(fields)
    return Hello(**values)


def pair(a_hello: Hello | None = None, b_hello: Hello | None = None) -> tuple[Connection, Connection]:
    """A dialer A and a listener B, not started."""
    a = Connection(hello=a_hello or hello(NODE_A), dialer=True)
    b = Connection(hello=b_hello or hello(NODE_B), dialer=False)
    return a, b


def drain(conn: Connection) -> list:
    """Every event available now, up to NEED_DATA (or a ConnectionClosed)."""
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def feed(conn: Connection, data: bytes, rng: random.Random | None = None, after_piece=None) -> list:
    """Deliver `data` to `conn` in pieces (random sizes with `rng`, else as
    large as the connection reads), draining events after each piece, as a
    reader task does. `after_piece(events)` runs after every piece."""
    events = []
    limit = conn.max_receive_size
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        size = limit if rng is None else rng.randint(1, limit)
        conn.receive_data(bytes(view[pos : pos + size]))
        pos += size
        got = drain(conn)
        events += got
        if after_piece is not None:
            after_piece(got)
    return events


def handshake(a: Connection, b: Connection, rng: random.Random | None = None) -> tuple[Received, Received]:
    """Exchange HELLOs; returns (what A received, what B received)."""
    a_bytes, b_bytes = a.start(), b.start()
    (got_b,) = feed(b, a_bytes, rng)
    (got_a,) = feed(a, b_bytes, rng)
    return got_a, got_b


def open_pair(a_hello: Hello | None = None, b_hello: Hello | None = None) -> tuple[Connection, Connection]:
    a, b = pair(a_hello, b_hello)
    handshake(a, b)
    return a, b


def objects(*blobs: bytes, final: bool = False) -> Objects:
    """An OBJECTS message carrying `blobs` under their SHA-256 ids."""
    return Objects(ids=tuple(hashlib.sha256(b).digest() for b in blobs), objects=blobs, final=final)


def messages_of(events: list) -> list:
    return [e.message for e in events if isinstance(e, Received)]


def forge(message, stream_id: int = 0, *, max_frame_size: int = frames.MAX_FRAME_SIZE) -> bytes:
    """Frames for `message` built directly, bypassing the sender's checks."""
    return b"".join(frames.fragment(message.TYPE, stream_id, encode_payload(message), max_frame_size))


def raw_frame(msg_type: int, stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BBII", msg_type, flags, stream_id, len(payload)) + payload


def frame_headers(data: bytes) -> list[tuple[int, int, int, int]]:
    """(type, flags, stream id, length) of each frame in well-formed bytes."""
    headers = []
    pos = 0
    while pos < len(data):
        header = struct.unpack_from(">BBII", data, pos)
        headers.append(header)
        pos += frames.HEADER_SIZE + header[3]
    assert pos == len(data), "bytes end mid-frame"
    return headers


def raw_fields(message) -> dict:
    """A message's wire map (before MessagePack), for mutation."""
    return codec.converter.unstructure(message)


def pack(raw) -> bytes:
    return msgpack.packb(raw, use_bin_type=True)


# ---------------------------------------------------------------- strategies

u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
any_int = st.integers(-(2**63), 2**64 - 1)  # what MessagePack can carry
positive = st.integers(1, 2**64 - 1)
ids = st.binary(min_size=ID_BYTES, max_size=ID_BYTES)
texts = st.text(max_size=20)  # hypothesis' default alphabet has no surrogates
finite = st.floats(allow_nan=False, allow_infinity=False)
non_negative_finite = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)

type_names = st.text(min_size=1, max_size=8)
type_sigs = st.recursive(
    st.builds(TypeSignature, type_names, st.sampled_from(Kind), st.just(()), st.lists(texts, max_size=3)),
    lambda inner: st.builds(
        TypeSignature, type_names, st.sampled_from(Kind), st.lists(inner, min_size=1, max_size=3),
        st.lists(texts, max_size=3),
    ),
    max_leaves=6,
)
timestamps = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(timezone.utc)
)
atoms = st.builds(MemoryAtom, texts, type_sigs, timestamps, texts, non_negative_finite)

# JSON-like values as they come back from the wire: arrays are lists.
json_values = st.recursive(
    st.none() | st.booleans() | any_int | finite | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)
json_maps = st.dictionaries(texts, json_values, max_size=5)
relations = st.dictionaries(texts, st.lists(st.tuples(u64, u64), max_size=4), max_size=3)
molecules = st.builds(MemoryMolecule, st.lists(atoms, max_size=3), relations, type_sigs, json_maps)

# Reconcile bodies are opaque MessagePack; arrays come back as tuples.
msgpack_values = st.recursive(
    st.none() | st.booleans() | any_int | finite | texts | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4).map(tuple) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)


def _tuples(elements, max_size: int):
    return st.lists(elements, max_size=max_size).map(tuple)


def _optional(strategy):
    return st.none() | strategy


MESSAGE_STRATEGIES = {
    MessageType.HELLO: st.builds(
        Hello, magic=st.just(MAGIC) | st.binary(max_size=8), versions=_tuples(u64, 16), node_id=ids,
        max_frame_size=any_int, stream_window=positive, connection_window=positive, root=ids, count=u64,
    ),
    MessageType.ROOT: st.builds(Root, root=ids, count=u64),
    MessageType.RECONCILE: st.builds(Reconcile, body=_tuples(msgpack_values, 6)),
    MessageType.WANT: st.builds(Want, ids=_tuples(ids, 20)),
    MessageType.OBJECTS: st.builds(
        lambda blobs, final: objects(*blobs, final=final), st.lists(st.binary(max_size=300), max_size=8), st.booleans()
    ),
    MessageType.CREDIT: st.builds(Credit, increment=positive),
    MessageType.PING: st.builds(Ping, nonce=u64),
    MessageType.PONG: st.builds(Pong, nonce=u64),
    MessageType.GOODBYE: st.builds(Goodbye, code=u64, reason=st.text(max_size=1024)),
    MessageType.ACK: st.builds(Ack, ids=_tuples(ids, 20)),
    MessageType.PUSH_CONTEXT: st.builds(PushContext, context=st.binary(max_size=500)),
    MessageType.EXPAND_REQUEST: st.builds(
        ExpandRequest, id=ids, min_relevance=non_negative_finite, max_tokens=_optional(u64)
    ),
    MessageType.EXPAND_RESPONSE: st.builds(
        ExpandResponse, id=ids, atoms=_tuples(atoms, 4), molecules=_tuples(molecules, 3),
        expansion_path=_tuples(ids, 5), total_tokens=u64,
        type_summary=st.dictionaries(texts, any_int, max_size=4), atom_root=ids,
    ),
    MessageType.STREAM_REQUEST: st.builds(
        StreamRequest, id=ids, relevance_threshold=non_negative_finite, chunk_size=positive,
        max_tokens_per_chunk=positive,
    ),
    MessageType.STREAM_CHUNK: st.builds(
        StreamChunk, chunk_id=u64, atoms=_tuples(atoms, 4), is_final=st.booleans(),
        cumulative_tokens=u64, progress=finite,
    ),
    MessageType.STREAM_END: st.builds(StreamEnd, status=st.text(max_size=1024)),
    MessageType.QUERY_REQUEST: st.builds(
        QueryRequest, id=ids, type_filter=_optional(type_sigs), min_relevance=non_negative_finite,
        max_age_seconds=_optional(st.floats(min_value=0.0, max_value=MAX_AGE_SECONDS)), limit=_optional(u64),
        text=_optional(st.text(max_size=200)),
    ),
    MessageType.QUERY_RESPONSE: st.builds(QueryResponse, atoms=_tuples(atoms, 5)),
    MessageType.STATUS_REQUEST: st.builds(StatusRequest),
    MessageType.STATUS_RESPONSE: st.builds(StatusResponse, status=json_maps),
    MessageType.ERROR: st.builds(Error, code=u64, message=st.text(max_size=1024)),
    MessageType.REF_SET: st.builds(RefSet, name=st.text(max_size=200), target=_optional(ids)),
    MessageType.REFS_REQUEST: st.builds(RefsRequest, name=_optional(st.text(max_size=200)), log=st.booleans()),
    MessageType.REFS_RESPONSE: st.builds(RefsResponse, refs=_tuples(json_maps, 4)),
    MessageType.REFS_WATCH: st.builds(RefsWatch, names=_optional(_tuples(st.text(max_size=200), 4))),
    MessageType.REF_APPEND: st.builds(
        RefAppend, name=st.text(max_size=200), delta_atoms=_tuples(atoms, 4), removed_hashes=_tuples(ids, 4),
        metadata=json_maps,
    ),
    MessageType.REF_CHANGED: st.builds(
        RefChanged, name=st.text(max_size=200), old=_optional(ids), new=_optional(ids), conflict=st.booleans(),
        candidates=_tuples(ids, 4),
    ),
    MessageType.RESOLVE: st.builds(Resolve, text=st.text(max_size=200)),
    MessageType.RESOLVED: st.builds(Resolved, id=ids),
    MessageType.PEER_FORGET: st.builds(PeerForget, peer=st.text(max_size=300)),
    MessageType.PEER_FORGOTTEN: st.builds(PeerForgotten, peers=_tuples(json_maps, 4)),
}

any_message = st.one_of(*MESSAGE_STRATEGIES.values())
