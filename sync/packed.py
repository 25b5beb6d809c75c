"""Many small byte strings held as one buffer until they are used (sans-IO).

A receive window full of small contexts is ~100k bytes objects of ~150
bytes each. Held one object each while they wait for the store's commit,
they fill the allocator's small-object arenas alongside what is made
meanwhile and lives on (the id set's leaves, caches), and those pin the
arenas when the transfer is over: a node that had taken 100k contexts kept
~10 MB more than one that held them packed. `PackedBlobs` keeps a message's
objects as one buffer and their end offsets; each comes out as its own
bytes object only when it is read (the store thread, one at a time).

`SendOrder` is the same idea on the sending side: the plan of a push (the
ids a peer asked for, parents first, and their sizes) as one buffer of
32-byte ids and an array of sizes, ~36 bytes an object where rows of
(hex id, size) held ~190, for as long as the push takes.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["PackedBlobs", "SendOrder"]

ID_BYTES = 32


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

    def parts(self) -> tuple[bytes, array]:
        """The buffer and the end offsets: what crosses to another process."""
        return self._data, self._ends

    @classmethod
    def from_parts(cls, data: bytes, ends: array) -> PackedBlobs:
        """The blobs whose `parts()` these are (checked to fit the buffer)."""
        if type(data) is not bytes or type(ends) is not array or ends.typecode != "Q":
            raise TypeError("PackedBlobs parts are bytes and an array('Q')")
        if any(a > b for a, b in itertools.pairwise(itertools.chain((0,), ends))) or (ends[-1] if ends else 0) != len(data):
            raise ValueError("PackedBlobs end offsets must ascend to the buffer's length")
        blobs = cls(())
        blobs._data, blobs._ends = data, ends
        return blobs

    def __repr__(self) -> str:
        return f"PackedBlobs({len(self)} blobs, {self.nbytes} bytes)"


class SendOrder:
    """The objects of a push in the order they go out, with their encoded
    sizes: 32-byte ids end to end and an array of sizes (read-only)."""

    __slots__ = ("_ids", "sizes")

    def __init__(self, rows: Iterable[tuple[bytes, int]]) -> None:
        ids = bytearray()
        self.sizes = array("I")  # a context's size is far below 4 GiB (codec.MAX_CONTEXT_BYTES)
        for object_id, size in rows:
            if len(object_id) != ID_BYTES:
                raise ValueError(f"an object id is {ID_BYTES} bytes, not {len(object_id)}")
            ids += object_id
            self.sizes.append(size)
        self._ids = bytes(ids)

    def __len__(self) -> int:
        return len(self.sizes)

    def id_at(self, index: int) -> bytes:
        return self._ids[index * ID_BYTES : (index + 1) * ID_BYTES]

    def ids(self, start: int = 0, stop: int | None = None) -> list[bytes]:
        """The ids from `start` up to `stop` (the end)."""
        stop = len(self) if stop is None else stop
        return [self.id_at(i) for i in range(start, stop)]

    def hex_ids(self, start: int = 0, stop: int | None = None) -> list[str]:
        return [i.hex() for i in self.ids(start, stop)]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        """(hex id, size) rows, as the store's API names objects."""
        for i, size in enumerate(self.sizes):
            yield self.id_at(i).hex(), size

    def without(self, positions: Iterable[int]) -> SendOrder:
        """The same order less the objects at `positions`."""
        left_out = set(positions)
        return SendOrder((self.id_at(i), size) for i, size in enumerate(self.sizes) if i not in left_out)

    def batches(self, limit: int, max_count: int, overhead: int) -> list[range]:
        """Positions cut into consecutive messages: each at most `max_count`
        objects and, beyond its first object, at most `limit` bytes counting
        `overhead` more for each object."""
        cuts = [0]
        size = count = 0
        for i, length in enumerate(self.sizes):
            if count and (size + length > limit or count >= max_count):
                cuts.append(i)
                size = count = 0
            size += length + overhead
            count += 1
        cuts.append(len(self))
        return [range(a, b) for a, b in itertools.pairwise(cuts) if b > a]

    def __repr__(self) -> str:
        return f"SendOrder({len(self)} objects, {sum(self.sizes)} bytes)"
