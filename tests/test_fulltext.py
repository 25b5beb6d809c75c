"""Tests for sync.fulltext: the FTS5 index over atom content (derived,
caught up by position off the write path, rebuilt when missing or stale)
and text queries over the live atoms of an expansion."""

from __future__ import annotations

import sqlite3

import pytest

from helpers import T0, ago, atom, contents, delta, root
from sync import fulltext
from sync.codec import encode_context
from sync.expand import ExpanderFunctor
from sync.model import T_INT, T_STRING
from sync.query import MAX_TEXT_LENGTH, ContextQuery
from sync.store import InMemoryContextStore, SQLiteContextStore, StoreUnavailable

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


@pytest.mark.parametrize("page", [1, 256])
def test_atoms_carried_by_many_contexts_are_indexed_once(sqlite_store, db_path, monkeypatch, page):
    monkeypatch.setattr(fulltext, "PAGE_CONTEXTS", page)  # in one page and across pages
    r = root(atom("shared python"))
    sqlite_store.put_many([r, delta(r, atom("shared python", 0.5)), root(atom("shared python", 0.1), note="x")])
    assert recall(sqlite_store, r.id, "shared") == ["shared python"]
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM atom_text_ids").fetchone()[0] == 1


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


# --- the derived index: puts leave it behind, queries catch it up ---------------


def _indexed(db_path) -> int:
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT count(*) FROM atom_text_ids").fetchone()[0]


def _marker(db_path) -> str:
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT value FROM meta WHERE key = 'fulltext'").fetchone()[0]


PUTS = {
    "put": lambda s, ctxs: [s.put(c) for c in ctxs],
    "put_many": lambda s, ctxs: s.put_many(ctxs),
    "put_encoded": lambda s, ctxs: s.put_encoded([encode_context(c) for c in ctxs]),
    "put_encoded_batches": lambda s, ctxs: s.put_encoded_batches([[encode_context(c)] for c in ctxs]),
}


@pytest.mark.parametrize("put", PUTS.values(), ids=PUTS.keys())
def test_puts_do_not_index_and_the_next_query_finds_what_they_stored(sqlite_store, db_path, put):
    assert sqlite_store.text_index_state() == fulltext.CURRENT  # a new store: empty and current
    child = delta(FACTS, atom("python from afar"))
    put(sqlite_store, [FACTS, child])
    assert _indexed(db_path) == 0 and _marker(db_path) == "2 0"
    assert sqlite_store.text_index_state() == fulltext.BEHIND
    assert recall(sqlite_store, child.id, "afar") == ["python from afar"]
    assert sqlite_store.text_index_state() == fulltext.CURRENT
    assert _indexed(db_path) == len(FACTS.delta_atoms) + 1 and _marker(db_path) == "2 2"


def test_a_put_after_a_query_is_found_by_the_next(sqlite_store):
    sqlite_store.put(FACTS)
    assert recall(sqlite_store, FACTS.id, "afar") == []
    child = delta(FACTS, atom("python from afar"))
    sqlite_store.put(child)
    sqlite_store.put(child)  # again: nothing new
    assert recall(sqlite_store, child.id, "afar") == ["python from afar"]
    assert sqlite_store.text_index_state() == fulltext.CURRENT


def test_many_puts_then_one_query_indexes_them_all_a_page_at_a_time(sqlite_store, db_path):
    count = 2 * fulltext.PAGE_CONTEXTS + 3
    contexts = [root(atom(f"note {i} about {'python' if i % 50 == 0 else 'rust'}")) for i in range(count)]
    for start in range(0, count, 100):
        sqlite_store.put_many(contexts[start : start + 100])
    commits: list[str] = []
    sqlite_store._db.set_trace_callback(lambda s: commits.append(s) if s == "COMMIT" else None)
    try:
        assert recall(sqlite_store, contexts[-1].id, "rust") == [contexts[-1].delta_atoms[0].content]
    finally:
        sqlite_store._db.set_trace_callback(None)
    assert len(commits) == 3  # one transaction per page
    assert _indexed(db_path) == count and _marker(db_path) == f"2 {count}"
    assert recall(sqlite_store, contexts[0].id, "python") == ["note 0 about python"]


def test_each_page_moves_the_marker_with_it_and_is_bounded_in_bytes(sqlite_store, db_path, monkeypatch):
    contexts = [root(atom(f"page fact {i}")) for i in range(5)]
    sqlite_store.put_many(contexts)
    monkeypatch.setattr(fulltext, "PAGE_CONTEXTS", 2)
    assert sqlite_store.index_text_page() == 2
    assert _marker(db_path) == "2 2"
    # A reader between pages: the first page whole, nothing of the next.
    with sqlite3.connect(db_path) as db:
        assert set(fulltext.search(db, "fact")) == {c.delta_atoms[0].content_hash for c in contexts[:2]}
    monkeypatch.setattr(fulltext, "PAGE_BYTES", 1)  # one context per page, however small
    assert [sqlite_store.index_text_page() for _ in range(4)] == [1, 1, 1, 0]
    assert _marker(db_path) == "2 5" and sqlite_store.text_index_state() == fulltext.CURRENT


def test_a_page_that_fails_leaves_the_index_and_its_marker_as_they_were(sqlite_store, db_path, monkeypatch):
    sqlite_store.put(FACTS)

    def fail(db, position):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(fulltext, "_set_marker", fail)
    with pytest.raises(StoreUnavailable):
        sqlite_store.index_text_page()
    assert _indexed(db_path) == 0 and _marker(db_path) == "2 0"
    assert sqlite_store.text_index_state() == fulltext.BEHIND


