"""The `ctxfs` command line.

Every failure a user can cause ends in one line on stderr and a non-zero
exit, with the store unchanged; a traceback means a bug in ctxfs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import trio

from daemon import endpoint, localapi, security
from daemon.paths import HomePaths, resolve_home
from daemon.endpoint import resolve_context_id
from daemon.status import EXIT_IN_SYNC, EXIT_NOT_IN_SYNC, format_status, sync_problem
from sync import fulltext
from sync.codec import DecodeError, atom_to_json, context_from_json, expanded_to_json
from sync.errors import ErrorCode
from sync.expand import ExpanderFunctor, ExpansionChunk, check_removals, stream_expansion
from sync.model import CompressedContext, ExpandedContext, parse_type
from sync.query import ContextQuery
from sync.refs import RefValue
from sync.store import MissingBase, NotFound, SQLiteContextStore, StoreError, UnheldRemoval

# Largest push input read: far beyond any real context, small enough that a
# wrong file (a disk image piped in by mistake) is refused before parsing.
MAX_PUSH_BYTES = 256 * 1024 * 1024
# Atoms per chunk of `expand --stream` unless --chunk-size says otherwise.
DEFAULT_CHUNK_SIZE = 10
# `status --watch` refresh period, seconds.
WATCH_INTERVAL = 1.0
# How often `status --wait` asks the daemon: a status is a few hundred bytes
# on the local socket, built from memory; a tenth of a second is "as soon
# as" for a person or a script, and costs the daemon nothing it notices.
WAIT_INTERVAL = 0.1
CLEAR_SCREEN = "\x1b[H\x1b[2J"

class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


# --------------------------------------------------------------------------
# the running daemon, if any
# --------------------------------------------------------------------------

_NO_DAEMON = object()


def _via_daemon(home: HomePaths, work: Callable) -> object:
    """`await work(client)` against the daemon of this home; _NO_DAEMON if none answers.

    The CLI is synchronous: each command that uses the daemon runs its own
    trio.run for the length of that command.
    """

    async def main() -> object:
        try:
            async with localapi.LocalClient.connect(home) as client:
                return await work(client)
        except localapi.DaemonNotRunning:
            return _NO_DAEMON

    return trio.run(main)


def _open_store(home: HomePaths) -> SQLiteContextStore:
    if not home.is_initialised():
        raise CliError(f"no ctxfs node at {home.root}; run `ctxfs init` first")
    return SQLiteContextStore(home.store)


def resolve_id(store: SQLiteContextStore, text: str) -> str:
    """A context id from what a user typed: a full id, a ref name or a
    unique prefix (`endpoint.resolve_context_id` has the order); a ref in
    conflict gives its winner, with a warning on stderr."""
    try:
        context_id, value = resolve_context_id(store, text)
    except (NotFound, ValueError) as exc:
        raise CliError(str(exc)) from None
    if value is not None:
        warn_if_conflict(value)
    return context_id


def warn_if_conflict(value: RefValue) -> None:
    """One line on stderr when a command picks the winner of a conflicted ref."""
    if value.conflict:
        print(
            f"ctxfs: warning: ref {value.name} is in conflict between {', '.join(value.candidates)}; "
            f"using {value.target} (the latest update); resolve with `ctxfs ref set {value.name} ID`",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    wanted = None
    if args.cluster_key_file:
        wanted = security.read_cluster_key(Path(args.cluster_key_file))
    if home.cluster_key.exists():
        held = security.read_cluster_key(home.cluster_key)
        if wanted is not None and wanted != held:
            raise CliError(
                f"{home.root} already belongs to another cluster; "
                "use a new --home to join this one (the existing key was left as it is)"
            )
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The home holds keys and the store: nobody else may read it, even if it
    # existed before (mkdir's mode applies only to a directory it creates).
    home.root.chmod(0o700)
    if not home.cluster_key.exists():
        security.write_cluster_key(home.cluster_key, wanted or security.new_cluster_key())
    if home.node_key.exists():
        key = security.read_node_key(home.node_key)
    else:
        key = security.new_node_key(home.node_key)
    SQLiteContextStore(home.store).close()
    print(security.node_id(key), file=out)
    return 0


def cmd_cluster_key(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    if not home.cluster_key.exists():
        raise CliError(f"no ctxfs node at {home.root}; run `ctxfs init` first")
    print(security.format_cluster_key(security.read_cluster_key(home.cluster_key)), file=out)
    return 0


def _read_input(source: str) -> str:
    try:
        if source == "-":
            if sys.stdin.isatty():
                # Else `ctxfs push` typed alone would seem to hang.
                print("ctxfs: reading contexts from the terminal (a JSON object, an array, or JSON Lines); "
                      "end with Ctrl-D, or give a FILE", file=sys.stderr, flush=True)
            data = sys.stdin.buffer.read(MAX_PUSH_BYTES + 1)
        else:
            with open(source, "rb") as f:
                data = f.read(MAX_PUSH_BYTES + 1)
    except OSError as exc:
        raise CliError(f"cannot read {source}: {exc.strerror}") from None
    if len(data) > MAX_PUSH_BYTES:
        raise CliError(f"input is larger than {MAX_PUSH_BYTES // (1024 * 1024)} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"input is not UTF-8 (byte {exc.start})") from None


def parse_contexts(text: str) -> list[tuple[str | None, CompressedContext]]:
    """One JSON object, a JSON array of them, or JSON Lines with one context
    object per line.

    Returns (where, context) pairs: where is `line N` (JSON Lines), `item N`
    (an array, counted from 1 like lines) or None for a single object.
    """
    if not text.strip():
        raise CliError("input is empty")
    try:
        whole = json.loads(text)
    except RecursionError:
        raise CliError("input nests too deeply") from None
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            raise CliError(f"input is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        documents = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                documents.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as line_exc:
                raise CliError(f"line {number}: not JSON: {line_exc.msg} at column {line_exc.colno}") from None
            except RecursionError:
                raise CliError(f"line {number}: nests too deeply") from None
    else:
        if isinstance(whole, list):
            documents = [(f"item {number}", doc) for number, doc in enumerate(whole, 1)]
        else:
            documents = [(None, whole)]
    if not documents:
        raise CliError("input holds no context")
    contexts = []
    for where, doc in documents:
        try:
            contexts.append((where, context_from_json(doc)))
        except DecodeError as exc:
            raise CliError(f"{where}: {exc}" if where else str(exc)) from None
    return contexts


def _push_via_daemon(home: HomePaths, store: SQLiteContextStore, contexts: list[CompressedContext],
                     ref: str | None = None) -> list[str] | None:
    """Push through the running daemon so its peers learn at once; None if none runs.

    The daemon commits the whole push in one transaction (an interrupted
    push leaves nothing); bases are checked against the store first so a
    missing one is named before anything is sent. With `ref`, the daemon
    then points that ref at the last context.
    """

    async def work(client: localapi.LocalClient) -> list[str]:
        known: set[str] = set()
        for ctx in contexts:
            if ctx.base_hash is not None and ctx.base_hash not in known and not store.has(ctx.base_hash):
                raise MissingBase(ctx.id, ctx.base_hash)
            known.add(ctx.id)
        progress = _PushProgress(sys.stderr)
        try:
            ids = await client.push(contexts, progress=progress)
        finally:
            progress.done()
        if ref is not None:
            await client.ref_set(ref, ids[-1])
        return ids

    ids = _via_daemon(home, work)
    return None if ids is _NO_DAEMON else ids


class _PushProgress:
    """A progress line on a terminal for a push that takes a while."""

    AFTER_SECONDS = 2.0  # quick pushes print nothing
    EVERY_SECONDS = 0.25

    def __init__(self, err: TextIO) -> None:
        self._err = err if err.isatty() else None
        self._start = time.monotonic()
        self._shown_at = 0.0

    def __call__(self, sent: int, total: int) -> None:
        now = time.monotonic()
        if self._err is None or now - self._start < self.AFTER_SECONDS or now - self._shown_at < self.EVERY_SECONDS:
            return
        self._shown_at = now
        state = "committing" if sent == total else "sending"
        print(f"\rpush: {state} {sent:,}/{total:,} contexts", end="", file=self._err, flush=True)

    def done(self) -> None:
        if self._err is not None and self._shown_at:
            print("\r\033[K", end="", file=self._err, flush=True)


def cmd_push(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    store = _open_store(home)
    try:
        numbered = parse_contexts(_read_input(args.file))
        try:
            contexts = [ctx for _, ctx in numbered]
            check_removals(store, contexts)
            if args.ref is not None:
                from daemon import cli_refs

                ids = cli_refs.push_to_ref(home, store, contexts, args.ref, force=args.force)
            else:
                ids = _push_via_daemon(home, store, contexts)
                if ids is None:
                    ids = store.put_many(contexts)
        except (MissingBase, UnheldRemoval) as exc:
            where = next((w for w, ctx in numbered if ctx.id == exc.context_id), None)
            raise CliError(f"{where}: {exc}" if where else str(exc)) from None
        for cid in ids:
            print(cid, file=out)
    finally:
        store.close()
    return 0


def _print_chunk(chunk: ExpansionChunk, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps(chunk.to_dict(), ensure_ascii=False), file=out, flush=True)
    else:
        for atom in chunk.atoms:
            print(f"[{atom.type_sig}] {atom.content}", file=out)
        out.flush()


def _print_expansion(cid: str, expanded: ExpandedContext, as_json: bool, out: TextIO) -> None:
    if as_json:
        root = endpoint.atom_root(expanded.atoms).hex()
        print(json.dumps(expanded_to_json(cid, expanded, atom_root=root), ensure_ascii=False), file=out)
    else:
        text = expanded.to_prompt_context()
        if text:
            print(text, file=out)


def _expand_via_daemon(args: argparse.Namespace, home: HomePaths, cid: str, out: TextIO) -> ExpandedContext | bool:
    """The expansion as the running daemon serves it (a stream is printed
    here: True); False if no daemon runs, or the answer is too large for
    one message."""

    async def work(client: localapi.LocalClient) -> ExpandedContext | bool:
        if args.stream:
            chunks = client.expand_stream(
                cid,
                relevance_threshold=args.min_relevance,
                chunk_size=args.chunk_size,
                max_tokens_per_chunk=args.max_tokens or 500,
            )
            async with chunks:
                async for chunk in chunks:
                    _print_chunk(
                        ExpansionChunk(
                            chunk_id=chunk.chunk_id,
                            atoms=chunk.atoms,
                            is_final=chunk.is_final,
                            cumulative_tokens=chunk.cumulative_tokens,
                            expansion_progress=chunk.progress,
                        ),
                        args.json,
                        out,
                    )
            return True
        try:
            response = await client.expand(cid, min_relevance=args.min_relevance, max_tokens=args.max_tokens)
        except localapi.LocalApiError as exc:
            if exc.code is ErrorCode.LIMIT_EXCEEDED:
                return False  # too large for one message: read the store directly
            raise
        return endpoint.expanded_from_response(response)

    result = _via_daemon(home, work)
    return False if result is _NO_DAEMON else result


def _why_nothing_fits(expander: ExpanderFunctor, cid: str, min_relevance: float, max_tokens: int) -> str | None:
    """Why a budget left nothing to print, if atoms were there to print."""
    sizes = [a.tokens for a in expander.expand(cid).atoms if a.relevance_score >= min_relevance]
    if not sizes:
        return None  # nothing to fit: an empty expansion is no surprise
    return f"no atom fits in {max_tokens} tokens (the smallest takes {min(sizes)}); raise --max-tokens"


def cmd_expand(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    if args.chunk_size is None:
        args.chunk_size = DEFAULT_CHUNK_SIZE
    elif not args.stream:
        raise CliError("--chunk-size needs --stream (it is the number of atoms per streamed chunk)")
    store = _open_store(home)
    try:
        cid = resolve_id(store, args.id)
        served = _expand_via_daemon(args, home, cid, out)
        if served is True:
            return 0
        if args.stream:
            chunks = stream_expansion(
                store,
                cid,
                relevance_threshold=args.min_relevance,
                chunk_size=args.chunk_size,
                max_tokens_per_chunk=args.max_tokens or 500,
            )
            for chunk in chunks:
                _print_chunk(chunk, args.json, out)
            return 0
        expander = ExpanderFunctor(store)
        if served is False:
            served = endpoint.filter_expansion(expander.expand(cid), args.min_relevance, args.max_tokens)
        _print_expansion(cid, served, args.json, out)
        if args.max_tokens is not None and not served.atoms:
            why = _why_nothing_fits(expander, cid, args.min_relevance, args.max_tokens)
            if why is not None:
                print(f"ctxfs: {why}", file=sys.stderr)
    finally:
        store.close()
    return 0


def _query_via_daemon(home: HomePaths, cid: str, query: ContextQuery) -> list | None:
    """The running daemon's answer to the query; None if no daemon runs (or the answer is too large)."""

    async def work(client: localapi.LocalClient) -> list | None:
        try:
            return await client.query(
                cid,
                type_filter=query.type_filter,
                min_relevance=query.min_relevance,
                max_age_seconds=query.max_age_seconds,
                limit=query.limit,
                text=query.text,
            )
        except localapi.LocalApiError as exc:
            if exc.code is ErrorCode.LIMIT_EXCEEDED:
                return None
            raise

    hits = _via_daemon(home, work)
    return None if hits is _NO_DAEMON else hits


