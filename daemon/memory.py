"""What `ctxfs mcp`'s tools do, over a running daemon or straight over the store.

`Memory` is the tool logic without MCP: every method checks its arguments
(ToolError, one line for the model), then talks to the home's daemon
through a `LocalClient` when one is connected (`DaemonLink` keeps that
connection and hears every ref change), else opens the store itself.

Writes are appends to a ref (`sync.append`): read the ref's value, build a
delta on it, store it and move the ref, atomically. With a daemon, the
daemon does all three under its ref-write lock (REF_APPEND). Without one,
this process does them under an exclusive flock on `HOME/refs.lock`, with a
store opened afresh inside the lock (a store object caches the refs it has
read, and would not see another process's writes), so several offline MCP
servers on one home serialise and never lose a fact.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import math
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import trio

from daemon import security
from daemon.client import LocalClient
from daemon.endpoint import ConnectionLost, DaemonNotRunning, LocalApiError, expanded_from_response, filter_expansion
from daemon.paths import HomePaths
from sync import fulltext, refs
from sync.append import build_append
from sync.codec import encode_context
from sync.errors import ErrorCode
from sync.expand import ExpanderFunctor
from sync.model import ExpandedContext, MemoryAtom, TypeSignature, is_id, parse_type
from sync.query import MAX_AGE_SECONDS, MAX_TEXT_LENGTH, ContextQuery
from sync.store import SQLiteContextStore, StoreError

log = logging.getLogger(__name__)

# Facts one remember may carry, and characters per fact: far beyond what a
# model sends in one call, small enough to stay one local-API message.
MAX_FACTS = 1000
MAX_FACT_CHARS = 100_000
MAX_FORGET = 1000
MAX_LIMIT = 1000
MAX_MESSAGE_CHARS = 1000
MAX_TOKENS = 1_000_000
# How long a tool call waits for the link to reach a daemon whose socket
# exists, before deciding no daemon runs (writing offline while a daemon
# runs would hide the write from it until its restart).
DAEMON_WAIT_SECONDS = 2.0
# Offline, the link re-reads ref values this often to tell subscribers of
# changes made by other processes (with a daemon, REFS_WATCH tells at once).
OFFLINE_POLL_SECONDS = 1.0
FACT_SOURCE = "mcp"
STRING = parse_type("String")


def _identity(path) -> tuple[int, int] | None:
    """(inode, mtime) of a file, None if it does not exist: a new daemon's
    socket is a new file."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns


class ToolError(Exception):
    """A tool call that cannot be done as asked; one line, for the model."""


# --------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------


def _ref_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ToolError(f"ref: expected a ref name (a string), got {_kind(value)}")
    try:
        refs.check_ref_name(value)
    except ValueError as exc:
        raise ToolError(f"ref: {exc}") from None
    if is_id(value.lower()):
        raise ToolError("ref: 64 hex characters are a context id, not a ref name")
    return value


