"""Full-text recall: an SQLite FTS5 index over atom content.

The index is *derived*: it holds nothing that the stored contexts do not,
and can be dropped and rebuilt from them at any time. It lives in the
store's own SQLite file, as two tables:

    atom_text_ids (id INTEGER PRIMARY KEY, hash BLOB UNIQUE)  -- atom id <-> FTS rowid
    atom_text     FTS5 (content), contentless (content='')    -- rowid = atom_text_ids.id

Why contentless: an atom's text already lives in the canonical bytes of
the contexts that carry it (MessagePack blobs, not a column), so an
external-content table has nothing to point at, and a regular FTS5 table
would store every text a second time. A query needs only which atoms
match and how well (bm25 works on a contentless table); the atoms
themselves come from the expansion being queried. The id table gives the
one lookup FTS5 cannot do cheaply, by atom id: atoms are content-addressed
(`MemoryAtom.content_hash`), so each distinct atom is indexed once however
many contexts carry it. Nothing is ever deleted: a removal makes an atom
not *live* in a context, and the query intersects matches with the live
atoms of the expansion asked about.

**Staleness.** `meta` holds `fulltext` = "VERSION CONTEXTS": the index
format and how many stored contexts it covers. Contexts are never deleted,
so the index is current exactly when the version is ours and the count is
the number of rows in `contexts`. The store indexes the atoms of every
context it stores in the same transaction, whatever the path (put,
put_many, put_encoded: a peer's OBJECTS) and moves the count with it, so a
current index stays current. It goes stale only if something else wrote
the file (an older ctxfs) or the tables were dropped; then the first text
query rebuilds it from scratch, as does `ctxfs fsck --repair`.

**Matching.** The user's text is split at whitespace and each piece is
sent as one quoted FTS5 phrase (`"` doubled), the phrases joined by OR:
no input is ever FTS syntax, so `"`, `OR`, `*`, `NEAR(` are just text.
The tokenizer is unicode61 with diacritics folded and the Porter stemmer
(`prefers` finds `preference`). An atom matches if it holds any of the
words; bm25 ranks those holding more, and rarer, words first. A piece with
no indexable characters (`*`, `"`) matches nothing; text that is blank
(or None) is no text filter at all (sync/query.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime

from sync.codec import decode_context
from sync.model import CompressedContext, ExpandedContext, MemoryAtom
from sync.query import ContextQuery

__all__ = [
    "CURRENT", "MISSING", "STALE", "added", "fsck_context", "match_expression", "rebuild", "run_query", "search",
    "search_atoms", "state", "text_ranks",
]

# Bump when the tables or the tokenizer change: an index of another
# version is stale and rebuilt on first use.
INDEX_VERSION = "1"
MARKER_KEY = "fulltext"
TOKENIZER = "porter unicode61 remove_diacritics 2"

CURRENT, MISSING, STALE = "current", "missing", "stale"

_TABLES = ("atom_text", "atom_text_ids")
# (The store splits schema text at semicolons: none in the statements.)
_CREATE = (
    "CREATE TABLE atom_text_ids (id INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE)",
    f"CREATE VIRTUAL TABLE atom_text USING fts5(content, content='', tokenize='{TOKENIZER}')",
)
# Contexts read per slice while rebuilding: bounded memory for any store.
_REBUILD_PAGE = 512
# Bound variables per IN (...) list, under SQLite's limit.
_CHUNK = 500


def match_expression(text: str) -> str:
    """The FTS5 query for `text`: each whitespace-separated piece a quoted
    phrase, joined by OR. Never FTS syntax, whatever `text` holds: control
    characters (a NUL ends FTS5's string) count as spaces, and what does
    not encode as UTF-8 (lone surrogates) is dropped."""
    text = "".join(" " if ord(c) < 0x20 or c == "\x7f" else c for c in text)
    text = text.encode("utf-8", "ignore").decode("utf-8")
    return " OR ".join('"' + piece.replace('"', '""') + '"' for piece in text.split())


# --------------------------------------------------------------------------
# the index in the store's file (the caller holds the store's lock, and for
# writes its transaction)
# --------------------------------------------------------------------------


def _marker(db: sqlite3.Connection) -> tuple[str, int] | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (MARKER_KEY,)).fetchone()
    if row is None:
        return None
    version, _, count = row[0].partition(" ")
    return version, int(count) if count.isdigit() else -1


def _tables_exist(db: sqlite3.Connection) -> bool:
    marks = ",".join("?" * len(_TABLES))
    found = db.execute(f"SELECT count(*) FROM sqlite_master WHERE name IN ({marks})", _TABLES).fetchone()[0]
    return found == len(_TABLES)


def state(db: sqlite3.Connection) -> str:
    """CURRENT, MISSING (never built, or its tables are gone) or STALE
    (another version, or it does not cover every stored context)."""
    marker = _marker(db)
    if marker is None or not _tables_exist(db):
        return MISSING
    version, count = marker
    if version != INDEX_VERSION:
        return STALE
    # Counted over the contexts_base index, not the blobs: cheap per query.
    if count != db.execute("SELECT count(*) FROM contexts").fetchone()[0]:
        return STALE
    return CURRENT


def _index_atoms(db: sqlite3.Connection, atoms: Iterable[MemoryAtom]) -> int:
    """Index the atoms not yet indexed, in a few statements; how many were new."""
    fresh: dict[bytes, str] = {}
    for atom in atoms:
        fresh.setdefault(bytes.fromhex(atom.content_hash), atom.content)
    if not fresh:
        return 0
    # One insert that skips the ids already held, instead of looking each
    # up first: without AUTOINCREMENT, new rows get ids from max(id) + 1
    # on, so the rows at or after that id are exactly the new ones.
    first = db.execute("SELECT coalesce(max(id), 0) + 1 FROM atom_text_ids").fetchone()[0]
    db.executemany("INSERT OR IGNORE INTO atom_text_ids (hash) VALUES (?)", [(h,) for h in fresh])
    rows = db.execute("SELECT id, hash FROM atom_text_ids WHERE id >= ?", (first,)).fetchall()
    db.executemany("INSERT INTO atom_text (rowid, content) VALUES (?, ?)", [(i, fresh[h]) for i, h in rows])
    return len(rows)


def added(db: sqlite3.Connection, contexts: Sequence[CompressedContext], stored: int) -> None:
    """Contexts being stored in the caller's transaction, `stored` of them
    new rows: index their atoms and move the marker's count with them. A
    missing index is left missing (the first text query builds it)."""
    marker = _marker(db)
    if marker is None or marker[0] != INDEX_VERSION or not _tables_exist(db):
        return
    _index_atoms(db, (atom for ctx in contexts for atom in ctx.delta_atoms))
    db.execute(
        "UPDATE meta SET value = ? WHERE key = ?", (f"{INDEX_VERSION} {marker[1] + stored}", MARKER_KEY)
    )


def rebuild(db: sqlite3.Connection) -> int:
    """Drop the index and build it again from every stored context, a page
    at a time; the number of distinct atoms indexed. In the caller's
    transaction: readers see the old index or the new, never half."""
    for table in _TABLES:
        db.execute(f"DROP TABLE IF EXISTS {table}")
    for statement in _CREATE:
        db.execute(statement)
    atoms = contexts = 0
    after = b""
    while True:
        rows = db.execute(
            "SELECT id, data FROM contexts WHERE id > ? ORDER BY id LIMIT ?", (after, _REBUILD_PAGE)
        ).fetchall()
        if not rows:
            break
        # Our own bytes, checked when they were put; fsck re-verifies them.
        decoded = [decode_context(data, verify=False) for _id, data in rows]
        atoms += _index_atoms(db, (atom for ctx in decoded for atom in ctx.delta_atoms))
        contexts += len(rows)
        after = rows[-1][0]
    db.execute(
        "INSERT OR REPLACE INTO meta VALUES (?, ?)", (MARKER_KEY, f"{INDEX_VERSION} {contexts}")
    )
    return atoms


def fsck_context(read: Callable[[str, tuple], list], context_id: str, ctx: CompressedContext) -> str | None:
    """The problem of a CURRENT index (the caller checks that) with one
    sound stored context: atoms of it the index does not hold (facts that
    could not be recalled). Atoms held beyond those are harmless: queries
    keep live atoms only. A missing or stale index is no problem at all:
    the first text query rebuilds it. `read(sql, args)` runs one query
    under the store's lock."""
    wanted = {bytes.fromhex(a.content_hash) for a in ctx.delta_atoms}
    keys = list(wanted)
    for start in range(0, len(keys), _CHUNK):
        chunk = tuple(keys[start : start + _CHUNK])
        marks = ",".join("?" * len(chunk))
        wanted.difference_update(h for (h,) in read(f"SELECT hash FROM atom_text_ids WHERE hash IN ({marks})", chunk))
    if not wanted:
        return None
    return f"{context_id}: {len(wanted)} atom(s) missing from the full-text index (ctxfs fsck --repair rebuilds it)"


def search(db: sqlite3.Connection, text: str) -> dict[str, float]:
    """Atom id -> bm25 (lower is better) of every indexed atom matching
    `text`: one FTS query, whatever the number of atoms."""
    expression = match_expression(text)
    if not expression:
        return {}  # nothing left to match (only punctuation, controls...)
    rows = db.execute(
        "SELECT i.hash, bm25(atom_text) FROM atom_text JOIN atom_text_ids i ON i.id = atom_text.rowid"
        " WHERE atom_text MATCH ?",
        (expression,),
    )
    return {raw.hex(): rank for raw, rank in rows}


def search_atoms(atoms: Sequence[MemoryAtom], text: str) -> dict[str, float]:
    """The same match over the given atoms alone, in a throwaway in-memory
    index: for stores without an index of their own (the in-memory store)
    and for a stale index that cannot be rebuilt now (the store is not
    writable). bm25's statistics are then those of these atoms only."""
    db = sqlite3.connect(":memory:")
    try:
        for statement in _CREATE:
            db.execute(statement)
        _index_atoms(db, atoms)
        return search(db, text)
    finally:
        db.close()


# --------------------------------------------------------------------------
# the query
# --------------------------------------------------------------------------


def text_ranks(store: object, text: str, atoms: Sequence[MemoryAtom]) -> dict[str, float]:
    """Atom id -> text rank for `text`, from the store's index when it has
    one (rebuilt first if missing or stale), else over `atoms`."""
    ranks_of = getattr(store, "text_ranks", None)
    ranks = ranks_of(text) if ranks_of is not None else None
    return search_atoms(atoms, text) if ranks is None else ranks


def run_query(store: object, expanded: ExpandedContext, query: ContextQuery, now: datetime) -> list[MemoryAtom]:
    """`query` over the live atoms of `expanded` (an expansion of a context
    of `store`). With text: the atoms matching it, best text match first,
    ties by relevance (descending), then expansion order; the type,
    relevance and age filters and the limit apply as without. Without text
    (None or blank): `query.execute(expanded, now)`."""
    if not query.has_text:
        return query.execute(expanded, now)
    assert query.text is not None
    ranks: Mapping[str, float] = text_ranks(store, query.text, expanded.atoms)
    return query.execute(expanded, now, text_ranks=ranks)
