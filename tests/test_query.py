"""Tests for sync.query.ContextQuery: type filter by unification, relevance,
age against a passed-in `now`, limit, order."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from helpers import T0, ago, atom, contents, root
from sync.expand import ExpanderFunctor
from sync.model import T_ANY, T_DICT, T_INT, T_LIST, T_STRING, ExpandedContext, Kind, TypeSignature
from sync.query import ContextQuery
from sync.store import InMemoryContextStore

NOW = T0


@pytest.fixture
def expanded() -> ExpandedContext:
    r = root(
        atom("s-old", 0.4, T_STRING, timestamp=ago(3600)),
        atom("s-new", 0.9, T_STRING, timestamp=ago(10)),
        atom("i", 0.5, T_INT, timestamp=ago(60)),
        atom("ls", 0.7, T_LIST(T_STRING), timestamp=ago(120)),
        atom("li", 0.5, T_LIST(T_INT), timestamp=ago(30)),
        atom("d", 0.1, T_DICT(T_STRING, T_INT), timestamp=ago(0)),
        atom("future", 0.5, T_STRING, timestamp=NOW + timedelta(hours=1)),
    )
    s = InMemoryContextStore()
    s.put(r)
    return ExpanderFunctor(s).expand(r.id)


def run(expanded, **kw):
    return contents(ContextQuery(**kw).execute(expanded, NOW))


def test_no_filter_returns_everything_by_relevance(expanded):
    assert run(expanded) == ["s-new", "ls", "i", "li", "future", "s-old", "d"]


def test_any_matches_all(expanded):
    assert run(expanded, type_filter=T_ANY) == run(expanded)
    assert len(run(expanded, type_filter=T_ANY)) == 7


def test_concrete_type_filter(expanded):
    assert run(expanded, type_filter=T_STRING) == ["s-new", "future", "s-old"]
    assert run(expanded, type_filter=T_INT) == ["i"]
    assert run(expanded, type_filter=T_LIST(T_STRING)) == ["ls"]
    assert run(expanded, type_filter=TypeSignature("Bool", Kind.STAR)) == []


def test_type_variable_inside_a_constructor(expanded):
    tau = TypeSignature("τ_item", Kind.STAR)
    assert run(expanded, type_filter=T_LIST(tau)) == ["ls", "li"]
    assert run(expanded, type_filter=T_DICT(T_STRING, tau)) == ["d"]
    assert run(expanded, type_filter=T_DICT(T_INT, tau)) == []


def test_min_relevance_is_inclusive(expanded):
    assert run(expanded, min_relevance=0.5) == ["s-new", "ls", "i", "li", "future"]
    assert run(expanded, min_relevance=0.91) == []


def test_max_age_uses_the_given_now(expanded):
    assert run(expanded, max_age_seconds=60) == ["s-new", "i", "li", "future", "d"]
    assert run(expanded, max_age_seconds=0) == ["future", "d"]
    later = NOW + timedelta(seconds=100)
    got = contents(ContextQuery(max_age_seconds=60).execute(expanded, later))
    assert got == ["future"]


def test_naive_now_is_taken_as_utc(expanded):
    naive = NOW.replace(tzinfo=None)
    other_zone = NOW.astimezone(timezone(timedelta(hours=5)))
    for now in (naive, other_zone):
        assert contents(ContextQuery(max_age_seconds=60).execute(expanded, now)) == run(expanded, max_age_seconds=60)


def test_limit(expanded):
    assert run(expanded, limit=2) == ["s-new", "ls"]
    assert run(expanded, limit=0) == []
    assert run(expanded, limit=100) == run(expanded)
    assert run(expanded, type_filter=T_STRING, limit=1) == ["s-new"]


def test_filters_combine(expanded):
    assert run(expanded, type_filter=T_STRING, min_relevance=0.5, max_age_seconds=3600, limit=5) == ["s-new", "future"]


def test_order_is_relevance_then_expansion_order():
    a, b, c = atom("a", 0.5), atom("b", 0.9), atom("c", 0.5)
    e = ExpandedContext((c, a, b), (), (), 0, {})
    assert contents(ContextQuery().execute(e, NOW)) == ["b", "c", "a"]


def test_matches(expanded):
    q = ContextQuery(type_filter=T_INT, min_relevance=0.5)
    assert q.matches(atom("x", 0.5, T_INT), NOW)
    assert not q.matches(atom("x", 0.49, T_INT), NOW)
    assert not q.matches(atom("x", 0.9, T_STRING), NOW)


@pytest.mark.parametrize("kw", [{"max_age_seconds": -1}, {"limit": -1}])
def test_negative_bounds_are_refused(kw):
    with pytest.raises(ValueError):
        ContextQuery(**kw)


def test_keyword_only():
    with pytest.raises(TypeError):
        ContextQuery(T_INT)  # type: ignore[misc]


def test_query_returns_atoms_not_copies(expanded):
    hits = ContextQuery(type_filter=T_LIST(TypeSignature("τ", Kind.STAR))).execute(expanded, datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert all(any(h is a for a in expanded.atoms) for h in hits)
    assert [str(h.type_sig) for h in hits] == ["List[String]", "List[Int]"]
