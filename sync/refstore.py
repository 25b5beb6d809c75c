"""Where the context stores keep ref updates (sync/refs.py), and their checks.

A ref update is an object like a context: it lives in the same store (one
SQLite file), under an id of the same space, and every "object" method of
a store (`put_encoded`, `ids`, `holds`, `send_order`, `get_many_bytes`,
`len`) covers both kinds. This module holds what only updates need: the
SQLite table, the cached `RefTable`, and the fsck of stored updates. The
stores (sync/store.py) route, check targets and raise; nothing here waits
or locks: the caller holds the store's lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence

from sync.codec import bytes_id, timestamp_us
from sync.refs import InvalidRefUpdate, RefTable, RefUpdate, RefValue, decode_update

__all__ = ["REF_SCHEMA", "RefCache", "check_stored_update", "sqlite_all_bytes", "sqlite_fsck", "sqlite_insert"]

# Schema 2 added this table; schema 1 stores get it, empty, when opened.
# (The stores split schema text at semicolons: none in comments.)
REF_SCHEMA = """
CREATE TABLE IF NOT EXISTS ref_updates (
    id     BLOB PRIMARY KEY,          -- SHA-256 of data
    name   TEXT NOT NULL,             -- the ref's name
    target BLOB,                      -- context id, NULL for a deletion
    time   INTEGER NOT NULL,          -- the writer's clock, microseconds since 1970
    data   BLOB NOT NULL              -- canonical encoding (sync.refs)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ref_updates_name ON ref_updates(name);
"""

# (update id, the update, its canonical bytes): a checked batch entry.
Entry = tuple[str, RefUpdate, bytes]


class RefCache:
    """The RefTable of every stored update: read from the store on first
    use, then kept current by the store after each commit.

    Readers outside the store's lock get `snapshot()`, a copy: the table
    itself changes with every write.
    """

    def __init__(self, load: Callable[[], Iterable[bytes]]) -> None:
        self._load = load
        self._table: RefTable | None = None

    def table(self) -> RefTable:
        if self._table is None:
            # Our own bytes, checked when they were put; fsck re-verifies them.
            self._table = RefTable(decode_update(data, verify=False) for data in self._load())
        return self._table

    def added(self, updates: Iterable[RefUpdate]) -> None:
        """Committed updates; before the first read there is nothing to keep current."""
        if self._table is not None:
            for update in updates:
                self._table.add(update)

    def snapshot(self) -> RefTable:
        return self.table().copy()

    def value(self, name: str) -> RefValue | None:
        return self.table().value(name)

    def frontier(self, name: str) -> list[RefUpdate]:
        return self.table().frontier(name)

    def log(self, name: str) -> list[RefUpdate]:
        return self.table().log(name)


def check_stored_update(
    uid: str, data: bytes, has_context: Callable[[str], bool], columns: tuple | None = None
) -> str | None:
    """The problem with one stored update, or None: id, canonical form,
    signature, the row's own columns (name, target, time), the target held."""
    if len(bytes.fromhex(uid)) != 32 or bytes_id(data) != uid:
        return f"ref update {uid}: stored bytes do not hash to the id"
    try:
        update = decode_update(data, verify=True)
    except InvalidRefUpdate as exc:
        return f"ref update {uid}: {exc}"
    if columns is not None:
        target = update.target and bytes.fromhex(update.target)
        if columns != (update.name, target, timestamp_us(update.time)):
            return f"ref update {uid}: name, target or time column disagrees with the stored update"
    if update.target is not None and not has_context(update.target):
        return f"ref update {uid}: target {update.target} is missing"
    return None


# --------------------------------------------------------------------------
# SQLite rows (the caller holds the store's lock, and for writes its transaction)
# --------------------------------------------------------------------------


def sqlite_insert(db: sqlite3.Connection, entries: Sequence[Entry]) -> None:
    rows = [
        (bytes.fromhex(uid), u.name, None if u.target is None else bytes.fromhex(u.target), timestamp_us(u.time), data)
        for uid, u, data in entries
    ]
    db.executemany("INSERT OR IGNORE INTO ref_updates VALUES (?, ?, ?, ?, ?)", rows)


def sqlite_all_bytes(db: sqlite3.Connection) -> list[bytes]:
    return [data for (data,) in db.execute("SELECT data FROM ref_updates ORDER BY id")]


def sqlite_fsck(
    read: Callable[[str, tuple], list], has_context: Callable[[str], bool]
) -> Iterator[str]:
    """Problems with stored updates, one line each; `read(sql, args)` runs
    one query under the store's lock, so a long check never holds it."""
    after = b""
    while True:
        rows = read("SELECT id, name, target, time, data FROM ref_updates WHERE id > ? ORDER BY id LIMIT 512", (after,))
        if not rows:
            return
        for raw_id, name, target, time_us, data in rows:
            problem = check_stored_update(raw_id.hex(), data, has_context, (name, target, time_us))
            if problem is not None:
                yield problem
        after = rows[-1][0]
