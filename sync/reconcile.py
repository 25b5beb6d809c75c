"""Set reconciliation between two nodes' `IdSet`s, as a sans-IO state machine.

Range-based reconciliation (as Negentropy does) over the prefixes of the
`sync.idset` trie. The initiator opens with its root; equal roots end the
session in that one round trip. Otherwise each message answers the previous
one prefix by prefix, with the cheapest of: nothing (count and fingerprint
agree); all our ids (`have`, the peer holds none there); the one id whose
removal makes our hash equal theirs (trial removal, when we hold exactly one
more); our ids outright (`IdList`, answered by `have` + a `Need` bitmap); our
own fingerprint back ("echo": the peer can do one of the last two cheaper);
or a `Split` into the 16 sub-prefixes. Each id found lands in `to_send` on
the side holding it and in `to_request` on the other. Cost follows the
difference, not the set: an equal prefix costs one fingerprint.

Fingerprints below the root are cut to FP_BYTES of a SHA-256 keyed by both
roots and the initiator's nonce. A cut can only hide a difference, so before
ending a side checks its result against the peer's full root; on a mismatch
it restarts once with the full 32-byte node hashes.

A peer may only answer prefixes we asked about (once each), echo once per
prefix, never reopen a prefix settled in full, and must bring something new
in each message: a hostile peer cannot loop, and the work it can cause is
bounded by our set size and the ids it actually sends. The index must not
change during a session (checked). Design notes: docs/reconcile-notes.md.
"""

from __future__ import annotations

import hashlib
import operator
from collections import deque
from collections.abc import Iterable

import attrs

from sync.idset import ID_SIZE, LEAF_MAX, MAX_DEPTH, IdSet, leaf_hash

__all__ = [
    "FP_BYTES", "IDLIST_MAX", "MAX_COUNT", "MAX_ITEMS", "MAX_PAYLOAD", "SEARCH_MAX", "Fingerprint", "IdList",
    "Item", "Message", "Need", "ReconcileError", "ReconcileStart", "ReconcileStateError", "ReconcileStep",
    "Reconciler", "Split", "from_wire", "to_wire", "validate",
]

# First-pass fingerprint width. 48 bits: a false "equal" is a 2**-48 event
# per comparison (keyed per session, so it cannot be prepared), and costs the
# full-width pass, never a wrong result. 8 bytes would cost 15 % more bytes
# and miss the n=100k, d=1000 target (96 KB).
FP_BYTES = 6
# Second-pass width: the node hash itself.
WIDE = 32
# Send ids outright at or below this many: 4 ids (128 bytes) cost less than a
# Split (16 x 7 bytes + counts) and the round trip after it.
IDLIST_MAX = 4
# Trial removal needs the candidate set to be a single leaf.
SEARCH_MAX = LEAF_MAX + 1
# Per-message bounds. Payload = fingerprint, id and bitmap bytes; the rest of
# an item (prefix, counts, headers) is under 100 bytes, so a message encodes
# to under 1 MB (512 KiB + 4096 x 100 B): one default-size frame.
MAX_ITEMS = 4096
MAX_PAYLOAD = 512 * 1024
# Largest set size a peer may claim (2**26 = 67M contexts, far beyond a node's
# store); it also bounds how many ids a peer can make us remember.
MAX_COUNT = 1 << 26
MAX_NONCE = 32

_KEY_TAG = b"ctxfs/reconcile/key/v1\x00"
_HEX = "0123456789abcdef"


class ReconcileError(ValueError):
    """The peer sent something malformed or inconsistent (its fault)."""


class ReconcileStateError(RuntimeError):
    """This side was misused: wrong call order, or the index changed mid-session."""


@attrs.frozen(kw_only=True)
class Fingerprint:
    """'I hold `count` ids under `prefix`, with this fingerprint' (empty when count is 0)."""

    prefix: str
    count: int
    fingerprint: bytes


@attrs.frozen(kw_only=True)
class Split:
    """A Fingerprint for each of the 16 sub-prefixes of `prefix`."""

    prefix: str
    counts: tuple[int, ...]
    fingerprints: tuple[bytes, ...]


