"""The node-wide table of who brings which missing object (daemon/fetches.py)."""

from __future__ import annotations

from daemon.fetches import FETCH_STALL_SECONDS, Fetches

IDS = [bytes([i]) * 32 for i in range(6)]


def test_an_object_is_claimed_by_the_first_session_only():
    table = Fetches()
    assert table.claim("a", IDS[:4], now=0.0) == IDS[:4]
    assert table.claim("b", IDS[2:], now=1.0) == IDS[4:]
    assert table.owed("a") == 4 and table.owed("b") == 2 and table.owed() == 6


def test_asking_again_for_what_is_on_its_way_asks_for_nothing():
    table = Fetches()
    table.claim("a", IDS[:2], now=0.0)
    assert table.claim("a", IDS[:2], now=1.0) == []


def test_arrival_ends_the_claim_whoever_brought_it():
    table = Fetches()
    table.claim("a", IDS[:3], now=0.0)
    table.arrived(IDS[:2] + [IDS[5]])  # IDS[5] claimed by nobody: ignored
    assert table.owed("a") == 1 and table.owed() == 1
    table.arrived([IDS[2]])
    assert table.owed() == 0
    # Missing again (it never is, but the table must not remember it).
    assert table.claim("b", IDS[:1], now=1.0) == IDS[:1]


def test_release_frees_the_claims_for_another_session():
    table = Fetches()
    table.claim("a", IDS[:3], now=0.0)
    assert table.release("a") == 3
    assert table.release("a") == 0
    assert table.owed() == 0
    assert table.claim("b", IDS[:3], now=0.5) == IDS[:3]


def test_a_session_that_brings_nothing_loses_its_claims_after_the_stall_bound():
    table = Fetches()
    table.claim("a", IDS[:2], now=0.0)
    assert table.claim("b", IDS[:2], now=FETCH_STALL_SECONDS - 1) == []
    assert table.claim("b", IDS[:2], now=FETCH_STALL_SECONDS + 1) == IDS[:2]
    assert table.owed("a") == 0 and table.owed("b") == 2


def test_a_session_that_delivers_keeps_its_claims():
    table = Fetches()
    table.claim("a", IDS[:3], now=0.0)
    table.arrived(IDS[:1])
    table.progressed("a", now=FETCH_STALL_SECONDS - 1)
    assert table.claim("b", IDS[1:3], now=FETCH_STALL_SECONDS + 1) == []
    # A stalled session may ask its own peer again.
    assert table.claim("a", IDS[1:3], now=3 * FETCH_STALL_SECONDS) == IDS[1:3]


def test_a_new_request_starts_its_stall_clock_afresh():
    table = Fetches()
    table.claim("a", IDS[:1], now=0.0)
    table.arrived(IDS[:1])
    table.claim("a", IDS[1:2], now=10 * FETCH_STALL_SECONDS)
    assert table.claim("b", IDS[1:2], now=10 * FETCH_STALL_SECONDS + 1) == []


def test_owns_says_whose_claim_an_object_is():
    table = Fetches()
    table.claim("a", IDS[:2], now=0.0)
    assert table.owns("a", IDS[0]) and not table.owns("b", IDS[0]) and not table.owns("a", IDS[3])
    table.arrived(IDS[:1])
    assert not table.owns("a", IDS[0])
    table.release("a")
    assert not table.owns("a", IDS[1])
