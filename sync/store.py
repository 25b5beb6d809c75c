"""Content-addressed context stores: SQLite (the embedded default) and memory.

Both keep the canonical bytes of every context under its id, refuse a
context whose base they do not hold, and make each put (or batch of puts)
all-or-nothing. Ids are 64-hex strings in this API; SQLite keeps them as
32-byte blobs so that id order is byte order everywhere.

A store holds two kinds of objects in one id space: contexts and ref
updates (sync/refs.py, kept by sync/refstore.py). The *object* methods —
`put_encoded`, `ids`, `holds`, `send_order`, `get_many_bytes`, `len` —
cover both, because the node's id set and root are built from them and
sync carries both alike. The *context* methods — `get`, `get_bytes`,
`has`, lineages, `heads` — see contexts only. A ref update is refused
unless the store holds the context it targets, as a context is refused
without its base.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sqlite3
import struct
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Protocol

from sync import atomindex, fulltext, refstore
from sync.codec import MAX_CONTEXT_BYTES, DecodeError, bytes_id, decode_context, encode_context
from sync.model import CompressedContext, check_id
from sync.packed import SendOrder
from sync.rawcheck import CheckedContext, check_context_bytes
from sync.refs import RefTable, RefUpdate, RefValue, decode_update, encode_update, is_ref_update_bytes, verify_update

# 2: the ref_updates table (sync/refstore.py). 3: contexts.atom_index, a
# derived column (sync/atomindex.py). 4: contexts.seq, the order of
# storing, an INTEGER PRIMARY KEY that VACUUM keeps (the full-text index's
# position, sync/fulltext.py). An older store is upgraded in place when
# opened; this code refuses a store of a later schema.
SCHEMA_VERSION = 4


class StoreError(Exception):
    """Base of the store's errors; messages are one line, fit for a user."""


class NotFound(StoreError, LookupError):
    def __init__(self, context_id: str, kind: str = "context") -> None:
        super().__init__(f"no {kind} {context_id} in the store")
        self.context_id = context_id


class MissingBase(StoreError, ValueError):
    def __init__(self, context_id: str, base_id: str) -> None:
        super().__init__(f"context {context_id} names base {base_id}, which is not in the store")
        self.context_id = context_id
        self.base_id = base_id


class MissingTarget(MissingBase):
    """A ref update whose target context is not held. A MissingBase, so
    every caller maps it as one (MISSING_BASE): an update travels after
    the context it targets, as a base travels before its child."""

    def __init__(self, update_id: str, name: str, target: str) -> None:
        StoreError.__init__(self, f"ref update {update_id} sets {name!r:.80} to {target}, which is not in the store")
        self.context_id = self.update_id = update_id
        self.base_id = self.target = target
        self.name = name


class CorruptObject(StoreError):
    """A stored object's bytes no longer hash to its id (the disk or
    someone changed them): it is never served, decoded or sent."""

    def __init__(self, object_id: str) -> None:
        super().__init__(f"object {object_id} is damaged in the store (its bytes do not match its id); "
                         "run `ctxfs fsck`")
        self.object_id = object_id


class UnheldRemoval(StoreError, ValueError):
    """A context removes atoms its base's expansion does not hold: a wrong
    hash or a wrong base, never a change (`expand.check_removals`)."""

    def __init__(self, context_id: str, base_id: str | None, atom_ids: list[str]) -> None:
        more = f" and {len(atom_ids) - 1} more" if len(atom_ids) > 1 else ""
        where = f"its base {base_id}" if base_id is not None else "a root (it has no base)"
        super().__init__(f"context {context_id} removes atom {atom_ids[0]}{more}, which {where} does not hold")
        self.context_id = context_id
        self.base_id = base_id
        self.atom_ids = tuple(atom_ids)


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
    def put_encoded_batches(self, batches: Iterable[Sequence[bytes]], check: _Check | None = None,
                            checked: Sequence[list | None] | None = None) -> list[str]: ...
    def put_ref_updates(self, updates: Sequence[RefUpdate]) -> list[str]: ...
    def get(self, context_id: str) -> CompressedContext: ...
    def get_bytes(self, context_id: str) -> bytes: ...
    def has(self, context_id: str) -> bool: ...
    def holds(self, object_id: str) -> bool: ...
    def get_lineage(self, context_id: str) -> list[str]: ...
    def walk_back(self, context_id: str) -> Iterator[tuple[str, CompressedContext]]: ...
    def walk_back_bytes(self, context_id: str) -> Iterator[tuple[str, bytes]]: ...
    def walk_back_indexed(self, context_id: str, *, with_bytes: bool = True) -> Iterator[tuple[str, bytes | None, bytes]]: ...
    def send_order(self, object_ids: Collection[str]) -> SendOrder: ...
    def get_many_bytes(self, object_ids: Sequence[str]) -> list[bytes]: ...
    def ids(self, start: str | None = None) -> Iterator[str]: ...
    def heads(self) -> list[str]: ...
    def ref_table(self) -> RefTable: ...
    def ref_value(self, name: str) -> RefValue | None: ...
    def ref_frontier(self, name: str) -> list[RefUpdate]: ...
    def ref_updates_of(self, name: str) -> list[RefUpdate]: ...
    def fsck(self) -> Iterator[str]: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


