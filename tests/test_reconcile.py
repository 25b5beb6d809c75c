"""Tests for sync.idset (roots, prefix queries) and sync.reconcile (the protocol)."""

from __future__ import annotations

import hashlib
import random

import attrs
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync import reconcile as rc
from sync.idset import EMPTY_HASH, LEAF_MAX, IdSet
from sync.reconcile import (
    FP_BYTES,
    MAX_COUNT,
    MAX_ITEMS,
    MAX_PAYLOAD,
    Fingerprint,
    IdList,
    Need,
    ReconcileError,
    ReconcileStart,
    ReconcileStateError,
    ReconcileStep,
    Reconciler,
    Split,
    from_wire,
    to_wire,
)

FRAME_HEADER = 10


def make_ids(rng: random.Random, k: int, shared_bytes: int = 0) -> list[bytes]:
    """k distinct ids; with shared_bytes > 0 they all start with the same bytes (a deep trie)."""
    head = rng.randbytes(shared_bytes)
    out: set[bytes] = set()
    while len(out) < min(k, 256 ** (32 - shared_bytes)):
        out.add(head + rng.randbytes(32 - shared_bytes))
    return sorted(out)


def run(a: IdSet, b: IdSet, *, nonce: bytes = b"nonce", limit: int = 10_000):
    """Reconcile a (initiator) with b through the wire form; return both sides and bytes per message."""
    alice, bob = Reconciler(a, initiator=True, nonce=nonce), Reconciler(b, initiator=False)
    sizes = []
    msg, receiver, other = alice.initial_message(), bob, alice
    while msg is not None:
        packed = msgpack.packb(to_wire(msg))
        sizes.append(len(packed) + FRAME_HEADER)
        assert len(packed) < 1024 * 1024
        msg = receiver.receive(from_wire(msgpack.unpackb(packed)))
        receiver, other = other, receiver
        assert len(sizes) < limit
    return alice, bob, sizes


def assert_reconciled(alice, bob, a_ids, b_ids) -> None:
    only_a, only_b = set(a_ids) - set(b_ids), set(b_ids) - set(a_ids)
    assert alice.done and bob.done
    assert alice.to_send == only_a and alice.to_request == only_b
    assert bob.to_send == only_b and bob.to_request == only_a


@st.composite
def set_pairs(draw):
    rng = random.Random(draw(st.integers(0, 2**32)))
    shared_bytes = draw(st.sampled_from([0, 0, 0, 2, 8, 30, 31]))
    n_both = draw(st.integers(0, 1800))
    n_a = draw(st.sampled_from([0, 1, 2, 3, 5, 40]) | st.integers(0, 200))
    n_b = draw(st.sampled_from([0, 1, 2, 3, 5, 40]) | st.integers(0, 200))
    pool = make_ids(rng, n_both + n_a + n_b, shared_bytes)
    rng.shuffle(pool)
    both, only_a, only_b = pool[:n_both], pool[n_both : n_both + n_a], pool[n_both + n_a : n_both + n_a + n_b]
    return both + only_a, both + only_b


# -- IdSet: the root ---------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 400), st.sampled_from([0, 1, 30]))
def test_root_is_order_independent_and_incremental(seed, k, shared_bytes):
    rng = random.Random(seed)
    ids = make_ids(rng, k, shared_bytes)
    fresh = IdSet(ids)
    one_by_one = IdSet()
    for x in rng.sample(ids, len(ids)):
        assert one_by_one.add(x)
    chunked = IdSet()
    shuffled = rng.sample(ids, len(ids))
    for i in range(0, len(shuffled), 37):
        chunked.add_many(shuffled[i : i + 37] + shuffled[: i // 2])  # with repeats
    assert fresh.root() == one_by_one.root() == chunked.root()
    assert len(fresh) == len(one_by_one) == len(chunked) == len(ids)
    assert list(one_by_one) == list(chunked) == sorted(ids)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 300), st.sampled_from([0, 30, 31]))
