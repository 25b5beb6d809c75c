"""Tests for sync.merkle: published RFC 6962 vectors, a recursive reference
written from the RFC text, and the forgeries the seed's tree allowed."""

from __future__ import annotations

import hashlib

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    MerkleTree,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_inclusion,
)

# --- Published vectors -------------------------------------------------------
# From github.com/transparency-dev/merkle (Google's RFC 6962 library, formerly
# part of trillian / certificate-transparency): testonly/constants.go
# (LeafInputs, NodeHashes, RootHashes) and proof/verify_test.go
# (inclusionProofs). Copied as data, not computed here.

CT_LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]

# Root of the tree of the first n CT_LEAVES, for n = 0..8.
CT_ROOTS = [
    bytes.fromhex(h)
    for h in [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
]

# Leaf hashes of CT_LEAVES (NodeHashes level 0).
CT_LEAF_HASHES = [
    bytes.fromhex(h)
    for h in [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ]
]

# (0-based index, tree size, audit path). The source numbers leaves from 1.
CT_INCLUSION_PROOFS = [
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]


# --- Reference implementation, transcribed from RFC 6962 §2.1 ------------------
# Recursive and slicing on purpose: it shares no code or shortcut with the
# level-by-level module, so agreement between them means something.


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(leaves: list[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return _sha256(b"")
    if n == 1:
        return _sha256(b"\x00" + leaves[0])
    k = _split(n)
    return _sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:]))


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return ref_path(m, leaves[:k]) + [ref_mth(leaves[k:])]
    return ref_path(m - k, leaves[k:]) + [ref_mth(leaves[:k])]


def ref_sides(m: int, n: int) -> list[bool]:
    """For each audit-path entry, bottom-up: is the sibling on the left?"""
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return ref_sides(m, k) + [False]
    return ref_sides(m - k, n - k) + [True]


def _data(n: int) -> list[bytes]:
    return [i.to_bytes(4, "big") for i in range(n)]