# A batch after checking: contexts (id, context, bytes) and ref updates
# (id, update, bytes), each in batch order, and every id in batch order.
_Checked = tuple[list[tuple[str, CompressedContext | CheckedContext, bytes]], list[refstore.Entry], list[str]]
_Object = CompressedContext | CheckedContext | RefUpdate
# A caller's rules for the contexts of a put (raises to refuse it all):
# it sees each context's id, what the check of its bytes found, and the bytes.
_Check = Callable[[list[tuple[str, CheckedContext, bytes]]], None]


def _decode_batch(blobs: Sequence[bytes], *, objects: bool = True) -> list[tuple[_Object, bytes]]:
    """Strictly decode bytes from outside (canonical form, and a ref
    update's signature) or raise DecodeError. The first bytes tell the
    kinds apart (docs/protocol.md, section 10). Contexts become model
    objects only with `objects`; else they are checked to the same rules
    without them (sync/rawcheck.py): all a store needs is base and index."""
    out: list[tuple[_Object, bytes]] = []
    decode = (lambda data: decode_context(data, verify=True)) if objects else check_context_bytes
    for raw in blobs:
        data = bytes(raw)
        if is_ref_update_bytes(data):
            out.append((decode_update(data, verify=True), data))
        else:
            out.append((decode(data), data))
    return out


def check_blobs(blobs: Sequence[bytes]) -> list[_Object]:
    """What a store's put checks of canonical bytes from outside, without a
    store: each blob's CheckedContext or RefUpdate, in order, or DecodeError.
    Pure, so it may run in another process (daemon/checker.py); its result
    is `put_encoded_batches`'s `checked`."""
    return [obj for obj, _data in _decode_batch(blobs, objects=False)]


def _paired(objects: list[_Object], blobs: Sequence[bytes]) -> list[tuple[_Object, bytes]]:
    if len(objects) != len(blobs):
        raise ValueError(f"{len(objects)} checked objects for {len(blobs)} blobs")
    return [(obj, bytes(blob)) for obj, blob in zip(objects, blobs)]


def _encode_updates(updates: Sequence[RefUpdate]) -> list[tuple[_Object, bytes]]:
    """Updates made here: checked like bytes from outside, signature included
    (a RefUpdate built by hand is not authentic until it verifies)."""
    for update in updates:
        verify_update(update)
    return [(u, encode_update(u)) for u in updates]


def _check_encoded(pairs: Sequence[tuple[_Object, bytes]], has,
                   look_up: Callable[[set[str]], None] | None = None) -> _Checked:
    """Check every base and every target is held or earlier in the batch.
    `look_up`, if given, first sees every base and target that no context
    earlier in the batch provides, to find them at once before `has` is
    asked about each."""
    contexts, updates, order = [], [], []
    known: set[str] = set()
    oids = [bytes_id(data) for _obj, data in pairs]
    if look_up is not None:
        earlier: set[str] = set()
        outside: set[str] = set()
        for (obj, _data), oid in zip(pairs, oids):
            ref = _needs(obj)
            if ref is not None and ref not in earlier:
                outside.add(ref)
            if not isinstance(obj, RefUpdate):
                earlier.add(oid)
        look_up(outside)
    for (obj, data), oid in zip(pairs, oids):
        if isinstance(obj, RefUpdate):
            if obj.target is not None and obj.target not in known and not has(obj.target):
                raise MissingTarget(oid, obj.name, obj.target)
            updates.append((oid, obj, data))
        else:
            if len(data) > MAX_CONTEXT_BYTES:
                raise ContextTooLarge(len(data))
            if obj.base_hash is not None and obj.base_hash not in known and not has(obj.base_hash):
                raise MissingBase(oid, obj.base_hash)
            known.add(oid)
            contexts.append((oid, obj, data))
        order.append(oid)
    return contexts, updates, order


def _needs(obj: _Object) -> str | None:
    """The object a checked object must come after: its base or target."""
    return obj.target if isinstance(obj, RefUpdate) else obj.base_hash


