"""Tests for sync.fulltext: the FTS5 index over atom content (derived,
kept current by every put, rebuilt when missing or stale) and text queries
over the live atoms of an expansion."""

from __future__ import annotations

import sqlite3

import pytest

from helpers import T0, ago, atom, contents, delta, root
from sync import fulltext
from sync.codec import encode_context
from sync.expand import ExpanderFunctor
from sync.model import T_INT, T_STRING
from sync.query import MAX_TEXT_LENGTH, ContextQuery
from sync.store import InMemoryContextStore, SQLiteContextStore

NOW = T0


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "store.db"


@pytest.fixture
def sqlite_store(db_path):
    store = SQLiteContextStore(db_path)
    yield store
    store.close()


@pytest.fixture(params=["sqlite", "memory"])
def any_store(request, tmp_path):
    store = SQLiteContextStore(tmp_path / "s.db") if request.param == "sqlite" else InMemoryContextStore()
    yield store
    store.close()


def recall(store, cid, text, **kw):
    query = ContextQuery(text=text, **kw)
    return contents(fulltext.run_query(store, ExpanderFunctor(store).expand(cid), query, NOW))


FACTS = root(
    atom("User prefers Python", 0.9),
    atom("User works on sync daemons", 0.7),
    atom("The cat is named Rust", 0.2),
    atom("python tips", 0.3),
    atom("python love", 0.8),
    atom("42", 0.5, T_INT),
)


# --- matching and ranking -------------------------------------------------------


def test_words_match_stemmed_and_case_folded(any_store):
    any_store.put(FACTS)
    assert recall(any_store, FACTS.id, "preferences") == ["User prefers Python"]
    assert recall(any_store, FACTS.id, "DAEMON") == ["User works on sync daemons"]
    assert recall(any_store, FACTS.id, "nothing-like-it") == []


def test_better_text_match_first_and_ties_by_relevance(any_store):
    any_store.put(FACTS)
    # "python tips" and "python love" match "python" equally well (same
    # length, one hit): the more relevant first. The longer atom ranks last.
    assert recall(any_store, FACTS.id, "python") == ["python love", "python tips", "User prefers Python"]
    # Two words held beat one, whatever the relevance.
    assert recall(any_store, FACTS.id, "python tips")[0] == "python tips"
    assert recall(any_store, FACTS.id, "prefers python")[0] == "User prefers Python"


def test_filters_and_limit_apply_to_text_matches(any_store):
    aged = root(
        atom("python old", 0.9, timestamp=ago(3600)),
        atom("python new", 0.4, timestamp=ago(10)),
        atom("python low", 0.1, timestamp=ago(10)),
        atom("python", 0.9, T_INT, timestamp=ago(10)),
    )
    any_store.put(aged)
    assert recall(any_store, aged.id, "python", type_filter=T_STRING, min_relevance=0.2, max_age_seconds=60) == [
        "python new"
    ]
    assert recall(any_store, aged.id, "python", type_filter=T_INT) == ["python"]
    assert len(recall(any_store, aged.id, "python", limit=2)) == 2
    assert recall(any_store, aged.id, "python", limit=0) == []


def test_only_live_atoms_are_recalled(any_store):
    r = root(atom("python fact"), atom("python other"))
    d = delta(r, atom("rust fact"), removed={atom("python fact").content_hash})
    elsewhere = root(atom("python elsewhere"))
    for ctx in (r, d, elsewhere):
        any_store.put(ctx)
    assert recall(any_store, d.id, "python") == ["python other"]
    assert recall(any_store, d.id, "fact") == ["rust fact"]
    assert recall(any_store, r.id, "fact") == ["python fact"]
    assert recall(any_store, d.id, "elsewhere") == []


def test_atoms_carried_by_many_contexts_are_indexed_once(sqlite_store, db_path):
    r = root(atom("shared python"))
    sqlite_store.put_many([r, delta(r, atom("shared python", 0.5)), root(atom("shared python", 0.1), note="x")])
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM atom_text_ids").fetchone()[0] == 1
    assert recall(sqlite_store, r.id, "shared") == ["shared python"]


# --- hostile input --------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ['"', '""', "*", "OR", "AND NOT", "NEAR(a b)", "python*", "^python", "col:python", "a OR", "(", "\\", "'",
             "\x00", "py\x00thon", "x\ud800", "\x1b[31m"]
)
def test_fts_syntax_in_text_is_only_text(any_store, text):
    any_store.put(FACTS)
    recall(any_store, FACTS.id, text)  # never raises


def test_operator_words_are_plain_words(any_store):
    r = root(atom("this OR that"), atom("near the python"), atom("python"))
    any_store.put(r)
    assert recall(any_store, r.id, "or") == ["this OR that"]
    assert recall(any_store, r.id, "NEAR(") == ["near the python"]
    assert recall(any_store, r.id, '"python"')[0] == "python"
    assert recall(any_store, r.id, "*") == []  # no indexable word: nothing matches


@pytest.mark.parametrize("text", [None, "", "   ", "\n\t"])
def test_no_text_or_blank_text_is_no_text_filter(any_store, text):
    any_store.put(FACTS)
    assert recall(any_store, FACTS.id, text) == contents(ContextQuery().execute(
        ExpanderFunctor(any_store).expand(FACTS.id), NOW))


def test_text_is_bounded():
    ContextQuery(text="x" * MAX_TEXT_LENGTH)
    with pytest.raises(ValueError, match="text"):
        ContextQuery(text="x" * (MAX_TEXT_LENGTH + 1))


def test_execute_refuses_text_without_ranks():
    expanded = ExpanderFunctor(InMemoryContextStore()).expand(FACTS)
    with pytest.raises(ValueError, match="fulltext"):
        ContextQuery(text="python").execute(expanded, NOW)


