"""sync.rawcheck accepts exactly what decode_context(verify=True) accepts,
and yields the base and atom index the model's path would."""

from __future__ import annotations

import struct
from datetime import datetime, timezone

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import atom, delta, molecule, root
from sync import atomindex, rawcheck
from sync.codec import DecodeError, decode_context, encode_context
from sync.model import MAX_METADATA_DEPTH, Kind, TypeSignature, check_new_context
from sync.rawcheck import CheckedContext, check_context_bytes
from test_codec import FUZZ, PROPERTY, SAMPLE, _nested_type_bytes, contexts, mutated, pack, raw_of

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MIN_US = (datetime.min.replace(tzinfo=timezone.utc) - EPOCH) // datetime.resolution
MAX_US = (datetime.max.replace(tzinfo=timezone.utc) - EPOCH) // datetime.resolution


def agree(data: bytes) -> bool:
    """Both paths accept or both refuse (with DecodeError only); when they
    accept, the raw check gives the model's base and index. True if accepted."""
    try:
        ctx = decode_context(data, verify=True)
    except DecodeError:
        ctx = None
    try:
        checked = check_context_bytes(data)
    except DecodeError:
        checked = None
    assert (ctx is None) == (checked is None), f"decode_context {'refused' if ctx is None else 'accepted'} {data!r:.200}"
    if ctx is not None:
        relevances = [a.relevance_score for a in ctx.delta_atoms]
        relevances += [a.relevance_score for m in ctx.delta_molecules for a in m.atoms]
        assert checked == CheckedContext(ctx.base_hash, atomindex.build(ctx), len(ctx.delta_atoms) + len(ctx.delta_molecules),
                                         max(relevances, default=0.0))
        assert checked.removes == len(ctx.removed_hashes)
    return ctx is not None


def one_atom(content="x", type_raw=("String", "STAR", [], []), ts=0, source="s", relevance=1.0, **top) -> bytes:
    raw = [1, None, [[content, type_raw, ts, source, relevance]], [], [], {}]
    for field, value in top.items():
        raw[{"base": 1, "molecules": 3, "removed": 4, "metadata": 5}[field]] = value
    return pack(raw)


def nested(depth: int, leaf=None):
    value = leaf
    for _ in range(depth):
        value = {"k": value}
    return value


@PROPERTY
@given(contexts)
def test_every_valid_context_is_accepted_with_the_models_index(ctx):
    assert agree(encode_context(ctx))


def test_a_chain_and_a_delta_with_repeats_and_removals():
    first = root(atom("a", 0.5), atom("b", 0.9), atom("a", 0.1))
    second = delta(first, atom("c", 0.3), atom("c", 0.3), removed={atom("b").content_hash}, note=[1, {"x": 2.5}])
    for ctx in (first, second, SAMPLE):
        assert agree(encode_context(ctx))


@FUZZ
@given(st.data())
def test_mutated_encodings_get_the_same_verdict(data):
    ctx = data.draw(st.sampled_from([SAMPLE, root(atom("x")), delta("11" * 32, atom("y"), removed={"22" * 32})]) | contexts)
    agree(mutated(encode_context(ctx), data))


def _raw_sample_edits():
    """(name, bytes): SAMPLE-shaped contexts made non-canonical by hand."""
    plain = root(atom("fact one", 0.5), atom("fact two", 0.25, TypeSignature("T", Kind.STAR, constraints=("a", "b"))),
                 removed=(), zeta=1, alpha={"k2": 2.5, "k1": None})
    base = delta("11" * 32, atom("y"), removed={"22" * 32, "33" * 32})
    raw = raw_of(plain)
    yield "valid", pack(raw)
    yield "float32 relevance", pack(raw, use_single_float=True)
    yield "unsorted metadata", pack([*raw[:5], dict(reversed(list(raw[5].items())))])
    inner = {**raw[5], "alpha": dict(reversed(list(raw[5]["alpha"].items())))}
    yield "unsorted nested metadata", pack([*raw[:5], inner])
    swapped = [list(a) for a in raw[2]]
    swapped[1][1] = [*swapped[1][1][:3], ["b", "a"]]
    yield "unsorted constraints", pack([*raw[:2], swapped, *raw[3:]])
    swapped[1][1] = [*swapped[1][1][:3], ["a", "a"]]
    yield "repeated constraint", pack([*raw[:2], swapped, *raw[3:]])
    data = encode_context(root(note=5))
    yield "non-shortest integer", data[:-1] + b"\xcc\x05"
    draw = raw_of(base)
    yield "removed reversed", pack([*draw[:4], list(reversed(draw[4])), draw[5]])
    yield "removed repeated", pack([*draw[:4], sorted(draw[4] + draw[4][:1]), draw[5]])
    yield "removed as text", pack([*draw[:4], [r.hex() for r in draw[4]], draw[5]])
    yield "base as text", pack([draw[0], draw[1].hex(), *draw[2:]])
    yield "base short", pack([draw[0], draw[1][:31], *draw[2:]])
    # The atom index keeps an id once: a repeat in a delta is valid.
    yield "repeated atom", pack([*raw[:2], [raw[2][0], raw[2][0]], *raw[3:]])