def test_root_changes_when_one_id_changes(seed, k, shared_bytes):
    rng = random.Random(seed)
    ids = make_ids(rng, k + 1, shared_bytes)
    spare, ids = ids[-1], ids[:-1]
    s = IdSet(ids)
    root = s.root()
    swapped = IdSet(ids[1:] + [spare])
    assert swapped.root() != root
    assert IdSet(ids[1:]).root() != root
    assert IdSet(ids + [spare]).root() != root
    assert s.root_with(add=[spare], remove=[ids[0]]) == swapped.root()
    assert s.root() == root  # root_with mutates nothing


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.lists(st.tuples(st.booleans(), st.integers(0, 199)), max_size=400),
       st.sampled_from([0, 31]))
def test_incremental_changes_match_a_fresh_build(seed, ops, shared_bytes):
    pool = make_ids(random.Random(seed), 200, shared_bytes)
    s, ref = IdSet(), set()
    for adding, i in ops:
        x = pool[i % len(pool)]
        if adding:
            assert s.add(x) == (x not in ref)
            ref.add(x)
        else:
            assert s.discard(x) == (x in ref)
            ref.discard(x)
        assert len(s) == len(ref)
    assert s.root() == IdSet(ref).root()
    assert list(s) == sorted(ref)
    assert [x in s for x in pool] == [x in ref for x in pool]
    assert s.root_with(add=set(pool) - ref, remove=ref) == IdSet(set(pool) - ref).root()


def test_empty_and_single():
    s = IdSet()
    assert s.root() == EMPTY_HASH and len(s) == 0 and list(s) == []
    x = hashlib.sha256(b"x").digest()
    s.add(x)
    assert s.root() != EMPTY_HASH and x in s and b"short" not in s
    s.discard(x)
    assert s.root() == EMPTY_HASH


def test_membership_needs_an_id_on_a_boundary_of_its_leaf():
    # In a leaf's concatenated ids, the bytes straddling two neighbours
    # (or spanning a run of equal bytes) are no id.
    a, b = bytes(range(32)), bytes(range(1, 33))
    s = IdSet([a, b])
    assert a in s and b in s
    assert a[16:] + b[:16] not in s and a[1:] + b[:1] not in s
    repeated = b"\x07" * 32
    s = IdSet([b"\x07" * 31 + b"\x00", repeated, b"\x07" * 31 + b"\x09"])
    assert repeated in s and b"\x07" * 31 + b"\x08" not in s
    s.discard(repeated)
    assert repeated not in s  # it still occurs off the boundaries: 07 * 31 + 09 follows 07 * 31 + 00 ... 07
    assert b"\x07" * 32 not in IdSet([b"\x01" + b"\x07" * 31, b"\x07" * 31 + b"\x08"])


def test_bad_ids_are_refused():
    s = IdSet()
    for bad in (b"x" * 31, b"x" * 33, "x" * 32, bytearray(32)):
        with pytest.raises((ValueError, TypeError)):
            s.add(bad)
        with pytest.raises((ValueError, TypeError)):
            s.add_many([bad])
    with pytest.raises(ValueError):
        s.count("g")
    with pytest.raises(ValueError):
        s.count("A")


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 600), st.sampled_from([0, 1, 30]))
def test_prefix_queries_see_only_the_ids_under_the_prefix(seed, k, shared_bytes):
    """What reconciliation relies on: a prefix's hash depends on the ids under it alone."""
    rng = random.Random(seed)
    ids = make_ids(rng, k, shared_bytes)
    s = IdSet(ids)
    probes = {""} | {x.hex()[:n] for x in rng.sample(ids, min(5, k)) for n in (1, 2, 3, 4, 61, 63, 64)}
    probes |= {rng.randbytes(32).hex()[: rng.randint(1, 6)] for _ in range(5)}
    for p in probes:
        under = [x for x in ids if x.hex().startswith(p)]
        alone = IdSet(under)
        assert list(s.ids(p)) == under
        assert s.summary(p) == (len(under), alone.prefix_hash(p)) == (alone.count(p), alone.prefix_hash(p))
        if len(p) < 64:
            assert s.children(p) == [s.summary(p + d) for d in "0123456789abcdef"]


