"""Hostile frames for the chaos campaign: what a misbehaving member or local
client sends once it is past HELLO.

`Forge.next()` returns (kind, bytes). About half the kinds are well framed
but unwelcome (requests on reused, closed or the other side's streams,
credit for nothing, errors and acks out of the blue, partial messages left
unfinished); the rest break the framing (byte flips, truncations, lengths
over the cap, unknown types, noise), which should end the connection with a
declared ERROR and nothing else.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from sync import frames
from sync.messages import (
    Ack,
    Credit,
    Error,
    ExpandRequest,
    Message,
    MessageType,
    Objects,
    Ping,
    Pong,
    PushContext,
    QueryRequest,
    Reconcile,
    Root,
    StatusRequest,
    StreamRequest,
    Want,
    encode_payload,
)

# Largest payload of a well-framed hostile message: big enough to matter,
# small enough that a run of 100,000 frames stays minutes, not hours.
MAX_HOSTILE_PAYLOAD = 256 * 1024
# Types a ctxfs node has never heard of (the protocol's are below 0x40).
UNKNOWN_TYPES = (0x00, 0x3F, 0x7E, 0xFF)


def frame(msg_type: int, stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BBII", msg_type, flags, stream_id, len(payload)) + payload


def message_frame(message: Message, stream_id: int) -> bytes:
    return frame(message.TYPE, stream_id, encode_payload(message))


class Forge:
    """Hostile frames from a seeded generator; `ids` are ids the target holds."""

    def __init__(self, rng: random.Random, *, dialer: bool, ids: list[bytes], local_api: bool) -> None:
        self.rng = rng
        self.ids = ids or [bytes(32)]
        self.local_api = local_api
        self._ours = 1 if dialer else 2  # our next stream id (the dialer's are odd)
        self._used: list[int] = []
        kinds: dict[str, tuple[float, Callable[[], bytes]]] = {
            "ping": (3, lambda: message_frame(Ping(nonce=self.rng.getrandbits(32)), 0)),
            "pong": (1, lambda: message_frame(Pong(nonce=self.rng.getrandbits(32)), 0)),
            "request-new": (8, lambda: message_frame(self._request(), self._new_stream())),
            "request-reused": (6, lambda: message_frame(self._request(), self._old_stream())),
            "request-theirs": (3, lambda: message_frame(self._request(), self._their_stream())),
            "credit": (3, lambda: message_frame(Credit(increment=self.rng.randint(1, 1 << 20)), self._any_stream())),
            "error": (3, lambda: message_frame(Error(code=self.rng.randint(1, 40), message="hostile"), self._any_stream(nonzero=True))),
            "ack": (2, lambda: message_frame(Ack(ids=tuple(self._some_ids())), self._any_stream())),
            "root": (2, lambda: message_frame(Root(root=self.rng.randbytes(32), count=self.rng.randint(0, 1 << 20)), 0)),
            "objects": (3, lambda: message_frame(self._objects(), self._new_stream())),
            "partial": (3, self._partial),
            # Framing broken: these end the connection (rarer, so that a
            # connection carries a few dozen frames before it ends).
            "flip": (0.5, self._flipped),
            "truncate": (0.3, self._truncated),
            "length": (0.2, lambda: struct.pack(">BBII", MessageType.PING, 0, 0, frames.MAX_FRAME_SIZE + 1)),
            "type": (0.2, lambda: frame(self.rng.choice(UNKNOWN_TYPES), 0, b"\x90")),
            "reconcile": (0.3, lambda: message_frame(Reconcile(body=(self.rng.randbytes(8),)), self._new_stream())),
            "noise": (0.3, lambda: self.rng.randbytes(self.rng.randint(1, 64))),
        }
        self._names = list(kinds)
        self._weights = [w for w, _ in kinds.values()]
        self._makers = [m for _, m in kinds.values()]

    def next(self) -> tuple[str, bytes]:
        index = self.rng.choices(range(len(self._names)), self._weights)[0]
        return self._names[index], self._makers[index]()

    # ------------------------------------------------------------ pieces

    def _request(self) -> Message:
        target = self.rng.choice(self.ids + [self.rng.randbytes(32)])
        if not self.local_api:
            return Want(ids=tuple(self._some_ids()))
        choice = self.rng.randrange(5)
        if choice == 0:
            return StreamRequest(id=target, chunk_size=self.rng.randint(1, 200))
        if choice == 1:
            return ExpandRequest(id=target, max_tokens=self.rng.choice([None, 10, 1000]))
        if choice == 2:
            return QueryRequest(id=target, limit=self.rng.randint(0, 50))
        if choice == 3:
            return StatusRequest()
        return Want(ids=tuple(self._some_ids()))  # not served locally

    def _objects(self) -> Message:
        blobs = tuple(self.rng.randbytes(self.rng.randint(0, 512)) for _ in range(self.rng.randint(1, 4)))
        ids = tuple(self.rng.randbytes(32) for _ in blobs)
        if self.local_api:
            return PushContext(context=blobs[0])
        return Objects(ids=ids, objects=blobs, final=self.rng.random() < 0.5)

    def _some_ids(self) -> list[bytes]:
        return [self.rng.choice(self.ids) if self.rng.random() < 0.5 else self.rng.randbytes(32)
                for _ in range(self.rng.randint(0, 8))]

    def _new_stream(self) -> int:
        stream_id = self._ours
        self._ours += 2
        self._used.append(stream_id)
        return stream_id

    def _old_stream(self) -> int:
        return self.rng.choice(self._used) if self._used else self._new_stream()

    def _their_stream(self) -> int:
        return self._ours + 1 - 2 * self.rng.randint(0, 4) if self._ours > 8 else self._ours + 1

    def _any_stream(self, *, nonzero: bool = False) -> int:
        pick = self.rng.randrange(4)
        if pick == 0 and not nonzero:
            return 0
        if pick == 1:
            return self._their_stream()
        return self._old_stream()

    def _partial(self) -> bytes:
        msg_type = self.rng.choice([MessageType.RECONCILE, MessageType.OBJECTS, MessageType.ERROR,
                                    MessageType.PUSH_CONTEXT if self.local_api else MessageType.WANT])
        size = self.rng.randint(1, MAX_HOSTILE_PAYLOAD)
        return frame(msg_type, self._new_stream(), b"\x00" * size, flags=frames.FLAG_MORE)

    def _flipped(self) -> bytes:
        data = bytearray(message_frame(self._request(), self._new_stream()))
        for _ in range(self.rng.randint(1, 3)):
            position = self.rng.randrange(len(data))
            data[position] ^= 1 << self.rng.randrange(8)
        return bytes(data)

    def _truncated(self) -> bytes:
        data = message_frame(self._request(), self._new_stream())
        return data[: self.rng.randrange(1, len(data))] + message_frame(Ping(nonce=1), 0)