@pytest.mark.parametrize("name,data", list(_raw_sample_edits()), ids=lambda v: v if isinstance(v, str) else "")
def test_hand_made_non_canonical_contexts(name, data):
    assert agree(data) == (name in ("valid", "repeated atom"))


@pytest.mark.parametrize("data,valid", [
    (one_atom(), True),
    (one_atom(relevance=0.0), True),
    (one_atom(relevance=-0.0), False),
    (one_atom(relevance=-1.0), False),
    (one_atom(relevance=float("nan")), False),
    (one_atom(relevance=float("inf")), False),
    (one_atom(relevance=7.5), True),  # above 1: old contexts still decode
    (one_atom(relevance=1), False),
    (one_atom(relevance=True), False),
    (one_atom(ts=MIN_US), True),
    (one_atom(ts=MIN_US - 1), False),
    (one_atom(ts=MAX_US), True),
    (one_atom(ts=MAX_US + 1), False),
    (one_atom(ts=2**64 - 1), False),
    (one_atom(ts=-(2**63)), False),
    (one_atom(ts=True), False),
    (one_atom(ts=1.0), False),
    (one_atom(content=b"x"), False),
    (one_atom(content=1), False),
    (one_atom(source=None), False),
    (one_atom(content=""), True),
    (one_atom(type_raw=("", "STAR", [], [])), False),
    (one_atom(type_raw=("S", "NOPE", [], [])), False),
    (one_atom(type_raw=("S", "STAR", [], [1])), False),
    (one_atom(type_raw=("S", "STAR", [], ["b", "a"])), False),
    (one_atom(type_raw=("S", "STAR", [], ["a", "b"])), True),
    (one_atom(type_raw=("S", "STAR", [["P", "STAR", [], []]], [])), True),
    (one_atom(type_raw=("S", "STAR", [["P", "STAR", []]], [])), False),
    (one_atom(type_raw=("S", "STAR", [], [])[:3]), False),
    (one_atom(type_raw={"name": "S"}), False),
    (one_atom(type_raw="String"), False),
    (one_atom(type_raw=None), False),
    (one_atom(metadata={"k": b"bytes"}), False),
    (one_atom(metadata={"k": float("nan")}), False),
    (one_atom(metadata={"k": [1, -0.0, None, True, "s", {"a": {}}]}), True),
    (one_atom(metadata={b"k": 1}), False),
    (one_atom(metadata={"b": 1, "a": 2}), False),
    (one_atom(metadata={"a": 1, "b": 2, "é": 3, "z": 4}), False),  # é sorts after z
    (one_atom(metadata={"a": 1, "b": 2, "z": 3, "é": 4}), True),
    (one_atom(metadata=nested(MAX_METADATA_DEPTH)), True),
    (one_atom(metadata=nested(MAX_METADATA_DEPTH + 1)), False),
    (one_atom(metadata=nested(MAX_METADATA_DEPTH - 1, [1])), True),
    (one_atom(metadata=nested(MAX_METADATA_DEPTH, [1])), False),
    (one_atom(metadata=[]), False),
    (one_atom(molecules=[[[], {"r": [[0, 0]]}, ["S", "STAR", [], []], {}]]), True),
    (one_atom(molecules=[[[], {"r": [[0, -1]]}, ["S", "STAR", [], []], {}]]), False),
    (one_atom(molecules={}), False),
    (one_atom(removed=[b"\x01" * 32], base=b"\x02" * 32), True),
    (one_atom(removed=[b"\x01" * 32]), True),  # a root that removes: old contexts still decode
    (one_atom(removed={}), False),
    (pack([1, None, [["x", ["S", "STAR", [], []], 0, "s"]], [], [], {}]), False),
    (pack([1, None, ["x"], [], [], {}]), False),
    (pack([1, None, [], [], [], {}]), True),
    (pack([1, None, [], [], [], {}, None]), False),
    (pack([2, None, [], [], [], {}]), False),
    (pack([True, None, [], [], [], {}]), False),
    (pack([1, None, [], [], [], {"d": msgpack.ExtType(1, b"x")}]), False),
    (pack([1, None, [], [], [], {}]) + b"\x00", False),
    (b"\x96\x01\xc0\x90\x90\x90\x81\xa1k" + b"\x91" * 40 + b"\xc0", False),
    (b"\x91" * 5000 + b"\xc0", False),
    (_nested_type_bytes(16), False),
    (_nested_type_bytes(15), True),
    (_nested_type_bytes(490), False),
    (b"\x96\x01\xc0\x91\x95\xa2\xff\xfe", False),
    (b"", False),
])
def test_hand_made_atoms_types_and_metadata(data, valid):
    assert agree(data) == valid


