"""Tests for sync.refs: the signed ref update (encoding, strict decoding,
names) and the multi-value register, with a convergence property test and
the test vector of docs/protocol.md, section 10."""

from __future__ import annotations

import functools
import hashlib
import random
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import attrs
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import atom, delta, linear_chain, molecule, root
from sync import refs
from sync.codec import DecodeError, decode_context, encode_context
from sync.refs import (
    MAX_REF_UPDATE_BYTES,
    MAX_SUPERSEDES,
    SIGNING_PREFIX,
    InvalidRefUpdate,
    RefTable,
    RefUpdate,
    check_ref_name,
    decode_update,
    encode_update,
    is_ref_update_bytes,
    make_update,
    signing_input,
    supersede_all,
    update_id,
    updates_for_write,
    verify_update,
)

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONVERGENCE = settings(PROPERTY, max_examples=300)

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc)
KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([n + 1]) * 32) for n in range(4)]


def cid(n: int) -> str:
    """A stand-in context id: refs only ever see targets as ids."""
    return hashlib.sha256(f"context {n}".encode()).hexdigest()


def update(name="main", target=cid(1), supersedes=(), key=KEYS[0], time=T0) -> RefUpdate:
    return make_update(name=name, target=target, supersedes=supersedes, key=key, time=time)


def public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def signed_bytes(unsigned: list, key: Ed25519PrivateKey) -> bytes:
    """Bytes of an update with any first eight items, validly signed by `key`,
    so that a refusal is for the rule under test, not for the signature."""
    return msgpack.packb([*unsigned, key.sign(SIGNING_PREFIX + msgpack.packb(unsigned))])


def unsigned_raw(*, name="main", target=cid(1), supersedes=(), key=KEYS[0], node_key=None, time_us=0) -> list:
    node_id = hashlib.sha256(public(node_key or key)).digest()
    return [
        "ref",
        1,
        name,
        None if target is None else bytes.fromhex(target),
        [bytes.fromhex(i) if isinstance(i, str) else i for i in supersedes],
        node_id,
        time_us,
        public(key),
    ]


# --------------------------------------------------------------------------
# encoding and ids
# --------------------------------------------------------------------------


def test_round_trip_and_id_is_sha256_of_the_bytes():
    u = update(supersedes=[cid(3), cid(2)])
    data = encode_update(u)
    assert decode_update(data) == u
    assert u.id == update_id(u) == hashlib.sha256(data).hexdigest()
    assert u.supersedes == tuple(sorted([cid(2), cid(3)]))
    assert u.node_id == hashlib.sha256(public(KEYS[0])).hexdigest()


def test_deletion_round_trips_with_nil_target():
    u = update(target=None)
    assert u.is_deletion
    assert decode_update(encode_update(u)).target is None


