"""Shared factories for the model, codec, store, expand and query tests.

Everything here is deterministic: one fixed timestamp, one fixed source, so
an atom's fields other than the ones a test names never vary.
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from hypothesis import strategies as st

from sync.model import (
    T_CONTEXT,
    T_DICT,
    Kind,
    T_INT,
    T_LIST,
    T_STRING,
    CompressedContext,
    MemoryAtom,
    MemoryMolecule,
    TypeSignature,
)
from sync.store import InMemoryContextStore, SQLiteContextStore

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
SOURCE = "test-source"
STORE_KINDS = ("memory", "sqlite")


def atom(
    content: str,
    relevance: float = 1.0,
    type_sig: TypeSignature = T_STRING,
    *,
    timestamp: datetime = T0,
    source: str = SOURCE,
) -> MemoryAtom:
    return MemoryAtom(content, type_sig, timestamp, source, relevance)


def ago(seconds: float) -> datetime:
    return T0 - timedelta(seconds=seconds)


def molecule(*atoms: MemoryAtom, relations=None, type_sig: TypeSignature = T_STRING, **metadata) -> MemoryMolecule:
    return MemoryMolecule(atoms, relations or {}, type_sig, metadata)


def root(*atoms: MemoryAtom, molecules=(), removed=(), **metadata) -> CompressedContext:
    return CompressedContext(None, atoms, molecules, removed, metadata)


def delta(base: CompressedContext | str, *atoms: MemoryAtom, molecules=(), removed=(), **metadata) -> CompressedContext:
    base_id = base if isinstance(base, str) else base.id
    return CompressedContext(base_id, atoms, molecules, removed, metadata)


def linear_chain(n: int, relevance: float = 0.5) -> list[CompressedContext]:
    """n contexts, root first, each adding one distinct atom `fact i`."""
    out: list[CompressedContext] = []
    base = None
    for i in range(n):
        ctx = CompressedContext(base, (atom(f"fact {i}", relevance),))
        base = ctx.id
        out.append(ctx)
    return out


def make_store(kind: str, directory: Path | None = None):
    """A fresh store; SQLite in `directory` (or a new temporary directory)."""
    if kind == "memory":
        return InMemoryContextStore()
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="ctxfs-test-"))
    return SQLiteContextStore(directory / "s.db")


def hashes(atoms) -> set[str]:
    return {a.content_hash for a in atoms}


def scores(atoms) -> dict[str, float]:
    return {a.content_hash: a.relevance_score for a in atoms}


def contents(atoms) -> list[str]:
    return [a.content for a in atoms]


# --------------------------------------------------------------------------
# Hypothesis strategies: random chains over a tiny universe of atoms, so that
# re-adds, replacements and removals of live atoms happen often.
# --------------------------------------------------------------------------

CONTENTS = ("a", "b", "c", "d b", "a b c")
TYPES = (T_STRING, T_INT, T_LIST(T_STRING))
RELEVANCES = (0.0, 0.25, 0.5, 1.0)
UNIVERSE_IDS = tuple(atom(c, 1.0, t).content_hash for c in CONTENTS for t in TYPES)

small_atoms = st.builds(
    atom,
    st.sampled_from(CONTENTS),
    st.sampled_from(RELEVANCES),
    st.sampled_from(TYPES),
)

small_molecules = st.builds(
    lambda atoms, n, tag: MemoryMolecule(atoms, {"rel": [(i, i) for i in range(min(n, len(atoms)))]}, T_STRING, {"tag": tag}),
    st.lists(small_atoms, max_size=2),
    st.integers(0, 2),
    st.integers(0, 3),
)

step = st.fixed_dictionaries(
    {
        "atoms": st.lists(small_atoms, max_size=5),
        "removed": st.frozensets(st.sampled_from(UNIVERSE_IDS), max_size=4),
        "molecules": st.lists(small_molecules, max_size=1),
        "tag": st.integers(0, 2),
    }
)


@st.composite
def chains(draw, min_size: int = 1, max_size: int = 6) -> list[CompressedContext]:
    """A random lineage, root first; the root may remove (nothing) too."""
    steps = draw(st.lists(step, min_size=min_size, max_size=max_size))
    out: list[CompressedContext] = []
    base = None
    for s in steps:
        ctx = CompressedContext(base, s["atoms"], s["molecules"], s["removed"], {"tag": s["tag"]})
        base = ctx.id
        out.append(ctx)
    return out


# Types whose printed form parses back to them: STAR leaves, constructors
# with parameters (a STAR with parameters or a parameterless ARROW prints the
# same as others, and a leaf named Context parses as kind CONTEXT).
type_names = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcxyz_0123456789τ", min_size=1, max_size=6).filter(
    lambda n: n != "Context"
)


def _bounded(make):
    def build(*args):
        try:
            return make(*args)
        except ValueError:  # deeper than MAX_TYPE_DEPTH
            return None

    return build


types = st.recursive(
    st.builds(lambda n: TypeSignature(n, Kind.STAR), type_names),
    lambda inner: st.one_of(
        st.builds(_bounded(T_LIST), inner),
        st.builds(_bounded(T_DICT), inner, inner),
        st.builds(_bounded(T_CONTEXT), inner),
        st.builds(_bounded(lambda n, ps: TypeSignature(n, Kind.ARROW, tuple(ps))), type_names, st.lists(inner, min_size=1, max_size=3)),
    ).filter(lambda t: t is not None),
    max_leaves=8,
)
