"""Ref updates in the stores (sync/refstore.py through sync/store.py): kept
beside contexts, in the same id space, refused without their target, and
checked by fsck; plus the SQLite schema 1 -> 2 upgrade."""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import datetime, timedelta, timezone

import attrs
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from helpers import atom, delta, root
from sync.codec import DecodeError, encode_context
from sync.refs import (
    SIGNING_PREFIX,
    InvalidRefUpdate,
    RefTable,
    encode_update,
    make_update,
    updates_for_write,
)
from sync.store import MissingBase, MissingTarget, NotFound, SQLiteContextStore, StoreError

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc)
KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([n + 1]) * 32) for n in range(2)]


def public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def update(target, name="main", supersedes=(), key=KEYS[0], time=T0):
    target_id = target if target is None or isinstance(target, str) else target.id
    return make_update(name=name, target=target_id, supersedes=supersedes, key=key, time=time)


@pytest.fixture
def ctxs():
    r = root(atom("root fact"))
    a = delta(r, atom("a fact"))
    b = delta(a, atom("b fact"))
    return r, a, b


# --- put / read -----------------------------------------------------------------


def test_a_ref_update_is_an_object_of_the_store_but_not_a_context(store, ctxs):
    r, a, _b = ctxs
    store.put_many([r, a])
    u = update(a)
    assert store.put_ref_updates([u]) == [u.id]
    assert store.holds(u.id) and store.holds(a.id) and not store.has(u.id)
    assert u.id in set(store.ids()) and len(store) == 3  # len counts objects: both kinds
    assert store.get_many_bytes([u.id, a.id]) == [encode_update(u), encode_context(a)]
    with pytest.raises(NotFound):
        store.get(u.id)  # the context methods see contexts only
    assert store.ref_value("main").target == a.id
    assert store.ref_updates_of("main") == [u] and store.ref_frontier("main") == [u]
    assert store.put_ref_updates([u]) == [u.id] and len(store) == 3  # idempotent


def test_put_encoded_takes_contexts_and_updates_mixed_in_one_batch(store, ctxs):
    r, a, _b = ctxs
    u = update(a)
    ids = store.put_encoded([encode_context(r), encode_context(a), encode_update(u)])
    assert ids == [r.id, a.id, u.id]
    assert sorted(store.ids()) == sorted(ids)
    assert store.ref_value("main").target == a.id


def test_an_update_without_its_target_is_refused_and_nothing_is_stored(store, ctxs):
    r, a, _b = ctxs
    store.put(r)
    u = update(a)
    with pytest.raises(MissingTarget) as refused:
        store.put_encoded([encode_update(u)])
    assert isinstance(refused.value, MissingBase)  # callers map it to MISSING_BASE
    assert refused.value.target == a.id and refused.value.update_id == u.id and a.id in str(refused.value)
    with pytest.raises(MissingTarget):
        store.put_ref_updates([u])
    # The target later in the batch is too late; the whole batch is refused.
    with pytest.raises(MissingTarget):
        store.put_encoded([encode_update(u), encode_context(a)])
    assert list(store.ids()) == [r.id] and len(store) == 1
    assert store.ref_value("main") is None and len(store.ref_table()) == 0


def test_a_deletion_needs_no_target(store):
    d = update(None)
    assert store.put_encoded([encode_update(d)]) == [d.id]
    assert store.holds(d.id) and store.ref_value("main") is None
    assert store.ref_table().names(include_deleted=True) == ["main"]


def test_a_forged_signature_is_refused(store, ctxs):
    r, *_ = ctxs
    store.put(r)
    genuine = update(r)
    forged = attrs.evolve(genuine, signature=bytes(64))
    with pytest.raises(InvalidRefUpdate, match="signature"):
        store.put_encoded([encode_context(root(atom("other"))), encode_update(forged)])
    with pytest.raises(InvalidRefUpdate, match="signature"):
        store.put_ref_updates([forged])
    assert issubclass(InvalidRefUpdate, DecodeError)  # callers map it to INVALID_OBJECT
    assert list(store.ids()) == [r.id]


def test_an_update_written_under_another_nodes_id_is_refused(store, ctxs):
    r, *_ = ctxs
    store.put(r)
    # Signed by KEYS[1] with its own public key, claiming KEYS[0]'s node id.
    unsigned = ["ref", 1, "main", bytes.fromhex(r.id), [], hashlib.sha256(public(KEYS[0])).digest(), 0, public(KEYS[1])]
    data = msgpack.packb([*unsigned, KEYS[1].sign(SIGNING_PREFIX + msgpack.packb(unsigned))])
    with pytest.raises(InvalidRefUpdate, match="node_id"):
        store.put_encoded([data])
    assert list(store.ids()) == [r.id]


