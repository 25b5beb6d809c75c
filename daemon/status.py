"""The status document (schema 2, design.md and docs/operations.md) and its human form for `ctxfs status`.

The document is built by the node; this module only renders it and judges
it (`sync_problem`, the exit status). Rendering never fails on a document from a
newer or older daemon: a missing or odd field shows as "?" rather than a
traceback.

The default table fits 80 columns: a peer's error, and why it left, go on
lines of their own under its row, wrapped rather than cut. `wide` puts them
whole at the end of the row, in the table as it was before it had to fit.
"""

from __future__ import annotations

import textwrap
from datetime import datetime, timezone
from typing import Any

SCHEMA = 2
# Exit statuses of `ctxfs status` (tailscale-style: a script can branch on
# them). 1 is every failure: no daemon, a bad option, --wait's timeout.
EXIT_IN_SYNC = 0
EXIT_NOT_IN_SYNC = 3
# Names of refs in conflict shown in the table; --json has every one.
MAX_CONFLICTS_SHOWN = 3
# Ids are shown like git's short hashes: 12 hex digits are unique among far
# more nodes and objects than a cluster holds.
SHORT_ID = 12
# The default table's width: a terminal's, and what a mail or an issue keeps.
WIDTH = 80
# Lines a note (an error, a goodbye) may take under its row in the default
# table: a whole sentence and an id; --wide and --json have it whole.
MAX_NOTE_LINES = 3
# Where notes start: under the ADDRESS column, so they read as the row's.
NOTE_INDENT = SHORT_ID + 2

_WIDE_COLUMNS = ("PEER", "ADDRESS", "SOURCE", "STATE", "IN SYNC", "LAST SYNC", "SENT/RECEIVED", "NOTE")
_COLUMNS = ("PEER", "ADDRESS", "STATE", "IN SYNC", "LAST SYNC", "SENT/RECV")
_ADDRESS = 1  # the one column that gives way when a row does not fit


def sync_problem(status: Any, *, allow_alone: bool = False) -> str | None:
    """None when in sync: every connected peer is, and at least one is
    connected (or none need be: `allow_alone`); else why not, in words.

    Peers that are not connected cannot be compared and do not count: what
    status can vouch for is that what this node holds is on every peer it
    is connected to now. `ctxfs status` exits EXIT_NOT_IN_SYNC on a problem.
    """
    peers = status.get("peers") if isinstance(status, dict) else None
    connected = [p for p in peers or () if isinstance(p, dict) and p.get("state") == "connected"]
    if not connected:
        return None if allow_alone else "no peer is connected"
    behind = sum(1 for p in connected if p.get("in_sync") is not True)
    if behind:
        return f"{behind} of {len(connected)} connected peer{'s' if len(connected) != 1 else ''} not in sync"
    return None


def short_id(value: Any) -> str:
    return value[:SHORT_ID] if isinstance(value, str) and value else "?"


def _clean(value: Any) -> str:
    """One line of printable text: a peer's words must not move the cursor
    or clear the screen of whoever reads them."""
    text = "".join(c if c.isprintable() else " " for c in str(value))
    return " ".join(text.split())


def _text(value: Any) -> str:
    return "?" if value is None or value == "" else _clean(value)


def _count(value: Any) -> str:
    return str(value) if type(value) is int else "?"


def _objects(value: Any) -> str:
    return "1 object" if value == 1 and type(value) is int else f"{_count(value)} objects"


def _moment(value: Any) -> datetime | None:
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _when(value: Any) -> str:
    if value is None:
        return "never"
    moment = _moment(value)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if moment else _text(value)


def _ago(value: Any, now: datetime) -> str:
    if value is None:
        return "never"
    moment = _moment(value)
    if moment is None:
        return _text(value)
    seconds = int((now - moment).total_seconds())
    if seconds < 1:
        return "just now"  # or a little ahead of our clock
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _yes(value: Any) -> str:
    # Only a literal true is "yes": anything else is not known to be in sync.
    return "yes" if value is True else "no"


def _connected(peer: dict) -> bool:
    return peer.get("state") == "connected"


def _state(peer: dict) -> str:
    if not _connected(peer) and isinstance(peer.get("goodbye"), str):
        return "left"
    return _text(peer.get("state"))


def _address(peer: dict) -> str:
    # Where the peer can be reached, if it told us; else where it came from.
    return _text(peer.get("listen") or peer.get("address"))


def _notes(peer: dict, now: datetime | None) -> list[str]:
    """Why the peer is not connected, or what went wrong, in sentences;
    times relative to `now`, or in UTC without it."""
    notes = []
    goodbye = peer.get("goodbye")
    if not _connected(peer) and isinstance(goodbye, str):
        ended = peer.get("disconnected_at")
        left = "left" if ended is None else f"left {_ago(ended, now) if now else _when(ended)}"
        notes.append(f"{left}: {_clean(goodbye)}" if goodbye.strip() else left)
    if peer.get("error") not in (None, ""):
        notes.append(_clean(peer["error"]))
    return notes


def _sent_received(peer: dict) -> str:
    return f"{_count(peer.get('objects_sent'))}/{_count(peer.get('objects_received'))}"


