"""Tests for sync.store: one behavioural suite run against both stores, plus
SQLite's persistence and fsck."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from helpers import atom, delta, linear_chain, molecule, root
from sync import atomindex, fulltext, refs, refstore
from sync.codec import encode_context
from sync.expand import ExpanderFunctor, stream_expansion
from sync.model import T_INT
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


def test_bases_from_earlier_puts_are_looked_up_together_and_give_the_right_depths(tmp_path):
    """A bulk sync commits children a transaction after their parents: their
    depths come from one SELECT per 500 bases, not one per child."""
    store = SQLiteContextStore(tmp_path / "s.db")
    parents = [root(atom(f"parent {i}")) for i in range(700)]
    grandparent = root(atom("grandparent"))
    deep = delta(grandparent, atom("deep"))
    store.put_many([grandparent, deep, *parents])
    children = [delta(p, atom(f"child {i}")) for i, p in enumerate(parents)]
    inside = delta(children[0], atom("grandchild, its base in the same put"))
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    try:
        store.put_encoded_batches([[encode_context(c) for c in children[:600]],
                                   [encode_context(c) for c in children[600:] + [inside, delta(deep, atom("x"))]]])
    finally:
        store._db.set_trace_callback(None)
    lookups = [q for q in statements if "depth" in q and q.lstrip().upper().startswith("SELECT")]
    assert len(lookups) == 3 and all(" IN (" in q for q in lookups), lookups  # 500 + 100, then 100 + deep
    depth = dict(store._db.execute("SELECT lower(hex(id)), depth FROM contexts"))
    assert {depth[c.id] for c in children} == {1} and depth[inside.id] == 2
    assert depth[delta(deep, atom("x")).id] == 2
    assert list(store.fsck()) == []
    store.close()


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
            "walk_back_indexed": lambda: list(s.walk_back_indexed(b.id)),
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


# --- the atom index (a derived column) ------------------------------------------


def test_each_context_has_its_atom_index(store):
    r = root(atom("a", 0.2), atom("b", 0.9), atom("a", 0.7), atom("c", 0.7, T_INT))
    d = delta(r, atom("d"), removed={atom("b").content_hash, UNKNOWN})
    store.put_many([r, d])
    walked = list(store.walk_back_indexed(d.id))
    assert [(cid, data) for cid, data, _ in walked] == [(x.id, encode_context(x)) for x in (d, r)]
    index = atomindex.parse(walked[1][2])
    # the last "a" wins; most relevant first, ties in delta order
    assert list(index.positions) == [1, 2, 3]
    assert list(index.relevances) == [0.9, 0.7, 0.7]
    assert index.id_list() == [bytes.fromhex(r.delta_atoms[p].content_hash) for p in (1, 2, 3)]
    assert list(index.tokens) == [r.delta_atoms[p].tokens for p in (1, 2, 3)]
    assert index.removed_list() == []
    one = atomindex.parse(walked[0][2])  # a delta of one add (assemble's short path)
    assert (list(one.positions), list(one.relevances), list(one.tokens)) == ([0], [1.0], [d.delta_atoms[0].tokens])
    assert one.id_list() == [bytes.fromhex(d.delta_atoms[0].content_hash)]
    assert one.removed_list() == sorted(bytes.fromhex(h) for h in d.removed_hashes)
    for cid, _data, blob in walked:
        assert blob == atomindex.build(store.get(cid))
    assert list(store.walk_back_indexed(d.id, with_bytes=False)) == [(cid, None, blob) for cid, _data, blob in walked]
    with pytest.raises(NotFound):
        list(store.walk_back_indexed(UNKNOWN))


def test_atom_index_refuses_what_is_not_one():
    good = atomindex.build(root(atom("x")))
    for bad in (b"", b"\x02" + good[1:], good + b"\x00", good[:-1]):
        with pytest.raises(atomindex.AtomIndexError):
            atomindex.parse(bad)


def _set_index(path, context_id: str, value) -> None:
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute("UPDATE contexts SET atom_index = ? WHERE id = ?", (value, bytes.fromhex(context_id)))
    finally:
        db.close()


def test_fsck_names_a_wrong_or_missing_atom_index_and_repair_rebuilds_it(tmp_path, family):
    r, a, b, c = family
    path = tmp_path / "s.db"
    s = SQLiteContextStore(path)
    try:
        s.put_many([r, a, b, c])
        _set_index(path, a.id, atomindex.build(b))  # a valid index, of another context
        _set_index(path, c.id, None)
        problems = list(s.fsck())
        assert sorted(p.split(":")[0] for p in problems) == sorted([a.id, c.id])
        assert all("atom index" in p for p in problems)
        assert s.rebuild_atom_indexes() == 2
        assert list(s.fsck()) == []
        assert [blob for _, _, blob in s.walk_back_indexed(a.id)] == [atomindex.build(a), atomindex.build(r)]
        assert s.rebuild_atom_indexes() == 0
    finally:
        s.close()


# The schema text of schema-2 stores, exactly as that code created them
# (the ref_updates table is refstore.REF_SCHEMA, unchanged since).
SCHEMA_2 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contexts (
    id    BLOB PRIMARY KEY,          -- SHA-256 of data
    base  BLOB,                      -- parent id, NULL for a root
    depth INTEGER NOT NULL,          -- 0 for a root, base's depth + 1 otherwise
    data  BLOB NOT NULL              -- canonical encoding (sync.codec)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS contexts_base ON contexts(base);
""" + refstore.REF_SCHEMA


