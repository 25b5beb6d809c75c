"""The status document (schema 2, design.md and docs/operations.md) and its human form for `ctxfs status`.

The document is built by the node; this module only renders it. Rendering
never fails on a document from a newer or older daemon: a missing or odd
field shows as "?" rather than a traceback.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

SCHEMA = 2
# Names of refs in conflict shown in the table; --json has every one.
MAX_CONFLICTS_SHOWN = 3
# Ids are shown like git's short hashes: 12 hex digits are unique among far
# more nodes and objects than a cluster holds.
SHORT_ID = 12
# An error longer than this is cut in the table; --json has it whole.
MAX_ERROR_WIDTH = 60

_COLUMNS = ("PEER", "ADDRESS", "SOURCE", "STATE", "IN SYNC", "LAST SYNC", "SENT/RECEIVED", "ERROR")


def short_id(value: Any) -> str:
    return value[:SHORT_ID] if isinstance(value, str) and value else "?"


def _text(value: Any) -> str:
    return "?" if value is None or value == "" else str(value)


def _count(value: Any) -> str:
    return str(value) if type(value) is int else "?"


def _objects(value: Any) -> str:
    return "1 object" if value == 1 and type(value) is int else f"{_count(value)} objects"


def _when(value: Any) -> str:
    if value is None:
        return "never"
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return _text(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _in_sync(value: Any) -> str:
    # Only a literal true is "yes": anything else is not known to be in sync.
    return "yes" if value is True else "no"


def _error(value: Any) -> str:
    if value is None or value == "":
        return "-"
    text = " ".join(str(value).split())
    return text if len(text) <= MAX_ERROR_WIDTH else text[: MAX_ERROR_WIDTH - 1] + "…"


def _peer_row(peer: Any) -> tuple[str, ...]:
    if not isinstance(peer, dict):
        return ("?",) * len(_COLUMNS)
    return (
        short_id(peer.get("node_id")),
        _text(peer.get("address")),
        _text(peer.get("source")),
        _text(peer.get("state")),
        _in_sync(peer.get("in_sync")),
        _when(peer.get("last_sync")),
        f"{_count(peer.get('objects_sent'))}/{_count(peer.get('objects_received'))}",
        _error(peer.get("error")),
    )


def _summary(peers: list) -> str:
    if not peers:
        return "no peers"
    synced = sum(1 for p in peers if isinstance(p, dict) and p.get("in_sync") is True)
    if synced == len(peers):
        return f"in sync with all {len(peers)} peer{'s' if len(peers) != 1 else ''}"
    return f"in sync with {synced} of {len(peers)} peers"


def _refs(count: Any, conflicts: Any) -> str:
    text = _count(count)
    if not isinstance(conflicts, list) or not conflicts:
        return text
    names = [_text(name) for name in conflicts[:MAX_CONFLICTS_SHOWN]]
    more = ", …" if len(conflicts) > MAX_CONFLICTS_SHOWN else ""
    return f"{text} ({len(conflicts)} in conflict: {', '.join(names)}{more})"


def format_status(status: dict) -> str:
    """The `ctxfs status` table: this node, then one row per peer."""
    peers = status.get("peers")
    peers = peers if isinstance(peers, list) else []
    lines = [
        f"node     {short_id(status.get('node_id'))}  listening on {_text(status.get('listen'))}",
        f"root     {short_id(status.get('root'))}  {_objects(status.get('objects'))}",
        f"sync     {_summary(peers)}",
    ]
    if "refs" in status or "conflicts" in status:  # schema 2
        lines.append(f"refs     {_refs(status.get('refs'), status.get('conflicts'))}")
    if status.get("store_error"):
        lines.append(f"store    {_text(status.get('store_error'))}: receiving paused, reads served")
    if status.get("schema") != SCHEMA:
        lines.append(f"note     status schema {status.get('schema')!r}; this ctxfs reads schema {SCHEMA}")
    if peers:
        rows = [_COLUMNS] + [_peer_row(p) for p in peers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
        lines.append("")
        for row in rows:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)