def _summary(peers: list) -> str:
    if not peers:
        return "no peers"
    connected = [p for p in peers if isinstance(p, dict) and _connected(p)]
    # Known: not dialled, by the overlay's choice (docs/operations.md).
    known = sum(1 for p in peers if isinstance(p, dict) and p.get("state") == "known")
    away = len(peers) - len(connected) - known
    rest = ", ".join(part for part in (f"{away} not connected" if away else "",
                                        f"{known} known, not dialled" if known else "") if part)
    if not connected:
        return f"no peer connected ({rest})"
    synced = sum(1 for p in connected if p.get("in_sync") is True)
    count = len(connected)
    if synced == count:
        text = "in sync with the 1 connected peer" if count == 1 else f"in sync with all {count} connected peers"
    else:
        text = f"not in sync: {synced} of {count} connected peer{'s' if count != 1 else ''} in sync"
    return f"{text}; {rest}" if rest else text


def _refs(count: Any, conflicts: Any, room: int | None) -> str:
    text = _count(count)
    if not isinstance(conflicts, list) or not conflicts:
        return text
    shown = min(len(conflicts), MAX_CONFLICTS_SHOWN)
    while True:
        names = [_text(name) for name in conflicts[:shown]]
        more = ", …" if len(conflicts) > shown else ""
        line = f"{text} ({len(conflicts)} in conflict: {', '.join(names)}{more})"
        if room is None or len(line) <= room:
            return line
        if shown <= 1:
            return f"{text} ({len(conflicts)} in conflict; `ctxfs ref list` names them)"
        shown -= 1


def _wrap(text: str, indent: int, width: int, first: str = "") -> list[str]:
    """`text` in lines of `width`, the first starting with `first`, the
    others indented; at most MAX_NOTE_LINES, the last cut at a word."""
    room = width - indent
    lines = textwrap.wrap(text, room, break_on_hyphens=False) or [""]
    if len(lines) > MAX_NOTE_LINES:
        rest = " ".join(lines[MAX_NOTE_LINES - 1:])
        last = textwrap.shorten(rest, room, placeholder=" …")
        if last == "…":  # one long word (an id): cut it
            last = rest[: room - 1] + "…"
        lines = lines[: MAX_NOTE_LINES - 1] + [last]
    return [(first or " " * indent) + line if n == 0 else " " * indent + line for n, line in enumerate(lines)]


def _header(status: dict, peers: list, width: int | None) -> list[str]:
    label = len("refs     ")
    lines = [
        f"node     {short_id(status.get('node_id'))}  listening on {_text(status.get('listen'))}",
        f"root     {short_id(status.get('root'))}  {_objects(status.get('objects'))}",
        f"sync     {_summary(peers)}",
    ]
    if "refs" in status or "conflicts" in status:  # schema 2
        room = None if width is None else width - label
        lines.append(f"refs     {_refs(status.get('refs'), status.get('conflicts'), room)}")
    if status.get("store_error"):
        store = f"{_text(status.get('store_error'))}: receiving paused, reads served"
        lines += [f"store    {store}"] if width is None else _wrap(store, label, width, first="store    ")
    if status.get("schema") != SCHEMA:
        lines.append(f"note     status schema {status.get('schema')!r}; this ctxfs reads schema {SCHEMA}")
    return lines


def _align(cells: tuple[str, ...], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()


def _wide_table(peers: list) -> list[str]:
    rows = [_WIDE_COLUMNS]
    for peer in peers:
        if not isinstance(peer, dict):
            rows.append(("?",) * len(_WIDE_COLUMNS))
            continue
        rows.append((
            short_id(peer.get("node_id")), _address(peer), _text(peer.get("source")), _state(peer),
            _yes(peer.get("in_sync")), _when(peer.get("last_sync")), _sent_received(peer),
            "; ".join(_notes(peer, None)) or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_WIDE_COLUMNS))]
    return [_align(row, widths) for row in rows]


def _table(peers: list, now: datetime, width: int) -> list[str]:
    rows: list[tuple[tuple[str, ...], list[str]]] = [(_COLUMNS, [])]
    for peer in peers:
        if not isinstance(peer, dict):
            rows.append((("?",) * len(_COLUMNS), []))
            continue
        cells = (short_id(peer.get("node_id")), _address(peer), _state(peer), _yes(peer.get("in_sync")),
                 _ago(peer.get("last_sync"), now), _sent_received(peer))
        rows.append((cells, _notes(peer, now)))
    widths = [max(len(cells[i]) for cells, _ in rows) for i in range(len(_COLUMNS))]
    # The address column takes what the others leave; an address longer
    # than that moves to a line of its own under its row.
    room = width - (sum(widths) - widths[_ADDRESS]) - 2 * (len(_COLUMNS) - 1)
    fitting = [len(cells[_ADDRESS]) for cells, _ in rows if len(cells[_ADDRESS]) <= room]
    widths[_ADDRESS] = max(fitting + [len("(below)")] * (len(fitting) < len(rows)))
    lines = []
    for cells, notes in rows:
        if len(cells[_ADDRESS]) > widths[_ADDRESS]:
            notes = [f"address {cells[_ADDRESS]}", *notes]
            cells = cells[:_ADDRESS] + ("(below)",) + cells[_ADDRESS + 1:]
        lines.append(_align(cells, widths))
        for note in notes:
            lines += _wrap(note, NOTE_INDENT, width)
    return lines


def format_status(status: dict, *, wide: bool = False, now: datetime | None = None, width: int = WIDTH) -> str:
    """The `ctxfs status` table: this node, then one row per peer.

    By default it fits `width` columns, times are relative to `now`, and a
    peer's notes (error, goodbye) go whole on lines of their own; `wide`
    puts everything on the row, with times in UTC.
    """
    peers = status.get("peers")
    peers = peers if isinstance(peers, list) else []
    lines = _header(status, peers, None if wide else width)
    if peers:
        lines.append("")
        lines += _wide_table(peers) if wide else _table(peers, now or datetime.now(timezone.utc), width)
    return "\n".join(lines)