# --- the object methods: ids, send_order ------------------------------------------


@pytest.mark.parametrize("scan_min", [1, 10**9], ids=["rows-read", "looked-up"])
def test_send_order_puts_every_update_after_the_contexts(store, ctxs, monkeypatch, scan_min):
    """Either way the SQLite store finds the objects (every row read, or
    ids looked up): contexts parents first, then updates; a missing id is
    NotFound and a malformed one a ValueError."""
    from sync import store as store_module

    monkeypatch.setattr(store_module, "_SCAN_MIN", scan_min)
    r, a, b = ctxs
    store.put_many([r, a, b])
    updates = [update(r, name="x"), update(b, name="y"), update(a, name="z"), update(None, name="gone")]
    store.put_ref_updates(updates)
    every = [u.id for u in updates] + [b.id, r.id, a.id]
    order = list(store.send_order(every))
    assert [i for i, _ in order][:3] == [r.id, a.id, b.id]
    assert sorted(i for i, _ in order[3:]) == sorted(u.id for u in updates)
    sizes = dict(order)
    assert all(sizes[u.id] == len(encode_update(u)) for u in updates)
    assert sizes[a.id] == len(encode_context(a))
    with pytest.raises(NotFound):
        store.send_order([updates[0].id, "ab" * 32])
    with pytest.raises(ValueError):
        store.send_order([*every, "AB" * 32, "ab" * 32])
    assert list(store.send_order([updates[1].id])) == [(updates[1].id, len(encode_update(updates[1])))]


def test_ids_interleave_both_kinds_in_ascending_order(store):
    contexts = [root(atom(f"fact {i}")) for i in range(6)]
    store.put_many(contexts)
    store.put_ref_updates([update(c, name=f"ref{i}") for i, c in enumerate(contexts)])
    every = list(store.ids())
    assert every == sorted(every) and len(every) == 12 == len(store)
    middle = every[5]
    assert list(store.ids(middle)) == every[5:]


# --- the ref table ---------------------------------------------------------------


def test_ref_table_follows_writes_and_is_a_copy(store, ctxs):
    r, a, _b = ctxs
    store.put_many([r, a])
    before = store.ref_table()  # loads the cache; later writes must reach it
    [first] = store.put_ref_updates(updates_for_write(table=before, name="main", target=r.id, key=KEYS[0], time=T0))
    assert len(before) == 0  # the copy handed out did not change
    [second] = store.put_ref_updates(
        updates_for_write(table=store.ref_table(), name="main", target=a.id, key=KEYS[0], time=T0 + timedelta(seconds=1))
    )
    value = store.ref_value("main")
    assert value.target == a.id and not value.conflict and value.frontier_ids == (second,)
    assert [u.id for u in store.ref_updates_of("main")] == [second, first]


def test_concurrent_updates_from_peers_are_a_conflict(store, ctxs):
    r, a, _b = ctxs
    store.put_many([r, a])
    store.put_encoded([encode_update(update(r, key=KEYS[0])), encode_update(update(a, key=KEYS[1]))])
    value = store.ref_value("main")
    assert value.conflict and value.candidates == tuple(sorted([r.id, a.id]))


def test_sqlite_reopen_rebuilds_the_same_ref_table(tmp_path, ctxs):
    r, a, _b = ctxs
    path = tmp_path / "s.db"
    s = SQLiteContextStore(path)
    s.put_many([r, a])
    s.put_ref_updates([update(r, key=KEYS[0]), update(a, key=KEYS[1]), update(None, name="old")])
    expected = s.ref_table()
    s.close()
    s = SQLiteContextStore(path)
    try:
        table = s.ref_table()
        assert table.names(include_deleted=True) == ["main", "old"]
        assert table.value("main") == expected.value("main") and table.value("main").conflict
        assert len(s) == 5
    finally:
        s.close()


# --- fsck ------------------------------------------------------------------------


def test_fsck_is_clean_with_ref_updates(store, ctxs):
    store.put_many(list(ctxs))
    store.put_ref_updates([update(c, name=f"r{i}") for i, c in enumerate(ctxs)] + [update(None, name="d")])
    assert list(store.fsck()) == []