def _flip_bit(proof: list[bytes], entry: int, bit: int) -> list[bytes]:
    changed = bytearray(proof[entry])
    changed[bit // 8] ^= 1 << (bit % 8)
    return proof[:entry] + [bytes(changed)] + proof[entry + 1 :]


# --- Hashes and roots ----------------------------------------------------------


def test_leaf_and_node_hash_match_published_node_hashes() -> None:
    assert [leaf_hash(d) for d in CT_LEAVES] == CT_LEAF_HASHES
    # NodeHashes level 1, first entry, is the root of the 2-leaf tree.
    assert node_hash(CT_LEAF_HASHES[0], CT_LEAF_HASHES[1]) == CT_ROOTS[2]
    assert node_hash(CT_LEAF_HASHES[1], CT_LEAF_HASHES[0]) != CT_ROOTS[2]


@pytest.mark.parametrize("n", range(len(CT_ROOTS)))
def test_root_matches_published_tree_head(n: int) -> None:
    assert merkle_root(CT_LEAVES[:n]) == CT_ROOTS[n]
    assert MerkleTree.from_leaves(CT_LEAVES[:n]).root == CT_ROOTS[n]
    # The reference must agree too, or the property tests below prove nothing.
    assert ref_mth(CT_LEAVES[:n]) == CT_ROOTS[n]


def test_empty_tree() -> None:
    assert EMPTY_ROOT == hashlib.sha256(b"").digest() == CT_ROOTS[0]
    assert merkle_root([]) == EMPTY_ROOT
    tree = MerkleTree.from_leaves([])
    assert (tree.size, tree.root, tree.levels) == (0, EMPTY_ROOT, ())


def test_single_leaf_root_is_its_leaf_hash_not_the_data_hash() -> None:
    assert merkle_root([b"x"]) == leaf_hash(b"x") != _sha256(b"x")


@given(st.lists(st.binary(max_size=24), max_size=70))
def test_root_equals_recursive_reference(leaves: list[bytes]) -> None:
    assert merkle_root(leaves) == ref_mth(leaves)
    assert len(merkle_root(leaves)) == HASH_SIZE


@given(st.integers(min_value=0, max_value=300))
def test_root_equals_reference_for_every_shape_up_to_300(n: int) -> None:
    assert merkle_root(_data(n)) == ref_mth(_data(n))


def test_root_of_a_large_uneven_tree_equals_reference() -> None:
    # 2**14 + 2**9 + 2**3 + 1: an odd node is carried up at several levels.
    leaves = _data(2**14 + 2**9 + 2**3 + 1)
    assert merkle_root(leaves) == ref_mth(leaves)


def test_tree_levels_halve_and_end_in_the_root() -> None:
    tree = MerkleTree.from_leaves(_data(11))
    assert [len(level) for level in tree.levels] == [11, 6, 3, 2, 1]
    assert tree.levels[0] == tuple(leaf_hash(d) for d in _data(11))
    assert tree.root == ref_mth(_data(11))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        tree.levels = ()  # type: ignore[misc]


# --- What the prefixes and the no-padding rule prevent -------------------------


def _unprefixed_root(hashes: list[bytes]) -> bytes:
    """The seed's mistake in miniature: H(left || right), leaves not marked."""
    while len(hashes) > 1:
        hashes = [_sha256(a + b) for a, b in zip(hashes[0::2], hashes[1::2])]
    return hashes[0]


def test_inner_node_cannot_pose_as_leaf_data() -> None:
    a, b, c, d = b"a", b"b", b"c", b"d"
    left = node_hash(leaf_hash(a), leaf_hash(b))
    right = node_hash(leaf_hash(c), leaf_hash(d))
    root = merkle_root([a, b, c, d])
    # Leaves whose data is the concatenated child hashes, one level up.
    forged = [leaf_hash(a) + leaf_hash(b), leaf_hash(c) + leaf_hash(d)]
    assert merkle_root(forged) != root
    assert merkle_root([left + right]) != root
    assert not verify_inclusion(forged[0], 0, 2, [right], root)
    # Without prefixes the same forgery works, so the assertions above bite.
    hashed = [_sha256(x) for x in (a, b, c, d)]
    fake_leaves = [hashed[0] + hashed[1], hashed[2] + hashed[3]]
    assert _unprefixed_root([_sha256(x) for x in fake_leaves]) == _unprefixed_root(
        hashed
    )


def _duplicating_root(hashes: list[bytes]) -> bytes:
    """Bitcoin's pre-2012 rule: an odd level repeats its last node."""
    while len(hashes) > 1:
        if len(hashes) % 2:
            hashes = hashes + [hashes[-1]]
        hashes = [node_hash(a, b) for a, b in zip(hashes[0::2], hashes[1::2])]
    return hashes[0]


def test_no_padding_collision() -> None:
    a, b, c = b"a", b"b", b"c"
    assert merkle_root([a, b, c]) != merkle_root([a, b, c, c])
    assert merkle_root([a, b, c]) != merkle_root([a, b, c, b"0" * 16])
    assert merkle_root([a, b, c]) != merkle_root([a, b, c, b""])
    # The duplicating rule collides on exactly this input (CVE-2012-2459).
    lh = [leaf_hash(x) for x in (a, b, c, c)]
    assert _duplicating_root(lh[:3]) == _duplicating_root(lh)


# --- Inclusion proofs ----------------------------------------------------------


@pytest.mark.parametrize(("index", "size", "expected"), CT_INCLUSION_PROOFS)
def test_inclusion_proof_matches_published_path(
    index: int, size: int, expected: list[str]
) -> None:
    proof = inclusion_proof(CT_LEAVES[:size], index)
    assert [p.hex() for p in proof] == expected
    assert verify_inclusion(CT_LEAVES[index], index, size, proof, CT_ROOTS[size])


@pytest.mark.parametrize("size", range(1, 9))
def test_every_proof_of_the_ct_trees_verifies_and_equals_the_rfc_path(
    size: int,
) -> None:
    leaves = CT_LEAVES[:size]
    tree = MerkleTree.from_leaves(leaves)
    for index in range(size):
        proof = tree.inclusion_proof(index)
        assert proof == ref_path(index, leaves) == inclusion_proof(leaves, index)
        assert verify_inclusion(leaves[index], index, size, proof, CT_ROOTS[size])


def _assert_only_the_true_claim_verifies(
    leaves: list[bytes], index: int, proof: list[bytes], root: bytes
) -> None:
    size = len(leaves)
    leaf = leaves[index]
    assert verify_inclusion(leaf, index, size, proof, root)
    for entry in range(len(proof)):
        for bit in (0, 3, 255):
            flipped = _flip_bit(proof, entry, bit)
            assert not verify_inclusion(leaf, index, size, flipped, root)
    for bit in (0, 255):
        bad_root = _flip_bit([root], 0, bit)[0]
        assert not verify_inclusion(leaf, index, size, proof, bad_root)
    for other in set(range(-1, size + 2)) - {index}:
        assert not verify_inclusion(leaf, other, size, proof, root), other
    assert not verify_inclusion(leaf + b"\x00", index, size, proof, root)
    assert not verify_inclusion(leaf_hash(leaf), index, size, proof, root)
    if proof:
        assert not verify_inclusion(leaf, index, size, proof[:-1], root)
        assert not verify_inclusion(leaf, index, size, proof[1:], root)
    if len(proof) > 1:
        assert not verify_inclusion(leaf, index, size, proof[::-1], root)
    assert not verify_inclusion(leaf, index, size, proof + [root], root)
    assert not verify_inclusion(leaf, index, size, proof + [EMPTY_ROOT], root)
    assert not verify_inclusion(leaf, index, size, [root] + proof, root)
    # The root alone does not fix the size: a proof also holds for another size
    # exactly when that size gives the leaf the same path shape. The sizes a
    # proof is checked against must therefore come with the root, from the
    # same trusted source.
    for other_size in range(index + 1, 2 * size + 2):
        if other_size != size:
            same_shape = ref_sides(index, other_size) == ref_sides(index, size)
            claim = verify_inclusion(leaf, index, other_size, proof, root)
            assert claim == same_shape, (index, size, other_size)


@pytest.mark.parametrize("size", range(1, 9))
def test_tampered_ct_proofs_fail(size: int) -> None:
    leaves = CT_LEAVES[:size]
    for index in range(size):
        proof = inclusion_proof(leaves, index)
        _assert_only_the_true_claim_verifies(leaves, index, proof, CT_ROOTS[size])


@given(st.data())
def test_random_size_proofs_equal_reference_and_resist_tampering(
    data: st.DataObject,
) -> None:
    size = data.draw(st.integers(min_value=1, max_value=300), label="size")
    index = data.draw(st.integers(min_value=0, max_value=size - 1), label="index")
    leaves = _data(size)
    tree = MerkleTree.from_leaves(leaves)
    proof = tree.inclusion_proof(index)
    assert proof == ref_path(index, leaves)
    _assert_only_the_true_claim_verifies(leaves, index, proof, tree.root)


def test_every_proof_of_every_tree_up_to_64_equals_reference() -> None:
    for size in range(1, 65):
        leaves = _data(size)
        tree = MerkleTree.from_leaves(leaves)
        for index in range(size):
            proof = tree.inclusion_proof(index)
            assert proof == ref_path(index, leaves), (size, index)
            assert verify_inclusion(leaves[index], index, size, proof, tree.root)


def test_size_is_not_committed_by_the_root_alone() -> None:
    # Leaf 0 of the 3-leaf tree has the same path shape in a 4-leaf tree, so
    # the 3-leaf root "proves" a 4-leaf tree. Documented, not a bug: pair
    # every root with its size.
    proof = inclusion_proof(CT_LEAVES[:3], 0)
    assert verify_inclusion(CT_LEAVES[0], 0, 4, proof, CT_ROOTS[3])


@pytest.mark.parametrize(("size", "index"), [(0, 0), (1, 1), (1, -1), (5, 5), (5, 99)])
def test_inclusion_proof_rejects_index_out_of_range(size: int, index: int) -> None:
    with pytest.raises(ValueError, match=f"leaf index {index} is out of range"):
        inclusion_proof(_data(size), index)
    with pytest.raises(ValueError, match=f"tree of {size} leaves"):
        MerkleTree.from_leaves(_data(size)).inclusion_proof(index)


@pytest.mark.parametrize(
    ("leaf", "index", "size", "proof", "root"),
    [
        (b"a", 0, 0, [], EMPTY_ROOT),  # empty tree has no leaves
        (b"a", 1, 1, [], leaf_hash(b"a")),  # index == size
        (b"a", -1, 1, [], leaf_hash(b"a")),
        (b"a", 0, 1, [], leaf_hash(b"a")[:-1]),  # short root
        (b"a", 0, 1, [], leaf_hash(b"a") + b"\x00"),  # long root
        (b"a", 0, 2, [leaf_hash(b"b")[:-1]], merkle_root([b"a", b"b"])),
        (b"a", 0, 2, [leaf_hash(b"b").hex()], merkle_root([b"a", b"b"])),
        (b"a", 0, 2, [None], merkle_root([b"a", b"b"])),
        (b"a", 0, 2, None, merkle_root([b"a", b"b"])),
        (b"a", 0, 2, leaf_hash(b"b"), merkle_root([b"a", b"b"])),  # bytes, not list
        ("a", 0, 1, [], leaf_hash(b"a")),  # str leaf
        (b"a", "0", 1, [], leaf_hash(b"a")),
        (b"a", 0, 1.0, [], leaf_hash(b"a")),
        (b"a", True, 2, [leaf_hash(b"b")], merkle_root([b"b", b"a"])),
        (b"a", 0, 1, [], None),
        (b"a", 0, 2**64, [EMPTY_ROOT] * 10_000, EMPTY_ROOT),  # absurdly long
    ],
)
def test_verify_inclusion_returns_false_on_malformed_input(
    leaf: object, index: object, size: object, proof: object, root: object
) -> None:
    result = verify_inclusion(leaf, index, size, proof, root)  # type: ignore[arg-type]
    assert result is False


def test_malformed_cases_differ_from_a_valid_claim_only_in_the_defect() -> None:
    # Guards the table above: with the defect removed, each shape verifies.
    assert verify_inclusion(b"a", 0, 1, [], leaf_hash(b"a"))
    ab = merkle_root([b"a", b"b"])
    assert verify_inclusion(b"a", 0, 2, [leaf_hash(b"b")], ab)
    assert verify_inclusion(b"a", 1, 2, [leaf_hash(b"b")], merkle_root([b"b", b"a"]))
    assert verify_inclusion(bytearray(b"a"), 0, 2, [leaf_hash(b"b")], ab)
