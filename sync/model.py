"""The ContextFS data model: typed memory atoms, molecules, and commit-like contexts.

A `CompressedContext` is to AI memory what a commit is to a tree: a delta
(atoms added, atoms removed by id, molecules added) on top of a base context.
`ExpandedContext` is the materialised result an AI client reads.

Every class is a frozen attrs class. Constructors take the seed's positional
order so code written against the seed reads naturally; values are normalised
on the way in (timestamps to aware UTC, constraints to a sorted set, ids
checked) so that equal values always have one canonical encoding
(`sync.codec`) and therefore one id.

Identity: an atom's id covers its content and type only (the same fact seen
again with another timestamp or relevance is the same atom); a context's id
covers every field. Both are SHA-256, 64 lowercase hex characters.
"""

from __future__ import annotations

import enum
import functools
import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import attrs

# Metadata is free-form JSON; deeper nesting than this is not a real use.
MAX_METADATA_DEPTH = 32
# MessagePack's integer range: what metadata integers may hold.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1

# A type nested deeper than this is almost certainly hostile input; real
# signatures (List[Dict[String, Int]]) are three or four levels deep.
MAX_TYPE_DEPTH = 16

ID_HEX_LENGTH = 64
_HEX_DIGITS = frozenset("0123456789abcdef")


class Kind(enum.Enum):
    STAR = "STAR"  # a concrete type
    ARROW = "ARROW"  # a type constructor
    CONSTRAINT = "CONSTRAINT"
    CONTEXT = "CONTEXT"


def is_id(value: object) -> bool:
    """True for a well-formed object id: 64 lowercase hex characters."""
    return (
        isinstance(value, str)
        and len(value) == ID_HEX_LENGTH
        and _HEX_DIGITS.issuperset(value)
    )


def check_id(value: object, what: str = "id") -> str:
    if not is_id(value):
        raise ValueError(f"{what} must be 64 lowercase hex characters, got {value!r:.80}")
    return value  # type: ignore[return-value]


def canonical_value(value: Any, path: str = "metadata", depth: int = 0) -> Any:
    """Check a JSON-like value; return a fresh copy with maps in canonical key order."""
    if depth > MAX_METADATA_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_METADATA_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValueError(f"{path}: integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: {value} is not a finite number")
        return value
    if isinstance(value, (list, tuple)):
        return [canonical_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"{path}: keys must be strings, got {key!r:.40}")
        # Python orders str by code point, which is the UTF-8 byte order.
        return {k: canonical_value(value[k], f"{path}.{k}", depth + 1) for k in sorted(value)}
    raise ValueError(f"{path}: {type(value).__name__} is not a JSON value")


def _metadata(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(value).__name__}")
    return canonical_value(value)


def _metadata_key(value: dict[str, Any]) -> str:
    # Python says 1 == 1.0 == True; the encoding (and so the id) does not.
    # Compare by the JSON text, which tells them apart, so equal contexts
    # always have equal ids.
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _check_str(what: str):
    def validate(_inst: object, _attr: object, value: object) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{what} must be a string, got {type(value).__name__}")

    return validate


def _sorted_constraints(values: Iterable[str]) -> tuple[str, ...]:
    values = tuple(values)
    for value in values:
        if not isinstance(value, str):
            raise TypeError(f"type constraints must be strings, got {value!r:.40}")
    return tuple(sorted(set(values)))


def _type_depth(sig: TypeSignature) -> int:
    return 1 + max((p.depth for p in sig.parameters), default=0)


@attrs.frozen
class TypeSignature:
    """A type: `Name` or `Name[P1, P2]`. Names starting with τ are type variables."""

    name: str = attrs.field(validator=_check_str("type name"))
    kind: Kind = attrs.field(validator=attrs.validators.instance_of(Kind))
    parameters: tuple[TypeSignature, ...] = attrs.field(default=(), converter=tuple)
    constraints: tuple[str, ...] = attrs.field(default=(), converter=_sorted_constraints)
    depth: int = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.name:
            raise ValueError("type name must not be empty")
        for p in self.parameters:
            if not isinstance(p, TypeSignature):
                raise TypeError(f"type parameters must be TypeSignature, got {type(p).__name__}")
        depth = _type_depth(self)
        if depth > MAX_TYPE_DEPTH:
            raise ValueError(f"type nested deeper than {MAX_TYPE_DEPTH} levels")
        object.__setattr__(self, "depth", depth)

    @property
    def is_variable(self) -> bool:
        return self.name.startswith("τ")

    def __str__(self) -> str:
        return self.printed

    @functools.cached_property
    def printed(self) -> str:
        if not self.parameters:
            return self.name
        return f"{self.name}[{', '.join(map(str, self.parameters))}]"

    def unify(self, other: TypeSignature) -> TypeSignature | None:
        """The most specific type both sides agree on, or None when they clash.

        A type variable unifies with anything and the concrete side wins;
        otherwise names, kinds and arity must match, parameters unify pairwise
        and constraints are unioned.
        """
        if self.is_variable:
            return self if other.is_variable else other
        if other.is_variable:
            return self
        if (
            self.name != other.name
            or self.kind != other.kind
            or len(self.parameters) != len(other.parameters)
        ):
            return None
        params = []
        for mine, theirs in zip(self.parameters, other.parameters):
            unified = mine.unify(theirs)
            if unified is None:
                return None
            params.append(unified)
        return TypeSignature(
            self.name, self.kind, tuple(params), self.constraints + other.constraints
        )


