"""The MCP tools' link to the daemon (daemon/memory.py), without MCP."""

from __future__ import annotations

import socket

import trio

from daemon import memory
from daemon.paths import HomePaths

from node_helpers import make_home


async def test_a_stale_socket_costs_no_wait(tmp_path, monkeypatch):
    """A daemon killed -9 leaves its socket file: every tool call once waited
    for it to answer (2 s each). Once it has refused, the link goes offline
    at once until the file is replaced."""
    paths, _ = make_home(tmp_path, "home")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(paths.api_socket))  # a file nobody listens on
    stale.close()
    monkeypatch.setattr(memory, "DAEMON_WAIT_SECONDS", 1000.0)  # waiting would hang the test
    link = memory.DaemonLink(HomePaths(paths.root), lambda name: trio.lowlevel.checkpoint())
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        with trio.move_on_after(30) as guard:  # a safety net, not a timing assertion
            assert await link.current() is None
            assert await link.current() is None
        assert not guard.cancelled_caught
        nursery.cancel_scope.cancel()
