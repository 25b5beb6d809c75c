"""Handing the C heap's free pages back to the system once writes settle.

glibc's malloc keeps what is freed for reuse, and its heap shrinks only
from the top. After a bulk sync a node held ~16 MB of free heap that it
may never need again: the id tables of the reconciliation and of the
claims (daemon/fetches.py), message buffers, SQLite's scratch space.
`trim()` asks glibc to give back every whole free page (`malloc_trim`);
where there is no such call (musl, macOS) it does nothing. It locks each
malloc arena while it walks it, for milliseconds, so the node calls it
from a worker thread (`Node.release_memory_soon`) after the full-text
catch-up that follows a burst of writes (daemon/indexer.py), and after a
bulk push is ACKed (daemon/transfer.py): once per burst, never on a hot
path.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc, or no dlopen(NULL)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def can_trim() -> bool:
    return _MALLOC_TRIM is not None


def trim() -> bool:
    """Return the heap's free pages to the system; True if any went back."""
    return _MALLOC_TRIM is not None and _MALLOC_TRIM(0) == 1
