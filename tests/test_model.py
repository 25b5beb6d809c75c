"""Tests for sync.model: types and unification, atom identity, molecules,
context ids, and the prompt rendering of an expansion."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import SOURCE, T0, atom, molecule, root, types
from sync.model import (
    MAX_TYPE_DEPTH,
    T_ANY,
    T_BOOL,
    T_CONTEXT,
    T_DICT,
    T_FLOAT,
    T_INT,
    T_LIST,
    T_STRING,
    T_TIMESTAMP,
    CompressedContext,
    ExpandedContext,
    Kind,
    MemoryAtom,
    MemoryMolecule,
    TypeSignature,
    check_new_context,
    estimate_tokens,
    fit_budget,
    is_id,
    parse_type,
)

TAU = TypeSignature("τ", Kind.STAR)
ID_A = "a" * 64


# --- TypeSignature ------------------------------------------------------------


def test_str():
    assert str(T_STRING) == "String"
    assert str(T_ANY) == "τ_any"
    assert str(T_LIST(T_STRING)) == "List[String]"
    assert str(T_DICT(T_STRING, T_LIST(T_INT))) == "Dict[String, List[Int]]"
    assert str(T_CONTEXT(T_FLOAT)) == "Context[Float]"
    assert [str(t) for t in (T_INT, T_FLOAT, T_BOOL, T_TIMESTAMP)] == ["Int", "Float", "Bool", "Timestamp"]


def test_constructor_kinds():
    assert T_LIST(T_INT).kind is Kind.ARROW
    assert T_DICT(T_INT, T_INT).kind is Kind.ARROW
    assert T_CONTEXT(T_INT).kind is Kind.CONTEXT
    assert T_STRING.kind is Kind.STAR
    assert T_ANY.is_variable and TAU.is_variable and not T_STRING.is_variable


def test_unify_identical():
    assert T_STRING.unify(T_STRING) == T_STRING
    assert T_LIST(T_STRING).unify(T_LIST(T_STRING)) == T_LIST(T_STRING)


def test_unify_variable_concrete_side_wins():
    assert T_ANY.unify(T_STRING) == T_STRING
    assert T_STRING.unify(T_ANY) == T_STRING
    assert T_ANY.unify(T_LIST(T_INT)) == T_LIST(T_INT)
    assert T_LIST(TAU).unify(T_LIST(T_STRING)) == T_LIST(T_STRING)
    assert T_LIST(T_STRING).unify(T_LIST(TAU)) == T_LIST(T_STRING)
    assert T_DICT(TAU, T_INT).unify(T_DICT(T_STRING, TAU)) == T_DICT(T_STRING, T_INT)
    assert T_ANY.unify(TAU).is_variable


def test_unify_name_mismatch():
    assert T_STRING.unify(T_INT) is None
    assert T_LIST(T_STRING).unify(T_LIST(T_INT)) is None
    assert T_DICT(T_STRING, T_INT).unify(T_DICT(T_STRING, T_STRING)) is None


def test_unify_kind_mismatch():
    star_list = TypeSignature("List", Kind.STAR, (T_STRING,))
    assert T_LIST(T_STRING).unify(star_list) is None
    assert star_list.unify(T_LIST(T_STRING)) is None
    assert TypeSignature("X", Kind.CONSTRAINT).unify(TypeSignature("X", Kind.STAR)) is None


def test_unify_arity_mismatch():
    list2 = TypeSignature("List", Kind.ARROW, (T_STRING, T_STRING))
    assert T_LIST(T_STRING).unify(list2) is None
    assert TypeSignature("List", Kind.ARROW).unify(T_LIST(T_STRING)) is None


def test_unify_unions_constraints_sorted():
    a = TypeSignature("Num", Kind.STAR, constraints=("Ord", "Eq"))
    b = TypeSignature("Num", Kind.STAR, constraints=("Show", "Eq"))
    u = a.unify(b)
    assert u.constraints == ("Eq", "Ord", "Show")
    assert u == b.unify(a)
    nested = TypeSignature("List", Kind.ARROW, (a,)).unify(TypeSignature("List", Kind.ARROW, (b,)))
    assert nested.parameters[0].constraints == ("Eq", "Ord", "Show")


def test_constraints_are_a_sorted_set():
    t = TypeSignature("T", Kind.STAR, constraints=["b", "a", "b"])
    assert t.constraints == ("a", "b")
    assert t == TypeSignature("T", Kind.STAR, constraints=("a", "b"))


@pytest.mark.parametrize(
    "args",
    [
        ("", Kind.STAR),
        (1, Kind.STAR),
        ("T", "STAR"),
        ("T", Kind.STAR, ("String",)),
        ("T", Kind.STAR, (), (1,)),
    ],
)
def test_bad_type_signatures_are_refused(args):
    with pytest.raises((TypeError, ValueError)):
        TypeSignature(*args)


def test_type_depth_is_bounded():
    t = T_STRING
    for _ in range(MAX_TYPE_DEPTH - 1):
        t = T_LIST(t)
    assert t.depth == MAX_TYPE_DEPTH
    with pytest.raises(ValueError):
        T_LIST(t)


@settings(max_examples=200, deadline=None)
@given(types)
def test_parse_type_round_trips_str(t):
    assert parse_type(str(t)) == t
    assert str(parse_type(str(t))) == str(t)


@pytest.mark.parametrize("text", ["String", "List[String]", "Dict[String, List[Int]]", "Context[τ_any]", "F[A, B, C]"])
def test_parse_type_examples(text):
    assert str(parse_type(text)) == text


def test_parse_type_tolerates_spacing():
    assert parse_type(" Dict[ String ,Int ] ") == T_DICT(T_STRING, T_INT)


@pytest.mark.parametrize("text", ["", "[", "List[", "List[]", "List[String", "List[String]]", "A B", "A,B", "List[String,]", "]"])
def test_parse_type_refuses_garbage(text):
    with pytest.raises(ValueError):
        parse_type(text)


def test_parse_type_refuses_deep_nesting():
    with pytest.raises(ValueError):
        parse_type("L[" * 100 + "S" + "]" * 100)


# --- MemoryAtom ---------------------------------------------------------------


def test_content_hash_is_64_lowercase_hex():
    h = atom("x").content_hash
    assert is_id(h)
    assert len(h) == 64 and h == h.lower()


def test_content_hash_depends_only_on_content_and_type():
    base = atom("fact", 0.5)
    same = [
        atom("fact", 0.9),
        atom("fact", 0.5, timestamp=T0 + timedelta(days=3)),
        atom("fact", 0.5, source="someone else"),
        MemoryAtom("fact", T_STRING, datetime(1999, 1, 1), "s", 0.0),
    ]
    for other in same:
        assert other.content_hash == base.content_hash
        assert other != base
    different = [atom("fact ", 0.5), atom("Fact", 0.5), atom("fact", 0.5, T_INT), atom("fact", 0.5, T_LIST(T_STRING))]
    assert len({a.content_hash for a in different} | {base.content_hash}) == 5


def test_content_hash_sees_type_constraints():
    constrained = TypeSignature("String", Kind.STAR, constraints=("NonEmpty",))
    assert atom("x", type_sig=constrained).content_hash != atom("x").content_hash


def test_typed_as():
    a = atom("x", 0.3, T_LIST(TAU))
    typed = a.typed_as(T_LIST(T_STRING))
    assert typed.type_sig == T_LIST(T_STRING)
    assert (typed.content, typed.timestamp, typed.source_hash, typed.relevance_score) == ("x", T0, SOURCE, 0.3)
    assert a.type_sig == T_LIST(TAU)  # the original is untouched
    assert atom("x", type_sig=T_INT).typed_as(T_STRING) is None
    assert atom("x").typed_as(T_ANY) == atom("x")


def test_naive_timestamp_is_taken_as_utc():
    naive = MemoryAtom("x", T_STRING, datetime(2024, 5, 1, 12, 0), "s")
    assert naive.timestamp == T0
    assert naive.timestamp.tzinfo is not None
    assert naive.timestamp.utcoffset() == timedelta(0)


def test_aware_timestamp_is_converted_to_utc():
    plus2 = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    a = MemoryAtom("x", T_STRING, plus2, SOURCE)
    assert a.timestamp == T0
    assert a.timestamp.utcoffset() == timedelta(0)
    assert a == atom("x")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_relevance_is_refused(bad):
    with pytest.raises(ValueError):
        atom("x", bad)


@pytest.mark.parametrize("bad", ["0.5", None, True])
def test_non_numeric_relevance_is_refused(bad):
    with pytest.raises(TypeError):
        atom("x", bad)


def test_relevance_is_normalised():
    assert atom("x", 1).relevance_score == 1.0
    assert isinstance(atom("x", 1).relevance_score, float)
    assert math.copysign(1.0, atom("x", -0.0).relevance_score) == 1.0


def test_atom_field_types_are_checked():
    with pytest.raises(TypeError):
        MemoryAtom(b"x", T_STRING, T0, "s")
    with pytest.raises(TypeError):
        MemoryAtom("x", "String", T0, "s")
    with pytest.raises(TypeError):
        MemoryAtom("x", T_STRING, "2024-01-01", "s")


def test_atom_is_frozen():
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        atom("x").content = "y"


def test_tokens():
    assert atom("").tokens == 0
    assert atom("one").tokens == 1
    assert atom("one two three four five six seven eight nine ten").tokens == 13


# --- MemoryMolecule -----------------------------------------------------------


def test_molecule_complexity():
    m = MemoryMolecule([atom("a"), atom("b"), atom("c")], {"x": [(0, 1), (1, 2)], "y": [(2, 0)]}, T_STRING)
    assert m.complexity == 6
    assert molecule().complexity == 0


def test_molecule_project_reindexes_relations():
    a, i, b, j = atom("a"), atom("1", type_sig=T_INT), atom("b"), atom("2", type_sig=T_INT)
    m = MemoryMolecule([a, i, b, j], {"next": [(0, 1), (1, 2), (2, 3), (0, 2)], "same": [(3, 1)]}, T_STRING, {"k": 1})
    strings = m.project(T_STRING)
    assert strings.atoms == (a, b)
    assert strings.relations == {"next": ((0, 1),), "same": ()}
    assert strings.molecule_type == T_CONTEXT(T_STRING)
    assert strings.metadata == {"k": 1}
    ints = m.project(T_INT)
    assert ints.atoms == (i, j)
    assert ints.relations == {"next": (), "same": ((1, 0),)}
    everything = m.project(T_ANY)
    assert everything.atoms == m.atoms
    assert everything.relations == m.relations
    assert everything.molecule_type == T_CONTEXT(T_ANY)


def test_molecule_project_types_atoms_by_unification():
    m = MemoryMolecule([atom("l", type_sig=T_LIST(TAU)), atom("s")], {}, T_STRING)
    projected = m.project(T_LIST(T_INT))
    assert [a.type_sig for a in projected.atoms] == [T_LIST(T_INT)]


@pytest.mark.parametrize(
    "relations",
    [{"r": [(0, -1)]}, {"r": [(0,)]}, {"r": [(0, 1, 2)]}, {"r": [("0", 1)]}, {"r": [(True, 1)]}, {1: [(0, 1)]}, [("r", [(0, 1)])]],
)
def test_bad_relations_are_refused(relations):
    with pytest.raises((TypeError, ValueError)):
        MemoryMolecule([atom("a"), atom("b")], relations, T_STRING)


def test_relations_are_normalised_to_tuples_in_name_order():
    m = MemoryMolecule([], {"b": [[0, 1]], "a": [(1, 0)]}, T_STRING)
    assert list(m.relations) == ["a", "b"]
    assert m.relations == {"a": ((1, 0),), "b": ((0, 1),)}


# --- CompressedContext ids --------------------------------------------------------


def test_context_id_is_64_lowercase_hex():
    for ctx in (root(), root(atom("x")), CompressedContext(ID_A, ())):
        assert is_id(ctx.id)
        assert ctx.id == ctx.id.lower() and len(ctx.id) == 64


def test_context_id_is_deterministic():
    assert root(atom("x"), note=1).id == root(atom("x"), note=1).id
    assert CompressedContext(None, [atom("x")], removed_hashes=[ID_A, "b" * 64]).id == CompressedContext(
        None, (atom("x"),), removed_hashes={"b" * 64, ID_A}
    ).id


def test_context_id_covers_every_field():
    base = CompressedContext(ID_A, (atom("x"),), (molecule(atom("m")),), frozenset({"b" * 64}), {"k": "v"})
    variants = {
        "removed_hashes": attrs.evolve(base, removed_hashes=frozenset({"c" * 64})),
        "no removals": attrs.evolve(base, removed_hashes=frozenset()),
        "molecules": attrs.evolve(base, delta_molecules=(molecule(atom("m"), tag=1),)),
        "no molecules": attrs.evolve(base, delta_molecules=()),
        "metadata value": attrs.evolve(base, compression_metadata={"k": "w"}),
        "metadata key": attrs.evolve(base, compression_metadata={"j": "v"}),
        "no metadata": attrs.evolve(base, compression_metadata={}),
        "base": attrs.evolve(base, base_hash="d" * 64),
        "root": attrs.evolve(base, base_hash=None),
        "atom relevance": attrs.evolve(base, delta_atoms=(atom("x", 0.5),)),
        "atom timestamp": attrs.evolve(base, delta_atoms=(atom("x", timestamp=T0 + timedelta(microseconds=1)),)),
        "atom source": attrs.evolve(base, delta_atoms=(atom("x", source="other"),)),
        "atom order": attrs.evolve(base, delta_atoms=(atom("x"), atom("y"))),
    }
    ids = {name: v.id for name, v in variants.items()}
    assert base.id not in ids.values()
    assert len(set(ids.values())) == len(ids)
    # the seed's id hashed only base + atom hashes: these all collide there
    assert attrs.evolve(base, delta_atoms=(atom("y"), atom("x"))).id != variants["atom order"].id


def test_equal_contexts_have_equal_ids():
    """model.py: values are normalised "so that equal values always have one
    canonical encoding and therefore one id". Metadata is not normalised:
    Python's 1 == 1.0 == True makes these contexts equal, yet they encode
    (and hash) differently."""
    as_int = root(note=1)
    for other in (root(note=True), root(note=1.0)):
        # either they are unequal, or they share one id
        assert (other == as_int) == (other.id == as_int.id)


def test_context_fields_are_checked():
    with pytest.raises(ValueError):
        CompressedContext("A" * 64, ())
    with pytest.raises(ValueError):
        CompressedContext("a" * 16, ())  # the seed's 64-bit ids
    with pytest.raises(ValueError):
        CompressedContext(None, (), removed_hashes={"xyz"})
    with pytest.raises(TypeError):
        CompressedContext(None, (), removed_hashes=ID_A)
    with pytest.raises(TypeError):
        CompressedContext(None, ("not an atom",))
    with pytest.raises(TypeError):
        CompressedContext(None, (), ("not a molecule",))


def test_is_root_and_delta_size():
    r = root(atom("a"), atom("b"), molecules=[molecule()])
    assert r.is_root
    assert r.delta_size == 3
    d = CompressedContext(r.id, (atom("c"),), removed_hashes={atom("a").content_hash, atom("b").content_hash})
    assert not d.is_root
    assert d.delta_size == 3


@pytest.mark.parametrize(
    "ctx, message",
    [
        (root(), "a root context (base_hash null) must add at least one atom or molecule"),
        (root(note="only metadata"), "a root context (base_hash null) must add at least one atom or molecule"),
        (root(atom("a"), removed=[ID_A]), "removed_hashes: a root context (base_hash null) has nothing to remove"),
        (root(atom("a"), atom("b", 1.5)), "delta_atoms[1].relevance_score: must be between 0 and 1, got 1.5"),
        (CompressedContext(ID_A, (), (molecule(atom("m", 3.0)),)),
         "delta_molecules[0].atoms[0].relevance_score: must be between 0 and 1, got 3.0"),
    ],
    ids=["empty-root", "metadata-only-root", "root-that-removes", "relevance-1.5", "molecule-relevance-3"],
)
def test_check_new_context_refuses_what_no_one_should_write(ctx, message):
    with pytest.raises(ValueError) as info:
        check_new_context(ctx)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "ctx",
    [
        root(atom("a", 0.0), atom("b", 1.0)),
        root(molecules=[molecule()]),  # a root of molecules alone adds something
        CompressedContext(ID_A, ()),  # an empty delta: expansion's identity
        CompressedContext(ID_A, (), removed_hashes={atom("a").content_hash}),
    ],
    ids=["relevance-bounds", "molecule-root", "empty-delta", "delta-that-removes"],
)
def test_check_new_context_accepts_sound_contexts(ctx):
    check_new_context(ctx)


def test_the_model_still_holds_contexts_made_before_the_rules():
    # Stores and peers hold such contexts; the classes must build them.
    assert root().is_root and root(atom("a", 1.5)).delta_atoms[0].relevance_score == 1.5


# --- ExpandedContext ----------------------------------------------------------


def _expanded(*atoms):
    return ExpandedContext(atoms, (), (), sum(a.tokens for a in atoms), {})


def test_to_prompt_context_renders_typed_lines():
    e = _expanded(atom("first fact", 0.9), atom("42", 0.5, T_INT), atom("xs", 0.1, T_LIST(T_STRING)))
    assert e.to_prompt_context() == "[String] first fact\n[Int] 42\n[List[String]] xs"


def test_to_prompt_context_budget():
    # 2, 3 and 1 tokens
    e = _expanded(atom("one two", 0.9), atom("a b c", 0.5), atom("z", 0.1))
    assert e.to_prompt_context(2) == "[String] one two"
    # An atom too large for what is left is skipped; smaller ones still fit.
    assert e.to_prompt_context(4) == "[String] one two\n[String] z"
    assert e.to_prompt_context(5) == "[String] one two\n[String] a b c"
    assert e.to_prompt_context(6) == "[String] one two\n[String] a b c\n[String] z"
    assert e.to_prompt_context(1) == "[String] z"
    assert e.to_prompt_context(0) == ""


def test_fit_budget_keeps_the_most_relevant_atoms_that_fit_in_order():
    atoms = [atom("one two three four five six", 0.9), atom("a b", 0.8), atom("x y z w", 0.5), atom("q", 0.1)]
    # 7, 2, 5 and 1 tokens: with 5, the first is too large alone, yet 2 + 1 fit.
    assert fit_budget(atoms, 5) == ([atoms[1], atoms[3]], 3)
    assert fit_budget(atoms, 7) == ([atoms[0]], 7)
    assert fit_budget(atoms, 0) == ([], 0)
    assert fit_budget(atoms, None) == (atoms, 15)


# Every ASCII character (the separators str.split() knows among them:
# \t \n \v \f \r, \x1c-\x1f and space), and a few that are not ASCII.
_TEXT = st.text(alphabet=st.characters(max_codepoint=127) | st.sampled_from("é\u00a0\u2003語"), max_size=60)


@settings(max_examples=500, deadline=None)
@given(_TEXT)
def test_the_token_estimate_counts_the_words_str_split_finds(text):
    assert estimate_tokens(text) == len(text.split()) * 13 // 10


# Long wordy text, so that the word marks (not str.split) count: words of
# any ASCII and a few other characters, joined by runs of separators that
# hold a space more often than not.
_WORDY = st.lists(
    st.tuples(st.text(alphabet=st.characters(max_codepoint=127) | st.sampled_from("é語"), max_size=6),
              st.sampled_from([" ", "  ", " \t", "\n", "\x1c ", " \x0b"])),
    min_size=80, max_size=300,
).map(lambda pairs: "".join(word + gap for word, gap in pairs))


@settings(max_examples=150, deadline=None)
@given(_WORDY)
def test_the_token_estimate_of_long_text_counts_the_words_str_split_finds(text):
    assert estimate_tokens(text) == len(text.split()) * 13 // 10


@pytest.mark.parametrize("text,words", [("", 0), (" ", 0), ("a", 1), ("\x1ca\x1fb\x0bc\t\n", 3), ("a  b ", 2),
                                        ("a\u00a0b", 2), ("\x00 \x7f", 2), (" x\x1fy" * 100, 200),
                                        ("\tx " * 50 + "ab" * 600, 51), ("ab" * 600 + " x" * 50, 51)])
def test_the_token_estimate_of_some_edges(text, words):
    assert estimate_tokens(text) == words * 13 // 10