class InMemoryContextStore:
    """A dict-backed store with the same behaviour as the SQLite one (not
    thread-safe: one thread at a time)."""

    def __init__(self) -> None:
        self._objects: dict[str, tuple[CompressedContext, bytes]] = {}
        self._indexes: dict[str, bytes] = {}  # context id -> atom index (derived)
        self._updates: dict[str, tuple[RefUpdate, bytes]] = {}
        self._has_children: set[str] = set()
        self._refs = refstore.RefCache(lambda: [data for _u, data in self._updates.values()])

    def put(self, ctx: CompressedContext) -> str:
        return self.put_many([ctx])[0]

    def put_many(self, contexts: Sequence[CompressedContext]) -> list[str]:
        return self._insert(_check_encoded([(ctx, encode_context(ctx)) for ctx in contexts], self.has))

    def put_encoded(self, blobs: Sequence[bytes]) -> list[str]:
        """Store canonical bytes from outside, verified: the receive path."""
        return self._insert(_check_encoded(_decode_batch(blobs), self.has))

    def put_encoded_batches(self, batches: Iterable[Sequence[bytes]], check: _Check | None = None,
                            checked: Sequence[list | None] | None = None) -> list[str]:
        """`put_encoded` of every batch, all or nothing (see the SQLite store;
        this store keeps model objects, so it decodes `checked` batches too)."""
        result = _check_encoded(_decode_batch([blob for batch in batches for blob in batch]), self.has)
        if check is not None:
            check([(cid, check_context_bytes(data), data) for cid, _ctx, data in result[0]])
        return self._insert(result)

    def put_ref_updates(self, updates: Sequence[RefUpdate]) -> list[str]:
        """Store ref updates made here (by `refs.updates_for_write`), in order."""
        return self._insert(_check_encoded(_encode_updates(updates), self.has))

    def _insert(self, batch: _Checked) -> list[str]:
        contexts, updates, order = batch
        for cid, ctx, data in contexts:
            self._objects.setdefault(cid, (ctx, data))
            if cid not in self._indexes:
                self._indexes[cid] = atomindex.build(ctx)
            if ctx.base_hash is not None:
                self._has_children.add(ctx.base_hash)
        for uid, update, data in updates:
            self._updates.setdefault(uid, (update, data))
        self._refs.added(u for _uid, u, _data in updates)
        return order

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

    def holds(self, object_id: str) -> bool:
        check_id(object_id, "object id")
        return object_id in self._objects or object_id in self._updates

    def walk_back(self, context_id: str) -> Iterator[tuple[str, CompressedContext]]:
        current: str | None = context_id
        while current is not None:
            ctx = self.get(current)
            yield current, ctx
            current = ctx.base_hash

    def walk_back_bytes(self, context_id: str) -> Iterator[tuple[str, bytes]]:
        for cid, _ctx in self.walk_back(context_id):
            yield cid, self._objects[cid][1]

    def walk_back_indexed(self, context_id: str, *, with_bytes: bool = True) -> Iterator[tuple[str, bytes | None, bytes]]:
        """As walk_back_bytes, with each context's atom index (the bytes
        None unless `with_bytes`)."""
        for cid, data in self.walk_back_bytes(context_id):
            yield cid, data if with_bytes else None, self._indexes[cid]

    def send_order(self, object_ids: Collection[str]) -> SendOrder:
        """The given objects and their encoded sizes: contexts every base
        before its children, then ref updates (after every context they may target)."""
        wanted = set(object_ids)
        for object_id in wanted:
            check_id(object_id, "object id")
        updates = sorted(i for i in wanted if i in self._updates)
        depth = {cid: len(self.get_lineage(cid)) for cid in wanted if cid not in self._updates}
        contexts = sorted(depth, key=lambda c: (depth[c], c))
        return SendOrder([(bytes.fromhex(cid), len(self._objects[cid][1])) for cid in contexts]
                         + [(bytes.fromhex(uid), len(self._updates[uid][1])) for uid in updates])

    def get_many_bytes(self, object_ids: Sequence[str]) -> list[bytes]:
        """Canonical bytes of the given objects (either kind), in the given order."""
        return [self._updates[oid][1] if oid in self._updates else self.get_bytes(oid) for oid in object_ids]

    def get_lineage(self, context_id: str) -> list[str]:
        lineage = [cid for cid, _ in self.walk_back(context_id)]
        lineage.reverse()
        return lineage

    def ids(self, start: str | None = None) -> Iterator[str]:
        """Every object id (contexts and ref updates), ascending, from `start`."""
        if start is not None:
            check_id(start, "start id")
        held = [*self._objects, *self._updates]
        return iter(sorted(oid for oid in held if start is None or oid >= start))

    def heads(self) -> list[str]:
        return sorted(cid for cid in self._objects if cid not in self._has_children)

    def ref_table(self) -> RefTable:
        """Every stored ref update as a table of its own (a copy)."""
        return self._refs.snapshot()

    def ref_value(self, name: str) -> RefValue | None:
        return self._refs.value(name)

    def ref_frontier(self, name: str) -> list[RefUpdate]:
        return self._refs.frontier(name)

    def ref_updates_of(self, name: str) -> list[RefUpdate]:
        """Every stored update of `name`, newest first."""
        return self._refs.log(name)

    def fsck(self) -> Iterator[str]:
        """Problems found, one line each: ids, bases, ref updates (as SQLite's)."""
        for cid, (ctx, data) in sorted(self._objects.items()):
            if bytes_id(data) != cid:
                yield f"{cid}: stored bytes do not hash to the id"
            elif ctx.base_hash is not None and ctx.base_hash not in self._objects:
                yield f"{cid}: base {ctx.base_hash} is missing"
            elif self._indexes.get(cid) != atomindex.build(ctx):
                yield f"{cid}: {_BAD_ATOM_INDEX}"
        for uid, (_update, data) in sorted(self._updates.items()):
            problem = refstore.check_stored_update(uid, data, self._objects.__contains__)
            if problem is not None:
                yield problem

    def __len__(self) -> int:
        """Objects held: contexts and ref updates (as many as `ids()` yields)."""
        return len(self._objects) + len(self._updates)

    def close(self) -> None:
        pass