def _kind(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", str: "a string", list: "an array", dict: "an object"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _number(name: str, value: Any, *, minimum: float = 0.0, maximum: float = math.inf) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ToolError(f"{name}: expected a finite number, got {_kind(value)}")
    if not minimum <= value <= maximum:
        raise ToolError(f"{name}: must be between {minimum:g} and {maximum:g}, got {value:g}")
    return float(value)


def _integer(name: str, value: Any, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ToolError(f"{name}: expected an integer, got {_kind(value)}")
    if not minimum <= value <= maximum:
        raise ToolError(f"{name}: must be between {minimum} and {maximum}, got {value}")
    return value


def _message(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ToolError(f"message: expected a string, got {_kind(value)}")
    return value[:MAX_MESSAGE_CHARS]


def _type(name: str, value: Any) -> TypeSignature:
    if not isinstance(value, str):
        raise ToolError(f"{name}: expected a type such as String or List[Int], got {_kind(value)}")
    try:
        return parse_type(value)
    except ValueError as exc:
        raise ToolError(f"{name}: {exc}") from None


def parse_facts(facts: Any, now: datetime) -> list[MemoryAtom]:
    """Atoms from `facts`: strings, or objects {content, type?, relevance?, source?}."""
    if not isinstance(facts, list) or not facts:
        raise ToolError("facts: expected a non-empty array of strings or {content, type?, relevance?, source?} objects")
    if len(facts) > MAX_FACTS:
        raise ToolError(f"facts: at most {MAX_FACTS} per call, got {len(facts)}")
    atoms = []
    for i, fact in enumerate(facts):
        where = f"facts[{i}]"
        if isinstance(fact, str):
            fact = {"content": fact}
        if not isinstance(fact, dict):
            raise ToolError(f"{where}: expected a string or an object, got {_kind(fact)}")
        unknown = sorted(set(fact) - {"content", "type", "relevance", "source"})
        if unknown:
            raise ToolError(f"{where}: unknown field {unknown[0]!r} (fields: content, type, relevance, source)")
        content = fact.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ToolError(f"{where}.content: expected a non-empty string, got {_kind(content)}")
        if len(content) > MAX_FACT_CHARS:
            raise ToolError(f"{where}.content: at most {MAX_FACT_CHARS} characters, got {len(content)}")
        type_sig = _type(f"{where}.type", fact["type"]) if fact.get("type") is not None else STRING
        relevance = _number(f"{where}.relevance", fact.get("relevance"), maximum=1.0)
        source = fact.get("source", FACT_SOURCE)
        if not isinstance(source, str):
            raise ToolError(f"{where}.source: expected a string, got {_kind(source)}")
        atoms.append(MemoryAtom(content, type_sig, now, source or FACT_SOURCE, 1.0 if relevance is None else relevance))
    return atoms


def _hashes(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ToolError("atom_hashes: expected a non-empty array of atom hashes (64 hex characters, from recall)")
    if len(value) > MAX_FORGET:
        raise ToolError(f"atom_hashes: at most {MAX_FORGET} per call, got {len(value)}")
    out = []
    for i, h in enumerate(value):
        if not isinstance(h, str) or not is_id(h.lower()):
            raise ToolError(f"atom_hashes[{i}]: expected 64 hex characters (an atom hash from recall), got {h!r:.80}")
        out.append(h.lower())
    return out


def atom_json(atom: MemoryAtom) -> dict:
    return {
        "hash": atom.content_hash,
        "content": atom.content,
        "type": str(atom.type_sig),
        "relevance": atom.relevance_score,
        "time": atom.timestamp.isoformat(),
        "source": atom.source_hash,
    }


# --------------------------------------------------------------------------
# offline: the store, under the home's ref lock
# --------------------------------------------------------------------------


@contextlib.contextmanager
def ref_lock(paths: HomePaths) -> Iterator[None]:
    """The home's exclusive ref-write lock (blocking): offline writers on one
    home take it around their read-modify-write of a ref."""
    fd = os.open(paths.root / "refs.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def open_store(paths: HomePaths) -> Iterator[SQLiteContextStore]:
    if not paths.is_initialised():
        raise ToolError(f"no ctxfs node at {paths.root}; run `ctxfs init` first")
    store = SQLiteContextStore(paths.store)
    try:
        yield store
    finally:
        store.close()


def append_offline(paths: HomePaths, name: str, atoms: list[MemoryAtom], removed: list[str],
                   metadata: dict[str, Any]) -> str:
    """What the daemon's append_to_ref does, done here (blocking): the new context id."""
    with ref_lock(paths), open_store(paths) as store:
        context = build_append(store, ExpanderFunctor(store), name, atoms, removed, metadata)
        updates = signed_ref_updates(paths, store, name, context.id)
        store.put_encoded([encode_context(context)] + [refs.encode_update(u) for u in updates])
        return context.id


def signed_ref_updates(paths: HomePaths, store: SQLiteContextStore, name: str,
                       target: str | None) -> list[refs.RefUpdate]:
    """The update(s) this home's node writes, offline, to set (None: delete)
    ref `name`: signed with its node key, superseding the frontier `store`
    holds. Take ref_lock around reading it and storing them."""
    key = security.read_node_key(paths.node_key)
    table = refs.RefTable(store.ref_frontier(name))
    return refs.updates_for_write(table=table, name=name, target=target, key=key, time=datetime.now(timezone.utc))


def _offline_value(store: SQLiteContextStore, name: str) -> refs.RefValue:
    value = store.ref_value(name)
    if value is None:
        names = store.ref_table().names()
        raise ToolError(f"no ref {name}" + (f"; refs: {', '.join(itertools.islice(names, 20))}" if names else
                                             "; none exists yet (remember creates one)"))
    return value


# --------------------------------------------------------------------------
# the daemon, when one runs
# --------------------------------------------------------------------------


class DaemonLink:
    """Keeps one LocalClient connected to the home's daemon while one runs,
    and calls `on_ref_changed(name)` for every ref change: told by the
    daemon's REFS_WATCH while connected (writes here and from peers alike),
    found by re-reading the store every OFFLINE_POLL_SECONDS otherwise.

    Runs as one task (`run`), which owns the connection: request tasks only
    use `client`, never open or close it (a trio nursery must be left by
    the task that entered it).
    """

    def __init__(self, paths: HomePaths, on_ref_changed: Callable[[str], Awaitable[None]]) -> None:
        self.paths = paths
        self.client: LocalClient | None = None
        self._on_ref_changed = on_ref_changed
        self._connected = trio.Event()
        self._retry = trio.Event()
        self._known: dict[str, tuple] | None = None  # offline poll: name -> (target, candidates)
        self._refused_socket: tuple[int, int] | None = None  # (inode, mtime) of a socket that refused

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled. Started (`nursery.start`) once it knows where
        refs stand: watching the daemon, or holding the store's values."""
        while True:
            try:
                async with LocalClient.connect(self.paths) as client:
                    async with client.watch_refs(None) as changes:
                        self.client = client
                        self._connected.set()
                        task_status.started()
                        task_status = trio.TASK_STATUS_IGNORED
                        await self._changed_since(changes.snapshot)
                        async for change in changes:
                            await self._on_ref_changed(change.name)
            except DaemonNotRunning:
                # A socket file nobody answers on (a daemon killed -9): do
                # not wait on it again until it is replaced.
                self._refused_socket = _identity(self.paths.api_socket)
            except (LocalApiError, OSError) as exc:
                log.info("the daemon link ended: %s", exc)
            finally:
                self.client = None
                self._connected = trio.Event()
            await self._poll_offline()
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            with trio.move_on_after(OFFLINE_POLL_SECONDS):
                await self._retry.wait()
            self._retry = trio.Event()

    async def _changed_since(self, snapshot: list[dict]) -> None:
        """Tell what changed while we were not watching (offline until now)."""
        now = {r["name"]: (r["target"], tuple(r["candidates"])) for r in snapshot}
        known, self._known = self._known, None
        await self._tell_changes(known, now)

    async def _poll_offline(self) -> None:
        if not self.paths.is_initialised():
            return
        try:
            now = await trio.to_thread.run_sync(self._read_values)
        except (StoreError, OSError, ToolError) as exc:
            log.info("cannot read the store: %s", exc)
            return
        known, self._known = self._known, now
        await self._tell_changes(known, now)

    async def _tell_changes(self, known: dict[str, tuple] | None, now: dict[str, tuple]) -> None:
        """Call on_ref_changed for every ref whose value differs (none the first time)."""
        if known is None:
            return
        for name in sorted(set(now) | set(known)):
            if now.get(name) != known.get(name):
                await self._on_ref_changed(name)

    def _read_values(self) -> dict[str, tuple]:
        with open_store(self.paths) as store:
            table = store.ref_table()
            return {n: (v.target, v.candidates) for n in table.names() if (v := table.value(n)) is not None}

    async def current(self) -> LocalClient | None:
        """The connected client; if the daemon's socket exists but the link
        has not connected yet, wait for it a little. None: no daemon runs."""
        if self.client is not None:
            return self.client
        socket = _identity(self.paths.api_socket)
        if socket is None:
            return None
        self._retry.set()
        if socket == self._refused_socket:
            return None  # the same stale socket that refused us: offline at once
        with trio.move_on_after(DAEMON_WAIT_SECONDS):
            await self._connected.wait()
        return self.client


# --------------------------------------------------------------------------
# the tools
# --------------------------------------------------------------------------


class Memory:
    """The tools' logic. Every method returns plain data (JSON-able) or text,
    and raises ToolError for anything the model should be told."""

    def __init__(self, paths: HomePaths, *, default_ref: str = "main",
                 on_ref_changed: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.paths = paths
        self.default_ref = _ref_name(default_ref)
        self._notify = on_ref_changed or _ignore
        self.link = DaemonLink(paths, self._notify)
        self._offline = OfflineExpansions(paths)

    def _ref(self, value: Any) -> str:
        return self.default_ref if value is None else _ref_name(value)

    # ------------------------------------------------------------ writes

    async def remember(self, facts: Any = None, ref: Any = None, message: Any = None) -> dict:
        name, message = self._ref(ref), _message(message)
        atoms = parse_facts(facts, datetime.now(timezone.utc))
        metadata = {"message": message or f"remember {len(atoms)} fact{'s' if len(atoms) != 1 else ''}",
                    "source": FACT_SOURCE}
        context_id = await self._append(name, atoms, [], metadata)
        return {"context_id": context_id, "ref": name, "remembered": [atom_json(a) for a in atoms]}

    async def forget(self, atom_hashes: Any = None, ref: Any = None, message: Any = None) -> dict:
        name, message = self._ref(ref), _message(message)
        removed = _hashes(atom_hashes)
        metadata = {"message": message or f"forget {len(removed)} atom{'s' if len(removed) != 1 else ''}",
                    "source": FACT_SOURCE}
        context_id = await self._append(name, [], removed, metadata)
        return {"context_id": context_id, "ref": name, "forgotten": sorted(set(removed))}

    async def _append(self, name: str, atoms: list[MemoryAtom], removed: list[str], metadata: dict) -> str:
        client = await self.link.current()
        if client is not None:
            try:
                context_id, _ = await client.ref_append(name, atoms, removed, metadata)
                return context_id
            except ConnectionLost as exc:
                raise ToolError(f"the daemon went away during the write ({exc.message}); "
                                f"recall to see whether it was stored") from None
            except LocalApiError as exc:
                raise ToolError(exc.message) from None
        try:
            context_id = await trio.to_thread.run_sync(append_offline, self.paths, name, atoms, removed, metadata)
        except (StoreError, security.KeyFileError) as exc:
            raise ToolError(str(exc)) from None
        await self._notify(name)  # no daemon to tell our own subscribers
        return context_id

    # ------------------------------------------------------------ reads

    async def _read(self, name: str, via_daemon: Callable[[LocalClient, str], Awaitable[Any]] | None,
                    via_store: Callable[[SQLiteContextStore, refs.RefValue], Any]) -> tuple[dict, Any]:
        """(the ref as `ref show --json` has it, the answer): from the daemon
        if one is connected (via_daemon gets the ref's target), else from the
        store (via_store runs in a thread)."""
        client = await self.link.current()
        if client is not None and via_daemon is not None:
            try:
                ref = await client.ref(name)
                return ref, await via_daemon(client, ref["target"])
            except ConnectionLost:
                pass  # the daemon stopped: read the store
            except LocalApiError as exc:
                if exc.code is ErrorCode.NOT_FOUND:
                    raise ToolError(await self._no_ref(client, name)) from None
                if exc.code is not ErrorCode.LIMIT_EXCEEDED:  # too large for one message: read the store
                    raise ToolError(exc.message) from None

        def read() -> tuple[dict, Any]:
            with open_store(self.paths) as store:
                value = _offline_value(store, name)
                ref = {"name": name, "target": value.target, "conflict": value.conflict,
                       "candidates": list(value.candidates)}
                return ref, via_store(store, value)

        try:
            return await trio.to_thread.run_sync(read)
        except StoreError as exc:
            raise ToolError(str(exc)) from None

    async def _no_ref(self, client: LocalClient, name: str) -> str:
        names = [r["name"] for r in await client.refs()]
        if not names:
            return f"no ref {name}; none exists yet (remember creates one)"
        return f"no ref {name}; refs: {', '.join(names[:20])}"

    async def recall(self, text: Any = None, type: Any = None, min_relevance: Any = None,  # noqa: A002
                     max_age_seconds: Any = None, limit: Any = 20, ref: Any = None) -> dict:
        name = self._ref(ref)
        if text is not None and not isinstance(text, str):
            raise ToolError(f"text: expected a string, got {_kind(text)}")
        if text is not None and len(text) > MAX_TEXT_LENGTH:
            raise ToolError(f"text: at most {MAX_TEXT_LENGTH} characters, got {len(text)}")
        query = ContextQuery(
            text=text,
            type_filter=_type("type", type) if type is not None else None,
            min_relevance=_number("min_relevance", min_relevance, maximum=1e9) or 0.0,
            max_age_seconds=_number("max_age_seconds", max_age_seconds, maximum=MAX_AGE_SECONDS),
            limit=_integer("limit", 20 if limit is None else limit, minimum=1, maximum=MAX_LIMIT),
        )

        async def via_daemon(client: LocalClient, target: str) -> list[MemoryAtom]:
            return await client.query(target, type_filter=query.type_filter, min_relevance=query.min_relevance,
                                      max_age_seconds=query.max_age_seconds, limit=query.limit, text=query.text)

        def via_store(store: SQLiteContextStore, value: refs.RefValue) -> list[MemoryAtom]:
            expanded = self._offline.expand(value.target)
            return fulltext.run_query(store, expanded, query, datetime.now(timezone.utc))

        found, atoms = await self._read(name, via_daemon, via_store)
        return {**_about(found), "atoms": [atom_json(a) for a in atoms]}

    async def context(self, ref: Any = None, max_tokens: Any = 2000) -> str:
        name = self._ref(ref)
        budget = _integer("max_tokens", 2000 if max_tokens is None else max_tokens, minimum=1, maximum=MAX_TOKENS)
        found, expanded = await self._read(name, *_expansion_readers(self._offline, budget))
        text = expanded.to_prompt_context()
        if found.get("conflict"):
            text = _conflict_note(found) + ("\n" + text if text else "")
        return text

    async def history(self, ref: Any = None, limit: Any = 20) -> dict:
        from daemon.cli_history import _entry, _refs_by_target

        name = self._ref(ref)
        count = _integer("limit", 20 if limit is None else limit, minimum=1, maximum=MAX_LIMIT)

        async def via_daemon(client: LocalClient, target: str) -> list[dict]:
            return await trio.to_thread.run_sync(lambda: _walk(self.paths, target, count))

        def via_store(store: SQLiteContextStore, value: refs.RefValue) -> list[dict]:
            by_target = _refs_by_target(store)
            return [_entry(c, ctx, by_target) for c, ctx in itertools.islice(store.walk_back(value.target), count)]

        found, entries = await self._read(name, via_daemon, via_store)
        return {**_about(found), "contexts": entries}

    async def refs(self) -> dict:
        client = await self.link.current()
        if client is not None:
            with contextlib.suppress(ConnectionLost):
                return {"refs": [_ref_row(r) for r in await client.refs()]}

        def read() -> list[dict]:
            with open_store(self.paths) as store:
                table = store.ref_table()
                return [_ref_row({"name": n, "target": v.target, "conflict": v.conflict,
                                  "candidates": list(v.candidates), "updated": v.updated.isoformat()})
                        for n in table.names() if (v := table.value(n)) is not None]

        return {"refs": await trio.to_thread.run_sync(read)}

    async def sync_status(self) -> dict:
        client = await self.link.current()
        if client is not None:
            with contextlib.suppress(ConnectionLost):
                return _status_summary(await client.status())
        return {"daemon": False,
                "message": f"no daemon runs for {self.paths.root}: memory is read and written in the local "
                           "store only, and peers learn of changes once `ctxfs daemon` runs"}

    async def expansion_text(self, name: str) -> str:
        """The resource `ctxfs://ref/{name}`: the whole expansion as prompt text."""
        found, expanded = await self._read(_ref_name(name), *_expansion_readers(self._offline, None))
        text = expanded.to_prompt_context()
        return _conflict_note(found) + "\n" + text if found.get("conflict") else text


async def _ignore(_name: str) -> None:
    return None


class OfflineExpansions:
    """Expansions memoised across tool calls when no daemon runs.

    Contexts never change (their id is their content), so an expansion
    computed once stays true: a recall after a remember expands only the
    new delta, not the whole ref again. Ref values are still read afresh
    on every call. One store connection, one caller at a time.
    """

    def __init__(self, paths: HomePaths) -> None:
        self._paths = paths
        self._lock = threading.Lock()
        self._expander: ExpanderFunctor | None = None

    def expand(self, context_id: str) -> ExpandedContext:
        with self._lock:
            if self._expander is None:
                self._expander = ExpanderFunctor(SQLiteContextStore(self._paths.store))
            return self._expander.expand(context_id)


def _expansion_readers(offline: OfflineExpansions, budget: int | None):
    async def via_daemon(client: LocalClient, target: str) -> ExpandedContext:
        return expanded_from_response(await client.expand(target, max_tokens=budget))

    def via_store(store: SQLiteContextStore, value: refs.RefValue) -> ExpandedContext:
        return filter_expansion(offline.expand(value.target), 0.0, budget)

    return via_daemon, via_store


def _walk(paths: HomePaths, target: str, count: int) -> list[dict]:
    from daemon.cli_history import _entry, _refs_by_target

    with open_store(paths) as store:
        by_target = _refs_by_target(store)
        return [_entry(c, ctx, by_target) for c, ctx in itertools.islice(store.walk_back(target), count)]


def _about(ref: dict) -> dict:
    about = {"ref": ref["name"], "context_id": ref["target"]}
    if ref.get("conflict"):
        about["warning"] = _conflict_note(ref)
    return about


def _conflict_note(ref: dict) -> str:
    return (f"warning: ref {ref['name']} is in conflict between {', '.join(ref['candidates'])}; showing "
            f"{ref['target']} (the latest update); writes to it are refused until it is merged")


def _ref_row(ref: dict) -> dict:
    return {k: ref[k] for k in ("name", "target", "conflict", "candidates", "updated") if k in ref}


def _status_summary(status: dict) -> dict:
    peers = [
        {k: p.get(k) for k in ("node_id", "address", "state", "in_sync", "last_sync", "error")}
        for p in status.get("peers", [])
    ]
    connected = [p for p in peers if p["state"] == "connected"]
    return {
        "daemon": True,
        "node_id": status.get("node_id"),
        "objects": status.get("objects"),
        "refs": status.get("refs"),
        "conflicts": status.get("conflicts", []),
        "store_error": status.get("store_error"),
        "in_sync": bool(connected) and all(p["in_sync"] for p in connected),
        "peers": peers,
    }
