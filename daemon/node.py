"""The node: one nursery owning the listener, the peer sessions and the local API.

The store is SQLite and blocking; every call to it (and to the expander,
which reads it) goes through `run_sync`, one worker thread at a time, so a
thread hop carries a whole batch. The set of ids held is mirrored in memory
(`IdSet`) for the root and for reconciliation: contexts and ref updates
alike, so the root commits to both and a ref update syncs like a context.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import heapq
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon import heap, neterrors
from daemon.checker import Checker
from daemon.config import NodeConfig, format_address, listen_scope
from daemon.fetches import Fetches
from daemon.indexer import TextIndexer
from daemon.logs import RateLimitedLog
from daemon.paths import HomePaths
from daemon.peers import PeerInfo, PeerTable
from sync import refs
from sync.append import build_append
from sync.codec import decode_context, encode_context
from sync.expand import ExpanderFunctor, check_removals
from sync.idset import IdSet
from sync.messages import Hello, make_hello
from sync.model import CompressedContext, MemoryAtom, check_id, check_new_context
from sync.rawcheck import CheckedContext
from sync.store import SQLiteContextStore, StoreUnavailable

log = logging.getLogger(__name__)
_refusals = RateLimitedLog(log)
T = TypeVar("T")

STATUS_SCHEMA = 2
# Names of refs in conflict listed in status at most (the first, sorted):
# a status document must stay one small message; `ctxfs ref list` has all.
MAX_STATUS_CONFLICTS = 1000
# After a write failed (disk full), receiving pauses this long before the
# store is probed again: peers' data is refused at once meanwhile, and the
# disk is not hammered with writes that cannot succeed.
STORE_RETRY_SECONDS = 5.0
# Inbound TLS handshakes under way at once, in all and from one source
# address. Each holds a task and a little TLS state for at most the HELLO
# timeout; members from other addresses always find room.
MAX_HANDSHAKES = 128
MAX_HANDSHAKES_PER_HOST = 16
# How long stored ids may wait for running reconciliations, or for the rest
# of a fetch, before entering the in-memory set (and the root) anyway.
MAX_INDEX_DELAY = 2.0
# How long a session that would reconcile waits for the node's other
# sessions to finish theirs and to bring what they asked for (see
# `sync_turn`). A write reaches a node from several neighbours at once;
# after the first has brought it, the roots match and the others need no
# reconciliation at all. Past this wait they go ahead anyway (a long bulk
# fetch must not hold up the rest): claims still keep objects from coming
# twice, only reconciliation bytes are spent.
SYNC_TURN_WAIT = 2.0


def _check_written(store, contexts: list[tuple[str, CheckedContext, bytes]]) -> None:
    """The rules for contexts written on this node (a push), not for what
    peers send: no empty root, no removals in a root, relevance in 0..1
    (`model.check_new_context`), no removal of an atom the base lacks.
    Judged on what checking the bytes found; the model's objects are made
    only to name a broken rule, or when something is removed (the walk
    of check_removals reads the batch's contexts)."""
    for _cid, checked, data in contexts:
        if not checked.meets_new_context_rules():
            check_new_context(decode_context(data, verify=False))  # raises, naming the field
    if any(checked.removes for _cid, checked, _data in contexts):
        check_removals(store, [decode_context(data, verify=False) for _cid, _checked, data in contexts])


class Node(PeerTable):
    def __init__(self, *, paths: HomePaths, config: NodeConfig, node_id: str) -> None:
        super().__init__()
        self.paths = paths
        self.config = config
        self.node_id = node_id
        self.node_id_bytes = bytes.fromhex(node_id)
        self.store: SQLiteContextStore | None = None
        self.expander: ExpanderFunctor | None = None
        self.index = IdSet()
        self.listen_address: tuple[str, int] | None = None
        self.sessions: dict[str, Any] = {}  # connected PeerSession by peer node id
        self._store_limiter = trio.CapacityLimiter(1)
        # Catches the full-text index up after writes settle (poked by _put).
        # Once a burst is stored and indexed, free heap goes back too.
        self.text_indexer = TextIndexer(lambda: self.run_sync(self.store.index_text_page),
                                        settled=self.release_memory_soon)
        self.checker = Checker()  # large received messages are checked in a worker process
        self._release_memory = trio.Event()
        self._reconciling = 0
        self._pending_ids: set[bytes] = set()  # stored, not yet in the index (never in it)
        self._pending_since = 0.0  # when the oldest of them was stored
        self._watchers: set[Callable[[], None]] = set()
        self._ref_watchers: set[Callable[[str], None]] = set()
        # What status shows of refs, kept in memory so status() never waits
        # on the store: the names that exist and those in conflict. Read once
        # at start, then re-read (in the store thread) for the names that
        # watch_refs reports changed; bounded by the number of refs.
        self._ref_names: set[str] = set()
        self._ref_conflicts: set[str] = set()
        self._refs_dirty: set[str] = set()
        self._refs_dirty_event = trio.Event()
        # This node's Ed25519 key (read in run): it signs the ref updates
        # written here. One write at a time, so that two writes here never
        # both supersede the same frontier (a conflict with ourselves).
        self._node_key: Ed25519PrivateKey | None = None
        self._ref_writes = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._inbound = 0  # inbound member sessions now (TLS done)
        self._handshakes: collections.Counter[str] = collections.Counter()  # TLS handshakes by source host
        # Why the store cannot be written now (status shows it), else None.
        self.store_error: str | None = None
        self._store_retry_at = 0.0
        # Which session brings which missing object (protocol version 2).
        self.fetches = Fetches()
        self._initiating = 0  # reconciliations our sessions started, running
        self._turn_changed = trio.Event()

    # ------------------------------------------------------------ store access

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking store/expander call in the node's one store thread."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._store_limiter)

    async def add_contexts(self, contexts: Sequence[CompressedContext]) -> list[str]:
        """Store contexts all-or-nothing (committed when this returns), then announce."""
        return await self.add_encoded([encode_context(c) for c in contexts])

    async def add_encoded(self, blobs: Sequence[bytes]) -> list[str]:
        """Verify and store canonical bytes all-or-nothing; announce a new root.

        Contexts and ref updates may come mixed (an update after the context
        it targets). Raises StoreUnavailable while the store cannot be
        written (receiving is paused, see _watch_store), MissingBase (or its
        MissingTarget) and DecodeError for objects that cannot be stored.
        """
        return [oid.hex() for oid in (await self.add_received([blobs]))[0]]

    async def add_received(self, batches: Sequence[Sequence[bytes]],
                           checked: Sequence[list | None] | None = None) -> tuple[list[bytes], int]:
        """add_encoded of the batches' objects in one transaction, decoded a
        batch at a time (memory for one batch's contexts, not all of them);
        the ids (32 bytes each, as ACKs carry them), and how many of the
        objects were new here. The batches are read blob by blob, never all
        at once (see sync/packed.py). `checked`: per batch, what the
        checking worker made of it, or None (daemon/checker.py)."""
        ids = await self._put(lambda: self.store.put_encoded_batches(batches, checked=checked))
        # Ids come back one per blob, in order: no second hash to tell which are new.
        stored = [bytes.fromhex(i) for i in ids]
        new_refs = [blob for oid, blob in zip(stored, itertools.chain.from_iterable(batches))
                    if refs.is_ref_update_bytes(blob) and not self.holds(oid)]
        fresh = self._stored(stored)
        if new_refs:
            # Stored and verified: decoding again is only unpacking.
            self._refs_changed(sorted({refs.decode_update(b, verify=False).name for b in new_refs}))
        return stored, fresh

    async def add_batches(self, batches: Callable[[], Iterable[Sequence[bytes]]]) -> list[str]:
        """Verify and store contexts written here (no ref updates), read
        from `batches()` — called in a worker thread, so it may read a file
        — all in one transaction; announce one new root. A push of the
        local API (daemon/pushes.py). The rules for new contexts apply
        (ValueError, UnheldRemoval: see `_check_written`); else raises as
        add_encoded."""
        store = self.store
        ids = await self._put(lambda: store.put_encoded_batches(batches(), check=functools.partial(_check_written, store)))
        self._stored([bytes.fromhex(i) for i in ids])
        return ids

    async def _put(self, put: Callable, *args) -> list[str]:
        if self.store_error is not None and trio.current_time() < self._store_retry_at:
            raise StoreUnavailable(f"{self.store_error} (receiving is paused)", disk_full=False)
        try:
            ids = await self.run_sync(put, *args)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            raise
        self.text_indexer.poke()
        if self.store_error is not None:
            self._store_recovered()
        return ids

    def _stored(self, ids: list[bytes]) -> int:
        """Committed ids enter the index (and the root changes once) now, or
        when the reconciliations in progress end, or when the objects this
        node asked its peers for have all come: a bulk fetch merges into the
        id set once, not once per commit (each merge rewrites most leaves of
        a large set). MAX_INDEX_DELAY bounds the wait. How many were new."""
        if self.fetches.owed():
            self.fetches.arrived(ids)
            self._poke_turn()
        new = {i for i in ids if not self.holds(i)}  # a set: an id twice in one commit counts once
        now = trio.current_time()
        if not self._pending_ids:
            self._pending_since = now
        self._pending_ids.update(new)
        stale = now - self._pending_since > MAX_INDEX_DELAY
        if not (self._reconciling or self.fetches.owed()) or stale:
            self._apply_pending()
        return len(new)

    # ------------------------------------------------------------ refs

    async def set_ref(self, name: str, target: str) -> list[str]:
        """Point ref `name` at context `target` (held here), superseding every
        value this node sees; returns the new update ids once committed and
        announced. MissingTarget if the context is not held."""
        return await self._write_ref(refs.check_ref_name(name), check_id(target, "ref target"))

    async def delete_ref(self, name: str) -> list[str]:
        """Delete ref `name` (a deletion update superseding what this node sees)."""
        return await self._write_ref(refs.check_ref_name(name), None)

    async def _write_ref(self, name: str, target: str | None) -> list[str]:
        if self._node_key is None:
            raise RuntimeError("the node is not running: it has no key to sign ref updates with")
        key, now = self._node_key, datetime.now(timezone.utc)

        def make() -> list[bytes]:
            table = refs.RefTable(self.store.ref_frontier(name))
            updates = refs.updates_for_write(table=table, name=name, target=target, key=key, time=now)
            return [refs.encode_update(u) for u in updates]

        async with self._ref_writes:
            blobs = await self.run_sync(make)
            # The same path as a peer's objects: verified, committed, then
            # the root changes and every peer hears of it at once.
            return await self.add_encoded(blobs)

    async def append_to_ref(
        self,
        name: str,
        delta_atoms: Sequence[MemoryAtom],
        removed_hashes: Sequence[str],
        metadata: dict[str, Any],
    ) -> tuple[str, list[str]]:
        """Build a context on ref `name`'s value (none if the ref does not
        exist) adding `delta_atoms` and removing `removed_hashes`, store it
        and point the ref at it: (context id, update ids).

        Read, build and write happen under the ref-write lock, so two
        appends here never build on the same value: neither loses the
        other's atoms. Refused (AppendRefused, a ValueError: BAD_REQUEST)
        if the ref is in conflict — building on one candidate and
        superseding all would drop the others' changes from view — or if a
        removed id is not an atom of the ref's value.
        """
        if self._node_key is None:
            raise RuntimeError("the node is not running: it has no key to sign ref updates with")
        name = refs.check_ref_name(name)
        key, now = self._node_key, datetime.now(timezone.utc)

        def make() -> tuple[str, list[bytes]]:
            context = build_append(self.store, self.expander, name, delta_atoms, removed_hashes, metadata)
            table = refs.RefTable(self.store.ref_frontier(name))
            updates = refs.updates_for_write(table=table, name=name, target=context.id, key=key, time=now)
            return context.id, [encode_context(context)] + [refs.encode_update(u) for u in updates]

        async with self._ref_writes:
            context_id, blobs = await self.run_sync(make)
            ids = await self.add_encoded(blobs)
        return context_id, ids[1:]

    def watch_refs(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call `callback(name)` (synchronously, must not block) after new
        updates of ref `name` are stored, written here or received from a
        peer. Read the value with `store.ref_value(name)` (via run_sync).
        Returns a function that stops the calls."""
        self._ref_watchers.add(callback)
        return lambda: self._ref_watchers.discard(callback)

    def _refs_changed(self, names: Sequence[str]) -> None:
        for name in names:
            for callback in list(self._ref_watchers):
                callback(name)

    def _note_ref_changed(self, name: str) -> None:
        self._refs_dirty.add(name)
        self._refs_dirty_event.set()

    def _update_ref_summary(self, values: dict[str, refs.RefValue | None]) -> None:
        for name, value in values.items():
            if value is None:
                self._ref_names.discard(name)
            else:
                self._ref_names.add(name)
            if value is not None and value.conflict:
                self._ref_conflicts.add(name)
            else:
                self._ref_conflicts.discard(name)

    async def _load_ref_summary(self) -> None:
        from daemon.endpoint import read_ref_values

        self._update_ref_summary(await self.run_sync(read_ref_values, self.store, None))

    async def _track_refs(self) -> None:
        """Keep status's ref summary current: one store-thread hop per batch
        of changed names, however many updates made them change."""
        while True:
            await self._refs_dirty_event.wait()
            self._refs_dirty_event = trio.Event()
            names, self._refs_dirty = self._refs_dirty, set()
            store = self.store
            self._update_ref_summary(await self.run_sync(lambda: {n: store.ref_value(n) for n in names}))

    def release_memory_soon(self) -> None:
        """Bulk work is over (a burst stored and indexed, a large push
        ACKed): hand the heap's free pages back (daemon/heap.py), in a
        worker thread, once; never blocks."""
        self._release_memory.set()

    async def _memory_releaser(self) -> None:
        while True:
            await self._release_memory.wait()
            self._release_memory = trio.Event()
            await trio.to_thread.run_sync(heap.trim)

    async def _apply_stale_ids(self) -> None:
        """New ids never wait for longer than MAX_INDEX_DELAY."""
        while True:
            await trio.sleep(MAX_INDEX_DELAY / 2)
            if self._pending_ids and trio.current_time() - self._pending_since > MAX_INDEX_DELAY:
                self._apply_pending()

    def _apply_pending(self) -> None:
        pending, self._pending_ids = self._pending_ids, set()
        if pending and self.index.add_many(pending):
            self._root_changed()

    # A reconciliation session needs the id set to hold still (sync/reconcile
    # checks it). New ids wait while sessions run, for at most this long;
    # then they go in anyway and the sessions restart.
    def begin_reconcile(self) -> None:
        self._reconciling += 1

    def end_reconcile(self) -> None:
        self._reconciling -= 1
        if not self._reconciling:
            self._apply_pending()

    def root(self) -> bytes:
        return self.index.root()

    # ------------------------------------------------------------ a store that cannot be written

    def _store_failed(self, exc: StoreUnavailable) -> None:
        first = self.store_error is None
        self.store_error = "disk full" if exc.disk_full else str(exc)
        self._store_retry_at = trio.current_time() + STORE_RETRY_SECONDS
        if first:
            log.warning("%s: receiving paused; reads go on; retrying every %g s", exc, STORE_RETRY_SECONDS)
            if self._nursery is not None:
                self._nursery.start_soon(self._watch_store)

    async def _watch_store(self) -> None:
        """While the store cannot be written: probe it now and then; once it
        can, resume (no restart needed)."""
        while self.store_error is not None:
            await trio.sleep_until(self._store_retry_at)
            if self.store_error is None:
                return
            try:
                await self.run_sync(self.store.probe_write)
            except StoreUnavailable as exc:
                self._store_failed(exc)
                continue
            self._store_recovered()

    def _store_recovered(self) -> None:
        log.warning("the store can be written again: receiving resumed")
        self.store_error = None
        # What peers could not give us meanwhile: ask them again now.
        for session in list(self.sessions.values()):
            session.resync()

    @contextlib.asynccontextmanager
    async def sync_turn(self):
        """Start a reconciliation once no other session of ours is running
        one or bringing what it asked for, or after SYNC_TURN_WAIT anyway;
        the caller checks the roots again when its turn comes."""
        with trio.move_on_after(SYNC_TURN_WAIT):
            # (A stalled session's claims do not hold the others up.)
            while self._initiating or self.fetches.owed_live(trio.current_time()):
                await self._turn_changed.wait()
        self._initiating += 1
        try:
            yield
        finally:
            self._initiating -= 1
            self._poke_turn()

    def _poke_turn(self) -> None:
        self._turn_changed.set()
        self._turn_changed = trio.Event()

    def release_fetches(self, session, *, resync: bool) -> None:
        """`session` will not bring what it claimed; with `resync`, the other
        sessions reconcile again and claim what is still missing."""
        owed = self.fetches.release(session)
        self._poke_turn()
        if owed and resync:
            for other in list(self.sessions.values()):
                if other is not session:
                    other.resync()

    def holds(self, context_id: bytes) -> bool:
        """Stored here (in the index, or committed and waiting to enter it)."""
        return context_id in self.index or context_id in self._pending_ids

    # ------------------------------------------------------------ change notification

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (synchronously, must not block) whenever the root changes."""
        self._watchers.add(callback)
        return lambda: self._watchers.discard(callback)

    def _root_changed(self) -> None:
        for callback in list(self._watchers):
            callback()

    # ------------------------------------------------------------ protocol

    def hello(self) -> Hello:
        return make_hello(node_id=self.node_id_bytes, root=self.root(), count=len(self.index))

    # ------------------------------------------------------------ status

    def status(self) -> dict:
        """The schema-2 status document; `in_sync` compares roots as they are now.

        Cheap and non-blocking: `refs` (how many exist) and `conflicts` (the
        names in conflict, sorted) come from the in-memory summary that
        _track_refs keeps, never from the store.

        A peer known both as a static address and as an inbound connection
        (both sides dialled) is one row: the live session's, under the
        address it was configured or discovered with. `goodbye` and
        `disconnected_at` say how and when its latest session ended;
        `listen` where it accepts connections, when known. Rows of peers
        absent too long (FORGET_ABSENT_PEERS_SECONDS) are dropped first.
        """
        self._forget_absent()
        root = self.root()
        # Ids committed here but not yet in the root (they wait while a
        # reconciliation runs): peers lack them, whatever the roots say.
        unannounced = any(i not in self.index for i in self._pending_ids)
        rows: dict[str, dict] = {}
        ended: dict[str, datetime] = {}
        preference = {"static": 0, "mdns": 1, "inbound": 2}
        for info in sorted(self.peers.values(), key=lambda p: preference.get(p.source, 3)):
            key = info.node_id or info.address
            live = self.sessions.get(info.node_id) if info.node_id else None
            live_info = live.info if live is not None else info
            row = rows.get(key)
            if row is None:
                row = rows[key] = {
                    "node_id": info.node_id,
                    "address": info.address,
                    "source": info.source,
                    "state": "connected" if live is not None else info.state,
                    "root": live_info.root.hex() if live_info.root is not None else None,
                    "in_sync": live is not None and live_info.root == root and not unannounced,
                    "last_sync": live_info.last_sync.isoformat() if live_info.last_sync else None,
                    "objects_sent": 0,
                    "objects_received": 0,
                    "error": live_info.error,
                    "goodbye": None,
                    "disconnected_at": None,
                    "listen": info.listen,
                }
            row["listen"] = row["listen"] or info.listen
            row["objects_sent"] += info.objects_sent
            row["objects_received"] += info.objects_received
            # How the peer's latest session ended, whichever row held it.
            if live is None and info.disconnected_at is not None and (key not in ended or info.disconnected_at > ended[key]):
                ended[key] = info.disconnected_at
                row["goodbye"] = info.goodbye
                row["disconnected_at"] = info.disconnected_at.isoformat()
        listen = format_address(*self.listen_address) if self.listen_address else None
        return {
            "schema": STATUS_SCHEMA,
            "node_id": self.node_id,
            "listen": listen,
            "root": root.hex(),
            "objects": len(self.index) + len(self._pending_ids),  # committed, in the root or not yet
            "store_error": self.store_error,
            "refs": len(self._ref_names),
            "conflicts": heapq.nsmallest(MAX_STATUS_CONFLICTS, self._ref_conflicts),
            "peers": sorted(rows.values(), key=lambda r: r["address"]),
        }

    def note_sync(self, info: PeerInfo) -> None:
        if info.root == self.root():
            info.last_sync = datetime.now(timezone.utc)

    # ------------------------------------------------------------ running

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from daemon.localapi import serve_local_api

        from daemon import security, tls

        identity = security.load_identity(self.paths)
        if identity.node_id != self.node_id:
            raise security.KeyFileError(f"{self.paths.node_key} holds node {identity.node_id[:12]}, not {self.node_id[:12]}")
        self._node_key = identity.node_key
        self.store = SQLiteContextStore(self.paths.store)
        self.expander = ExpanderFunctor(self.store)
        try:
            # Built in the store's thread from a generator: no list of every
            # id stays behind in this frame for the node's lifetime.
            self.index = await self.run_sync(lambda: IdSet(bytes.fromhex(i) for i in self.store.ids()))
            # Watch before reading: a change in between is read again later.
            self.watch_refs(self._note_ref_changed)
            await self._load_ref_summary()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # The API socket first: a second daemon for this home stops
                # here, before it takes a port.
                await nursery.start(serve_local_api, self)
                log.info("node %s: %d objects, root %s", self.node_id[:12], len(self.index), self.root().hex()[:12])
                host, port = self.config.listen
                try:
                    listeners = await trio.open_tcp_listeners(port, host=host)
                except OSError as exc:
                    raise neterrors.listen_failed(format_address(host, port), exc) from None
                bound = listeners[0].socket.getsockname()
                self.listen_address = (host, bound[1])
                # Issued once the port is known: our certificate tells the
                # peers we dial where we listen (their status shows it).
                identity = security.load_identity(self.paths, listen=format_address(*self.listen_address))
                self._server_tls = tls.server_context(identity)
                self._client_tls = tls.client_context(identity)
                await nursery.start(trio.serve_listeners, self._serve_inbound, listeners)
                log.info("listening on %s (%s)", format_address(*self.listen_address), listen_scope(host))
                for address in self.config.peers:
                    key = format_address(*address)
                    self._dialing.add(key)
                    nursery.start_soon(self._dial_forever, address, "static")
                nursery.start_soon(self._apply_stale_ids)
                nursery.start_soon(self._memory_releaser)
                nursery.start_soon(self.checker.run)
                await nursery.start(self.text_indexer.run)
                # What was stored while no daemon ran (a push straight into
                # the store, an upgrade) is indexed in the background too.
                self.text_indexer.poke()
                nursery.start_soon(self._track_refs)
                if self.config.mdns:
                    # mDNS discovery (daemon/discovery.py), once the port is known. It
                    # follows the root through self.watch; if mDNS cannot start it logs
                    # one warning and returns, and the node runs on without it.
                    from daemon.discovery import run_discovery

                    nursery.start_soon(functools.partial(
                        run_discovery, self, interfaces=self.config.mdns_interfaces,
                        announce_seconds=self.config.mdns_announce_seconds,
                    ))
                task_status.started(self.listen_address)
        finally:
            await self._close_store()

    async def _close_store(self) -> None:
        if self.store is not None:
            with trio.CancelScope(shield=True):
                await self.run_sync(self.store.close)

    async def _serve_inbound(self, stream: trio.SocketStream) -> None:
        """A peer dialled us: TLS first; a non-member never reaches the protocol."""
        from daemon import tls
        from daemon.peer import run_session

        try:
            host, port = stream.socket.getpeername()[:2]
        except OSError:
            return
        address = format_address(host, port)
        # Before TLS nobody is known: handshakes have their own bounds (in
        # all, and per source address), so strangers holding connections
        # open cannot take the places of members.
        if sum(self._handshakes.values()) >= MAX_HANDSHAKES or self._handshakes[host] >= MAX_HANDSHAKES_PER_HOST:
            _refusals.warning(f"handshakes:{host}", "refused %s: too many TLS handshakes under way", address)
            await trio.aclose_forcefully(stream)
            return
        self._handshakes[host] += 1
        try:
            with trio.fail_after(self.config.hello_timeout_seconds):
                secure = await tls.wrap_server(stream, self._server_tls)
        except tls.NotAMember as exc:
            _refusals.warning(host, "refused %s: %s", address, exc.message)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            return
        finally:
            self._handshakes[host] -= 1
            if not self._handshakes[host]:
                del self._handshakes[host]
        # A proven member: only now does it count against max_inbound_peers.
        if self._inbound >= self.config.max_inbound_peers:
            await self._refuse(secure, address)
            return
        self._inbound += 1
        try:
            info = PeerInfo(address=address, source="inbound", listen=tls.peer_listen_address(secure, host))
            await run_session(self, secure, info, dialer=False)
        finally:
            self._inbound -= 1
            self._forget_old_inbound()

    async def _refuse(self, stream: trio.abc.Stream, address: str) -> None:
        """A member over the inbound limit is told so (it dials again later)."""
        from daemon.endpoint import send_and_close
        from sync.connection import Connection
        from sync.errors import ErrorCode

        limit = self.config.max_inbound_peers
        _refusals.warning("inbound-limit", "refused %s: %d inbound peers already (max_inbound_peers)", address, limit)
        refusal = Connection(hello=self.hello(), dialer=False).refuse(
            ErrorCode.LIMIT_EXCEEDED, f"this node serves at most {limit} inbound peers; try again later")
        await send_and_close(stream, refusal)

async def _run_until_signalled(node: Node) -> None:
    import signal

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)


def run_daemon(node: Node) -> None:
    """Run a node in the foreground until SIGINT or SIGTERM."""
    trio.run(_run_until_signalled, node)