def test_bulk_build_matches_reverse_order():
    # Not a timing assertion (style: tests never assert on wall-clock time);
    # it checks the bulk path at a size where a quadratic step would hang.
    blob = random.Random(7).randbytes(32 * 200_000)
    ids = [blob[i : i + 32] for i in range(0, len(blob), 32)]
    s = IdSet(ids)
    assert len(s) == len(ids) and s.root() == IdSet(reversed(ids)).root()


# -- reconciliation ----------------------------------------------------------------------


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(set_pairs())
def test_reconciliation_finds_exactly_the_difference(pair):
    a_ids, b_ids = pair
    alice, bob, sizes = run(IdSet(a_ids), IdSet(b_ids))
    assert_reconciled(alice, bob, a_ids, b_ids)
    if set(a_ids) == set(b_ids):
        assert len(sizes) == 2 and sum(sizes) < 200
    assert alice.passes == bob.passes == 1


@pytest.mark.parametrize("n", [0, 1, 5000])
def test_equal_sets_end_in_one_round_trip(n):
    ids = make_ids(random.Random(n), n)
    alice, bob, sizes = run(IdSet(ids), IdSet(reversed(ids)))
    assert len(sizes) == 2 and sum(sizes) < 200
    assert alice.done and bob.done and not alice.to_send and not bob.to_request