# Constructors whose kind `parse_type` knows; other names with parameters
# are ARROW, without are STAR.
_CONSTRUCTOR_KINDS = {"Context": Kind.CONTEXT}


def parse_type(text: str) -> TypeSignature:
    """Parse the printed form back: `String`, `List[String]`, `Dict[String, Int]`."""
    tokens = text.replace("[", " [ ").replace("]", " ] ").replace(",", " , ").split()
    pos = 0

    def parse(depth: int) -> TypeSignature:
        nonlocal pos
        if depth > MAX_TYPE_DEPTH:
            raise ValueError(f"type nested deeper than {MAX_TYPE_DEPTH} levels")
        if pos >= len(tokens) or tokens[pos] in "[],":
            raise ValueError(f"not a type: {text!r}")
        name = tokens[pos]
        pos += 1
        params = []
        if pos < len(tokens) and tokens[pos] == "[":
            pos += 1
            while True:
                params.append(parse(depth + 1))
                if pos < len(tokens) and tokens[pos] == ",":
                    pos += 1
                    continue
                if pos < len(tokens) and tokens[pos] == "]":
                    pos += 1
                    break
                raise ValueError(f"not a type: {text!r}")
        kind = _CONSTRUCTOR_KINDS.get(name, Kind.ARROW if params else Kind.STAR)
        return TypeSignature(name, kind, tuple(params))

    sig = parse(0)
    if pos != len(tokens):
        raise ValueError(f"not a type: {text!r}")
    return sig


T_STRING = TypeSignature("String", Kind.STAR)
T_INT = TypeSignature("Int", Kind.STAR)
T_FLOAT = TypeSignature("Float", Kind.STAR)
T_BOOL = TypeSignature("Bool", Kind.STAR)
T_TIMESTAMP = TypeSignature("Timestamp", Kind.STAR)
T_ANY = TypeSignature("τ_any", Kind.STAR)


def T_LIST(item: TypeSignature) -> TypeSignature:  # noqa: N802 - the seed's name
    return TypeSignature("List", Kind.ARROW, (item,))


def T_DICT(key: TypeSignature, value: TypeSignature) -> TypeSignature:  # noqa: N802
    return TypeSignature("Dict", Kind.ARROW, (key, value))


def T_CONTEXT(item: TypeSignature) -> TypeSignature:  # noqa: N802
    return TypeSignature("Context", Kind.CONTEXT, (item,))


