"""`ctxfs status` and `ctxfs peer forget` as a user runs them: real daemon
processes on 127.0.0.1, the CLI's exit statuses and output.

Every wait is bounded only so that a broken daemon fails the test (with its
stderr) instead of hanging the suite; no test asserts on wall-clock time.
"""

from __future__ import annotations

import json
import socket
import subprocess

from process_helpers import Cluster, cluster, ctxfs, wait_until  # noqa: F401  (cluster is a fixture)

BOUND = 30.0
WIDTH = 80


def dead_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def one_line(err: str, needle: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctxfs: ") and needle in lines[0], err


def status(daemon, *args: str) -> subprocess.CompletedProcess:
    return ctxfs(daemon.home, "status", *args, check=False, timeout=BOUND * 2)


def row(document: dict, node_id: str) -> dict | None:
    return next((p for p in document["peers"] if p["node_id"] == node_id), None)


def test_status_exit_codes_wait_left_peers_and_forget(cluster: Cluster):
    dead = dead_address()
    lonely = cluster.daemon("lonely", peers=[dead])
    a = cluster.daemon("a")
    b = cluster.daemon("b", peers=[a])
    c = cluster.daemon("c", peers=[a, dead])

    # No peer connected: 3, and --wait times out with 1 and one line.
    result = status(lonely)
    assert result.returncode == 3, result
    assert "no peer connected (1 not connected)" in result.stdout
    result = status(lonely, "--wait", "--timeout", "0.5")
    assert result.returncode == 1
    one_line(result.stderr, "not in sync after 0.5 s: no peer is connected")
    assert status(lonely, "--allow-alone").returncode == 0
    assert status(lonely, "--json").returncode == 0  # the document says it

    # Every connected peer in sync: --wait returns 0, then plain status is 0
    # too, though c's second static peer is down.
    for daemon in (a, b, c):
        result = status(daemon, "--wait", "--timeout", str(BOUND))
        assert (result.returncode, result.stderr) == (0, ""), (daemon, result)
    result = status(c)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert all(len(line) <= WIDTH for line in lines), result.stdout
    dead_row = next(i for i, line in enumerate(lines) if dead in line)
    assert lines[dead_row + 1].strip() == "cannot connect: connection refused"  # whole, on its own line
    assert len(max(status(c, "--wide").stdout.splitlines(), key=len)) > WIDTH  # the row, whole

    # a sees b and c dial in, and shows where they listen, not their ports.
    document = json.loads(status(a, "--json").stdout)
    ids = {d: json.loads(status(d, "--json").stdout)["node_id"] for d in (b, c)}
    for daemon in (b, c):
        peer = row(document, ids[daemon])
        assert peer["source"] == "inbound" and peer["listen"] == daemon.listen
    table = status(a).stdout
    assert b.listen in table and c.listen in table

    # c stops: a says it left, with its reason, not "connection lost".
    c.stop()
    wait_until(lambda: row(json.loads(status(a, "--json").stdout), ids[c])["state"] != "connected", BOUND)
    peer = row(json.loads(status(a, "--json").stdout), ids[c])
    assert peer["goodbye"] == "node stopping" and peer["error"] is None, peer
    result = status(a)
    assert result.returncode == 0  # b, the one connected peer, is in sync
    assert "left" in result.stdout and "node stopping" in result.stdout
    assert "connection lost" not in result.stdout

    # Forget it; forgetting again, or a connected peer, is one line and 1.
    forgot = ctxfs(a.home, "peer", "forget", ids[c][:12])
    assert forgot.stdout == f"forgot {ids[c][:12]} ({peer['address']})\n"
    assert row(json.loads(status(a, "--json").stdout), ids[c]) is None
    again = ctxfs(a.home, "peer", "forget", ids[c][:12], check=False)
    assert again.returncode == 1 and again.stdout == ""
    one_line(again.stderr, f"no peer matches '{ids[c][:12]}'")
    busy = ctxfs(a.home, "peer", "forget", b.listen, check=False)
    assert busy.returncode == 1
    one_line(busy.stderr, "is connected")
    # A static peer, by address: no longer dialled, gone from the table.
    assert ctxfs(lonely.home, "peer", "forget", dead).stdout == f"forgot ? ({dead})\n"
    assert json.loads(status(lonely, "--json").stdout)["peers"] == []


def test_peer_forget_without_a_daemon_is_one_line(cluster: Cluster):
    home = cluster.home("idle")
    result = ctxfs(home, "peer", "forget", "abcd1234", check=False)
    assert result.returncode == 1 and result.stdout == ""
    one_line(result.stderr, f"no daemon is running for {home}")