def test_one_side_empty_streams_everything_in_bounded_messages():
    ids = make_ids(random.Random(3), 3 * MAX_PAYLOAD // 32 + 17)
    for a, b in ((ids, []), ([], ids)):
        alice, bob, sizes = run(IdSet(a), IdSet(b))
        assert_reconciled(alice, bob, a, b)
        assert len(sizes) >= 8


def test_cost_grows_with_the_difference_not_the_set():
    rng = random.Random(5)
    ids = make_ids(rng, 20_000)
    a, b = IdSet(ids[:-10]), IdSet(ids[10:])
    alice, bob, sizes = run(a, b)
    assert_reconciled(alice, bob, ids[:-10], ids[10:])
    assert sum(sizes) < 20 * 32 * 8 and len(sizes) <= 10


def test_truncated_fingerprint_collisions_fall_back_to_full_width(monkeypatch):
    """If every cut fingerprint collides, the root check catches it and pass 2 is exact."""
    real = Reconciler._fp
    monkeypatch.setattr(Reconciler, "_fp", lambda self, h, w: real(self, h, w) if w == 32 else b"\0" * FP_BYTES)
    rng = random.Random(11)
    pool = make_ids(rng, 3000)
    rng.shuffle(pool)
    a_ids, b_ids = pool[:2500], pool[100:2600]  # equal counts hide the swaps
    alice, bob, _ = run(IdSet(a_ids), IdSet(b_ids))
    assert_reconciled(alice, bob, a_ids, b_ids)
    assert alice.passes == bob.passes == 2


def test_nonce_changes_the_cut_fingerprints():
    ids = make_ids(random.Random(1), 500)
    seen = set()
    for nonce in (b"", b"a", b"b"):
        alice = Reconciler(IdSet(ids[:-3]), initiator=True, nonce=nonce)
        bob = Reconciler(IdSet(ids[3:]), initiator=False)
        (split,) = bob.receive(alice.initial_message()).items
        seen.add(split.fingerprints)
    assert len(seen) == 3


def test_largest_valid_message_fits_in_one_mebibyte():
    """MAX_ITEMS and MAX_PAYLOAD keep any valid step under the default 1 MiB frame."""
    wide = [Split(prefix=f"{i:063x}", counts=(MAX_COUNT,) * 16, fingerprints=(b"w" * 32,) * 16)
            for i in range(MAX_PAYLOAD // 512)]
    empty = [Fingerprint(prefix=f"{(1 << 60) + i:064x}", count=0, fingerprint=b"")
             for i in range(MAX_ITEMS - len(wide))]
    msg = ReconcileStep(items=tuple(wide + empty), root=b"r" * 32, count=MAX_COUNT, more=True)
    rc.validate(msg)
    assert len(msgpack.packb(to_wire(msg))) < 1024 * 1024
    last = attrs.evolve(msg.items[-1], count=1, fingerprint=b"f" * FP_BYTES)
    with pytest.raises(ReconcileError):  # a few payload bytes more are refused
        rc.validate(attrs.evolve(msg, items=msg.items[:-1] + (last,)))


# -- misuse and malformed input ----------------------------------------------------------


def test_misuse_raises_state_errors():
    s = IdSet(make_ids(random.Random(2), 50))
    with pytest.raises(ReconcileStateError):
        Reconciler(s, initiator=False).initial_message()
    alice = Reconciler(s, initiator=True)
    with pytest.raises(ReconcileStateError):
        alice.receive(ReconcileStep(done=True))
    start = alice.initial_message()
    with pytest.raises(ReconcileStateError):
        alice.initial_message()
    bob = Reconciler(IdSet(), initiator=False)
    reply = bob.receive(start)
    s.add(hashlib.sha256(b"new").digest())
    with pytest.raises(ReconcileStateError):
        alice.receive(reply)
    done_a, done_b, _ = run(IdSet(), IdSet())
    with pytest.raises(ReconcileStateError):
        done_a.receive(ReconcileStep())


def _start(root=b"r" * 32, count=3, nonce=b""):
    return [0, root, count, nonce]


def _step(items=(), have=b"", flags=0, root=None, count=None):
    return [1, flags, root, count, list(items), have]


ID = hashlib.sha256(b"id").digest()

MALFORMED = {
    "not a list": b"hello",
    "empty": [],
    "unknown tag": [7, 1, 2],
    "bool tag": [False, b"r" * 32, 3, b""],
    "short root": _start(root=b"r" * 31),
    "negative count": _start(count=-1),
    "huge count": _start(count=MAX_COUNT + 1),
    "long nonce": _start(nonce=b"n" * 33),
    "bad flags": _step(flags=8),
    "root without count": _step(root=b"r" * 32),
    "have not multiple of 32": _step(have=b"x" * 33),
    "have unsorted": _step(have=b"\x02" * 32 + b"\x01" * 32),
    "have duplicated": _step(have=b"\x01" * 64),
    "bad prefix char": _step([[0, "g", 1, b"f" * FP_BYTES]]),
    "upper-case prefix": _step([[0, "A", 1, b"f" * FP_BYTES]]),
    "prefix too long": _step([[0, "a" * 65, 1, b"f" * FP_BYTES]]),
    "prefix not a str": _step([[0, b"a", 1, b"f" * FP_BYTES]]),
    "items out of order": _step([[0, "b", 1, b"f" * FP_BYTES], [0, "a", 1, b"f" * FP_BYTES]]),
    "duplicate items": _step([[0, "a", 1, b"f" * FP_BYTES], [0, "a", 1, b"f" * FP_BYTES]]),
    "too many items": _step([[0, f"{i:04x}", 1, b"f" * FP_BYTES] for i in range(MAX_ITEMS + 1)]),
    "fingerprint wrong width": _step([[0, "a", 1, b"f" * 7]]),
    "fingerprint for empty": _step([[0, "a", 0, b"f" * FP_BYTES]]),
    "split with 15 counts": _step([[1, "a", [1] * 15, b"f" * FP_BYTES * 15]]),
    "split widths": _step([[1, "a", [1] * 16, b"f" * (FP_BYTES * 16 + 1)]]),
    "split without fingerprints": _step([[1, "a", [1] + [0] * 15, b""]]),
    "split fingerprints for empty children": _step([[1, "a", [0] * 16, b"f" * FP_BYTES]]),
    "split of a full id": _step([[1, "a" * 64, [1] + [0] * 15, b"f" * FP_BYTES]]),
    "split count bool": _step([[1, "a", [True] + [0] * 15, b"f" * FP_BYTES]]),
    "idlist wrong id length": _step([[2, "", b"x" * 31]]),
    "idlist empty": _step([[2, "", b""]]),
    "idlist outside prefix": _step([[2, "0", b"\xff" * 32]]),
    "idlist's last id outside prefix": _step([[2, "0", b"\x00" * 32 + b"\xff" * 32]]),
    "idlist's first id outside prefix": _step([[2, "f", b"\x00" * 32 + b"\xff" * 32]]),
    "idlist too long": _step([[2, "", b"".join(bytes([i]) * 32 for i in range(LEAF_MAX + 1))]]),
    "need empty bitmap": _step([[3, "a", b""]]),
    "item too short": _step([[0, "a"]]),
    "item unknown kind": _step([[9, "a", 1]]),
    "too many ids": _step(have=b"".join(i.to_bytes(32, "big") for i in range(MAX_PAYLOAD // 32 + 1))),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_messages_are_refused(name):
    with pytest.raises(ReconcileError):
        from_wire(MALFORMED[name])


def _responder_mid_session():
    """A responder that has answered a Start, and the split it sent."""
    ids = make_ids(random.Random(9), 400)
    bob = Reconciler(IdSet(ids), initiator=False)
    reply = bob.receive(ReconcileStart(root=b"\1" * 32, count=380))
    return bob, reply, ids


def test_inconsistent_messages_are_refused():
    bob, reply, ids = _responder_mid_session()
    assert [type(i) for i in reply.items] == [Split]
    unasked = ReconcileStep(items=(Fingerprint(prefix="abc", count=1, fingerprint=b"f" * FP_BYTES),))
    cases = [
        ReconcileStart(root=b"\1" * 32, count=1),  # a second start
        ReconcileStep(root=b"\1" * 32, count=3),  # root again
        unasked,
        ReconcileStep(have=(ids[0],)),  # an id bob holds, twice
        ReconcileStep(have=(b"\7" * 32,)),  # an id bob lacks, twice
        ReconcileStep(),  # nothing, though bob did not say `more`
        ReconcileStep(items=(Need(prefix=ids[0].hex()[:1], bitmap=b"\1"),)),  # a Need bob never asked for
        ReconcileStep(items=(Fingerprint(prefix=ids[0].hex()[:1], count=3, fingerprint=b"f" * 32),)),  # width
    ]
    for msg in cases:
        bob, _, _ = _responder_mid_session()
        if getattr(msg, "have", ()):
            bob.receive(msg)  # first time: remembered as stale, not an error
        with pytest.raises(ReconcileError):
            bob.receive(msg)


def test_peer_cannot_send_more_ids_than_it_holds():
    bob = Reconciler(IdSet(), initiator=False)
    bob.receive(ReconcileStart(root=b"\1" * 32, count=2))
    many = tuple(sorted(hashlib.sha256(bytes([i])).digest() for i in range(3)))
    with pytest.raises(ReconcileError):
        bob.receive(ReconcileStep(have=many))


def test_a_premature_done_is_refused():
    ids = make_ids(random.Random(4), 100)
    alice = Reconciler(IdSet(ids), initiator=True)
    alice.initial_message()
    with pytest.raises(ReconcileError):
        alice.receive(ReconcileStep(root=hashlib.sha256(b"other").digest(), count=100, done=True))


# -- fuzzing -----------------------------------------------------------------------------

wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**70) | st.binary(max_size=70) | st.text(max_size=5)
    | st.sampled_from(["", "a", "0f", ID, b"f" * FP_BYTES, 0, 1, 2, 3]),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(wire_values, st.tuples(st.sampled_from([0, 1]), wire_values, wire_values, wire_values,
                                        st.lists(st.lists(wire_values, max_size=4), max_size=3), wire_values)
                 .map(list)))
def test_from_wire_fuzz(obj):
    try:
        msg = from_wire(obj)
    except ReconcileError:
        return
    assert from_wire(msgpack.unpackb(msgpack.packb(to_wire(msg)))) == msg


prefixes = st.text("0123456789abcdef", max_size=4)
fps = st.sampled_from([b"", b"f" * FP_BYTES, b"\0" * FP_BYTES, b"f" * 32])
items = st.one_of(
    st.builds(Fingerprint, prefix=prefixes, count=st.integers(0, 50), fingerprint=fps),
    st.builds(Split, prefix=prefixes, counts=st.lists(st.integers(0, 40), min_size=16, max_size=16).map(tuple),
              fingerprints=st.lists(fps, min_size=16, max_size=16).map(tuple)),
    st.builds(IdList, prefix=prefixes, ids=st.lists(st.binary(min_size=32, max_size=32), max_size=3)
              .map(lambda x: tuple(sorted(set(x))))),
    st.builds(Need, prefix=prefixes, bitmap=st.binary(max_size=2)),
)
steps = st.builds(ReconcileStep,
                  items=st.lists(items, max_size=4).map(lambda x: tuple(sorted(x, key=lambda i: i.prefix))),
                  have=st.lists(st.binary(min_size=32, max_size=32), max_size=3).map(lambda x: tuple(sorted(set(x)))),
                  more=st.booleans(), done=st.booleans(), restart=st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(steps, min_size=1, max_size=6), st.booleans())
def test_receive_fuzz(msgs, initiator):
    """Random steps from a hostile peer: a reply or ReconcileError, never anything else."""
    ids = make_ids(random.Random(len(msgs)), 300)
    me = Reconciler(IdSet(ids), initiator=initiator)
    if initiator:
        me.initial_message()
        msgs[0] = attrs.evolve(msgs[0], root=b"\2" * 32, count=250)
    else:
        me.receive(ReconcileStart(root=b"\2" * 32, count=250))
    for msg in msgs:
        try:
            me.receive(msg)
        except ReconcileError:
            return
        except ReconcileStateError:
            assert me.done
            return


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.randoms(use_true_random=False))
def test_a_tampering_peer_cannot_make_us_loop(seed, chaos):
    """A peer that follows the protocol but corrupts what it sends: we end, with a result or an error."""
    rng = random.Random(seed)
    pool = make_ids(rng, 1500, rng.choice([0, 30]))
    a, b = IdSet(pool[:1200]), IdSet(pool[300:])
    me, peer = Reconciler(a, initiator=True), Reconciler(b, initiator=False)
    msg = me.initial_message()
    for _ in range(200):
        try:
            out = peer.receive(msg)
        except (ReconcileError, ReconcileStateError):
            return
        if out is None:
            return
        out = tamper(out, chaos)
        try:
            msg = me.receive(from_wire(to_wire(out)))
        except ReconcileError:
            return
        if msg is None:
            return
    pytest.fail("no end after 200 messages")


def tamper(msg: ReconcileStep, chaos: random.Random) -> ReconcileStep:
    items = list(msg.items)
    if items and chaos.random() < 0.5:
        i = chaos.randrange(len(items))
        item = items[i]
        if type(item) is Fingerprint and item.count:
            fp = chaos.randbytes(FP_BYTES)
            items[i] = attrs.evolve(item, count=item.count + chaos.choice([-1, 1]), fingerprint=fp)
        elif type(item) is Split:
            counts = list(item.counts)
            v = chaos.randrange(16)
            counts[v] = chaos.randrange(1, 40)
            fps_ = list(item.fingerprints)
            fps_[v] = chaos.randbytes(len(next((f for f in fps_ if f), b"f" * FP_BYTES)))
            items[i] = attrs.evolve(item, counts=tuple(counts), fingerprints=tuple(fps_))
        else:
            del items[i]
    more = msg.more if chaos.random() < 0.8 else not msg.more
    return attrs.evolve(msg, items=tuple(items), more=more)
