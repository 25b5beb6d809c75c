"""Tests for sync.packed: small byte strings held as one buffer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync.packed import PackedBlobs


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
