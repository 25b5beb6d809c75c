"""Tests for sync.packed: small byte strings held as one buffer."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync.packed import PackedBlobs, SendOrder


@given(st.lists(st.binary(max_size=300), max_size=60))
def test_blobs_come_out_as_they_went_in(blobs):
    packed = PackedBlobs(blobs)
    assert list(packed) == blobs
    assert [packed[k] for k in range(len(blobs))] == blobs
    assert [packed[-k] for k in range(1, len(blobs) + 1)] == blobs[::-1]
    assert len(packed) == len(blobs) and packed.nbytes == sum(map(len, blobs))
    assert all(type(b) is bytes for b in packed)


def test_a_generator_is_taken_whole_and_read_as_often_as_asked():
    packed = PackedBlobs(bytes([k]) * k for k in range(4))
    assert list(packed) == [b"", b"\x01", b"\x02\x02", b"\x03\x03\x03"]
    assert list(packed) == list(packed)  # iterating again gives the same
    assert packed.index(b"\x02\x02") == 2 and b"\x01" in packed


def test_out_of_range_and_non_int_indices_are_refused():
    packed = PackedBlobs([b"a", b"bc"])
    for bad in (2, -3):
        with pytest.raises(IndexError):
            packed[bad]
    with pytest.raises(TypeError):
        packed[0:1]
    with pytest.raises(TypeError):
        packed[True]
    assert len(PackedBlobs([])) == 0 and list(PackedBlobs([])) == []


def _order(*sizes: int) -> SendOrder:
    return SendOrder((bytes([k]) * 32, size) for k, size in enumerate(sizes))


def test_a_send_order_gives_back_its_ids_and_sizes_in_order():
    order = _order(5, 0, 70_000)
    assert len(order) == 3 and list(order.sizes) == [5, 0, 70_000]
    assert order.ids() == [bytes([k]) * 32 for k in range(3)]
    assert order.ids(1, 2) == [b"\x01" * 32] and order.hex_ids(2) == ["02" * 32]
    assert list(order) == [("00" * 32, 5), ("01" * 32, 0), ("02" * 32, 70_000)]
    assert list(order.without([0, 2])) == [("01" * 32, 0)]
    assert not SendOrder([]) and list(SendOrder([])) == [] and SendOrder([]).batches(10, 10, 0) == []
    with pytest.raises(ValueError):
        SendOrder([(b"short", 1)])


@given(st.lists(st.integers(0, 300), max_size=40), st.integers(1, 600), st.integers(1, 5), st.integers(0, 50))
def test_batches_cover_the_order_in_runs_within_both_bounds(sizes, limit, max_count, overhead):
    order = _order(*sizes)
    batches = order.batches(limit, max_count, overhead)
    assert [k for b in batches for k in b] == list(range(len(sizes)))  # every position once, in order
    for b in batches:
        assert 1 <= len(b) <= max_count
        # Past its first object a batch stays within the limit (the last
        # object's overhead aside), and the next object would not have fit.
        assert len(b) == 1 or sum(sizes[k] + overhead for k in b) - overhead <= limit
    for b, after in zip(batches, batches[1:]):
        if len(b) < max_count:
            assert sum(sizes[k] + overhead for k in b) + sizes[after.start] > limit


def test_packed_blobs_cross_as_their_parts_and_refuse_parts_that_do_not_fit():
    packed = PackedBlobs([b"ab", b"", b"cde"])
    again = PackedBlobs.from_parts(*packed.parts())
    assert list(again) == [b"ab", b"", b"cde"] and list(PackedBlobs.from_parts(b"", array("Q"))) == []
    for data, ends in ((b"abcde", array("Q", [2, 1, 5])), (b"abcde", array("Q", [2, 4])), (b"x", array("Q"))):
        with pytest.raises(ValueError):
            PackedBlobs.from_parts(data, ends)
    for data, ends in ((bytearray(b"ab"), array("Q", [2])), (b"ab", array("I", [2])), (b"ab", [2])):
        with pytest.raises(TypeError):
            PackedBlobs.from_parts(data, ends)
