"""The live atoms of a lineage from its atom indexes alone: the cold stream.

A stream of a context no expander remembers must hand out its most
relevant atoms before the whole expansion exists. This scan reads each
delta's atom index (sync/atomindex.py), tip first, to learn which atoms
are live and how many reach the threshold, without decoding or hashing
an atom; then it merges the deltas' heads (each delta's atoms are in
relevance order already) and decodes only the atoms it hands out.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterator, Sequence
from operator import neg
from typing import Any

from sync import atomindex, codec
from sync.atomindex import AtomIndex
from sync.gcpause import collector_paused
from sync.model import CompressedContext, MemoryAtom
from sync.store import ContextStore, MissingBase, NotFound


def parsed_index(data: bytes | None, blob: bytes | None, store: ContextStore | None = None,
                  context_id: str = "") -> AtomIndex:
    """A stored atom index, or one made from the bytes if the row has none
    that parses (written by something else; fsck names it, --repair fixes it)."""
    if blob is not None:
        try:
            return atomindex.parse(blob)
        except atomindex.AtomIndexError:
            pass
    if data is None:
        assert store is not None
        data = store.get_bytes(context_id)
    return atomindex.parse(atomindex.build(codec.decode_context(data, verify=False)))


# A cold stream reads the bytes of the deltas its next atoms come from in
# batches of up to this many atoms: one query per batch, not per delta.
_STREAM_READ_BATCH = 1024
# Up to this many atoms of one delta are decoded by themselves (skipping
# the others costs a quarter of decoding them); beyond, the whole delta.
_PARTIAL_DECODE_ATOMS = 8


def _count_at_least(relevances: Sequence[float], threshold: float) -> int:
    """How many of the relevances (descending) are >= threshold."""
    return bisect.bisect_right(relevances, -threshold, key=neg)


class LiveScan:
    """The live atoms of a lineage at or above a threshold, from its atom
    indexes alone, merged lazily into output order.

    Walking from the tip toward the root, an atom is live unless a delta
    nearer the tip re-adds or removes its id. Each delta's atoms are in
    relevance order already, so `total` needs no atom at all, and atoms
    come from a merge of the deltas' heads: a delta's bytes are read and
    decoded only when one of its atoms is handed out.
    """

    def __init__(self, store: ContextStore, target: CompressedContext | str, threshold: float) -> None:
        self._store = store
        # Per delta, tip first: (id, bytes or None, index, live count at or
        # above the threshold, positions (index order) of dead ones).
        self._levels: list[tuple[str, bytes | None, AtomIndex, int, set[int]]] = []
        self._bytes: dict[int, bytes] = {}  # bytes read so far, by delta (tip first)
        self._full: dict[int, Sequence] = {}  # deltas decoded whole: their raw atoms
        self._some: dict[int, dict[int, Any]] = {}  # deltas decoded in part: position -> raw atom
        self._heads: list[tuple] = []
        self.total = 0
        # Up to one int per live atom and a few objects per delta, none in a
        # cycle: built with the collector paused (sync/gcpause.py).
        with collector_paused():
            self._walk(store, target, threshold)
        heapq.heapify(self._heads)

    def _walk(self, store: ContextStore, target: CompressedContext | str, threshold: float) -> None:
        # Which atoms later deltas shadow, found with the ids' first 8 bytes
        # (ints made in C, a third of the cost of slicing every id) and
        # checked on the full id. The prefixes of every delta above go into
        # one set: a delta whose prefixes all grow it shadows nothing and
        # repeats none, with no look-up of its own. Removals are few and
        # kept whole; the prefixes a delta repeats are matched against them.
        # At the first repeat that is not a removal (a re-add, or two ids
        # sharing 8 bytes), the walk goes on with the full ids of every delta.
        prefixes_above: set[int] = set()
        removals_above: dict[int, bytes] = {}  # prefix -> removed id
        removed_above: list[bytes] = []
        exact: set[bytes] | None = None
        for t, (cid, data, blob) in enumerate(lineage_indexed(store, target, with_bytes=False)):
            index = parsed_index(data, blob, store, cid)
            count = _count_at_least(index.relevances, threshold)
            removed = index.removed_list()
            dead: set[int] | None = None
            if exact is None:
                prefixes = _prefixes(index.ids)
                before = len(prefixes_above)
                prefixes_above.update(prefixes)
                repeats = len(prefixes) - (len(prefixes_above) - before)
                dead = _removed_here(index.ids, prefixes, repeats, removals_above) if repeats else set()
                if dead is None:  # something else repeated: from here on, full ids
                    exact = set(removed_above)
                    for level in self._levels:
                        exact.update(level[2].id_list())
                else:
                    removed_prefixes = _prefixes(index.removed)
                    prefixes_above.update(removed_prefixes)
                    removals_above.update(zip(removed_prefixes, removed))
                    removed_above += removed
            if exact is not None:
                ids = index.id_list()
                # Ids are unique within a delta's index: index() finds the one.
                dead = set(map(ids.index, exact.intersection(ids)))
                exact.update(ids)
                exact.update(removed)
            assert dead is not None
            dead = {j for j in dead if j < count}
            self._levels.append((cid, data, index, count, dead))
            self.total += count - len(dead)
            j = self._next_live(t, 0)
            if j is not None:
                # Ties go in lineage order: farther from the tip first.
                self._heads.append((-index.relevances[j], -t, index.positions[j], t, j))

    def _next_live(self, t: int, j: int) -> int | None:
        _cid, _data, _index, count, dead = self._levels[t]
        while j < count and j in dead:
            j += 1
        return j if j < count else None

    def atoms(self, first: int) -> Iterator[MemoryAtom]:
        """Live atoms in output order; the first `first` picked before any
        delta's bytes are read, then batches twice as large: the deltas a
        batch needs are read in one query."""
        batch = first
        while self._heads:
            picked = self._pick(batch)
            wanted: dict[int, list[int]] = {}
            for t, j in picked:
                wanted.setdefault(t, []).append(self._levels[t][2].positions[j])
            self._read(wanted)
            for t, j in picked:
                index = self._levels[t][2]
                atom_id = index.ids[j * atomindex.ID_BYTES : (j + 1) * atomindex.ID_BYTES]
                raw = self._full.get(t) or self._some[t]
                yield codec.stored_atoms(raw, [index.positions[j]], [atom_id], [index.tokens[j]])[0]
            batch = min(max(batch * 2, 16), _STREAM_READ_BATCH)

    def _pick(self, count: int) -> list[tuple[int, int]]:
        heads = self._heads
        picked = []
        while heads and len(picked) < count:
            _rel, _t, _position, t, j = heads[0]
            index = self._levels[t][2]
            following = self._next_live(t, j + 1)
            if following is not None:
                heapq.heapreplace(heads, (-index.relevances[following], -t, index.positions[following], t, following))
            else:
                heapq.heappop(heads)
            picked.append((t, j))
        return picked

    def _read(self, wanted: dict[int, list[int]]) -> None:
        """Decode the wanted atoms (delta -> positions) not decoded yet: a
        few of a delta by themselves, more by decoding the whole delta."""
        missing = {}
        for t, positions in wanted.items():
            if t not in self._full:
                some = self._some.get(t, {})
                need = [p for p in positions if p not in some]
                if need:
                    missing[t] = need
        unread = [t for t in missing if t not in self._bytes and self._levels[t][1] is None]
        if unread:
            self._bytes.update(zip(unread, self._store.get_many_bytes([self._levels[t][0] for t in unread])))
        for t, need in missing.items():
            data = self._bytes.get(t) or self._levels[t][1]
            # Our own bytes, checked when they were put; fsck re-verifies them.
            some = self._some.setdefault(t, {})
            if len(some) + len(need) > _PARTIAL_DECODE_ATOMS:
                self._full[t] = codec.unpack_bounded(data, codec.MAX_CONTEXT_BYTES)[2]
                del self._some[t]
            else:
                some.update(codec.raw_atoms_at(data, need))


def _prefixes(ids: bytes) -> list[int]:
    """The first 8 bytes of each 32-byte id, as ints."""
    return memoryview(ids).cast("Q")[:: atomindex.ID_BYTES // 8].tolist()


def _removed_here(ids: bytes, prefixes: list[int], repeats: int, removals_above: dict[int, bytes]) -> set[int] | None:
    """Positions of a delta's adds that a delta above removed, given how
    many of its prefixes were in the set already; None if any repeat is
    not a removal (a re-add, two ids sharing a prefix, or a prefix two
    removals share: the full ids decide those)."""
    matches = removals_above.keys() & prefixes
    if len(matches) != repeats:
        return None
    dead = set()
    size = atomindex.ID_BYTES
    for prefix in matches:
        # The removed id itself, searched in C over the delta's ids: at an
        # id boundary, or this delta does not hold it.
        at = ids.find(removals_above[prefix])
        while at > 0 and at % size:
            at = ids.find(removals_above[prefix], at + 1)
        if at < 0:
            return None
        dead.add(at // size)
    return dead


def lineage_indexed(store: ContextStore, target: CompressedContext | str, *,
                     with_bytes: bool = True) -> Iterator[tuple[str, bytes | None, bytes]]:
    """(id, canonical bytes, atom index) of the target and each ancestor, tip
    first; without `with_bytes`, the bytes of stored ones are None."""
    if isinstance(target, CompressedContext):
        yield target.id, codec.encode_context(target), atomindex.build(target)
        if target.base_hash is None:
            return
        if not store.has(target.base_hash):
            raise MissingBase(target.id, target.base_hash)
        target = target.base_hash
    child = None
    try:
        for cid, data, index in store.walk_back_indexed(target, with_bytes=with_bytes):
            child = cid
            yield cid, data, index
    except NotFound as exc:
        if child is None:
            raise
        raise MissingBase(child, exc.context_id) from None
