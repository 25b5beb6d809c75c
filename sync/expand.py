"""Expansion: turning a chain of deltas into the full context an AI reads.

Semantics (the seed's, with its flaws fixed): a root expands to its own
atoms; a delta expands its base, removes `removed_hashes`, then adds
`delta_atoms` (a later atom with the same id replaces the earlier one) and
appends its molecules. Atoms come out most relevant first; ties keep lineage
order (the live version added closer to the root first, then delta order).

Expansion is iterative (no recursion, so a 100,000-deep chain is fine) and
memoised: the expander keeps the state of recent expansions, so expanding a
child of a context it has seen walks back only to that ancestor.

The stream (`stream_expansion`) is lazy: it scans the lineage once in raw
MessagePack form, keeps a heap of live atoms, and builds atom objects only
for the chunk it is about to hand out.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence

import attrs
import msgpack

from sync import codec
from sync.model import CompressedContext, ExpandedContext, MemoryAtom, MemoryMolecule
from sync.store import ContextStore, MissingBase, NotFound, UnheldRemoval

# Expansions kept for memoisation. Each holds one entry per live atom, so
# eight 100k-atom expansions are a few hundred MB at worst; LRU beyond that.
DEFAULT_CACHE_ENTRIES = 8
# Up to this many deltas over a remembered expansion are merged into its
# order one by one; longer runs are applied unordered and sorted once.
INCREMENTAL_ORDER_DELTAS = 4


# A live atom: (-relevance, level, index, atom id, atom). Tuples sort by
# relevance, then lineage order; (level, index) is unique, so comparison
# never reaches the id or the atom.
_Entry = tuple[float, int, int, str, MemoryAtom]


@attrs.define
class _State:
    """A running expansion, kept ordered so a child's result costs ~its delta."""

    atoms: dict[str, _Entry] = attrs.field(factory=dict)
    molecules: list[MemoryMolecule] = attrs.field(factory=list)
    path: list[str] = attrs.field(factory=list)
    tokens: int = 0
    types: Counter = attrs.field(factory=Counter)
    # Entries in output order, or None when not kept up to date (a long run
    # of deltas is applied unordered and sorted once). Never mutated in
    # place, so copies share it.
    ordered: list[_Entry] | None = attrs.field(factory=list)

    def copy(self) -> _State:
        return _State(dict(self.atoms), list(self.molecules), list(self.path), self.tokens, Counter(self.types), self.ordered)

    def _drop(self, entry: _Entry) -> None:
        atom = entry[4]
        self.tokens -= atom.tokens
        self.types[str(atom.type_sig)] -= 1

    def apply(self, context_id: str, ctx: CompressedContext, *, keep_order: bool = True) -> None:
        level = len(self.path)
        dropped = False
        for h in ctx.removed_hashes:
            old = self.atoms.pop(h, None)
            if old is not None:
                self._drop(old)
                dropped = True
        added = []
        for index, atom in enumerate(ctx.delta_atoms):
            h = atom.content_hash
            old = self.atoms.get(h)
            if old is not None:
                self._drop(old)
                dropped = True
            entry = (-atom.relevance_score, level, index, h, atom)
            self.atoms[h] = entry
            added.append(entry)
            self.tokens += atom.tokens
            self.types[str(atom.type_sig)] += 1
        if keep_order and self.ordered is not None:
            live = self.atoms
            kept = [e for e in self.ordered if live.get(e[3]) is e] if dropped else self.ordered
            added = [e for e in added if live[e[3]] is e]
            added.sort()
            # Two sorted runs: timsort merges them in linear time.
            self.ordered = sorted(kept + added) if added else kept
        else:
            self.ordered = None
        self.molecules.extend(ctx.delta_molecules)
        self.path.append(context_id)

    def result(self) -> ExpandedContext:
        if self.ordered is None:
            self.ordered = sorted(self.atoms.values())
        return ExpandedContext(
            atoms=tuple(e[4] for e in self.ordered),
            molecules=tuple(self.molecules),
            expansion_path=tuple(self.path),
            total_tokens_estimate=self.tokens,
            type_summary={t: n for t, n in self.types.items() if n},
        )


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
        pending: list[tuple[str, bytes]] = []
        state = None
        # The store holds no context without its base, so the walk ends at a
        # root or at an ancestor this expander already knows; only the
        # contexts in between are decoded.
        for cid, data in self.store.walk_back_bytes(context_id):
            cached = self._cache.get(cid)
            if cached is not None:
                state = cached.copy()
                break
            pending.append((cid, data))
        if state is None:
            state = _State()
        # Keeping the order up to date costs O(n) per delta; past a few
        # deltas one sort at the end is cheaper.
        keep_order = len(pending) <= INCREMENTAL_ORDER_DELTAS
        for cid, data in reversed(pending):
            state.apply(cid, codec.decode_context(data, verify=False), keep_order=keep_order)
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
        if state is None:
            return None
        if state.ordered is None:
            state.ordered = sorted(state.atoms.values())
        return state.ordered

    def ordered(self, context_id: str) -> list[_Entry]:
        """The ordered live atoms of a stored context, memoised.

        The list is the expander's own, shared by every caller: read it,
        never change it.
        """
        state = self._state_of(context_id)
        if state.ordered is None:
            state.ordered = sorted(state.atoms.values())
        return state.ordered

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
    straight from it; otherwise the lineage is scanned once in raw form and
    atom objects are built only as chunks are handed out.
    """
    _check_chunking(chunk_size, max_tokens_per_chunk)
    remembered = expander.remembered(target) if expander is not None and isinstance(target, str) else None
    if remembered is not None:
        count = bisect.bisect_right(remembered, -relevance_threshold, key=lambda e: e[0])
        atoms = (e[4] for e in itertools.islice(remembered, count))
        yield from _chunked(atoms, count, chunk_size, max_tokens_per_chunk)
        return
    heap = _live_atoms(store, target, relevance_threshold)
    heapq.heapify(heap)
    popped = (codec.atom_from_raw(heapq.heappop(heap)[3]) for _ in range(len(heap)))
    yield from _chunked(popped, len(heap), chunk_size, max_tokens_per_chunk)


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
        total = bisect.bisect_right(ordered, -self.relevance_threshold, key=lambda e: e[0])
        atoms = (e[4] for e in itertools.islice(ordered, self.position, total))
        chunks = _chunked(atoms, total, self.chunk_size, self.max_tokens_per_chunk,
                          chunk_id=self.chunk_id, cumulative=self.cumulative_tokens, emitted=self.position)
        return _take(chunks, max_chunks, max_atoms)

    def _cold_first_chunk(self, store: ContextStore) -> ExpansionChunk:
        entries = _live_atoms(store, self.target, self.relevance_threshold)
        best = heapq.nsmallest(self.chunk_size, entries)  # a chunk never holds more
        atoms = (codec.atom_from_raw(entry[3]) for entry in best)
        chunk = next(_chunked(atoms, len(entries), self.chunk_size, self.max_tokens_per_chunk))
        # _chunked saw only the best few atoms: whether more follow is the count's to say.
        return attrs.evolve(chunk, is_final=len(chunk.atoms) == len(entries))

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


def _live_atoms(store: ContextStore, target: CompressedContext | str, threshold: float) -> list[tuple]:
    """Heap entries (-relevance, -level_from_tip, index, raw_atom) of live atoms.

    Walking from the tip toward the root, an atom is live unless a level
    nearer the tip already re-added it (same content and type: what its id
    hashes) or removed its id; within one delta the last occurrence wins.
    Ids are computed only for atoms below a removal, never for the rest.
    The heap key orders by relevance, then lineage order: an atom added
    closer to the root (farther from the tip) first, then delta order.
    """
    shadowed: set[tuple] = set()
    removed: set[bytes] = set()
    entries: list[tuple] = []
    for level, data in enumerate(_lineage_bytes(store, target)):
        _version, _base, atoms, _molecules, level_removed, _metadata = msgpack.unpackb(data, use_list=False)
        for index in range(len(atoms) - 1, -1, -1):
            raw = atoms[index]
            key = (raw[0], raw[1])
            if key in shadowed:
                continue
            shadowed.add(key)
            if removed and codec.raw_atom_id(raw[0], raw[1]) in removed:
                continue
            if raw[4] >= threshold:
                entries.append((-raw[4], -level, index, raw))
        removed.update(level_removed)
    return entries


def _lineage_bytes(store: ContextStore, target: CompressedContext | str) -> Iterator[bytes]:
    """Canonical bytes of the target and each ancestor, tip first."""
    if isinstance(target, CompressedContext):
        yield codec.encode_context(target)
        if target.base_hash is None:
            return
        if not store.has(target.base_hash):
            raise MissingBase(target.id, target.base_hash)
        target = target.base_hash
    child = None
    try:
        for cid, data in store.walk_back_bytes(target):
            child = cid
            yield data
    except NotFound as exc:
        if child is None:
            raise
        raise MissingBase(child, exc.context_id) from None
