"""`ctxfs show`, `log`, `heads` and `merge`: history from the command line.

`show`, `log` and `heads` read the store (SQLite in WAL mode: safe while a
daemon writes it). `merge` computes the merge in `sync.merge`, then stores
it as `push` does: through the daemon when one runs (its peers hear at
once), else straight into the store, the context and any ref update in one
transaction.

A context has no time of its own; its *time* is the newest timestamp of
the atoms it adds (none if it adds none). Its *message* is
`compression_metadata["message"]` when that is a string.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from datetime import datetime
from typing import TextIO

from daemon.cli import CliError, _open_store, _positive_int, _push_via_daemon, resolve_id
from daemon.cli_refs import _local_updates, ref_name, write_ref
from daemon.paths import HomePaths
from sync.codec import atom_to_json, encode_context
from sync.merge import MergeOutcome, MergeResult, merge_contexts, merged_into
from sync.model import CompressedContext
from sync.refs import encode_update
from sync.store import SQLiteContextStore

# Hex digits of an id in one-line output (log, heads, ref log).
SHORT_ID = 12
# Atoms (and removed hashes) `show` lists without --json; the counts are always whole.
SHOW_LISTED = 20
# A message is cut to its first line and this many characters in one-line output.
MESSAGE_WIDTH = 100


def _printable(text: str) -> str:
    """Text from other members, safe for a terminal: no control characters."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _time(ctx: CompressedContext) -> datetime | None:
    return max((a.timestamp for a in ctx.delta_atoms), default=None)


def _message(ctx: CompressedContext) -> str | None:
    message = ctx.compression_metadata.get("message")
    return message if isinstance(message, str) else None


def _refs_by_target(store: SQLiteContextStore) -> dict[str, list[str]]:
    """Context id -> names of the refs whose value (any candidate) it is, sorted."""
    table = store.ref_table()
    names: dict[str, list[str]] = defaultdict(list)
    for name in table.names():
        for candidate in table.value(name).candidates:
            names[candidate].append(name)
    return names


def _entry(cid: str, ctx: CompressedContext, refs: dict[str, list[str]]) -> dict:
    """One context as `log --json` and `heads --json` print it."""
    time = _time(ctx)
    return {
        "id": cid,
        "base": ctx.base_hash,
        "time": None if time is None else time.isoformat(),
        "message": _message(ctx),
        "added": len(ctx.delta_atoms),
        "removed": len(ctx.removed_hashes),
        "refs": refs.get(cid, []),
    }


def _short_time(iso: str | None) -> str:
    if iso is None:
        return "-"
    return datetime.fromisoformat(iso).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _line(entry: dict) -> str:
    """`3f0c1a2b4d5e 2026-11-24T10:01:00Z +2 -0 (main) message`."""
    parts = [entry["id"][:SHORT_ID], f"{_short_time(entry['time']):20}", f"+{entry['added']} -{entry['removed']}"]
    if entry["refs"]:
        parts.append("(" + ", ".join(_printable(n) for n in entry["refs"]) + ")")
    if entry["message"]:
        first = (entry["message"].splitlines() or [""])[0]
        parts.append(_printable(first[:MESSAGE_WIDTH]))
    return " ".join(parts)


def _print_entries(entries: list[dict], as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps(entries, ensure_ascii=False), file=out)
    else:
        for entry in entries:
            print(_line(entry), file=out)


# --------------------------------------------------------------------------
# show, log, heads
# --------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    store = _open_store(home)
    try:
        cid = resolve_id(store, args.id)
        ctx = store.get(cid)
        depth = len(store.get_lineage(cid)) - 1
        shown = {
            **_entry(cid, ctx, _refs_by_target(store)),
            "depth": depth,
            "compression_metadata": ctx.compression_metadata,
            "molecules": len(ctx.delta_molecules),
            "atoms_added": [atom_to_json(a, with_hash=True) for a in ctx.delta_atoms],
            "removed_hashes": sorted(ctx.removed_hashes),
        }
    finally:
        store.close()
    if args.json:
        print(json.dumps(shown, ensure_ascii=False), file=out)
        return 0
    refs = f" ({', '.join(_printable(n) for n in shown['refs'])})" if shown["refs"] else ""
    print(f"context  {cid}{refs}", file=out)
    print(f"base     {shown['base'] or '(none: a root)'}", file=out)
    print(f"depth    {depth}", file=out)
    print(f"time     {_short_time(shown['time'])}", file=out)
    if shown["message"]:
        print(f"message  {_printable((shown['message'].splitlines() or [''])[0])}", file=out)
    print(f"metadata {_printable(json.dumps(ctx.compression_metadata, ensure_ascii=False))}", file=out)
    print(f"delta    +{shown['added']} atoms, -{shown['removed']} atoms, {shown['molecules']} molecules", file=out)
    lines = [f"+ {a.relevance_score:.2f} [{_printable(str(a.type_sig))}] {_printable(a.content)}"
             for a in ctx.delta_atoms]
    lines += [f"- {h}" for h in shown["removed_hashes"]]
    if lines:
        print(file=out)
        for line in lines[:SHOW_LISTED]:
            print(line, file=out)
        if len(lines) > SHOW_LISTED:
            print(f"… {len(lines) - SHOW_LISTED} more (--json has them all)", file=out)
    return 0


