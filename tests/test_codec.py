"""Tests for sync.codec: canonical encoding round trips, strict decoding
(only DecodeError on bad input), the interchange JSON, and test vectors that
pin the canonical encoding (copied to tests/vectors.md)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import atom, molecule, root, types
from sync.codec import (
    FORMAT_VERSION,
    DecodeError,
    atom_id,
    context_from_json,
    context_id,
    context_to_json,
    converter,
    decode_context,
    encode_context,
)
from sync.model import (
    T_INT,
    T_LIST,
    T_STRING,
    CompressedContext,
    Kind,
    MemoryAtom,
    MemoryMolecule,
    TypeSignature,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ---------------------------------------------------------------

ids = st.binary(min_size=32, max_size=32).map(bytes.hex)
utc_offsets = st.builds(lambda m: timezone(timedelta(minutes=m)), st.integers(-23 * 60, 23 * 60))
timestamps = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.none() | utc_offsets
)
relevances = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False) | st.sampled_from([0, 1, 0.5])
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
metadata = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
constrained_types = st.builds(
    lambda t, cs: TypeSignature(t.name, t.kind, t.parameters, cs), types, st.lists(st.text(min_size=1, max_size=4), max_size=2)
)
gen_atoms = st.builds(
    MemoryAtom,
    st.text(max_size=20),
    types | constrained_types,
    timestamps,
    st.text(max_size=10),
    relevances,
)
relations = st.dictionaries(
    st.text(max_size=5), st.lists(st.tuples(st.integers(0, 2**32), st.integers(0, 5)), max_size=3), max_size=2
)
gen_molecules = st.builds(MemoryMolecule, st.lists(gen_atoms, max_size=2), relations, types, metadata)
contexts = st.builds(
    CompressedContext,
    st.none() | ids,
    st.lists(gen_atoms, max_size=4),
    st.lists(gen_molecules, max_size=2),
    st.frozensets(ids, max_size=3),
    metadata,
)

# What the rules for new contexts (model.check_new_context) let anyone write
# as interchange JSON: relevance in 0..1, roots that add something and
# remove nothing.
unit_relevances = st.floats(min_value=0.0, max_value=1.0, allow_nan=False) | st.sampled_from([0, 1, 0.5])
new_atoms = st.builds(MemoryAtom, st.text(max_size=20), types | constrained_types, timestamps, st.text(max_size=10),
                      unit_relevances)
new_molecules = st.builds(MemoryMolecule, st.lists(new_atoms, max_size=2), relations, types, metadata)
new_contexts = st.builds(
    CompressedContext, ids, st.lists(new_atoms, max_size=4), st.lists(new_molecules, max_size=2),
    st.frozensets(ids, max_size=3), metadata,
) | st.builds(
    CompressedContext, st.none(), st.lists(new_atoms, min_size=1, max_size=4), st.lists(new_molecules, max_size=2),
    st.just(frozenset()), metadata,
)


def raw_of(ctx: CompressedContext) -> list:
    """The canonical structure, unpacked back from the canonical bytes."""
    return msgpack.unpackb(encode_context(ctx), raw=False)


def pack(raw, **kw) -> bytes:
    return msgpack.packb(raw, use_bin_type=True, **kw)


SAMPLE = CompressedContext(
    "11" * 32,
    (atom("fact one", 0.5), atom("fact two", 0.25, T_LIST(T_INT))),
    (molecule(atom("m"), relations={"r": [(0, 0)]}, z=1, a=[1, {"y": 2, "b": 3}]),),
    frozenset({"22" * 32, "33" * 32, "01" * 32}),
    {"zeta": 1, "alpha": {"k2": 2.5, "k1": None}, "mid": [True, "x"]},
)


# --- round trips --------------------------------------------------------------


@PROPERTY
@given(contexts)
def test_encode_decode_round_trip(ctx):
    data = encode_context(ctx)
    back = decode_context(data)
    assert back == ctx
    assert encode_context(back) == data
    assert back.id == ctx.id == hashlib.sha256(data).hexdigest()
    assert decode_context(data, verify=False) == ctx


def test_round_trip_of_a_sample():
    assert decode_context(encode_context(SAMPLE)) == SAMPLE
    assert context_id(SAMPLE) == SAMPLE.id


def test_encoding_is_deterministic_whatever_the_input_order():
    reordered = CompressedContext(
        SAMPLE.base_hash,
        SAMPLE.delta_atoms,
        (molecule(atom("m"), relations={"r": [(0, 0)]}, a=[1, {"b": 3, "y": 2}], z=1),),
        frozenset(sorted(SAMPLE.removed_hashes, reverse=True)),
        {"mid": [True, "x"], "alpha": {"k1": None, "k2": 2.5}, "zeta": 1},
    )
    assert encode_context(reordered) == encode_context(SAMPLE)


def test_timestamps_keep_microseconds_and_become_utc():
    t = datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-7)))
    back = decode_context(encode_context(root(atom("x", timestamp=t))))
    assert back.delta_atoms[0].timestamp == t
    assert back.delta_atoms[0].timestamp.utcoffset() == timedelta(0)
    old = datetime(1901, 1, 1, tzinfo=timezone.utc)
    assert decode_context(encode_context(root(atom("x", timestamp=old)))).delta_atoms[0].timestamp == old


def test_converter_uses_the_canonical_forms():
    raw = converter.unstructure(SAMPLE)
    assert pack(raw) == encode_context(SAMPLE)
    assert converter.structure(raw, CompressedContext) == SAMPLE
    a = SAMPLE.delta_atoms[1]
    assert converter.structure(converter.unstructure(a), MemoryAtom) == a
    assert converter.structure(converter.unstructure(a.type_sig), TypeSignature) == a.type_sig


# --- canonical form is enforced ----------------------------------------------------


def test_unsorted_metadata_map_is_refused():
    raw = raw_of(SAMPLE)
    raw[5] = dict(reversed(list(raw[5].items())))
    data = pack(raw)
    assert data != encode_context(SAMPLE)
    with pytest.raises(DecodeError):
        decode_context(data)
    assert decode_context(data, verify=False) == SAMPLE  # same structure, other bytes


def test_unsorted_nested_molecule_metadata_is_refused():
    raw = raw_of(SAMPLE)
    raw[3][0][3] = dict(reversed(list(raw[3][0][3].items())))
    with pytest.raises(DecodeError):
        decode_context(pack(raw))


def test_float32_relevance_is_refused():
    data = pack(raw_of(SAMPLE), use_single_float=True)
    assert data != encode_context(SAMPLE)
    with pytest.raises(DecodeError):
        decode_context(data)


def test_unsorted_removed_ids_are_refused():
    raw = raw_of(SAMPLE)
    raw[4] = list(reversed(raw[4]))
    with pytest.raises(DecodeError):
        decode_context(pack(raw))


def test_duplicate_removed_ids_are_refused():
    raw = raw_of(SAMPLE)
    raw[4] = sorted(raw[4] + raw[4][:1])
    with pytest.raises(DecodeError):
        decode_context(pack(raw))


def test_unsorted_type_constraints_are_refused():
    ctx = root(atom("x", type_sig=TypeSignature("T", Kind.STAR, constraints=("a", "b"))))
    raw = raw_of(ctx)
    raw[2][0][1][3] = ["b", "a"]
    with pytest.raises(DecodeError):
        decode_context(pack(raw))


def test_non_shortest_integer_is_refused():
    data = encode_context(root(note=5))
    assert data.endswith(b"\x81\xa4note\x05")
    longer = data[:-1] + b"\xcc\x05"  # uint8 5 instead of fixint 5
    assert msgpack.unpackb(longer) == msgpack.unpackb(data)
    with pytest.raises(DecodeError):
        decode_context(longer)


def test_ids_as_strings_are_refused():
    raw = raw_of(SAMPLE)
    raw[1] = SAMPLE.base_hash  # hex text where 32 bytes belong
    with pytest.raises(DecodeError):
        decode_context(pack(raw))


@pytest.mark.parametrize("version", [0, 2, 255, "1", 1.0, True, None])
def test_wrong_format_version_is_refused(version):
    raw = raw_of(SAMPLE)
    assert raw[0] == FORMAT_VERSION
    raw[0] = version
    with pytest.raises(DecodeError):
        decode_context(pack(raw))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\xc1",  # never used in msgpack
        b"\x96",  # array of 6, no items
        b"\x90",
        pack([1, None, [], [], [], {}, "extra"]),
        pack([1, None, [], [], []]),
        pack({"version": 1}),
        pack([1, b"short", [], [], [], {}]),
        pack([1, None, [["x"]], [], [], {}]),
        pack([1, None, [["x", ["String", "NOPE", [], []], 0, "s", 1.0]], [], [], {}]),
        pack([1, None, [["x", ["String", "STAR", [], []], 0, "s", 1]], [], [], {}]),  # int relevance
        pack([1, None, [["x", ["String", "STAR", [], []], 0, "s", float("nan")]], [], [], {}]),
        pack([1, None, [["x", ["String", "STAR", [], []], 2**63, "s", 1.0]], [], [], {}]),
        pack([1, None, [["x", ["", "STAR", [], []], 0, "s", 1.0]], [], [], {}]),
        pack([1, None, [], [[[], {"r": [[0, -1]]}, ["S", "STAR", [], []], {}]], [], {}]),
        pack([1, None, [], [[[], {"r": 5}, ["S", "STAR", [], []], {}]], [], {}]),
        pack([1, None, [], [[[], {b"r": []}, ["S", "STAR", [], []], {}]], [], {}]),
        pack([1, None, [], [], [b"\x00" * 31], {}]),
        pack([1, None, [], [], [], {"k": b"bytes"}]),
        pack([1, None, [], [], [], {"k": float("inf")}]),
        pack([1, None, [], [], [], {b"k": 1}]),
        pack([1, None, [], [], [], []]),
        pack([1, None, [], [], [], {"d": msgpack.ExtType(1, b"x")}]),
        b"\x96\x01\xc0\x90\x90\x90\x81\xa1k" + b"\x91" * 40 + b"\xc0",  # metadata nested 41 deep
        b"\x91" * 5000 + b"\xc0",  # nesting beyond msgpack's stack
        encode_context(SAMPLE)[:-1],
        encode_context(SAMPLE) + b"\x00",
        bytes.fromhex("9601c0919fa178"),  # invalid: array of 15 where 5 belong, truncated
        b"\x96\x01\xc0\x91\x95\xa2\xff\xfe",  # invalid UTF-8 in a str
    ],
)
def test_bad_bytes_raise_decode_error(data):
    with pytest.raises(DecodeError):
        decode_context(data)


def test_truncations_raise_decode_error():
    data = encode_context(SAMPLE)
    for n in range(len(data)):
        with pytest.raises(DecodeError):
            decode_context(data[:n])


def _nested_type_bytes(levels: int) -> bytes:
    """A context whose one atom has a type nested `levels` deep, packed by hand
    (msgpack.packb refuses to build anything this deep)."""
    open_level = b"\x94" + b"\xa4List" + b"\xa5ARROW" + b"\x91"
    leaf = b"\x94" + b"\xa6String" + b"\xa4STAR" + b"\x90\x90"
    close_level = b"\x90"  # the constraints of each enclosing level
    type_bytes = open_level * levels + leaf + close_level * levels
    atom_bytes = b"\x95" + b"\xa1x" + type_bytes + b"\x00" + b"\xa1s" + b"\xcb" + b"\x3f\xf0" + b"\x00" * 6
    return b"\x96\x01\xc0\x91" + atom_bytes + b"\x90\x90\x80"


def test_nested_type_bytes_helper_is_right():
    ctx = root(MemoryAtom("x", T_LIST(T_LIST(T_STRING)), datetime(1970, 1, 1), "s", 1.0))
    assert _nested_type_bytes(2) == encode_context(ctx)


@pytest.mark.parametrize("levels", [17, 100, 490])
def test_deeply_nested_type_raises_decode_error(levels):
    """Fails today at 490: msgpack's C decoder accepts nesting up to ~1000
    containers (a type ~505 levels deep), and _type_from_raw (via
    _interned_type/_freeze) recurses over the whole raw type, two Python
    frames per level, before TypeSignature's MAX_TYPE_DEPTH check runs, so
    RecursionError escapes decode_context instead of DecodeError. A caller
    with a deeper stack (a trio task) hits it at a smaller depth."""
    with pytest.raises(DecodeError):
        decode_context(_nested_type_bytes(levels))


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_only_decode_error(data):
    for verify in (True, False):
        try:
            decode_context(data, verify=verify)
        except DecodeError:
            pass


def _mutations(data: bytes):
    return st.lists(
        st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]), st.integers(0, len(data) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    )


def mutated(encoded: bytes, data) -> bytes:
    """`encoded` with a few bytes flipped, set, inserted or deleted (drawn from `data`)."""
    buf = bytearray(encoded)
    for op, pos, byte in data.draw(_mutations(encoded)):
        pos %= max(len(buf), 1)
        if op == "flip" and buf:
            buf[pos] ^= 1 << (byte % 8)
        elif op == "set" and buf:
            buf[pos] = byte
        elif op == "insert":
            buf.insert(pos, byte)
        elif op == "delete" and buf:
            del buf[pos]
    return bytes(buf)


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_encodings_only_decode_error(data):
    ctx = data.draw(st.sampled_from([SAMPLE, root(), root(atom("x")), root(note=[1, {"a": 2.5}])]) | contexts)
    buf = mutated(encode_context(ctx), data)
    for verify in (True, False):
        try:
            back = decode_context(bytes(buf), verify=verify)
        except DecodeError:
            continue
        if verify:  # anything accepted is canonical: it re-encodes to itself
            assert encode_context(back) == bytes(buf)
            assert back.id == hashlib.sha256(bytes(buf)).hexdigest()


# --- the interchange JSON -----------------------------------------------------------


@PROPERTY
@given(new_contexts)
def test_json_round_trip(ctx):
    assert context_from_json(context_to_json(ctx)) == ctx
    through_text = json.loads(json.dumps(context_to_json(ctx)))
    back = context_from_json(through_text)
    assert back == ctx
    assert back.id == ctx.id


def test_json_shape():
    j = context_to_json(SAMPLE)
    assert set(j) == {"base_hash", "delta_atoms", "delta_molecules", "removed_hashes", "compression_metadata"}
    assert j["removed_hashes"] == sorted(SAMPLE.removed_hashes)
    assert j["delta_atoms"][1] == {
        "content": "fact two",
        "type_sig": {
            "name": "List",
            "kind": "ARROW",
            "parameters": [{"name": "Int", "kind": "STAR", "parameters": [], "constraints": []}],
            "constraints": [],
        },
        "timestamp": "2024-05-01T12:00:00+00:00",
        "source_hash": "test-source",
        "relevance_score": 0.25,
    }


def test_json_defaults():
    minimal = {"delta_atoms": [{"content": "x", "type_sig": {"name": "String", "kind": "STAR"}, "timestamp": "2024-05-01T12:00:00", "source_hash": "test-source"}]}
    assert context_from_json(minimal) == root(atom("x"))
    assert context_from_json({"delta_molecules": [context_to_json(SAMPLE)["delta_molecules"][0]]}).is_root


@pytest.mark.parametrize(
    "doc, needle",
    [
        ({}, "a root context (base_hash null) must add at least one atom or molecule"),
        ({"compression_metadata": {"source": "x"}}, "must add at least one atom"),
        ({"removed_hashes": ["22" * 32], "delta_atoms": [context_to_json(SAMPLE)["delta_atoms"][0]]},
         "removed_hashes: a root context (base_hash null) has nothing to remove"),
    ],
    ids=["empty-object", "metadata-only", "root-that-removes"],
)
def test_json_refuses_a_root_that_adds_nothing_or_removes(doc, needle):
    with pytest.raises(DecodeError) as info:
        context_from_json(doc)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "path, value",
    [
        (["delta_atoms", 0, "relevance_score"], 1.5),
        (["delta_atoms", 1, "relevance_score"], -0.5),
        (["delta_atoms", 0, "relevance_score"], 2),
        (["delta_molecules", 0, "atoms", 0, "relevance_score"], 1.0000001),
    ],
)
def test_json_relevance_outside_0_to_1_is_refused(path, value):
    with pytest.raises(DecodeError) as info:
        context_from_json(_bad(path, value))
    field = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
    assert str(info.value) == f"{field}: must be between 0 and 1, got {value!r}"


def test_json_relevance_at_the_bounds_and_an_empty_delta_are_accepted():
    low = context_from_json(_bad(["delta_atoms", 0, "relevance_score"], 0))
    high = context_from_json(_bad(["delta_atoms", 0, "relevance_score"], 1))
    assert [a.relevance_score for a in (low.delta_atoms[0], high.delta_atoms[0])] == [0.0, 1.0]
    # A delta that changes nothing is the identity of expansion, not an error.
    assert context_from_json({"base_hash": "11" * 32}) == CompressedContext("11" * 32, ())


@pytest.mark.parametrize(
    "ctx",
    [
        root(),
        root(removed=["22" * 32]),
        root(atom("over-rated", 1.5)),
        root(molecules=[molecule(atom("in a molecule", 7.0))]),
    ],
    ids=["empty-root", "root-that-removes", "relevance-1.5", "molecule-relevance-7"],
)
def test_bytes_of_contexts_made_before_the_rules_still_decode(ctx):
    # Stores and peers hold contexts of these shapes (the JSON took them
    # before): the wire and the stores read them, only JSON refuses them.
    data = encode_context(ctx)
    assert decode_context(data) == ctx
    assert decode_context(data, verify=False) == ctx
    with pytest.raises(DecodeError):
        context_from_json(context_to_json(ctx))


def test_json_output_does_not_alias_the_context():
    """Fails today: context_to_json (and molecule_to_json) return the frozen
    context's own metadata dicts, so editing the JSON edits the context
    behind its cached id: ctx.id no longer matches its bytes."""
    ctx = CompressedContext(None, (), (molecule(tag=1),), frozenset(), {"k": 1})
    before = ctx.id
    j = context_to_json(ctx)
    j["compression_metadata"]["k"] = 2
    j["delta_molecules"][0]["metadata"]["tag"] = 2
    assert ctx.compression_metadata == {"k": 1}
    assert ctx.delta_molecules[0].metadata == {"tag": 1}
    assert context_id(ctx) == before == ctx.id


def _good_json():
    # a deep copy: context_to_json hands out the context's own metadata dicts
    return json.loads(json.dumps(context_to_json(SAMPLE)))


def _bad(path: list, value):
    j = _good_json()
    target = j
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return j


@pytest.mark.parametrize(
    "path, value, needle",
    [
        (["delta_atoms", 0, "relevance_score"], "high", "delta_atoms[0].relevance_score"),
        (["delta_atoms", 0, "relevance_score"], True, "delta_atoms[0].relevance_score"),
        (["delta_atoms", 1, "timestamp"], "yesterday", "delta_atoms[1].timestamp"),
        (["delta_atoms", 1, "timestamp"], 1700000000, "delta_atoms[1].timestamp"),
        (["delta_atoms", 0, "content"], KeyError, "delta_atoms[0].content"),
        (["delta_atoms", 0, "content"], 5, "delta_atoms[0].content"),
        (["delta_atoms", 0, "source_hash"], None, "delta_atoms[0].source_hash"),
        (["delta_atoms", 0, "type_sig", "kind"], "NOPE", "delta_atoms[0].type_sig.kind"),
        (["delta_atoms", 1, "type_sig", "parameters", 0, "name"], 7, "delta_atoms[1].type_sig.parameters[0].name"),
        (["delta_atoms", 0, "type_sig", "constraints"], [1], "delta_atoms[0].type_sig.constraints[0]"),
        (["delta_atoms", 1], "not an atom", "delta_atoms[1]"),
        (["delta_atoms"], {}, "delta_atoms"),
        (["delta_molecules", 0, "atoms", 0, "content"], [], "delta_molecules[0].atoms[0].content"),
        (["delta_molecules", 0, "molecule_type"], KeyError, "delta_molecules[0].molecule_type"),
        (["delta_molecules", 0, "relations"], [], "delta_molecules[0].relations"),
        (["delta_molecules", 0, "metadata", "z"], float("nan"), "delta_molecules[0].metadata.z"),
        (["removed_hashes", 1], "A" * 64, "removed_hashes[1]"),
        (["removed_hashes"], "22" * 32, "removed_hashes"),
        (["base_hash"], "11" * 16, "base_hash"),
        (["base_hash"], 11, "base_hash"),
        (["compression_metadata", "alpha", "k1"], {1, 2}, "compression_metadata.alpha.k1"),
        (["compression_metadata"], [], "compression_metadata"),
    ],
)
def test_json_errors_name_the_field(path, value, needle):
    with pytest.raises(DecodeError) as info:
        context_from_json(_bad(path, value))
    assert needle in str(info.value)


def test_json_nan_relevance_is_refused():
    with pytest.raises(DecodeError) as info:
        context_from_json(_bad(["delta_atoms", 0, "relevance_score"], float("nan")))
    assert "delta_atoms[0]" in str(info.value)
    assert "relevance_score" in str(info.value)


def test_json_error_names_the_path_once():
    """The path leads the message, once, and the message describes the value.

    Fails today: codec.py's module-level registration loop
    `for _kind, _also in ((int, ()), ..., (float, (int,))):` rebinds the name
    `_kind`, shadowing the helper `_kind(value)` that _Json uses to describe a
    bad value. `_kind` is `float` after import, so describing 'high' raises
    ValueError, which atom_from_json wraps as 'delta_atoms[0]: could not
    convert string to float' (the field name is lost); at top level the
    message has no path at all."""
    with pytest.raises(DecodeError) as info:
        context_from_json(_bad(["delta_atoms", 0, "relevance_score"], "high"))
    message = str(info.value)
    assert message.startswith("delta_atoms[0].relevance_score: ")
    assert message.count("delta_atoms[0]") == 1
    assert "'high'" in message


def test_json_error_describes_a_number_as_given():
    with pytest.raises(DecodeError) as info:
        context_from_json(_bad(["delta_atoms", 0, "content"], 5))
    assert str(info.value).startswith("delta_atoms[0].content: ")
    assert "5.0" not in str(info.value)  # today: 'got 5.0', from float(5)


def test_json_unknown_top_level_field_is_refused():
    j = _good_json()
    j["parent"] = None
    with pytest.raises(DecodeError) as info:
        context_from_json(j)
    assert "parent" in str(info.value)


@pytest.mark.parametrize("value", [None, [], "x", 1])
def test_json_not_an_object(value):
    with pytest.raises(DecodeError):
        context_from_json(value)


def test_json_string_that_cannot_be_encoded_is_refused():
    """json.loads turns the escape \\ud800 into a lone surrogate, which has no
    UTF-8 form. context_from_json accepts it; the context then fails later,
    outside the decoder, with UnicodeEncodeError from .id or store.put."""
    doc = json.loads('{"delta_atoms": [{"content": "\\ud800", "type_sig": {"name": "String", "kind": "STAR"},'
                     ' "timestamp": "2024-05-01T12:00:00+00:00", "source_hash": "s"}]}')
    with pytest.raises(DecodeError):
        context_from_json(doc)


# --- test vectors (also in tests/vectors.md) ------------------------------------------

VECTOR_ATOM = MemoryAtom("The sky is blue", T_STRING, datetime(2024, 1, 1, tzinfo=timezone.utc), "seed", 0.75)
VECTOR_ATOM_ID = "aeee9d7a5ba418c8265e61d19e9ed70980e0e562d09292980fb5a42e4b640312"

VECTOR_ROOT = CompressedContext(None, (VECTOR_ATOM,))
VECTOR_ROOT_HEX = (
    "9601c09195af54686520736b7920697320626c756594a6537472696e67a4535441529090"
    "cf00060dd710212000a473656564cb3fe8000000000000909080"
)
VECTOR_ROOT_ID = "8dfb95f65e6c131882729661ea434de146d4b6c8b3fe1c2d2f20fe8d5e4111b8"

VECTOR_DELTA = CompressedContext(
    "11" * 32,
    (VECTOR_ATOM,),
    (MemoryMolecule((), {"supports": [(0, 0)]}, T_LIST(T_STRING), {"note": "x"}),),
    frozenset({"22" * 32}),
    {"n": 1, "author": "lead"},
)
VECTOR_DELTA_HEX = (
    "9601c4201111111111111111111111111111111111111111111111111111111111111111"
    "9195af54686520736b7920697320626c756594a6537472696e67a4535441529090cf0006"
    "0dd710212000a473656564cb3fe800000000000091949081a8737570706f727473919200"
    "0094a44c697374a54152524f579194a6537472696e67a45354415290909081a46e6f7465"
    "a17891c420222222222222222222222222222222222222222222222222222222222222222282"
    "a6617574686f72a46c656164a16e01"
)
VECTOR_DELTA_ID = "8bce42cbabd1b7abcdf04bd0f15300fe35f1439030b51e0e7b7457d9e94c04ea"


def test_vector_atom_id():
    assert VECTOR_ATOM.content_hash == VECTOR_ATOM_ID
    # atom id = SHA-256(msgpack(["atom", content, type]))
    spelled = msgpack.packb(["atom", "The sky is blue", ["String", "STAR", [], []]], use_bin_type=True)
    assert hashlib.sha256(spelled).hexdigest() == VECTOR_ATOM_ID
    assert atom_id(VECTOR_ATOM) == VECTOR_ATOM_ID


@pytest.mark.parametrize(
    "ctx, hex_bytes, expected_id",
    [(VECTOR_ROOT, VECTOR_ROOT_HEX, VECTOR_ROOT_ID), (VECTOR_DELTA, VECTOR_DELTA_HEX, VECTOR_DELTA_ID)],
    ids=["root", "delta"],
)
def test_vectors(ctx, hex_bytes, expected_id):
    data = bytes.fromhex(hex_bytes)
    assert encode_context(ctx) == data
    assert ctx.id == expected_id
    assert hashlib.sha256(data).hexdigest() == expected_id
    assert decode_context(data) == ctx


def test_vector_matches_the_documented_layout():
    """Rebuild the delta vector from the layout in codec's docstring alone."""
    type_string = ["String", "STAR", [], []]
    documented = [
        1,
        bytes.fromhex("11" * 32),
        [["The sky is blue", type_string, 1704067200 * 10**6, "seed", 0.75]],
        [[[], {"supports": [[0, 0]]}, ["List", "ARROW", [type_string], []], {"note": "x"}]],
        [bytes.fromhex("22" * 32)],
        {"author": "lead", "n": 1},
    ]
    assert msgpack.packb(documented, use_bin_type=True).hex() == VECTOR_DELTA_HEX



