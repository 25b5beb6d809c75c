"""Tests for sync.expand: expansion semantics, memoisation, the incremental
expander, compose, the identity and composition laws, and streaming."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    STORE_KINDS,
    UNIVERSE_IDS,
    atom,
    chains,
    contents,
    delta,
    hashes,
    linear_chain,
    make_store,
    molecule,
    root,
    scores,
)
from sync.expand import ExpanderFunctor, IncrementalExpander, check_removals, compose, stream_expansion
from sync.model import T_INT, T_LIST, T_STRING, CompressedContext, estimate_tokens
from sync.store import InMemoryContextStore, MissingBase, NotFound, UnheldRemoval

UNKNOWN = "cd" * 32

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def expand(store, target):
    return ExpanderFunctor(store).expand(target)


def stored(store, contexts):
    store.put_many(contexts)
    return contexts


# --- basic semantics ----------------------------------------------------------


def test_root_expands_to_its_atoms(store):
    r = root(atom("one", 0.9), atom("two words", 0.5, T_INT), molecules=[molecule(atom("m"))])
    store.put(r)
    e = expand(store, r.id)
    assert contents(e.atoms) == ["one", "two words"]
    assert e.expansion_path == (r.id,)
    assert e.molecules == r.delta_molecules
    assert e.total_tokens_estimate == estimate_tokens("one") + estimate_tokens("two words")
    assert e.type_summary == {"String": 1, "Int": 1}


def test_removal_by_content_hash(store):
    keep, drop = atom("keep"), atom("drop")
    r = root(keep, drop)
    d = delta(r, removed={drop.content_hash})
    stored(store, [r, d])
    e = expand(store, d.id)
    assert hashes(e.atoms) == {keep.content_hash}
    assert e.type_summary == {"String": 1}
    # removing an id nobody holds is harmless
    d2 = delta(d, removed={atom("never added").content_hash})
    store.put(d2)
    assert hashes(expand(store, d2.id).atoms) == {keep.content_hash}


def test_removal_is_by_content_and_type_only(store):
    r = root(atom("x", 0.9, timestamp=atom("x").timestamp.replace(year=2001), source="elsewhere"))
    d = delta(r, removed={atom("x", 0.1).content_hash})
    stored(store, [r, d])
    assert expand(store, d.id).atoms == ()


def test_replacement_keeps_one_atom_with_the_newer_version(store):
    old = atom("fact", 0.2)
    new = atom("fact", 0.9, source="newer")
    assert old.content_hash == new.content_hash
    r = root(old, atom("other", 0.5))
    d = delta(r, new)
    stored(store, [r, d])
    e = expand(store, d.id)
    facts = [a for a in e.atoms if a.content == "fact"]
    assert facts == [new]
    assert len(e.atoms) == 2
    assert e.type_summary == {"String": 2}


def test_same_content_other_type_is_another_atom(store):
    r = root(atom("7", 0.5, T_STRING))
    d = delta(r, atom("7", 0.5, T_INT))
    stored(store, [r, d])
    e = expand(store, d.id)
    assert [str(a.type_sig) for a in e.atoms] == ["String", "Int"]


def test_duplicate_within_one_delta_last_wins(store):
    r = root(atom("dup", 0.1), atom("other", 0.5), atom("dup", 0.7))
    store.put(r)
    e = expand(store, r.id)
    assert [(a.content, a.relevance_score) for a in e.atoms] == [("dup", 0.7), ("other", 0.5)]


def test_order_by_relevance_then_lineage_order(store):
    r = root(atom("r0", 0.5), atom("r1", 0.9), atom("r2", 0.5))
    d1 = delta(r, atom("d0", 0.5), atom("d1", 1.0))
    # re-adding r0 moves it to d2's place in lineage order
    d2 = delta(d1, atom("d2", 0.5), atom("r0", 0.5))
    stored(store, [r, d1, d2])
    e = expand(store, d2.id)
    assert contents(e.atoms) == ["d1", "r1", "r2", "d0", "d2", "r0"]
    assert [a.relevance_score for a in e.atoms] == sorted((a.relevance_score for a in e.atoms), reverse=True)


def test_type_summary_counts_the_atoms_returned(store):
    # Prefix-sharing atoms are distinct: the seed's 100-char dedupe dropped them.
    prefix = "p" * 100
    r = root(atom(prefix + "1", 0.5), atom(prefix + "2", 0.5), atom("3", 0.5, T_INT), atom("l", 0.5, T_LIST(T_STRING)))
    d = delta(r, atom(prefix + "1", 0.9), removed={atom("3", type_sig=T_INT).content_hash})
    stored(store, [r, d])
    e = expand(store, d.id)
    assert len(e.atoms) == 3
    assert e.type_summary == dict(Counter(str(a.type_sig) for a in e.atoms))
    assert e.type_summary == {"String": 2, "List[String]": 1}
    assert e.total_tokens_estimate == sum(a.tokens for a in e.atoms)


def test_molecules_are_carried_in_lineage_order(store):
    m1, m2, m3 = molecule(atom("m1")), molecule(atom("m2"), kind=2), molecule()
    r = root(atom("x"), molecules=[m1])
    d1 = delta(r, molecules=[m2, m3])
    d2 = delta(d1, removed={atom("x").content_hash})
    stored(store, [r, d1, d2])
    assert expand(store, d2.id).molecules == (m1, m2, m3)


def test_expansion_path_is_root_to_target(store):
    chain = stored(store, linear_chain(5))
    e = expand(store, chain[3].id)
    assert e.expansion_path == tuple(c.id for c in chain[:4])
    assert contents(e.atoms) == ["fact 0", "fact 1", "fact 2", "fact 3"]


def test_expand_an_unstored_context_over_a_stored_base(store):
    chain = stored(store, linear_chain(3))
    loose = delta(chain[-1], atom("loose", 0.9), removed={atom("fact 1", 0.5).content_hash})
    assert not store.has(loose.id)
    e = expand(store, loose)
    assert contents(e.atoms) == ["loose", "fact 0", "fact 2"]
    assert e.expansion_path == tuple(c.id for c in chain) + (loose.id,)
    assert not store.has(loose.id)
    # an unstored root
    r = root(atom("alone"))
    assert contents(expand(store, r).atoms) == ["alone"]
    assert expand(store, r).expansion_path == (r.id,)


def test_missing_base_names_the_base(store):
    loose = delta(UNKNOWN, atom("x"))
    with pytest.raises(MissingBase) as info:
        expand(store, loose)
    assert info.value.base_id == UNKNOWN
    assert UNKNOWN in str(info.value)


def test_unknown_id_raises_not_found(store):
    with pytest.raises(NotFound):
        expand(store, UNKNOWN)


def test_ten_thousand_deep_chain(store):
    chain = stored(store, linear_chain(10_000))
    e = expand(store, chain[-1].id)
    assert len(e.atoms) == 10_000
    assert e.atoms[0].content == "fact 0"
    assert e.atoms[-1].content == "fact 9999"
    assert len(e.expansion_path) == 10_000
    assert e.expansion_path[-1] == chain[-1].id


def test_hundred_thousand_deep_chain_in_memory():
    s = InMemoryContextStore()
    chain = stored(s, linear_chain(100_000))
    e = expand(s, chain[-1].id)
    assert len(e.atoms) == 100_000
    assert e.expansion_path[0] == chain[0].id
    assert e.atoms[-1].content == "fact 99999"
    chunks = list(stream_expansion(s, chain[-1].id, chunk_size=5000, max_tokens_per_chunk=10**9))
    assert sum(len(c.atoms) for c in chunks) == 100_000
    assert chunks[-1].is_final


# --- memoisation --------------------------------------------------------------


def test_memoised_child_expansion_matches_a_fresh_expander(store):
    chain = stored(store, linear_chain(30))
    extra = [
        delta(chain[-1], atom("fact 3", 0.9), removed={atom("fact 7", 0.5).content_hash}),
    ]
    extra.append(delta(extra[0], atom("late"), removed={atom("fact 3").content_hash}))
    stored(store, extra)
    shared = ExpanderFunctor(store)
    # parent first, then a child, a grandchild, a far descendant, an ancestor
    for target in (chain[10], chain[11], chain[13], chain[25], chain[29], extra[0], extra[1], chain[5], chain[11]):
        assert shared.expand(target.id) == ExpanderFunctor(store).expand(target.id)
    loose = delta(extra[1], atom("loose"))
    assert shared.expand(loose) == ExpanderFunctor(store).expand(loose)
    # expanding an unstored context does not disturb the remembered parent
    assert shared.expand(extra[1].id) == ExpanderFunctor(store).expand(extra[1].id)


@pytest.mark.parametrize("kind", STORE_KINDS)
@PROPERTY
@given(chain=chains(min_size=1, max_size=8), order=st.lists(st.integers(0, 7), min_size=1, max_size=8), cache=st.integers(1, 3))
def test_memoised_expansions_match_fresh_ones(tmp_path_factory, kind, chain, order, cache):
    s = make_store(kind, tmp_path_factory.mktemp("s"))
    try:
        s.put_many(chain)
        shared = ExpanderFunctor(s, cache_entries=cache)
        for i in order:
            target = chain[i % len(chain)]
            assert shared.expand(target.id) == ExpanderFunctor(s).expand(target.id)
            loose = delta(target, atom("a", 0.25), removed={atom("b").content_hash})
            assert shared.expand(loose) == ExpanderFunctor(s).expand(loose)
    finally:
        s.close()


# --- incremental expander and compose ---------------------------------------------


def test_incremental_expander_matches_the_functor(store):
    chain = linear_chain(6)
    store.put_many(chain[:2])
    inc = IncrementalExpander(store, chain[1].id)
    assert inc.current == expand(store, chain[1].id)
    for ctx in chain[2:]:
        result = inc.apply(ctx)
        store.put(ctx)
        assert result == expand(store, ctx.id)
        assert inc.head == ctx.id
    swap = delta(chain[-1], atom("fact 0", 1.0), removed={atom("fact 4").content_hash})
    assert inc.apply(swap) == expand(store, swap)


def test_incremental_expander_from_nothing(store):
    inc = IncrementalExpander(store)
    assert inc.current.atoms == ()
    assert inc.head is None
    r = root(atom("x"))
    assert contents(inc.apply(r).atoms) == ["x"]
    assert inc.current.expansion_path == (r.id,)


def test_incremental_expander_refuses_a_delta_with_the_wrong_base(store):
    chain = stored(store, linear_chain(3))
    inc = IncrementalExpander(store, chain[1].id)
    before = inc.current
    with pytest.raises(ValueError):
        inc.apply(delta(chain[0], atom("sibling")))
    with pytest.raises(ValueError):
        inc.apply(root(atom("another root")))
    assert inc.head == chain[1].id
    assert inc.current == before
    assert inc.apply(chain[2]) == expand(store, chain[2].id)


@PROPERTY
@given(chain=chains(min_size=1, max_size=8))
def test_incremental_expander_matches_functor_on_random_chains(chain):
    s = InMemoryContextStore()
    s.put_many(chain)
    inc = IncrementalExpander(s)
    for ctx in chain:
        assert inc.apply(ctx) == expand(s, ctx.id)


def test_compose_refuses_a_non_child():
    chain = linear_chain(3)
    with pytest.raises(ValueError):
        compose(chain[0], chain[2])
    with pytest.raises(ValueError):
        compose(chain[1], chain[0])
    assert compose(chain[0], chain[1]).base_hash is None


def test_compose_squashes_into_one_delta(store):
    r = stored(store, [root(atom("base"), atom("gone"))])[0]
    p = delta(r, atom("p1"), atom("p2"), removed={atom("gone").content_hash}, who="p")
    c = delta(p, atom("c1"), removed={atom("p1").content_hash}, who="c")
    squashed = compose(p, c)
    assert squashed.base_hash == r.id
    assert contents(squashed.delta_atoms) == ["p2", "c1"]
    assert squashed.compression_metadata == {"who": "c"}
    store.put_many([p, c])
    assert scores(expand(store, squashed).atoms) == scores(expand(store, c.id).atoms)


# --- removals that remove nothing ------------------------------------------------


def test_check_removals_takes_removals_of_held_atoms(store):
    a, b, c = atom("a"), atom("b"), atom("c")
    r = root(a, b)
    mid = delta(r, c, removed={b.content_hash})
    back = delta(mid, b)  # b again, after its removal
    stored(store, [r, mid, back])
    check_removals(store, [delta(back, removed={a.content_hash, b.content_hash, c.content_hash})])
    # A base earlier in the same batch, removing what that batch added.
    d = delta(back, atom("d"))
    check_removals(store, [d, delta(d, removed={atom("d").content_hash, a.content_hash})])
    # Removed and re-added by one context: removals come first, so it is held.
    same = delta(r, b, removed={b.content_hash})
    check_removals(store, [same, delta(same, removed={b.content_hash})])


@pytest.mark.parametrize(
    "case",
    ["never-held", "removed-before", "removed-earlier-in-batch", "other-type", "root"],
)
def test_check_removals_refuses_removals_of_atoms_the_base_does_not_hold(store, case):
    a, b = atom("a"), atom("b")
    r = root(a, b)
    gone = delta(r, removed={b.content_hash})
    stored(store, [r, gone])
    batch = {
        "never-held": [delta(r, removed={atom("never").content_hash})],
        "removed-before": [delta(gone, removed={b.content_hash})],
        "removed-earlier-in-batch": [delta(r, removed={a.content_hash}), None],
        "other-type": [delta(r, removed={atom("a", type_sig=T_INT).content_hash})],
        "root": [root(atom("x"), removed={a.content_hash})],
    }[case]
    if batch[-1] is None:
        batch[-1] = delta(batch[0], removed={a.content_hash})
    with pytest.raises(UnheldRemoval) as info:
        check_removals(store, batch)
    assert info.value.context_id == batch[-1].id
    assert len(info.value.atom_ids) == 1
    assert info.value.atom_ids[0] in str(info.value) and batch[-1].id in str(info.value)


def test_check_removals_names_the_first_unheld_id_and_counts_the_rest(store):
    r = stored(store, [root(atom("a"))])[0]
    unheld = sorted(atom(f"never {i}").content_hash for i in range(3))
    with pytest.raises(UnheldRemoval) as info:
        check_removals(store, [delta(r, removed=set(unheld) | {atom("a").content_hash})])
    assert info.value.atom_ids == tuple(unheld)
    assert f"removes atom {unheld[0]} and 2 more, which its base {r.id} does not hold" in str(info.value)


def test_check_removals_refuses_a_missing_base_in_batch_order(store):
    orphan = delta(UNKNOWN, atom("x"))
    with pytest.raises(MissingBase) as info:
        check_removals(store, [orphan, delta(orphan, removed={atom("x").content_hash})])
    assert info.value.context_id == orphan.id and info.value.base_id == UNKNOWN


def test_check_removals_walks_back_only_to_the_atoms_removed(tmp_path):
    # A removal of the tip's own atom reads one row of a 2,000-deep chain.
    store = make_store("sqlite", tmp_path)
    chain = stored(store, linear_chain(2000))
    read = []
    walk = store.walk_back_bytes
    store.walk_back_bytes = lambda cid: (read.append(row[0]) or row for row in walk(cid))
    check_removals(store, [delta(chain[-1], removed={atom("fact 1999", 0.5).content_hash})])
    assert read == [chain[-1].id]
    check_removals(store, [delta(chain[-1], removed={atom("fact 0", 0.5).content_hash})])
    assert len(read) == 1 + 2000
    store.close()


@pytest.mark.parametrize("kind", STORE_KINDS)
@PROPERTY
@given(chain=chains(), removed=st.frozensets(st.sampled_from(UNIVERSE_IDS), min_size=1, max_size=4))
def test_check_removals_agrees_with_the_expansion(tmp_path_factory, kind, chain, removed):
    store = make_store(kind, tmp_path_factory.mktemp("s"))
    try:
        stored(store, chain)
        tip = delta(chain[-1], removed=removed)

        def unheld(ctx: CompressedContext) -> set[str]:
            live = hashes(expand(store, ctx.base_hash).atoms) if ctx.base_hash is not None else set()
            return set(ctx.removed_hashes) - live

        # The tip over the stored chain; then the whole chain as one batch
        # over an empty store, where the first context to remove what its
        # base does not hold is refused.
        batch = chain + [tip]
        first_bad = next((c for c in batch if unheld(c)), None)
        cases = ((store, [tip], tip if unheld(tip) else None), (InMemoryContextStore(), batch, first_bad))
        for where, contexts, bad in cases:
            if bad is None:
                check_removals(where, contexts)
            else:
                with pytest.raises(UnheldRemoval) as info:
                    check_removals(where, contexts)
                assert info.value.context_id == bad.id
                assert set(info.value.atom_ids) == unheld(bad)
    finally:
        store.close()


# --- the two laws -------------------------------------------------------------


@pytest.mark.parametrize("kind", STORE_KINDS)
@PROPERTY
@given(chain=chains(min_size=1, max_size=6))
def test_identity_law(tmp_path_factory, kind, chain):
    s = make_store(kind, tmp_path_factory.mktemp("s"))
    try:
        s.put_many(chain)
        base = chain[-1]
        empty = CompressedContext(base.id, ())
        before, after = expand(s, base.id), expand(s, empty)
        assert hashes(after.atoms) == hashes(before.atoms)
        assert contents(after.atoms) == contents(before.atoms)
        assert after.atoms == before.atoms
        assert after.molecules == before.molecules
        assert after.expansion_path == before.expansion_path + (empty.id,)
        s.put(empty)
        assert expand(s, empty.id).atoms == before.atoms
    finally:
        s.close()


@PROPERTY
@given(chain=chains(min_size=2, max_size=6))
def test_composition_law(chain):
    s = InMemoryContextStore()
    s.put_many(chain)
    p, c = chain[-2], chain[-1]
    squashed = compose(p, c)
    chained = expand(s, c.id)
    composed = expand(s, squashed)
    assert scores(composed.atoms) == scores(chained.atoms)
    assert len(composed.atoms) == len(chained.atoms)
    assert composed.molecules == chained.molecules
    assert composed.type_summary == chained.type_summary
    assert composed.total_tokens_estimate == chained.total_tokens_estimate
    # ties keep lineage order, and squashing keeps that order too
    assert composed.atoms == chained.atoms


@PROPERTY
@given(chain=chains(min_size=2, max_size=6))
def test_composition_law_folds_a_whole_chain(chain):
    s = InMemoryContextStore()
    s.put_many(chain)
    squashed = chain[0]
    for ctx in chain[1:]:
        squashed = compose(squashed, CompressedContext(squashed.id, ctx.delta_atoms, ctx.delta_molecules, ctx.removed_hashes, ctx.compression_metadata))
    assert squashed.is_root
    chained = expand(s, chain[-1].id)
    composed = expand(s, squashed)
    assert scores(composed.atoms) == scores(chained.atoms)
    assert composed.molecules == chained.molecules


# --- streaming ----------------------------------------------------------------


def full_stream(store, target, **kw):
    return list(stream_expansion(store, target, **kw))


def check_chunks(chunks, chunk_size, budget):
    assert chunks, "a stream yields at least one chunk"
    assert [c.chunk_id for c in chunks] == list(range(len(chunks)))
    assert [c.is_final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    running = 0
    progress = 0.0
    for c in chunks:
        assert len(c.atoms) <= chunk_size
        tokens = sum(a.tokens for a in c.atoms)
        if len(c.atoms) > 1:
            assert tokens <= budget
        running += tokens
        assert c.cumulative_tokens == running
        assert progress <= c.expansion_progress <= 1.0
        progress = c.expansion_progress
        if not c.is_final:
            assert c.atoms, "only the final chunk may be empty"
    assert chunks[-1].expansion_progress == 1.0


@pytest.mark.parametrize("kind", STORE_KINDS)
@PROPERTY
@given(
    chain=chains(min_size=1, max_size=6),
    threshold=st.sampled_from([-1.0, 0.0, 0.25, 0.5, 2.0]),
    chunk_size=st.integers(1, 4),
    budget=st.integers(1, 6),
    loose=st.booleans(),
)
def test_stream_equals_the_filtered_expansion(tmp_path_factory, kind, chain, threshold, chunk_size, budget, loose):
    s = make_store(kind, tmp_path_factory.mktemp("s"))
    try:
        if loose:  # the tip is a context object not in the store
            s.put_many(chain[:-1])
            target = chain[-1]
        else:
            s.put_many(chain)
            target = chain[-1].id
        full = expand(s, target)
        want = [a for a in full.atoms if a.relevance_score >= threshold]
        chunks = full_stream(s, target, relevance_threshold=threshold, chunk_size=chunk_size, max_tokens_per_chunk=budget)
        got = [a for c in chunks for a in c.atoms]
        assert got == want
        check_chunks(chunks, chunk_size, budget)
    finally:
        s.close()


@pytest.mark.parametrize("kind", STORE_KINDS)
@PROPERTY
@given(
    chain=chains(min_size=1, max_size=6),
    threshold=st.sampled_from([0.0, 0.25, 0.5, 2.0]),
    chunk_size=st.integers(1, 4),
    budget=st.integers(1, 6),
    warm=st.booleans(),
)
def test_stream_through_an_expander_equals_the_raw_stream(tmp_path_factory, kind, chain, threshold, chunk_size, budget, warm):
    s = make_store(kind, tmp_path_factory.mktemp("s"))
    try:
        s.put_many(chain)
        target = chain[-1].id
        expander = ExpanderFunctor(s)
        if warm:  # the expander remembers the target: chunks come from it
            expander.expand(target)
        kw = dict(relevance_threshold=threshold, chunk_size=chunk_size, max_tokens_per_chunk=budget)
        assert full_stream(s, target, expander=expander, **kw) == full_stream(s, target, **kw)
    finally:
        s.close()


def test_stream_honours_chunk_size(store):
    chain = stored(store, linear_chain(25))
    chunks = full_stream(store, chain[-1].id, chunk_size=10, max_tokens_per_chunk=10**6)
    assert [len(c.atoms) for c in chunks] == [10, 10, 5]
    check_chunks(chunks, 10, 10**6)


def test_stream_honours_the_token_budget_and_big_atoms_travel_alone(store):
    words = lambda n, tag: " ".join([tag] * n)  # noqa: E731
    r = root(
        atom(words(10, "a"), 0.9),  # 13 tokens
        atom(words(10, "b"), 0.8),  # 13
        atom(words(40, "big"), 0.7),  # 52: over the budget of 30
        atom(words(5, "c"), 0.6),  # 6
        atom(words(5, "d"), 0.5),  # 6
        atom("", 0.4),  # 0 tokens
    )
    store.put(r)
    chunks = full_stream(store, r.id, chunk_size=10, max_tokens_per_chunk=30)
    assert [[a.content.split(" ")[0] for a in c.atoms] for c in chunks] == [["a", "b"], ["big"], ["c", "d", ""]]
    assert [c.cumulative_tokens for c in chunks] == [26, 78, 90]
    check_chunks(chunks, 10, 30)


def test_stream_progress_and_cumulative_tokens(store):
    chain = stored(store, linear_chain(7))
    chunks = full_stream(store, chain[-1].id, chunk_size=2, max_tokens_per_chunk=100)
    assert [c.expansion_progress for c in chunks] == [2 / 7, 4 / 7, 6 / 7, 1.0]
    assert [c.cumulative_tokens for c in chunks] == [4, 8, 12, 14]


def test_stream_of_an_empty_expansion_is_one_empty_final_chunk(store):
    r = root()
    d = delta(stored(store, [root(atom("x"))])[0], removed={atom("x").content_hash})
    store.put_many([r, d])
    for target in (r.id, d.id, root(metadata_only=True)):
        chunks = full_stream(store, target)
        assert len(chunks) == 1
        assert chunks[0].atoms == ()
        assert chunks[0].is_final
        assert chunks[0].chunk_id == 0
        assert chunks[0].cumulative_tokens == 0
        assert chunks[0].expansion_progress == 1.0


def test_stream_threshold_filters_everything(store):
    chain = stored(store, linear_chain(3, relevance=0.2))
    chunks = full_stream(store, chain[-1].id, relevance_threshold=0.5)
    assert [(c.atoms, c.is_final) for c in chunks] == [((), True)]


@pytest.mark.parametrize("kw", [{"chunk_size": 0}, {"chunk_size": -1}, {"max_tokens_per_chunk": 0}])
def test_stream_refuses_invalid_limits(store, kw):
    r = root(atom("x"))
    store.put(r)
    with pytest.raises(ValueError):
        full_stream(store, r.id, **kw)


def test_stream_missing_base_and_unknown_id(store):
    with pytest.raises(MissingBase) as info:
        full_stream(store, delta(UNKNOWN, atom("x")))
    assert info.value.base_id == UNKNOWN
    with pytest.raises(NotFound):
        full_stream(store, UNKNOWN)


def test_stream_chunk_to_dict(store):
    r = stored(store, [root(atom("hello world", 0.5, T_INT))])[0]
    (chunk,) = full_stream(store, r.id)
    d = chunk.to_dict()
    hello = atom("hello world", 0.5, T_INT)
    assert d["atoms"] == [{
        "hash": hello.content_hash, "content": "hello world",
        "type_sig": {"name": "Int", "kind": "STAR", "parameters": [], "constraints": []},
        "timestamp": hello.timestamp.isoformat(), "source_hash": hello.source_hash, "relevance_score": 0.5,
    }]
    assert d["is_final"] is True
    assert d["progress"] == 1.0
    assert d["cumulative_tokens"] == 2


# --- the atom-index paths: merged, one at a time, cold stream -----------------------


def naive_expand(lineage):
    """The semantics spelled out (module docstring), for a lineage root first."""
    live = {}
    for level, ctx in enumerate(lineage):
        for h in ctx.removed_hashes:
            live.pop(h, None)
        for i, a in enumerate(ctx.delta_atoms):
            live[a.content_hash] = ((-a.relevance_score, level, i), a)
    atoms = [a for _key, a in sorted(live.values(), key=lambda e: e[0])]
    return atoms, Counter(str(a.type_sig) for a in atoms), sum(a.tokens for a in atoms)


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("one_at_a_time", [0, 10**9])
@PROPERTY
@given(chain=chains(min_size=1, max_size=7), order=st.lists(st.integers(0, 6), min_size=1, max_size=6))
def test_both_ways_of_applying_deltas_match_the_semantics(tmp_path_factory, kind, one_at_a_time, chain, order):
    """INCREMENTAL_ORDER_ATOMS picks between merging deltas into the order one
    atom at a time and one merge of all of them; both must give the result
    the semantics define, cold and memoised."""
    s = make_store(kind, tmp_path_factory.mktemp("s"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sync.expand.INCREMENTAL_ORDER_ATOMS", one_at_a_time)
        try:
            s.put_many(chain)
            shared = ExpanderFunctor(s, cache_entries=2)
            for i in order:
                n = i % len(chain) + 1
                atoms, types, tokens = naive_expand(chain[:n])
                for e in (ExpanderFunctor(s).expand(chain[n - 1].id), shared.expand(chain[n - 1].id)):
                    assert list(e.atoms) == atoms
                    assert e.type_summary == {t: c for t, c in types.items() if c}
                    assert e.total_tokens_estimate == tokens
                    assert e.expansion_path == tuple(c.id for c in chain[:n])
                    assert e.molecules == tuple(m for c in chain[:n] for m in c.delta_molecules)
        finally:
            s.close()


def test_atoms_built_from_the_store_are_whole_atoms(store):
    r = root(atom("alpha beta gamma", 0.4, T_LIST(T_STRING)), atom("x", 0.9, T_INT, source="elsewhere"))
    d = delta(r, atom("later words here", 0.6), removed={atom("x", type_sig=T_INT).content_hash})
    store.put_many([r, d])
    cold = list(stream_expansion(store, d.id, chunk_size=1))
    for got in [*expand(store, d.id).atoms, *(a for c in cold for a in c.atoms)]:
        fresh = type(got)(got.content, got.type_sig, got.timestamp, got.source_hash, got.relevance_score)
        assert got == fresh and hash(got) == hash(fresh)
        assert (got.content_hash, got.tokens, str(got.type_sig)) == (fresh.content_hash, fresh.tokens, str(fresh.type_sig))
        assert got.timestamp.tzinfo is not None


def test_a_big_delta_over_a_remembered_expansion_is_merged_once(store):
    chain = stored(store, linear_chain(20))
    shared = ExpanderFunctor(store)
    shared.expand(chain[-1].id)
    big = delta(chain[-1], *(atom(f"new {i}", i / 200) for i in range(200)),
                removed={atom(f"fact {i}").content_hash for i in range(0, 20, 2)})
    store.put(big)
    assert shared.expand(big.id) == ExpanderFunctor(store).expand(big.id)
    atoms, _types, _tokens = naive_expand([*chain, big])
    assert list(shared.expand(big.id).atoms) == atoms


def test_a_row_without_a_usable_atom_index_still_expands(tmp_path):
    """fsck names such a row and --repair rewrites it; until then the bytes answer."""
    from sync.store import SQLiteContextStore

    chain = linear_chain(6)
    s = SQLiteContextStore(tmp_path / "s.db")
    try:
        s.put_many(chain)
        want = ExpanderFunctor(s).expand(chain[-1].id)
        want_stream = full_stream(s, chain[-1].id, chunk_size=2)
        s._db.execute("UPDATE contexts SET atom_index = NULL WHERE id = ?", (bytes.fromhex(chain[2].id),))
        s._db.execute("UPDATE contexts SET atom_index = x'00' WHERE id = ?", (bytes.fromhex(chain[4].id),))
        assert ExpanderFunctor(s).expand(chain[-1].id) == want
        assert full_stream(s, chain[-1].id, chunk_size=2) == want_stream
        assert len(list(s.fsck())) == 2
    finally:
        s.close()


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("prefix_bits", [64, 4, 2])
@PROPERTY
@given(chain=chains(min_size=1, max_size=7), threshold=st.sampled_from([0.0, 0.5]), chunk_size=st.integers(1, 4))
def test_cold_stream_finds_dead_atoms_by_prefix_and_by_full_id(tmp_path_factory, kind, prefix_bits, chain, threshold, chunk_size):
    """The cold scan matches ids on their first 8 bytes and checks the full
    id; with 2-bit "prefixes" nearly every atom collides, which must send
    it to full ids and still give the expansion's atoms; with 4 bits some
    repeats meet a removal's prefix without being that removed id."""
    from sync import livescan

    real = livescan._prefixes
    s = make_store(kind, tmp_path_factory.mktemp("s"))
    with pytest.MonkeyPatch.context() as patch:
        if prefix_bits < 64:
            patch.setattr(livescan, "_prefixes", lambda ids: [p % (1 << prefix_bits) for p in real(ids)])
        try:
            s.put_many(chain)
            atoms, _types, _tokens = naive_expand(chain)
            want = [a for a in atoms if a.relevance_score >= threshold]
            chunks = full_stream(s, chain[-1].id, relevance_threshold=threshold, chunk_size=chunk_size, max_tokens_per_chunk=10**6)
            assert [a for c in chunks for a in c.atoms] == want
            check_chunks(chunks, chunk_size, 10**6)
        finally:
            s.close()


