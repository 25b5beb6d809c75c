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

**Staleness and catch-up.** `meta` holds `fulltext` = "VERSION POSITION":
the index format and how far it covers, as a value of `contexts.seq` (the
order contexts were stored in, sync/store.py): the atoms of every context
at or before POSITION are indexed, those after it not yet. Puts do not
index (tokenising every atom was a large share of receiving a peer's
objects); `catch_up` indexes the contexts after the position a page at a
time, moving the marker in the page's own transaction, so a reader sees
the index before a page or after it, never half of one. The index is
CURRENT when no context lies after the position; BEHIND when some do (the
normal state between writes and the next catch-up, not a fault); MISSING
without its marker or tables; STALE when the marker is of another version
or points past the last stored context (the table was rewritten). A text
query first catches the index up (the store's `text_ranks`), so it is
exact however far behind the index was; the daemon catches up in the
background once writes settle (daemon/indexer.py), so that query usually
finds nothing left to do. A missing or stale index is dropped and built
again by the same pages from position 0; `ctxfs fsck --repair` rebuilds
it whatever its state.

Why a position in `seq` holds: `seq` is the INTEGER PRIMARY KEY, i.e. the
rowid itself, which VACUUM keeps (it may renumber the implicit rowid of a
table without one). A new row gets max(seq) + 1, and writers are
serialised (BEGIN IMMEDIATE), so a context committed after a page was read
gets a seq above every row of that page: none can slip in behind the
position. Contexts are never deleted, so the maximum never goes back (no
AUTOINCREMENT needed); a row deleted by hand is damage, which fsck finds
(atoms missing from a covered context) and `fsck --repair` mends.

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

from sync import atomindex
from sync.codec import MAX_CONTEXT_BYTES, DecodeError, decode_context, unpack_bounded
from sync.model import CompressedContext, ExpandedContext, MemoryAtom
from sync.query import ContextQuery

__all__ = [
    "BEHIND", "CURRENT", "MISSING", "STALE", "catch_up", "covered", "fsck_context", "indexed_atoms", "match_expression",
    "reset", "run_query", "search", "search_atoms", "state", "text_ranks", "upgrade_marker",
]

# Bump when the tables, the tokenizer or the marker change: an index of
# another version is stale and rebuilt on first use. 2: the marker holds a
# position in contexts.seq (1 held a count of contexts).
INDEX_VERSION = "2"
MARKER_KEY = "fulltext"
TOKENIZER = "porter unicode61 remove_diacritics 2"

CURRENT, BEHIND, MISSING, STALE = "current", "behind", "missing", "stale"

_TABLES = ("atom_text", "atom_text_ids")
# (The store splits schema text at semicolons: none in the statements.)
_CREATE = (
    "CREATE TABLE atom_text_ids (id INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE)",
    f"CREATE VIRTUAL TABLE atom_text USING fts5(content, content='', tokenize='{TOKENIZER}')",
)
# One page of the catch-up is one transaction, holding the store's lock and
# SQLite's write lock throughout: writes wait for at most one page. A page
# is bounded in contexts (a few milliseconds of tokenising for small ones)
# and in bytes read, since one context may be 12 MB (MAX_CONTEXT_BYTES):
# at least one context, then no more once PAGE_BYTES are read.
PAGE_CONTEXTS = 256
PAGE_BYTES = 4 * 1024 * 1024
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
    version, _, number = row[0].partition(" ")
    return version, int(number) if number.isdigit() else -1


def _set_marker(db: sqlite3.Connection, position: int) -> None:
    db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (MARKER_KEY, f"{INDEX_VERSION} {position}"))


def _tables_exist(db: sqlite3.Connection) -> bool:
    marks = ",".join("?" * len(_TABLES))
    found = db.execute(f"SELECT count(*) FROM sqlite_master WHERE name IN ({marks})", _TABLES).fetchone()[0]
    return found == len(_TABLES)


def _last_stored(db: sqlite3.Connection) -> int:
    # The rowid's maximum: one step down the table's b-tree, whatever its size.
    return db.execute("SELECT coalesce(max(seq), 0) FROM contexts").fetchone()[0]


def _state(db: sqlite3.Connection) -> tuple[str, int]:
    marker = _marker(db)
    if marker is None or not _tables_exist(db):
        return MISSING, 0
    version, position = marker
    if version != INDEX_VERSION or position < 0:
        return STALE, 0
    last = _last_stored(db)
    if position > last:
        return STALE, 0
    return (CURRENT if position == last else BEHIND), position


def state(db: sqlite3.Connection) -> str:
    """CURRENT, BEHIND (contexts stored after its position are not yet
    indexed: a query catches up first), MISSING (never built, or its
    tables are gone) or STALE (another version, or a position past every
    stored context)."""
    return _state(db)[0]


def covered(db: sqlite3.Connection) -> int | None:
    """The position of a CURRENT or BEHIND index: every context whose seq
    is at most this has its atoms indexed. None if missing or stale."""
    current, position = _state(db)
    return position if current in (CURRENT, BEHIND) else None


