"""The checking worker's side (started by daemon/checker.py): a separate
Python process that checks the received messages it is sent and sends back
what the store's check made of each, until its pipe closes.

Kept apart from the node's side so that the process imports what checking
needs (sync.store: msgpack, the model, cryptography for ref updates) and
nothing of the node (trio, the CLI).
"""

from __future__ import annotations

from multiprocessing.connection import Connection

from sync.packed import PackedBlobs
from sync.store import check_blobs


def serve(read_fd: int, write_fd: int) -> None:
    """Check each message read from `read_fd` (a PackedBlobs' parts); reply
    on `write_fd` with (True, checked objects) or (False, the exception the
    store's check raised). Returns when the node closes the pipe."""
    requests, replies = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    while True:
        try:
            parts = requests.recv()
        except EOFError:
            return
        try:
            reply = (True, check_blobs(PackedBlobs.from_parts(*parts)))
        except Exception as exc:  # the store thread would have raised it: so does the node
            reply = (False, exc)
        try:
            replies.send(reply)
        except OSError:  # the node closed the pipe: it no longer waits
            return
        except Exception as exc:  # an exception that does not pickle (nothing was written)
            replies.send((False, RuntimeError(f"checking worker: {exc!r}")))
