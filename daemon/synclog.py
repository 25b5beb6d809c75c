"""One log line per sync with a peer: what moved each way, and how long it took.

A sync starts when two nodes that differ start doing something about it (a
reconciliation, objects on their way) and ends when their roots are equal
again, or when the session ends first. Its line, at INFO when objects moved:

    peer 3f0c1a2b4c5d (10.0.0.2:7787): in sync after 2.41 s: received 21740 objects (48.2 MiB), sent 0 objects (0 B)

A sync that moved nothing (a reconciliation after a missed announcement) is
a DEBUG line: an idle cluster's anti-entropy rounds never fill the log. A
busy peer (a write every second) gets at most one INFO line per
MIN_INTERVAL: syncs that end sooner are summed into the next line, which
`due()` releases once the interval has passed.

Pure bookkeeping: the session passes the time in (trio.current_time()) and
writes the lines.
"""

from __future__ import annotations

import logging

import attrs

# At most one INFO line per peer this often; syncs that end sooner are summed.
MIN_INTERVAL = 10.0


def format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _objects(count: int) -> str:
    return f"{count} object" if count == 1 else f"{count} objects"


@attrs.frozen(kw_only=True)
class SyncReport:
    """What one line says: one sync, several summed, or one cut short."""

    level: int
    syncs: int  # completed syncs summed in this line
    seconds: float  # from the first one's start to the last one's end (or the session's)
    in_sync: bool  # False: the session ended before the roots were equal
    reconciliations: int
    objects_received: int
    bytes_received: int
    objects_sent: int
    bytes_sent: int

    def message(self, peer: str) -> str:
        if not self.in_sync:
            head = f"session ended {self.seconds:.2f} s into a sync, before the roots were equal"
        elif self.syncs > 1:
            head = f"in sync; {self.syncs} syncs in {self.seconds:.2f} s"
        else:
            head = f"in sync after {self.seconds:.2f} s"
        if not (self.objects_received or self.objects_sent or self.bytes_received or self.bytes_sent):
            rounds = self.reconciliations
            return f"peer {peer}: {head}: nothing to move ({rounds} reconciliation{'' if rounds == 1 else 's'})"
        return (
            f"peer {peer}: {head}: received {_objects(self.objects_received)} ({format_bytes(self.bytes_received)}), "
            f"sent {_objects(self.objects_sent)} ({format_bytes(self.bytes_sent)})"
        )


@attrs.define
class SyncTally:
    """What moved with one peer since its last line."""

    active: bool = False  # a sync is under way (the roots differ and something happened)
    first_start: float | None = None  # of the first sync summed in the next line
    last_end: float = 0.0
    syncs: int = 0
    reconciliations: int = 0
    objects_received: int = 0
    bytes_received: int = 0
    objects_sent: int = 0
    bytes_sent: int = 0
    last_line: float = float("-inf")  # when the last INFO line was written

    def _begin(self, now: float) -> None:
        if not self.active:
            self.active = True
            if self.first_start is None:
                self.first_start = now

    def reconciling(self, now: float) -> None:
        self._begin(now)
        self.reconciliations += 1

    def received(self, objects: int, size: int, now: float) -> None:
        self._begin(now)
        self.objects_received += objects
        self.bytes_received += size

    def sent(self, objects: int, size: int, now: float) -> None:
        self._begin(now)
        self.objects_sent += objects
        self.bytes_sent += size

    def in_sync(self, now: float) -> SyncReport | None:
        """The roots are equal now: the sync under way (if any) is done."""
        if not self.active:
            return None
        self.active = False
        self.syncs += 1
        self.last_end = now
        if not self._moved():
            return self._report(logging.DEBUG, now, now, in_sync=True)
        if now - self.last_line < MIN_INTERVAL:
            return None  # summed into a later line (see due)
        return self._report(logging.INFO, now, now, in_sync=True)

    def due(self, now: float) -> SyncReport | None:
        """Summed syncs whose line waited for MIN_INTERVAL, once it has passed."""
        if self.active or not self.syncs or now - self.last_line < MIN_INTERVAL:
            return None
        return self._report(logging.INFO, self.last_end, now, in_sync=True)

    def ended(self, now: float) -> SyncReport | None:
        """The session is over: whatever has not been told yet."""
        if not self.active and not self.syncs:
            return None
        level = logging.INFO if self._moved() else logging.DEBUG
        return self._report(level, now if self.active else self.last_end, now, in_sync=not self.active)

    def _moved(self) -> bool:
        return bool(self.objects_received or self.objects_sent or self.bytes_received or self.bytes_sent)

    def _report(self, level: int, end: float, now: float, *, in_sync: bool) -> SyncReport:
        report = SyncReport(
            level=level,
            syncs=self.syncs,
            seconds=max(0.0, end - (self.first_start if self.first_start is not None else end)),
            in_sync=in_sync,
            reconciliations=self.reconciliations,
            objects_received=self.objects_received,
            bytes_received=self.bytes_received,
            objects_sent=self.objects_sent,
            bytes_sent=self.bytes_sent,
        )
        if level >= logging.INFO:
            self.last_line = now
        self.active = False
        self.first_start = None
        self.syncs = self.reconciliations = 0
        self.objects_received = self.bytes_received = self.objects_sent = self.bytes_sent = 0
        return report
