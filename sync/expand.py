"""Expansion: turning a chain of deltas into the full context an AI reads.

Semantics (the seed's, with its flaws fixed): a root expands to its own
atoms; a delta expands its base, removes `removed_hashes`, then adds
`delta_atoms` (a later atom with the same id replaces the earlier one) and
appends its molecules. Atoms come out most relevant first; ties keep lineage
order (the live version added closer to the root first, then delta order).

Expansion is iterative (no recursion, so a 100,000-deep chain is fine) and
memoised: the expander keeps the state of recent expansions, so expanding a
child of a context it has seen walks back only to that ancestor.

It reads the store's atom index of each delta (sync/atomindex.py: the ids,
relevance and tokens of the atoms it adds, most relevant first, and the ids
it removes), so which atoms are live is known without decoding or hashing
an atom, and each delta's atoms arrive already in order: one stable sort by
relevance merges the deltas. Atom objects are built only for live atoms,
from the store's own (verified) bytes, without re-running the model's checks.

The stream (`stream_expansion`) is lazy: without a remembered expansion
it scans the lineage's atom indexes once (sync/livescan.py), merges the
deltas' live atoms lazily, and decodes only the atoms it hands out.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from operator import attrgetter, itemgetter, neg as _negate

import attrs
import msgpack

from sync import atomindex, codec, livescan
from sync.atomindex import AtomIndex
from sync.gcpause import collector_paused
from sync.model import CompressedContext, ExpandedContext, MemoryAtom, MemoryMolecule
from sync.store import ContextStore, MissingBase, UnheldRemoval

# Expansions kept for memoisation. Each holds one entry per live atom, so
# eight 100k-atom expansions are a few hundred MB at worst; LRU beyond that.
DEFAULT_CACHE_ENTRIES = 8
# A delta over a remembered expansion that adds or kills up to this many
# atoms is merged into its order one atom at a time (a binary search and a
# memmove each); beyond that, the order is rebuilt with one linear merge.
INCREMENTAL_ORDER_ATOMS = 64


# A live atom: (-relevance, place, atom), place = level << 32 | position in
# its delta. Tuples sort by relevance, then lineage order; (-relevance,
# place) is unique, so comparison never reaches the atom.
_Entry = tuple[float, int, MemoryAtom]
_LEVEL_SHIFT = 32
_relevance_key = itemgetter(0)
_entry_atom = itemgetter(2)
_printed_type = attrgetter("type_sig.printed")


def _place(level: int, position: int) -> int:
    return level << _LEVEL_SHIFT | position


@attrs.define
class _Level:
    """One delta to apply: its id, atom index, atoms and molecules.

    `atoms` holds MemoryAtom objects (a context object) or the raw decoded
    atoms of stored bytes (`built` False), from which only live atoms are
    ever made into objects.
    """

    context_id: str
    index: AtomIndex
    atoms: Sequence
    molecules: Sequence[MemoryMolecule]
    built: bool

    @classmethod
    def of_context(cls, ctx: CompressedContext) -> _Level:
        return cls(ctx.id, atomindex.parse(atomindex.build(ctx)), ctx.delta_atoms, ctx.delta_molecules, True)

    @classmethod
    def of_stored(cls, context_id: str, data: bytes, index: bytes) -> _Level:
        # Our own bytes, checked when they were put; fsck re-verifies them.
        _version, _base, atoms, molecules, _removed, _metadata = codec.unpack_bounded(data, codec.MAX_CONTEXT_BYTES)
        return cls(
            context_id,
            livescan.parsed_index(data, index),
            atoms,
            [codec.molecule_from_raw(m, f"delta_molecules[{i}]") for i, m in enumerate(molecules)],
            False,
        )

    def atom(self, j: int, atom_id: bytes) -> MemoryAtom:
        """The j-th effective add (index order) as an object."""
        return self.atoms_of([j], [atom_id])[0]

    def atoms_of(self, keep: Sequence[int], ids: Sequence[bytes]) -> list[MemoryAtom]:
        """The effective adds `keep` (index order; `ids` are theirs) as objects."""
        positions = self.index.positions
        if isinstance(keep, range) and len(keep) == len(positions):
            picked = positions
        else:
            picked = [positions[j] for j in keep]
        if self.built:
            return [self.atoms[p] for p in picked]
        tokens = self.index.tokens
        return codec.stored_atoms(self.atoms, picked, ids, tokens if picked is positions else [tokens[j] for j in keep])


# A child's live map shares its parent's; past this many layers it is
# flattened into one dict (one copy per so many generations).
_MAX_LIVE_LAYERS = 8


class _LiveIds:
    """Atom id -> entry of an expansion's live atoms.

    A child expansion shares its parent's map (a remembered expansion is
    never changed again) and keeps its own changes on top, so deriving a
    child costs its delta, not a copy of every entry; past a few layers it
    flattens into one dict.
    """

    __slots__ = ("_own", "_under", "_layers", "_size")

    def __init__(self, own: dict[bytes, _Entry | None] | None = None, under: _LiveIds | None = None) -> None:
        self._own = {} if own is None else own  # None: removed in this layer
        self._under = under
        self._layers = 0 if under is None else under._layers + 1
        self._size = len(self._own) if under is None else len(under)

    def __len__(self) -> int:
        return self._size

    def child(self) -> _LiveIds:
        if self._layers + 1 >= _MAX_LIVE_LAYERS:
            return _LiveIds(self.flat_copy())
        return _LiveIds(under=self)

    def get(self, atom_id: bytes) -> _Entry | None:
        layer: _LiveIds | None = self
        while layer is not None:
            own = layer._own
            if atom_id in own:
                return own[atom_id]
            layer = layer._under
        return None

    def pop(self, atom_id: bytes) -> _Entry | None:
        entry = self.get(atom_id)
        if entry is not None:
            if self._under is None:
                del self._own[atom_id]
            else:
                self._own[atom_id] = None
            self._size -= 1
        return entry

    def set(self, atom_id: bytes, entry: _Entry) -> None:
        if self.get(atom_id) is None:
            self._size += 1
        self._own[atom_id] = entry

    def flat_copy(self) -> dict[bytes, _Entry]:
        """Every live id and its entry, in a dict of the caller's own."""
        layers = []
        layer: _LiveIds | None = self
        while layer is not None:
            layers.append(layer._own)
            layer = layer._under
        flat = dict(layers.pop())
        for own in reversed(layers):
            for atom_id, entry in own.items():
                if entry is None:
                    flat.pop(atom_id, None)
                else:
                    flat[atom_id] = entry
        return flat


