"""Canonical binary encoding, content ids, and the interchange JSON.

Canonical encoding (specified in docs/protocol.md, "Canonical encoding"):
MessagePack with positional arrays for model objects, maps only for the
free-form metadata (keys sorted by their UTF-8 bytes), integers in their
shortest form, every float as float64, ids as 32-byte `bin`, timestamps as
integer microseconds since the Unix epoch (UTC). Positional arrays leave no
key-order question and cost no field names; the leading format number makes
a later change of layout explicit.

    type     = [name, kind, [type...], [constraint...]]        constraints sorted, unique
    atom     = [content, type, timestamp_us, source_hash, relevance]
    molecule = [[atom...], {relation: [[i, j]...]}, type, metadata]
    context  = [1, base_id | nil, [atom...], [molecule...], [removed_id...], metadata]

    atom id    = SHA-256(msgpack(["atom", content, type]))
    context id = SHA-256(canonical context bytes)

Decoding is bounded (sizes, counts, nesting) and strict: bytes that do not
re-encode to themselves are rejected, so one context has exactly one
encoding and one id.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import cattrs
import msgpack

from sync.model import (
    CompressedContext,
    ExpandedContext,
    MAX_RELEVANCE,
    MAX_TYPE_DEPTH,
    Kind,
    canonical_value,
    check_new_context,
    MemoryAtom,
    MemoryMolecule,
    TypeSignature,
    check_id,
    is_id,
)

FORMAT_VERSION = 1

# One encoded context may not exceed this; larger deltas should be split
# into a chain. It must fit one flow-controlled OBJECTS message (the frame
# layer's 16 MiB message cap, the 16 MiB default stream window) with room
# to spare, and keeps a decode's working set small (Python objects cost up
# to ~10x the encoded size).
MAX_CONTEXT_BYTES = 12 * 1024 * 1024

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


class DecodeError(ValueError):
    """Bytes or JSON that are not a valid context; the message says where."""


# --------------------------------------------------------------------------
# Python objects -> canonical msgpack-ready structures
# --------------------------------------------------------------------------


def _type_raw(sig: TypeSignature) -> list:
    return [sig.name, sig.kind.value, [_type_raw(p) for p in sig.parameters], list(sig.constraints)]


def timestamp_us(value: datetime) -> int:
    return (value - _EPOCH) // _MICROSECOND


def _atom_raw(atom: MemoryAtom) -> list:
    return [
        atom.content,
        _type_raw(atom.type_sig),
        timestamp_us(atom.timestamp),
        atom.source_hash,
        atom.relevance_score,
    ]


def molecule_raw(molecule: MemoryMolecule) -> list:
    return [
        [_atom_raw(a) for a in molecule.atoms],
        {name: [list(p) for p in pairs] for name, pairs in molecule.relations.items()},
        _type_raw(molecule.molecule_type),
        canonical_value(molecule.metadata, "molecule metadata"),
    ]


def _context_raw(ctx: CompressedContext) -> list:
    return [
        FORMAT_VERSION,
        None if ctx.base_hash is None else bytes.fromhex(ctx.base_hash),
        [_atom_raw(a) for a in ctx.delta_atoms],
        [molecule_raw(m) for m in ctx.delta_molecules],
        sorted(bytes.fromhex(h) for h in ctx.removed_hashes),
        canonical_value(ctx.compression_metadata, "compression_metadata"),
    ]


def _pack(raw: Any) -> bytes:
    return msgpack.packb(raw, use_bin_type=True)


def encode_context(ctx: CompressedContext) -> bytes:
    """The canonical bytes of a context: what is stored, sent and hashed."""
    return _pack(_context_raw(ctx))


def context_id(ctx: CompressedContext) -> str:
    return hashlib.sha256(encode_context(ctx)).hexdigest()


def raw_atom_id(content: str, type_raw: list | tuple) -> bytes:
    """An atom's id (32 bytes) from its content and raw canonical type."""
    return hashlib.sha256(_pack(["atom", content, type_raw])).digest()


