"""Pausing Python's cyclic garbage collector while a large result is built.

A cold expansion of 100k atoms allocates some 200k container objects that
all stay alive (atoms, their order entries, the id map). CPython's cyclic
collector counts them as they are made and, as the survivors grow, runs
full collections that walk every tracked object in the process, the
half-built result and anything else alive (the expansions an expander
remembers): three of them, ~40 % of a cold 100k-atom expansion here.
None can free anything: the new objects form no cycles, and reference
counting frees them as usual. Pausing the collector for the build leaves
one collection, later, over the finished result.

The pause is process-wide, nestable and thread-safe: the collector runs
again when the last pause ends, unless it was off before the first began.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
