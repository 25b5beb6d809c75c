"""A set of 32-byte ids with an incrementally maintained root hash (sans-IO).

The set is a prefix trie over the ids' hex digits (fanout 16). Its shape is a
function of the set alone, never of insertion order: the ids under a prefix
form a *leaf* (their sorted concatenation) when there are at most `LEAF_MAX`
of them, otherwise an *inner node* with one child per next hex digit. Every
node hashes with SHA-256 under its own domain tag::

    leaf(ids)                 = H(LEAF_TAG  || u64(len(ids)) || id_0 || ... || id_k)
    inner(count, c_0...c_15)  = H(INNER_TAG || u64(count)    || hash(c_0) || ... || hash(c_15))

with an empty child hashing as ``leaf([])``. Two different sets with equal
hashes would give a SHA-256 collision at the first node where their inputs
differ (the encoding is injective: fixed-length ids and hashes, a count,
distinct tags), so the root commits to the exact set. Since ids are SHA-256
outputs the trie is balanced (about log16(n / 16) levels) unless someone
grinds ids to share a long prefix; every k shared bits costs about 2**(k/2)
hashes and buys one extra level per 4 bits, never more than 64 levels.

The hash of *any* prefix (the "fingerprint" that reconciliation compares) is
the hash of the canonical subtree of the ids under it, so two nodes whose ids
under a prefix agree compute the same value without agreeing on anything else.

`LEAF_MAX` and the tags are part of the wire protocol: change them and roots
stop matching across versions.

Costs: `add` and `discard` touch one root-to-leaf path (O(log n) plus a leaf
of at most LEAF_MAX ids); hashes are recomputed lazily on `root()`, only along
dirty paths. `add_many` sorts its batch and merges it in one pass, so a
million ids load in a few seconds. Leaves store ids as one bytes object, so a
million ids take about 41 MiB.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Iterable, Iterator

__all__ = ["EMPTY_HASH", "ID_SIZE", "LEAF_MAX", "MAX_DEPTH", "IdSet", "check_prefix", "leaf_hash"]

ID_SIZE = 32
# Hex digits in an id: the deepest prefix there is.
MAX_DEPTH = 2 * ID_SIZE
# Largest leaf. Protocol constant (it fixes the hash of every set). 32 keeps a
# leaf rewrite to about 1 KB, puts the leaves of a uniform 1M-id set at depth 4
# (about 15 ids each) and lets reconciliation find one missing id in a leaf by
# trial removal for at most 33 hashes.
LEAF_MAX = 32

_LEAF_TAG = b"ctxfs/idset/leaf/v1\x00"
_INNER_TAG = b"ctxfs/idset/inner/v1\x00"
_HEX = frozenset("0123456789abcdef")


def leaf_hash(blob: bytes) -> bytes:
    """Hash of the leaf holding `blob`: sorted ids, concatenated."""
    return hashlib.sha256(_LEAF_TAG + (len(blob) // ID_SIZE).to_bytes(8, "big") + blob).digest()


def _inner_hash(count: int, child_hashes: Iterable[bytes]) -> bytes:
    return hashlib.sha256(_INNER_TAG + count.to_bytes(8, "big") + b"".join(child_hashes)).digest()


EMPTY_HASH = leaf_hash(b"")


def check_prefix(prefix: object) -> str:
    """Return `prefix` if it is a lowercase hex string of at most 64 digits."""
    if type(prefix) is not str or len(prefix) > MAX_DEPTH or not _HEX.issuperset(prefix):
        raise ValueError(f"a prefix is at most {MAX_DEPTH} lowercase hex digits, got {prefix!r}")
    return prefix


def _check_id(x: object) -> None:
    if type(x) is not bytes or len(x) != ID_SIZE:
        raise ValueError(f"an id is {ID_SIZE} bytes, got {x!r:.80}")


def _digit_key(depth: int):
    """Key giving an id's hex digit at `depth` (ids in a subtree are sorted by it)."""
    i = depth >> 1
    if depth & 1:
        return lambda x: x[i] & 15
    return lambda x: x[i] >> 4


def _digit(x: bytes, depth: int) -> int:
    b = x[depth >> 1]
    return b & 15 if depth & 1 else b >> 4


def _split(blob: bytes) -> list[bytes]:
    return [blob[i : i + ID_SIZE] for i in range(0, len(blob), ID_SIZE)]


class _Leaf:
    __slots__ = ("blob", "hash")

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.hash: bytes | None = None

    @property
    def count(self) -> int:
        return len(self.blob) // ID_SIZE


class _Inner:
    __slots__ = ("children", "count", "hash")

    def __init__(self, children: list, count: int) -> None:
        self.children = children  # 16 entries, None for an empty child
        self.count = count
        self.hash: bytes | None = None


