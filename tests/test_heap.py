"""Tests for daemon.heap: free heap pages go back to the system."""

from __future__ import annotations

import os
import platform

import pytest

from daemon import heap


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_gives_back_free_pages_that_free_alone_keeps():
    assert heap.can_trim()
    # 60 MB of 3 KB buffers: malloc's heap, not mmap (the threshold is 128 KiB).
    buffers = [bytearray(3000) for _ in range(20_000)]
    del buffers[:-1]  # the last one stays, above them: free() cannot shrink the heap
    before = _rss_bytes()
    assert heap.trim()
    assert before - _rss_bytes() > 30_000_000


def test_trim_is_a_no_op_where_there_is_no_malloc_trim(monkeypatch):
    monkeypatch.setattr(heap, "_MALLOC_TRIM", None)
    assert not heap.can_trim() and heap.trim() is False
