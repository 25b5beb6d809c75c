"""Protocol messages: frozen classes, one tagged union, one converter.

The tag is the frame's type byte (`MessageType`); the payload is a
MessagePack map of the message's fields, produced and checked by the one
cattrs converter of `sync.codec` (model objects inside take their canonical
array forms). Decoding is strict — exact types, no unknown keys — and
bounded: every collection has a maximum length, checked before the message
exists, and the payload itself is bounded by the frame layer.

The seed's request/response set (EXPAND/STREAM/QUERY/PUSH, ACK, ERROR)
keeps its type codes; the sync messages live in 0x10-0x1F.
"""

from __future__ import annotations

import enum
import math
import typing
from typing import Any, ClassVar

import attrs
import cattrs
import msgpack

from sync import codec
from sync.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from sync.model import MemoryAtom, MemoryMolecule, TypeSignature  # noqa: F401 (field types)
from sync.refs import MAX_REF_NAME_BYTES

MAGIC = b"CTXF"
# 1: each side pushes what reconciliation found the other lacks.
# 2: objects move on request: the side that lacks them sends WANT, so a
#    node takes each object once however many neighbours hold it.
PROTOCOL_VERSIONS = (1, 2)
PULL_VERSION = 2

# Ids per WANT/ACK/HAVE: 4096 × 32 bytes = 128 KiB, one frame's worth at
# the default frame size; more ids simply take more messages.
MAX_IDS_PER_MESSAGE = 4096
# Objects per OBJECTS message: many small contexts per message amortise
# the per-message cost; the byte size is bounded by flow control anyway.
MAX_OBJECTS_PER_MESSAGE = 4096
# Atoms per STREAM_CHUNK / QUERY_RESPONSE / EXPAND_RESPONSE. An expansion
# bigger than this is for STREAM, whose chunks are small and flow-controlled.
MAX_ATOMS_PER_MESSAGE = 1_000_000
MAX_PATH_LENGTH = 1_000_000
# Human-readable text in ERROR/GOODBYE: enough for a sentence and an id.
MAX_REASON_LENGTH = 1024
MAX_VERSIONS = 16
# Ages beyond ~3000 years mean "no limit"; bigger values overflow timedelta.
MAX_AGE_SECONDS = 1e11
# A reconciliation message is a short list (sync/reconcile.py validates it).
MAX_RECONCILE_FIELDS = 8
# Items per REFS_RESPONSE: a listing of every ref or one ref's log. Far
# beyond a real cluster's refs; a longer answer is LIMIT_EXCEEDED and the
# client reads the store itself. (Bytes are bounded by the frame layer.)
MAX_REFS_PER_MESSAGE = 65536
# Names one REFS_WATCH may list (nil watches every ref): ~200 KiB of names
# at most, one frame's worth at the default frame size.
MAX_WATCH_NAMES = 1024
# Atoms one REF_APPEND may remove: a forget of that many at once is far
# beyond what a tool asks; 2 MiB of ids, well inside one message.
MAX_APPEND_REMOVALS = 65536
# Characters of RESOLVE's text: a ref name (sync.refs bounds it) or at most
# a full id of 64 hex digits, whichever is longer.
MAX_RESOLVE_TEXT = max(MAX_REF_NAME_BYTES, 64)
# Characters of PEER_FORGET's text: an address (a DNS name is at most 253,
# then a port) or a node id (64 hex digits).
MAX_PEER_TEXT = 300
# Peers one PEER_FORGOTTEN may list: far more than a node keeps rows for
# (inbound ones it has forgotten are pruned at 16; discovery tracks 256).
MAX_PEERS_PER_MESSAGE = 4096
ID_BYTES = 32


class MessageType(enum.IntEnum):
    # the seed's: client -> server
    EXPAND_REQUEST = 0x01
    STREAM_REQUEST = 0x02
    QUERY_REQUEST = 0x03
    PUSH_CONTEXT = 0x04
    STATUS_REQUEST = 0x05
    REF_SET = 0x06
    REFS_REQUEST = 0x07
    REFS_WATCH = 0x08
    REF_APPEND = 0x09
    RESOLVE = 0x0A
    PEER_FORGET = 0x0B
    # sync, both ways
    HELLO = 0x10
    ROOT = 0x11
    RECONCILE = 0x12
    WANT = 0x13
    OBJECTS = 0x14
    CREDIT = 0x15
    PING = 0x16
    PONG = 0x17
    GOODBYE = 0x18
    # the seed's: server -> client
    EXPAND_RESPONSE = 0x81
    STREAM_CHUNK = 0x82
    STREAM_END = 0x83
    QUERY_RESPONSE = 0x84
    ACK = 0x85
    STATUS_RESPONSE = 0x86
    REFS_RESPONSE = 0x87
    REF_CHANGED = 0x88
    RESOLVED = 0x89
    PEER_FORGOTTEN = 0x8A
    ERROR = 0xFF


