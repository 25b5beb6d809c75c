"""Many small byte strings held as one buffer until they are used (sans-IO).

A receive window full of small contexts is ~100k bytes objects of ~150
bytes each. Held one object each while they wait for the store's commit,
they fill the allocator's small-object arenas alongside what is made
meanwhile and lives on (the id set's leaves, caches), and those pin the
arenas when the transfer is over: a node that had taken 100k contexts kept
~10 MB more than one that held them packed. `PackedBlobs` keeps a message's
objects as one buffer and their end offsets; each comes out as its own
bytes object only when it is read (the store thread, one at a time).
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["PackedBlobs"]


class PackedBlobs(Sequence[bytes]):
    """A sequence of bytes objects stored as one buffer (read-only)."""

    __slots__ = ("_data", "_ends")

    def __init__(self, blobs: Iterable[bytes]) -> None:
        blobs = blobs if isinstance(blobs, (list, tuple)) else list(blobs)
        self._data = b"".join(blobs)
        # 'Q': offsets past 4 GiB cost nothing to allow.
        self._ends = array("Q", itertools.accumulate(map(len, blobs)))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]  # no slices
        if type(index) is not int:
            raise TypeError(f"PackedBlobs indices are ints, not {type(index).__name__}")
        n = len(self._ends)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("PackedBlobs index out of range")
        return self._data[self._ends[index - 1] if index else 0 : self._ends[index]]

    def __iter__(self) -> Iterator[bytes]:
        data, start = self._data, 0
        for end in self._ends:
            yield data[start:end]
            start = end

    @property
    def nbytes(self) -> int:
        """The blobs' total length."""
        return len(self._data)

    def __repr__(self) -> str:
        return f"PackedBlobs({len(self)} blobs, {self.nbytes} bytes)"