def test_time_keeps_microseconds_and_becomes_utc():
    local = datetime(2026, 11, 24, 11, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    u = update(time=local)
    assert u.time == local and u.time.tzinfo is timezone.utc
    assert decode_update(encode_update(u)).time == local


def test_naive_time_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        update(time=datetime(2026, 11, 24))


def test_signature_covers_the_first_eight_items_after_the_prefix():
    u = update()
    data = encode_update(u)
    # The same array without its last item: header 0x99 -> 0x98, minus `c4 40` + 64 bytes.
    assert signing_input(u) == SIGNING_PREFIX + b"\x98" + data[1:-66]
    assert data[-64:] == u.signature
    public_key = KEYS[0].public_key()
    public_key.verify(u.signature, signing_input(u))  # raises if not


def test_the_largest_valid_update_fits_the_byte_bound():
    latest = datetime.max.replace(tzinfo=timezone.utc)
    u = update(name="n" * 200, supersedes=[f"{i:064x}" for i in range(MAX_SUPERSEDES)], time=latest)
    data = encode_update(u)
    assert len(data) <= MAX_REF_UPDATE_BYTES
    assert decode_update(data) == u


CONTEXTS = [
    root(atom("a")),
    root(),
    delta(root(atom("a")), atom("b"), removed=[atom("a").content_hash]),
    root(atom("x"), molecules=[molecule(atom("y"), relations={"r": [(0, 0)]})], tag="ref"),
    *linear_chain(3),
]


@pytest.mark.parametrize("ctx", CONTEXTS)
def test_contexts_and_ref_updates_are_told_apart(ctx):
    data = encode_context(ctx)
    assert not is_ref_update_bytes(data)
    with pytest.raises(InvalidRefUpdate, match="not a ref update"):
        decode_update(data)


def test_ref_update_bytes_are_recognised_and_are_no_context():
    data = encode_update(update())
    assert is_ref_update_bytes(data)
    assert is_ref_update_bytes(memoryview(data))
    assert not is_ref_update_bytes(b"") and not is_ref_update_bytes(data[:4])
    with pytest.raises(DecodeError):
        decode_context(data)


# --------------------------------------------------------------------------
# strict decoding
# --------------------------------------------------------------------------


def test_non_canonical_bytes_are_refused():
    data = encode_update(update())
    # "main" as str8 (d9 04) instead of fixstr (a4): the same values, longer bytes.
    longer = data.replace(b"\xa4main", b"\xd9\x04main", 1)
    assert longer != data
    with pytest.raises(InvalidRefUpdate, match="not in canonical form"):
        decode_update(longer)


def test_a_flipped_signature_bit_is_refused():
    data = bytearray(encode_update(update()))
    data[-1] ^= 1
    with pytest.raises(InvalidRefUpdate, match="signature does not verify"):
        decode_update(bytes(data))


def test_every_single_byte_change_is_refused():
    data = encode_update(update(supersedes=[cid(9)]))
    for position in range(len(data)):
        for flip in (0x01, 0x80):
            tampered = bytearray(data)
            tampered[position] ^= flip
            with pytest.raises(InvalidRefUpdate):
                decode_update(bytes(tampered))


@pytest.mark.parametrize(
    "field, value",
    [
        ("name", "other"),
        ("target", cid(2)),
        ("target", None),
        ("supersedes", (cid(5),)),
        ("time", T0 + timedelta(microseconds=1)),
    ],
)
def test_a_changed_field_breaks_the_signature(field, value):
    forged = attrs.evolve(update(), **{field: value})
    with pytest.raises(InvalidRefUpdate, match="signature does not verify"):
        decode_update(encode_update(forged))


def test_one_member_cannot_write_as_another():
    # Signed by key 0, claiming key 1's public key and node id.
    unsigned = unsigned_raw(key=KEYS[1])
    forged = msgpack.packb([*unsigned, KEYS[0].sign(SIGNING_PREFIX + msgpack.packb(unsigned))])
    with pytest.raises(InvalidRefUpdate, match="signature does not verify"):
        decode_update(forged)


def test_node_id_must_be_the_hash_of_the_public_key():
    with pytest.raises(InvalidRefUpdate, match="node_id: expected the SHA-256 of public_key"):
        decode_update(signed_bytes(unsigned_raw(node_key=KEYS[1]), KEYS[0]))
    with pytest.raises(ValueError, match="node_id is not the SHA-256 of public_key"):
        attrs.evolve(update(), node_id=hashlib.sha256(public(KEYS[1])).hexdigest())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "n" * 201}, "201 bytes in UTF-8; the limit is 200"),
        ({"name": "../x"}, "'.' and '..'"),
        ({"supersedes": [f"{i:064x}" for i in range(MAX_SUPERSEDES + 1)]}, f"at most {MAX_SUPERSEDES} ids"),
        ({"supersedes": sorted([cid(1), cid(2)], reverse=True)}, "sorted and unique"),
        ({"supersedes": [cid(1), cid(1)]}, "sorted and unique"),
        ({"supersedes": [b"short"]}, "32-byte ids"),
        ({"time_us": 2**62}, "outside the years 1 to 9999"),
        ({"time_us": 1.5}, "time: expected an integer"),
    ],
)
def test_validly_signed_but_invalid_updates_are_refused(changes, message):
    with pytest.raises(InvalidRefUpdate, match=re.escape(message)):
        decode_update(signed_bytes(unsigned_raw(**changes), KEYS[0]))


