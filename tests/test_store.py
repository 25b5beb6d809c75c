"""Tests for sync.store: one behavioural suite run against both stores, plus
SQLite's persistence and fsck."""

from __future__ import annotations

import sqlite3

import pytest

from helpers import atom, delta, linear_chain, molecule, root
from sync.codec import encode_context
from sync.store import InMemoryContextStore, MissingBase, NotFound, SQLiteContextStore

UNKNOWN = "ab" * 32


@pytest.fixture
def family():
    """r <- a <- b, and r <- c: a branch with two children."""
    r = root(atom("root fact"), note="root")
    a = delta(r, atom("a fact"), removed={atom("root fact").content_hash})
    b = delta(a, atom("b fact", 0.3), molecules=[molecule(atom("m"))])
    c = delta(r, atom("c fact"))
    return r, a, b, c


# --- put / get ----------------------------------------------------------------


def test_put_returns_the_id_and_get_returns_an_equal_context(store, family):
    r, a, b, _ = family
    for ctx in (r, a, b):
        assert store.put(ctx) == ctx.id
    for ctx in (r, a, b):
        got = store.get(ctx.id)
        assert got == ctx
        assert got.id == ctx.id
        assert store.get_bytes(ctx.id) == encode_context(ctx)


def test_put_is_idempotent(store, family):
    r, a, _, _ = family
    assert store.put(r) == store.put(r)
    store.put(a)
    assert store.put(a) == a.id
    assert store.put_many([r, a, r]) == [r.id, a.id, r.id]
    assert len(store) == 2
    assert list(store.ids()) == sorted([r.id, a.id])


def test_has(store, family):
    r, a, _, _ = family
    assert not store.has(r.id)
    store.put(r)
    assert store.has(r.id)
    assert not store.has(a.id)
    assert not store.has(UNKNOWN)


def test_missing_base_is_refused_naming_the_base_and_nothing_is_stored(store, family):
    r, a, _, _ = family
    with pytest.raises(MissingBase) as info:
        store.put(a)
    assert info.value.base_id == r.id
    assert info.value.context_id == a.id
    assert r.id in str(info.value)
    assert len(store) == 0
    assert not store.has(a.id)
    assert list(store.ids()) == []


def test_put_many_is_all_or_nothing(store, family):
    r, a, b, _ = family
    orphan = delta(UNKNOWN, atom("orphan"))
    store.put(root(atom("already there")))
    before = list(store.ids())
    with pytest.raises(MissingBase) as info:
        store.put_many([r, a, orphan, b])
    assert info.value.base_id == UNKNOWN
    assert list(store.ids()) == before
    assert len(store) == 1
    for ctx in (r, a, b, orphan):
        assert not store.has(ctx.id)
    assert store.heads() == before


def test_put_many_accepts_children_of_earlier_batch_members(store, family):
    r, a, b, c = family
    assert store.put_many([r, a, b, c]) == [r.id, a.id, b.id, c.id]
    assert len(store) == 4
    assert store.get_lineage(b.id) == [r.id, a.id, b.id]


def test_put_many_refuses_a_child_before_its_parent(store, family):
    r, a, _, _ = family
    with pytest.raises(MissingBase):
        store.put_many([a, r])
    assert len(store) == 0


def test_get_unknown_raises_not_found(store, family):
    with pytest.raises(NotFound) as info:
        store.get(UNKNOWN)
    assert info.value.context_id == UNKNOWN
    with pytest.raises(NotFound):
        store.get_bytes(UNKNOWN)
    with pytest.raises(NotFound):
        store.get_lineage(UNKNOWN)
    with pytest.raises(NotFound):
        list(store.walk_back(UNKNOWN))
    assert isinstance(info.value, LookupError)


# --- lineage, ids, heads ------------------------------------------------------


def test_get_lineage_is_root_first(store, family):
    r, a, b, c = family
    store.put_many([r, a, b, c])
    assert store.get_lineage(r.id) == [r.id]
    assert store.get_lineage(a.id) == [r.id, a.id]
    assert store.get_lineage(b.id) == [r.id, a.id, b.id]
    assert store.get_lineage(c.id) == [r.id, c.id]


def test_ids_ascending_and_from_a_start_id(store):
    chain = linear_chain(30)
    store.put_many(chain)
    everything = sorted(ctx.id for ctx in chain)
    assert list(store.ids()) == everything
    start = everything[11]
    assert list(store.ids(start)) == everything[11:]
    # A start id that is not stored: everything at or after it.
    between = everything[20][:-1] + ("0" if everything[20][-1] != "0" else "1")
    expected = [i for i in everything if i >= between]
    assert list(store.ids(between)) == expected
    assert list(store.ids("f" * 64)) == [i for i in everything if i >= "f" * 64]


