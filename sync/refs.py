"""Refs: named, synced pointers to contexts — signed updates and the register.

A ref is not a mutable row: it is the set of *ref updates* written for its
name, each an immutable, signed, content-addressed object that syncs like a
context (docs/protocol.md, "Ref updates"). An update names the updates it
replaces; a ref's value is the *frontier* of its updates, those no held
update supersedes — a multi-value register. Because the frontier is a pure
function of the set of updates held, nodes that hold the same updates read
the same value, whatever order the updates arrived in: convergence needs
only the set reconciliation that already syncs contexts.

    ref update = ["ref", 1, name, target_id | nil, [superseded_id...],
                  node_id, time_us, public_key, signature]
    signature  = Ed25519(key, b"ctxfs ref update v1\\0" + msgpack(the first 8 items))
    update id  = SHA-256(canonical bytes)               # covers the signature too

The nine-item array with the tag "ref" first cannot be mistaken for a
context (a six-item array starting with its format number), so updates and
contexts share one id space and one OBJECTS message.

Names and ids: a 64-hex-character string is always read as an id, never as
a ref name, even if a ref of that name exists; resolving shorter id
prefixes against names is the caller's business.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sync.codec import DecodeError, timestamp_us, unpack_bounded
from sync.model import check_id, is_id

__all__ = [
    "MAX_REF_NAME_BYTES",
    "MAX_REF_UPDATE_BYTES",
    "MAX_SUPERSEDES",
    "REF_FORMAT_VERSION",
    "SIGNING_PREFIX",
    "InvalidRefUpdate",
    "RefTable",
    "RefUpdate",
    "RefValue",
    "check_ref_name",
    "decode_update",
    "encode_update",
    "is_ref_update_bytes",
    "make_update",
    "signing_input",
    "supersede_all",
    "update_id",
    "updates_for_write",
    "verify_update",
]

REF_TAG = "ref"
REF_FORMAT_VERSION = 1
# msgpack: fixarray of 9 (0x99), fixstr of 3 (0xa3), "ref". A context starts
# with 0x96 (fixarray of 6), so these five bytes alone tell the two apart.
_REF_PREFIX = b"\x99\xa3ref"

# Names are typed on command lines and shown in listings: 200 bytes leave
# room for deep "team/project/topic" paths and keep a listing readable.
MAX_REF_NAME_BYTES = 200
# A set names the frontier it replaces: one update per writer that wrote
# concurrently since the last set (a node always supersedes its own
# previous update). 1024 writers at once is far beyond a real cluster, and
# 1024 ids (~34 KiB) keep one update a small object. A larger frontier —
# only a member minting updates can make one — is replaced by a chain of
# updates (`updates_for_write`).
MAX_SUPERSEDES = 1024
# The largest valid update is about 35 KiB (MAX_SUPERSEDES ids of 34 bytes,
# a 200-byte name, the fixed fields); anything longer is refused unread.
MAX_REF_UPDATE_BYTES = 40 * 1024

# Domain separation: a signature over a ref update can never be replayed as
# a signature over anything else this key signs (TLS handshakes, a later
# format), and vice versa. The NUL ends the label unambiguously.
SIGNING_PREFIX = b"ctxfs ref update v1\0"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_ID_BYTES = 32

# Code points a name may not hold, listed rather than looked up (see
# check_ref_name): the C0 and C1 controls and DEL, the line and paragraph
# separators (they break a listing's lines), and Unicode's Bidi_Control
# characters (they reorder how a listing reads: "Trojan Source").
_FORBIDDEN_CHARS = frozenset(
    [chr(c) for c in range(0x00, 0x20)]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + ["\u2028", "\u2029", "\u061c", "\u200e", "\u200f"]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
)
# Reserved for syntax around names, refused now because a name that has
# synced can never be refused later: revisions (`main~1`, `main^`, `a:b`),
# globs (`*`, `?`, `[`), URIs (`ctxfs://ref/{name}`: `#`, `%`, `?`, space)
# and Windows paths (`\`). Git refuses the same, but for `#` and `%`.
_RESERVED_CHARS = frozenset("~^:?*[]\\#% ")
# Unicode's White_Space property (stable since 6.3), refused at a name's
# ends.
_WHITESPACE = frozenset(
    [chr(c) for c in range(0x09, 0x0E)]
    + [" ", "\u0085", "\u00a0", "\u1680"]
    + [chr(c) for c in range(0x2000, 0x200B)]
    + ["\u2028", "\u2029", "\u202f", "\u205f", "\u3000"]
)


class InvalidRefUpdate(DecodeError):
    """Bytes or fields that are not a valid, authentic ref update; one line."""


# --------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------


def check_ref_name(name: object) -> str:
    """`name` if it may name a ref, else ValueError saying what is wrong.

    Every rule is a fixed list of code points, never a lookup in the
    Unicode database: all nodes must accept exactly the same updates
    whatever their Python's Unicode version, or two nodes could disagree
    forever about the set they hold. For the same reason nothing is
    normalised here; a caller reading names typed by people may apply NFC
    first. The rules keep a name one line long and usable as a path-like
    argument: no option look-alike, no empty or relative components.
    """
    if not isinstance(name, str):
        raise ValueError(f"a ref name must be a string, got {type(name).__name__}")
    if not name:
        raise ValueError("a ref name must not be empty")
    shown = f"ref name {name!r:.80}"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeError:
        raise ValueError(f"{shown}: not valid Unicode (a lone surrogate?)") from None
    if size > MAX_REF_NAME_BYTES:
        raise ValueError(f"{shown}: {size} bytes in UTF-8; the limit is {MAX_REF_NAME_BYTES}")
    for position, char in enumerate(name):
        if char in _FORBIDDEN_CHARS:
            raise ValueError(f"{shown}: control character U+{ord(char):04X} at position {position} is not allowed")
    if name[0] in _WHITESPACE or name[-1] in _WHITESPACE:
        raise ValueError(f"{shown}: must not start or end with whitespace")
    for position, char in enumerate(name):
        if char in _RESERVED_CHARS:
            raise ValueError(f"{shown}: {char!r} at position {position} is reserved (revision, glob and URI syntax)")
    if name.startswith("-"):
        raise ValueError(f"{shown}: must not start with '-' (it would read as an option)")
    if name.startswith("/") or name.endswith("/") or "//" in name:
        raise ValueError(f"{shown}: must not start or end with '/' or contain '//'")
    if any(part in (".", "..") for part in name.split("/")):
        raise ValueError(f"{shown}: '.' and '..' are not allowed as components")
    if is_id(name.lower()):
        # Everywhere a name is read, 64 hex digits are a context id: such a
        # ref could never be read back by its name.
        raise ValueError(f"{shown}: 64 hex characters always read as a context id; choose another name")
    return name


# --------------------------------------------------------------------------
# the update object
# --------------------------------------------------------------------------


def _target(value: str | None) -> str | None:
    return None if value is None else check_id(value, "ref target")


def _supersedes(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError("supersedes must be a collection of update ids, not one string")
    ids = tuple(sorted({check_id(i, "superseded update id") for i in value}))
    if len(ids) > MAX_SUPERSEDES:
        raise ValueError(f"supersedes: {len(ids)} ids; the limit is {MAX_SUPERSEDES} (use updates_for_write)")
    return ids


def _node_id(value: str) -> str:
    return check_id(value, "node_id")


def _time(value: datetime) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"time must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("time must be timezone-aware (UTC); a naive time is ambiguous")
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(f"time {value.isoformat()} is outside the years 1 to 9999 in UTC") from None


def _fixed_bytes(length: int):
    def check(_inst: object, attr: attrs.Attribute, value: bytes) -> None:
        if type(value) is not bytes or len(value) != length:
            raise ValueError(f"{attr.name} must be {length} bytes")

    return check


@attrs.frozen(kw_only=True)
class RefUpdate:
    """One signed step of a ref: point `name` at `target` (None: delete it).

    Construction checks every field's shape and that `node_id` is the
    SHA-256 of `public_key`, but not the signature (that costs ~0.1 ms):
    an update from `make_update` or `decode_update(verify=True)` is
    authentic; one built by hand is not until `verify_update` passes.
    """

    name: str = attrs.field(converter=check_ref_name)
    target: str | None = attrs.field(converter=_target)
    supersedes: tuple[str, ...] = attrs.field(converter=_supersedes)
    node_id: str = attrs.field(converter=_node_id)
    time: datetime = attrs.field(converter=_time)
    public_key: bytes = attrs.field(validator=_fixed_bytes(_KEY_BYTES))
    signature: bytes = attrs.field(validator=_fixed_bytes(_SIGNATURE_BYTES))

    def __attrs_post_init__(self) -> None:
        if hashlib.sha256(self.public_key).hexdigest() != self.node_id:
            raise ValueError("node_id is not the SHA-256 of public_key")

    @functools.cached_property
    def id(self) -> str:
        """SHA-256 of the canonical bytes, signature and key included."""
        return update_id(self)

    @property
    def is_deletion(self) -> bool:
        return self.target is None


def _pack(raw: Any) -> bytes:
    # As sync.codec packs contexts: shortest forms, `bin` distinct from `str`.
    return msgpack.packb(raw, use_bin_type=True)


def _unsigned_raw(u: RefUpdate) -> list:
    return [
        REF_TAG,
        REF_FORMAT_VERSION,
        u.name,
        None if u.target is None else bytes.fromhex(u.target),
        [bytes.fromhex(i) for i in u.supersedes],
        bytes.fromhex(u.node_id),
        timestamp_us(u.time),
        u.public_key,
    ]


def signing_input(u: RefUpdate) -> bytes:
    """What the signature covers: every field but the signature, labelled."""
    return SIGNING_PREFIX + _pack(_unsigned_raw(u))


def encode_update(u: RefUpdate) -> bytes:
    """The canonical bytes of an update: what is stored, sent and hashed."""
    return _pack([*_unsigned_raw(u), u.signature])


def update_id(u: RefUpdate) -> str:
    return hashlib.sha256(encode_update(u)).hexdigest()


def _raw_public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def make_update(
    *,
    name: str,
    target: str | None,
    supersedes: Iterable[str],
    key: Ed25519PrivateKey,
    time: datetime,
) -> RefUpdate:
    """A new update signed with `key` (the writing node's own key)."""
    public_key = _raw_public_key(key)
    draft = RefUpdate(
        name=name,
        target=target,
        supersedes=supersedes,
        node_id=hashlib.sha256(public_key).hexdigest(),
        time=time,
        public_key=public_key,
        signature=bytes(_SIGNATURE_BYTES),
    )
    return attrs.evolve(draft, signature=key.sign(signing_input(draft)))


def verify_update(u: RefUpdate) -> None:
    """Raise InvalidRefUpdate unless `u.signature` is its writer's signature."""
    try:
        Ed25519PublicKey.from_public_bytes(u.public_key).verify(u.signature, signing_input(u))
    except (InvalidSignature, ValueError):
        raise InvalidRefUpdate(f"ref update for {u.name!r:.80}: the signature does not verify") from None


# --------------------------------------------------------------------------
# decoding (strict, bounded)
# --------------------------------------------------------------------------


def is_ref_update_bytes(data: bytes | bytearray | memoryview) -> bool:
    """True if `data` is (meant to be) a ref update rather than a context.

    Only the tag is looked at, not the version, so that an update of a
    later format is refused as such by `decode_update` instead of being
    misread as a broken context.
    """
    return bytes(data[: len(_REF_PREFIX)]) == _REF_PREFIX


def _expect(cond: bool, field: str, what: str) -> None:
    if not cond:
        raise InvalidRefUpdate(f"ref update {field}: expected {what}")


def _fields(raw: Any) -> tuple:
    # The tag check already fixed an array of nine; this guards the unpacking.
    if not (isinstance(raw, tuple) and len(raw) == 9):
        raise InvalidRefUpdate("ref update: expected an array of 9 items")
    return raw


def _is_id_bytes(value: Any) -> bool:
    return type(value) is bytes and len(value) == _ID_BYTES


def _update_from_raw(raw: Any) -> RefUpdate:
    tag, version, name, target, supersedes, node_id, time_us, public_key, signature = _fields(raw)
    _expect(tag == REF_TAG, "tag", repr(REF_TAG))
    _expect(type(version) is int and version == REF_FORMAT_VERSION, "format", f"format {REF_FORMAT_VERSION}")
    _expect(type(name) is str, "name", "a string")
    _expect(target is None or _is_id_bytes(target), "target", "nil or a 32-byte id")
    _expect(isinstance(supersedes, tuple), "supersedes", "an array")
    _expect(len(supersedes) <= MAX_SUPERSEDES, "supersedes", f"at most {MAX_SUPERSEDES} ids")
    _expect(all(_is_id_bytes(i) for i in supersedes), "supersedes", "32-byte ids")
    _expect(all(a < b for a, b in zip(supersedes, supersedes[1:])), "supersedes", "ids sorted and unique")
    _expect(_is_id_bytes(node_id), "node_id", "a 32-byte id")
    _expect(type(time_us) is int, "time", "an integer")
    _expect(type(public_key) is bytes and len(public_key) == _KEY_BYTES, "public_key", f"{_KEY_BYTES} bytes")
    _expect(type(signature) is bytes and len(signature) == _SIGNATURE_BYTES, "signature", f"{_SIGNATURE_BYTES} bytes")
    _expect(hashlib.sha256(public_key).digest() == node_id, "node_id", "the SHA-256 of public_key")
    try:
        check_ref_name(name)
        when = _EPOCH + time_us * _MICROSECOND
    except ValueError as exc:
        raise InvalidRefUpdate(f"ref update: {exc}") from None
    except OverflowError:
        raise InvalidRefUpdate("ref update time: outside the years 1 to 9999") from None
    return RefUpdate(
        name=name,
        target=None if target is None else target.hex(),
        supersedes=[i.hex() for i in supersedes],
        node_id=node_id.hex(),
        time=when,
        public_key=public_key,
        signature=signature,
    )


def decode_update(data: bytes, *, verify: bool = True) -> RefUpdate:
    """Canonical bytes -> an authentic update, or InvalidRefUpdate.

    With `verify` the bytes must re-encode to themselves (one update, one
    id) and the signature must hold. Pass verify=False only for bytes this
    process checked before (the store): it skips both, the costly part.
    """
    data = bytes(data)
    if len(data) > MAX_REF_UPDATE_BYTES:
        raise InvalidRefUpdate(f"ref update is {len(data)} bytes; the limit is {MAX_REF_UPDATE_BYTES}")
    if not is_ref_update_bytes(data):
        raise InvalidRefUpdate("not a ref update (it does not start with the \"ref\" tag)")
    try:
        update = _update_from_raw(unpack_bounded(data, MAX_REF_UPDATE_BYTES))
    except InvalidRefUpdate:
        raise
    except DecodeError as exc:
        raise InvalidRefUpdate(f"ref update: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise InvalidRefUpdate(f"invalid ref update: {exc}") from None
    if verify:
        if encode_update(update) != data:
            raise InvalidRefUpdate("ref update bytes are not in canonical form")
        verify_update(update)
    return update


# --------------------------------------------------------------------------
# the register
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RefValue:
    """What a reader sees of a ref: the winning target, and any conflict.

    `candidates` are the distinct targets of the frontier's non-deleting
    updates; more than one is a conflict. `target`, `updated`, `node_id`
    and `update_id` are the deterministic winner's (latest time, then
    highest update id), so every node shows the same one.
    """

    name: str
    target: str
    conflict: bool
    candidates: tuple[str, ...]
    updated: datetime
    node_id: str
    update_id: str
    frontier_ids: tuple[str, ...]


def _newest_first_key(u: RefUpdate) -> tuple[datetime, str]:
    return (u.time, u.id)


@attrs.define
class _RefState:
    """One name's updates; `superseded` may name updates not yet held."""

    updates: dict[str, RefUpdate] = attrs.Factory(dict)
    superseded: set[str] = attrs.Factory(set)
    frontier: dict[str, RefUpdate] = attrs.Factory(dict)


class RefTable:
    """The refs a node holds: every update, and each name's frontier.

    Supersession counts only within a name: an update naming another
    ref's update (or an id never seen) supersedes nothing there. An update
    may arrive before the ones it supersedes; they join no frontier when
    they come. Adding is O(ids superseded); reading a value is
    O(frontier).

    Updates are trusted as given: add only what `make_update` or a
    verifying `decode_update` produced.
    """

    def __init__(self, updates: Iterable[RefUpdate] = ()) -> None:
        self._by_id: dict[str, RefUpdate] = {}
        self._refs: dict[str, _RefState] = {}
        for u in updates:
            self.add(u)

    def add(self, update: RefUpdate) -> bool:
        """Hold `update`; False if it was held already."""
        uid = update.id
        if uid in self._by_id:
            return False
        self._by_id[uid] = update
        state = self._refs.setdefault(update.name, _RefState())
        state.updates[uid] = update
        for old in update.supersedes:
            state.superseded.add(old)
            state.frontier.pop(old, None)
        if uid not in state.superseded:
            state.frontier[uid] = update
        return True

    def copy(self) -> RefTable:
        """An independent table holding the same updates (no re-checks)."""
        other = RefTable()
        other._by_id = dict(self._by_id)
        other._refs = {
            name: _RefState(dict(s.updates), set(s.superseded), dict(s.frontier)) for name, s in self._refs.items()
        }
        return other

    def __contains__(self, update_id: object) -> bool:
        return update_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, update_id: str) -> RefUpdate | None:
        return self._by_id.get(update_id)

    def frontier(self, name: str) -> list[RefUpdate]:
        """The updates of `name` that no held update supersedes, newest first."""
        state = self._refs.get(name)
        if state is None:
            return []
        return sorted(state.frontier.values(), key=_newest_first_key, reverse=True)

    def frontier_ids(self, name: str) -> list[str]:
        """The frontier's ids, sorted: what the next set of `name` supersedes."""
        state = self._refs.get(name)
        return sorted(state.frontier) if state is not None else []

    def value(self, name: str) -> RefValue | None:
        """The ref's value, or None if it has no update or only deletions.

        A deletion concurrent with a set loses: the set's target stays
        visible (nothing disappears that someone meant to keep), and the
        next set supersedes both.
        """
        frontier = self.frontier(name)
        live = [u for u in frontier if u.target is not None]
        if not live:
            return None
        winner = live[0]
        candidates = tuple(sorted({u.target for u in live}))  # type: ignore[misc]
        return RefValue(
            name=name,
            target=winner.target,  # type: ignore[arg-type]
            conflict=len(candidates) > 1,
            candidates=candidates,
            updated=winner.time,
            node_id=winner.node_id,
            update_id=winner.id,
            frontier_ids=tuple(self.frontier_ids(name)),
        )

    def names(self, *, include_deleted: bool = False) -> list[str]:
        """Names of the refs that exist (with deleted ones too, if asked), sorted."""
        return sorted(n for n in self._refs if include_deleted or self.value(n) is not None)

    def log(self, name: str) -> list[RefUpdate]:
        """Every held update of `name`, newest first (time, then id)."""
        state = self._refs.get(name)
        if state is None:
            return []
        return sorted(state.updates.values(), key=_newest_first_key, reverse=True)


def supersede_all(table: RefTable, name: str) -> list[str]:
    """The sorted frontier ids a new set (or delete) of `name` must name."""
    return table.frontier_ids(name)


def updates_for_write(
    *,
    table: RefTable,
    name: str,
    target: str | None,
    key: Ed25519PrivateKey,
    time: datetime,
) -> list[RefUpdate]:
    """The update(s) that set `name` to `target` (None: delete) over `table`.

    Nearly always one update superseding the whole frontier. A frontier
    beyond MAX_SUPERSEDES takes a chain, each update superseding the one
    before and the next slice: the last leaves a frontier of itself alone.
    Store and add them in order; the caller does both.
    """
    pending = supersede_all(table, name)
    out: list[RefUpdate] = []
    while True:
        room = MAX_SUPERSEDES - (1 if out else 0)
        batch, pending = pending[:room], pending[room:]
        previous = [out[-1].id] if out else []
        out.append(make_update(name=name, target=target, supersedes=batch + previous, key=key, time=time))
        if not pending:
            return out