# msgpack(["atom", content, type]) is a 3-element array header (0x93),
# then each element's own encoding: the bytes raw_atom_id hashes.
_ATOM_ID_PREFIX = b"\x93" + _pack("atom")


@functools.lru_cache(maxsize=4096)
def _packed_type(sig: TypeSignature) -> bytes:
    # A store holds few distinct types: encode each once, not once per atom.
    return _pack(_type_raw(sig))


def atom_id(atom: MemoryAtom) -> str:
    return hashlib.sha256(_ATOM_ID_PREFIX + _pack(atom.content) + _packed_type(atom.type_sig)).hexdigest()


def bytes_id(data: bytes) -> str:
    """The id of already-encoded canonical context bytes."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# canonical msgpack structures -> Python objects (strict, bounded)
# --------------------------------------------------------------------------


def _expect(cond: bool, path: str, what: str) -> None:
    if not cond:
        raise DecodeError(f"{path}: expected {what}")


def _list(value: Any, path: str, length: int | None = None) -> list:
    _expect(isinstance(value, (list, tuple)), path, "an array")
    if length is not None:
        _expect(len(value) == length, path, f"an array of {length} items")
    return value


def _type_from_raw(raw: Any, path: str, depth: int = 1) -> TypeSignature:
    if depth > MAX_TYPE_DEPTH:
        raise DecodeError(f"{path}: type nested deeper than {MAX_TYPE_DEPTH} levels")
    name, kind, params, constraints = _list(raw, path, 4)
    _expect(isinstance(name, str), f"{path}.name", "a string")
    _expect(kind in Kind.__members__, f"{path}.kind", f"one of {', '.join(Kind.__members__)}")
    params = [_type_from_raw(p, f"{path}.parameters", depth + 1) for p in _list(params, path)]
    return TypeSignature(name, Kind(kind), tuple(params), tuple(_list(constraints, path)))


def _freeze(raw: Any) -> Any:
    return tuple(_freeze(x) for x in raw) if isinstance(raw, (list, tuple)) else raw


def thaw(raw: Any) -> Any:
    """Decoded msgpack (arrays as tuples) -> JSON-like values (arrays as lists)."""
    if isinstance(raw, (list, tuple)):
        return [thaw(x) for x in raw]
    if isinstance(raw, dict):
        return {k: thaw(v) for k, v in raw.items()}
    return raw


@functools.lru_cache(maxsize=4096)
def _interned_type(raw: tuple) -> TypeSignature:
    # A store holds few distinct types and very many atoms: decode each once.
    return _type_from_raw(raw, "type")


def atom_from_raw(raw: Any, path: str = "atom") -> MemoryAtom:
    content, type_sig, ts, source, relevance = _list(raw, path, 5)
    _expect(type(ts) is int, f"{path}.timestamp", "an integer")
    _expect(type(relevance) is float, f"{path}.relevance", "a float")
    _expect(isinstance(type_sig, (list, tuple)), f"{path}.type", "an array")
    try:
        sig = _interned_type(type_sig if isinstance(type_sig, tuple) else _freeze(type_sig))
    except TypeError:  # unhashable inside: not a valid type anyway
        raise DecodeError(f"{path}.type: expected a type") from None
    return MemoryAtom(content, sig, _EPOCH + ts * _MICROSECOND, source, relevance)


@functools.lru_cache(maxsize=4096)
def _stored_timestamp(ts: int) -> datetime:
    # Atoms of one conversation share timestamps: build each datetime once.
    return _EPOCH + ts * _MICROSECOND


def _slot_setter(cls: type, name: str):
    """A C-level setter of one field of a frozen (slotted) class: its slot's
    descriptor, which skips both the frozen check and the attribute lookup
    object.__setattr__ makes on every call."""
    slot = cls.__dict__.get(name)
    if type(slot).__name__ == "member_descriptor":
        return slot.__set__
    return lambda obj, value: object.__setattr__(obj, name, value)


_ATOM_SETTERS = tuple(
    _slot_setter(MemoryAtom, name)
    for name in ("content", "type_sig", "timestamp", "source_hash", "relevance_score", "content_hash", "tokens")
)


def stored_atoms(raw_atoms: Sequence, positions: Iterable[int], ids: Iterable[bytes],
                 tokens: Iterable[int]) -> list[MemoryAtom]:
    """Atoms `raw_atoms[p]` for each position, from bytes the store
    verified when they were put (as decode_context(verify=False) trusts
    them), without re-running the model's checks: expansion builds up to
    a million of these, and the checks cost more than all the rest. Each
    atom's id and token count come from the store's atom index
    (sync/atomindex.py), so neither is recomputed. Never for bytes from
    outside."""
    out = []
    append = out.append
    types: dict[tuple, TypeSignature] = {}
    new, cls, timestamp = object.__new__, MemoryAtom, _stored_timestamp
    set_content, set_type, set_timestamp, set_source, set_relevance, set_hash, set_tokens = _ATOM_SETTERS
    try:
        for position, atom_id, count in zip(positions, ids, tokens):
            content, type_raw, ts, source, relevance = raw_atoms[position]
            sig = types.get(type_raw)
            if sig is None:
                sig = types[type_raw] = _interned_type(type_raw)
            atom = new(cls)
            set_content(atom, content)
            set_type(atom, sig)
            set_timestamp(atom, timestamp(ts))
            set_source(atom, source)
            set_relevance(atom, relevance)
            set_hash(atom, atom_id.hex())
            set_tokens(atom, count)
            append(atom)
    except (ValueError, TypeError, IndexError, OverflowError) as exc:
        # Bytes altered on disk behind the store's back (fsck names them).
        raise DecodeError(f"stored context does not decode: {exc}") from None
    return out


def molecule_from_raw(raw: Any, path: str) -> MemoryMolecule:
    atoms, relations, mtype, metadata = _list(raw, path, 4)
    _expect(isinstance(relations, dict), f"{path}.relations", "a map")
    _expect(isinstance(metadata, dict), f"{path}.metadata", "a map")
    return MemoryMolecule(
        tuple(atom_from_raw(a, f"{path}.atoms[{i}]") for i, a in enumerate(_list(atoms, path))),
        relations,
        _type_from_raw(mtype, f"{path}.type"),
        thaw(metadata),
    )


def _context_from_raw(raw: Any) -> CompressedContext:
    version, base, atoms, molecules, removed, metadata = _list(raw, "context", 6)
    _expect(version == FORMAT_VERSION and type(version) is int, "context.format", f"format {FORMAT_VERSION}")
    _expect(base is None or (isinstance(base, bytes) and len(base) == 32), "context.base", "nil or a 32-byte id")
    _expect(isinstance(metadata, dict), "context.metadata", "a map")
    removed = _list(removed, "context.removed")
    for h in removed:
        _expect(isinstance(h, bytes) and len(h) == 32, "context.removed", "32-byte ids")
    return CompressedContext(
        None if base is None else base.hex(),
        tuple(atom_from_raw(a, f"delta_atoms[{i}]") for i, a in enumerate(_list(atoms, "context.atoms"))),
        tuple(molecule_from_raw(m, f"delta_molecules[{i}]") for i, m in enumerate(_list(molecules, "context.molecules"))),
        frozenset(h.hex() for h in removed),
        thaw(metadata),
    )


def unpack_bounded(data: bytes, max_bytes: int) -> Any:
    """msgpack-decode with every size bounded by the input (and `max_bytes`)."""
    if len(data) > max_bytes:
        raise DecodeError(f"encoded object is {len(data)} bytes; the limit is {max_bytes}")
    try:
        # msgpack derives its per-container limits from the buffer size and
        # its C decoder refuses nesting beyond a fixed stack depth.
        return msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"not valid MessagePack: {exc}") from None


def raw_atoms_at(data: bytes, positions: Iterable[int]) -> dict[int, Any]:
    """Raw atoms at the given positions of an encoded context's atom array,
    decoding only those: the atoms before each are skipped, never built.
    Bounded as unpack_bounded is."""
    if len(data) > MAX_CONTEXT_BYTES:
        raise DecodeError(f"encoded object is {len(data)} bytes; the limit is {MAX_CONTEXT_BYTES}")
    unpacker = msgpack.Unpacker(raw=False, use_list=False, strict_map_key=True, max_ext_len=0,
                                max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    found = {}
    try:
        _expect(unpacker.read_array_header() == 6, "context", "an array of 6 items")
        unpacker.skip()  # format
        unpacker.skip()  # base
        count = unpacker.read_array_header()
        at = 0
        for position in sorted(set(positions)):
            _expect(0 <= position < count, "context.atoms", f"an atom at position {position}")
            for _ in range(position - at):
                unpacker.skip()
            found[position] = unpacker.unpack()
            at = position + 1
    except DecodeError:
        raise
    except (ValueError, msgpack.OutOfData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"not valid MessagePack: {exc}") from None
    return found


def decode_context(data: bytes, *, verify: bool = True) -> CompressedContext:
    """Canonical bytes -> context. With `verify`, non-canonical bytes are refused.

    Pass verify=False only for bytes this process wrote itself (the store);
    anything from outside must be verified, or two encodings of one context
    could live under two ids.
    """
    raw = unpack_bounded(data, MAX_CONTEXT_BYTES)
    try:
        ctx = _context_from_raw(raw)
        canonical = not verify or encode_context(ctx) == data
    except DecodeError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise DecodeError(f"invalid context: {exc}") from None
    if not canonical:
        raise DecodeError("bytes are not in canonical form")
    return ctx


# --------------------------------------------------------------------------
# The interchange JSON: the seed's serialize_compressed shape
# --------------------------------------------------------------------------


def type_to_json(sig: TypeSignature) -> dict:
    return {
        "name": sig.name,
        "kind": sig.kind.value,
        "parameters": [type_to_json(p) for p in sig.parameters],
        "constraints": list(sig.constraints),
    }


def atom_to_json(atom: MemoryAtom, *, with_hash: bool = False) -> dict:
    """An atom in the interchange JSON; `with_hash` puts its id first as
    `hash`, as every command that prints atoms does (one vocabulary: the
    model's field names, whatever the command)."""
    return {
        **({"hash": atom.content_hash} if with_hash else {}),
        "content": atom.content,
        "type_sig": type_to_json(atom.type_sig),
        "timestamp": atom.timestamp.isoformat(),
        "source_hash": atom.source_hash,
        "relevance_score": atom.relevance_score,
    }


def molecule_to_json(molecule: MemoryMolecule) -> dict:
    return {
        "atoms": [atom_to_json(a) for a in molecule.atoms],
        "relations": {k: [list(p) for p in v] for k, v in molecule.relations.items()},
        "molecule_type": type_to_json(molecule.molecule_type),
        "metadata": canonical_value(molecule.metadata),
    }


def context_to_json(ctx: CompressedContext) -> dict:
    return {
        "base_hash": ctx.base_hash,
        "delta_atoms": [atom_to_json(a) for a in ctx.delta_atoms],
        "delta_molecules": [molecule_to_json(m) for m in ctx.delta_molecules],
        "removed_hashes": sorted(ctx.removed_hashes),
        "compression_metadata": canonical_value(ctx.compression_metadata),
    }


class _Json:
    """Reads one JSON object field by field, naming the path in every error."""

    def __init__(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise DecodeError(f"{path or 'context'}: expected an object, got {_kind(value)}")
        self.value = value
        self.path = path

    def get(self, key: str, kinds: type | tuple[type, ...], what: str, default: Any = ...) -> Any:
        path = f"{self.path}.{key}" if self.path else key
        if key not in self.value:
            if default is ...:
                raise DecodeError(f"{path}: missing")
            return default
        value = self.value[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
            raise DecodeError(f"{path}: expected {what}, got {_kind(value)}")
        return value

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r:.40}"
    if isinstance(value, str):
        return f"the string {value!r:.40}"
    return {list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def type_from_json(value: Any, path: str, depth: int = 1) -> TypeSignature:
    if depth > MAX_TYPE_DEPTH:
        raise DecodeError(f"{path.split('.parameters')[0]}: type nested deeper than {MAX_TYPE_DEPTH} levels")
    obj = _Json(value, path)
    kind = obj.get("kind", str, "a kind name")
    if kind not in Kind.__members__:
        raise DecodeError(f"{obj.at('kind')}: expected one of {', '.join(Kind.__members__)}, got {kind!r:.40}")
    params = obj.get("parameters", list, "an array", [])
    constraints = obj.get("constraints", list, "an array", [])
    for i, c in enumerate(constraints):
        if not isinstance(c, str):
            raise DecodeError(f"{obj.at('constraints')}[{i}]: expected a string, got {_kind(c)}")
    try:
        return TypeSignature(
            obj.get("name", str, "a string"),
            Kind(kind),
            tuple(type_from_json(p, f"{obj.at('parameters')}[{i}]", depth + 1) for i, p in enumerate(params)),
            tuple(constraints),
        )
    except DecodeError:
        raise
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"{path}: {exc}") from None


def atom_from_json(value: Any, path: str) -> MemoryAtom:
    obj = _Json(value, path)
    stamp = obj.get("timestamp", str, "an ISO-8601 timestamp")
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        raise DecodeError(f"{obj.at('timestamp')}: expected an ISO-8601 timestamp, got {stamp!r:.40}") from None
    relevance = obj.get("relevance_score", (int, float), "a number", 1.0)
    if not 0 <= relevance <= MAX_RELEVANCE:  # NaN too
        raise DecodeError(f"{obj.at('relevance_score')}: must be between 0 and {MAX_RELEVANCE:g}, got {relevance!r:.40}")
    try:
        return MemoryAtom(
            obj.get("content", str, "a string"),
            type_from_json(obj.get("type_sig", dict, "a type object"), obj.at("type_sig")),
            when,
            obj.get("source_hash", str, "a string"),
            relevance,
        )
    except DecodeError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise DecodeError(f"{path}: {exc}") from None


def molecule_from_json(value: Any, path: str) -> MemoryMolecule:
    obj = _Json(value, path)
    atoms = obj.get("atoms", list, "an array", [])
    metadata = obj.get("metadata", dict, "an object", {})
    try:
        return MemoryMolecule(
            tuple(atom_from_json(a, f"{obj.at('atoms')}[{i}]") for i, a in enumerate(atoms)),
            obj.get("relations", dict, "an object", {}),
            type_from_json(obj.get("molecule_type", dict, "a type object"), obj.at("molecule_type")),
            canonical_value(metadata, obj.at("metadata")),
        )
    except (ValueError, TypeError) as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"{path}: {exc}") from None


def context_from_json(value: Any) -> CompressedContext:
    """The interchange JSON object -> context, or DecodeError naming the bad field.

    JSON is how contexts are written, so the rules for new contexts
    (`model.check_new_context`: no empty root, no removals in a root,
    relevance in 0..1) apply here; bytes (`decode_context`) are held
    objects, from a store or a peer, and are not judged by them.

    The context is also encoded once here, so that what cannot be stored
    (a lone surrogate, an integer beyond 64 bits, an oversized context) is
    refused now with a clear message rather than later by the store.
    """
    try:
        ctx = _context_from_json(value)
        check_new_context(ctx)
        size = len(encode_context(ctx))
    except DecodeError:
        raise
    except UnicodeError:
        raise DecodeError("text is not valid Unicode (a lone surrogate?)") from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise DecodeError(str(exc)) from None
    if size > MAX_CONTEXT_BYTES:
        raise DecodeError(f"context encodes to {size} bytes; the limit is {MAX_CONTEXT_BYTES} (split it into a chain)")
    return ctx


def _context_from_json(value: Any) -> CompressedContext:
    obj = _Json(value, "")
    base = obj.get("base_hash", (str, type(None)), "null or a context id", None)
    if base is not None and not is_id(base):
        raise DecodeError(f"base_hash: expected 64 lowercase hex characters, got {base!r:.80}")
    removed = obj.get("removed_hashes", list, "an array", [])
    for i, h in enumerate(removed):
        if not is_id(h):
            raise DecodeError(f"removed_hashes[{i}]: expected 64 lowercase hex characters, got {h!r:.80}")
    atoms = obj.get("delta_atoms", list, "an array", [])
    molecules = obj.get("delta_molecules", list, "an array", [])
    metadata = obj.get("compression_metadata", dict, "an object", {})
    unknown = set(value) - {"base_hash", "delta_atoms", "delta_molecules", "removed_hashes", "compression_metadata"}
    if unknown:
        raise DecodeError(f"unknown field {sorted(unknown)[0]!r}")
    try:
        metadata = canonical_value(metadata, "compression_metadata")
    except ValueError as exc:
        raise DecodeError(str(exc)) from None
    return CompressedContext(
        base,
        tuple(atom_from_json(a, f"delta_atoms[{i}]") for i, a in enumerate(atoms)),
        tuple(molecule_from_json(m, f"delta_molecules[{i}]") for i, m in enumerate(molecules)),
        frozenset(removed),
        metadata,
    )


def expanded_to_json(context_id: str, expanded: ExpandedContext, atom_root: str | None = None) -> dict:
    """The `ctxfs expand --json` object (design.md)."""
    out = {
        "id": check_id(context_id),
        "atoms": [atom_to_json(a, with_hash=True) for a in expanded.atoms],
        "molecules": [molecule_to_json(m) for m in expanded.molecules],
        "expansion_path": list(expanded.expansion_path),
        "total_tokens": expanded.total_tokens_estimate,
        "type_summary": dict(expanded.type_summary),
    }
    if atom_root is not None:
        out["atom_root"] = atom_root
    return out


# The one converter for everything that crosses the wire. Model classes use
# the hand-written canonical forms above (their bytes are hashed, so their
# layout is spelled out rather than derived); protocol messages
# (sync/messages.py) are attrs classes it maps to and from field-name maps.
# Structuring is strict: exact primitive types, no unknown keys.
converter = cattrs.Converter(forbid_extra_keys=True)


def _strict(kind: type, *also: type):
    accepted = (kind, *also)

    def structure(value: Any, _type: type) -> Any:
        if type(value) not in accepted:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return kind(value)

    return structure


for _primitive, _also_accepted in ((int, ()), (str, ()), (bytes, ()), (bool, ()), (float, (int,))):
    converter.register_structure_hook(_primitive, _strict(_primitive, *_also_accepted))
for _cls, _unstructure, _structure in (
    (CompressedContext, _context_raw, lambda raw, _: _context_from_raw(raw)),
    (MemoryAtom, _atom_raw, lambda raw, _: atom_from_raw(raw, "atom")),
    (MemoryMolecule, molecule_raw, lambda raw, _: molecule_from_raw(raw, "molecule")),
    (TypeSignature, _type_raw, lambda raw, _: _type_from_raw(raw, "type")),
):
    converter.register_unstructure_hook(_cls, _unstructure)
    converter.register_structure_hook(_cls, _structure)
