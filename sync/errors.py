"""Protocol errors and the wire error codes they carry.

Every error says whose fault it is, as in h11/wsproto:

* `LocalProtocolError`: *we* tried to do something the protocol forbids
  (send more than the peer granted, encode a frame with a reserved flag...).
  It is a bug on our side; nothing should be sent to the peer because of it.
* `RemoteProtocolError`: the *peer* sent something the protocol forbids.
  The connection answers with an ERROR carrying `code`, then closes.

Anything else escaping from `sync/` on bad input is a bug.
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "error_code_from_wire",
]


class ErrorCode(enum.IntEnum):
    """Error codes as they appear on the wire (in ERROR and GOODBYE messages).

    The numeric values are part of the protocol: never renumber or reuse one;
    only append.
    """

    NO_ERROR = 0  # graceful close (GOODBYE); never raised as an exception
    PROTOCOL_ERROR = 1  # generic violation with no more specific code
    FRAME_TOO_LARGE = 2  # declared frame length above the negotiated cap
    UNSUPPORTED_VERSION = 3  # HELLO names no version we speak
    BAD_MAGIC = 4  # first bytes are not a ctxfs HELLO
    FLOW_CONTROL = 5  # sent beyond granted credit, or credit overflow
    DECODE_ERROR = 6  # a payload does not decode (bad msgpack, bad shape)
    UNKNOWN_MESSAGE = 7  # message type byte we do not know
    NOT_FOUND = 8  # requested object/context does not exist
    INVALID_OBJECT = 9  # object bytes do not hash to the announced id
    MISSING_BASE = 10  # delta arrived before the parent it depends on
    LIMIT_EXCEEDED = 11  # a size/count/depth bound was exceeded
    INTERNAL = 12  # our own failure (also: unknown codes received, see below)
    BAD_REQUEST = 13  # well-formed but semantically invalid request
    SHUTTING_DOWN = 14  # the node is stopping; retry elsewhere/later
    RETRY = 15  # transient (e.g. the set changed during reconciliation): try again
    UNAVAILABLE = 16  # cannot store now (disk full, I/O error): resend after the node says it can


def error_code_from_wire(value: int) -> ErrorCode:
    """Map a received code to an `ErrorCode`.

    A newer peer may send codes we do not know. As HTTP/2 (RFC 9113 §7)
    prescribes, an unknown code triggers no special behaviour: treat it as
    INTERNAL rather than failing to decode the ERROR that carries it.
    """
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL


class ProtocolError(Exception):
    """Base class; raise one of the two subclasses, never this directly."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} ({self.code.name})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (our bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""