def _index_atoms(db: sqlite3.Connection, atoms: Iterable[tuple[bytes, str]]) -> int:
    """Index the atoms (id, content) not yet indexed, in a few statements;
    how many were new."""
    fresh: dict[bytes, str] = {}
    for atom_id, content in atoms:
        fresh.setdefault(atom_id, content)
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


def reset(db: sqlite3.Connection) -> None:
    """Drop the index and create it empty, covering nothing (position 0):
    `catch_up` then fills it. In the caller's transaction."""
    for table in _TABLES:
        db.execute(f"DROP TABLE IF EXISTS {table}")
    for statement in _CREATE:
        db.execute(statement)
    _set_marker(db, 0)


def catch_up(db: sqlite3.Connection) -> int:
    """Index one page of the contexts stored after the index's position
    and move the position past them, in the caller's transaction; how many
    contexts were indexed (0: the index was current). A missing or stale
    index is reset first, then filled from the start by the same pages."""
    current, position = _state(db)
    if current == CURRENT:
        return 0
    if current in (MISSING, STALE):
        reset(db)
    rows, size = [], 0
    cursor = db.execute(
        "SELECT seq, atom_index, data FROM contexts WHERE seq > ? ORDER BY seq LIMIT ?", (position, PAGE_CONTEXTS)
    )
    for row in cursor:
        rows.append(row)
        size += len(row[2])
        if size >= PAGE_BYTES:
            break
    cursor.close()
    if not rows:
        return 0
    atoms: list[tuple[bytes, str]] = []
    for _seq, index, data in rows:
        atoms += _atoms_of(index, data)
    _index_atoms(db, atoms)
    _set_marker(db, rows[-1][0])
    return len(rows)


def _atoms_of(index: bytes | None, data: bytes) -> list[tuple[bytes, str]]:
    """(id, content) of the atoms a stored context adds. The ids come from
    its atom index, trusted as expansion trusts it (fsck checks it, and
    `fsck --repair` rebuilds it before this index), and the contents from
    the raw atoms at the positions it names: no atom is built or hashed
    (decoding whole contexts made the catch-up half as slow again). A row
    whose atom index does not parse is decoded instead; one whose bytes no
    longer decode is passed over, for fsck to name (a query must not fail
    on it)."""
    try:
        parsed = atomindex.parse(index) if index is not None else None
        if parsed is not None:
            raw = unpack_bounded(data, MAX_CONTEXT_BYTES)[2]
            contents = [raw[p][0] for p in parsed.positions]
            if all(type(c) is str for c in contents):
                return list(zip(parsed.id_list(), contents))
    except (atomindex.AtomIndexError, DecodeError, IndexError, TypeError):
        pass
    try:
        # Our own bytes, checked when they were put; fsck re-verifies them.
        atoms = decode_context(data, verify=False).delta_atoms
    except DecodeError:
        return []
    return [(bytes.fromhex(a.content_hash), a.content) for a in atoms]


def indexed_atoms(db: sqlite3.Connection) -> int:
    """How many distinct atoms the index holds."""
    return db.execute("SELECT count(*) FROM atom_text_ids").fetchone()[0]


def upgrade_marker(db: sqlite3.Connection) -> None:
    """While a store is upgraded to the schema with `contexts.seq`: an index
    of version 1 was kept current by every put and counted the contexts
    it covered. If it covered them all, it covers every seq now and keeps
    its tables (no rebuild of a large store's index); else it is stale,
    as any other version, and rebuilt on first use."""
    marker = _marker(db)
    if marker is None or marker[0] != "1" or not _tables_exist(db):
        return
    if marker[1] == db.execute("SELECT count(*) FROM contexts").fetchone()[0]:
        _set_marker(db, _last_stored(db))


def fsck_context(read: Callable[[str, tuple], list], context_id: str, ctx: CompressedContext) -> str | None:
    """The problem of the index with one sound stored context it covers
    (the caller checks that: `covered`): atoms of it the index does not
    hold (facts that could not be recalled). Atoms held beyond those are
    harmless: queries keep live atoms only. Contexts after the position,
    and a missing or stale index, are no problem at all: the next text
    query indexes them. `read(sql, args)` runs one query under the
    store's lock."""
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
    and for an index that cannot be caught up now (the store is not
    writable). bm25's statistics are then those of these atoms only."""
    db = sqlite3.connect(":memory:")
    try:
        for statement in _CREATE:
            db.execute(statement)
        _index_atoms(db, ((bytes.fromhex(a.content_hash), a.content) for a in atoms))
        return search(db, text)
    finally:
        db.close()


# --------------------------------------------------------------------------
# the query
# --------------------------------------------------------------------------


def text_ranks(store: object, text: str, atoms: Sequence[MemoryAtom]) -> dict[str, float]:
    """Atom id -> text rank for `text`, from the store's index when it has
    one (caught up first if behind, rebuilt if missing or stale), else
    over `atoms`."""
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