# A rowid table since schema 3: a row holds up to 12 MB, and a WITHOUT
# ROWID table keeps whole rows in its one b-tree, whose fan-out was then a
# handful of rows a page: one step of a lineage walk cost ~50x a step
# through the id index of a rowid table. The derived atom index comes
# before the bytes, so reading it does not walk their overflow pages.
# Since schema 4 the rowid has a name, `seq`: as an INTEGER PRIMARY KEY it
# keeps its values through VACUUM, so the full-text index may say how far
# it got as a seq. The table's layout is as in schema 3 (the id is the same
# unique index into the same rowid b-tree).
_CONTEXTS_TABLE = """
CREATE TABLE IF NOT EXISTS contexts (
    seq   INTEGER PRIMARY KEY,       -- order of storing: max + 1 (contexts are never deleted)
    id    BLOB NOT NULL UNIQUE,      -- SHA-256 of data
    base  BLOB,                      -- parent id, NULL for a root
    depth INTEGER NOT NULL,          -- 0 for a root, base's depth + 1 otherwise
    atom_index BLOB,                 -- derived from data (sync.atomindex)
    data  BLOB NOT NULL              -- canonical encoding (sync.codec)
)"""
_CONTEXTS_BASE_INDEX = "CREATE INDEX IF NOT EXISTS contexts_base ON contexts(base)"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
{_CONTEXTS_TABLE};
{_CONTEXTS_BASE_INDEX};
""" + refstore.REF_SCHEMA

_BAD_ATOM_INDEX = "derived atom index disagrees with the stored context (ctxfs fsck --repair rebuilds it)"
# Contexts read per slice while (re)building atom indexes: bounded memory.
_INDEX_PAGE = 256

_LINEAGE = """
WITH RECURSIVE chain(id, base) AS (
    SELECT id, base FROM contexts WHERE id = ?
    UNION ALL
    SELECT c.id, c.base FROM contexts c JOIN chain ON c.id = chain.base
)
SELECT chain.id, contexts.data FROM chain JOIN contexts ON contexts.id = chain.id
"""
# The rows travel through the recursion itself: SQLite then runs it as a
# co-routine, and a walk that stops after a row or two reads a row or two
# (a join after the recursion materialises the whole chain first).
_LINEAGE_INDEXED = """
WITH RECURSIVE chain(id, base, data, atom_index) AS (
    SELECT id, base, data, atom_index FROM contexts WHERE id = ?
    UNION ALL
    SELECT c.id, c.base, c.data, c.atom_index FROM contexts c JOIN chain ON c.id = chain.base
)
SELECT id, data, atom_index FROM chain
"""
_LINEAGE_INDEX_ONLY = """
WITH RECURSIVE chain(id, base, atom_index) AS (
    SELECT id, base, atom_index FROM contexts WHERE id = ?
    UNION ALL
    SELECT c.id, c.base, c.atom_index FROM contexts c JOIN chain ON c.id = chain.base
)
SELECT id, NULL, atom_index FROM chain
"""


def _verified(object_id: str, data: bytes) -> bytes:
    """`data` if it hashes to `object_id`, else CorruptObject. Every read
    that hands stored bytes on goes through this (as git checks hashes on
    read): hashing costs little next to decoding what it guards."""
    if bytes_id(data) != object_id:
        raise CorruptObject(object_id)
    return data


def _id_chunks(object_ids: Iterable[str], size: int = 500) -> Iterator[list[bytes]]:
    """Ids as blobs, in slices under SQLite's bound-variable limit."""
    blobs = (bytes.fromhex(check_id(c, "object id")) for c in object_ids)
    while chunk := list(itertools.islice(blobs, size)):
        yield chunk


# A context's place in a push: depth, id, size (big-endian: bytes order is
# (depth, id) order, parents first).
_ORDER_KEY = struct.Struct(">I32sI")
# send_order reads every row rather than looking the ids up when it is
# asked for at least 1/_SCAN_FRACTION of the store. Measured on 100k small
# contexts: ~1.2 us a row read in order and tested for membership, ~7 us
# an id looked up (0.2 s against 0.67 s for all of them). Below
# _SCAN_MIN ids the look-ups cost little, and so does not counting the
# store's rows to decide.
_SCAN_FRACTION = 4
_SCAN_MIN = 1000


def _marks(values: Sequence) -> str:
    return ",".join("?" * len(values))


def _not_among(chunk: list[bytes], found: Iterable[bytes]) -> list[bytes]:
    """The ids of `chunk` not found in one table: to look for in the other."""
    found = set(found)
    return [] if len(found) == len(chunk) else [k for k in chunk if k not in found]