def test_len(store, family):
    assert len(store) == 0
    r, a, b, c = family
    store.put(r)
    assert len(store) == 1
    store.put_many([a, b, c])
    assert len(store) == 4


def test_heads(store, family):
    r, a, b, c = family
    store.put(r)
    assert store.heads() == [r.id]
    store.put(a)
    assert store.heads() == [a.id]
    store.put(c)
    assert store.heads() == sorted([a.id, c.id])
    store.put(b)
    assert store.heads() == sorted([b.id, c.id])
    other = root(atom("unrelated"))
    store.put(other)
    assert store.heads() == sorted([b.id, c.id, other.id])


def test_walk_back_is_tip_first(store, family):
    r, a, b, c = family
    store.put_many([r, a, b, c])
    walked = list(store.walk_back(b.id))
    assert [cid for cid, _ in walked] == [b.id, a.id, r.id]
    assert [ctx for _, ctx in walked] == [b, a, r]
    assert list(store.walk_back_bytes(b.id)) == [(x.id, encode_context(x)) for x in (b, a, r)]


def test_walk_back_can_stop_early(store):
    chain = linear_chain(50)
    store.put_many(chain)
    walk = store.walk_back(chain[-1].id)
    first = [next(walk)[0] for _ in range(3)]
    assert first == [chain[-1].id, chain[-2].id, chain[-3].id]
    walk.close()
    assert store.get(chain[0].id) == chain[0]


def test_ten_thousand_deep_lineage(store):
    chain = linear_chain(10_000)
    store.put_many(chain)
    tip = chain[-1].id
    lineage = store.get_lineage(tip)
    assert len(lineage) == 10_000
    assert lineage[0] == chain[0].id
    assert lineage == [ctx.id for ctx in chain]
    walked = [cid for cid, _ in store.walk_back_bytes(tip)]
    assert walked == lineage[::-1]
    assert store.heads() == [tip]


# --- SQLite only --------------------------------------------------------------


def test_sqlite_reopen_keeps_everything(tmp_path, family):
    r, a, b, c = family
    path = tmp_path / "s.db"
    s = SQLiteContextStore(path)
    s.put_many([r, a, b, c])
    s.close()
    s = SQLiteContextStore(path)
    try:
        assert len(s) == 4
        assert list(s.ids()) == sorted(x.id for x in family)
        for ctx in family:
            assert s.get(ctx.id) == ctx
        assert s.get_lineage(b.id) == [r.id, a.id, b.id]
        assert s.heads() == sorted([b.id, c.id])
        assert list(s.fsck()) == []
        # and it still accepts children of what it held before the reopen
        d = delta(b, atom("after reopen"))
        assert s.put(d) == d.id
        assert s.get_lineage(d.id) == [r.id, a.id, b.id, d.id]
    finally:
        s.close()


def test_memory_and_sqlite_agree(tmp_path, family):
    mem, sql = InMemoryContextStore(), SQLiteContextStore(tmp_path / "s.db")
    try:
        for s in (mem, sql):
            s.put_many(list(family))
        assert list(mem.ids()) == list(sql.ids())
        assert mem.heads() == sql.heads()
        for ctx in family:
            assert mem.get_bytes(ctx.id) == sql.get_bytes(ctx.id)
            assert mem.get_lineage(ctx.id) == sql.get_lineage(ctx.id)
    finally:
        sql.close()


def _overwrite(path, context_id: str, data: bytes) -> None:
    db = sqlite3.connect(path)
    try:
        with db:
            n = db.execute("UPDATE contexts SET data = ? WHERE id = ?", (data, bytes.fromhex(context_id))).rowcount
        assert n == 1
    finally:
        db.close()


def test_fsck_clean_on_a_sound_store(tmp_path, family):
    s = SQLiteContextStore(tmp_path / "s.db")
    try:
        s.put_many(list(family) + linear_chain(20))
        assert list(s.fsck()) == []
    finally:
        s.close()


def test_fsck_names_an_object_whose_bytes_were_altered(tmp_path, family):
    r, a, b, c = family
    path = tmp_path / "s.db"
    s = SQLiteContextStore(path)
    try:
        s.put_many([r, a, b, c])
        data = bytearray(encode_context(a))
        data[-1] ^= 0x01
        _overwrite(path, a.id, bytes(data))
        problems = list(s.fsck())
        assert len(problems) == 1
        assert a.id in problems[0]
        assert "hash" in problems[0]
    finally:
        s.close()