def test_bytes_altered_on_disk_are_a_decode_error_not_a_crash(tmp_path):
    import msgpack

    from sync.codec import DecodeError, encode_context
    from sync.store import CorruptObject, SQLiteContextStore

    chain = linear_chain(3)
    s = SQLiteContextStore(tmp_path / "s.db")
    try:
        s.put_many(chain)
        raw = list(msgpack.unpackb(encode_context(chain[1]), use_list=False))
        raw[2] = [list(raw[2][0])[:4]]  # an atom of four fields, where the index expects five
        s._db.execute("UPDATE contexts SET data = ? WHERE id = ?",
                      (msgpack.packb(raw, use_bin_type=True), bytes.fromhex(chain[1].id)))
        # The read's hash check sees it first (CorruptObject names the
        # object); either way it is an error, never a crash.
        with pytest.raises((DecodeError, CorruptObject)):
            ExpanderFunctor(s).expand(chain[-1].id)
        with pytest.raises((DecodeError, CorruptObject)):
            full_stream(s, chain[-1].id, chunk_size=1)
        assert any(chain[1].id in problem for problem in s.fsck())
    finally:
        s.close()


def test_children_of_remembered_expansions_share_and_flatten_their_live_maps(store):
    """Each expansion below derives from the one before (a layer over its
    live map); removals and re-adds reach down through the layers, and past
    _MAX_LIVE_LAYERS the map is flattened. Every result must equal a fresh
    expansion and the semantics."""
    from sync.expand import _MAX_LIVE_LAYERS

    chain = [root(*(atom(f"base {i}", i / 10) for i in range(10)))]
    for n in range(3 * _MAX_LIVE_LAYERS):
        chain.append(delta(
            chain[-1],
            atom(f"new {n}", (n % 7) / 7),
            atom(f"base {n % 10}", 0.95 - n / 100),  # a re-add of an atom further down
            removed={atom(f"new {n - 3}", ((n - 3) % 7) / 7).content_hash, atom(f"base {(n + 5) % 10}").content_hash},
        ))
    store.put_many(chain)
    shared = ExpanderFunctor(store, cache_entries=2)
    for n in range(1, len(chain) + 1):
        got = shared.expand(chain[n - 1].id)
        assert got == ExpanderFunctor(store).expand(chain[n - 1].id)
        atoms, _types, tokens = naive_expand(chain[:n])
        assert list(got.atoms) == atoms and got.total_tokens_estimate == tokens
    # and a stranger branching off a middle one
    branch = delta(chain[5], atom("branch", 0.5), removed={atom("base 3").content_hash})
    assert shared.expand(branch) == ExpanderFunctor(store).expand(branch)