@attrs.frozen(kw_only=True)
class IdList:
    """'These are all my ids under `prefix`' (sorted)."""

    prefix: str
    ids: tuple[bytes, ...]


@attrs.frozen(kw_only=True)
class Need:
    """Answer to an IdList: bit i set means 'I lack your i-th id'."""

    prefix: str
    bitmap: bytes


Item = Fingerprint | Split | IdList | Need


@attrs.frozen(kw_only=True)
class ReconcileStart:
    """The initiator's first message."""

    root: bytes
    count: int
    nonce: bytes = b""


@attrs.frozen(kw_only=True)
class ReconcileStep:
    """Every later message, both ways. `root`/`count` only in the responder's first.

    `have`: ids the sender holds and the receiver lacks. `more`: the sender has
    more queued. `done`: the last message of the session. `restart`: drop all
    results and start the full-width pass.
    """

    items: tuple[Item, ...] = ()
    have: tuple[bytes, ...] = ()
    root: bytes | None = None
    count: int | None = None
    more: bool = False
    done: bool = False
    restart: bool = False


Message = ReconcileStart | ReconcileStep


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ReconcileError(what)


def _is_count(x: object) -> bool:
    return type(x) is int and 0 <= x <= MAX_COUNT


def _check_ids(ids: object, prefix: str) -> None:
    # A peer's whole id list can come in one message (~3 us an id checked
    # one by one, in Python): each rule is one pass in C.
    _check(type(ids) is tuple, "ids must be a tuple")
    _check(set(map(type, ids)) <= {bytes} and set(map(len, ids)) <= {ID_SIZE}, "an id must be 32 bytes")
    _check(all(map(operator.lt, ids, ids[1:])), "ids must be sorted and distinct")
    if prefix and ids:
        # The ids under a prefix are one range of the order: sorted ids are
        # all inside it if the first and the last are.
        _check(ids[0].hex().startswith(prefix) and ids[-1].hex().startswith(prefix), "id outside its prefix")