class SQLiteContextStore:
    """The embedded default store: one SQLite file in WAL mode.

    `synchronous=FULL`: a put returns only after its transaction is on disk,
    so a context acknowledged to a peer or a client survives power loss, not
    just a crash of the process. (NORMAL in WAL mode may lose the last
    commits on power loss; that would break the protocol's ACK promise.)

    One connection, guarded by a lock, so the daemon may call it from worker
    threads; SQLite serialises writers anyway.

    Reads that hand stored bytes on (`get_bytes`, `get`, `walk_back*`,
    `get_many_bytes`) hash them first and raise CorruptObject if the file
    no longer holds what was put: a damaged row is never expanded, shown
    or sent. (The memory store keeps the bytes it checked on put.)
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
        self._refs = refstore.RefCache(lambda: refstore.sqlite_all_bytes(self._db))
        with self._transaction():
            # Creates what is missing: everything in a new file, the
            # ref_updates table in a schema-1 store (its upgrade to 2).
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(statement)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                # A new store gets its (empty) full-text index now; text
                # queries and the daemon catch it up with what is stored.
                fulltext.reset(self._db)
            elif row[0] in ("1", "2", "3"):
                # 1 -> 2 was the ref_updates table, created above; 2 -> 3
                # and 3 -> 4 copy contexts into the current table (below).
                # All in this transaction: a store is either upgraded whole
                # or not at all.
                self._upgrade_contexts(int(row[0]))
                fulltext.upgrade_marker(self._db)
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
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
        """Store canonical bytes from outside, verified: the receive path.
        Contexts and ref updates may come mixed; all or nothing is stored."""
        return self._insert(_decode_batch(blobs, objects=False))

    def put_encoded_batches(self, batches: Iterable[Sequence[bytes]], check: _Check | None = None,
                            checked: Sequence[list | None] | None = None) -> list[str]:
        """`put_encoded` of every batch in one transaction: all or nothing.

        For a put too large to decode at once (a whole push through the
        daemon): each batch is verified and inserted in turn, and a later
        batch may build on an earlier one (the transaction sees its own
        rows). The batches may be read lazily, e.g. from a spool file.
        `check(contexts)`, if given, sees each batch's contexts (id, what
        checking the bytes found, the bytes) before they are inserted
        (reads inside it see the batches before) and refuses the whole put
        by raising: the rules for contexts written here. `checked`, if
        given, holds for each batch `check_blobs(batch)` made elsewhere (a
        worker process) or None to check it here.
        """
        if checked is None:
            return self._insert_batches((_decode_batch(blobs, objects=False) for blobs in batches), check)
        return self._insert_batches((_decode_batch(blobs, objects=False) if objects is None else _paired(objects, blobs)
                                     for blobs, objects in zip(batches, checked, strict=True)), check)

    def put_ref_updates(self, updates: Sequence[RefUpdate]) -> list[str]:
        """Store ref updates made here (by `refs.updates_for_write`), in order."""
        return self._insert(_encode_updates(updates))

    def _insert(self, pairs: Sequence[tuple[_Object, bytes]]) -> list[str]:
        return self._insert_batches([pairs])

    def _insert_batches(self, batches: Iterable[Sequence[tuple[_Object, bytes]]],
                        check: _Check | None = None) -> list[str]:
        # The lock spans the commit and the cache update: no reader sees
        # the table without an update the file holds.
        order: list[str] = []
        added: list[RefUpdate] = []
        # Depth of each context inserted in this put or held before it that
        # one of the put builds on (looked up a chunk of ids at a time):
        # what is not in it by the time a context needs it is not held.
        depths: dict[str, int] = {}
        with self._lock:
            with self._transaction():
                for pairs in batches:
                    look_up = functools.partial(self._look_up_depths, depths)
                    contexts, updates, ids = _check_encoded(pairs, depths.__contains__, look_up)
                    if check is not None:
                        check(contexts)  # CheckedContexts: decoded with objects=False
                    self._insert_contexts(contexts, depths)
                    refstore.sqlite_insert(self._db, updates)
                    order += ids
                    added += (u for _uid, u, _data in updates)
            self._refs.added(added)
        return order

    def _insert_contexts(self, batch: list[tuple[str, CompressedContext | CheckedContext, bytes]],
                         depths: dict[str, int]) -> None:
        # _check_encoded saw every base in `depths` (held, or earlier in the put).
        rows = []
        for cid, ctx, data in batch:
            base = ctx.base_hash
            depth = 0 if base is None else depths[base] + 1
            depths[cid] = depth
            index = ctx.index if type(ctx) is CheckedContext else atomindex.build(ctx)
            rows.append((bytes.fromhex(cid), None if base is None else bytes.fromhex(base), depth, data, index))
        # One statement for the batch: a row-at-a-time loop hands the GIL
        # back and forth with the event loop thread once per context. The
        # full-text index is not touched: it catches up later, by seq
        # (index_text_page), off the write path.
        self._db.executemany(
            "INSERT OR IGNORE INTO contexts (id, base, depth, data, atom_index) VALUES (?, ?, ?, ?, ?)", rows
        )

    def _look_up_depths(self, depths: dict[str, int], context_ids: set[str]) -> None:
        """Depths of those of `context_ids` held here, into `depths`: a
        put's bases from earlier puts (a bulk sync commits children a
        transaction after their parents) cost one SELECT per chunk, not one
        each (~10 µs)."""
        for chunk in _id_chunks([c for c in context_ids if c not in depths]):
            rows = self._db.execute(f"SELECT id, depth FROM contexts WHERE id IN ({_marks(chunk)})", chunk)
            depths.update((oid.hex(), depth) for oid, depth in rows)

    def get_bytes(self, context_id: str) -> bytes:
        check_id(context_id, "context id")
        with self._lock:
            row = self._db.execute("SELECT data FROM contexts WHERE id = ?", (bytes.fromhex(context_id),)).fetchone()
        if row is None:
            raise NotFound(context_id)
        return _verified(context_id, row[0])

    def get(self, context_id: str) -> CompressedContext:
        # Our own bytes, checked when they were put and hashed again on
        # read (get_bytes); fsck re-verifies their form too.
        return decode_context(self.get_bytes(context_id), verify=False)

    def has(self, context_id: str) -> bool:
        check_id(context_id, "context id")
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM contexts WHERE id = ?", (bytes.fromhex(context_id),)
            ).fetchone() is not None

    def holds(self, object_id: str) -> bool:
        """A context or a ref update of this id is stored."""
        key = bytes.fromhex(check_id(object_id, "object id"))
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM contexts WHERE id = ? UNION ALL SELECT 1 FROM ref_updates WHERE id = ?", (key, key)
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
                yield cid.hex(), _verified(cid.hex(), data)
            batch = min(batch * 2, 256)
            with self._lock:
                rows = cursor.fetchmany(batch)

    def walk_back_indexed(self, context_id: str, *, with_bytes: bool = True) -> Iterator[tuple[str, bytes | None, bytes]]:
        """As walk_back_bytes, with each context's atom index
        (sync/atomindex.py); the bytes are None unless `with_bytes` (a
        reader that needs the bytes of a few contexts only reads a tenth
        of the rows' size: get_bytes for those)."""
        check_id(context_id, "context id")
        cursor = self._db.cursor()
        batch = 4  # as in walk_back_bytes: small first, growing
        with self._lock:
            cursor.execute(_LINEAGE_INDEXED if with_bytes else _LINEAGE_INDEX_ONLY, (bytes.fromhex(context_id),))
            rows = cursor.fetchmany(batch)
        if not rows:
            raise NotFound(context_id)
        while rows:
            for cid, data, index in rows:
                # Bytes handed on are hashed first, as every read's (_verified).
                yield cid.hex(), None if data is None else _verified(cid.hex(), data), index
            batch = min(batch * 2, 256)
            with self._lock:
                rows = cursor.fetchmany(batch)

    def walk_back(self, context_id: str) -> Iterator[tuple[str, CompressedContext]]:
        for cid, data in self.walk_back_bytes(context_id):
            # Our own bytes, checked when they were put and hashed again on
            # read (walk_back_bytes); fsck re-verifies their form too.
            yield cid, decode_context(data, verify=False)

    def send_order(self, object_ids: Collection[str]) -> SendOrder:
        """The given objects and their encoded sizes: contexts every base
        before its children, then ref updates (after every context they may target).

        Sizes, not bytes: a sender reads the bytes one message at a time, so
        its memory is bounded by a message, not by what it has to send. A
        row is one 40-byte key while the order is sorted (~80 bytes an
        object, where a tuple of depth, id and size took ~190).
        """
        wanted = object_ids if isinstance(object_ids, AbstractSet) else set(object_ids)
        # A request for much of the store (a newcomer's) is read in one pass
        # over the tables: a row read in order costs a sixth of a look-up.
        # (A small one is looked up without counting the store first.)
        if len(wanted) >= _SCAN_MIN and len(wanted) * _SCAN_FRACTION >= len(self):
            contexts, updates = self._order_rows_scanned(wanted)
        else:
            contexts, updates = self._order_rows_looked_up(wanted)
        if len(contexts) + len(updates) != len(wanted):
            for object_id in wanted:  # a malformed id is a ValueError, whichever path ran
                check_id(object_id, "object id")
            found = {key[4:36] for key in contexts} | {row[0] for row in updates}
            raise NotFound(next(c for c in wanted if bytes.fromhex(c) not in found), "object")
        contexts.sort()
        updates.sort()
        keys = map(_ORDER_KEY.unpack, contexts)
        return SendOrder(itertools.chain(((cid, size) for _depth, cid, size in keys), updates))

    def _order_rows_looked_up(self, wanted: AbstractSet[str]) -> tuple[list[bytes], list[tuple[bytes, int]]]:
        """(_ORDER_KEY of each context, (id, size) of each ref update) of
        `wanted` held, looked up by id 500 at a time."""
        contexts: list[bytes] = []
        updates: list[tuple[bytes, int]] = []
        for chunk in _id_chunks(wanted):
            with self._lock:
                rows = self._db.execute(
                    f"SELECT depth, id, length(data) FROM contexts WHERE id IN ({_marks(chunk)})", chunk
                ).fetchall()
                rest = _not_among(chunk, (row[1] for row in rows))
                if rest:  # ref updates, or not held (objects are mostly contexts)
                    updates += self._db.execute(
                        f"SELECT id, length(data) FROM ref_updates WHERE id IN ({_marks(rest)})", rest
                    ).fetchall()
            contexts += itertools.starmap(_ORDER_KEY.pack, rows)
        return contexts, updates

    def _order_rows_scanned(self, wanted: AbstractSet[str]) -> tuple[list[bytes], list[tuple[bytes, int]]]:
        """The same rows, from one pass over each table."""
        with self._lock:
            contexts = [_ORDER_KEY.pack(depth, cid, size) for depth, cid, size
                        in self._db.execute("SELECT depth, id, length(data) FROM contexts") if cid.hex() in wanted]
            updates = [(uid, size) for uid, size
                       in self._db.execute("SELECT id, length(data) FROM ref_updates") if uid.hex() in wanted]
        return contexts, updates

    def get_many_bytes(self, object_ids: Sequence[str]) -> list[bytes]:
        """Canonical bytes of the given objects (either kind), in the given order."""
        found: dict[bytes, bytes] = {}
        for chunk in _id_chunks(object_ids):
            with self._lock:
                rows = self._db.execute(f"SELECT id, data FROM contexts WHERE id IN ({_marks(chunk)})", chunk).fetchall()
                found.update(rows)
                rest = _not_among(chunk, (row[0] for row in rows))
                if rest:
                    found.update(self._db.execute(
                        f"SELECT id, data FROM ref_updates WHERE id IN ({_marks(rest)})", rest).fetchall())
        try:
            return [_verified(oid, found[bytes.fromhex(oid)]) for oid in object_ids]
        except KeyError as exc:
            raise NotFound(exc.args[0].hex(), "object") from None

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
        """Every object id (contexts and ref updates) in ascending order, from
        `start` (inclusive), fetched in pages."""
        after = b"" if start is None else bytes.fromhex(check_id(start, "start id"))
        op = ">="
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT id FROM contexts WHERE id {op} ? UNION ALL"
                    f" SELECT id FROM ref_updates WHERE id {op} ? ORDER BY id LIMIT 1024", (after, after)
                ).fetchall()
            if not rows:
                return
            for (oid,) in rows:
                yield oid.hex()
            after, op = rows[-1][0], ">"

    def heads(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM contexts o WHERE NOT EXISTS"
                " (SELECT 1 FROM contexts c WHERE c.base = o.id) ORDER BY id"
            ).fetchall()
        return [r[0].hex() for r in rows]

    def ref_table(self) -> RefTable:
        """Every stored ref update as a table of its own (a copy: safe to
        read in any thread while the store goes on writing)."""
        with self._lock:
            return self._refs.snapshot()

    def ref_value(self, name: str) -> RefValue | None:
        with self._lock:
            return self._refs.value(name)

    def ref_frontier(self, name: str) -> list[RefUpdate]:
        """The updates of `name` no stored update supersedes, newest first."""
        with self._lock:
            return self._refs.frontier(name)

    def ref_updates_of(self, name: str) -> list[RefUpdate]:
        """Every stored update of `name`, newest first."""
        with self._lock:
            return self._refs.log(name)

    # ---------------------------------------------- the full-text index (derived)

    def text_ranks(self, text: str) -> dict[str, float] | None:
        """Atom id -> FTS5 rank (lower is better) of every stored atom that
        matches `text` (sync/fulltext.py), catching the index up first with
        every context stored before (building it if missing or stale); None
        if it is not current and the store cannot be written now (the
        caller searches the expansion alone)."""
        with self._lock:
            if fulltext.state(self._db) == fulltext.CURRENT:
                return fulltext.search(self._db, text)
        try:
            # Page by page, each its own transaction: other threads' writes
            # go on in between...
            while self.index_text_page():
                pass
            with self._lock:
                # ...then what they wrote meanwhile, holding the lock on to
                # the search: it sees every context stored before it.
                while self.index_text_page():
                    pass
                return fulltext.search(self._db, text)
        except StoreUnavailable:
            return None

    def index_text_page(self) -> int:
        """Catch the full-text index up by one page, in one transaction:
        how many contexts were indexed, 0 when it covers them all (then
        nothing is written). The daemon calls it between writes
        (daemon/indexer.py); a text query calls it until it returns 0."""
        with self._lock:
            if fulltext.state(self._db) == fulltext.CURRENT:
                return 0  # no write: a store that cannot be written answers too
            with self._transaction():
                return fulltext.catch_up(self._db)

    def rebuild_text_index(self) -> int:
        """Drop the full-text index and build it again from every stored
        context, a page per transaction; the number of distinct atoms it
        then holds."""
        with self._transaction():
            fulltext.reset(self._db)
        while self.index_text_page():
            pass
        with self._lock:
            return fulltext.indexed_atoms(self._db)

    # ------------------------------------------ the atom index column (derived)

    def rebuild_atom_indexes(self) -> int:
        """Recompute every context's atom index from its bytes (what
        `fsck --repair` does); the number of rows that were wrong."""
        with self._transaction():
            return self._build_atom_indexes()

    def _upgrade_contexts(self, schema: int) -> None:
        """Copy contexts of an older schema into the current table (in the
        caller's transaction). The file needs room for both copies until
        the old one is dropped. From schema 3: in one statement, each row
        keeping its rowid as its seq. From 1 or 2 (WITHOUT ROWID, no atom
        index): a page at a time, computing each row's atom index; seqs
        follow id order."""
        old = f"contexts_schema_{schema}"
        self._db.execute(f"ALTER TABLE contexts RENAME TO {old}")
        self._db.execute("DROP INDEX IF EXISTS contexts_base")
        self._db.execute(_CONTEXTS_TABLE)
        if schema == 3:
            self._db.execute(
                "INSERT INTO contexts (seq, id, base, depth, atom_index, data)"
                f" SELECT rowid, id, base, depth, atom_index, data FROM {old} ORDER BY rowid"
            )
        else:
            after = b""
            while rows := self._db.execute(
                f"SELECT id, base, depth, data FROM {old} WHERE id > ? ORDER BY id LIMIT ?", (after, _INDEX_PAGE)
            ).fetchall():
                copied = []
                for cid, base, depth, data in rows:
                    try:
                        index = atomindex.build(decode_context(data, verify=False))
                    except DecodeError:
                        index = None  # a damaged row: copied as it is, for fsck to name
                    copied.append((cid, base, depth, index, data))
                self._db.executemany(
                    "INSERT INTO contexts (id, base, depth, atom_index, data) VALUES (?, ?, ?, ?, ?)", copied
                )
                after = rows[-1][0]
        self._db.execute(f"DROP TABLE {old}")
        self._db.execute(_CONTEXTS_BASE_INDEX)

    def _build_atom_indexes(self) -> int:
        # In the caller's transaction. Our own bytes, checked when they were
        # put: a context that no longer decodes is left for fsck to name.
        changed = 0
        after = b""
        while True:
            rows = self._db.execute(
                "SELECT id, data, atom_index FROM contexts WHERE id > ? ORDER BY id LIMIT ?", (after, _INDEX_PAGE)
            ).fetchall()
            if not rows:
                return changed
            updates = []
            for cid, data, old in rows:
                try:
                    index = atomindex.build(decode_context(data, verify=False))
                except DecodeError:
                    continue
                if index != old:
                    updates.append((index, cid))
            self._db.executemany("UPDATE contexts SET atom_index = ? WHERE id = ?", updates)
            changed += len(updates)
            after = rows[-1][0]

    def text_index_state(self) -> str:
        """fulltext.CURRENT, BEHIND, MISSING or STALE."""
        with self._lock:
            return fulltext.state(self._db)

    def __len__(self) -> int:
        """Objects held: contexts and ref updates (as many as `ids()` yields)."""
        with self._lock:
            return self._db.execute(
                "SELECT (SELECT count(*) FROM contexts) + (SELECT count(*) FROM ref_updates)"
            ).fetchone()[0]

    def _read(self, sql: str, args: tuple) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def fsck(self) -> Iterator[str]:
        """Problems found, one line each: SQLite integrity, ids, encodings,
        lineages; ref updates' signatures and targets."""
        with self._lock:
            result = self._db.execute("PRAGMA integrity_check").fetchall()
        if result != [("ok",)]:
            for (line,) in result:
                yield f"sqlite: {line}"
        with self._lock:
            # Contexts up to here must be in the full-text index; those after
            # are merely not indexed yet (no problem: the next query does it).
            covered = fulltext.covered(self._db)
        after = b""
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT c.id, c.base, c.depth, c.data, b.depth, c.atom_index, c.seq FROM contexts c"
                    " LEFT JOIN contexts b ON b.id = c.base WHERE c.id > ? ORDER BY c.id LIMIT 512",
                    (after,),
                ).fetchall()
            if not rows:
                break
            for raw_id, base, depth, data, base_depth, index, seq in rows:
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
                elif index != atomindex.build(ctx):
                    yield f"{cid}: {_BAD_ATOM_INDEX}"
                elif covered is not None and seq <= covered and (
                        problem := fulltext.fsck_context(self._read, cid, ctx)):
                    yield problem  # the derived index misses atoms of a sound context it covers
            after = rows[-1][0]
        yield from refstore.sqlite_fsck(self._read, self.has)

    def close(self) -> None:
        with self._lock:
            self._db.close()