def cmd_query(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    try:
        type_filter = parse_type(args.type) if args.type is not None else None
    except ValueError as exc:
        raise CliError(f"--type: {exc}") from None
    try:
        query = ContextQuery(
            type_filter=type_filter, min_relevance=args.min_relevance, max_age_seconds=args.max_age, limit=args.limit,
            text=args.text,
        )
    except ValueError as exc:
        raise CliError(f"--text: {exc}") from None
    store = _open_store(home)
    try:
        cid = resolve_id(store, args.id)
        hits = _query_via_daemon(home, cid, query)
        if hits is None:
            now = datetime.now(timezone.utc)
            hits = fulltext.run_query(store, ExpanderFunctor(store).expand(cid), query, now)
    finally:
        store.close()
    if args.json:
        print(json.dumps([atom_to_json(a, with_hash=True) for a in hits], ensure_ascii=False), file=out)
    else:
        for atom in hits:
            print(f"{atom.relevance_score:.2f} [{atom.type_sig}] {atom.content}", file=out)
    return 0


def cmd_status(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    """Exit 0 when in sync, 3 when not (`status.sync_problem`); with --json
    always 0 once the document is printed (it says per peer), and with
    --wait 0 once in sync, 1 at the timeout. 1 when no daemon runs."""
    if args.timeout is not None and not args.wait:
        raise CliError("--timeout goes with --wait")

    def show(status: dict, first: bool) -> None:
        if args.json:
            print(json.dumps(status, ensure_ascii=False), file=out, flush=True)
            return
        text = format_status(status, wide=args.wide)
        if args.watch:
            if out.isatty():
                out.write(CLEAR_SCREEN)
            elif not first:
                out.write("\n")
        print(text, file=out, flush=True)

    async def wait(client: localapi.LocalClient) -> dict:
        deadline = trio.current_time() + (args.timeout if args.timeout is not None else float("inf"))
        while True:
            status = await client.status()
            if sync_problem(status, allow_alone=args.allow_alone) is None or trio.current_time() >= deadline:
                return status
            await trio.sleep_until(min(deadline, trio.current_time() + WAIT_INTERVAL))

    async def work(client: localapi.LocalClient) -> dict:
        if args.wait:
            return await wait(client)
        first = True
        while True:
            status = await client.status()
            show(status, first)
            if not args.watch:
                return status
            first = False
            await trio.sleep(WATCH_INTERVAL)

    try:
        result = _via_daemon(home, work)
    except KeyboardInterrupt:
        if args.watch:
            return 0  # Ctrl-C is how --watch ends
        raise
    if result is _NO_DAEMON:
        raise CliError(f"no daemon is running for {home.root}")
    if args.watch:
        return 0
    problem = sync_problem(result, allow_alone=args.allow_alone)
    if args.wait:
        show(result, True)
        if problem is not None:
            print(f"ctxfs: not in sync after {args.timeout:g} s: {problem}", file=sys.stderr)
            return 1
        return 0
    if args.json:
        return 0
    return EXIT_IN_SYNC if problem is None else EXIT_NOT_IN_SYNC


def cmd_daemon(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    from daemon import logs, neterrors
    from daemon.config import ConfigError, load_config
    from daemon.node import Node, run_daemon
    from daemon.paths import default_home

    # A fresh machine: `ctxfs daemon` alone must work, so the default home
    # is made on first run. Any other home must exist: a mistyped --home
    # would otherwise start a new node in a new cluster of its own.
    first_run = not home.is_initialised()
    if first_run and not args.init and not _same_path(home.root, default_home()):
        raise CliError(
            f"no ctxfs node at {home.root}; run `ctxfs --home {home.root} init` first "
            "(or pass --init to make a new node in a new cluster there)"
        )
    try:
        config = load_config(home.config, {
            "listen": args.listen,
            "peers": args.peer or None,
            "mdns": False if args.no_mdns else None,
            "mdns_interfaces": args.mdns_interface or None,  # discovery
            "max_peers": args.max_peers,
            "log_json": True if args.log_json else None,
        })
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    logs.configure(json_lines=config.log_json, level=logs.level_for(args.verbose, args.quiet),
                   everything=args.verbose >= 2)
    if first_run:
        cmd_init(argparse.Namespace(cluster_key_file=None), home, io.StringIO())
        logging.getLogger(__name__).info(
            "first run: made a new node in a new cluster at %s; to join an existing cluster instead, "
            "stop the daemon, remove that directory and run `ctxfs init --cluster-key-file F`", home.root)
    node_id = security.node_id(security.read_node_key(home.node_key))
    try:
        try:
            run_daemon(Node(paths=home, config=config, node_id=node_id))
        except BaseExceptionGroup as group:
            raise _first_leaf(group) from None
    except neterrors.ListenFailed as exc:
        raise CliError(str(exc)) from None
    return 0


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def cmd_fsck(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    store = _open_store(home)
    try:
        problems = 0
        if args.repair:
            # Derived indexes only: they are rebuilt from the contexts, which
            # fsck then checks (and never changes). The atom indexes first:
            # the full-text index reads atom ids from them. A context that
            # does not decode is passed over by both and named below.
            fixed = store.rebuild_atom_indexes()
            if fixed:
                print(f"fsck: rebuilt the atom index of {fixed} context(s)", file=out)
            atoms = store.rebuild_text_index()
            print(f"fsck: rebuilt the full-text index ({atoms} atoms)", file=out)
        else:
            state = store.text_index_state()
            # Not a problem: the first text query builds it. An index merely
            # behind (contexts stored since it last caught up) is the normal
            # state between writes and the next catch-up: not even a note.
            if state in (fulltext.MISSING, fulltext.STALE):
                print(f"fsck: note: the full-text index is {state}; the first text query"
                      " or `ctxfs fsck --repair` rebuilds it", file=out)
        for problem in store.fsck():
            problems += 1
            print(problem, file=out)
        count = len(store)
    finally:
        store.close()
    if problems:
        print(f"fsck: {_count(problems, 'problem')} in {_count(count, 'object')}", file=sys.stderr)
        return 1
    print(f"fsck: {_count(count, 'object')}, all sound", file=out)
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# --------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


HOME_HELP = "the node's directory (default: $CTXFS_HOME, else the user data dir)"


class _CommandParser(argparse.ArgumentParser):
    """A (sub)command's parser: it takes --home too, so `ctxfs push --home
    DIR` works as `ctxfs --home DIR push` does. SUPPRESS leaves the value
    the main parser read alone unless the option is given here too (then
    the later one wins)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS, help=HOME_HELP)


def _version() -> str:
    try:
        return importlib.metadata.version("ctxfs")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxfs", description="Peer-to-peer sync daemon for AI context.")
    parser.add_argument("--home", metavar="DIR", help=HOME_HELP)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # Nested subcommands (`ref set`) get the same parser class, hence --home.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser)

    def add(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("init", cmd_init, "create the node's home, store and identity; print the node id")
    p.add_argument("--cluster-key-file", metavar="F", help="join the cluster whose key is in F")
    add("cluster-key", cmd_cluster_key, "print this node's cluster key")
    p = add("push", cmd_push,
            "store contexts given as interchange JSON (an object, an array of them, or JSON Lines); print their ids")
    p.add_argument("file", nargs="?", default="-", metavar="FILE", help="input file, or - for stdin (default)")
    p.add_argument("--ref", metavar="NAME", help="then point ref NAME at the last context (a fast-forward only)")
    p.add_argument("--force", action="store_true", help="with --ref: move the ref even if the push does not build on it")
    p = add("expand", cmd_expand, "print the expansion of a context")
    p.add_argument("id", help="a context id, a unique prefix of one, or a ref name")
    p.add_argument("--json", action="store_true", help="one JSON object (with --stream: one JSON line per chunk)")
    p.add_argument("--stream", action="store_true", help="stream chunks, most relevant first")
    p.add_argument("--min-relevance", type=_non_negative_float, default=0.0, metavar="X")
    p.add_argument("--chunk-size", type=_positive_int, metavar="N",
                   help=f"atoms per chunk (with --stream only; default {DEFAULT_CHUNK_SIZE})")
    p.add_argument("--max-tokens", type=_positive_int, metavar="N",
                   help="token budget of the output: the most relevant atoms that fit; with --stream, per chunk "
                        "(default 500)")
    p = add("query", cmd_query, "run a ContextQuery over the expansion of a context")
    p.add_argument("id", help="a context id, a unique prefix of one, or a ref name")
    p.add_argument("--type", metavar="T", help="keep atoms whose type unifies with T, e.g. String or List[Int]")
    p.add_argument("--min-relevance", type=_non_negative_float, default=0.0, metavar="X")
    p.add_argument("--max-age", type=_non_negative_float, metavar="SECONDS")
    p.add_argument("--limit", type=_positive_int, metavar="N")
    p.add_argument("--text", metavar="WORDS",
                   help="keep atoms whose content holds any of WORDS (stemmed), best match first, then most relevant")
    p.add_argument("--json", action="store_true")
    p = add("daemon", cmd_daemon, "run the node in the foreground until SIGINT or SIGTERM")
    p.add_argument("--listen", metavar="HOST:PORT", help="address for peers (default 0.0.0.0:7787; port 0 picks one)")
    p.add_argument("--peer", metavar="HOST:PORT", action="append", help="a static peer (repeatable)")
    p.add_argument("--no-mdns", action="store_true", help="do not discover peers through mDNS")
    p.add_argument("--max-peers", metavar="N", type=int,
                   help="dial at most N of the peers it knows (default 8; the rest stay known, see docs/operations.md)")
    p.add_argument("--mdns-interface", metavar="ADDR", action="append",
                   help="run mDNS on the interface with this IP address (repeatable; default: the listen "
                        "address if specific, else every IPv4 interface)")
    p.add_argument("--log-json", action="store_true", help="log JSON lines instead of plain lines")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log more: -v adds ctxfs's debug lines, -vv every library's too")
    p.add_argument("-q", "--quiet", action="count", default=0,
                   help="log less: -q warnings and errors only, -qq errors only")
    p.add_argument("--init", action="store_true",
                   help="if the home holds no node yet, make one in a new cluster (the default home needs no --init)")
    p = add("status", cmd_status, "show this node's sync status (needs the daemon)")
    p.epilog = "exit status: 0 in sync, 3 not in sync (or no peer connected), 1 no daemon or --wait timed out"
    p.add_argument("--json", action="store_true",
                   help="one JSON object (schema 2), exit 0; with --watch, one line per refresh")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    how.add_argument("--wait", action="store_true",
                     help="wait until every connected peer is in sync and one is connected, then show the status")
    p.add_argument("--timeout", type=_non_negative_float, metavar="S",
                   help="with --wait: exit 1 if not in sync within S seconds (default: wait until Ctrl-C)")
    p.add_argument("--allow-alone", action="store_true",
                   help="in sync with no peer connected too (a node on its own)")
    p.add_argument("--wide", action="store_true",
                   help="the table wider than 80 columns: source, times in UTC, errors whole on the row")
    p = add("fsck", cmd_fsck, "re-hash every object and check every lineage")
    p.add_argument("--repair", action="store_true",
                   help="first rebuild the derived indexes (full-text) from the stored contexts")
    from daemon import cli_history, cli_refs

    cli_history.add_parser(sub)  # show, log, heads, merge
    cli_refs.add_parser(sub)
    from daemon import cli_peers

    cli_peers.add_parser(sub)  # peer forget
    from daemon import cli_mcp

    cli_mcp.add_parser(sub)  # mcp
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    home = HomePaths(resolve_home(args.home))
    try:
        return args.func(args, home, out)
    except (CliError, DecodeError, StoreError, security.KeyFileError, localapi.LocalApiError,
            localapi.DaemonAlreadyRunning) as exc:
        print(f"ctxfs: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `ctxfs expand ID | head`: the reader left; that is not an error.
        sys.stderr.close()
        return 0
    except OSError as exc:
        message = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        print(f"ctxfs: {message}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"ctxfs: store {home.store}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

