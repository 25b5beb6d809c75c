"""Tests for sync.messages: round trips of every message, strict and bounded
decoding, and fuzzing that only RemoteProtocolError ever escapes a decode."""

from __future__ import annotations

import math
import random
import types
import typing
from datetime import datetime, timezone

import attrs
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol_helpers import MESSAGE_STRATEGIES, hello, objects, pack, raw_fields
from sync.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from sync.messages import (
    ID_BYTES,
    MAX_IDS_PER_MESSAGE,
    MAX_OBJECTS_PER_MESSAGE,
    MAX_PEER_TEXT,
    MAX_PEERS_PER_MESSAGE,
    MAX_QUERY_TEXT,
    MAX_REASON_LENGTH,
    MAX_REFS_PER_MESSAGE,
    MAX_WATCH_NAMES,
    MAX_VERSIONS,
    MESSAGE_CLASSES,
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
    Root,
    StatusRequest,
    StatusResponse,
    StreamChunk,
    StreamEnd,
    StreamRequest,
    Want,
    decode_payload,
    encode_payload,
)
from sync.model import T_STRING, MemoryAtom, MemoryMolecule, T_LIST, TypeSignature
from sync.query import MAX_TEXT_LENGTH

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ID1, ID2 = b"\x01" * ID_BYTES, b"\x02" * ID_BYTES
ATOM = MemoryAtom("the sky is blue", T_STRING, datetime(2024, 5, 1, 12, tzinfo=timezone.utc), "src", 0.75)
MOLECULE = MemoryMolecule((ATOM,), {"same": [(0, 0)]}, T_LIST(T_STRING), {"k": [1, "x"], "f": 0.5})

# One valid, non-trivial example per message type: the base for mutations.
EXAMPLES = {
    MessageType.HELLO: hello(),
    MessageType.ROOT: Root(root=ID1, count=3),
    MessageType.RECONCILE: Reconcile(body=(1, (ID1, 2), "step")),
    MessageType.WANT: Want(ids=(ID1, ID2)),
    MessageType.OBJECTS: objects(b"ctx-1", b"ctx-2", final=True),
    MessageType.CREDIT: Credit(increment=65536),
    MessageType.PING: Ping(nonce=7),
    MessageType.PONG: Pong(nonce=7),
    MessageType.GOODBYE: Goodbye(code=0, reason="bye"),
    MessageType.ACK: Ack(ids=(ID1,)),
    MessageType.PUSH_CONTEXT: PushContext(context=b"\x96\x01\xc0\x90\x90\x90\x80"),
    MessageType.EXPAND_REQUEST: ExpandRequest(id=ID1, min_relevance=0.5, max_tokens=100),
    MessageType.EXPAND_RESPONSE: ExpandResponse(
        id=ID1, atoms=(ATOM,), molecules=(MOLECULE,), expansion_path=(ID1, ID2), total_tokens=4,
        type_summary={"String": 1}, atom_root=ID2,
    ),
    MessageType.STREAM_REQUEST: StreamRequest(id=ID1, relevance_threshold=0.1, chunk_size=5, max_tokens_per_chunk=50),
    MessageType.STREAM_CHUNK: StreamChunk(chunk_id=0, atoms=(ATOM,), is_final=False, cumulative_tokens=4, progress=0.5),
    MessageType.STREAM_END: StreamEnd(status="complete"),
    MessageType.QUERY_REQUEST: QueryRequest(
        id=ID1, type_filter=T_LIST(T_STRING), min_relevance=0.2, max_age_seconds=60.0, limit=10,
        text='python "daemons" OR *',
    ),
    MessageType.QUERY_RESPONSE: QueryResponse(atoms=(ATOM, ATOM)),
    MessageType.STATUS_REQUEST: StatusRequest(),
    MessageType.STATUS_RESPONSE: StatusResponse(status={"schema": 2, "peers": [{"id": "ab", "ok": True}]}),
    MessageType.ERROR: Error(code=int(ErrorCode.NOT_FOUND), message="no such context"),
    MessageType.REF_SET: RefSet(name="projects/x", target=ID1),
    MessageType.REFS_REQUEST: RefsRequest(name="main", log=True),
    MessageType.REFS_RESPONSE: RefsResponse(
        refs=({"name": "main", "target": "01" * 32, "conflict": False, "candidates": ["01" * 32]},)
    ),
    MessageType.REFS_WATCH: RefsWatch(names=("main", "projects/x")),
    MessageType.REF_CHANGED: RefChanged(name="main", old=ID1, new=ID2, conflict=True, candidates=(ID1, ID2)),
    MessageType.REF_APPEND: RefAppend(name="main", delta_atoms=(ATOM,), removed_hashes=(ID2,), metadata={"message": "m"}),
    MessageType.RESOLVE: Resolve(text="3f0c"),
    MessageType.RESOLVED: Resolved(id=ID1),
    MessageType.PEER_FORGET: PeerForget(peer="10.0.0.3:7787"),
    MessageType.PEER_FORGOTTEN: PeerForgotten(peers=({"node_id": "ef" * 32, "address": "10.0.0.3:7787"},
                                                     {"node_id": None, "address": "10.0.0.4:7787"})),
}