# --- the derived index: kept current, rebuilt when missing or stale -----------------


def test_a_new_store_has_a_current_index_kept_current_by_puts(sqlite_store):
    assert sqlite_store.text_index_state() == fulltext.CURRENT
    sqlite_store.put(FACTS)
    sqlite_store.put(FACTS)  # again: nothing new, still current
    assert sqlite_store.text_index_state() == fulltext.CURRENT


def test_contexts_from_a_peer_are_searchable_at_once(sqlite_store):
    r = root(atom("sent by a peer"))
    d = delta(r, atom("python from afar"))
    sqlite_store.put_encoded([encode_context(r), encode_context(d)])
    assert sqlite_store.text_index_state() == fulltext.CURRENT
    assert recall(sqlite_store, d.id, "afar peer") == ["python from afar", "sent by a peer"]


@pytest.mark.parametrize(
    "damage",
    [
        ["DROP TABLE atom_text", "DROP TABLE atom_text_ids"],
        ["DROP TABLE atom_text"],
        ["DELETE FROM meta WHERE key = 'fulltext'"],
        ["UPDATE meta SET value = '0 0' WHERE key = 'fulltext'"],  # another version
    ],
)
def test_index_is_rebuilt_on_first_use_when_missing_or_stale(db_path, damage):
    store = SQLiteContextStore(db_path)
    store.put(FACTS)
    store.close()
    with sqlite3.connect(db_path) as db:
        for statement in damage:
            db.execute(statement)
    store = SQLiteContextStore(db_path)
    try:
        assert store.text_index_state() in (fulltext.MISSING, fulltext.STALE)
        assert recall(store, FACTS.id, "daemons") == ["User works on sync daemons"]
        assert store.text_index_state() == fulltext.CURRENT
    finally:
        store.close()


def test_contexts_written_without_the_index_make_it_stale(db_path):
    # What an older ctxfs does: store a context and not index it.
    store = SQLiteContextStore(db_path)
    store.put(FACTS)
    store.close()
    later = delta(FACTS, atom("written by an old binary"))
    with sqlite3.connect(db_path) as db:
        db.execute(
            "INSERT INTO contexts (id, base, depth, data) VALUES (?, ?, 1, ?)",
            (bytes.fromhex(later.id), bytes.fromhex(FACTS.id), encode_context(later)),
        )
    store = SQLiteContextStore(db_path)
    try:
        assert store.text_index_state() == fulltext.STALE
        store.put(delta(later, atom("new again")))  # still stale: the count moved with it
        assert store.text_index_state() == fulltext.STALE
        assert recall(store, later.id, "binary") == ["written by an old binary"]
    finally:
        store.close()


def test_a_store_older_than_the_index_builds_it_on_first_use(db_path):
    store = SQLiteContextStore(db_path)
    store.put(FACTS)
    store.close()
    with sqlite3.connect(db_path) as db:  # as if made before the index existed
        db.execute("DROP TABLE atom_text")
        db.execute("DROP TABLE atom_text_ids")
        db.execute("DELETE FROM meta WHERE key = 'fulltext'")
    store = SQLiteContextStore(db_path)
    try:
        child = delta(FACTS, atom("python added later"))
        store.put(child)  # a missing index stays missing: puts do not half-build it
        assert store.text_index_state() == fulltext.MISSING
        assert recall(store, child.id, "python")[0] == "python love"
        assert "python added later" in recall(store, child.id, "added")
    finally:
        store.close()


def test_rebuild_and_fsck(sqlite_store, db_path):
    sqlite_store.put(FACTS)
    assert list(sqlite_store.fsck()) == []
    with sqlite3.connect(db_path) as db:  # an index that claims to be current but lost an atom
        db.execute("DELETE FROM atom_text_ids WHERE id = 1")
    problems = list(sqlite_store.fsck())
    assert len(problems) == 1 and "missing from the full-text index" in problems[0]
    assert sqlite_store.rebuild_text_index() == len(FACTS.delta_atoms)
    assert list(sqlite_store.fsck()) == []


def test_an_index_that_cannot_be_rebuilt_falls_back_to_the_expansion(db_path):
    store = SQLiteContextStore(db_path)
    store.put(FACTS)
    store.close()
    with sqlite3.connect(db_path) as db:
        db.execute("DELETE FROM meta WHERE key = 'fulltext'")
    store = _read_only_store(db_path)
    try:
        assert recall(store, FACTS.id, "daemons") == ["User works on sync daemons"]
        assert store.text_index_state() == fulltext.MISSING
    finally:
        store.close()


def _read_only_store(path):
    """A store whose writes fail (as on a full disk): rebuilds raise StoreUnavailable."""
    store = SQLiteContextStore(path.with_name("scratch.db"))
    store._db.close()
    store._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    return store


# --- scale: one FTS query however many atoms --------------------------------------


def test_ten_thousand_atoms_one_fts_query(sqlite_store):
    r = root(*(atom(f"fact number {i} about {'python' if i % 10 == 0 else 'rust'}", (i % 100) / 100)
               for i in range(10_000)))
    sqlite_store.put(r)
    expanded = ExpanderFunctor(sqlite_store).expand(r.id)
    statements: list[str] = []
    sqlite_store._db.set_trace_callback(statements.append)
    try:
        hits = fulltext.run_query(sqlite_store, expanded, ContextQuery(text="python", limit=50), NOW)
    finally:
        sqlite_store._db.set_trace_callback(None)
    assert len(hits) == 50
    assert all("python" in a.content for a in hits)
    assert sum("MATCH" in s for s in statements) == 1
    ours = [s for s in statements if not s.startswith("--")]  # "--": FTS5's own, inside the query
    assert len(ours) <= 6, ours  # marker, tables, count, the query: none per atom
