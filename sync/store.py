"""Content-addressed context stores: SQLite (the embedded default) and memory.

Both keep the canonical bytes of every context under its id, refuse a
context whose base they do not hold, and make each put (or batch of puts)
all-or-nothing. Ids are 64-hex strings in this API; SQLite keeps them as
32-byte blobs so that id order is byte order everywhere.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from sync.codec import MAX_CONTEXT_BYTES, DecodeError, bytes_id, decode_context, encode_context
from sync.model import CompressedContext, check_id

SCHEMA_VERSION = 1


class StoreError(Exception):
    """Base of the store's errors; messages are one line, fit for a user."""


class NotFound(StoreError, LookupError):
    def __init__(self, context_id: str) -> None:
        super().__init__(f"no context {context_id} in the store")
        self.context_id = context_id


class MissingBase(StoreError, ValueError):
    def __init__(self, context_id: str, base_id: str) -> None:
        super().__init__(f"context {context_id} names base {base_id}, which is not in the store")
        self.context_id = context_id
        self.base_id = base_id


class ContextTooLarge(StoreError, ValueError):
    def __init__(self, size: int) -> None:
        super().__init__(f"context encodes to {size} bytes; the limit is {MAX_CONTEXT_BYTES} (split it into a chain)")
        self.size = size


class StoreUnavailable(StoreError):
    """The store cannot be written now (disk full, I/O error, read-only);
    nothing of the write was stored, and what was stored before is sound."""

    def __init__(self, cause: str, *, disk_full: bool) -> None:
        super().__init__(f"the store cannot be written now: {cause}")
        self.disk_full = disk_full


class ContextStore(Protocol):
    def put(self, ctx: CompressedContext) -> str: ...
    def put_many(self, contexts: Sequence[CompressedContext]) -> list[str]: ...
    def put_encoded(self, blobs: Sequence[bytes]) -> list[str]: ...
    def get(self, context_id: str) -> CompressedContext: ...
    def get_bytes(self, context_id: str) -> bytes: ...
    def has(self, context_id: str) -> bool: ...
    def get_lineage(self, context_id: str) -> list[str]: ...
    def walk_back(self, context_id: str) -> Iterator[tuple[str, CompressedContext]]: ...
    def walk_back_bytes(self, context_id: str) -> Iterator[tuple[str, bytes]]: ...
    def send_order(self, context_ids: Sequence[str]) -> list[tuple[str, int]]: ...
    def get_many_bytes(self, context_ids: Sequence[str]) -> list[bytes]: ...
    def ids(self, start: str | None = None) -> Iterator[str]: ...
    def heads(self) -> list[str]: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


def _check_batch(contexts: Sequence[CompressedContext], has) -> list[tuple[str, CompressedContext, bytes]]:
    """Encode a batch and check every base is held or earlier in the batch."""
    return _check_encoded([(ctx, encode_context(ctx)) for ctx in contexts], has)


def _decode_batch(blobs: Sequence[bytes]) -> list[tuple[CompressedContext, bytes]]:
    """Strictly decode bytes from outside: canonical form or DecodeError."""
    return [(decode_context(bytes(data), verify=True), bytes(data)) for data in blobs]


def _check_encoded(pairs: Sequence[tuple[CompressedContext, bytes]], has) -> list[tuple[str, CompressedContext, bytes]]:
    out = []
    known: set[str] = set()
    for ctx, data in pairs:
        if len(data) > MAX_CONTEXT_BYTES:
            raise ContextTooLarge(len(data))
        cid = bytes_id(data)
        if ctx.base_hash is not None and ctx.base_hash not in known and not has(ctx.base_hash):
            raise MissingBase(cid, ctx.base_hash)
        known.add(cid)
        out.append((cid, ctx, data))
    return out