def decode_error(msg_type: int, payload: bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode_payload(msg_type, payload)
    return info.value


def assert_decode_error(msg_type: int, raw) -> None:
    payload = raw if isinstance(raw, bytes) else pack(raw)
    assert decode_error(msg_type, payload).code == ErrorCode.DECODE_ERROR


def test_every_message_class_has_a_strategy_and_an_example():
    assert set(MESSAGE_STRATEGIES) == set(MESSAGE_CLASSES) == set(EXAMPLES)
    for msg_type, cls in MESSAGE_CLASSES.items():
        assert cls.TYPE is msg_type
        assert type(EXAMPLES[msg_type]) is cls


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("msg_type", list(MessageType), ids=lambda t: t.name)
def test_example_round_trip(msg_type):
    message = EXAMPLES[msg_type]
    payload = encode_payload(message)
    assert isinstance(payload, bytes)
    assert decode_payload(msg_type, payload) == message


@pytest.mark.parametrize("msg_type", list(MessageType), ids=lambda t: t.name)
@PROPERTY
@given(data=st.data())
def test_round_trip(msg_type, data):
    message = data.draw(MESSAGE_STRATEGIES[msg_type])
    payload = encode_payload(message)
    decoded = decode_payload(msg_type, payload)
    assert type(decoded) is type(message)
    assert decoded == message
    assert decode_payload(msg_type, encode_payload(decoded)) == message


def test_payload_is_a_map_of_field_names():
    raw = msgpack.unpackb(encode_payload(Root(root=ID1, count=3)), raw=False)
    assert raw == {"root": ID1, "count": 3}


def test_float_fields_accept_integers_from_the_wire():
    # Other encoders write 1.0 as the integer 1; the value is the same number.
    decoded = decode_payload(MessageType.EXPAND_REQUEST, pack({"id": ID1, "min_relevance": 1}))
    assert decoded == ExpandRequest(id=ID1, min_relevance=1.0)
    assert type(decoded.min_relevance) is float


def test_optional_fields_take_their_defaults_when_absent():
    assert decode_payload(MessageType.QUERY_REQUEST, pack({"id": ID1})) == QueryRequest(id=ID1)


def test_query_request_without_text_is_sent_as_before_text_existed():
    # A daemon that predates `text` refuses unknown keys: a query without
    # text must still reach it, so the key is left out, not sent as nil.
    assert "text" not in raw_fields(QueryRequest(id=ID1))
    assert "text" not in msgpack.unpackb(encode_payload(QueryRequest(id=ID1, limit=3)), raw=False)
    with_text = QueryRequest(id=ID1, text="sync daemons")
    assert decode_payload(MessageType.QUERY_REQUEST, encode_payload(with_text)) == with_text


def test_query_request_text_is_bounded():
    QueryRequest(id=ID1, text="x" * MAX_QUERY_TEXT)
    with pytest.raises(ValueError):
        QueryRequest(id=ID1, text="x" * (MAX_QUERY_TEXT + 1))
    assert_decode_error(MessageType.QUERY_REQUEST, {"id": ID1, "text": "x" * (MAX_QUERY_TEXT + 1)})
    assert_decode_error(MessageType.QUERY_REQUEST, {"id": ID1, "text": b"bytes"})
    assert MAX_QUERY_TEXT == MAX_TEXT_LENGTH
    assert decode_payload(MessageType.OBJECTS, pack({"ids": [], "objects": []})) == objects()


# ---------------------------------------------------------------- strictness


def _field_types(cls) -> list[tuple[str, object, bool]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], f.default is attrs.NOTHING) for f in attrs.fields(cls)]