def to_utc(value: datetime) -> datetime:
    """Aware UTC datetime; a naive one is taken to be UTC already."""
    if not isinstance(value, datetime):
        raise TypeError(f"timestamp must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(f"timestamp {value.isoformat()} is outside the years 1 to 9999 in UTC") from None


def _relevance(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"relevance_score must be a number, got {value!r:.40}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"relevance_score must be a finite number >= 0, got {value}")
    return value + 0.0  # folds -0.0 into 0.0: one value, one encoding


# The seed's model treats relevance as a score from 0 (irrelevant) to 1.
MAX_RELEVANCE = 1.0


# Wordy ASCII text: its bytes with whitespace (what str.split() splits on)
# as b" " and every other byte as b"w", so that words are counted by C
# scans instead of one new string per word (a 10 KB atom of prose has
# ~1,500). Those scans cost ~2.6 ns a byte, splitting ~0.6 ns a byte and
# ~50 ns a word: marking pays from about one space in 25 bytes, judged on
# the first KiB (long runs without spaces, such as encoded data, split).
_WORD_MARKS = bytes(0x20 if chr(b).isspace() else 0x77 for b in range(128)) + b"w" * 128
_SAMPLE, _SAMPLE_SPACES = 1024, 40


def estimate_tokens(text: str) -> int:
    """The seed's token estimate: words × 1.3, in integers."""
    if text.isascii() and text.count(" ", 0, _SAMPLE) >= _SAMPLE_SPACES:
        marks = text.encode("ascii").translate(_WORD_MARKS)
        words = marks.count(b" w") + marks.startswith(b"w")
    else:
        words = len(text.split())
    return words * 13 // 10


@attrs.frozen
class MemoryAtom:
    """One typed fact. Its id (`content_hash`) covers content and type only."""

    content: str = attrs.field(validator=_check_str("atom content"))
    type_sig: TypeSignature = attrs.field(validator=attrs.validators.instance_of(TypeSignature))
    timestamp: datetime = attrs.field(converter=to_utc)
    source_hash: str = attrs.field(validator=_check_str("source_hash"))
    relevance_score: float = attrs.field(default=1.0, converter=_relevance)

    @functools.cached_property
    def content_hash(self) -> str:
        from sync.codec import atom_id

        return atom_id(self)

    @functools.cached_property
    def tokens(self) -> int:
        return estimate_tokens(self.content)

    def typed_as(self, target: TypeSignature) -> MemoryAtom | None:
        """A copy retyped to the unification with `target`, or None if they clash."""
        unified = self.type_sig.unify(target)
        if unified is None:
            return None
        return attrs.evolve(self, type_sig=unified)


def _relations(value: Mapping[str, Iterable[Iterable[int]]]) -> dict[str, tuple[tuple[int, int], ...]]:
    if not isinstance(value, Mapping):
        raise TypeError(f"relations must be a mapping, got {type(value).__name__}")
    out = {}
    for name in sorted(value):
        if not isinstance(name, str):
            raise TypeError(f"relation names must be strings, got {name!r:.40}")
        pairs = []
        if not isinstance(value[name], (list, tuple)):
            raise TypeError(f"relation {name!r}: expected a list of [i, j] pairs")
        for pair in value[name]:
            if not isinstance(pair, (list, tuple)):
                raise TypeError(f"relation {name!r}: expected [i, j] pairs, got {pair!r:.40}")
            pair = tuple(pair)
            if len(pair) != 2 or not all(type(i) is int for i in pair):
                raise TypeError(f"relation {name!r}: pairs must be two integers, got {pair!r:.40}")
            pairs.append(pair)
        out[name] = tuple(pairs)
    return out


@attrs.frozen
class MemoryMolecule:
    """Atoms plus named relations, each a list of (i, j) index pairs."""

    atoms: tuple[MemoryAtom, ...] = attrs.field(converter=tuple)
    relations: dict[str, tuple[tuple[int, int], ...]] = attrs.field(
        converter=_relations, eq=lambda r: tuple(r.items())
    )
    molecule_type: TypeSignature = attrs.field(validator=attrs.validators.instance_of(TypeSignature))
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=_metadata, eq=_metadata_key)

    def __attrs_post_init__(self) -> None:
        for atom in self.atoms:
            if not isinstance(atom, MemoryAtom):
                raise TypeError(f"molecule atoms must be MemoryAtom, got {type(atom).__name__}")
        # Pairs index the molecule's atoms; a molecule with no atoms of its
        # own relates the atoms of its context's delta (design.md's example
        # does). Either way an index is a position, never negative.
        for name, pairs in self.relations.items():
            for i, j in pairs:
                if i < 0 or j < 0:
                    raise ValueError(f"relation {name!r}: pair ({i}, {j}) has a negative index")

    @property
    def complexity(self) -> int:
        return len(self.atoms) + sum(len(p) for p in self.relations.values())

    def project(self, type_filter: TypeSignature) -> MemoryMolecule:
        """The atoms whose type unifies with `type_filter`, relations re-indexed."""
        kept: dict[int, int] = {}
        atoms = []
        for index, atom in enumerate(self.atoms):
            typed = atom.typed_as(type_filter)
            if typed is not None:
                kept[index] = len(atoms)
                atoms.append(typed)
        relations = {
            name: tuple((kept[i], kept[j]) for i, j in pairs if i in kept and j in kept)
            for name, pairs in self.relations.items()
        }
        return MemoryMolecule(atoms, relations, T_CONTEXT(type_filter), self.metadata)


def _removed(value: Iterable[str]) -> frozenset[str]:
    if isinstance(value, str):
        raise TypeError("removed_hashes must be a collection of ids, not one string")
    return frozenset(check_id(h, "removed hash") for h in value)


def _base(value: str | None) -> str | None:
    return None if value is None else check_id(value, "base_hash")


@attrs.frozen
class CompressedContext:
    """A commit-like delta over `base_hash` (None for a root context)."""

    base_hash: str | None = attrs.field(converter=_base)
    delta_atoms: tuple[MemoryAtom, ...] = attrs.field(converter=tuple)
    delta_molecules: tuple[MemoryMolecule, ...] = attrs.field(default=(), converter=tuple)
    removed_hashes: frozenset[str] = attrs.field(default=frozenset(), converter=_removed)
    compression_metadata: dict[str, Any] = attrs.field(factory=dict, converter=_metadata, eq=_metadata_key)

    def __attrs_post_init__(self) -> None:
        for atom in self.delta_atoms:
            if not isinstance(atom, MemoryAtom):
                raise TypeError(f"delta_atoms must be MemoryAtom, got {type(atom).__name__}")
        for molecule in self.delta_molecules:
            if not isinstance(molecule, MemoryMolecule):
                raise TypeError(f"delta_molecules must be MemoryMolecule, got {type(molecule).__name__}")

    @functools.cached_property
    def id(self) -> str:
        """SHA-256 of the canonical encoding of every field."""
        from sync.codec import context_id

        return context_id(self)

    @property
    def is_root(self) -> bool:
        return self.base_hash is None

    @property
    def delta_size(self) -> int:
        return len(self.delta_atoms) + len(self.delta_molecules) + len(self.removed_hashes)


def check_new_context(ctx: CompressedContext) -> None:
    """Refuse (ValueError naming the field) a context that no one should make now.

    These are rules for contexts being written (the interchange JSON that
    `ctxfs push` and the local client read), not for contexts that exist:
    the constructors and the decoder take any context the encoding can
    hold, because stores and peers already hold contexts of these shapes,
    made before the rules, and those must go on reading and syncing. They
    are harmless to expand: an empty root expands to nothing, a root's
    removals to no change, and a relevance above 1 sorts first.

    - a root (no base) adds at least one atom or molecule: `{}` is no context;
    - a root removes nothing: it has no base to remove from;
    - every relevance (of delta atoms and molecule atoms) is in 0..1.
    """
    if ctx.base_hash is None:
        if ctx.removed_hashes:
            raise ValueError("removed_hashes: a root context (base_hash null) has nothing to remove")
        if not ctx.delta_atoms and not ctx.delta_molecules:
            raise ValueError("a root context (base_hash null) must add at least one atom or molecule")
    for index, atom in enumerate(ctx.delta_atoms):
        _check_relevance_range(atom, f"delta_atoms[{index}]")
    for m, molecule in enumerate(ctx.delta_molecules):
        for index, atom in enumerate(molecule.atoms):
            _check_relevance_range(atom, f"delta_molecules[{m}].atoms[{index}]")


def _check_relevance_range(atom: MemoryAtom, path: str) -> None:
    if atom.relevance_score > MAX_RELEVANCE:
        raise ValueError(
            f"{path}.relevance_score: must be between 0 and {MAX_RELEVANCE:g}, got {atom.relevance_score!r}")


def fit_budget(atoms: Iterable[MemoryAtom], max_tokens: int | None) -> tuple[list[MemoryAtom], int]:
    """The atoms that fit `max_tokens`, in the order given, and the tokens they take.

    Each atom is taken if it still fits; one too large for what is left is
    skipped and the smaller ones after it are still taken, so a budget never
    comes back empty because its most relevant atom alone is larger.
    """
    kept = []
    spent = 0
    for atom in atoms:
        cost = atom.tokens
        if max_tokens is not None and spent + cost > max_tokens:
            continue
        spent += cost
        kept.append(atom)
    return kept, spent


@attrs.frozen
class ExpandedContext:
    """The full context for an AI: atoms most relevant first, and how it was built."""

    atoms: tuple[MemoryAtom, ...] = attrs.field(converter=tuple)
    molecules: tuple[MemoryMolecule, ...] = attrs.field(converter=tuple)
    expansion_path: tuple[str, ...] = attrs.field(converter=tuple)
    total_tokens_estimate: int
    type_summary: dict[str, int] = attrs.field(converter=dict)

    def to_prompt_context(self, max_tokens: int | None = None) -> str:
        """`[Type] content` lines, most relevant first, of the atoms that fit
        the budget (`fit_budget`: an atom too large for what is left is
        skipped, smaller ones after it still fit)."""
        kept, _spent = fit_budget(self.atoms, max_tokens)
        return "\n".join(f"[{atom.type_sig}] {atom.content}" for atom in kept)