def _hash(node: _Leaf | _Inner | None) -> bytes:
    if node is None:
        return EMPTY_HASH
    if node.hash is None:
        if type(node) is _Leaf:
            node.hash = leaf_hash(node.blob)
        else:
            node.hash = _inner_hash(node.count, [_hash(c) for c in node.children])
    return node.hash


def _build(ids: list[bytes], lo: int, hi: int, depth: int) -> _Leaf | _Inner:
    """The canonical subtree of sorted, distinct ids[lo:hi], which share `depth` digits."""
    if hi - lo <= LEAF_MAX:
        return _Leaf(b"".join(ids[lo:hi]))
    children: list = [None] * 16
    key = _digit_key(depth)
    start = lo
    while start < hi:
        v = key(ids[start])
        end = bisect_right(ids, v, start, hi, key=key)
        children[v] = _build(ids, start, end, depth + 1)
        start = end
    return _Inner(children, hi - lo)


def _leaf_blobs(node: _Leaf | _Inner | None) -> Iterator[bytes]:
    if node is None:
        return
    if type(node) is _Leaf:
        yield node.blob
    else:
        for child in node.children:
            yield from _leaf_blobs(child)


def _merge(node, depth: int, batch: list[bytes], lo: int, hi: int):
    """Merge sorted distinct batch[lo:hi] into `node`; return (node, how many were new)."""
    if node is None:
        return _build(batch, lo, hi, depth), hi - lo
    if type(node) is _Leaf:
        old = _split(node.blob)
        merged = sorted(set(old).union(batch[lo:hi]))
        if len(merged) == len(old):
            return node, 0
        return _build(merged, 0, len(merged), depth), len(merged) - len(old)
    key = _digit_key(depth)
    added = 0
    while lo < hi:
        v = key(batch[lo])
        end = bisect_right(batch, v, lo, hi, key=key)
        node.children[v], n = _merge(node.children[v], depth + 1, batch, lo, end)
        added += n
        lo = end
    if added:
        node.count += added
        node.hash = None
    return node, added


def _hash_with(node, depth: int, add: list[bytes], remove: list[bytes]) -> bytes:
    """Hash `node` would have after adding `add` (absent) and removing `remove` (present)."""
    if not add and not remove:
        return _hash(node)
    count = (node.count if node is not None else 0) + len(add) - len(remove)
    if type(node) is not _Inner or count <= LEAF_MAX:
        ids = {x for blob in _leaf_blobs(node) for x in _split(blob)}
        ids.difference_update(remove)
        ids.update(add)
        merged = sorted(ids)
        return _hash(_build(merged, 0, len(merged), depth) if merged else None)
    key = _digit_key(depth)
    parts: list[tuple[list, list]] = [([], []) for _ in range(16)]
    for x in add:
        parts[key(x)][0].append(x)
    for x in remove:
        parts[key(x)][1].append(x)
    return _inner_hash(count, [_hash_with(c, depth + 1, a, r) for c, (a, r) in zip(node.children, parts)])


def _leaf_find(blob: bytes, x: bytes) -> tuple[int, bool]:
    """Byte offset where `x` is or would go in a sorted leaf, and whether it is there."""
    lo, hi = 0, len(blob) // ID_SIZE
    while lo < hi:
        mid = (lo + hi) // 2
        if blob[mid * ID_SIZE : (mid + 1) * ID_SIZE] < x:
            lo = mid + 1
        else:
            hi = mid
    at = lo * ID_SIZE
    return at, blob[at : at + ID_SIZE] == x


