"""A cluster member that misbehaves: it passes TLS and HELLO like any member,
then sends whatever frames a test (or scripts/chaos) gives it.

Used by the regression tests for a node's session boundary and by the
hostile-member part of the chaos campaign.
"""

from __future__ import annotations

from pathlib import Path

import trio

from daemon import security, tls
from sync import frames
from sync.connection import NEED_DATA, Connection, ConnectionClosed
from sync.messages import Message, MessageType, encode_payload, make_hello

from node_helpers import make_home

# How long a hostile member waits for the node's HELLO.
HELLO_BOUND = 10.0


class HostileMember:
    """A TLS connection from a genuine member, with our HELLO sent and the node's read.

    `conn` is the sans-IO connection as an honest peer would hold it; `send_raw`
    bypasses it to put arbitrary bytes on the wire.
    """

    def __init__(self, stream: trio.SSLStream, conn: Connection) -> None:
        self.stream = stream
        self.conn = conn

    @classmethod
    async def connect(cls, address: tuple[str, int], home_root: Path, name: str, *,
                      root: bytes = bytes(32), count: int = 0) -> HostileMember:
        """Join as a new member `name` (home under `home_root`); HELLO says `root`, `count`."""
        paths, node_id = make_home(home_root, name)
        identity = security.load_identity(paths)
        with trio.fail_after(HELLO_BOUND):
            stream = await trio.open_tcp_stream(*address)
            secure = await tls.wrap_client(stream, tls.client_context(identity))
            conn = Connection(hello=make_hello(node_id=bytes.fromhex(node_id), root=root, count=count), dialer=True)
            await secure.send_all(conn.start())
            member = cls(secure, conn)
            while True:
                event = member.conn.next_event()
                if event is NEED_DATA:
                    member.conn.receive_data(await secure.receive_some(65536))
                    continue
                assert not isinstance(event, ConnectionClosed), "the node closed before its HELLO"
                return member

    async def send(self, message: Message, stream_id: int = 0) -> None:
        """A well-formed message, framed by hand: no state or stream checks."""
        payload = encode_payload(message)
        frame = frames.Frame(type=message.TYPE, flags=0, stream_id=stream_id, payload=payload)
        await self.send_raw(frames.encode_frame(frame))

    async def send_partial(self, msg_type: MessageType, stream_id: int, size: int) -> None:
        """The first `size` bytes of a message that never finishes (FLAG_MORE set)."""
        frame = frames.Frame(type=msg_type, flags=frames.FLAG_MORE, stream_id=stream_id, payload=b"\x00" * size)
        await self.send_raw(frames.encode_frame(frame))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_until_closed(self, bound: float) -> bytes:
        """Everything the node sends until it closes (or `bound` seconds pass)."""
        received = bytearray()
        with trio.move_on_after(bound):
            try:
                while chunk := await self.stream.receive_some(65536):
                    received += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return bytes(received)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
