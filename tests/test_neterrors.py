"""Network failures are named (refused, timed out, no route, name not resolved),
with the address, in the log and in status; a peer that never answers is logged."""

from __future__ import annotations

import errno
import logging
import socket

import pytest
import trio

from daemon import neterrors, peers as peers_module
from daemon.config import format_address
from node_helpers import start_node

# Generous: only keeps a broken dial loop from hanging the suite.
BOUND = 30


@pytest.fixture
def refused_address():
    """An address on 127.0.0.1 that refuses connections: bound, never listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()
    finally:
        sock.close()


@pytest.mark.parametrize(
    "exc, expected",
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "no route to host"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "network unreachable"),
        (TimeoutError(errno.ETIMEDOUT, "Connection timed out"), "timed out"),
        (trio.TooSlowError(), "timed out"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "name not resolved"),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
         "name not resolved (temporary failure)"),
        (OSError(errno.EADDRINUSE, "Address already in use"), "address already in use"),
        (OSError(errno.ENOBUFS, "No buffer space available"), "no buffer space available"),
        (trio.BrokenResourceError(), "connection lost"),
    ],
)
def test_reasons_name_what_happened(exc, expected):
    assert neterrors.reason(exc) == expected


def test_trios_every_attempt_failed_gives_the_attempts_reasons():
    """open_tcp_stream hides why in its cause, one error per address tried."""
    attempts = [ConnectionRefusedError(errno.ECONNREFUSED, "refused"), OSError(errno.EHOSTUNREACH, "no route"),
                ConnectionRefusedError(errno.ECONNREFUSED, "refused")]
    try:
        raise OSError("all attempts to connect to lab:7787 failed") from ExceptionGroup("all", attempts)
    except OSError as exc:
        assert neterrors.reason(exc) == "connection refused; no route to host"


def test_a_broken_stream_gives_its_cause():
    try:
        raise trio.BrokenResourceError() from ConnectionResetError(errno.ECONNRESET, "reset")
    except trio.BrokenResourceError as exc:
        assert neterrors.reason(exc) == "connection reset by the peer"


async def test_a_real_refusal_is_named(refused_address):
    with pytest.raises(OSError) as info:
        await trio.open_tcp_stream(*refused_address)
    assert neterrors.reason(info.value) == "connection refused"


def test_listen_failures_say_where_and_what_to_do():
    message = str(neterrors.listen_failed("0.0.0.0:7787", OSError(errno.EADDRINUSE, "Address already in use")))
    assert message.startswith("cannot listen on 0.0.0.0:7787: address already in use; ")
    assert "--listen" in message
    message = str(neterrors.listen_failed("nosuch.invalid:7787", socket.gaierror(socket.EAI_NONAME, "x")))
    assert message == "cannot listen on nosuch.invalid:7787: name not resolved"


async def test_a_static_peer_that_never_answers_is_logged_once_then_rate_limited(tmp_path, refused_address, caplog):
    key = format_address(*refused_address)
    peers_module._unreachable.forget(key)
    caplog.set_level(logging.DEBUG, logger="daemon.peers")
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, tmp_path, "a", peers=[refused_address])

        def attempts() -> list[logging.LogRecord]:
            return [r for r in caplog.records
                    if r.name == "daemon.peers" and r.levelno == logging.DEBUG and key in r.getMessage()]

        with trio.fail_after(BOUND):
            while len(attempts()) < 4:  # several dials, each failed
                await trio.sleep(0.02)
        [row] = node.status()["peers"]
        assert row["error"] == "cannot connect: connection refused"
        nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.name == "daemon.peers" and r.levelno == logging.WARNING]
    assert warnings == [f"peer {key} (static): cannot connect: connection refused; still trying (1 failed attempt so far)"]


async def test_a_peer_back_after_an_outage_is_reported_at_once_when_it_goes_again(tmp_path, caplog):
    """Connecting resets the rate limit: the next outage is news, not a repeat."""
    caplog.set_level(logging.WARNING, logger="daemon.peers")
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, tmp_path, "a")
        key = format_address(*a.listen_address)
        peers_module._unreachable.warning(key, "an earlier outage of %s", key)  # logged; the next would wait
        b = await start_node(nursery, tmp_path, "b", peers=[a.listen_address])
        with trio.fail_after(BOUND):
            while a.node_id not in b.sessions:
                await trio.sleep(0.01)
        peers_module._unreachable.warning(key, "a new outage of %s", key)
        nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records if "outage" in r.getMessage()] == [
        f"an earlier outage of {key}", f"a new outage of {key}"]


async def test_the_listen_line_says_who_can_connect(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="daemon.node")
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, tmp_path, "a")
        nursery.cancel_scope.cancel()
    expected = f"listening on {format_address(*node.listen_address)} (loopback: this machine only)"
    assert expected in [r.getMessage() for r in caplog.records]