class InMemoryContextStore:
    """A dict-backed store with the same behaviour as the SQLite one."""

    def __init__(self) -> None:
        self._objects: dict[str, tuple[CompressedContext, bytes]] = {}
        self._has_children: set[str] = set()

    def put(self, ctx: CompressedContext) -> str:
        return self.put_many([ctx])[0]

    def put_many(self, contexts: Sequence[CompressedContext]) -> list[str]:
        return self._insert(_check_batch(contexts, self.has))

    def put_encoded(self, blobs: Sequence[bytes]) -> list[str]:
        """Store canonical bytes from outside, verified: the receive path."""
        return self._insert(_check_encoded(_decode_batch(blobs), self.has))

    def _insert(self, batch: list[tuple[str, CompressedContext, bytes]]) -> list[str]:
        for cid, ctx, data in batch:
            self._objects.setdefault(cid, (ctx, data))
            if ctx.base_hash is not None:
                self._has_children.add(ctx.base_hash)
        return [cid for cid, _, _ in batch]

    def _entry(self, context_id: str) -> tuple[CompressedContext, bytes]:
        check_id(context_id, "context id")
        try:
            return self._objects[context_id]
        except KeyError:
            raise NotFound(context_id) from None

    def get(self, context_id: str) -> CompressedContext:
        return self._entry(context_id)[0]

    def get_bytes(self, context_id: str) -> bytes:
        return self._entry(context_id)[1]

    def has(self, context_id: str) -> bool:
        return check_id(context_id, "context id") in self._objects

    def walk_back(self, context_id: str) -> Iterator[tuple[str, CompressedContext]]:
        current: str | None = context_id
        while current is not None:
            ctx = self.get(current)
            yield current, ctx
            current = ctx.base_hash

    def walk_back_bytes(self, context_id: str) -> Iterator[tuple[str, bytes]]:
        for cid, _ctx in self.walk_back(context_id):
            yield cid, self._objects[cid][1]

    def send_order(self, context_ids: Sequence[str]) -> list[tuple[str, int]]:
        """(id, encoded size) of the given contexts, every base before its children."""
        depth = {cid: len(self.get_lineage(cid)) for cid in context_ids}
        return [(cid, len(self._objects[cid][1])) for cid in sorted(depth, key=lambda c: (depth[c], c))]

    def get_many_bytes(self, context_ids: Sequence[str]) -> list[bytes]:
        return [self.get_bytes(cid) for cid in context_ids]

    def get_lineage(self, context_id: str) -> list[str]:
        lineage = [cid for cid, _ in self.walk_back(context_id)]
        lineage.reverse()
        return lineage

    def ids(self, start: str | None = None) -> Iterator[str]:
        if start is not None:
            check_id(start, "start id")
        return iter(sorted(cid for cid in self._objects if start is None or cid >= start))

    def heads(self) -> list[str]:
        return sorted(cid for cid in self._objects if cid not in self._has_children)

    def __len__(self) -> int:
        return len(self._objects)

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contexts (
    id    BLOB PRIMARY KEY,          -- SHA-256 of data
    base  BLOB,                      -- parent id, NULL for a root
    depth INTEGER NOT NULL,          -- 0 for a root, base's depth + 1 otherwise
    data  BLOB NOT NULL              -- canonical encoding (sync.codec)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS contexts_base ON contexts(base);
"""

_LINEAGE = """
WITH RECURSIVE chain(id, base) AS (
    SELECT id, base FROM contexts WHERE id = ?
    UNION ALL
    SELECT c.id, c.base FROM contexts c JOIN chain ON c.id = chain.base
)
SELECT chain.id, contexts.data FROM chain JOIN contexts ON contexts.id = chain.id
"""


def _id_chunks(context_ids: Sequence[str], size: int = 500):
    """Ids as blobs, in slices under SQLite's bound-variable limit."""
    for start in range(0, len(context_ids), size):
        yield [bytes.fromhex(check_id(c, "context id")) for c in context_ids[start : start + size]]


class SQLiteContextStore:
    """The embedded default store: one SQLite file in WAL mode.

    `synchronous=FULL`: a put returns only after its transaction is on disk,
    so a context acknowledged to a peer or a client survives power loss, not
    just a crash of the process. (NORMAL in WAL mode may lose the last
    commits on power loss; that would break the protocol's ACK promise.)

    One connection, guarded by a lock, so the daemon may call it from worker
    threads; SQLite serialises writers anyway.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            # Private from the first byte: SQLite gives its -wal and -shm
            # files the database file's mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=OFF")
        with self._transaction():
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(statement)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: store schema {row[0]} is not supported (this is {SCHEMA_VERSION})")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    self._db.execute("COMMIT")
                except BaseException:
                    # SQLite may have rolled back already (SQLITE_FULL does):
                    # a second ROLLBACK would raise and hide the real error.
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                name = getattr(exc, "sqlite_errorname", "")
                raise StoreUnavailable(str(exc), disk_full=name == "SQLITE_FULL") from None

    def probe_write(self) -> None:
        """Write (and commit) one tiny row: raises StoreUnavailable while
        the store cannot be written."""
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('write_probe', ?)", (os.urandom(8).hex(),))

    def put(self, ctx: CompressedContext) -> str:
        return self.put_many([ctx])[0]

    def put_many(self, contexts: Sequence[CompressedContext]) -> list[str]:
        pairs = [(ctx, encode_context(ctx)) for ctx in contexts]
        return self._insert(pairs)

    def put_encoded(self, blobs: Sequence[bytes]) -> list[str]:
        """Store canonical bytes from outside, verified: the receive path."""
        return self._insert(_decode_batch(blobs))

    def _insert(self, pairs: Sequence[tuple[CompressedContext, bytes]]) -> list[str]:
        with self._transaction():
            batch = _check_encoded(pairs, self.has)
            depths: dict[str, int] = {}
            rows = []
            for cid, ctx, data in batch:
                if ctx.base_hash is None:
                    depth = 0
                else:
                    depth = depths.get(ctx.base_hash)
                    if depth is None:
                        depth = self._depth(ctx.base_hash)
                    depth += 1
                depths[cid] = depth
                rows.append((bytes.fromhex(cid), None if ctx.base_hash is None else bytes.fromhex(ctx.base_hash), depth, data))
            # One statement for the batch: a row-at-a-time loop hands the GIL
            # back and forth with the event loop thread once per context.
            self._db.executemany("INSERT OR IGNORE INTO contexts VALUES (?, ?, ?, ?)", rows)
        return [cid for cid, _, _ in batch]

    def _depth(self, context_id: str) -> int:
        row = self._db.execute("SELECT depth FROM contexts WHERE id = ?", (bytes.fromhex(context_id),)).fetchone()
        if row is None:
            raise NotFound(context_id)
        return row[0]

    def get_bytes(self, context_id: str) -> bytes:
        check_id(context_id, "context id")
        with self._lock:
            row = self._db.execute("SELECT data FROM contexts WHERE id = ?", (bytes.fromhex(context_id),)).fetchone()
        if row is None:
            raise NotFound(context_id)
        return row[0]

    def get(self, context_id: str) -> CompressedContext:
        # Our own bytes, checked when they were put; fsck re-verifies them.
        return decode_context(self.get_bytes(context_id), verify=False)

    def has(self, context_id: str) -> bool:
        check_id(context_id, "context id")
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM contexts WHERE id = ?", (bytes.fromhex(context_id),)
            ).fetchone() is not None

    def walk_back_bytes(self, context_id: str) -> Iterator[tuple[str, bytes]]:
        """Canonical bytes of the context and its ancestors, newest first.

        Rows come in slices of one recursive query, so a deep chain is
        neither held whole nor re-queried per ancestor.
        """
        check_id(context_id, "context id")
        cursor = self._db.cursor()
        # Callers often stop after a few rows (at a remembered ancestor), so
        # start with small fetches and grow them for long walks.
        batch = 4
        with self._lock:
            cursor.execute(_LINEAGE, (bytes.fromhex(context_id),))
            rows = cursor.fetchmany(batch)
        if not rows:
            raise NotFound(context_id)
        while rows:
            for cid, data in rows:
                yield cid.hex(), data
            batch = min(batch * 2, 256)
            with self._lock:
                rows = cursor.fetchmany(batch)

    def walk_back(self, context_id: str) -> Iterator[tuple[str, CompressedContext]]:
        for cid, data in self.walk_back_bytes(context_id):
            # Our own bytes, checked when they were put; fsck re-verifies them.
            yield cid, decode_context(data, verify=False)

    def send_order(self, context_ids: Sequence[str]) -> list[tuple[str, int]]:
        """(id, encoded size) of the given contexts, every base before its children.

        Sizes, not bytes: a sender reads the bytes one message at a time, so
        its memory is bounded by a message, not by what it has to send.
        """
        rows = []
        for chunk in _id_chunks(context_ids):
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows += self._db.execute(
                    f"SELECT depth, id, length(data) FROM contexts WHERE id IN ({marks})", chunk
                ).fetchall()
        if len(rows) != len(set(context_ids)):
            found = {r[1].hex() for r in rows}
            raise NotFound(next(c for c in context_ids if c not in found))
        rows.sort()
        return [(cid.hex(), size) for _depth, cid, size in rows]

    def get_many_bytes(self, context_ids: Sequence[str]) -> list[bytes]:
        """Canonical bytes of the given contexts, in the given order."""
        found: dict[bytes, bytes] = {}
        for chunk in _id_chunks(context_ids):
            marks = ",".join("?" * len(chunk))
            with self._lock:
                found.update(self._db.execute(f"SELECT id, data FROM contexts WHERE id IN ({marks})", chunk).fetchall())
        try:
            return [found[bytes.fromhex(cid)] for cid in context_ids]
        except KeyError as exc:
            raise NotFound(exc.args[0].hex()) from None

    def get_lineage(self, context_id: str) -> list[str]:
        check_id(context_id, "context id")
        with self._lock:
            rows = self._db.execute(
                "WITH RECURSIVE chain(id, base, depth) AS ("
                " SELECT id, base, depth FROM contexts WHERE id = ?"
                " UNION ALL SELECT c.id, c.base, c.depth FROM contexts c JOIN chain ON c.id = chain.base)"
                " SELECT id FROM chain ORDER BY depth",
                (bytes.fromhex(context_id),),
            ).fetchall()
        if not rows:
            raise NotFound(context_id)
        return [r[0].hex() for r in rows]

    def ids(self, start: str | None = None) -> Iterator[str]:
        """All ids in ascending order, from `start` (inclusive), fetched in pages."""
        after = b"" if start is None else bytes.fromhex(check_id(start, "start id"))
        op = ">="
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT id FROM contexts WHERE id {op} ? ORDER BY id LIMIT 1024", (after,)
                ).fetchall()
            if not rows:
                return
            for (cid,) in rows:
                yield cid.hex()
            after, op = rows[-1][0], ">"

    def heads(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM contexts o WHERE NOT EXISTS"
                " (SELECT 1 FROM contexts c WHERE c.base = o.id) ORDER BY id"
            ).fetchall()
        return [r[0].hex() for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM contexts").fetchone()[0]

    def fsck(self) -> Iterator[str]:
        """Problems found, one line each: SQLite integrity, ids, encodings, lineages."""
        with self._lock:
            result = self._db.execute("PRAGMA integrity_check").fetchall()
        if result != [("ok",)]:
            for (line,) in result:
                yield f"sqlite: {line}"
        after = b""
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT c.id, c.base, c.depth, c.data, b.depth FROM contexts c"
                    " LEFT JOIN contexts b ON b.id = c.base WHERE c.id > ? ORDER BY c.id LIMIT 512",
                    (after,),
                ).fetchall()
            if not rows:
                return
            for raw_id, base, depth, data, base_depth in rows:
                cid = raw_id.hex()
                if len(raw_id) != 32 or bytes_id(data) != cid:
                    yield f"{cid}: stored bytes do not hash to the id"
                    continue
                try:
                    ctx = decode_context(data, verify=True)
                except DecodeError as exc:
                    yield f"{cid}: {exc}"
                    continue
                if (ctx.base_hash or None) != (base.hex() if base else None):
                    yield f"{cid}: base column disagrees with the stored context"
                elif base is not None and base_depth is None:
                    yield f"{cid}: base {base.hex()} is missing"
                elif depth != (0 if base is None else base_depth + 1):
                    yield f"{cid}: depth {depth} is wrong"
            after = rows[-1][0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