def _split_optional(tp) -> tuple[object, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        assert len(args) == 1
        return args[0], True
    return tp, False


def _wrong_values(tp) -> list:
    """Values of the wrong shape for a field of type `tp`."""
    base, optional = _split_optional(tp)
    origin = typing.get_origin(base)
    if base is int:
        wrong = [True, False, 1.0, "1", b"\x01", [1]]
    elif base is float:
        wrong = [True, "0.5", b"\x00", [0.5], {"x": 1.0}]
    elif base is bytes:
        wrong = [1, "x" * ID_BYTES, [1], True]
    elif base is str:
        wrong = [b"text", 1, ["x"], True]
    elif base is bool:
        wrong = [1, 0, "true", b"\x01"]
    elif base is TypeSignature:
        wrong = [1, "String", {"name": "String"}, ["String", "STAR"], ["String", "NOPE", [], []]]
    elif origin is tuple:
        (element, _ellipsis) = typing.get_args(base)
        wrong = [1, True, 1.5]
        if element is not typing.Any:
            wrong += [[bad] for bad in _wrong_values(element)[:3]]
    elif origin is dict:
        wrong = [1, [["a", 1]], "map", b"map"]
        _key, value = typing.get_args(base)
        if value is int:
            wrong += [{"a": True}, {"a": "1"}, {"a": 1.5}, {b"a": 1}]
        else:
            wrong += [{"a": b"bytes"}, {b"a": 1}]
    elif base is MemoryAtom:
        wrong = [1, "atom", ["x", ["String", "STAR", [], []], 0, "src"], ["x", ["String", "STAR", [], []], 0, "src", 1]]
    elif base is MemoryMolecule:
        wrong = [1, "molecule", [[], {}, ["String", "STAR", [], []]], [[], [], ["String", "STAR", [], []], {}]]
    else:  # pragma: no cover - a new field type: extend this table
        raise AssertionError(f"no wrong values for {tp}")
    if not optional:
        wrong.append(None)
    return wrong


def _wrong_type_cases():
    for msg_type, example in EXAMPLES.items():
        for name, tp, _required in _field_types(type(example)):
            for i, value in enumerate(_wrong_values(tp)):
                yield pytest.param(msg_type, name, value, id=f"{msg_type.name}.{name}-{i}")


@pytest.mark.parametrize(("msg_type", "name", "value"), list(_wrong_type_cases()))
def test_wrong_primitive_types_are_decode_errors(msg_type, name, value):
    raw = raw_fields(EXAMPLES[msg_type])
    raw[name] = value
    assert_decode_error(msg_type, raw)


_CTX1, _CTX2 = EXAMPLES[MessageType.OBJECTS].objects


@pytest.mark.parametrize(
    ("msg_type", "fields"),
    [
        pytest.param(MessageType.WANT, {"ids": {ID1: 0, ID2: 0}}, id="WANT.ids-map-of-ids"),
        pytest.param(MessageType.ACK, {"ids": {ID1: None}}, id="ACK.ids-map-of-ids"),
        pytest.param(MessageType.OBJECTS, {"objects": {_CTX1: 0, _CTX2: 0}}, id="OBJECTS.objects-map"),
        pytest.param(MessageType.EXPAND_RESPONSE, {"expansion_path": {ID1: 1}}, id="EXPAND_RESPONSE.path-map"),
        pytest.param(MessageType.HELLO, {"versions": {1: 1}}, id="HELLO.versions-int-keyed-map"),
        pytest.param(MessageType.HELLO, {"versions": b"\x01"}, id="HELLO.versions-bytes"),
        pytest.param(MessageType.HELLO, {"versions": ""}, id="HELLO.versions-empty-str"),
        pytest.param(MessageType.OBJECTS, {"ids": b"", "objects": b""}, id="OBJECTS.empty-bytes"),
    ],
)
def test_an_array_field_accepts_only_an_array(msg_type, fields):
    # A map, a string or a bin is not an array, even though Python can
    # iterate over it (a map's keys, a bin's byte values).
    raw = raw_fields(EXAMPLES[msg_type])
    raw.update(fields)
    assert_decode_error(msg_type, raw)


@pytest.mark.parametrize(("ids", "blobs"), [([ID1], [b"a", b"b"]), ([ID1, ID2], [b"a"]), ([ID1], [])])
def test_objects_needs_one_id_per_object_or_none(ids, blobs):
    assert_decode_error(MessageType.OBJECTS, {"ids": ids, "objects": blobs, "final": False})


def test_objects_without_ids_leave_the_key_out_and_decode_as_such():
    # Version 2: the receiver derives each id from the bytes.
    message = Objects(objects=(b"a", b"b"), final=True)
    payload = encode_payload(message)
    assert b"ids" not in payload
    assert decode_payload(MessageType.OBJECTS, payload) == message
    assert decode_payload(MessageType.OBJECTS, msgpack.packb({"ids": [], "objects": [b"a"]})).ids == ()
    with_ids = encode_payload(Objects(ids=(ID1,), objects=(b"a",)))
    assert decode_payload(MessageType.OBJECTS, with_ids).ids == (ID1,)


@pytest.mark.parametrize("msg_type", list(MessageType), ids=lambda t: t.name)
def test_unknown_keys_are_decode_errors(msg_type):
    raw = raw_fields(EXAMPLES[msg_type])
    raw["unexpected"] = 1
    assert_decode_error(msg_type, raw)


def _required_field_cases():
    for msg_type, example in EXAMPLES.items():
        for name, _tp, required in _field_types(type(example)):
            if required:
                yield pytest.param(msg_type, name, id=f"{msg_type.name}.{name}")


@pytest.mark.parametrize(("msg_type", "name"), list(_required_field_cases()))
def test_missing_required_keys_are_decode_errors(msg_type, name):
    raw = raw_fields(EXAMPLES[msg_type])
    del raw[name]
    assert_decode_error(msg_type, raw)


ID_FIELDS = [
    (MessageType.HELLO, "node_id", False), (MessageType.HELLO, "root", False),
    (MessageType.ROOT, "root", False), (MessageType.WANT, "ids", True), (MessageType.ACK, "ids", True),
    (MessageType.OBJECTS, "ids", True),
    (MessageType.EXPAND_REQUEST, "id", False), (MessageType.EXPAND_RESPONSE, "id", False),
    (MessageType.EXPAND_RESPONSE, "expansion_path", True), (MessageType.EXPAND_RESPONSE, "atom_root", False),
    (MessageType.STREAM_REQUEST, "id", False), (MessageType.QUERY_REQUEST, "id", False),
    (MessageType.REF_SET, "target", False),
    (MessageType.REF_CHANGED, "old", False), (MessageType.REF_CHANGED, "new", False),
    (MessageType.REF_CHANGED, "candidates", True), (MessageType.RESOLVED, "id", False),
]


@pytest.mark.parametrize(("msg_type", "name", "many"), ID_FIELDS, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("length", [0, 1, ID_BYTES - 1, ID_BYTES + 1, 2 * ID_BYTES])
def test_ids_of_the_wrong_length_are_decode_errors(msg_type, name, many, length):
    raw = raw_fields(EXAMPLES[msg_type])
    bad = b"\x07" * length
    raw[name] = [ID1, bad] if many else bad
    assert_decode_error(msg_type, raw)


@pytest.mark.parametrize(
    ("msg_type", "names", "item", "limit"),
    [
        (MessageType.WANT, ("ids",), ID1, MAX_IDS_PER_MESSAGE),
        (MessageType.ACK, ("ids",), ID1, MAX_IDS_PER_MESSAGE),
        (MessageType.OBJECTS, ("ids", "objects"), ID1, MAX_OBJECTS_PER_MESSAGE),
        (MessageType.HELLO, ("versions",), 1, MAX_VERSIONS),
        (MessageType.GOODBYE, ("reason",), "r", MAX_REASON_LENGTH),
        (MessageType.ERROR, ("message",), "m", MAX_REASON_LENGTH),
        (MessageType.STREAM_END, ("status",), "s", MAX_REASON_LENGTH),
        (MessageType.REF_SET, ("name",), "n", 200),
        (MessageType.REFS_REQUEST, ("name",), "n", 200),
        (MessageType.REFS_RESPONSE, ("refs",), {}, MAX_REFS_PER_MESSAGE),
        (MessageType.REF_CHANGED, ("name",), "n", 200),
        (MessageType.REF_CHANGED, ("candidates",), ID1, MAX_IDS_PER_MESSAGE),
        (MessageType.RESOLVE, ("text",), "t", 200),
        (MessageType.PEER_FORGET, ("peer",), "p", MAX_PEER_TEXT),
        (MessageType.PEER_FORGOTTEN, ("peers",), {}, MAX_PEERS_PER_MESSAGE),
    ],
    ids=lambda v: getattr(v, "name", None) or (v[0] if isinstance(v, tuple) else None),
)
def test_collections_over_their_limits_are_decode_errors(msg_type, names, item, limit):
    raw = raw_fields(EXAMPLES[msg_type])
    for count in (limit, limit + 1):
        for name in names:
            raw[name] = item * count if isinstance(item, str) else [item] * count
        if count == limit:
            decode_payload(msg_type, pack(raw))  # at the limit: fine
        else:
            assert_decode_error(msg_type, raw)


def test_refs_watch_names_are_bounded_in_count_and_length():
    decode_payload(MessageType.REFS_WATCH, pack({"names": ["main"] * MAX_WATCH_NAMES}))
    assert decode_payload(MessageType.REFS_WATCH, pack({"names": None})) == RefsWatch()
    assert_decode_error(MessageType.REFS_WATCH, {"names": ["main"] * (MAX_WATCH_NAMES + 1)})
    decode_payload(MessageType.REFS_WATCH, pack({"names": ["n" * 200]}))
    assert_decode_error(MessageType.REFS_WATCH, {"names": ["n" * 201]})
    assert_decode_error(MessageType.REFS_WATCH, {"names": "main"})  # an array, not a string


NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", NON_FINITE, ids=repr)
@pytest.mark.parametrize(
    ("msg_type", "name"),
    [
        (MessageType.EXPAND_REQUEST, "min_relevance"),
        (MessageType.STREAM_REQUEST, "relevance_threshold"),
        (MessageType.STREAM_CHUNK, "progress"),
        (MessageType.QUERY_REQUEST, "min_relevance"),
        (MessageType.QUERY_REQUEST, "max_age_seconds"),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_non_finite_floats_are_decode_errors(msg_type, name, value):
    raw = raw_fields(EXAMPLES[msg_type])
    raw[name] = value
    assert_decode_error(msg_type, raw)


@pytest.mark.parametrize("value", NON_FINITE, ids=repr)
def test_non_finite_relevance_inside_an_atom_is_a_decode_error(value):
    raw = raw_fields(EXAMPLES[MessageType.QUERY_RESPONSE])
    raw["atoms"][0][4] = value
    assert_decode_error(MessageType.QUERY_RESPONSE, raw)


@pytest.mark.parametrize(
    "metadata",
    [{"x": math.nan}, {"x": math.inf}, {"x": b"bytes"}, {"x": [b"bytes"]}],
    ids=["nan", "inf", "bytes", "nested-bytes"],
)
def test_molecule_metadata_must_be_json(metadata):
    # encode_payload refuses such metadata (codec.canonical_value); a decoder
    # that accepts it hands the application a message it cannot send on.
    raw = raw_fields(EXAMPLES[MessageType.EXPAND_RESPONSE])
    raw["molecules"][0][3] = metadata
    assert_decode_error(MessageType.EXPAND_RESPONSE, raw)


@pytest.mark.parametrize(
    ("msg_type", "name", "value"),
    [
        (MessageType.ROOT, "count", -1),
        (MessageType.HELLO, "count", -1),
        (MessageType.HELLO, "stream_window", 0),
        (MessageType.HELLO, "connection_window", -1),
        (MessageType.CREDIT, "increment", 0),
        (MessageType.CREDIT, "increment", -5),
        (MessageType.PING, "nonce", -1),
        (MessageType.PONG, "nonce", -1),
        (MessageType.GOODBYE, "code", -1),
        (MessageType.ERROR, "code", -1),
        (MessageType.EXPAND_REQUEST, "max_tokens", -1),
        (MessageType.EXPAND_REQUEST, "min_relevance", -0.5),
        (MessageType.EXPAND_RESPONSE, "total_tokens", -1),
        (MessageType.STREAM_REQUEST, "chunk_size", 0),
        (MessageType.STREAM_REQUEST, "max_tokens_per_chunk", 0),
        (MessageType.STREAM_CHUNK, "chunk_id", -1),
        (MessageType.STREAM_CHUNK, "cumulative_tokens", -(2**63)),
        (MessageType.QUERY_REQUEST, "limit", -1),
        (MessageType.QUERY_REQUEST, "max_age_seconds", -1.0),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_negative_counts_are_decode_errors(msg_type, name, value):
    raw = raw_fields(EXAMPLES[msg_type])
    raw[name] = value
    assert_decode_error(msg_type, raw)


@pytest.mark.parametrize(
    ("msg_type", "mutate"),
    [
        (MessageType.QUERY_RESPONSE, lambda raw: raw["atoms"][0].__setitem__(4, -1.0)),  # negative relevance
        (MessageType.QUERY_RESPONSE, lambda raw: raw["atoms"][0].__setitem__(4, 1)),  # int relevance
        (MessageType.QUERY_RESPONSE, lambda raw: raw["atoms"][0].__setitem__(2, 1.5)),  # float timestamp
        (MessageType.QUERY_RESPONSE, lambda raw: raw["atoms"][0].__setitem__(2, 2**62)),  # beyond year 9999
        (MessageType.QUERY_RESPONSE, lambda raw: raw["atoms"][0].__setitem__(1, ["", "STAR", [], []])),
        (MessageType.QUERY_RESPONSE, lambda raw: raw["atoms"][0].__setitem__(1, ["T", "STAR", [], [1]])),
        (MessageType.QUERY_REQUEST, lambda raw: raw.__setitem__("type_filter", _nested_type(17))),
        (MessageType.QUERY_REQUEST, lambda raw: raw.__setitem__("type_filter", _nested_type(200))),
        (MessageType.EXPAND_RESPONSE, lambda raw: raw["molecules"][0].__setitem__(1, {"r": [[0, -1]]})),
        (MessageType.EXPAND_RESPONSE, lambda raw: raw["molecules"][0].__setitem__(1, {"r": [[0, 1, 2]]})),
        (MessageType.EXPAND_RESPONSE, lambda raw: raw["molecules"][0].__setitem__(1, {"r": [[True, 0]]})),
        (MessageType.STATUS_RESPONSE, lambda raw: raw["status"].__setitem__("deep", _nested_list(40))),
    ],
    ids=[
        "atom-negative-relevance", "atom-int-relevance", "atom-float-timestamp", "atom-timestamp-overflow",
        "type-empty-name", "type-int-constraint", "type-too-deep", "type-far-too-deep",
        "relation-negative-index", "relation-triple", "relation-bool-index", "status-too-deep",
    ],
)
def test_invalid_model_objects_inside_messages_are_decode_errors(msg_type, mutate):
    raw = raw_fields(EXAMPLES[msg_type])
    mutate(raw)
    assert_decode_error(msg_type, raw)


def _nested_type(depth: int) -> list:
    raw = ["T", "STAR", [], []]
    for _ in range(depth - 1):
        raw = ["T", "ARROW", [raw], []]
    return raw


def _nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", b"\x92\x01\x02", b"\x01", b"\xa3abc", b"\xc0", b"\x81\xa4root", b"\x80\x80"],
    ids=["empty", "reserved-byte", "array", "int", "str", "nil", "truncated-map", "trailing-data"],
)
@pytest.mark.parametrize("msg_type", list(MessageType), ids=lambda t: t.name)
def test_payloads_that_are_not_one_map_are_decode_errors(msg_type, payload):
    assert_decode_error(msg_type, payload)


def test_non_string_map_keys_are_decode_errors():
    assert_decode_error(MessageType.PING, b"\x81\x01\x01")  # {1: 1}: msgpack refuses int keys
    # MessagePack lets a map key be a bin; a field name never is one.
    assert_decode_error(MessageType.PING, b"\x81\xc4\x05nonce\x01")  # {b"nonce": 1}
    assert_decode_error(MessageType.PING, pack({"nonce": 1, b"x": 2}))
    assert_decode_error(MessageType.STATUS_REQUEST, pack({b"": None}))


@FUZZ
@given(
    msg_type=st.sampled_from(list(MessageType)),
    extra=st.dictionaries(st.text(max_size=5) | st.binary(max_size=5), st.none() | st.integers(0, 9), max_size=3),
)
def test_fuzz_top_level_keys_of_any_kind(msg_type, extra):
    raw = {**raw_fields(EXAMPLES[msg_type]), **extra}
    _decode_only_remote_errors(msg_type, pack(raw))


def test_trailing_bytes_after_a_valid_payload_are_a_decode_error():
    assert_decode_error(MessageType.PING, encode_payload(Ping(nonce=1)) + b"\x00")


UNKNOWN_TYPES = sorted(set(range(256)) - set(MessageType))


@pytest.mark.parametrize("msg_type", UNKNOWN_TYPES)
def test_unknown_type_bytes_are_unknown_message(msg_type):
    # Even with a payload that would be valid for some known type.
    error = decode_error(msg_type, encode_payload(Ping(nonce=1)))
    assert error.code == ErrorCode.UNKNOWN_MESSAGE
    assert decode_error(msg_type, b"").code == ErrorCode.UNKNOWN_MESSAGE


def test_decode_error_messages_fit_an_error_frame():
    raw = raw_fields(EXAMPLES[MessageType.EXPAND_RESPONSE])
    raw["type_summary"] = {("k" * 2000 + str(i)): "v" for i in range(50)}
    error = decode_error(MessageType.EXPAND_RESPONSE, pack(raw))
    assert error.code == ErrorCode.DECODE_ERROR
    Error(code=int(error.code), message=error.message)  # within MAX_REASON_LENGTH


# ---------------------------------------------------------------- fuzz


def _decode_only_remote_errors(msg_type: int, payload: bytes):
    """decode_payload returns a message or raises RemoteProtocolError: nothing else.

    When it accepts, the message must be one we could send on unchanged.
    """
    try:
        message = decode_payload(msg_type, payload)
    except RemoteProtocolError as exc:
        assert exc.code in (ErrorCode.DECODE_ERROR, ErrorCode.UNKNOWN_MESSAGE)
        return None
    assert type(message) is MESSAGE_CLASSES[MessageType(msg_type)]
    again = encode_payload(message)  # a LocalProtocolError here fails the test
    assert encode_payload(decode_payload(msg_type, again)) == again
    return message


@FUZZ
@given(msg_type=st.integers(0, 255), payload=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(msg_type, payload):
    _decode_only_remote_errors(msg_type, payload)


def _mutate(payload: bytes, rng: random.Random) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip bits
            data[pos % len(data)] ^= 1 << rng.randrange(8)
        elif op == 1 and data:  # overwrite with an interesting byte
            data[pos % len(data)] = rng.choice([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xC2, 0xC3, 0xCB, 0xCF, 0xD3, 0xDC, 0xDD, 0xDE, 0xDF, 0xFF])
        elif op == 2:  # truncate
            del data[pos:]
        elif op == 3:  # insert random bytes
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 4:  # delete a range
            del data[pos : pos + rng.randint(1, 8)]
        else:  # duplicate a range
            data[pos:pos] = data[pos : pos + rng.randint(1, 16)]
    return bytes(data)


@pytest.mark.parametrize("msg_type", list(MessageType), ids=lambda t: t.name)
@FUZZ
@given(data=st.data(), rng=st.randoms(use_true_random=False))
def test_fuzz_mutated_valid_payloads(msg_type, data, rng):
    message = data.draw(MESSAGE_STRATEGIES[msg_type]) if rng.random() < 0.5 else EXAMPLES[msg_type]
    payload = _mutate(encode_payload(message), rng)
    _decode_only_remote_errors(msg_type, payload)


# Values to graft into a valid message's structure: every MessagePack kind.
_graft_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=40) | st.sampled_from([ID1, "STAR", "ARROW", "T", 0, -1, 2**64 - 1, math.nan]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=8,
)


def _graft(raw, rng: random.Random, value):
    """Replace one randomly chosen node of a nested structure with `value`."""
    if rng.random() < 0.3 or not isinstance(raw, (list, dict)) or not raw:
        return value
    if isinstance(raw, dict):
        key = rng.choice(sorted(raw, key=repr))
        return {**raw, key: _graft(raw[key], rng, value)}
    index = rng.randrange(len(raw))
    return [*raw[:index], _graft(raw[index], rng, value), *raw[index + 1 :]]


def _listify(value):
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("msg_type", list(MessageType), ids=lambda t: t.name)
@FUZZ
@given(value=_graft_values, rng=st.randoms(use_true_random=False))
def test_fuzz_structurally_mutated_payloads(msg_type, value, rng):
    raw = _listify(raw_fields(EXAMPLES[msg_type]))
    mutated = _graft(raw, rng, value)
    _decode_only_remote_errors(msg_type, msgpack.packb(mutated, use_bin_type=True))


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    "message",
    [
        Ping(nonce=2**64),  # beyond MessagePack's integers
        Root(root=ID1, count=2**70),
        Goodbye(code=0, reason="\ud800"),  # a lone surrogate is not UTF-8
        StatusResponse(status={"x": object()}),
        Reconcile(body=(object(),)),
        Hello(
            magic=b"CTXF", versions=(-(2**64),), node_id=ID1, max_frame_size=1, stream_window=1,
            connection_window=1, root=ID1, count=0,
        ),
    ],
    ids=["u64-overflow", "count-overflow", "surrogate", "object-in-status",
         "object-in-body", "version-underflow"],
)
def test_encoding_an_unencodable_message_is_a_local_error(message):
    with pytest.raises(LocalProtocolError):
        encode_payload(message)


@pytest.mark.parametrize(
    "message",
    [
        Objects(ids=(ID1,), objects=("text, not bytes",)),
        Ping(nonce=True),
        Root(root=ID1, count=1.5),
        Hello(
            magic="CTXF", versions=(1,), node_id=ID1, max_frame_size=2**14, stream_window=2**16,
            connection_window=2**16, root=ID1, count=0,
        ),
        PushContext(context="text"),
        Error(code=1, message=b"bytes"),
        StreamChunk(chunk_id=0, atoms=(), is_final=1, cumulative_tokens=0, progress=0.0),
        StatusResponse(status={"rate": math.inf}),
        StatusResponse(status={"id": b"\x00" * 32}),
    ],
    ids=["str-object", "bool-nonce", "float-count", "str-magic", "str-context", "bytes-message", "int-is-final",
         "inf-in-status", "bytes-in-status"],
)
def test_what_encode_accepts_the_peer_can_decode(message):
    # Fields without a type validator accept anything at construction; the
    # encoder is then the last place our own mistake can be caught as ours
    # (LocalProtocolError) rather than as the peer's DECODE_ERROR.
    try:
        payload = encode_payload(message)
    except LocalProtocolError:
        return
    decode_payload(message.TYPE, payload)