def test_a_non_shortest_timestamp_or_a_float64_spelled_otherwise_is_refused():
    good = one_atom(ts=5, relevance=0.5)
    assert agree(good)
    at = good.index(b"\x05\xa1s")
    assert not agree(good[:at] + b"\xd0\x05" + good[at + 1:])  # int8 5 for fixint 5
    float_at = good.index(b"\xcb" + struct.pack(">d", 0.5))
    assert not agree(good[:float_at] + b"\xca" + struct.pack(">f", 0.5) + good[float_at + 9:])


def test_the_type_cache_keeps_only_small_types_and_only_so_many(monkeypatch):
    monkeypatch.setattr(rawcheck, "_types", {})
    monkeypatch.setattr(rawcheck, "_TYPE_CACHE_ENTRIES", 3)
    big = ("S", "STAR", [], sorted(f"c{i:04}" for i in range(200)))
    assert agree(one_atom(type_raw=big))
    assert rawcheck._types == {}
    for n in range(5):
        assert agree(one_atom(type_raw=(f"T{n}", "STAR", [], [])))
    assert len(rawcheck._types) == 3
    # An invalid type is never remembered, and a valid one still refuses a
    # non-canonical spelling of itself.
    assert not agree(one_atom(type_raw=("T0", "STAR", [], ["b", "a"])))
    assert not agree(one_atom(type_raw=("T0", "STAR", [], ["b", "a"])))
    assert len(rawcheck._types) == 3


def test_molecules_take_the_models_path():
    ctx = root(atom("a"), molecules=[molecule(atom("m"), relations={"r": [(0, 0)]})])
    assert agree(encode_context(ctx))


@PROPERTY
@given(contexts)
def test_the_rules_for_new_contexts_are_judged_as_the_model_judges_them(ctx):
    try:
        check_new_context(ctx)
        accepted = True
    except ValueError:
        accepted = False
    assert check_context_bytes(encode_context(ctx)).meets_new_context_rules() == accepted


@pytest.mark.parametrize("ctx,accepted", [
    (root(atom("a", 1.0)), True),
    (root(atom("a", 1.0000001)), False),
    (root(), False),
    (root(removed=["11" * 32]), False),
    (root(atom("a"), removed=["11" * 32]), False),
    (root(molecules=[molecule(atom("m", 0.5))]), True),
    (root(molecules=[molecule(atom("m", 1.5))]), False),
    (delta("11" * 32), True),
    (delta("11" * 32, removed=["22" * 32]), True),
    (delta("11" * 32, atom("a", 2.0)), False),
])
def test_the_rules_for_new_contexts_on_hand_made_cases(ctx, accepted):
    assert check_context_bytes(encode_context(ctx)).meets_new_context_rules() == accepted
