"""Which peer brings which missing object: each one once per node.

With protocol version 1 every neighbour that reconciles with a node pushes
it what it lacks, so a write reaches a node once per neighbour that had it
first (on an overlay of degree 8, ~85 % of what a node received was a
copy). Version 2 moves objects on request: after a reconciliation the side
that lacks objects asks for them (WANT), and a peer sends only what was
asked. This table decides whom to ask. A missing object is *claimed* by
the first session whose reconciliation found it; other sessions that find
it missing meanwhile leave it to that one. A claim ends when the object
is stored (from whichever peer, or pushed locally), when its session ends
(the others then reconcile again and claim what is still missing), when
that peer refuses the request, or when its session has brought nothing
for FETCH_STALL_SECONDS while it still owes objects: then the session
gives its claims up and the others reconcile at once (daemon/transfer.py,
`_stall_watch`), and any session that finds them missing may take them
over, so a peer that is slow or never answers does not hold an object up
for good. Stalled claims do not hold up the node's sync turn either.

Plain bookkeeping, no I/O: the caller passes the time, and `who` is any
hashable owner (a peer session).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

# A session that owes objects and has delivered none for this long loses
# its claims to any session that finds them missing. Long enough for a
# peer busy with a large request (4 MiB messages, an fsync each) to keep
# its claims; short enough that an object stuck behind a stalled peer is
# asked of another within a minute.
FETCH_STALL_SECONDS = 60.0


class Fetches:
    def __init__(self) -> None:
        self._owner: dict[bytes, Hashable] = {}
        self._claims: dict[Hashable, set[bytes]] = {}
        self._progress: dict[Hashable, float] = {}  # owner -> last claim or delivery

    def claim(self, who: Hashable, ids: Iterable[bytes], now: float) -> list[bytes]:
        """The ids of `ids` that `who` should ask its peer for now (in order);
        the rest are being brought by another session."""
        mine = self._claims.setdefault(who, set())
        if not mine:
            self._progress[who] = now  # a new request: its clock starts now
        claimed = []
        for oid in ids:
            owner = self._owner.get(oid)
            if owner is not None:
                if now - self._progress[owner] < FETCH_STALL_SECONDS:
                    continue  # on its way (or asked of this very session)
                theirs = self._claims[owner]
                theirs.discard(oid)
                if not theirs and owner is not who:
                    del self._claims[owner], self._progress[owner]
            self._owner[oid] = who
            mine.add(oid)
            claimed.append(oid)
        if not mine:
            del self._claims[who], self._progress[who]
        return claimed

    def progressed(self, who: Hashable, now: float) -> None:
        """`who`'s peer delivered something: its claims are alive."""
        if who in self._claims:
            self._progress[who] = now

    def arrived(self, ids: Iterable[bytes]) -> None:
        """These objects are stored here: nobody needs to bring them."""
        for oid in ids:
            owner = self._owner.pop(oid, None)
            if owner is not None:
                mine = self._claims[owner]
                mine.discard(oid)
                if not mine:
                    del self._claims[owner], self._progress[owner]
        if not self._owner:
            self._owner = {}  # a dict keeps its largest size: give a bulk fetch's back

    def release(self, who: Hashable) -> int:
        """`who` will bring nothing more (its session ended, or its peer
        refused): its claims are free again; how many there were."""
        mine = self._claims.pop(who, set())
        self._progress.pop(who, None)
        for oid in mine:
            del self._owner[oid]
        if not self._owner:
            self._owner = {}
        return len(mine)

    def owns(self, who: Hashable, oid: bytes) -> bool:
        return self._owner.get(oid) is who

    def stalls_at(self, who: Hashable) -> float | None:
        """When `who`'s claims count as stalled if it delivers nothing more
        (None: it owes nothing)."""
        since = self._progress.get(who)
        return None if since is None else since + FETCH_STALL_SECONDS

    def owed_live(self, now: float) -> int:
        """Objects claimed by sessions that are not stalled."""
        return sum(len(mine) for who, mine in self._claims.items() if now - self._progress[who] < FETCH_STALL_SECONDS)

    def owed(self, who: Hashable | None = None) -> int:
        """Objects claimed and not yet stored: by `who`, or by anyone."""
        return len(self._owner) if who is None else len(self._claims.get(who, ()))
