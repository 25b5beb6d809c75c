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

import attrs

from sync.model import CompressedContext, estimate_tokens

VERSION = 1
_HEADER = struct.Struct("<BII")
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


def _le(values: array) -> bytes:
    if sys.byteorder != "little":
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def _from_le(typecode: str, data: bytes) -> array:
    values = array(typecode)
    values.frombytes(data)
    if sys.byteorder != "little":
        values.byteswap()
    return values


def build(ctx: CompressedContext) -> bytes:
    """The atom index of `ctx` (computes its atoms' ids if not yet known)."""
    atoms = ctx.delta_atoms
    hashes = [atom.content_hash for atom in atoms]
    # The last occurrence of an id wins; most relevant first, ties in delta order.
    order = sorted({h: position for position, h in enumerate(hashes)}.values())
    negated = [-atom.relevance_score for atom in atoms]
    order.sort(key=negated.__getitem__)
    relevances = array("d", [atoms[p].relevance_score for p in order])
    tokens = array("I", [estimate_tokens(atoms[p].content) for p in order])
    removed = sorted(ctx.removed_hashes)
    return b"".join((
        _HEADER.pack(VERSION, len(order), len(removed)),
        _le(relevances),
        _le(array("I", order)),
        _le(tokens),
        bytes.fromhex("".join([hashes[p] for p in order])),
        bytes.fromhex("".join(removed)),
    ))


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
