"""The objects half of a peer session: asking, pushing and storing.

`PeerSession` (daemon/peer.py) owns the connection, the reconciliations and
the tasks; this mixin is what it does with their results:

  fetcher  (protocol version 2) asks the peer for what reconciliation found
           we lack and no other session is bringing (daemon/fetches.py),
           as WANT requests the writer can take; a request the peer leaves
           unanswered for FETCH_STALL_SECONDS is asked of the others
  pusher   sends what the peer lacks, parents first and ref updates after
           the contexts they target, never more than the peer's credit
           allows: what it asked for (version 2), or what reconciliation
           found it lacks (version 1)
  storer   verifies and commits received objects, then grants credit and
           ACKs; what arrived while it committed goes into the next
           commit together (one transaction and fsync for all of it)
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from collections.abc import Set as AbstractSet

import attrs
import trio

from daemon.fetches import FETCH_STALL_SECONDS
from daemon.logs import RateLimitedLog
from sync import reconcile
from sync.codec import DecodeError, bytes_id
from sync.errors import ErrorCode
from sync.messages import MAX_IDS_PER_MESSAGE, MAX_OBJECTS_PER_MESSAGE, Ack, Error, Objects, Want
from sync.packed import PackedBlobs
from sync.store import MissingBase, StoreError, StoreUnavailable

log = logging.getLogger(__name__)
_warn = RateLimitedLog(log)

# Target payload of one OBJECTS message: big enough to amortise the
# per-message work, small enough that four fit the default stream window,
# so credit keeps coming. Never above the peer's max flow message.
OBJECTS_BATCH_BYTES = 4 * 1024 * 1024
# WANT bytes queued for the writer at once: a request of a million ids is
# 32 MB of WANTs, handed to the writer as it drains (8 messages at a time)
# rather than all at once past the session's control backlog.
WANT_BACKLOG = 1024 * 1024
# A push of at least this many objects leaves id tables (the request and
# unACKed sets, the order and its sort: ~270 B an id at their peak) worth
# handing back to the system once the peer has ACKed it all
# (Node.release_memory_soon).
BULK_PUSH_OBJECTS = 10_000
# Objects committed in one transaction at most. What arrived while the last
# commit ran goes into the next one up to this: a window of small contexts
# (~100k) is not one transaction's worth of ids, depths and rows held at
# once, and an fsync stays a small part of a commit of this many.
COMMIT_MAX_OBJECTS = 4 * MAX_OBJECTS_PER_MESSAGE


class PushRefused(Exception):
    """The peer refused a push while it waited for credit (never leaves _push)."""


@attrs.define
class _Received:
    """One received OBJECTS message waiting for the storer."""

    stream_id: int
    size: int  # of its payload: credit to give back once stored
    ids: tuple[bytes, ...]  # version 1: the ids it gave for its objects
    objects: PackedBlobs  # one buffer while it waits (see sync/packed.py)
    final: bool
    # What the checking worker made of it (daemon/checker.py): its objects
    # checked, the DecodeError the store would raise, or None (the store
    # thread checks it).
    checked: list | DecodeError | None = None


class _HexIds(AbstractSet[str]):
    """A set of 32-byte ids as the set of hex ids the store's API takes,
    without a copy. In id order: the store's look-ups then walk its id
    index in order (100k ids: 0.67 s instead of 0.81)."""

    def __init__(self, ids: AbstractSet[bytes]) -> None:
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return (i.hex() for i in sorted(self._ids))

    def __contains__(self, object_id: object) -> bool:
        try:
            raw = bytes.fromhex(object_id)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        # Well-formed ids only: fromhex also takes "AB…" or spaces. (Checked
        # on a hit only: a full is_id costs more than the look-up.)
        return raw in self._ids and raw.hex() == object_id


class ObjectTransfer:
    """Mixed into PeerSession; uses its node, conn, info, send* and writer state."""

    def _init_transfer(self) -> None:
        # Ids pushed (or queued to push) and not yet acknowledged: a second
        # reconciliation while a push is under way must not send them again.
        self._unacked: set[bytes] = set()
        # (Version 2) a reconciliation put off while the peer takes what it
        # asked for: its new roots mean it is storing, not that we lack
        # anything; it asks again itself when it has reconciled.
        self._sync_after_push = False
        self._pushing: dict[int, set[bytes]] = {}  # our push streams -> their unacked ids
        self._bulk_pushed = False  # a push of BULK_PUSH_OBJECTS or more since the last drain
        # Received OBJECTS, first for the prechecker, then (checked) for the
        # storer. Not bounded channels: the reader must never block; their
        # bytes are bounded by our receive window (credit comes back only
        # once they are stored).
        self._unchecked: collections.deque[_Received] = collections.deque()
        self._unchecked_wake = trio.Event()
        self._received: collections.deque[_Received] = collections.deque()
        self._received_wake = trio.Event()
        # Ids the peer lacks, waiting for the pusher. A set, not a bounded
        # channel: a responder's reconciliation ends in the reader, which
        # must never wait (it carries the CREDITs the pusher itself waits
        # for). Bounded by the ids we hold.
        self._to_push: set[bytes] = set()
        self._push_wake = trio.Event()
        # Ids we claimed (node.fetches) and have yet to ask the peer for.
        self._wants: collections.deque[bytes] = collections.deque()
        self._wants_wake = trio.Event()
        self._claimed = trio.Event()  # we claimed something (see _stall_watch)
        # The peer's request so far (its WANTs with `more`); ids we hold only,
        # so bounded by our store.
        self._requested: set[bytes] = set()

    # ------------------------------------------------------------ after a reconciliation

    def _take_result(self, reconciler: reconcile.Reconciler) -> None:
        if self.pull:
            # What we lack, we ask for: unless another session brings it.
            missing = (i for i in reconciler.to_request if not self.node.holds(i))
            claimed = self.node.fetches.claim(self, missing, trio.current_time())
            self.node.checker.prepare(len(claimed))  # a worker's start overlaps a large request
            if claimed:
                self._wants.extend(claimed)
                self._wants_wake.set()
                self._claimed.set()
        else:
            # The peer's own reconciler found what we lack; it pushes that.
            self._send_soon(set(reconciler.to_send))

    def _send_soon(self, ids: set[bytes]) -> None:
        """Hand ids to the pusher, but none already sent and not yet ACKed.
        Takes the set: it becomes the pusher's (a bulk request is one set
        of its ids for the pusher and one for _unacked, not five)."""
        ids -= self._unacked
        if ids:
            self._unacked |= ids
            if self._to_push:
                self._to_push |= ids
            else:
                self._to_push = ids
            self._push_wake.set()

    def _serving_request(self) -> bool:
        """(Version 2) the peer is taking what it asked for: its new roots
        are that, and we reconcile once the push is ACKed (if they differ)."""
        if self.pull and self._unacked:
            self._sync_after_push = True
            return True
        return False

    def _push_drained(self) -> None:
        if self._sync_after_push and not self._unacked:
            self._sync_after_push = False
            self.resync()
        if self._bulk_pushed and not self._unacked:
            self._bulk_pushed = False
            self.node.release_memory_soon()

    # ------------------------------------------------------------ messages from the reader

    def _on_objects(self, stream_id: int, size: int, message: Objects) -> None:
        self._unchecked.append(_Received(stream_id, size, message.ids, PackedBlobs(message.objects), message.final))
        self._unchecked_wake.set()

    def _on_ack(self, stream_id: int, message: Ack) -> None:
        self.info.objects_sent += len(message.ids)
        self._unacked.difference_update(message.ids)
        self._push_drained()
        pending = self._pushing.get(stream_id)
        if pending is not None:
            pending.difference_update(message.ids)
            if not pending:
                del self._pushing[stream_id]

    def _on_push_refused(self, stream_id: int) -> None:
        # Those ids go back to "not sent", for the next round; the pusher
        # stops sending on that stream (see _push).
        refused = self._pushing.pop(stream_id, None)
        if refused is not None:
            self._unacked -= refused
            self._push_drained()
            self._credit.set()

    def _on_want(self, message: Want) -> None:
        # Ids we do not hold are left out: reconciliation said we did, so
        # they are rare (the peer's claim on them runs out, see fetches).
        self._requested.update(i for i in message.ids if self.node.holds(i))
        if not message.more:
            # The whole request at once, so that the pusher orders it
            # parents first (a base in a later WANT would come too late).
            requested, self._requested = self._requested, set()
            self._send_soon(requested)

    # ------------------------------------------------------------ tasks

    async def _fetcher(self) -> None:
        """Ask the peer for what we claimed, as WANTs the writer can take."""
        while True:
            while not self._wants:
                self._wants_wake = trio.Event()
                await self._wants_wake.wait()
            count = min(len(self._wants), MAX_IDS_PER_MESSAGE)
            # Not what arrived meanwhile, or what we gave up (stalled, refused).
            ids = tuple(i for i in (self._wants.popleft() for _ in range(count)) if self.node.fetches.owns(self, i))
            if ids or not self._wants:
                await self.send(Want(ids=ids, more=bool(self._wants)))
            while self._control_bytes > WANT_BACKLOG:
                await self._writer_idle.wait()

    async def _stall_watch(self) -> None:
        """A peer that takes our request and brings nothing for
        FETCH_STALL_SECONDS loses it: the other sessions reconcile at once
        and ask for those objects, instead of at the next anti-entropy."""
        while True:
            deadline = self.node.fetches.stalls_at(self)
            if deadline is None:
                self._claimed = trio.Event()
                await self._claimed.wait()
            elif trio.current_time() < deadline:
                await trio.sleep_until(deadline)
            else:
                owed = self.node.fetches.owed(self)
                _warn.warning(f"{self.info.address}:stalled", "peer %s: brought none of %d requested objects for %g s; "
                              "asking other peers", self.info.address, owed, FETCH_STALL_SECONDS)
                self.node.release_fetches(self, resync=True)

    async def _pusher(self) -> None:
        while True:
            while not self._to_push:
                self._push_wake = trio.Event()
                await self._push_wake.wait()
            ids, self._to_push = self._to_push, set()
            await self._push(ids)
            del ids  # not kept while idle (a bulk request's set)

    async def _push(self, ids: set[bytes]) -> None:
        # The whole set in parents-first order, then bytes one message at a
        # time: a base always travels before its children (and a context
        # before the ref updates that target it), and the sender holds one
        # message of bytes, not everything it has to send. The set itself
        # becomes the stream's unACKed ids (no copy of a bulk request).
        order = await self.node.run_sync(self.node.store.send_order, _HexIds(ids))
        limit = min(OBJECTS_BATCH_BYTES, self.conn.max_flow_message - 64 * 1024)
        too_large = [k for k, length in enumerate(order.sizes) if length + 1024 > limit]
        if too_large:
            # Its window can never take them (a peer may grant as little as
            # 64 KiB): waiting for that credit would stop this pusher for good.
            self.info.error = (f"the peer's window is too small for {len(too_large)} contexts "
                               f"(e.g. {order.id_at(too_large[0]).hex()[:12]})")
            _warn.warning(f"{self.info.address}:window", "peer %s: %s", self.info.address, self.info.error)
            skipped = {order.id_at(k) for k in too_large}
            self._unacked -= skipped
            ids -= skipped
            self._push_drained()
            order = order.without(too_large)
            if not order:
                return
        self._bulk_pushed |= len(order) >= BULK_PUSH_OBJECTS
        batches = order.batches(limit, MAX_OBJECTS_PER_MESSAGE, overhead=40)
        stream_id = self.conn.open_stream()
        self._pushing[stream_id] = ids
        refused = lambda: stream_id not in self._pushing  # noqa: E731  (ERROR on the stream)
        for number, batch in enumerate(batches, 1):
            if refused():
                break  # send no more of a push the peer refused
            blobs = await self.node.run_sync(self.node.store.get_many_bytes, order.hex_ids(batch.start, batch.stop))
            # A version 2 peer derives the ids from the bytes (a fifth of a
            # small context's size less on the wire).
            message_ids = () if self.pull else tuple(order.ids(batch.start, batch.stop))
            message = Objects(ids=message_ids, objects=tuple(blobs), final=number == len(batches))
            try:
                await self.send_flow(message, stream_id, refused=refused)
            except PushRefused:
                break
            self._tally.sent(len(batch), sum(map(len, blobs)), trio.current_time())
        self.conn.close_stream(stream_id)  # ACKs still arrive; credit for it is moot

    async def _prechecker(self) -> None:
        """Check each received message in the node's checking worker while
        the storer commits the ones before it (daemon/checker.py)."""
        while True:
            while not self._unchecked:
                self._unchecked_wake = trio.Event()
                await self._unchecked_wake.wait()
            item = self._unchecked.popleft()
            try:
                item.checked = await self.node.checker.check(item.objects)
            except DecodeError as exc:  # what the store would raise for it: the storer refuses the message
                item.checked = exc
            except Exception as exc:  # the worker's own trouble: the store thread checks it
                _warn.warning("checker:error", "checking worker: %s", exc)
            self._received.append(item)
            self._received_wake.set()
            del item  # an idle prechecker keeps no message alive

    async def _storer(self) -> None:
        while True:
            while not self._received:
                self._received_wake = trio.Event()
                await self._received_wake.wait()
            # What was checked while the last commit ran: one transaction,
            # one fsync (up to COMMIT_MAX_OBJECTS; bounded by our receive window).
            arrived = [self._received.popleft()]
            count = len(arrived[0].objects)
            while self._received and count + len(self._received[0].objects) <= COMMIT_MAX_OBJECTS:
                arrived.append(self._received.popleft())
                count += len(arrived[-1].objects)
            await self._store(arrived)
            del arrived  # an idle storer keeps no messages alive

    async def _store(self, arrived: list[_Received]) -> None:
        checked = [item for item in arrived if await self._check_ids(item)]
        if len(checked) > 1 and await self._commit(checked, alone=False):
            return
        for item in checked:  # one at a time, so that a refusal names its message
            await self._commit([item], alone=True)

    async def _check_ids(self, item: _Received) -> bool:
        """Ids given (version 1) must be the hashes of their bytes; a message
        with one that is not is refused whole (corrupted or forged)."""
        bad = next((i for i, d in zip(item.ids, item.objects) if bytes_id(d) != i.hex()), None)
        if bad is None:
            return True
        stream_id = item.stream_id
        await self._release(stream_id, item.size)
        await self.answer(Error(code=int(ErrorCode.INVALID_OBJECT), message=f"object {bad.hex()} does not match its bytes"), stream_id)
        self.info.error = f"peer sent object {bad.hex()[:12]} whose bytes do not match its id"
        _warn.warning(f"{self.info.address}:invalid", "peer %s: %s", self.info.address, self.info.error)
        self.conn.close_stream(stream_id)
        return False

    async def _commit(self, items: list[_Received], *, alone: bool) -> bool:
        """Store the messages' objects in one transaction, then credit and
        ACK each message. False if it failed and not `alone` (nothing is
        stored; the caller stores them one by one to say which failed)."""
        try:
            failed = next((item.checked for item in items if isinstance(item.checked, DecodeError)), None)
            if failed is not None:
                raise failed
            ids, fresh = await self.node.add_received([item.objects for item in items], [item.checked for item in items])
        except (StoreError, DecodeError) as exc:
            if not alone:
                return False
            await self._refuse(items[0], exc)
            return True
        now = trio.current_time()
        self.node.fetches.progressed(self, now)
        self.info.objects_received += fresh
        self._tally.received(fresh, sum(item.objects.nbytes for item in items), now)
        start = 0
        for item in items:
            mine, start = ids[start:start + len(item.objects)], start + len(item.objects)
            await self._release(item.stream_id, item.size)
            await self.answer(Ack(ids=tuple(mine)), item.stream_id)
            if item.final:
                self.conn.close_stream(item.stream_id)
        return True

    async def _refuse(self, item: _Received, exc: Exception) -> None:
        # What we asked this peer for may be asked again, of it or of
        # another, at the next reconciliation: not at once, which for a
        # missing base would ask for the same again until the base came.
        # (A base that arrives changes our root: peers reconcile then.)
        self.node.release_fetches(self, resync=False)
        stream_id = item.stream_id
        await self._release(stream_id, item.size)
        if isinstance(exc, StoreUnavailable):
            code = ErrorCode.UNAVAILABLE  # it resends once we reconcile again (Node._watch_store)
        elif isinstance(exc, MissingBase):
            code = ErrorCode.MISSING_BASE  # MissingTarget too: a ref update before its context
        else:
            # Not canonical, too large, or a ref update whose signature
            # fails (forged): nothing of the message was stored.
            code = ErrorCode.INVALID_OBJECT
            self.info.error = f"peer sent an invalid object: {str(exc)[:200]}"
            _warn.warning(f"{self.info.address}:invalid", "peer %s: %s", self.info.address, self.info.error)
        await self.answer(Error(code=int(code), message=str(exc)[:1000]), stream_id)
        self.conn.close_stream(stream_id)

    async def _release(self, stream_id: int, size: int) -> None:
        self._queue(self.conn.release(stream_id, size))
        await trio.lowlevel.checkpoint()
