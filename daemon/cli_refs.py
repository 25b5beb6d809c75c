"""`ctxfs ref ...` and `ctxfs push --ref`: refs from the command line.

With a daemon running for the home, writes go through its local API: the
daemon is the one writer of its store, signs with its node key and tells
its peers at once. Without one, updates are made here, signed with the
home's node key (the same identity), and stored straight into the store.
Reads go through the daemon too when one runs, and print the same either
way (JSON keys sorted: the wire's maps come in canonical key order) (docs/protocol.md section 10 has the rules of the register).
"""

from __future__ import annotations

import contextlib

import argparse
import json
from collections.abc import Callable
from typing import TextIO

from daemon import localapi
from daemon.cli import _NO_DAEMON, CliError, _open_store, _push_via_daemon, _via_daemon, resolve_id, warn_if_conflict
from daemon.endpoint import read_refs
from daemon.paths import HomePaths
from sync.codec import encode_context
from sync.errors import ErrorCode
from sync.model import CompressedContext, is_id
from sync.refs import check_ref_name, encode_update
from sync.store import MissingBase, SQLiteContextStore


def ref_name(text: str) -> str:
    """`text` if a new ref may take that name, else CliError (one line)."""
    try:
        check_ref_name(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if is_id(text.lower()):
        # It could never be read back by name: 64 hex characters are an id.
        raise CliError(f"ref name {text!r}: 64 hex characters always read as a context id; choose another name")
    return text


def _local_updates(home: HomePaths, store: SQLiteContextStore, name: str, target: str | None) -> list:
    """The update(s) this home's node writes to set (or delete) `name` (daemon.memory does the signing)."""
    from daemon.memory import signed_ref_updates

    return signed_ref_updates(home, store, name, target)


def write_ref(home: HomePaths, store: SQLiteContextStore, name: str, target: str | None) -> list[str]:
    """Set (or with None, delete) ref `name`: through the daemon if one runs; the update ids."""

    async def work(client: localapi.LocalClient) -> list[str]:
        return await (client.ref_delete(name) if target is None else client.ref_set(name, target))

    ids = _via_daemon(home, work)
    if ids is _NO_DAEMON:
        with _offline_writer(home) as fresh:
            ids = fresh.put_ref_updates(_local_updates(home, fresh, name, target))
    return ids


@contextlib.contextmanager
def _offline_writer(home: HomePaths):
    """A store for one offline ref write, under the home's ref lock (the one
    offline MCP servers take too), opened inside it: a store read earlier
    may hold ref values another process has since moved on from."""
    from daemon.memory import ref_lock

    with ref_lock(home):
        store = SQLiteContextStore(home.store)
        try:
            yield store
        finally:
            store.close()


def _read(home: HomePaths, store: SQLiteContextStore, name: str | None, log: bool = False) -> list[dict]:
    """What `read_refs` answers, from the daemon if one runs (the same data)."""

    async def work(client: localapi.LocalClient) -> list[dict] | None:
        try:
            if name is None:
                return await client.refs()
            return await client.ref_log(name) if log else [await client.ref(name)]
        except localapi.LocalApiError as exc:
            if exc.code is ErrorCode.LIMIT_EXCEEDED:
                return None  # too large for one message: read the store directly
            raise

    items = _via_daemon(home, work)
    if items is _NO_DAEMON or items is None:
        items = read_refs(store, name, log)
    return items


def _with_store(home: HomePaths, work: Callable[[SQLiteContextStore], int]) -> int:
    store = _open_store(home)
    try:
        return work(store)
    finally:
        store.close()


# --------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------


def cmd_ref_set(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    name = ref_name(args.name)

    def work(store: SQLiteContextStore) -> int:
        write_ref(home, store, name, resolve_id(store, args.id))
        return 0

    return _with_store(home, work)


def cmd_ref_delete(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    name = ref_name(args.name)

    def work(store: SQLiteContextStore) -> int:
        if store.ref_value(name) is None:
            raise CliError(f"no ref {name}")
        write_ref(home, store, name, None)
        return 0

    return _with_store(home, work)


def cmd_ref_list(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    items = _with_store(home, lambda store: _read(home, store, None))
    if args.json:
        print(json.dumps(items, ensure_ascii=False, sort_keys=True), file=out)
    else:
        for ref in items:
            conflict = f"  (conflict: {len(ref['candidates'])} candidates)" if ref["conflict"] else ""
            print(f"{ref['name']} {ref['target']}{conflict}", file=out)
    return 0


def cmd_ref_show(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    name = ref_name(args.name)
    [ref] = _with_store(home, lambda store: _read(home, store, name))
    if args.json:
        print(json.dumps(ref, ensure_ascii=False, sort_keys=True), file=out)
        return 0
    print(f"name:     {ref['name']}", file=out)
    print(f"target:   {ref['target']}", file=out)
    print(f"updated:  {ref['updated']} by node {ref['node_id']}", file=out)
    if ref["conflict"]:
        print(f"conflict: {len(ref['candidates'])} candidates; resolve with `ctxfs ref set {name} ID`", file=out)
        for candidate in ref["candidates"]:
            print(f"          {candidate}", file=out)
    return 0


def cmd_ref_log(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    name = ref_name(args.name)
    updates = _with_store(home, lambda store: _read(home, store, name, log=True))
    if args.json:
        print(json.dumps(updates, ensure_ascii=False, sort_keys=True), file=out)
    else:
        for u in updates:
            print(f"{u['time']} {u['target'] or 'deleted':64} node {u['node_id'][:12]} update {u['id'][:12]}", file=out)
    return 0


# --------------------------------------------------------------------------
# push --ref
# --------------------------------------------------------------------------


def _builds_on(store: SQLiteContextStore, contexts: list[CompressedContext], target: str) -> bool:
    """Whether the last context's lineage (through the batch, then the store) holds `target`."""
    batch = {ctx.id: ctx for ctx in contexts}
    child, cid = None, contexts[-1].id
    while cid in batch:
        if cid == target:
            return True
        child, cid = cid, batch[cid].base_hash
        if cid is None:
            return False
    if not store.has(cid):
        raise MissingBase(child, cid)
    return target in store.get_lineage(cid)


def push_to_ref(home: HomePaths, store: SQLiteContextStore, contexts: list[CompressedContext], name: str,
                *, force: bool) -> list[str]:
    """Store `contexts` and point ref `name` at the last one; the context ids.

    A ref that exists must be an ancestor of (or be) the last context: a
    fast-forward. Otherwise nothing is stored, unless `force`. Without a
    daemon, contexts and update go into the store in one transaction.
    """
    name = ref_name(name)
    last = contexts[-1].id
    value = store.ref_value(name)
    if value is not None and not force:
        # Every candidate, not just the winner: moving a ref in conflict
        # past one side would silently drop it.
        behind = [c for c in value.candidates if not _builds_on(store, contexts, c)]
        if behind and value.conflict:
            raise CliError(
                f"push refused: ref {name} is in conflict and {last[:12]} does not build on its candidate "
                f"{behind[0]}; reunite the candidates first (`ctxfs merge A B --ref {name}`, ids from "
                f"`ctxfs ref show {name}`), or use --force"
            )
        if behind:
            raise CliError(
                f"push refused: {last} does not build on {value.target}, the target of ref {name} "
                "(not a fast-forward); push on top of it, or use --force"
            )
    if value is not None:
        warn_if_conflict(value)
    ids = _push_via_daemon(home, store, contexts, ref=name)
    if ids is None:
        with _offline_writer(home) as fresh:
            blobs = [encode_context(ctx) for ctx in contexts]
            blobs += [encode_update(u) for u in _local_updates(home, fresh, name, last)]
            ids = fresh.put_encoded(blobs)[: len(contexts)]
    return ids


# --------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    """`ctxfs ref SUBCOMMAND ...` on the main parser's subcommands."""
    about = "named, synced pointers to contexts (set, delete, list, show, log)"
    ref = sub.add_parser("ref", help=about, description=about)
    commands = ref.add_subparsers(dest="ref_command", metavar="SUBCOMMAND", required=True)

    def add(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("set", cmd_ref_set, "point ref NAME at a context (resolves a conflict)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("id", metavar="ID", help="a context id, a unique prefix of one, or another ref's name")
    p = add("delete", cmd_ref_delete, "delete ref NAME")
    p.add_argument("name", metavar="NAME")
    p = add("list", cmd_ref_list, "every ref and its target")
    p.add_argument("--json", action="store_true", help="one JSON array")
    p = add("show", cmd_ref_show, "one ref: target, conflict and candidates, last update")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p = add("log", cmd_ref_log, "every update of ref NAME, newest first (synced: every node's)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="one JSON array")