def _sql(path, statement, args=()):
    db = sqlite3.connect(path)
    try:
        with db:
            return db.execute(statement, args).rowcount
    finally:
        db.close()


def test_fsck_names_altered_forged_and_orphaned_updates(tmp_path, ctxs):
    r, a, b = ctxs
    path = tmp_path / "s.db"
    s = SQLiteContextStore(path)
    try:
        s.put_many([r, a, b])
        altered, forged, orphan, relabelled = (update(c, name=n) for c, n in zip((r, a, b, r), "wxyz"))
        s.put_ref_updates([altered, forged, orphan, relabelled])
        _sql(path, "UPDATE ref_updates SET data = ? WHERE id = ?", (encode_update(altered)[:-1] + b"\0", bytes.fromhex(altered.id)))
        # Forged in place: a wrong signature, stored under the id of its own bytes.
        bad = encode_update(attrs.evolve(forged, signature=bytes(64)))
        bad_id = hashlib.sha256(bad).digest()
        _sql(path, "UPDATE ref_updates SET data = ?, id = ? WHERE id = ?", (bad, bad_id, bytes.fromhex(forged.id)))
        _sql(path, "DELETE FROM contexts WHERE id = ?", (bytes.fromhex(b.id),))
        _sql(path, "UPDATE ref_updates SET name = 'other' WHERE id = ?", (bytes.fromhex(relabelled.id),))
        problems = "\n".join(s.fsck())
        assert f"ref update {altered.id}: stored bytes do not hash" in problems
        assert f"ref update {bad_id.hex()}:" in problems and "signature" in problems
        assert f"ref update {orphan.id}: target {b.id} is missing" in problems
        assert f"ref update {relabelled.id}: name, target or time column" in problems
        assert len(problems.splitlines()) == 4
    finally:
        s.close()


# --- schema 1 -> 2 (and on to the current schema) ------------------------------------

# The schema text of schema-1 stores, exactly as that code created them.
SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contexts (
    id    BLOB PRIMARY KEY,          -- SHA-256 of data
    base  BLOB,                      -- parent id, NULL for a root
    depth INTEGER NOT NULL,          -- 0 for a root, base's depth + 1 otherwise
    data  BLOB NOT NULL              -- canonical encoding (sync.codec)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS contexts_base ON contexts(base);
"""


def _make_v1_store(path, contexts):
    db = sqlite3.connect(path)
    try:
        db.executescript(SCHEMA_1)
        with db:
            db.execute("INSERT INTO meta VALUES ('schema', '1')")
            for depth, ctx in enumerate(contexts):  # a chain, root first
                base = None if ctx.base_hash is None else bytes.fromhex(ctx.base_hash)
                db.execute("INSERT INTO contexts VALUES (?, ?, ?, ?)", (bytes.fromhex(ctx.id), base, depth, encode_context(ctx)))
    finally:
        db.close()


def test_a_schema_1_store_opens_upgraded_and_keeps_everything(tmp_path, ctxs):
    path = tmp_path / "v1.db"
    _make_v1_store(path, ctxs)
    s = SQLiteContextStore(path)
    try:
        assert s._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("4",)
        assert s.get_lineage(ctxs[2].id) == [c.id for c in ctxs] and len(s) == 3
        assert list(s.fsck()) == []
        [uid] = s.put_ref_updates([update(ctxs[2])])
    finally:
        s.close()
    s = SQLiteContextStore(path)  # and opens again as a current store
    try:
        assert s.ref_value("main").update_id == uid and s.holds(uid) and list(s.fsck()) == []
    finally:
        s.close()


def test_a_store_of_a_later_schema_is_refused_unchanged(tmp_path, ctxs):
    path = tmp_path / "v5.db"
    _make_v1_store(path, ctxs)
    _sql(path, "UPDATE meta SET value = '5' WHERE key = 'schema'")
    with pytest.raises(StoreError, match="schema 5 is not supported"):
        SQLiteContextStore(path)
    tables = sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert ("ref_updates",) not in tables  # the refused open changed nothing


def test_ref_table_copy_is_independent():
    u = update("ab" * 32)
    table = RefTable([u])
    copy = table.copy()
    copy.add(update("cd" * 32, supersedes=[u.id], time=T0 + timedelta(seconds=1)))
    assert table.value("main").target == "ab" * 32 and copy.value("main").target == "cd" * 32