def test_a_context_that_no_longer_decodes_is_passed_over_and_named_by_fsck(sqlite_store, db_path):
    damaged = root(atom("soon damaged"))
    sqlite_store.put_many([damaged, FACTS])
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE contexts SET data = ? WHERE id = ?", (b"\xc1 not msgpack", bytes.fromhex(damaged.id)))
    assert recall(sqlite_store, FACTS.id, "daemons") == ["User works on sync daemons"]
    assert sqlite_store.text_index_state() == fulltext.CURRENT
    problems = list(sqlite_store.fsck())
    assert len(problems) == 1 and problems[0].startswith(damaged.id)


@pytest.mark.parametrize("index", [None, b"not an atom index"])
def test_a_context_whose_atom_index_does_not_parse_is_indexed_from_its_bytes(sqlite_store, db_path, index):
    sqlite_store.put(FACTS)
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE contexts SET atom_index = ?", (index,))
    assert sqlite_store.index_text_page() == 1
    with sqlite3.connect(db_path) as db:
        held = {raw.hex() for (raw,) in db.execute("SELECT hash FROM atom_text_ids")}
    assert held == {a.content_hash for a in FACTS.delta_atoms}


@pytest.mark.parametrize(
    "damage",
    [
        ["DROP TABLE atom_text", "DROP TABLE atom_text_ids"],
        ["DROP TABLE atom_text"],
        ["DELETE FROM meta WHERE key = 'fulltext'"],
        ["UPDATE meta SET value = '0 1' WHERE key = 'fulltext'"],  # another version
        ["UPDATE meta SET value = '1 1' WHERE key = 'fulltext'"],  # version 1 counted contexts
        ["UPDATE meta SET value = '2 99' WHERE key = 'fulltext'"],  # past the last context
        ["UPDATE meta SET value = '2 x' WHERE key = 'fulltext'"],
    ],
)
def test_index_is_rebuilt_on_first_use_when_missing_or_stale(db_path, damage):
    store = SQLiteContextStore(db_path)
    store.put(FACTS)
    assert recall(store, FACTS.id, "daemons") == ["User works on sync daemons"]
    store.close()
    with sqlite3.connect(db_path) as db:
        for statement in damage:
            db.execute(statement)
    store = SQLiteContextStore(db_path)
    try:
        assert store.text_index_state() in (fulltext.MISSING, fulltext.STALE)
        assert recall(store, FACTS.id, "daemons") == ["User works on sync daemons"]
        assert store.text_index_state() == fulltext.CURRENT
        assert _marker(db_path) == "2 1"
    finally:
        store.close()


def test_contexts_written_behind_the_stores_back_are_indexed_by_the_next_query(db_path):
    store = SQLiteContextStore(db_path)
    store.put(FACTS)
    assert recall(store, FACTS.id, "daemons") == ["User works on sync daemons"]
    store.close()
    later = delta(FACTS, atom("written by hand"))
    with sqlite3.connect(db_path) as db:
        db.execute(
            "INSERT INTO contexts (id, base, depth, data) VALUES (?, ?, 1, ?)",
            (bytes.fromhex(later.id), bytes.fromhex(FACTS.id), encode_context(later)),
        )
    store = SQLiteContextStore(db_path)
    try:
        assert store.text_index_state() == fulltext.BEHIND
        assert recall(store, later.id, "hand") == ["written by hand"]
    finally:
        store.close()


def test_a_missing_index_stays_missing_until_a_query_builds_it(db_path):
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
        store.put(child)
        assert store.text_index_state() == fulltext.MISSING
        assert recall(store, child.id, "python")[0] == "python love"
        assert "python added later" in recall(store, child.id, "added")
    finally:
        store.close()


def test_fsck_checks_the_contexts_the_index_covers_and_repair_rebuilds_it(sqlite_store, db_path):
    sqlite_store.put(FACTS)
    assert list(sqlite_store.fsck()) == []  # behind: no problem
    sqlite_store.text_ranks("x")
    assert list(sqlite_store.fsck()) == []
    with sqlite3.connect(db_path) as db:  # an index that covers FACTS but lost an atom
        db.execute("DELETE FROM atom_text_ids WHERE id = 1")
    problems = list(sqlite_store.fsck())
    assert len(problems) == 1 and "missing from the full-text index" in problems[0]
    later = root(atom("not indexed yet"))
    sqlite_store.put(later)  # after the position: not checked, whatever the index holds
    assert list(sqlite_store.fsck()) == problems
    assert sqlite_store.rebuild_text_index() == len(FACTS.delta_atoms) + 1
    assert list(sqlite_store.fsck()) == []
    assert sqlite_store.text_index_state() == fulltext.CURRENT


@pytest.mark.parametrize("damage", ["DELETE FROM meta WHERE key = 'fulltext'", None])
def test_an_index_that_cannot_be_caught_up_falls_back_to_the_expansion(db_path, damage):
    store = SQLiteContextStore(db_path)
    store.put(FACTS)  # None: the index merely behind
    store.close()
    if damage:
        with sqlite3.connect(db_path) as db:
            db.execute(damage)
    store = _read_only_store(db_path)
    try:
        before = store.text_index_state()
        assert before in (fulltext.MISSING, fulltext.BEHIND)
        assert recall(store, FACTS.id, "daemons") == ["User works on sync daemons"]
        assert store.text_index_state() == before
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
    assert sqlite_store.index_text_page() == 1  # one context: one page, however many atoms
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
    assert len(ours) <= 4, ours  # marker, tables, last seq, the query: none per atom
