"""sync.gcpause: the collector is off inside a pause, back on after the
last one ends (whatever thread ends it), left off if it was off; a cold
expansion builds its atoms inside one."""

from __future__ import annotations

import gc
import threading

import pytest

from helpers import atom, delta, root
from sync import codec
from sync.expand import ExpanderFunctor
from sync.gcpause import collector_paused
from sync.store import InMemoryContextStore


@pytest.fixture(autouse=True)
def collector_on():
    gc.enable()
    yield
    gc.enable()


def test_nested_pauses_end_with_the_last():
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_an_exception_ends_the_pause():
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


def test_pauses_overlapping_across_threads():
    entered, release = threading.Barrier(2), threading.Event()
    seen = []

    def pause():
        with collector_paused():
            entered.wait()
            release.wait()
        seen.append(gc.isenabled())

    worker = threading.Thread(target=pause)
    worker.start()
    with collector_paused():
        entered.wait()
        release.set()
        worker.join()
        # The worker's pause ended first: ours still holds.
        assert seen == [False] and not gc.isenabled()
    assert gc.isenabled()


def test_a_cold_expansion_builds_its_atoms_with_the_collector_paused(monkeypatch):
    store = InMemoryContextStore()
    first = root(*(atom(f"fact {i}") for i in range(50)))
    store.put(first)
    tip = store.put(delta(first, atom("one more")))
    states = []
    real = codec.stored_atoms

    def spy(*args):
        states.append(gc.isenabled())
        return real(*args)

    monkeypatch.setattr(codec, "stored_atoms", spy)
    expanded = ExpanderFunctor(store).expand(tip)
    assert len(expanded.atoms) == 51
    assert states and not any(states)
    assert gc.isenabled()


def test_a_cold_stream_scans_its_lineage_with_the_collector_paused(monkeypatch):
    from sync import livescan
    from sync.expand import stream_expansion

    store = InMemoryContextStore()
    first = root(*(atom(f"fact {i}") for i in range(50)))
    store.put(first)
    tip = store.put(delta(first, atom("one more"), removed={atom("fact 3").content_hash}))
    states = []
    real = livescan._prefixes

    def spy(ids):
        states.append(gc.isenabled())
        return real(ids)

    monkeypatch.setattr(livescan, "_prefixes", spy)
    chunk = next(stream_expansion(store, tip, chunk_size=5))
    assert len(chunk.atoms) == 5
    assert states and not any(states)
    assert gc.isenabled()