def cmd_log(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    store = _open_store(home)
    try:
        cid = resolve_id(store, args.id)
        if args.ids:
            lineage = store.get_lineage(cid)
            for oid in lineage[-args.n:] if args.n else lineage:
                print(oid, file=out)
            return 0
        refs = _refs_by_target(store)
        entries = [_entry(c, ctx, refs) for c, ctx in itertools.islice(store.walk_back(cid), args.n)]
    finally:
        store.close()
    _print_entries(entries, args.json, out)
    return 0


def cmd_heads(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    store = _open_store(home)
    try:
        heads = store.heads()
        if args.ids:
            for cid in heads:
                print(cid, file=out)
            return 0
        refs = _refs_by_target(store)
        entries = [_entry(cid, store.get(cid), refs) for cid in heads]
    finally:
        store.close()
    _print_entries(entries, args.json, out)
    return 0


# --------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------


def _check_ref_is_kept(store: SQLiteContextStore, name: str, result: MergeResult) -> None:
    """Refuse to move ref `name` to the merge if that would drop one of its candidates."""
    value = store.ref_value(name)
    if value is None:
        return
    kept = merged_into(store, (result.ours, result.theirs))
    lost = [c for c in value.candidates if c not in kept]
    if lost:
        raise CliError(
            f"merge refused: ref {name} points at {lost[0]}, which this merge does not include; "
            f"merge it in too, or move the ref with `ctxfs ref set {name} ID`"
        )


def _store_merge(home: HomePaths, store: SQLiteContextStore, merged: CompressedContext, name: str | None) -> None:
    """Store the merge (and point `name` at it) as `push --ref` does."""
    if _push_via_daemon(home, store, [merged], ref=name) is not None:
        return
    blobs = [encode_context(merged)]
    if name is not None:
        blobs += [encode_update(u) for u in _local_updates(home, store, name, merged.id)]
    store.put_encoded(blobs)


def cmd_merge(args: argparse.Namespace, home: HomePaths, out: TextIO) -> int:
    name = ref_name(args.ref) if args.ref is not None else None
    store = _open_store(home)
    try:
        ours, theirs = resolve_id(store, args.ours), resolve_id(store, args.theirs)
        result = merge_contexts(store, ours, theirs, message=args.message)
        if name is not None:
            _check_ref_is_kept(store, name, result)
        if result.outcome is MergeOutcome.MERGED:
            _store_merge(home, store, result.context, name)
        else:
            if result.outcome is MergeOutcome.UP_TO_DATE:
                note = f"already up to date: {ours[:SHORT_ID]} holds every change of {theirs[:SHORT_ID]}"
            else:
                note = f"fast-forward: {theirs[:SHORT_ID]} builds on {ours[:SHORT_ID]}"
            print(f"ctxfs: {note}; nothing stored", file=sys.stderr)
            value = store.ref_value(name) if name is not None else None
            if name is not None and (value is None or value.conflict or value.target != result.target):
                write_ref(home, store, name, result.target)
    finally:
        store.close()
    print(result.target, file=out)
    return 0


# --------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    """`show`, `log`, `heads` and `merge` on the main parser's subcommands."""

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("show", cmd_show, "one context: base, depth, time, metadata, atoms added and removed, refs")
    p.add_argument("id", help="a context id, a unique prefix of one, or a ref name")
    p.add_argument("--json", action="store_true", help="one JSON object, with every atom added and hash removed")
    p = add("log", cmd_log, "the lineage of a context, newest first, one line each")
    p.add_argument("id", help="a context id, a unique prefix of one, or a ref name")
    p.add_argument("--json", action="store_true",
                   help="one JSON array: {id, base, time, message, added, removed, refs}")
    p.add_argument("-n", type=_positive_int, metavar="N", help="only the N newest")
    p.add_argument("--ids", action="store_true", help="ids only, one a line, root first (stable for scripts)")
    p = add("heads", cmd_heads, "contexts no other context names as base, one line each, in id order")
    p.add_argument("--json", action="store_true", help="one JSON array, as log --json")
    p.add_argument("--ids", action="store_true", help="ids only, one a line")
    p = add("merge", cmd_merge, "a new context on top of A with B's changes since their nearest common ancestor")
    p.add_argument("ours", metavar="A", help="the context to build on (id, prefix or ref name)")
    p.add_argument("theirs", metavar="B", help="the context whose changes to bring in")
    p.add_argument("--ref", metavar="NAME", help="then point ref NAME at the result (resolving any conflict)")
    p.add_argument("-m", "--message", metavar="MESSAGE", help="compression_metadata message of the merge")
