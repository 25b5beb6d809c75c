"""Network failures in words a user can act on.

`OSError: [Errno 111]`, or trio's "all attempts to connect … failed" with
the reason hidden in its cause, tell a user nothing; `reason(exc)` says what
happened ("connection refused", "timed out", "no route to host", "name not
resolved"), so that a log line or status row can put it next to the address.
"""

from __future__ import annotations

import errno
import socket

import trio

_BY_ERRNO = {
    errno.ECONNREFUSED: "connection refused",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.EHOSTDOWN: "host is down",
    errno.ECONNRESET: "connection reset by the peer",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed by the peer",
    errno.EADDRINUSE: "address already in use",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address",
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted",
    errno.EMFILE: "too many open files",
}


def reason(exc: BaseException) -> str:
    """What went wrong, in a few words, for a connect, accept or listen failure."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        # Only a temporary failure is worth the resolver's words: it may pass.
        return "name not resolved (temporary failure)" if exc.errno == socket.EAI_AGAIN else "name not resolved"
    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
        cause = exc.__cause__
        return reason(cause) if isinstance(cause, OSError) else "connection lost"
    if isinstance(exc, BaseExceptionGroup):
        return _one_reason(exc.exceptions)
    if isinstance(exc, OSError):
        if exc.errno is None and isinstance(exc.__cause__, BaseExceptionGroup):
            # trio's open_tcp_stream: one error per address tried, in its cause.
            return _one_reason(exc.__cause__.exceptions)
        if exc.errno in _BY_ERRNO:
            return _BY_ERRNO[exc.errno]
        if exc.strerror:
            return exc.strerror[:1].lower() + exc.strerror[1:]
        return str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _one_reason(errors) -> str:
    """The reasons of several attempts (one per address a name resolved to), each once."""
    reasons = list(dict.fromkeys(reason(e) for e in errors))
    return "; ".join(reasons) if reasons else "failed"


class ListenFailed(Exception):
    """The node cannot take its listen address; the message is one line saying why and what to do."""


_LISTEN_ADVICE = {
    errno.EADDRINUSE: "another program (a ctxfs daemon for another home?) holds that port; "
                      "choose another with --listen HOST:PORT (port 0 picks a free one)",
    errno.EADDRNOTAVAIL: "give an address of this machine, 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)",
    errno.EACCES: "ports below 1024 need privileges; use a higher one",
}


def listen_failed(address: str, exc: OSError) -> ListenFailed:
    """A ListenFailed for `exc` raised while binding `address` (HOST:PORT)."""
    advice = _LISTEN_ADVICE.get(exc.errno) if not isinstance(exc, socket.gaierror) else None
    return ListenFailed(f"cannot listen on {address}: {reason(exc)}" + (f"; {advice}" if advice else ""))