def test_wrong_shapes_are_refused_with_one_line():
    good = unsigned_raw()
    cases = [
        (["ref", 2, *good[2:]], "format 1"),
        (["ref", True, *good[2:]], "format 1"),
        ([*good[:3], b"\x00" * 31, *good[4:]], "target: expected nil or a 32-byte id"),
        ([*good[:2], b"main", *good[3:]], "name: expected a string"),
        ([*good[:7], public(KEYS[0])[:31]], "public_key: expected 32 bytes"),
    ]
    for unsigned, message in cases:
        with pytest.raises(InvalidRefUpdate, match=re.escape(message)) as info:
            decode_update(signed_bytes(unsigned, KEYS[0]))
        assert "\n" not in str(info.value)
    data = encode_update(update())
    for bad, message in [
        (data[:-1], "not valid MessagePack"),
        (data + b"\x00", "not valid MessagePack"),
        (b"\x99\xa3ref" + b"\x00" * (MAX_REF_UPDATE_BYTES), "the limit is"),
        (msgpack.packb(["ref", 1]), "not a ref update"),
        (msgpack.packb(["reg", *good[1:], bytes(64)]), "not a ref update"),
    ]:
        with pytest.raises(InvalidRefUpdate, match=message):
            decode_update(bad)


def test_verify_false_skips_only_the_costly_checks():
    data = bytearray(encode_update(update()))
    data[-1] ^= 1
    unverified = decode_update(bytes(data), verify=False)
    with pytest.raises(InvalidRefUpdate, match="signature"):
        verify_update(unverified)


@given(st.binary(max_size=300))
@PROPERTY
def test_random_bytes_after_the_tag_raise_only_invalid_ref_update(tail):
    try:
        decode_update(b"\x99\xa3ref" + tail)
    except InvalidRefUpdate as exc:
        assert "\n" not in str(exc)


def test_constructor_bounds_supersedes():
    with pytest.raises(ValueError, match=f"the limit is {MAX_SUPERSEDES}"):
        update(supersedes=[f"{i:064x}" for i in range(MAX_SUPERSEDES + 1)])
    with pytest.raises(ValueError, match="64 lowercase hex"):
        update(supersedes=["ABC"])
    with pytest.raises(TypeError, match="not one string"):
        update(supersedes=cid(1))
    assert update(supersedes=[cid(1), cid(1)]).supersedes == (cid(1),)


# --------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------


