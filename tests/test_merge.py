"""Tests for sync.merge: B's changes since the nearest common ancestor, on top of A."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import atom, delta, molecule, root
from sync.expand import ExpanderFunctor
from sync.merge import MergeOutcome, merge_contexts, merge_delta, merged_into, nearest_common_ancestor
from sync.model import CompressedContext
from sync.store import InMemoryContextStore, SQLiteContextStore

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
POOL = [f"fact {i}" for i in range(6)]


def live(store, cid: str | None) -> dict:
    if cid is None:
        return {}
    return {a.content_hash: a for a in ExpanderFunctor(store).expand(cid).atoms}


def molecules_of(store, cid: str | None) -> list:
    return [] if cid is None else list(ExpanderFunctor(store).expand(cid).molecules)


def chain(store, base: str | None, steps, side: str) -> str | None:
    """Store one context per step on top of `base`; the tip."""
    for adds, removes, mol in steps:
        atoms = [atom(POOL[i], r) for i, r in adds]
        mols = () if mol is None else (molecule(kind=mol),)
        ctx = CompressedContext(base, atoms, mols, {atom(POOL[i]).content_hash for i in removes}, {"side": side})
        store.put(ctx)
        base = ctx.id
    return base


step = st.tuples(
    st.lists(st.tuples(st.integers(0, 5), st.sampled_from([0.2, 0.5, 0.9])), max_size=3),
    st.lists(st.integers(0, 5), max_size=2),
    st.none() | st.integers(0, 2),
)


@PROPERTY
@given(prefix=st.lists(step, max_size=3), ours=st.lists(step, max_size=3), theirs=st.lists(step, max_size=3),
       side_names=st.booleans())
def test_merge_is_ours_with_theirs_changes_since_the_ancestor(prefix, ours, theirs, side_names):
    store = InMemoryContextStore()
    common = chain(store, None, prefix, "common")
    # With the same side names, identical steps make the same contexts: A = B, or one builds on the other.
    a = chain(store, common, ours, "ours" if side_names else "x")
    b = chain(store, common, theirs, "theirs" if side_names else "x")
    assume(a is not None and b is not None)
    result = merge_contexts(store, a, b)
    ancestor = nearest_common_ancestor(store.get_lineage(a), store.get_lineage(b))
    assert result.ancestor == ancestor

    base, a_live, b_live = live(store, ancestor), live(store, a), live(store, b)
    # The rule, said the other way round: an atom only one side touched
    # since the ancestor has that side's value; one both touched, B's.
    expected = dict(a_live)
    for h in base.keys() | a_live.keys() | b_live.keys():
        if b_live.get(h) != base.get(h):  # B added, changed or removed it
            if h in b_live:
                expected[h] = b_live[h]
            else:
                expected.pop(h, None)
    b_new = molecules_of(store, b)[len(molecules_of(store, ancestor)):]
    a_new = molecules_of(store, a)[len(molecules_of(store, ancestor)):]
    expected_molecules = molecules_of(store, a) + [m for m in b_new if m not in a_new]

    if result.outcome is MergeOutcome.MERGED:
        merged = result.context
        assert merged.base_hash == a and merged.delta_size > 0
        # Minimal: nothing A already holds, no removal of what A lacks.
        assert all(a_live.get(x.content_hash) != x for x in merged.delta_atoms)
        assert merged.removed_hashes <= a_live.keys()
        store.put(merged)
    else:
        assert result.context is None
        assert result.outcome is (MergeOutcome.FAST_FORWARD if ancestor == a and a != b else MergeOutcome.UP_TO_DATE)
    assert live(store, result.target) == expected
    assert molecules_of(store, result.target) == expected_molecules
    # Merging again changes nothing.
    assert merge_contexts(store, result.target, b).outcome is MergeOutcome.UP_TO_DATE
    # History records B, except when A held B's changes already (nothing was stored).
    if result.outcome is not MergeOutcome.UP_TO_DATE:
        assert b in merged_into(store, [result.target])


@pytest.fixture
def forked():
    """ROOT {p, q, r}; A adds s and drops q; B adds t, drops r, re-rates p."""
    store = InMemoryContextStore()
    base = root(atom("p", 0.5), atom("q", 0.5), atom("r", 0.5))
    a = delta(base, atom("s", 0.4), removed={atom("q").content_hash}, message="laptop")
    b = delta(base, atom("t", 0.3), atom("p", 0.9), removed={atom("r").content_hash}, message="desktop")
    store.put_many([base, a, b])
    return store, base, a, b


def contents(store, cid) -> dict[str, float]:
    return {x.content: x.relevance_score for x in live(store, cid).values()}


def test_diverged_lines_merge_into_a_new_context_on_ours(forked):
    store, base, a, b = forked
    result = merge_contexts(store, a.id, b.id, message="reunite")
    assert result.outcome is MergeOutcome.MERGED and result.ancestor == base.id
    merged = result.context
    assert merged.base_hash == a.id
    assert merged.compression_metadata == {
        "message": "reunite", "merge": {"ours": a.id, "theirs": b.id, "ancestor": base.id}}
    assert [x.content for x in merged.delta_atoms] == ["p", "t"]  # B's expansion order: most relevant first
    assert merged.removed_hashes == {atom("r").content_hash}
    store.put(merged)
    assert contents(store, merged.id) == {"p": 0.9, "s": 0.4, "t": 0.3}
    assert result.target == merged.id


def test_the_default_message_names_both_sides(forked):
    store, _, a, b = forked
    merged = merge_contexts(store, a.id, b.id).context
    assert merged.compression_metadata["message"] == f"merge {b.id[:12]} into {a.id[:12]}"


def test_the_same_merge_has_the_same_id_everywhere(forked, tmp_path):
    store, base, a, b = forked
    other = SQLiteContextStore(tmp_path / "store.db")
    try:
        other.put_many([base, b, a])
        assert merge_contexts(other, a.id, b.id).context.id == merge_contexts(store, a.id, b.id).context.id
    finally:
        other.close()


def test_no_common_ancestor_merges_against_the_empty_context():
    store = InMemoryContextStore()
    a, b = root(atom("x", 0.5), atom("y", 0.5)), root(atom("y", 0.5), atom("z", 0.7))
    store.put_many([a, b])
    result = merge_contexts(store, a.id, b.id)
    assert result.outcome is MergeOutcome.MERGED and result.ancestor is None
    assert [x.content for x in result.context.delta_atoms] == ["z"]  # y is already in A, as it is
    assert result.context.removed_hashes == frozenset()
    assert result.context.compression_metadata["merge"]["ancestor"] is None


def test_same_context_and_ancestor_of_ours_are_up_to_date(forked):
    store, base, a, _ = forked
    for theirs in (a.id, base.id):
        result = merge_contexts(store, a.id, theirs)
        assert result.outcome is MergeOutcome.UP_TO_DATE and result.context is None and result.target == a.id


def test_ours_an_ancestor_of_theirs_is_a_fast_forward(forked):
    store, base, _, b = forked
    result = merge_contexts(store, base.id, b.id)
    assert result.outcome is MergeOutcome.FAST_FORWARD and result.context is None and result.target == b.id


def test_the_same_change_on_both_sides_is_up_to_date():
    store = InMemoryContextStore()
    base = root(atom("p", 0.5))
    a = delta(base, atom("q", 0.5), side="a")
    b = delta(base, atom("q", 0.5), side="b")  # another id, the same change
    store.put_many([base, a, b])
    result = merge_contexts(store, a.id, b.id)
    assert result.outcome is MergeOutcome.UP_TO_DATE and result.target == a.id
    # Still computable, and empty but for its metadata.
    assert merge_delta(store, a.id, b.id, base.id).delta_size == 0


def test_a_relevance_change_on_both_sides_takes_theirs():
    store = InMemoryContextStore()
    base = root(atom("p", 0.5))
    a, b = delta(base, atom("p", 0.2)), delta(base, atom("p", 0.8))
    store.put_many([base, a, b])
    merged = merge_contexts(store, a.id, b.id).context
    assert [(x.content, x.relevance_score) for x in merged.delta_atoms] == [("p", 0.8)]
    # A change on our side alone stays.
    c = delta(base, atom("q", 0.1))
    store.put(c)
    merged = merge_contexts(store, a.id, c.id).context
    store.put(merged)
    assert contents(store, merged.id) == {"p": 0.2, "q": 0.1}


def test_removals_of_atoms_ours_lacks_are_left_out():
    store = InMemoryContextStore()
    base = root(atom("p", 0.5), atom("q", 0.5))
    a = delta(base, removed={atom("p").content_hash})
    b = delta(base, atom("z", 0.5), removed={atom("p").content_hash, atom("never held").content_hash})
    store.put_many([base, a, b])
    merged = merge_contexts(store, a.id, b.id).context
    assert merged.removed_hashes == frozenset()
    assert [x.content for x in merged.delta_atoms] == ["z"]


def test_theirs_removal_beats_our_relevance_change():
    store = InMemoryContextStore()
    base = root(atom("p", 0.5), atom("q", 0.5))
    a = delta(base, atom("p", 0.9))
    b = delta(base, removed={atom("p").content_hash})
    store.put_many([base, a, b])
    merged = merge_contexts(store, a.id, b.id).context
    assert merged.removed_hashes == {atom("p").content_hash} and merged.delta_atoms == ()


def test_molecules_added_on_theirs_side_come_once():
    store = InMemoryContextStore()
    base = root(atom("p"), molecules=(molecule(kind="old"),))
    shared, theirs_only = molecule(kind="shared"), molecule(kind="theirs")
    a = delta(base, atom("a"), molecules=(shared,))
    b1 = delta(base, molecules=(theirs_only,))
    b2 = delta(b1, atom("b"), molecules=(shared,))
    store.put_many([base, a, b1, b2])
    merged = merge_contexts(store, a.id, b2.id).context
    assert merged.delta_molecules == (theirs_only,)


def test_merged_into_follows_recorded_merges(forked):
    store, base, a, b = forked
    c = delta(base, atom("c", 0.1))
    store.put(c)
    merged = merge_contexts(store, a.id, b.id).context
    store.put(merged)
    covered = merged_into(store, [merged.id])
    assert {base.id, a.id, b.id, merged.id} <= covered and c.id not in covered


def test_nearest_common_ancestor_of_lineages():
    assert nearest_common_ancestor(["r", "a", "b"], ["r", "a", "c", "d"]) == "a"
    assert nearest_common_ancestor(["r", "a"], ["r", "a", "c"]) == "a"
    assert nearest_common_ancestor(["r"], ["s"]) is None