class IdSet:
    """A set of 32-byte ids with a root hash and prefix queries (see module docs).

    Prefixes are lowercase hex strings: ``"a3"`` names the ids whose hex form
    starts with ``a3``; ``""`` names them all. Not thread-safe.
    """

    def __init__(self, ids: Iterable[bytes] = ()) -> None:
        self._root: _Leaf | _Inner = _Leaf(b"")
        # Bumped on every change, so a reconciliation can tell it was pulled
        # out from under it.
        self.version = 0
        self.add_many(ids)

    def __len__(self) -> int:
        return self._root.count

    def __contains__(self, x: object) -> bool:
        # On every id a node receives or is offered: the descent inlined and
        # the leaf searched in C (an id is there if found on a boundary).
        if type(x) is not bytes or len(x) != ID_SIZE:
            return False
        node, depth = self._root, 0
        while type(node) is _Inner:
            b = x[depth >> 1]
            node = node.children[b & 15 if depth & 1 else b >> 4]
            depth += 1
        if node is None:
            return False
        blob = node.blob
        at = blob.find(x)
        while at > 0 and at % ID_SIZE:
            at = blob.find(x, at + 1)
        return at >= 0

    def __iter__(self) -> Iterator[bytes]:
        return self.ids()

    def root(self) -> bytes:
        """The 32-byte hash committing to exactly this set."""
        return _hash(self._root)

    def add(self, x: bytes) -> bool:
        """Add one id; return whether it was new. O(log n)."""
        _check_id(x)
        path: list[_Inner] = []
        node, depth = self._root, 0
        while type(node) is _Inner:
            path.append(node)
            child = node.children[_digit(x, depth)]
            if child is None:
                node.children[_digit(x, depth)] = _Leaf(x)
                self._bump(path, 1)
                return True
            node, depth = child, depth + 1
        at, found = _leaf_find(node.blob, x)
        if found:
            return False
        blob = node.blob[:at] + x + node.blob[at:]
        if len(blob) // ID_SIZE <= LEAF_MAX:
            node.blob, node.hash = blob, None
        else:
            ids = _split(blob)
            self._replace(path, x, depth, _build(ids, 0, len(ids), depth))
        self._bump(path, 1)
        return True

    def add_many(self, ids: Iterable[bytes]) -> int:
        """Add ids in one sorted merge; return how many were new."""
        batch = sorted(set(ids))
        for x in batch:
            _check_id(x)
        if not batch:
            return 0
        self._root, added = _merge(self._root, 0, batch, 0, len(batch))
        if added:
            self.version += 1
        return added

    def discard(self, x: bytes) -> bool:
        """Remove an id if present; return whether it was. O(log n)."""
        _check_id(x)
        path: list[_Inner] = []
        node, depth = self._root, 0
        while type(node) is _Inner:
            path.append(node)
            node = node.children[_digit(x, depth)]
            if node is None:
                return False
            depth += 1
        at, found = _leaf_find(node.blob, x)
        if not found:
            return False
        node.blob, node.hash = node.blob[:at] + node.blob[at + ID_SIZE :], None
        if not node.blob and path:
            self._replace(path, x, depth, None)
        self._bump(path, -1)
        # Keep the shape canonical: the topmost inner node that fell to
        # LEAF_MAX ids becomes a leaf again.
        for i, inner in enumerate(path):
            if inner.count <= LEAF_MAX:
                self._replace(path[:i], x, i, _Leaf(b"".join(_leaf_blobs(inner))))
                break
        return True

    def _replace(self, path: list[_Inner], x: bytes, depth: int, node) -> None:
        if path:
            path[-1].children[_digit(x, depth - 1)] = node
        else:
            self._root = node if node is not None else _Leaf(b"")

    def _bump(self, path: list[_Inner], delta: int) -> None:
        for inner in path:
            inner.count += delta
            inner.hash = None
        self.version += 1

    # -- prefix queries: what reconciliation compares --------------------------------

    def _view(self, prefix: str) -> _Leaf | _Inner | None:
        """The canonical node of the ids under `prefix` (a detached leaf if inside one)."""
        check_prefix(prefix)
        node, depth = self._root, 0
        while depth < len(prefix) and type(node) is _Inner:
            node = node.children[int(prefix[depth], 16)]
            if node is None:
                return None
            depth += 1
        if depth == len(prefix):
            return node
        blob = b"".join(x for x in _split(node.blob) if x.hex().startswith(prefix))
        return _Leaf(blob) if blob else None

    def count(self, prefix: str = "") -> int:
        node = self._view(prefix)
        return node.count if node is not None else 0

    def prefix_hash(self, prefix: str = "") -> bytes:
        """Hash of the canonical subtree of the ids under `prefix` (`root()` for "")."""
        return _hash(self._view(prefix))

    def summary(self, prefix: str = "") -> tuple[int, bytes]:
        """``(count(prefix), prefix_hash(prefix))`` in one walk."""
        node = self._view(prefix)
        return (node.count, _hash(node)) if node is not None else (0, EMPTY_HASH)

    def children(self, prefix: str = "") -> list[tuple[int, bytes]]:
        """``summary(prefix + d)`` for each hex digit d, in order."""
        if len(prefix) >= MAX_DEPTH:
            raise ValueError("a full id has no children")
        node = self._view(prefix)
        if type(node) is _Inner:
            return [(c.count, _hash(c)) if c is not None else (0, EMPTY_HASH) for c in node.children]
        parts: list[list[bytes]] = [[] for _ in range(16)]
        for x in _split(node.blob) if node is not None else ():
            parts[_digit(x, len(prefix))].append(x)
        return [(len(p), leaf_hash(b"".join(p))) for p in parts]

    def ids(self, prefix: str = "") -> Iterator[bytes]:
        """The ids under `prefix`, in ascending order."""
        for blob in _leaf_blobs(self._view(prefix)):
            yield from _split(blob)

    def root_with(self, *, add: Iterable[bytes] = (), remove: Iterable[bytes] = ()) -> bytes:
        """The root this set would have with `add` added and `remove` removed.

        Touches only the paths that change: O(changes x log n); nothing is mutated.
        """
        if not len(self):  # a newcomer checking what it is about to ask for
            adds, removes = sorted(set(add)), []
        else:
            adds = sorted({x for x in add if x not in self})
            removes = sorted({x for x in remove if x in self})
        return _hash_with(self._root, 0, adds, removes)