# The full-text index as schema-2 and schema-3 code kept it: current after
# every put, its marker "1 COUNT" counting the contexts it covered.
TEXT_INDEX_1 = """
CREATE TABLE atom_text_ids (id INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE);
CREATE VIRTUAL TABLE atom_text USING fts5(content, content='', tokenize='porter unicode61 remove_diacritics 2');
"""


def _old_text_index(db, contexts, *, covering=None):
    """Index `contexts` as version-1 code did; the marker counts `covering`
    contexts (default: all of them, a current index)."""
    db.executescript(TEXT_INDEX_1)
    with db:
        atoms = {bytes.fromhex(a.content_hash): a.content for ctx in contexts for a in ctx.delta_atoms}
        for raw, content in atoms.items():
            rowid = db.execute("INSERT INTO atom_text_ids (hash) VALUES (?)", (raw,)).lastrowid
            db.execute("INSERT INTO atom_text (rowid, content) VALUES (?, ?)", (rowid, content))
        count = len(contexts) if covering is None else covering
        db.execute("INSERT INTO meta VALUES ('fulltext', ?)", (f"1 {count}",))


def _old_rows(contexts):
    """(id, base, depth, data) of each context, bases first."""
    depths: dict[str, int] = {}
    for ctx in contexts:
        depth = 0 if ctx.base_hash is None else depths[ctx.base_hash] + 1
        depths[ctx.id] = depth
        base = None if ctx.base_hash is None else bytes.fromhex(ctx.base_hash)
        yield bytes.fromhex(ctx.id), base, depth, encode_context(ctx)


def _make_v2_store(path, contexts, updates=()):
    """A store as schema-2 code wrote it: rows of (id, base, depth, data),
    ref updates, and the full-text index a new store got."""
    db = sqlite3.connect(path)
    try:
        db.executescript(SCHEMA_2)
        with db:
            db.execute("INSERT INTO meta VALUES ('schema', '2')")
            db.executemany("INSERT INTO contexts VALUES (?, ?, ?, ?)", _old_rows(contexts))
            refstore.sqlite_insert(db, [(refs.update_id(u), u, refs.encode_update(u)) for u in updates])
        _old_text_index(db, contexts)
    finally:
        db.close()


def test_a_schema_2_store_opens_upgraded_and_expands_as_before(tmp_path, family):
    r, a, b, c = family
    chain = linear_chain(40)
    twist = delta(chain[-1], atom("fact 3", 0.99), removed={atom("fact 7", 0.5).content_hash})
    contexts = [r, a, b, c, *chain, twist]
    key = Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32)
    ref = refs.make_update(name="main", target=twist.id, supersedes=(), key=key,
                           time=datetime(2026, 11, 24, tzinfo=timezone.utc))
    path = tmp_path / "v2.db"
    _make_v2_store(path, contexts, [ref])
    reference = InMemoryContextStore()
    reference.put_many(contexts)
    s = SQLiteContextStore(path)
    try:
        assert s._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("4",)
        assert s._db.execute("SELECT count(*) FROM contexts WHERE atom_index IS NULL").fetchone() == (0,)
        # The old index covered every context: it is kept, now by position.
        assert s.text_index_state() == fulltext.CURRENT
        assert s.index_text_page() == 0
        assert list(s.fsck()) == []
        assert s.ref_value("main").target == twist.id
        for ctx in contexts:
            assert ExpanderFunctor(s).expand(ctx.id) == ExpanderFunctor(reference).expand(ctx.id)
            assert list(stream_expansion(s, ctx.id, chunk_size=3)) == list(stream_expansion(reference, ctx.id, chunk_size=3))
        assert s.text_ranks("fact") is not None
    finally:
        s.close()
    s = SQLiteContextStore(path)  # and opens again, as a current store, unchanged
    try:
        assert list(s.fsck()) == [] and len(s) == len(contexts) + 1
        after = delta(twist, atom("after the upgrade"))
        s.put(after)
        assert ExpanderFunctor(s).expand(after.id).atoms[0].content == "after the upgrade"
    finally:
        s.close()


