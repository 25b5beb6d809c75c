"""RFC 6962 Merkle tree hash and inclusion proofs, sans-IO.

Two nodes compare the roots of what they hold; an inclusion proof shows that
one entry is in a tree of a given size without sending the whole tree.

Why not the seed's tree: it padded every tree to a power of two with
``'0'*16`` leaves, hashed ``left + right`` as hex *text* with no marker telling
a leaf from an inner node, cut each hash to 64 bits, and let the proof carry
its own left/right flags. So a list ending in the padding value has the root
of the list without it, ``[a, b, c]`` and ``[a, b, c, c]``-style duplications
collide (the CVE-2012-2459 class), an inner node can be presented as a leaf (a
second preimage), and 64-bit hashes collide after about 2**32 tries.

Definitions (RFC 6962 §2.1, the same in RFC 9162 §2.1.1), H = SHA-256::

    MTH({})     = H(b"")                          the empty tree
    MTH({d0})   = H(0x00 || d0)                   leaf_hash
    MTH(D[n])   = H(0x01 || MTH(D[0:k]) || MTH(D[k:n]))   node_hash
                  where k is the largest power of two < n (n > 1)

There is no padding: a tree's shape depends only on n. ``PATH(m, D[n])`` is
the audit path of leaf m, listed from the leaf's sibling up to the root's
child. Verification follows RFC 9162 §2.1.3.2, which takes left/right from
(index, size) and never from the proof.

We build the tree level by level: hash pairs left to right and carry an odd
last node up unchanged. This is the RFC tree. At each level below the height
j of k = 2**j, the left part D[0:k] has an even number of nodes, so pairing
never crosses the split and the first j levels build MTH(D[0:k]) on the left
and, by induction on n, MTH(D[k:n]) on the right (which has n - k <= k leaves,
so it is a single node by level j, carried when it is short). Level j then
holds exactly those two nodes. Leaves are hashed once, no slices are copied,
and nothing recurses, so a million leaves cost about two million hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import attrs

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MerkleTree",
    "inclusion_proof",
    "leaf_hash",
    "merkle_root",
    "node_hash",
    "verify_inclusion",
]

# SHA-256 digest length; every node hash, proof element and root is this long.
HASH_SIZE = 32

# Domain-separation prefixes from RFC 6962 §2.1: a leaf hash can never be
# mistaken for an inner-node hash, which is what stops second preimages.
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

# RFC 6962 defines the empty tree's root as the hash of the empty string.
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data): the hash of one leaf's data."""
    return _sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): the hash of an inner node."""
    return _sha256(_NODE_PREFIX + left + right).digest()


def _leaf_level(leaves: Sequence[bytes]) -> list[bytes]:
    return [_sha256(_LEAF_PREFIX + data).digest() for data in leaves]


def _next_level(level: list[bytes]) -> list[bytes]:
    """Hash pairs left to right; an odd last node goes up unchanged."""
    parents = [
        _sha256(_NODE_PREFIX + left + right).digest()
        for left, right in zip(level[0::2], level[1::2])
    ]
    if len(level) % 2:
        parents.append(level[-1])
    return parents


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of the leaf *data* ``leaves``; keeps one level in memory."""
    if not leaves:
        return EMPTY_ROOT
    level = _leaf_level(leaves)
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


@attrs.frozen(kw_only=True)
class MerkleTree:
    """Every level of one tree, so each inclusion proof costs O(log n).

    ``levels[0]`` holds the leaf hashes and ``levels[-1]`` the root alone.
    Build it with :meth:`from_leaves`; the empty tree has no levels.
    """

    levels: tuple[tuple[bytes, ...], ...]

    @classmethod
    def from_leaves(cls, leaves: Sequence[bytes]) -> MerkleTree:
        if not leaves:
            return cls(levels=())
        level = _leaf_level(leaves)
        levels = [tuple(level)]
        while len(level) > 1:
            level = _next_level(level)
            levels.append(tuple(level))
        return cls(levels=tuple(levels))

    @property
    def size(self) -> int:
        return len(self.levels[0]) if self.levels else 0

    @property
    def root(self) -> bytes:
        return self.levels[-1][0] if self.levels else EMPTY_ROOT

    def inclusion_proof(self, index: int) -> list[bytes]:
        """PATH(index, D[size]), bottom-up; ValueError if index is not a leaf."""
        if not 0 <= index < self.size:
            raise ValueError(
                f"leaf index {index} is out of range for a tree of "
                f"{self.size} leaves (valid: 0 to {self.size - 1})"
            )
        proof = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            # No sibling means this node is the carried odd one: the RFC tree
            # has no inner node here, so the path gets no entry either.
            if sibling < len(level):
                proof.append(level[sibling])
            index >>= 1
        return proof


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """RFC 6962 PATH(index, D[n]) for leaf data ``leaves``, bottom-up order.

    Building the tree costs O(n); for many proofs of one tree build a
    :class:`MerkleTree` once instead.
    """
    return MerkleTree.from_leaves(leaves).inclusion_proof(index)


def _is_hash(value: object) -> bool:
    return isinstance(value, (bytes, bytearray)) and len(value) == HASH_SIZE


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: list[bytes], root: bytes
) -> bool:
    """True only if leaf *data* ``leaf`` is leaf ``index`` of the tree of
    ``size`` leaves whose root is ``root``, per RFC 9162 §2.1.3.2.

    Anything malformed (types, hash lengths, index not below size, a proof
    too short or too long) is False: the inputs come from peers, and a
    verifier that raises on bad input invites callers to treat "raised" as
    something other than "not proven".
    """
    if not isinstance(leaf, (bytes, bytearray)) or not _is_hash(root):
        return False
    if type(index) is not int or type(size) is not int:
        return False
    if not 0 <= index < size or not isinstance(proof, (list, tuple)):
        return False
    fn, sn = index, size - 1
    r = leaf_hash(bytes(leaf))
    for p in proof:
        if sn == 0 or not _is_hash(p):
            return False  # Proof longer than the path, or not a hash.
        if fn & 1 or fn == sn:
            r = node_hash(bytes(p), r)
            # fn == sn on an even fn: the right-edge node was carried up with
            # no sibling; skip the levels where it had nothing beside it.
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, bytes(p))
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == bytes(root)
