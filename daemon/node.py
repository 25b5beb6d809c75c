"""The node: one nursery owning the listener, the peer sessions and the local API.

The store is SQLite and blocking; every call to it (and to the expander,
which reads it) goes through `run_sync`, one worker thread at a time, so a
thread hop carries a whole batch. The set of ids held is mirrored in memory
(`IdSet`) for the root and for reconciliation: contexts and ref updates
alike, so the root commits to both and a ref update syncs like a context.
"""

from __future__ import annotations

import collections
import functools
import heapq
import logging
import os
import random
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon import neterrors
from daemon.config import ConfigError, NodeConfig, format_address, listen_scope, parse_address
from daemon.logs import RateLimitedLog
from daemon.paths import HomePaths
from sync import overlay, refs
from sync.append import build_append
from sync.codec import encode_context
from sync.expand import ExpanderFunctor, check_removals
from sync.idset import IdSet
from sync.messages import Hello, make_hello
from sync.model import CompressedContext, MemoryAtom, check_id, check_new_context
from sync.store import SQLiteContextStore, StoreUnavailable

log = logging.getLogger(__name__)
_refusals = RateLimitedLog(log)
# Peers we cannot reach: the first failure is logged at once, then one line
# per peer this often while it stays away (a reconnect every 30 s would
# otherwise write ~3000 lines a day per absent peer).
_unreachable = RateLimitedLog(log, interval=600.0)
T = TypeVar("T")

STATUS_SCHEMA = 2
# Names of refs in conflict listed in status at most (the first, sorted):
# a status document must stay one small message; `ctxfs ref list` has all.
MAX_STATUS_CONFLICTS = 1000
# Rows kept in status for inbound peers whose session ended (with their last
# error), most recent last; older ones are forgotten. Static and discovered
# peers keep their row while they are dialled (see below).
MAX_DISCONNECTED_INBOUND = 16
# A peer that dialled us or that mDNS found, not connected for this long,
# leaves status (and an mDNS one is no longer dialled; discovery proposes it
# again while it still advertises). An hour keeps in view who left and why
# across a reboot or a meeting, and drops a laptop gone for the day; a peer
# that left has long since been dialled at the backoff's cap (30 s) for
# nothing. Static peers are configuration: they stay until `peer forget`.
FORGET_ABSENT_PEERS_SECONDS = 3600.0
# After a write failed (disk full), receiving pauses this long before the
# store is probed again: peers' data is refused at once meanwhile, and the
# disk is not hammered with writes that cannot succeed.
STORE_RETRY_SECONDS = 5.0
# Inbound TLS handshakes under way at once, in all and from one source
# address. Each holds a task and a little TLS state for at most the HELLO
# timeout; members from other addresses always find room.
MAX_HANDSHAKES = 128
MAX_HANDSHAKES_PER_HOST = 16
# How long stored ids may wait for running reconciliations before entering
# the in-memory set (and the root) anyway.
MAX_INDEX_DELAY = 2.0


def _state_changed(info: PeerInfo, _attribute: attrs.Attribute, state: str) -> str:
    # Every change of state is timed here, wherever a session makes it.
    if state == "connected":
        info.goodbye = None
        info.disconnected_at = None
    elif info.state == "connected":
        info.disconnected_at = datetime.now(timezone.utc)
        info.absent_since = trio.current_time()
    return state


def _check_written(store, contexts: list[CompressedContext]) -> None:
    """The rules for contexts written on this node (a push), not for what
    peers send: no empty root, no removals in a root, relevance in 0..1
    (`model.check_new_context`), no removal of an atom the base lacks."""
    for ctx in contexts:
        check_new_context(ctx)
    check_removals(store, contexts)


# Dials in a row that fail before a chosen peer counts as gone: the overlay
# chooses another in its place (and keeps probing it, with backoff). Two,
# so one refused dial during a peer's restart does not move links.
UNREACHABLE_AFTER = 2


@attrs.define
class PeerInfo:
    """What `status` shows about one peer; updated by its session."""

    address: str
    source: str  # "static" | "mdns" | "inbound"
    node_id: str | None = None
    state: str = attrs.field(default="connecting", on_setattr=_state_changed)  # "connected" | "connecting" | "disconnected" | "known" (not chosen)
    root: bytes | None = None
    last_sync: datetime | None = None
    objects_sent: int = 0
    objects_received: int = 0
    error: str | None = None
    failed_dials: int = 0  # dials in a row that did not connect
    # The reason the peer gave in the GOODBYE that ended its last session
    # (it left on purpose: stopped, or was told to); None if that session
    # ended otherwise, or the peer is connected.
    goodbye: str | None = None
    # When the last session ended (for status); None while connected or
    # before the first session.
    disconnected_at: datetime | None = None
    # Where the peer accepts connections: the dialled address for static and
    # mDNS peers; for an inbound one what its certificate says, if it says.
    listen: str | None = None
    # trio time since when the peer has not been connected: when its last
    # session ended, else when it was first proposed (FORGET_ABSENT_PEERS_SECONDS).
    absent_since: float = attrs.field(factory=trio.current_time)