VALID_NAMES = ["main", "projects/ctxfs", "team-a/notes_2", "a", "my_notes", "é/日本", "x.y", "..x/y..", "a-", "n" * 200]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_pass_unchanged(name):
    assert check_ref_name(name) == name


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "must not be empty"),
        ("..", "'.' and '..'"),
        (".", "'.' and '..'"),
        ("a/../b", "'.' and '..'"),
        ("a/.", "'.' and '..'"),
        ("-main", "must not start with '-'"),
        ("/main", "must not start or end with '/'"),
        ("main/", "must not start or end with '/'"),
        ("a//b", "contain '//'"),
        ("ma\nin", "control character U+000A at position 2"),
        ("main\x00", "control character U+0000"),
        ("ma\x7fin", "control character U+007F"),
        ("ab\u202ecd", "control character U+202E"),
        ("a\u2028b", "control character U+2028"),
        (" main", "must not start or end with whitespace"),
        ("my notes", "' ' at position 2 is reserved"),
        ("main~1", "'~' at position 4 is reserved"),
        ("a:b", "':' at position 1 is reserved"),
        ("x#y", "'#' at position 1 is reserved"),
        ("main\u3000", "must not start or end with whitespace"),
        ("n" * 201, "201 bytes in UTF-8; the limit is 200"),
        ("é" * 101, "202 bytes in UTF-8; the limit is 200"),
        ("a\ud800", "not valid Unicode"),
        (b"main", "must be a string"),
    ],
)
def test_invalid_names_get_one_clear_line(name, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        check_ref_name(name)
    assert "\n" not in str(info.value)


def test_updates_check_their_name():
    with pytest.raises(ValueError, match="'.' and '..'"):
        update(name="..")


# --------------------------------------------------------------------------
# the register
# --------------------------------------------------------------------------


def test_no_updates_no_ref():
    table = RefTable()
    assert table.value("main") is None
    assert table.frontier("main") == [] and table.log("main") == []
    assert supersede_all(table, "main") == [] and table.names() == []


def test_a_single_set_is_the_value():
    u = update(target=cid(1))
    table = RefTable([u])
    value = table.value("main")
    assert (value.target, value.conflict, value.candidates) == (cid(1), False, (cid(1),))
    assert (value.updated, value.node_id, value.update_id, value.frontier_ids) == (T0, u.node_id, u.id, (u.id,))
    assert table.names() == ["main"]


def test_adding_twice_changes_nothing():
    u = update()
    table = RefTable()
    assert table.add(u) is True
    assert table.add(decode_update(encode_update(u))) is False
    assert len(table) == 1 and u.id in table and table.get(u.id) == u
    assert table.log("main") == [u]


def test_concurrent_sets_are_a_conflict_won_by_the_latest():
    a = update(target=cid(1), key=KEYS[0], time=T0)
    b = update(target=cid(2), key=KEYS[1], time=T0 + timedelta(seconds=1))
    value = RefTable([a, b]).value("main")
    assert value.conflict
    assert value.candidates == tuple(sorted([cid(1), cid(2)]))
    assert (value.target, value.node_id, value.updated) == (cid(2), b.node_id, b.time)
    assert value.frontier_ids == tuple(sorted([a.id, b.id]))


def test_equal_times_are_won_by_the_highest_id():
    a = update(target=cid(1), key=KEYS[0])
    b = update(target=cid(2), key=KEYS[1])
    assert RefTable([a, b]).value("main").update_id == max(a.id, b.id)


def test_concurrent_sets_of_one_target_are_no_conflict():
    a = update(target=cid(1), key=KEYS[0])
    b = update(target=cid(1), key=KEYS[1], time=T0 + timedelta(seconds=1))
    value = RefTable([a, b]).value("main")
    assert not value.conflict and value.candidates == (cid(1),)
    assert value.update_id == b.id and len(value.frontier_ids) == 2


def test_a_new_set_over_the_frontier_resolves_a_conflict():
    a = update(target=cid(1), key=KEYS[0])
    b = update(target=cid(2), key=KEYS[1])
    table = RefTable([a, b])
    assert supersede_all(table, "main") == sorted([a.id, b.id])
    [c] = updates_for_write(table=table, name="main", target=cid(2), key=KEYS[0], time=T0)
    table.add(c)
    value = table.value("main")
    assert not value.conflict and value.target == cid(2) and value.frontier_ids == (c.id,)
    assert [u.id for u in table.log("main")] == sorted([a.id, b.id, c.id], reverse=True)


def test_a_delete_removes_the_ref_and_a_later_set_brings_it_back():
    a = update(target=cid(1))
    gone = update(target=None, supersedes=[a.id], time=T0 + timedelta(seconds=1))
    table = RefTable([a, gone])
    assert table.value("main") is None
    assert table.names() == [] and table.names(include_deleted=True) == ["main"]
    assert table.frontier("main") == [gone]
    back = update(target=cid(3), supersedes=supersede_all(table, "main"), time=T0 + timedelta(seconds=2))
    table.add(back)
    assert table.value("main").target == cid(3)
    assert table.log("main") == [back, gone, a]


def test_concurrent_deletes_leave_no_ref():
    a = update(target=cid(1))
    d1 = update(target=None, supersedes=[a.id], key=KEYS[0])
    d2 = update(target=None, supersedes=[a.id], key=KEYS[1])
    table = RefTable([a, d1, d2])
    assert table.value("main") is None
    assert supersede_all(table, "main") == sorted([d1.id, d2.id])


def test_a_set_concurrent_with_a_delete_wins_without_conflict():
    a = update(target=cid(1))
    deleted = update(target=None, supersedes=[a.id], key=KEYS[0], time=T0 + timedelta(hours=1))
    moved = update(target=cid(2), supersedes=[a.id], key=KEYS[1])
    value = RefTable([a, deleted, moved]).value("main")
    assert (value.target, value.conflict, value.candidates) == (cid(2), False, (cid(2),))
    assert value.frontier_ids == tuple(sorted([deleted.id, moved.id]))


def test_an_update_may_arrive_before_those_it_supersedes():
    a = update(target=cid(1), key=KEYS[0])
    b = update(target=cid(2), key=KEYS[1])
    c = update(target=cid(3), supersedes=[a.id, b.id], time=T0 - timedelta(days=1))
    table = RefTable([c])
    table.add(b)
    table.add(a)
    assert table.frontier("main") == [c]
    value = table.value("main")
    assert value.target == cid(3) and not value.conflict


def test_supersession_counts_only_within_a_name():
    a = update(name="a", target=cid(1))
    stray = update(name="b", target=cid(2), supersedes=[a.id])
    for table in (RefTable([a, stray]), RefTable([stray, a])):
        assert table.value("a").target == cid(1)
        assert table.value("b").target == cid(2)
        assert table.names() == ["a", "b"]


def test_frontier_and_log_are_newest_first():
    old = update(target=cid(1), key=KEYS[0], time=T0)
    new = update(target=cid(2), key=KEYS[1], time=T0 + timedelta(seconds=5))
    table = RefTable([old, new])
    assert table.frontier("main") == [new, old]
    assert table.log("main") == [new, old]


def test_a_frontier_beyond_the_bound_is_superseded_by_a_chain(monkeypatch):
    monkeypatch.setattr(refs, "MAX_SUPERSEDES", 3)
    table = RefTable(update(target=cid(n), time=T0 + timedelta(seconds=n)) for n in range(8))
    assert len(table.frontier("main")) == 8
    chain = updates_for_write(table=table, name="main", target=cid(99), key=KEYS[1], time=T0)
    assert len(chain) == 4  # 3, then 2 + the previous, and so on
    assert all(len(u.supersedes) <= 3 for u in chain)
    for u in chain:
        table.add(u)
    assert table.frontier("main") == [chain[-1]]
    assert table.value("main").target == cid(99)


# --------------------------------------------------------------------------
# convergence: any delivery order gives every node the same refs
# --------------------------------------------------------------------------

NAMES = ("main", "projects/x", "b")
TARGETS = (cid(1), cid(2), cid(3), None)
TIMES = (T0, T0 + timedelta(seconds=1), T0 - timedelta(seconds=1))

nodes = st.integers(0, len(KEYS) - 1)
writes = st.tuples(
    st.just("write"),
    nodes,
    st.sampled_from(NAMES),
    st.sampled_from(TARGETS),
    st.sampled_from(TIMES),
    st.booleans(),  # also supersede a stray id (another name's update)
)
deliveries = st.tuples(st.just("deliver"), nodes, nodes, st.integers(0, 2**32))


@functools.lru_cache(maxsize=None)
def received(data: bytes) -> RefUpdate:
    """A receiver's decode; cached, as every node would get the same result."""
    return decode_update(data)


def snapshot(table: RefTable) -> dict:
    return {
        name: (table.value(name), [u.id for u in table.frontier(name)], [u.id for u in table.log(name)])
        for name in table.names(include_deleted=True)
    }


def brute_force_frontier(table: RefTable, name: str) -> set[str]:
    mine = table.log(name)
    superseded = {old for u in mine for old in u.supersedes}
    return {u.id for u in mine if u.id not in superseded}


@given(st.integers(2, len(KEYS)), st.lists(st.one_of(writes, deliveries), max_size=40), st.integers(0, 2**32))
@CONVERGENCE
def test_any_interleaving_of_writes_and_deliveries_converges(k, steps, final_seed):
    tables = [RefTable() for _ in range(k)]
    held: list[dict[str, bytes]] = [{} for _ in range(k)]

    def receive(node: int, data: bytes) -> None:
        u = received(data)
        tables[node].add(u)
        held[node][u.id] = data

    for step in steps:
        if step[0] == "write":
            _, node, name, target, time, stray = step
            node %= k
            table = tables[node]
            extra = [u.id for other in NAMES if other != name for u in table.log(other)][:1] if stray else []
            supersedes = supersede_all(table, name) + extra
            u = make_update(name=name, target=target, supersedes=supersedes, key=KEYS[node], time=time)
            receive(node, encode_update(u))
            # A writer reads its own write: one frontier update, no conflict.
            value = table.value(name)
            assert table.frontier_ids(name) == [u.id]
            assert (value is None) if target is None else (value.target == target and not value.conflict)
        else:
            _, source, dest, seed = step
            rng = random.Random(seed)
            pool = list(held[source % k].values())
            for data in rng.sample(pool, rng.randint(0, len(pool))):
                receive(dest % k, data)

    everything = sorted({data for node_held in held for data in node_held.values()})
    rng = random.Random(final_seed)
    for node in range(k):
        for data in rng.sample(everything, len(everything)):
            receive(node, data)

    expected = snapshot(tables[0])
    for table in tables:
        assert snapshot(table) == expected
        for name in NAMES:
            assert set(table.frontier_ids(name)) == brute_force_frontier(table, name)


# --------------------------------------------------------------------------
# the test vector of docs/protocol.md, section 10
# --------------------------------------------------------------------------

DOC = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
VECTOR_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
VECTOR_TARGET = "8dfb95f65e6c131882729661ea434de146d4b6c8b3fe1c2d2f20fe8d5e4111b8"


def _doc_vector() -> tuple[bytes, str]:
    section = DOC[DOC.index("## 10. Ref updates") :]
    pattern = r"encode to the (\d+) bytes\n\n```\n([0-9a-f\n]+)```\n\nand have the update id\n`([0-9a-f]{64})`"
    match = re.search(pattern, section)
    assert match is not None, "the ref update vector is missing from docs/protocol.md"
    data = bytes.fromhex(match.group(2).replace("\n", ""))
    assert len(data) == int(match.group(1))
    return data, match.group(3)


def test_doc_vector_is_what_make_update_writes():
    data, expected_id = _doc_vector()
    u = make_update(name="main", target=VECTOR_TARGET, supersedes=["11" * 32], key=VECTOR_KEY, time=T0)
    assert encode_update(u) == data
    assert u.id == expected_id


def test_doc_vector_decodes_and_verifies():
    data, expected_id = _doc_vector()
    u = decode_update(data)
    assert (u.name, u.target, u.supersedes, u.time) == ("main", VECTOR_TARGET, ("11" * 32,), T0)
    assert u.public_key == public(VECTOR_KEY)
    assert update_id(u) == expected_id
    assert VECTOR_TARGET in DOC[: DOC.index("## 10. Ref updates")]  # section 9's context id


def test_doc_states_the_signing_prefix_and_bounds():
    section = DOC[DOC.index("## 10. Ref updates") :]
    assert SIGNING_PREFIX.hex(" ") in section
    assert f"at most {MAX_SUPERSEDES}" in section
    assert f"1–{refs.MAX_REF_NAME_BYTES} bytes of UTF-8" in section
    assert f"at most {MAX_REF_UPDATE_BYTES // 1024} KiB" in section
