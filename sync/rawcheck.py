"""Checking context bytes from outside without building the model's objects.

A node that receives a context stores its bytes and the derived atom index
(sync/atomindex.py); it needs the model's objects for neither. Decoding
into frozen attrs objects (every field converted and validated) and
encoding them again to prove the bytes canonical was most of what storing
a received context cost. `check_context_bytes` accepts exactly the bytes
`codec.decode_context(data, verify=True)` accepts, by checking the decoded
MessagePack values against the same rules:

- the shape: six fields, format 1, a 32-byte base or nil, arrays of atoms,
  molecules and 32-byte removed ids, a metadata map;
- each atom: a string content and source, an integer timestamp inside the
  years 1 to 9999, a float relevance that is finite, >= 0 and not -0.0,
  and a type the model accepts whose canonical encoding is its own (types
  are few: each distinct one is checked once);
- removed ids strictly ascending (a set, sorted);
- metadata JSON-like (`model.canonical_value`): string keys in code point
  order, finite floats, no bytes, at most MAX_METADATA_DEPTH levels;
- and the values encode back to exactly the bytes (shortest integers,
  float64, one header form), which MessagePack does at C speed.

A context with molecules (rare) takes the model's path: their rules are
the model's. The equivalence is tested against decode_context on valid,
mutated and hand-made non-canonical bytes (tests/test_rawcheck.py).
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone
from typing import Any

import attrs

from sync import atomindex
from sync.codec import (
    _ATOM_ID_PREFIX,
    FORMAT_VERSION,
    MAX_CONTEXT_BYTES,
    DecodeError,
    _interned_type,
    _pack,
    _type_raw,
    decode_context,
    unpack_bounded,
)
from sync.model import MAX_METADATA_DEPTH, MAX_RELEVANCE, CompressedContext

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# The timestamps a datetime can hold (codec decodes into one), in µs.
_MIN_US = (datetime.min.replace(tzinfo=timezone.utc) - _EPOCH) // datetime.resolution
_MAX_US = (datetime.max.replace(tzinfo=timezone.utc) - _EPOCH) // datetime.resolution
_ID_SIZE = 32


@attrs.frozen
class CheckedContext:
    """What storing a checked context needs (its base and its atom index),
    and what the rules for new contexts (`model.check_new_context`) look at:
    how many atoms and molecules it adds, how many ids it removes, and its
    highest relevance (molecules' atoms included; 0.0 if it has none)."""

    base_hash: str | None
    index: bytes
    adds: int
    top_relevance: float

    @property
    def removes(self) -> int:
        return atomindex.removed_count(self.index)

    def meets_new_context_rules(self) -> bool:
        """True iff model.check_new_context would accept the context."""
        if self.base_hash is None and (self.removes or not self.adds):
            return False
        return self.top_relevance <= MAX_RELEVANCE


def _of_context(ctx: CompressedContext) -> CheckedContext:
    relevances = [a.relevance_score for a in ctx.delta_atoms]
    relevances += [a.relevance_score for m in ctx.delta_molecules for a in m.atoms]
    return CheckedContext(ctx.base_hash, atomindex.build(ctx), len(ctx.delta_atoms) + len(ctx.delta_molecules),
                          max(relevances, default=0.0))


def check_context_bytes(data: bytes) -> CheckedContext:
    """A CheckedContext of canonical context bytes from outside;
    DecodeError for exactly the bytes decode_context(verify=True) refuses.
    Bounded as unpack_bounded is (MAX_CONTEXT_BYTES)."""
    raw = unpack_bounded(data, MAX_CONTEXT_BYTES)
    if not isinstance(raw, tuple) or len(raw) != 6:
        raise DecodeError("context: expected an array of 6 items")
    version, base, atoms, molecules, removed, metadata = raw
    if type(version) is not int or version != FORMAT_VERSION:
        raise DecodeError(f"context.format: expected format {FORMAT_VERSION}")
    if base is not None and not (type(base) is bytes and len(base) == _ID_SIZE):
        raise DecodeError("context.base: expected nil or a 32-byte id")
    if not isinstance(atoms, tuple) or not isinstance(molecules, tuple) or not isinstance(removed, tuple):
        raise DecodeError("context: expected arrays of atoms, molecules and removed ids")
    if molecules:
        return _of_context(decode_context(data, verify=True))
    if not isinstance(metadata, dict):
        raise DecodeError("context.metadata: expected a map")
    _check_removed(removed)
    _check_json(metadata, "metadata", 0)
    ids, relevances, contents = _check_atoms(atoms)
    if _pack(raw) != data:
        raise DecodeError("bytes are not in canonical form")
    return CheckedContext(None if base is None else base.hex(), atomindex.assemble(ids, relevances, contents, removed),
                          len(atoms), max(relevances, default=0.0))


def _check_removed(removed: tuple) -> None:
    previous = b""
    for rid in removed:
        if type(rid) is not bytes or len(rid) != _ID_SIZE:
            raise DecodeError("context.removed: expected 32-byte ids")
        if rid <= previous:
            raise DecodeError("context.removed: expected ids in ascending order, each once")
        previous = rid


def _check_atoms(atoms: tuple) -> tuple[list[bytes], list[float], list[str]]:
    ids, relevances, contents = [], [], []
    sha256, prefix, pack = hashlib.sha256, _ATOM_ID_PREFIX, _pack
    isfinite, copysign = math.isfinite, math.copysign
    for i, atom in enumerate(atoms):
        if not isinstance(atom, tuple) or len(atom) != 5:
            raise DecodeError(f"delta_atoms[{i}]: expected an array of 5 items")
        content, type_raw, ts, source, relevance = atom
        if type(content) is not str or type(source) is not str:
            raise DecodeError(f"delta_atoms[{i}]: expected string content and source")
        if type(ts) is not int or not _MIN_US <= ts <= _MAX_US:
            raise DecodeError(f"delta_atoms[{i}].timestamp: expected integer microseconds in years 1 to 9999")
        if type(relevance) is not float or not isfinite(relevance) or copysign(1.0, relevance) < 0:
            raise DecodeError(f"delta_atoms[{i}].relevance: expected a finite float >= 0 (not -0.0)")
        ids.append(sha256(prefix + pack(content) + _packed_type(type_raw, i)).digest())
        relevances.append(relevance)
        contents.append(content)
    return ids, relevances, contents


# Canonical encodings of the types seen, by raw type: a store holds few
# types and very many atoms. Only small types are kept, and only so many,
# so a peer inventing types costs checks, not memory.
_TYPE_CACHE_ENTRIES = 4096
_TYPE_CACHE_MAX_BYTES = 512
_types: dict[tuple, bytes] = {}


def _packed_type(type_raw: Any, i: int) -> bytes:
    try:
        packed = _types.get(type_raw)
        if packed is None:
            packed = _canonical_type(type_raw)
            if len(packed) <= _TYPE_CACHE_MAX_BYTES and len(_types) < _TYPE_CACHE_ENTRIES:
                _types[type_raw] = packed
        return packed
    except (DecodeError, ValueError, TypeError):  # TypeError: unhashable, so no type
        raise DecodeError(f"delta_atoms[{i}].type: expected a canonical type") from None


def _canonical_type(type_raw: Any) -> bytes:
    # The model's own check (codec._type_from_raw, through its cache), then
    # the canonical form: constraints sorted and unique, as the model keeps them.
    if not isinstance(type_raw, tuple):
        raise DecodeError("type: expected an array")
    packed = _pack(type_raw)
    if _pack(_type_raw(_interned_type(type_raw))) != packed:
        raise DecodeError("type: not in canonical form")
    return packed


def _check_json(value: Any, path: str, depth: int) -> None:
    """model.canonical_value's rules, on decoded MessagePack, in place."""
    if depth > MAX_METADATA_DEPTH:
        raise DecodeError(f"{path}: nested deeper than {MAX_METADATA_DEPTH} levels")
    if value is None or isinstance(value, (bool, str, int)):
        return  # MessagePack's integers are the model's 64-bit range
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DecodeError(f"{path}: {value} is not a finite number")
        return
    if isinstance(value, tuple):
        for item in value:
            _check_json(item, path, depth + 1)
        return
    if isinstance(value, dict):
        keys = list(value)
        for key in keys:
            if type(key) is not str:
                raise DecodeError(f"{path}: keys must be strings")
        if keys != sorted(keys):
            raise DecodeError(f"{path}: keys not in canonical order")
        for key in keys:
            _check_json(value[key], f"{path}.{key}", depth + 1)
        return
    raise DecodeError(f"{path}: {type(value).__name__} is not a JSON value")
