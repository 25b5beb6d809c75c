"""Appending to a ref: the context that adds and removes atoms on top of a
ref's value. Pure over a store (read only) and an expander; whoever calls
it holds the lock that makes read-build-write atomic (the node's ref-write
lock, or the home's refs.lock offline) and stores the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sync.model import CompressedContext, MemoryAtom, check_id
from sync.store import StoreError

# Ids named in one refusal at most: enough to act on, short enough to read.
MAX_NAMED = 5


class AppendRefused(StoreError, ValueError):
    """The append cannot be made as asked; nothing was stored. One line."""


def _short(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:MAX_NAMED])
    return shown + (f" and {len(ids) - MAX_NAMED} more" if len(ids) > MAX_NAMED else "")


def build_append(
    store: Any,
    expander: Any,
    name: str,
    delta_atoms: Sequence[MemoryAtom],
    removed_hashes: Sequence[str],
    metadata: dict[str, Any],
) -> CompressedContext:
    """The context to point `name` at: its base is the ref's value (None if
    the ref does not exist), its delta `delta_atoms` and `removed_hashes`.

    AppendRefused if the ref is in conflict (building on one candidate and
    superseding every one would hide the others' changes: merge first), if
    the delta is empty, or if a removed id is not an atom of the value.
    """
    value = store.ref_value(name)
    if value is not None and value.conflict:
        raise AppendRefused(
            f"ref {name} is in conflict between {', '.join(value.candidates)}; merge them first "
            f"(`ctxfs merge {value.candidates[0]} {value.candidates[1]} --ref {name}`) or pick one "
            f"(`ctxfs ref set {name} ID`)"
        )
    removed = sorted({check_id(h, "atom hash") for h in removed_hashes})
    if not delta_atoms and not removed:
        raise AppendRefused("nothing to append: no atoms to add and none to remove")
    base = value.target if value is not None else None
    if removed:
        live = {a.content_hash for a in expander.expand(base).atoms} if base is not None else set()
        unknown = [h for h in removed if h not in live]
        if unknown:
            where = f"ref {name} ({base})" if base is not None else f"ref {name} (it does not exist)"
            raise AppendRefused(f"{where} holds no atom {_short(unknown)}")
    return CompressedContext(
        base_hash=base,
        delta_atoms=tuple(delta_atoms),
        removed_hashes=frozenset(removed),
        compression_metadata=metadata,
    )