class Node:
    def __init__(self, *, paths: HomePaths, config: NodeConfig, node_id: str) -> None:
        self.paths = paths
        self.config = config
        self.node_id = node_id
        self.node_id_bytes = bytes.fromhex(node_id)
        self.store: SQLiteContextStore | None = None
        self.expander: ExpanderFunctor | None = None
        self.index = IdSet()
        self.listen_address: tuple[str, int] | None = None
        self.peers: dict[str, PeerInfo] = {}  # by address, or by node id for inbound
        self.sessions: dict[str, Any] = {}  # connected PeerSession by peer node id
        self._store_limiter = trio.CapacityLimiter(1)
        self._reconciling = 0
        self._pending_ids: set[bytes] = set()  # stored, not yet in the index
        self._pending_since = 0.0
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
        self._dialing: set[str] = set()  # addresses a dial loop runs for
        # The overlay (sync/overlay.py): node ids this node dials now, and an
        # event set (then replaced) whenever that choice changes.
        self._chosen: frozenset[str] = frozenset()
        self._choice_changed = trio.Event()
        self._diallers: dict[str, _Dialler] = {}  # by address: how to stop a dial loop
        self._inbound = 0  # inbound member sessions now (TLS done)
        self._handshakes: collections.Counter[str] = collections.Counter()  # TLS handshakes by source host
        # Why the store cannot be written now (status shows it), else None.
        self.store_error: str | None = None
        self._store_retry_at = 0.0

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
        ref_positions = [k for k, blob in enumerate(blobs) if refs.is_ref_update_bytes(blob)]
        ids = await self._put(self.store.put_encoded, blobs)
        # Ids come back one per blob, in order: no second hash to tell which are new.
        new_refs = [blobs[k] for k in ref_positions if not self.holds(bytes.fromhex(ids[k]))]
        self._stored(ids)
        if new_refs:
            # Stored and verified: decoding again is only unpacking.
            self._refs_changed(sorted({refs.decode_update(b, verify=False).name for b in new_refs}))
        return ids

    async def add_batches(self, batches: Callable[[], Iterable[Sequence[bytes]]]) -> list[str]:
        """Verify and store contexts written here (no ref updates), read
        from `batches()` — called in a worker thread, so it may read a file
        — all in one transaction; announce one new root. A push of the
        local API (daemon/pushes.py). The rules for new contexts apply
        (ValueError, UnheldRemoval: see `_check_written`); else raises as
        add_encoded."""
        store = self.store
        return self._stored(await self._put(
            lambda: store.put_encoded_batches(batches(), check=functools.partial(_check_written, store))))

    async def _put(self, put: Callable, *args) -> list[str]:
        if self.store_error is not None and trio.current_time() < self._store_retry_at:
            raise StoreUnavailable(f"{self.store_error} (receiving is paused)", disk_full=False)
        try:
            ids = await self.run_sync(put, *args)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            raise
        if self.store_error is not None:
            self._store_recovered()
        return ids

    def _stored(self, ids: list[str]) -> list[str]:
        """Committed ids enter the index (and the root changes once) now, or
        when the reconciliations in progress end."""
        self._pending_ids.update(bytes.fromhex(i) for i in ids)
        stale = trio.current_time() - self._pending_since > MAX_INDEX_DELAY
        if not self._reconciling or stale:
            self._apply_pending()
        return ids

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

    async def _apply_stale_ids(self) -> None:
        """New ids never wait on reconciliations for longer than MAX_INDEX_DELAY."""
        while True:
            await trio.sleep(MAX_INDEX_DELAY / 2)
            if self._pending_ids and trio.current_time() - self._pending_since > MAX_INDEX_DELAY:
                self._apply_pending()

    def _apply_pending(self) -> None:
        pending, self._pending_ids = self._pending_ids, set()
        self._pending_since = trio.current_time()
        if pending and self.index.add_many(pending):
            self._root_changed()

    # A reconciliation session needs the id set to hold still (sync/reconcile
    # checks it). New ids wait while sessions run, for at most this long;
    # then they go in anyway and the sessions restart.
    def begin_reconcile(self) -> None:
        if not self._reconciling:
            self._pending_since = trio.current_time()
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
            "objects": len(self.index),
            "store_error": self.store_error,
            "refs": len(self._ref_names),
            "conflicts": heapq.nsmallest(MAX_STATUS_CONFLICTS, self._ref_conflicts),
            "peers": sorted(rows.values(), key=lambda r: r["address"]),
        }

    def _forget_absent(self) -> None:
        """Drop the rows of peers absent for FORGET_ABSENT_PEERS_SECONDS (static ones stay)."""
        cutoff = trio.current_time() - FORGET_ABSENT_PEERS_SECONDS
        # A peer is absent since the latest end of any of its rows' sessions.
        since: dict[str, float] = {}
        for info in self.peers.values():
            if info.node_id is not None:
                since[info.node_id] = max(since.get(info.node_id, info.absent_since), info.absent_since)
        absent = [
            key for key, info in self.peers.items()
            if info.source != "static" and info.state != "connected"
            and info.node_id not in self.sessions  # connected the other way
            and since.get(info.node_id, info.absent_since) < cutoff
        ]
        for key in absent:
            self._drop_peer(key)

    def _drop_peer(self, key: str) -> PeerInfo:
        info = self.peers.pop(key)
        dialler = self._diallers.get(key)
        if dialler is not None and dialler.info is info:
            dialler.scope.cancel()
        self.choose_peers()  # one fewer to choose from
        return info

    def forget_peer(self, text: str) -> list[dict]:
        """Drop the rows of the peers `text` names and stop dialling them:
        a node id or a unique prefix of one (4+ hex digits), or an address
        as status shows it. Returns [{node_id, address}] of what was dropped.

        LookupError if no peer matches; ValueError if one of them is
        connected (its row would be back at once) or a prefix names several.
        A static peer is dialled again when the daemon next starts.
        """
        text = text.strip()
        if len(text) >= 4 and all(c in "0123456789abcdef" for c in text.lower()):
            prefix = text.lower()
            keys = [k for k, i in self.peers.items() if i.node_id is not None and i.node_id.startswith(prefix)]
            named = sorted({self.peers[k].node_id for k in keys})
            if len(named) > 1:
                raise ValueError(f"{len(named)} peers have ids starting with {text}: "
                                 f"{', '.join(n[:12] for n in named[:5])}; give more digits")
        else:
            try:
                wanted = {text, format_address(*parse_address(text, "peer"))}
            except ConfigError:
                wanted = {text}
            keys = [k for k, i in self.peers.items() if i.address in wanted or i.listen in wanted]
        if not keys:
            raise LookupError(f"no peer matches {text!r} (`ctxfs status` lists them)")
        for key in keys:
            node_id = self.peers[key].node_id
            if node_id is not None and node_id in self.sessions:
                raise ValueError(f"peer {node_id[:12]} is connected; only a peer that is not can be forgotten")
        return [{"node_id": info.node_id, "address": info.address} for info in map(self._drop_peer, keys)]

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
            ids = await self.run_sync(lambda: [bytes.fromhex(i) for i in self.store.ids()])
            self.index = IdSet(ids)
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

    def _forget_old_inbound(self) -> None:
        ended = [key for key, info in self.peers.items() if info.source == "inbound" and info.state != "connected"]
        for key in ended[:-MAX_DISCONNECTED_INBOUND]:
            del self.peers[key]

    def discovered(self, node_id: str, address: tuple[str, int], source: str = "mdns") -> None:
        """Discovery proposes a peer; it is known from now on, and dialled
        while the overlay chooses it (choose_peers).

        Proposals are only addresses: TLS decides who gets in, and the
        one-connection-per-pair rule settles a peer dialled both ways.
        Never blocks; safe to call from the discovery task on every event.
        """
        if node_id == self.node_id or self._nursery is None:
            return
        key = format_address(*address)
        if key in self._dialing:
            known = self.peers.get(key)
            if known is not None and known.state == "known":
                known.absent_since = trio.current_time()  # still advertised: not gone
            return
        self._dialing.add(key)
        info = self.peers.setdefault(key, PeerInfo(address=key, source=source, node_id=node_id, listen=key))
        self.choose_peers()
        self._nursery.start_soon(self._dial_forever, address, source, info)

    # ------------------------------------------------------------ the overlay

    def choose_peers(self) -> None:
        """Choose again which known peers to dial (sync/overlay.py): at most
        max_peers; static peers always, if they fit. Wakes the dial loops
        and ends the sessions we dialled to peers no longer chosen (the
        peer may still dial us: its choice is its own)."""
        own = self.node_id_bytes
        # Unreachable peers are left out until a dial reaches them again;
        # a peer dialling us is reachable whatever our dials say.
        known = {bytes.fromhex(i.node_id) for i in self.peers.values()
                 if i.source != "inbound" and i.node_id is not None
                 and (i.failed_dials < UNREACHABLE_AFTER or i.node_id in self.sessions)} - {own}
        static = {bytes.fromhex(i.node_id) for i in self.peers.values()
                  if i.source == "static" and i.node_id is not None} & known
        limit = self.config.max_peers
        if len(static) <= limit:
            chosen = static | set(overlay.choose_links(own, known - static, limit - len(static)))
        else:
            chosen = set(overlay.choose_links(own, known, limit))
        choice = frozenset(c.hex() for c in chosen)
        if choice != self._chosen:
            self._chosen = choice
            self._choice_changed.set()
            self._choice_changed = trio.Event()
        # Also when the choice stays: a static peer just identified may not be in it.
        for info in list(self.peers.values()):
            session = self.sessions.get(info.node_id) if info.node_id else None
            if (info.source != "inbound" and info.node_id not in choice and session is not None
                    and session.info is info):
                session.retire("not among this node's chosen peers")

    def _wanted(self, info: PeerInfo) -> bool:
        """Dial this peer now? Yes if the overlay chose it; to learn who a
        static address is (its id comes with its HELLO); and, with backoff,
        to notice that an unreachable peer is back."""
        return info.node_id is None or info.node_id in self._chosen or info.failed_dials >= UNREACHABLE_AFTER

    async def _dial_forever(self, address: tuple[str, int], source: str, proposed: PeerInfo | None = None) -> None:
        """Keep one connection to a static or discovered peer, reconnecting
        with capped backoff, until the peer is forgotten."""
        key = format_address(*address)
        if proposed is not None and self.peers.get(key) is not proposed:
            self._dialing.discard(key)  # forgotten before this task began
            return
        info = self.peers.setdefault(key, PeerInfo(address=key, source=source, listen=key))
        # Forgetting the peer (its row dropped) ends this loop.
        with trio.CancelScope() as scope:
            self._diallers[key] = _Dialler(scope=scope, info=info)
            try:
                await self._dial(address, info)
            finally:
                if self._diallers.get(key) is not None and self._diallers[key].scope is scope:
                    del self._diallers[key]
                    self._dialing.discard(key)

    async def _dial(self, address: tuple[str, int], info: PeerInfo) -> None:
        from daemon.peer import run_session

        from daemon import tls

        key = info.address
        delay = self.config.reconnect_min_seconds
        while True:
            if not self._wanted(info):
                # Known, not chosen: wait for the overlay to change its mind.
                info.state, info.error = "known", None
                await self._choice_changed.wait()
                delay = self.config.reconnect_min_seconds
                continue
            info.state = "connecting"
            connected = False
            tcp_done = False
            try:
                with trio.fail_after(self.config.hello_timeout_seconds):
                    stream = await trio.open_tcp_stream(*address)
                    tcp_done = True
                    stream = await tls.wrap_client(stream, self._client_tls)
                connected = True
                info.failed_dials = 0
                _unreachable.forget(key)  # a later outage is reported at once
                await run_session(self, stream, info, dialer=True)
            except tls.NotAMember as exc:
                info.error = exc.message
                _refusals.warning(key, "peer %s: %s", key, exc.message)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                why = neterrors.reason(exc)
                if isinstance(exc, trio.TooSlowError):
                    why = f"no answer within {self.config.hello_timeout_seconds:g} s"
                info.error = f"cannot connect: {why}" if not tcp_done else f"TLS handshake failed: {why}"
                info.failed_dials += 1
                log.debug("peer %s (%s): %s", key, info.source, info.error)
                # A peer that never answers must show in the log, not only in
                # status; once, then now and then while it stays away.
                _unreachable.warning(key, "peer %s (%s): %s; still trying (%d failed attempt%s so far)",
                                     key, info.source, info.error, info.failed_dials,
                                     "" if info.failed_dials == 1 else "s")
                if info.failed_dials == UNREACHABLE_AFTER:
                    self.choose_peers()  # chosen but gone: another takes its place
            # Lost the one-connection-per-pair rule: the peer's own dial is
            # the connection. Redial only once that one is gone.
            while info.node_id is not None and info.node_id in self.sessions:
                await trio.sleep(1.0)
            info.state = "disconnected"
            if connected and info.error is None:
                delay = self.config.reconnect_min_seconds
            await trio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.config.reconnect_max_seconds)


@attrs.frozen(kw_only=True)
class _Dialler:
    scope: trio.CancelScope
    info: PeerInfo


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