def test_fsck_names_an_object_replaced_by_another_contexts_valid_bytes(tmp_path, family):
    r, a, b, c = family
    path = tmp_path / "s.db"
    s = SQLiteContextStore(path)
    try:
        s.put_many([r, a, b, c])
        _overwrite(path, c.id, encode_context(a))  # valid bytes, wrong id
        problems = list(s.fsck())
        assert len(problems) == 1
        assert problems[0].startswith(c.id)
        assert a.id not in problems[0]
    finally:
        s.close()


def test_fsck_after_reopen_sees_tampering(tmp_path, family):
    r, a, b, c = family
    path = tmp_path / "s.db"
    s = SQLiteContextStore(path)
    s.put_many([r, a, b, c])
    s.close()
    _overwrite(path, b.id, b"\xc1 not msgpack")
    s = SQLiteContextStore(path)
    try:
        problems = list(s.fsck())
        assert [p.split(":")[0] for p in problems] == [b.id]
    finally:
        s.close()


def test_a_full_disk_is_a_clear_store_error_and_changes_nothing(tmp_path):
    """SQLITE_FULL once surfaced as "cannot rollback - no transaction is
    active": SQLite had rolled back itself, and our ROLLBACK hid the cause.
    `max_page_count` makes the same SQLITE_FULL a full disk would."""
    from sync.store import StoreUnavailable

    store = SQLiteContextStore(tmp_path / "full.db")
    kept = root(atom("kept", 0.5))
    store.put(kept)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    big = root(*(atom(f"filler {i} " + "x" * 200, 0.5) for i in range(200)))
    with pytest.raises(StoreUnavailable) as full:
        store.put(big)
    assert full.value.disk_full and "full" in str(full.value)
    assert not store.has(big.id) and store.get(kept.id) == kept
    assert list(store.fsck()) == []
    store._db.execute(f"PRAGMA max_page_count = {pages * 100}")  # space is back
    store.put(big)
    assert store.has(big.id)
    store.close()


def test_contexts_made_before_the_new_context_rules_still_store_sync_and_pass_fsck(store):
    # The interchange JSON refuses these now (model.check_new_context), but
    # stores and peers hold them from before: the receive path (put_encoded,
    # a peer's OBJECTS), reads and fsck must go on taking them.
    from sync.expand import ExpanderFunctor

    empty = root()
    removing = root(atom("kept", 0.5), removed=[UNKNOWN])
    over = delta(removing, atom("over-rated", 1.5))
    assert store.put_encoded([encode_context(c) for c in (empty, removing, over)]) == [empty.id, removing.id, over.id]
    assert [a.content for a in ExpanderFunctor(store).expand(over.id).atoms] == ["over-rated", "kept"]
    assert ExpanderFunctor(store).expand(empty.id).atoms == ()
    assert store.get(over.id) == over
    if isinstance(store, SQLiteContextStore):
        assert list(store.fsck()) == []


@pytest.mark.parametrize("replacement", ["flipped-bit", "another-contexts-bytes"])
def test_reads_never_hand_on_bytes_that_do_not_match_their_id(tmp_path, family, replacement):
    from sync.store import CorruptObject

    r, a, b, c = family
    path = tmp_path / "s.db"
    s = SQLiteContextStore(path)
    try:
        s.put_many([r, a, b, c])
        data = bytearray(encode_context(a))
        data[-1] ^= 0x01
        _overwrite(path, a.id, bytes(data) if replacement == "flipped-bit" else encode_context(c))
        reads = {
            "get": lambda: s.get(a.id),
            "get_bytes": lambda: s.get_bytes(a.id),
            "walk_back": lambda: list(s.walk_back(b.id)),
            "walk_back_bytes": lambda: list(s.walk_back_bytes(b.id)),
            "get_many_bytes": lambda: s.get_many_bytes([r.id, a.id]),
        }
        for name, read in reads.items():
            with pytest.raises(CorruptObject) as info:
                read()
            assert info.value.object_id == a.id, name
            assert a.id in str(info.value) and "ctxfs fsck" in str(info.value), name
        # What is sound is still served, and ids alone are no bytes.
        assert s.get(c.id) == c and [cid for cid, _ in s.walk_back(c.id)] == [c.id, r.id]
        assert s.get_lineage(b.id) == [r.id, a.id, b.id]
        assert s.get_many_bytes([b.id]) == [encode_context(b)]
    finally:
        s.close()
