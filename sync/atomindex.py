"""The atom index of a context: what expansion needs, beside its bytes.

Expanding a chain needs, for every delta, the ids of the atoms it adds
(to know which are shadowed or removed further up), their relevance (the
order) and the ids it removes. The canonical bytes hold all of it, but an
atom's id is a SHA-256 over its re-encoded content and type, so reading
them there means decoding every atom and hashing it: most of what a cold
expansion used to cost. The store therefore keeps, beside each context's
bytes, this small derived record (and `fsck` recomputes and compares it;
`fsck --repair` rewrites it). It holds nothing the bytes do not.

Layout (little-endian), the delta's *effective* adds only (the last
occurrence of an id within the delta, which is what expansion keeps),
most relevant first, ties in delta order:

    u8  version (1)
    u32 n   effective adds
    u32 m   removed ids
    n × f64 relevance
    n × u32 position in the delta's atoms
    n × u32 token estimate (model.estimate_tokens of the content)
    n × 32  atom id
    m × 32  removed id, ascending (as in the bytes)
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence

import attrs

from sync.model import CompressedContext, estimate_tokens

VERSION = 1
_HEADER = struct.Struct("<BII")
_ONE = struct.Struct("<BIId2I")  # the header and columns of an index of one add
ID_BYTES = 32


class AtomIndexError(ValueError):
    """An atom index that does not parse (a damaged derived column)."""


@attrs.frozen
class AtomIndex:
    """One context's effective adds (most relevant first) and removals."""

    relevances: array  # 'd'
    positions: array  # 'I'
    tokens: array  # 'I'
    ids: bytes  # 32 bytes per add, in the order above
    removed: bytes  # 32 bytes per removed id

    def __len__(self) -> int:
        return len(self.positions)

    def id_list(self) -> list[bytes]:
        ids = self.ids
        return [ids[i : i + ID_BYTES] for i in range(0, len(ids), ID_BYTES)]

    def removed_list(self) -> list[bytes]:
        removed = self.removed
        return [removed[i : i + ID_BYTES] for i in range(0, len(removed), ID_BYTES)]


def _from_le(typecode: str, data: bytes) -> array:
    values = array(typecode)
    values.frombytes(data)
    if sys.byteorder != "little":
        values.byteswap()
    return values


def build(ctx: CompressedContext) -> bytes:
    """The atom index of `ctx` (computes its atoms' ids if not yet known)."""
    atoms = ctx.delta_atoms
    return assemble(
        [bytes.fromhex(atom.content_hash) for atom in atoms],
        [atom.relevance_score for atom in atoms],
        [atom.content for atom in atoms],
        sorted(bytes.fromhex(h) for h in ctx.removed_hashes),
    )


def assemble(ids: Sequence[bytes], relevances: Sequence[float], contents: Sequence[str],
             removed: Sequence[bytes]) -> bytes:
    """The atom index of a delta given per atom (delta order) its id,
    relevance and content, and its removed ids ascending."""
    if len(ids) == 1:  # the most common delta (one remembered fact): nothing to order
        return _ONE.pack(VERSION, 1, len(removed), relevances[0], 0, estimate_tokens(contents[0])) + ids[0] + b"".join(removed)
    # The last occurrence of an id wins; most relevant first, ties in delta order.
    order = sorted({h: position for position, h in enumerate(ids)}.values())
    negated = [-r for r in relevances]
    order.sort(key=negated.__getitem__)
    n = len(order)
    # One struct call for the header and the three number columns
    # (little-endian whatever the machine): most deltas hold a few atoms.
    numbers = struct.pack(f"<BII{n}d{2 * n}I", VERSION, n, len(removed), *[relevances[p] for p in order], *order,
                          *[estimate_tokens(contents[p]) for p in order])
    return b"".join((numbers, *[ids[p] for p in order], *removed))


def removed_count(data: bytes) -> int:
    """How many ids the delta of a well-formed atom index removes (its header)."""
    return _HEADER.unpack_from(data)[2]


def parse(data: bytes) -> AtomIndex:
    """Parse a stored atom index; AtomIndexError if it is not one."""
    if len(data) < _HEADER.size:
        raise AtomIndexError("atom index: too short")
    version, n, m = _HEADER.unpack_from(data)
    if version != VERSION:
        raise AtomIndexError(f"atom index: version {version} is not {VERSION}")
    ids_at = _HEADER.size + n * 16
    removed_at = ids_at + n * ID_BYTES
    if len(data) != removed_at + m * ID_BYTES:
        raise AtomIndexError("atom index: length does not match its counts")
    at = _HEADER.size
    return AtomIndex(
        relevances=_from_le("d", data[at : at + 8 * n]),
        positions=_from_le("I", data[at + 8 * n : at + 12 * n]),
        tokens=_from_le("I", data[at + 12 * n : ids_at]),
        ids=data[ids_at:removed_at],
        removed=data[removed_at:],
    )