def _max_len(limit: int):
    def check(_inst: object, attr: attrs.Attribute, value: Any) -> None:
        if len(value) > limit:
            raise ValueError(f"{attr.name}: {len(value)} items, the limit is {limit}")

    return check


def _id(_inst: object, attr: attrs.Attribute, value: bytes) -> None:
    if len(value) != ID_BYTES:
        raise ValueError(f"{attr.name}: an id is {ID_BYTES} bytes, got {len(value)}")


def _ids(limit: int):
    def check(inst: object, attr: attrs.Attribute, value: tuple[bytes, ...]) -> None:
        _max_len(limit)(inst, attr, value)
        for item in value:
            if len(item) != ID_BYTES:
                raise ValueError(f"{attr.name}: an id is {ID_BYTES} bytes, got {len(item)}")

    return check


def _non_negative(_inst: object, attr: attrs.Attribute, value: int | float | None) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"{attr.name} must be >= 0, got {value}")


def _finite(_inst: object, attr: attrs.Attribute, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{attr.name} must be finite")


def _optional_finite(_inst: object, attr: attrs.Attribute, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value <= MAX_AGE_SECONDS):
        raise ValueError(f"{attr.name} must be finite and at most {MAX_AGE_SECONDS:g}")


def _optional_id(_inst: object, attr: attrs.Attribute, value: bytes | None) -> None:
    if value is not None:
        _id(_inst, attr, value)


def _names(limit: int):
    def check(inst: object, attr: attrs.Attribute, value: tuple[str, ...] | None) -> None:
        if value is None:
            return
        _max_len(limit)(inst, attr, value)
        for item in value:
            if len(item) > MAX_REF_NAME_BYTES:
                raise ValueError(f"{attr.name}: a name of {len(item)} characters, the limit is {MAX_REF_NAME_BYTES}")

    return check


def _positive(_inst: object, attr: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"{attr.name} must be >= 1, got {value}")


_frozen = attrs.frozen(kw_only=True)


# ---------------------------------------------------------------- connection


@_frozen
class Hello:
    TYPE: ClassVar = MessageType.HELLO
    magic: bytes
    versions: tuple[int, ...] = attrs.field(validator=_max_len(MAX_VERSIONS))
    node_id: bytes = attrs.field(validator=_id)
    max_frame_size: int
    stream_window: int = attrs.field(validator=_positive)
    connection_window: int = attrs.field(validator=_positive)
    root: bytes = attrs.field(validator=_id)
    count: int = attrs.field(validator=_non_negative)


def make_hello(
    *,
    node_id: bytes,
    root: bytes,
    count: int,
    stream_window: int | None = None,
    connection_window: int | None = None,
) -> Hello:
    """Our HELLO with this version's defaults (frame size, windows)."""
    from sync import flow, frames

    return Hello(
        magic=MAGIC,
        versions=PROTOCOL_VERSIONS,
        node_id=node_id,
        max_frame_size=frames.DEFAULT_MAX_FRAME_SIZE,
        stream_window=flow.DEFAULT_STREAM_WINDOW if stream_window is None else stream_window,
        connection_window=flow.DEFAULT_CONNECTION_WINDOW if connection_window is None else connection_window,
        root=root,
        count=count,
    )


@_frozen
class Root:
    """The sender's node root changed (or is being re-announced)."""

    TYPE: ClassVar = MessageType.ROOT
    root: bytes = attrs.field(validator=_id)
    count: int = attrs.field(validator=_non_negative)


@_frozen
class Credit:
    """`increment` more bytes may be sent on this frame's stream (0: connection)."""

    TYPE: ClassVar = MessageType.CREDIT
    increment: int = attrs.field(validator=_positive)


@_frozen
class Ping:
    TYPE: ClassVar = MessageType.PING
    nonce: int = attrs.field(validator=_non_negative)


@_frozen
class Pong:
    TYPE: ClassVar = MessageType.PONG
    nonce: int = attrs.field(validator=_non_negative)


@_frozen
class Goodbye:
    TYPE: ClassVar = MessageType.GOODBYE
    code: int = attrs.field(validator=_non_negative)
    reason: str = attrs.field(default="", validator=_max_len(MAX_REASON_LENGTH))


@_frozen
class Error:
    """A failed request (its stream), or a fatal connection error (stream 0)."""

    TYPE: ClassVar = MessageType.ERROR
    code: int = attrs.field(validator=_non_negative)
    message: str = attrs.field(validator=_max_len(MAX_REASON_LENGTH))


# ---------------------------------------------------------------- sync


@_frozen
class Reconcile:
    """One round of set reconciliation; `body` is sync.reconcile's wire form."""

    TYPE: ClassVar = MessageType.RECONCILE
    body: tuple[Any, ...] = attrs.field(validator=_max_len(MAX_RECONCILE_FIELDS))


@_frozen
class Want:
    """Please send these objects (protocol version 2). A request of more ids
    than one message holds is several WANTs, `more` on all but the last; the
    sender pushes the whole request once its last WANT is in, parents
    before children."""

    TYPE: ClassVar = MessageType.WANT
    ids: tuple[bytes, ...] = attrs.field(validator=_ids(MAX_IDS_PER_MESSAGE))
    more: bool = False


@_frozen
class Objects:
    """Contexts as (id, canonical bytes) pairs, parents first. Flow-controlled.

    The receiver re-hashes each object and refuses the message if any id
    does not match its bytes. Under version 2 `ids` may be left out (empty):
    an id is the SHA-256 of the bytes, so the receiver derives it, and what
    it asked for is satisfied only by bytes that hash to it (32 bytes per
    object less on the wire: a fifth of a small context).
    """

    TYPE: ClassVar = MessageType.OBJECTS
    objects: tuple[bytes, ...] = attrs.field(validator=_max_len(MAX_OBJECTS_PER_MESSAGE))
    ids: tuple[bytes, ...] = attrs.field(default=(), validator=_ids(MAX_OBJECTS_PER_MESSAGE))
    final: bool = False

    def __attrs_post_init__(self) -> None:
        if self.ids and len(self.ids) != len(self.objects):
            raise ValueError(f"{len(self.ids)} ids for {len(self.objects)} objects")


@_frozen
class Ack:
    """These ids are committed to disk on the sender's side."""

    TYPE: ClassVar = MessageType.ACK
    ids: tuple[bytes, ...] = attrs.field(validator=_ids(MAX_IDS_PER_MESSAGE))


# ---------------------------------------------------------------- local API


@_frozen
class PushContext:
    """One context of a push. A push of many is one stream: every message
    but the last has `more`; the node commits the whole push in one
    transaction when the last arrives, and ACKs its ids (in order, in ACKs
    of at most MAX_IDS_PER_MESSAGE) once committed. An abandoned push
    stores nothing."""

    TYPE: ClassVar = MessageType.PUSH_CONTEXT
    context: bytes
    more: bool = False


# A push of one context (a request that fits one WANT) is sent as before
# `more` existed.
for _cls in (PushContext, Want):
    codec.converter.register_unstructure_hook(
        _cls,
        cattrs.gen.make_dict_unstructure_fn(_cls, codec.converter, more=cattrs.gen.override(omit_if_default=True)),
    )
# OBJECTS with ids (version 1, and pushes to version 1 peers) as before.
codec.converter.register_unstructure_hook(
    Objects,
    cattrs.gen.make_dict_unstructure_fn(Objects, codec.converter, ids=cattrs.gen.override(omit_if_default=True)),
)


@_frozen
class ExpandRequest:
    TYPE: ClassVar = MessageType.EXPAND_REQUEST
    id: bytes = attrs.field(validator=_id)
    min_relevance: float = attrs.field(default=0.0, validator=[_finite, _non_negative])
    max_tokens: int | None = attrs.field(default=None, validator=_non_negative)


@_frozen
class ExpandResponse:
    TYPE: ClassVar = MessageType.EXPAND_RESPONSE
    id: bytes = attrs.field(validator=_id)
    atoms: tuple[MemoryAtom, ...] = attrs.field(validator=_max_len(MAX_ATOMS_PER_MESSAGE))
    molecules: tuple[MemoryMolecule, ...] = attrs.field(validator=_max_len(MAX_ATOMS_PER_MESSAGE))
    expansion_path: tuple[bytes, ...] = attrs.field(validator=_ids(MAX_PATH_LENGTH))
    total_tokens: int = attrs.field(validator=_non_negative)
    type_summary: dict[str, int]
    atom_root: bytes = attrs.field(validator=_id)


@_frozen
class StreamRequest:
    TYPE: ClassVar = MessageType.STREAM_REQUEST
    id: bytes = attrs.field(validator=_id)
    relevance_threshold: float = attrs.field(default=0.0, validator=[_finite, _non_negative])
    chunk_size: int = attrs.field(default=10, validator=_positive)
    max_tokens_per_chunk: int = attrs.field(default=500, validator=_positive)


@_frozen
class StreamChunk:
    """The seed's ExpansionChunk on the wire. Flow-controlled."""

    TYPE: ClassVar = MessageType.STREAM_CHUNK
    chunk_id: int = attrs.field(validator=_non_negative)
    atoms: tuple[MemoryAtom, ...] = attrs.field(validator=_max_len(MAX_ATOMS_PER_MESSAGE))
    is_final: bool
    cumulative_tokens: int = attrs.field(validator=_non_negative)
    progress: float = attrs.field(validator=_finite)


@_frozen
class StreamEnd:
    TYPE: ClassVar = MessageType.STREAM_END
    status: str = attrs.field(default="complete", validator=_max_len(MAX_REASON_LENGTH))


# Characters of QUERY_REQUEST text: sync.query.MAX_TEXT_LENGTH.
MAX_QUERY_TEXT = 4096


@_frozen
class QueryRequest:
    TYPE: ClassVar = MessageType.QUERY_REQUEST
    id: bytes = attrs.field(validator=_id)
    type_filter: TypeSignature | None = None
    min_relevance: float = attrs.field(default=0.0, validator=[_finite, _non_negative])
    max_age_seconds: float | None = attrs.field(default=None, validator=[_non_negative, _optional_finite])
    limit: int | None = attrs.field(default=None, validator=_non_negative)
    # Full-text filter (sync/fulltext.py); nil or blank: none.
    text: str | None = attrs.field(default=None, validator=attrs.validators.optional(_max_len(MAX_QUERY_TEXT)))


# Without text, QUERY_REQUEST is sent as before `text` existed: a daemon
# that predates it (it refuses unknown keys) still answers such a query.
codec.converter.register_unstructure_hook(
    QueryRequest,
    cattrs.gen.make_dict_unstructure_fn(
        QueryRequest, codec.converter, text=cattrs.gen.override(omit_if_default=True)
    ),
)


@_frozen
class QueryResponse:
    TYPE: ClassVar = MessageType.QUERY_RESPONSE
    atoms: tuple[MemoryAtom, ...] = attrs.field(validator=_max_len(MAX_ATOMS_PER_MESSAGE))


@_frozen
class StatusRequest:
    TYPE: ClassVar = MessageType.STATUS_REQUEST


@_frozen
class StatusResponse:
    """The node's status document (schema-versioned JSON object, design.md)."""

    TYPE: ClassVar = MessageType.STATUS_RESPONSE
    status: dict[str, Any]


@_frozen
class RefSet:
    """Point ref `name` at context `target` (nil: delete the ref). The node
    signs the update with its own key; answered by ACK with the update ids.

    The name is only bounded here: the server checks it (sync.refs) and
    answers BAD_REQUEST, so a bad name costs the request, not the connection.
    """

    TYPE: ClassVar = MessageType.REF_SET
    name: str = attrs.field(validator=_max_len(MAX_REF_NAME_BYTES))
    target: bytes | None = attrs.field(validator=_optional_id)


@_frozen
class RefsRequest:
    """Every ref's value (`name` nil), one ref's value, or (`log`) every
    update of `name`, newest first. Answered by REFS_RESPONSE."""

    TYPE: ClassVar = MessageType.REFS_REQUEST
    name: str | None = attrs.field(default=None, validator=attrs.validators.optional(_max_len(MAX_REF_NAME_BYTES)))
    log: bool = False


@_frozen
class RefsResponse:
    """Plain maps, as `ctxfs ref list|show|log --json` prints them."""

    TYPE: ClassVar = MessageType.REFS_RESPONSE
    refs: tuple[dict[str, Any], ...] = attrs.field(validator=_max_len(MAX_REFS_PER_MESSAGE))


@_frozen
class RefsWatch:
    """Watch refs `names` (nil: every ref). Answered on its stream by a
    REFS_RESPONSE (the watched refs that exist now, the watch's starting
    point), then one REF_CHANGED per change, until the client abandons the
    stream (ERROR NO_ERROR) or leaves."""

    TYPE: ClassVar = MessageType.REFS_WATCH
    names: tuple[str, ...] | None = attrs.field(default=None, validator=_names(MAX_WATCH_NAMES))


@_frozen
class RefChanged:
    """The value of a watched ref changed: `old` is the target the watcher
    was last told (nil: the ref did not exist), `new` the target now (nil:
    deleted); `conflict` and `candidates` as in a ref's value. A control
    message: changes are coalesced per name by the sender (section 4)."""

    TYPE: ClassVar = MessageType.REF_CHANGED
    name: str = attrs.field(validator=_max_len(MAX_REF_NAME_BYTES))
    old: bytes | None = attrs.field(validator=_optional_id)
    new: bytes | None = attrs.field(validator=_optional_id)
    conflict: bool = False
    candidates: tuple[bytes, ...] = attrs.field(default=(), validator=_ids(MAX_IDS_PER_MESSAGE))



@_frozen
class RefAppend:
    """Append one delta to ref `name` and move the ref, atomically: the node
    builds a context whose base is the ref's value (none if the ref does not
    exist), with these atoms added, these atom ids removed and this
    compression_metadata, stores it and points the ref at it, all under its
    ref-write lock, so concurrent appends never lose one another's atoms.
    Answered by ACK: the new context's id, then the ref update id(s).
    Flow-controlled, like PUSH_CONTEXT: it carries atoms."""

    TYPE: ClassVar = MessageType.REF_APPEND
    name: str = attrs.field(validator=_max_len(MAX_REF_NAME_BYTES))
    delta_atoms: tuple[MemoryAtom, ...] = attrs.field(default=(), validator=_max_len(MAX_ATOMS_PER_MESSAGE))
    removed_hashes: tuple[bytes, ...] = attrs.field(default=(), validator=_ids(MAX_APPEND_REMOVALS))
    metadata: dict[str, Any] = attrs.field(factory=dict)

@_frozen
class Resolve:
    """The context id that `text` names, as the CLI reads an ID: a full id
    (held as a context), a ref that exists (its value, the winner if in
    conflict), or a unique prefix of 4+ hex digits of a context id.
    Answered by RESOLVED, or ERROR: NOT_FOUND, BAD_REQUEST (not an id, ref
    name or prefix; an ambiguous prefix, its candidates named)."""

    TYPE: ClassVar = MessageType.RESOLVE
    text: str = attrs.field(validator=_max_len(MAX_RESOLVE_TEXT))


@_frozen
class Resolved:
    TYPE: ClassVar = MessageType.RESOLVED
    id: bytes = attrs.field(validator=_id)


@_frozen
class PeerForget:
    """Drop from the node's peer table the peers that `peer` names, and stop
    dialling them: a node id or a unique prefix of one (4+ hex digits), or
    an address as status shows it. Answered by PEER_FORGOTTEN, or ERROR:
    NOT_FOUND (no peer matches), BAD_REQUEST (one of them is connected; a
    prefix of several peers' ids)."""

    TYPE: ClassVar = MessageType.PEER_FORGET
    peer: str = attrs.field(validator=_max_len(MAX_PEER_TEXT))


@_frozen
class PeerForgotten:
    """The peers dropped: maps `{node_id (64 hex, or nil if it never
    connected), address}`."""

    TYPE: ClassVar = MessageType.PEER_FORGOTTEN
    peers: tuple[dict[str, Any], ...] = attrs.field(validator=_max_len(MAX_PEERS_PER_MESSAGE))


Message = (
    Hello | Root | Credit | Ping | Pong | Goodbye | Error | Reconcile | Want | Objects | Ack
    | PushContext | ExpandRequest | ExpandResponse | StreamRequest | StreamChunk | StreamEnd
    | QueryRequest | QueryResponse | StatusRequest | StatusResponse | RefSet | RefsRequest | RefsResponse
    | RefsWatch | RefChanged | RefAppend | Resolve | Resolved | PeerForget | PeerForgotten
)

MESSAGE_CLASSES: dict[MessageType, type] = {cls.TYPE: cls for cls in Message.__args__}

# Messages whose payload bytes count against the flow-control windows: the
# ones that carry bulk data. Control messages are never blocked by credit.
FLOW_CONTROLLED = frozenset({
    MessageType.OBJECTS, MessageType.STREAM_CHUNK, MessageType.PUSH_CONTEXT, MessageType.REF_APPEND,
})


# ---------------------------------------------------------------- encoding

_converter = codec.converter


_converter.register_structure_hook_func(lambda t: t == dict[str, Any], lambda raw, _: _json_map(raw))


def _is_homogeneous_tuple(t: Any) -> bool:
    args = typing.get_args(t)
    return typing.get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis


def _tuple_hook(t: Any):
    # cattrs would iterate any iterable (a map's keys, a string's letters);
    # the wire has arrays, and only arrays are accepted.
    item = typing.get_args(t)[0]
    structure = None if item is Any else _converter.get_structure_hook(item)

    def hook(raw: Any, _type: Any) -> tuple:
        if not isinstance(raw, (list, tuple)):
            raise TypeError(f"expected an array, got {type(raw).__name__}")
        return tuple(raw) if structure is None else tuple(structure(x, item) for x in raw)

    def exact_hook(raw: Any, _type: Any) -> tuple:
        # An array of ids (WANT, ACK, a reconciliation's ids) holds up to
        # 100k of them: their types checked in one pass in C, not a call each.
        if not isinstance(raw, (list, tuple)):
            raise TypeError(f"expected an array, got {type(raw).__name__}")
        if not set(map(type, raw)) <= {item}:
            wrong = next(x for x in raw if type(x) is not item)
            raise TypeError(f"expected {item.__name__}, got {type(wrong).__name__}")
        return tuple(raw)

    # Exact types the converter takes as they are (codec._strict): no conversion to make.
    return exact_hook if item in (bytes, str, int, bool) else hook


_converter.register_structure_hook_factory(_is_homogeneous_tuple, _tuple_hook)


def _json_map(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise TypeError("expected a map")
    return codec.canonical_value(codec.thaw(raw), "status")


# Messages whose fields are all checked at construction (their bulk is model
# objects, validated when built); re-checking them would rebuild every atom.
_CHECKED_AT_CONSTRUCTION = (MessageType.EXPAND_RESPONSE, MessageType.QUERY_RESPONSE)


def encode_payload(message: Message) -> bytes:
    """The payload bytes; LocalProtocolError if the peer could not decode them."""
    try:
        raw = _converter.unstructure(message)
        if message.TYPE not in _CHECKED_AT_CONSTRUCTION:
            # What we send must be what the peer accepts: a field of the
            # wrong type is our bug, not a reason for the peer to hang up.
            _converter.structure(raw, type(message))
        return msgpack.packb(raw, use_bin_type=True)
    except Exception as exc:  # cattrs' validation groups, msgpack's and attrs' errors
        raise LocalProtocolError(ErrorCode.INTERNAL, f"cannot encode {type(message).__name__}: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        try:
            return "; ".join(cattrs.transform_error(exc))
        except Exception:  # noqa: BLE001 - formatting must never mask the real error
            pass
    return str(exc)


def decode_payload(msg_type: int, payload: bytes) -> Message:
    """Payload bytes of a frame of `msg_type` -> message, or RemoteProtocolError."""
    try:
        cls = MESSAGE_CLASSES[MessageType(msg_type)]
    except ValueError:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"unknown message type {msg_type:#04x}") from None
    try:
        raw = msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:  # msgpack raises a zoo: ValueError, TypeError, its own classes
        raise RemoteProtocolError(ErrorCode.DECODE_ERROR, f"{cls.TYPE.name}: not MessagePack ({exc})") from None
    if not isinstance(raw, dict):
        raise RemoteProtocolError(ErrorCode.DECODE_ERROR, f"{cls.TYPE.name}: payload is not a map")
    try:
        return _converter.structure(raw, cls)
    except Exception as exc:  # cattrs wraps field errors in exception groups
        raise RemoteProtocolError(ErrorCode.DECODE_ERROR, f"{cls.TYPE.name}: {_describe(exc)}"[:MAX_REASON_LENGTH]) from None