@attrs.define
class _State:
    """A running expansion, kept ordered so a child's result costs ~its delta."""

    live: _LiveIds = attrs.field(factory=_LiveIds)  # atom id -> its entry
    # Entries in output order, and their atoms (what a result is made of).
    # Never mutated in place, so copies share them.
    entries: list[_Entry] = attrs.field(factory=list)
    atoms: list[MemoryAtom] = attrs.field(factory=list)
    molecules: list[MemoryMolecule] = attrs.field(factory=list)
    path: list[str] = attrs.field(factory=list)
    tokens: int = 0
    types: Counter = attrs.field(factory=Counter)
    _result: ExpandedContext | None = None

    def copy(self) -> _State:
        return _State(self.live.child(), self.entries, self.atoms, list(self.molecules), list(self.path),
                      self.tokens, Counter(self.types), self._result)

    def _drop(self, entry: _Entry) -> None:
        atom = entry[2]
        self.tokens -= atom.tokens
        self.types[atom.type_sig.printed] -= 1

    def apply(self, context_id: str, ctx: CompressedContext) -> None:
        self.apply_levels([_Level.of_context(ctx)])

    def apply_levels(self, levels: list[_Level]) -> None:
        """Apply deltas, root first: one at a time into the order if small,
        else all at once with one merge."""
        self._result = None
        work = sum(len(level.index) + len(level.index.removed) // atomindex.ID_BYTES for level in levels)
        if work <= INCREMENTAL_ORDER_ATOMS:
            for level in levels:
                self._apply_in_order(level)
        else:
            self._apply_merged(levels)

    def _apply_in_order(self, level: _Level) -> None:
        live = self.live
        entries = list(self.entries)
        atoms = list(self.atoms)
        number = len(self.path)
        index = level.index
        ids = index.id_list()
        for atom_id in itertools.chain(index.removed_list(), ids):
            old = live.pop(atom_id)
            if old is not None:
                self._drop(old)
                at = bisect.bisect_left(entries, old[:2])
                del entries[at], atoms[at]
        for j, atom_id in enumerate(ids):
            atom = level.atom(j, atom_id)
            entry = (-index.relevances[j], _place(number, index.positions[j]), atom)
            live.set(atom_id, entry)
            at = bisect.bisect_right(entries, entry)
            entries.insert(at, entry)
            atoms.insert(at, atom)
            self.tokens += index.tokens[j]
            self.types[atom.type_sig.printed] += 1
        self.entries = entries
        self.atoms = atoms
        self.molecules.extend(level.molecules)
        self.path.append(level.context_id)

    def _apply_merged(self, levels: list[_Level]) -> None:
        # Which added atoms survive: walking from the tip, an atom is live
        # unless a later delta re-adds or removes its id. Dead ones are few
        # as a rule: found by set intersection, not by a loop over atoms.
        seen: set[bytes] = set()
        surviving: list[tuple[list[bytes], set[int]]] = []
        for level in reversed(levels):
            ids = level.index.id_list()
            # Ids are unique within a delta's index: index() finds the one.
            dead = set() if seen.isdisjoint(ids) else set(map(ids.index, seen.intersection(ids)))
            seen.update(ids)
            seen.update(level.index.removed_list())
            surviving.append((ids, dead))
        surviving.reverse()
        live = self.live.flat_copy()  # this path is linear in the live atoms anyway
        entries = self.entries
        if live and seen:
            smaller, larger = (seen, live) if len(seen) < len(live) else (list(live), seen)
            killed = [live.pop(h) for h in [h for h in smaller if h in larger]]
            if killed:
                for entry in killed:
                    self._drop(entry)
                gone = {entry[1] for entry in killed}
                entries = [e for e in entries if e[1] not in gone]
        added: list[_Entry] = []
        printed: list[str] = []
        number = len(self.path)
        for level, (ids, dead) in zip(levels, surviving):
            index = level.index
            tokens = index.tokens
            if len(dead) * 4 > len(ids):  # mostly dead: build the live ones only
                keep = [j for j in range(len(ids)) if j not in dead]
                ids = [ids[j] for j in keep]
                atoms = level.atoms_of(keep, ids)
                relevances: Sequence[float] = [index.relevances[j] for j in keep]
                positions: Sequence[int] = [index.positions[j] for j in keep]
                self.tokens += sum(tokens[j] for j in keep)
                dead = set()
            else:  # build all, then drop the few dead (C-level list work)
                atoms = level.atoms_of(range(len(ids)), ids)
                relevances, positions = index.relevances, index.positions
                self.tokens += sum(tokens) - sum(tokens[j] for j in dead)
            new = list(zip(map(_negate, relevances), map(_place(number, 0).__or__, positions), atoms))
            if dead:
                ids = list(ids)
                for j in sorted(dead, reverse=True):
                    del new[j], ids[j], atoms[j]
            live.update(zip(ids, new))
            added += new
            printed += map(_printed_type, atoms)
            self.molecules.extend(level.molecules)
            self.path.append(level.context_id)
            number += 1
        self.types.update(printed)
        self.live = _LiveIds(live)
        # The kept entries are in order and each delta's in relevance order,
        # concatenated in lineage order: a stable sort on relevance alone
        # gives (relevance, lineage order), merging the runs.
        merged = entries + added
        merged.sort(key=_relevance_key)
        self.entries = merged
        self.atoms = list(map(_entry_atom, merged))

    def result(self) -> ExpandedContext:
        if self._result is None:
            self._result = ExpandedContext(
                atoms=tuple(self.atoms),
                molecules=tuple(self.molecules),
                expansion_path=tuple(self.path),
                total_tokens_estimate=self.tokens,
                type_summary={t: n for t, n in self.types.items() if n},
            )
        return self._result


class ExpanderFunctor:
    """Expands contexts from a store, memoising recent expansions."""

    def __init__(self, store: ContextStore, cache_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        self.store = store
        self._cache: OrderedDict[str, _State] = OrderedDict()
        self._cache_entries = cache_entries

    def _state_of(self, context_id: str) -> _State:
        cached = self._cache.get(context_id)
        if cached is not None:
            self._cache.move_to_end(context_id)
            return cached
        pending: list[tuple[str, bytes, bytes]] = []
        state = None
        # The store holds no context without its base, so the walk ends at a
        # root or at an ancestor this expander already knows; only the
        # contexts in between are read.
        for cid, data, index in self.store.walk_back_indexed(context_id):
            cached = self._cache.get(cid)
            if cached is not None:
                state = cached.copy()
                break
            pending.append((cid, data, index))
        if state is None:
            state = _State()
        with collector_paused():  # many new objects, no cycles (sync/gcpause.py)
            state.apply_levels([_Level.of_stored(cid, data, index) for cid, data, index in reversed(pending)])
        self._remember(context_id, state)
        return state

    def _remember(self, context_id: str, state: _State) -> None:
        self._cache[context_id] = state
        self._cache.move_to_end(context_id)
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)

    def remembered(self, context_id: str) -> list[_Entry] | None:
        """The ordered live atoms of an expansion this expander holds, else None."""
        state = self._cache.get(context_id)
        return None if state is None else state.entries

    def ordered(self, context_id: str) -> list[_Entry]:
        """The ordered live atoms of a stored context, memoised.

        The list is the expander's own, shared by every caller: read it,
        never change it.
        """
        return self._state_of(context_id).entries

    def ordered_atoms(self, context_id: str) -> list[MemoryAtom]:
        """The live atoms of a stored context in output order (the
        expander's own list, as `ordered`: read it, never change it)."""
        return self._state_of(context_id).atoms

    def expand(self, target: CompressedContext | str) -> ExpandedContext:
        """Expand a stored context by id, or a context object over a stored base."""
        if isinstance(target, str):
            return self._state_of(target).result()
        if target.base_hash is None:
            state = _State()
        else:
            if not self.store.has(target.base_hash):
                raise MissingBase(target.id, target.base_hash)
            state = self._state_of(target.base_hash).copy()
        state.apply(target.id, target)
        return state.result()


class IncrementalExpander:
    """A running expansion that new deltas are applied to, one at a time."""

    def __init__(self, store: ContextStore, start: str | None = None) -> None:
        self.head = start
        self._state = ExpanderFunctor(store, cache_entries=1)._state_of(start).copy() if start else _State()

    def apply(self, ctx: CompressedContext) -> ExpandedContext:
        if ctx.base_hash != self.head:
            raise ValueError(f"delta is based on {ctx.base_hash}, but this expansion is at {self.head}")
        self._state.apply(ctx.id, ctx)
        self.head = ctx.id
        return self.current

    @property
    def current(self) -> ExpandedContext:
        return self._state.result()


def check_removals(store: ContextStore, contexts: Sequence[CompressedContext]) -> None:
    """Refuse contexts about to be written whose removals remove nothing.

    Raises UnheldRemoval for a context that removes an atom its base's
    expansion does not hold (a wrong hash, or the wrong base: never a
    change anyone meant), and MissingBase for one whose base is neither
    stored nor earlier in `contexts`. Bases may be earlier in `contexts`.

    A rule for writing, like `model.check_new_context`, but it needs the
    base, so it runs on the write path (`ctxfs push`) rather than on every
    object: stored and synced contexts are not judged by it.

    Each removed id is decided walking back from the base: the nearest
    context that adds it (held) or removes it (gone) decides, and the walk
    stops once every id is decided, so the cost is the distance to the
    atoms removed, not the size of the expansion.
    """
    batch: dict[str, CompressedContext] = {}
    for ctx in contexts:
        base = ctx.base_hash
        if base is not None and base not in batch and not store.has(base):
            raise MissingBase(ctx.id, base)
        if ctx.removed_hashes:
            unheld = _not_held(store, batch, base, ctx.removed_hashes)
            if unheld:
                raise UnheldRemoval(ctx.id, base, sorted(unheld))
        batch[ctx.id] = ctx


def _not_held(store: ContextStore, batch: dict[str, CompressedContext], base: str | None,
              atom_ids: Iterable[str]) -> set[str]:
    """Which of `atom_ids` the expansion of `base` does not hold."""
    pending = set(atom_ids)
    gone: set[str] = set()

    def decide(added: set[str], removed: Iterable[str]) -> None:
        # Within one context removals come first, then additions.
        removed = set(removed)
        for h in list(pending):
            if h in added:
                pending.discard(h)
            elif h in removed:
                pending.discard(h)
                gone.add(h)

    current = base
    while current is not None and pending and current in batch:
        ctx = batch[current]
        decide({a.content_hash for a in ctx.delta_atoms}, ctx.removed_hashes)
        current = ctx.base_hash
    if current is not None and pending:
        for _cid, data in store.walk_back_bytes(current):
            _version, _base, atoms, _molecules, removed, _metadata = msgpack.unpackb(data, use_list=False)
            decide({codec.raw_atom_id(raw[0], raw[1]).hex() for raw in atoms}, (h.hex() for h in removed))
            if not pending:
                break
    return gone | pending


def compose(parent: CompressedContext, child: CompressedContext) -> CompressedContext:
    """Squash `child` into its `parent`: one delta over the parent's base.

    Expanding the result gives the same atoms and molecules as expanding the
    chain parent -> child (the composition law).
    """
    if child.base_hash != parent.id:
        raise ValueError(f"cannot compose: child is based on {child.base_hash}, not on {parent.id}")
    kept = tuple(a for a in parent.delta_atoms if a.content_hash not in child.removed_hashes)
    return CompressedContext(
        parent.base_hash,
        kept + child.delta_atoms,
        parent.delta_molecules + child.delta_molecules,
        parent.removed_hashes | child.removed_hashes,
        {**parent.compression_metadata, **child.compression_metadata},
    )


# --------------------------------------------------------------------------
# Lazy, relevance-ordered streaming
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ExpansionChunk:
    """One chunk of a streaming expansion (the seed's ExpansionChunk)."""

    chunk_id: int
    atoms: tuple[MemoryAtom, ...]
    is_final: bool
    cumulative_tokens: int
    expansion_progress: float

    def to_dict(self) -> dict:
        """The seed's shape, with atoms as every command prints them
        (`codec.atom_to_json` with their hash: the model's field names)."""
        return {
            "chunk_id": self.chunk_id,
            "atoms": [codec.atom_to_json(a, with_hash=True) for a in self.atoms],
            "is_final": self.is_final,
            "cumulative_tokens": self.cumulative_tokens,
            "progress": self.expansion_progress,
        }


def stream_expansion(
    store: ContextStore,
    target: CompressedContext | str,
    *,
    relevance_threshold: float = 0.0,
    chunk_size: int = 10,
    max_tokens_per_chunk: int = 500,
    expander: ExpanderFunctor | None = None,
) -> Iterator[ExpansionChunk]:
    """Chunks of the expansion, most relevant atoms first, built lazily.

    A chunk holds at most `chunk_size` atoms and at most
    `max_tokens_per_chunk` tokens, except that an atom larger than the token
    budget travels alone rather than being dropped. Exactly one chunk (the
    last) has `is_final`; an empty expansion yields one empty final chunk.

    With an `expander` that remembers the target's expansion, chunks come
    straight from it; otherwise the lineage's atom indexes are scanned once
    and atom objects are built only as chunks are handed out.
    """
    _check_chunking(chunk_size, max_tokens_per_chunk)
    remembered = expander.remembered(target) if expander is not None and isinstance(target, str) else None
    if remembered is not None:
        count = _count_ordered(remembered, relevance_threshold)
        atoms = map(_entry_atom, itertools.islice(remembered, count))
        yield from _chunked(atoms, count, chunk_size, max_tokens_per_chunk)
        return
    scan = livescan.LiveScan(store, target, relevance_threshold)
    # One more than a chunk: _chunked looks one atom ahead to know if more follow.
    yield from _chunked(scan.atoms(first=chunk_size + 1), scan.total, chunk_size, max_tokens_per_chunk)


@attrs.define
class StreamCursor:
    """Where one streaming expansion stands: all a stream keeps between batches.

    A server streaming to a reader that has stopped holds this (a few
    numbers), never the expansion: each batch takes its atoms from the
    expander's memoised expansion, which every stream of that context
    shares and whose size the expander's cache bounds. Only the first
    chunk of a context the expander does not hold comes from one lazy
    pass over the lineage (as `stream_expansion` does), so a first chunk
    does not wait for the whole expansion.
    """

    target: str
    relevance_threshold: float = 0.0
    chunk_size: int = 10
    max_tokens_per_chunk: int = 500
    position: int = 0  # atoms handed out so far
    chunk_id: int = 0  # of the next chunk
    cumulative_tokens: int = 0
    done: bool = False

    def __attrs_post_init__(self) -> None:
        _check_chunking(self.chunk_size, self.max_tokens_per_chunk)

    def next_chunks(self, store: ContextStore, expander: ExpanderFunctor, *, max_chunks: int,
                    max_atoms: int) -> list[ExpansionChunk]:
        """Up to `max_chunks` chunks (and about `max_atoms` atoms) from here on.

        Does not move the cursor: `advance` past each chunk actually sent.
        """
        if self.done:
            return []
        if self.position == 0 and expander.remembered(self.target) is None:
            return [self._cold_first_chunk(store)]
        ordered = expander.ordered(self.target)
        total = _count_ordered(ordered, self.relevance_threshold)
        atoms = map(_entry_atom, itertools.islice(ordered, self.position, total))
        chunks = _chunked(atoms, total, self.chunk_size, self.max_tokens_per_chunk,
                          chunk_id=self.chunk_id, cumulative=self.cumulative_tokens, emitted=self.position)
        return _take(chunks, max_chunks, max_atoms)

    def _cold_first_chunk(self, store: ContextStore) -> ExpansionChunk:
        scan = livescan.LiveScan(store, self.target, self.relevance_threshold)
        best = itertools.islice(scan.atoms(first=self.chunk_size), self.chunk_size)  # a chunk never holds more
        chunk = next(_chunked(best, scan.total, self.chunk_size, self.max_tokens_per_chunk))
        # _chunked saw only the best few atoms: whether more follow is the count's to say.
        return attrs.evolve(chunk, is_final=len(chunk.atoms) == scan.total)

    def advance(self, chunk: ExpansionChunk) -> None:
        """The chunk went out: the next one follows it."""
        self.position += len(chunk.atoms)
        self.chunk_id = chunk.chunk_id + 1
        self.cumulative_tokens = chunk.cumulative_tokens
        self.done = chunk.is_final


def _take(chunks: Iterator[ExpansionChunk], max_chunks: int, max_atoms: int) -> list[ExpansionChunk]:
    taken: list[ExpansionChunk] = []
    atoms = 0
    for chunk in chunks:
        taken.append(chunk)
        atoms += len(chunk.atoms)
        if chunk.is_final or len(taken) >= max_chunks or atoms >= max_atoms:
            break
    return taken


def _check_chunking(chunk_size: int, max_tokens_per_chunk: int) -> None:
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    if max_tokens_per_chunk < 1:
        raise ValueError("max_tokens_per_chunk must be at least 1")


def _chunked(atoms: Iterator[MemoryAtom], total: int, chunk_size: int, max_tokens: int, *,
             chunk_id: int = 0, cumulative: int = 0, emitted: int = 0) -> Iterator[ExpansionChunk]:
    """Chunks of `atoms` (the `total - emitted` not yet handed out), numbered from `chunk_id`."""
    held = next(atoms, None)
    while True:
        chunk: list[MemoryAtom] = []
        tokens = 0
        while held is not None and len(chunk) < chunk_size:
            if chunk and tokens + held.tokens > max_tokens:
                break
            chunk.append(held)
            tokens += held.tokens
            held = next(atoms, None)
        emitted += len(chunk)
        cumulative += tokens
        yield ExpansionChunk(
            chunk_id=chunk_id,
            atoms=tuple(chunk),
            is_final=held is None,
            cumulative_tokens=cumulative,
            expansion_progress=1.0 if total == 0 else emitted / total,
        )
        if held is None:
            return
        chunk_id += 1


def _count_ordered(entries: list[_Entry], threshold: float) -> int:
    """How many of the ordered entries have relevance >= threshold."""
    return bisect.bisect_right(entries, (-threshold, math.inf))