def validate(msg: object) -> None:
    """Check a message's shape and bounds; raise ReconcileError if it is malformed."""
    if type(msg) is ReconcileStart:
        _check(type(msg.root) is bytes and len(msg.root) == ID_SIZE, "root must be 32 bytes")
        _check(_is_count(msg.count), "bad count")
        _check(type(msg.nonce) is bytes and len(msg.nonce) <= MAX_NONCE, "bad nonce")
        return
    _check(type(msg) is ReconcileStep, "not a reconciliation message")
    _check((msg.root is None) == (msg.count is None), "root and count come together")
    if msg.root is not None:
        _check(type(msg.root) is bytes and len(msg.root) == ID_SIZE, "root must be 32 bytes")
        _check(_is_count(msg.count), "bad count")
    _check(all(type(f) is bool for f in (msg.more, msg.done, msg.restart)), "bad flags")
    _check(type(msg.items) is tuple and len(msg.items) <= MAX_ITEMS, "too many items")
    _check_ids(msg.have, "")
    total, last = ID_SIZE * len(msg.have), None
    for item in msg.items:
        _check(type(item) in (Fingerprint, Split, IdList, Need), "not an item")
        p = item.prefix
        _check(type(p) is str and len(p) <= MAX_DEPTH and all(c in _HEX for c in p), "bad prefix")
        _check(last is None or p > last, "items out of order")
        last = p
        if type(item) is Fingerprint:
            _check(_is_count(item.count) and type(item.fingerprint) is bytes, "bad fingerprint")
            _check(len(item.fingerprint) in ((0,) if item.count == 0 else (FP_BYTES, WIDE)), "bad fingerprint")
        elif type(item) is Split:
            _check(len(p) < MAX_DEPTH, "cannot split a full id")
            _check(type(item.counts) is tuple and len(item.counts) == 16, "a split has 16 counts")
            _check(all(_is_count(c) for c in item.counts), "bad count")
            _check(type(item.fingerprints) is tuple and len(item.fingerprints) == 16, "bad split")
            pairs = tuple(zip(item.counts, item.fingerprints))
            _check(all(type(f) is bytes and (len(f) > 0) == (c > 0) for c, f in pairs), "bad split fingerprints")
            widths = {len(f) for c, f in pairs if c}
            _check(len(widths) <= 1 and widths <= {FP_BYTES, WIDE}, "bad split fingerprints")
        elif type(item) is IdList:
            _check(type(item.ids) is tuple and 1 <= len(item.ids) <= LEAF_MAX, "bad id list")
            _check_ids(item.ids, p)
        else:
            bitmap = item.bitmap
            _check(type(bitmap) is bytes and 1 <= len(bitmap) <= (LEAF_MAX + 7) // 8, "bad bitmap")
        total += _payload(item)
    _check(total <= MAX_PAYLOAD, "message too large")


def _payload(item: Item) -> int:
    if type(item) is Fingerprint:
        return len(item.fingerprint)
    if type(item) is Split:
        return sum(len(f) for f in item.fingerprints)
    if type(item) is IdList:
        return ID_SIZE * len(item.ids)
    return len(item.bitmap)


def to_wire(msg: Message) -> list:
    """Compact list form for msgpack: no field names, ids and fingerprints raw."""
    if type(msg) is ReconcileStart:
        return [0, msg.root, msg.count, msg.nonce]
    flags = msg.more | msg.done << 1 | msg.restart << 2
    return [1, flags, msg.root, msg.count, [_item_to_wire(i) for i in msg.items], b"".join(msg.have)]


def _item_to_wire(item: Item) -> list:
    if type(item) is Fingerprint:
        return [0, item.prefix, item.count, item.fingerprint]
    if type(item) is Split:
        return [1, item.prefix, list(item.counts), b"".join(item.fingerprints)]
    if type(item) is IdList:
        return [2, item.prefix, b"".join(item.ids)]
    return [3, item.prefix, item.bitmap]


def _split_ids(blob: object, limit: int) -> tuple[bytes, ...]:
    _check(type(blob) is bytes and len(blob) % ID_SIZE == 0 and len(blob) <= limit * ID_SIZE, "bad ids")
    return tuple(blob[i : i + ID_SIZE] for i in range(0, len(blob), ID_SIZE))


def from_wire(obj: object) -> Message:
    """Inverse of `to_wire`, for anything msgpack may decode; validated."""
    _check(type(obj) in (list, tuple) and len(obj) > 0 and type(obj[0]) is int, "not a reconciliation message")
    if obj[0] == 0 and len(obj) == 4:
        msg: Message = ReconcileStart(root=obj[1], count=obj[2], nonce=obj[3])
    elif obj[0] == 1 and len(obj) == 6:
        flags, root, count, items, have = obj[1:]
        _check(type(flags) is int and 0 <= flags < 8, "bad flags")
        _check(type(items) in (list, tuple) and len(items) <= MAX_ITEMS, "too many items")
        msg = ReconcileStep(items=tuple(_item_from_wire(i) for i in items),
                            have=_split_ids(have, MAX_PAYLOAD // ID_SIZE),
                            root=root, count=count, more=bool(flags & 1), done=bool(flags & 2),
                            restart=bool(flags & 4))
    else:
        raise ReconcileError("not a reconciliation message")
    validate(msg)
    return msg


def _item_from_wire(obj: object) -> Item:
    _check(type(obj) in (list, tuple) and len(obj) in (3, 4) and type(obj[0]) is int, "bad item")
    kind, prefix = obj[0], obj[1]
    if kind == 0 and len(obj) == 4:
        return Fingerprint(prefix=prefix, count=obj[2], fingerprint=obj[3])
    if kind == 1 and len(obj) == 4:
        counts, blob = obj[2], obj[3]
        _check(type(counts) in (list, tuple) and len(counts) == 16 and all(_is_count(c) for c in counts)
               and type(blob) is bytes, "bad split")
        nonzero = sum(1 for c in counts if c)
        width = len(blob) // nonzero if nonzero else 0
        _check(len(blob) == width * nonzero and (width or not nonzero), "bad split fingerprints")
        chunks = iter([blob[at : at + width] for at in range(0, len(blob), width or 1)])
        fps = tuple(next(chunks) if c else b"" for c in counts)
        return Split(prefix=prefix, counts=tuple(counts), fingerprints=fps)
    if kind == 2 and len(obj) == 3:
        return IdList(prefix=prefix, ids=_split_ids(obj[2], LEAF_MAX))
    if kind == 3 and len(obj) == 3:
        return Need(prefix=prefix, bitmap=obj[2])
    raise ReconcileError("bad item")


class Reconciler:
    """One side of one reconciliation session over `index`.

    Initiator: send `initial_message()`, then pass each reply to `receive()`
    and send what it returns, until it returns None. Responder: the same
    without `initial_message()`. Results, final once `done`: `to_send` (ours
    the peer lacks) and `to_request` (the peer's we lack). `nonce` (initiator
    only) should be fresh random bytes, e.g. os.urandom(16): it keys the cut
    fingerprints so nobody can prepare collisions for them in advance.
    """

    def __init__(self, index: IdSet, *, initiator: bool, nonce: bytes = b"") -> None:
        if type(nonce) is not bytes or len(nonce) > MAX_NONCE:
            raise ValueError(f"nonce must be at most {MAX_NONCE} bytes")
        self._index = index
        self._initiator = initiator
        self._nonce = nonce
        self._version = index.version
        self._root, self._count = index.root(), len(index)
        self._peer_root, self._peer_count = b"", 0
        self._key = b""
        self._width = FP_BYTES
        self.passes = 1
        self._started = False
        self._await_root = initiator  # the responder's first step carries its root
        self._done = False
        self._sent_more = False
        self._to_send: set[bytes] = set()
        self._to_request: set[bytes] = set()
        self._out: deque[Item] = deque()
        self._out_have: deque[bytes] = deque()
        self._open: dict[str, bool] = {}  # prefixes the peer may answer -> "answer is a Need"
        self._echoed: set[str] = set()
        self._handed: set[str] = set()  # prefixes whose ids were settled in full
        self._stale: set[bytes] = set()  # ids the peer offered that we hold
        self.messages_sent = 0
        self.messages_received = 0

    @property
    def done(self) -> bool:
        return self._done

    @property
    def peer_root(self) -> bytes | None:
        """The root the peer reported for this session (None until known)."""
        return self._peer_root or None

    @property
    def to_send(self) -> frozenset[bytes]:
        return frozenset(self._to_send)

    @property
    def to_request(self) -> frozenset[bytes]:
        return frozenset(self._to_request)

    def initial_message(self) -> ReconcileStart:
        if not self._initiator or self._started:
            raise ReconcileStateError("initial_message() is for the initiator, once")
        self._started = True
        self._open[""] = False
        return self._sent(ReconcileStart(root=self._root, count=self._count, nonce=self._nonce))

    def receive(self, msg: Message) -> ReconcileStep | None:
        """Process one message from the peer; return the reply, or None when finished."""
        if self._done or (self._initiator and not self._started):
            raise ReconcileStateError("receive() before initial_message() or after the end")
        if self._index.version != self._version:
            raise ReconcileStateError("the index changed during reconciliation")
        validate(msg)
        self.messages_received += 1
        if type(msg) is ReconcileStart:
            _check(not self._started, "unexpected ReconcileStart")
            self._started = True
            self._set_peer(msg.root, msg.count, msg.nonce)
            if msg.root == self._root:
                _check(msg.count == self._count, "equal roots, different counts")
                self._done = True
                return self._sent(ReconcileStep(root=self._root, count=self._count, done=True))
            self._decide("", msg.count, msg.root, WIDE)
            return self._reply(peer_more=False)
        _check(self._started, "expected ReconcileStart")
        _check((msg.root is not None) == self._await_root, "root belongs in the responder's first step")
        if self._await_root:
            self._await_root = False
            self._set_peer(msg.root, msg.count, self._nonce)
        if msg.restart:
            _check(self.passes == 1 and not self._out and not self._out_have, "unexpected restart")
            self._begin_pass_two()
            self._open[""] = False
        _check(bool(msg.items or msg.have or msg.done or self._sent_more), "a step must bring something")
        for item in msg.items:
            wants_need = self._open.pop(item.prefix, None)
            asked = wants_need is not None and wants_need == (type(item) is Need)
            _check(asked, f"unasked item at {item.prefix!r}")
            self._handle(item)
        # Sorted and distinct (validate): a repeat can only be of an earlier message.
        have = msg.have
        _check(self._to_request.isdisjoint(have) and self._stale.isdisjoint(have), "peer sent an id twice")
        held = [x for x in have if x in self._index] if len(self._index) else []
        if held:
            # Only a cut fingerprint matching by chance (a search) does
            # this; the full-width pass cannot. Remember it: it voids pass 1.
            _check(self.passes == 1, "peer sent an id we have")
            self._stale.update(held)
            have = set(have).difference(held)
        self._to_request.update(have)
        _check(len(self._to_request) <= self._peer_count, "peer sent more ids than it holds")
        if msg.done:
            _check(not self._out and not self._out_have, "peer ended with questions open")
            _check(self._verified(), "results do not match the peer's root")
            self._done = True
            return None
        return self._reply(peer_more=msg.more)

    # -- the decision for one prefix -----------------------------------------------

    def _handle(self, item: Item) -> None:
        if type(item) is Fingerprint:
            self._decide(item.prefix, item.count, item.fingerprint, self._width)
        elif type(item) is Split:
            mine = self._index.children(item.prefix)
            for v in range(16):
                self._decide(item.prefix + _HEX[v], item.counts[v], item.fingerprints[v], self._width, mine[v])
        elif type(item) is IdList:
            self._answer_ids(item)
        else:
            self._apply_need(item)

    def _decide(self, p: str, cp: int, fpp: bytes, width: int, mine: tuple[int, bytes] | None = None) -> None:
        _check(cp == 0 or len(fpp) == width, "fingerprint of the wrong width")
        self._check_not_handed(p)
        cm, h = mine if mine is not None else self._index.summary(p)
        if cm == cp and (cm == 0 or self._fp(h, width) == fpp):
            return
        if cp == 0:
            self._handed.add(p)
            self._offer(self._index.ids(p))
        elif cm == 0:
            self._ask(Fingerprint(prefix=p, count=0, fingerprint=b""))
        elif cm == cp + 1 and cm <= SEARCH_MAX and (found := self._search(p, fpp, width)):
            self._offer((found,))
        elif p not in self._echoed and cp == cm + 1 and cp <= SEARCH_MAX:
            self._echo(p, cm, h)  # the peer may find its one extra id by search
        elif cm <= IDLIST_MAX or len(p) == MAX_DEPTH:
            self._ask(IdList(prefix=p, ids=tuple(self._index.ids(p))), need=True)
        elif p not in self._echoed and cp <= IDLIST_MAX:
            self._echo(p, cm, h)  # the peer's IdList is cheaper than our Split
        else:
            kids = self._index.children(p)
            self._out.append(Split(prefix=p, counts=tuple(c for c, _ in kids),
                                   fingerprints=tuple(self._fp(k, self._width) if c else b"" for c, k in kids)))
            self._open.update((p + _HEX[v], False) for v, (c, _) in enumerate(kids) if c)

    def _echo(self, p: str, cm: int, h: bytes) -> None:
        self._echoed.add(p)  # once per prefix, so a prefix cannot bounce forever
        self._ask(Fingerprint(prefix=p, count=cm, fingerprint=self._fp(h, self._width)))

    def _search(self, p: str, target: bytes, width: int) -> bytes | None:
        """Our one id under `p` whose removal gives the peer's fingerprint, if any."""
        blob = b"".join(self._index.ids(p))
        for at in range(0, len(blob), ID_SIZE):
            if self._fp(leaf_hash(blob[:at] + blob[at + ID_SIZE :]), width) == target:
                return blob[at : at + ID_SIZE]
        return None

    def _answer_ids(self, item: IdList) -> None:
        self._check_not_handed(item.prefix)
        self._handed.add(item.prefix)
        theirs = set(item.ids)
        self._offer(x for x in self._index.ids(item.prefix) if x not in theirs)
        bits = 0
        for i, x in enumerate(item.ids):
            if x not in self._index:
                self._to_request.add(x)
                bits |= 1 << i
        if bits:
            self._out.append(Need(prefix=item.prefix, bitmap=bits.to_bytes((len(item.ids) + 7) // 8, "little")))

    def _apply_need(self, item: Need) -> None:
        ours = list(self._index.ids(item.prefix))
        bits = int.from_bytes(item.bitmap, "little")
        _check(len(item.bitmap) == (len(ours) + 7) // 8 and 0 < bits < 1 << len(ours), "bitmap does not fit")
        self._to_send.update(x for i, x in enumerate(ours) if bits >> i & 1)

    def _check_not_handed(self, p: str) -> None:
        if self._handed:
            _check(not any(p[:i] in self._handed for i in range(len(p) + 1)), f"{p!r} is already settled")

    def _offer(self, ids: Iterable[bytes]) -> None:
        """Send these ids (distinct: from the index) unless offered already;
        a whole index offered to a newcomer is two passes in C."""
        fresh = [x for x in ids if x not in self._to_send] if self._to_send else list(ids)
        self._to_send.update(fresh)
        self._out_have.extend(fresh)

    def _ask(self, item: Item, need: bool = False) -> None:
        self._out.append(item)
        self._open[item.prefix] = need

    def _fp(self, node_hash: bytes, width: int) -> bytes:
        if width == WIDE:
            return node_hash
        return hashlib.sha256(self._key + node_hash).digest()[:FP_BYTES]

    # -- session --------------------------------------------------------------------

    def _set_peer(self, root: bytes, count: int, nonce: bytes) -> None:
        self._peer_root, self._peer_count = root, count
        roots = self._root + root if self._initiator else root + self._root
        self._key = hashlib.sha256(_KEY_TAG + bytes([len(nonce)]) + nonce + roots).digest()

    def _begin_pass_two(self) -> None:
        self.passes, self._width = 2, WIDE
        for container in (self._to_send, self._to_request, self._out, self._out_have,
                          self._open, self._echoed, self._handed, self._stale):
            container.clear()

    def _verified(self) -> bool:
        if self._stale or self._count - len(self._to_send) + len(self._to_request) != self._peer_count:
            return False
        return self._index.root_with(add=self._to_request, remove=self._to_send) == self._peer_root

    def _reply(self, *, peer_more: bool) -> ReconcileStep:
        restart = False
        items, have = self._take()
        if not (self._out or self._out_have or peer_more or any(type(i) is not Need for i in items)):
            if not self._verified():
                _check(self.passes == 1, "no agreement even with full-width fingerprints")
                self._begin_pass_two()
                self._decide("", self._peer_count, self._peer_root, WIDE)
                restart = True
                items, have = self._take()
        more = bool(self._out or self._out_have)
        done = not (more or peer_more or any(type(i) is not Need for i in items))
        if done and restart:
            _check(self._verified(), "no agreement even with full-width fingerprints")
        self._done = done
        first = not self._initiator and self.messages_sent == 0
        return self._sent(ReconcileStep(
            items=tuple(items), have=tuple(have), more=more, done=done, restart=restart,
            root=self._root if first else None, count=self._count if first else None,
        ))

    def _take(self) -> tuple[list[Item], list[bytes]]:
        items: list[Item] = []
        budget = MAX_PAYLOAD
        while self._out and len(items) < MAX_ITEMS and _payload(self._out[0]) <= budget:
            budget -= _payload(self._out[0])
            items.append(self._out.popleft())
        have = [self._out_have.popleft() for _ in range(min(budget // ID_SIZE, len(self._out_have)))]
        items.sort(key=lambda i: i.prefix)
        have.sort()
        return items, have

    def _sent(self, msg: Message) -> Message:
        self.messages_sent += 1
        self._sent_more = getattr(msg, "more", False)
        return msg