@PROPERTY
@given(content=st.text(max_size=300), sig=types)
def test_atom_id_is_the_hash_of_its_canonical_triple(content, sig):
    """atom_id hashes pieces encoded separately (each type once): the same
    bytes as msgpack(["atom", content, type]) encoded in one go."""
    from sync.codec import _type_raw

    expected = hashlib.sha256(msgpack.packb(["atom", content, _type_raw(sig)], use_bin_type=True)).hexdigest()
    assert atom_id(atom(content, type_sig=sig)) == expected


@PROPERTY
@given(ctx=st.builds(lambda n: root(*(atom(f"atom {i}", i / 10) for i in range(n))), st.integers(0, 12)),
       positions=st.lists(st.integers(0, 11), max_size=6))
def test_raw_atoms_at_decodes_just_the_atoms_asked_for(ctx, positions):
    from sync.codec import raw_atoms_at

    data = encode_context(ctx)
    everything = msgpack.unpackb(data, use_list=False)[2]
    if all(p < len(everything) for p in positions):
        assert raw_atoms_at(data, positions) == {p: everything[p] for p in positions}
    else:
        with pytest.raises(DecodeError):
            raw_atoms_at(data, positions)


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb([1, None]), msgpack.packb([1, None, ["abcdefghij"], [], [], {}])[:10]])
def test_raw_atoms_at_refuses_what_is_not_a_context(data):
    from sync.codec import raw_atoms_at

    with pytest.raises(DecodeError):
        raw_atoms_at(data, [0])
