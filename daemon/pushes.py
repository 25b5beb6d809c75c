"""A push of many contexts through the local API: staged, then committed whole.

A client sends a push as PUSH_CONTEXT messages on one stream, all but the
last with `more` (docs/protocol.md, section 4). The daemon writes each to
a spool file as it arrives, so a push larger than memory, or a client that
stalls half-way, costs disk and not memory; credit goes back once written.
When the last message arrives the whole push is committed in one store
transaction and announced once: an interrupted push leaves nothing, and k
contexts cost one commit and one root change, not k.

The spool is an anonymous file beside the store (same disk, removed by the
kernel when closed, whatever way the daemon ends). Blocking calls here run
in a worker thread (the caller's job).
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import trio

from sync.messages import PushContext
from sync.refs import is_ref_update_bytes

# A push is one transaction: SQLite keeps all of it in the write-ahead log
# until the commit, and the commit holds the store's write lock for as long
# as it takes (~1 s per 100 MB here). 1 GiB keeps both bounded; a larger
# body of context is pushed in several parts.
MAX_PUSH_BYTES = 1024 * 1024 * 1024
# The ids of a push are held in memory while it commits (~100 B each).
MAX_PUSH_CONTEXTS = 1_000_000
# Bytes read back from the spool and verified per step of the commit.
COMMIT_BATCH_BYTES = 4 * 1024 * 1024

_LENGTH = struct.Struct(">I")


class PushRefused(ValueError):
    """The push cannot be taken; nothing of it is stored."""


class Spool:
    """Contexts of one push, in arrival order, in an anonymous file."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._file = None
        self.count = 0
        self.size = 0

    def write(self, blobs: list[bytes]) -> None:
        """Append blobs (blocking). PushRefused past a bound or for an object
        that is not a context; OSError (disk full) as the file raises it."""
        for blob in blobs:
            if is_ref_update_bytes(blob):
                raise PushRefused(f"object {self.count + 1} of the push is a ref update, not a context")
            self.count += 1
            self.size += len(blob)
        if self.count > MAX_PUSH_CONTEXTS:
            raise PushRefused(f"a push holds at most {MAX_PUSH_CONTEXTS:,} contexts; push in parts")
        if self.size > MAX_PUSH_BYTES:
            raise PushRefused(f"a push holds at most {MAX_PUSH_BYTES >> 20} MiB; push in parts")
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._directory, prefix="push-")
        self._file.write(b"".join(part for blob in blobs for part in (_LENGTH.pack(len(blob)), blob)))

    def batches(self) -> Iterator[list[bytes]]:
        """The blobs again, in order, a few MiB at a time (blocking)."""
        if self._file is None:
            return
        self._file.flush()
        self._file.seek(0)
        read = self._file.read
        batch: list[bytes] = []
        held = 0
        for _ in range(self.count):
            (length,) = _LENGTH.unpack(read(_LENGTH.size))
            blob = read(length)
            if len(blob) != length:
                raise OSError(f"the push spool is shorter than written ({self.size} bytes)")
            batch.append(blob)
            held += length
            if held >= COMMIT_BATCH_BYTES:
                yield batch
                batch, held = [], 0
        if batch:
            yield batch

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@attrs.define(eq=False)
class ArrivingPush:
    """The messages of one push stream not yet spooled, for its one task.

    Not a bounded channel: the reader must never block, and what waits
    here is bounded by the stream's flow-control window (credit goes back
    only once spooled)."""

    spool: Spool
    waiting: list[tuple[PushContext, int]] = attrs.field(factory=list)
    complete: bool = False  # the last message has arrived
    _wakeup: trio.Event = attrs.field(factory=trio.Event)

    def arrived(self, message: PushContext, size: int) -> None:
        self.waiting.append((message, size))
        self.complete = not message.more
        self.wake()

    def wake(self) -> None:
        self._wakeup.set()

    async def wait(self) -> None:
        if not self.waiting:
            await self._wakeup.wait()
        self._wakeup = trio.Event()

    def take(self) -> tuple[list[bytes], int]:
        """What waits: (the contexts' bytes, the flow-controlled bytes to release)."""
        taken, self.waiting = self.waiting, []
        return [m.context for m, _ in taken], sum(size for _, size in taken)