def test_schema_3_keeps_contexts_in_a_rowid_table_index_before_bytes(tmp_path, family):
    """Rows of up to 12 MB in a WITHOUT ROWID table made every lineage step
    walk a b-tree of whole rows; reading the atom index after the bytes
    walked their overflow pages. A new store and an upgraded one alike."""
    path = tmp_path / "v2.db"
    _make_v2_store(path, list(family))
    for p in (tmp_path / "new.db", path):
        s = SQLiteContextStore(p)
        try:
            s.put_many(list(family))
            sql = s._db.execute("SELECT sql FROM sqlite_master WHERE name = 'contexts'").fetchone()[0]
            assert "WITHOUT ROWID" not in sql
            columns = [row[1] for row in s._db.execute("PRAGMA table_info(contexts)")]
            assert columns == ["seq", "id", "base", "depth", "atom_index", "data"]
            assert s._db.execute("SELECT name FROM sqlite_master WHERE name = 'contexts_base'").fetchone()
            assert not s._db.execute("SELECT name FROM sqlite_master WHERE name LIKE 'contexts_schema_%'").fetchone()
            assert list(s.fsck()) == []
        finally:
            s.close()


# The schema text of schema-3 stores' contexts table, exactly as that code
# created it (meta and ref_updates as in schema 2).
SCHEMA_3 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contexts (
    id    BLOB PRIMARY KEY,          -- SHA-256 of data
    base  BLOB,                      -- parent id, NULL for a root
    depth INTEGER NOT NULL,          -- 0 for a root, base's depth + 1 otherwise
    atom_index BLOB,                 -- derived from data (sync.atomindex)
    data  BLOB NOT NULL              -- canonical encoding (sync.codec)
);
CREATE INDEX IF NOT EXISTS contexts_base ON contexts(base);
""" + refstore.REF_SCHEMA


def _make_v3_store(path, contexts, *, covering=None):
    """A store as schema-3 code wrote it, its rowids in an order other than
    the ids' (with a gap, as VACUUM would close), and its full-text index."""
    db = sqlite3.connect(path)
    try:
        db.executescript(SCHEMA_3)
        with db:
            db.execute("INSERT INTO meta VALUES ('schema', '3')")
            for rowid, ((cid, base, depth, data), ctx) in enumerate(zip(_old_rows(contexts), contexts)):
                db.execute("INSERT INTO contexts (rowid, id, base, depth, atom_index, data) VALUES (?, ?, ?, ?, ?, ?)",
                           (10 * rowid + 5, cid, base, depth, atomindex.build(ctx), data))
        _old_text_index(db, contexts, covering=covering)
    finally:
        db.close()


def test_a_schema_3_store_opens_upgraded_keeping_each_rows_order_and_its_index(tmp_path, family):
    r, a, b, c = family
    path = tmp_path / "v3.db"
    _make_v3_store(path, [r, a, b, c])
    s = SQLiteContextStore(path)
    try:
        assert s._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("4",)
        assert s._db.execute("SELECT seq, id FROM contexts ORDER BY seq").fetchall() == [
            (5, bytes.fromhex(r.id)), (15, bytes.fromhex(a.id)), (25, bytes.fromhex(b.id)), (35, bytes.fromhex(c.id))]
        assert list(s.fsck()) == []
        assert s.text_index_state() == fulltext.CURRENT and s.index_text_page() == 0
        assert s.text_ranks("fact").keys() == {x.content_hash for x in (atom("root fact"), atom("a fact"),
                                                                         atom("b fact", 0.3), atom("c fact"))}
        later = delta(c, atom("stored after the upgrade"))
        s.put(later)
        assert s._db.execute("SELECT seq FROM contexts WHERE id = ?", (bytes.fromhex(later.id),)).fetchone() == (36,)
        assert s.text_index_state() == fulltext.BEHIND
        assert atom("stored after the upgrade").content_hash in s.text_ranks("upgrade")
    finally:
        s.close()


def test_a_schema_3_store_whose_index_fell_behind_rebuilds_it_on_first_use(tmp_path, family):
    # Version-1 markers count contexts: one short of the table cannot say
    # which context is missing, so the index is stale, not merely behind.
    r, a, b, c = family
    path = tmp_path / "v3.db"
    _make_v3_store(path, [r, a, b, c], covering=3)
    s = SQLiteContextStore(path)
    try:
        assert s.text_index_state() == fulltext.STALE
        assert atom("c fact").content_hash in s.text_ranks("fact")
        assert s.text_index_state() == fulltext.CURRENT
        assert s._db.execute("SELECT value FROM meta WHERE key = 'fulltext'").fetchone() == ("2 35",)
    finally:
        s.close()


def test_seq_is_the_rowid_so_vacuum_keeps_it(tmp_path, family):
    """The full-text index's position is a seq: VACUUM may renumber an
    implicit rowid (closing gaps), never an INTEGER PRIMARY KEY."""
    r, a, b, c = family
    path = tmp_path / "s.db"
    s = SQLiteContextStore(path)
    try:
        s.put_many([r, a])
        s.text_ranks("fact")  # the index covers r and a
        with s._transaction():  # b stored after a gap (as if rows in between were lost)
            s._db.execute("INSERT INTO contexts (seq, id, base, depth, atom_index, data) VALUES (100, ?, ?, 2, ?, ?)",
                          (bytes.fromhex(b.id), bytes.fromhex(a.id), atomindex.build(b), encode_context(b)))
        s._db.execute("VACUUM")
        assert s._db.execute("SELECT seq FROM contexts WHERE id = ?", (bytes.fromhex(b.id),)).fetchone() == (100,)
        assert s.text_index_state() == fulltext.BEHIND
        assert atom("b fact", 0.3).content_hash in s.text_ranks("fact")
        s.put(c)
        assert s._db.execute("SELECT seq FROM contexts WHERE id = ?", (bytes.fromhex(c.id),)).fetchone() == (101,)
        assert list(s.fsck()) == []
    finally:
        s.close()


def test_send_order_is_parents_first_once_each_and_names_a_missing_id(store):
    """The SQLite store looks a few ids up, 500 at a time, and reads every
    row for a request of much of the store: either way parents first, each
    object once (an id given twice comes once), and one it lacks is NotFound."""
    chain = linear_chain(2400)
    store.put_many(chain)
    for part in (chain[:550], chain):  # 550 of 2,400 are looked up; all are read in one pass
        wanted = [c.id for c in reversed(part)] + [part[3].id, part[-1].id]
        order = list(store.send_order(wanted))
        assert [cid for cid, _ in order] == [c.id for c in part]
        assert all(size == len(encode_context(c)) for (_, size), c in zip(order, part))
        with pytest.raises(NotFound):
            store.send_order([c.id for c in part] + ["ab" * 32])


def test_a_batch_checked_elsewhere_is_taken_as_checked_and_must_match_its_blobs(tmp_path):
    """put_encoded_batches(checked=...): per batch check_blobs' result made
    elsewhere (the checking worker), or None to check it here."""
    from sync.store import check_blobs

    chain = linear_chain(6)
    blobs = [encode_context(c) for c in chain]
    s = SQLiteContextStore(tmp_path / "s.db")
    try:
        with pytest.raises(ValueError):  # a verdict for other blobs: nothing stored
            s.put_encoded_batches([blobs[:3]], checked=[check_blobs(blobs[:2])])
        assert len(s) == 0
        ids = s.put_encoded_batches([blobs[:3], blobs[3:]], checked=[check_blobs(blobs[:3]), None])
        assert ids == [c.id for c in chain] and list(s.fsck()) == []
        assert s.get_lineage(chain[-1].id) == [c.id for c in chain]
    finally:
        s.close()
