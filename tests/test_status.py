"""Tests for daemon.status (the `ctxfs status` table) and the `status` command."""

from __future__ import annotations

import json
import socket

import pytest

from daemon import cli, status as status_module
from daemon.status import format_status
from test_localapi import NODE_ID, PEER_ID, DaemonThread, home, run  # noqa: F401 (fixtures)

ROOT_HEX = "12" * 32
OTHER_ROOT = "34" * 32


def doc(*peers: dict, **fields) -> dict:
    base = {
        "schema": 2,
        "node_id": NODE_ID,
        "listen": "0.0.0.0:7787",
        "root": ROOT_HEX,
        "objects": 123,
        "store_error": None,
        "refs": 0,
        "conflicts": [],
        "peers": list(peers),
    }
    base.update(fields)
    return base


def peer(**fields) -> dict:
    base = {
        "node_id": PEER_ID,
        "address": "10.0.0.2:7787",
        "source": "mdns",
        "state": "connected",
        "root": ROOT_HEX,
        "in_sync": True,
        "last_sync": "2026-11-24T10:00:00+00:00",
        "objects_sent": 5,
        "objects_received": 7,
        "error": None,
    }
    base.update(fields)
    return base


# --------------------------------------------------------------------------
# format_status
# --------------------------------------------------------------------------


def test_header_shows_short_node_id_listen_root_and_objects():
    text = format_status(doc())
    lines = text.splitlines()
    assert lines[0].split() == ["node", NODE_ID[:12], "listening", "on", "0.0.0.0:7787"]
    assert lines[1].split() == ["root", ROOT_HEX[:12], "123", "objects"]
    assert "no peers" in text
    assert NODE_ID not in text  # short ids only


def test_one_row_per_peer_with_every_column():
    text = format_status(
        doc(
            peer(),
            peer(
                node_id="ef" * 32, address="10.0.0.3:7787", source="static", state="disconnected",
                root=None, in_sync=False, last_sync=None, objects_sent=0, objects_received=0,
                error="cannot connect: Connection refused",
            ),
        )
    )
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("PEER"))
    assert lines[header].split() == ["PEER", "ADDRESS", "SOURCE", "STATE", "IN", "SYNC", "LAST", "SYNC", "SENT/RECEIVED", "ERROR"]
    first, second = lines[header + 1], lines[header + 2]
    assert first.split() == [PEER_ID[:12], "10.0.0.2:7787", "mdns", "connected", "yes", "2026-11-24", "10:00:00Z", "5/7", "-"]
    assert second.split()[:8] == ["efefefefefef", "10.0.0.3:7787", "static", "disconnected", "no", "never", "0/0", "cannot"]
    assert second.endswith("cannot connect: Connection refused")
    # Columns line up: every row starts its ADDRESS at the same offset.
    assert lines[header].index("ADDRESS") == first.index("10.0.0.2") == second.index("10.0.0.3")
    assert "in sync with 1 of 2 peers" in text


def test_in_sync_is_yes_only_for_a_literal_true():
    for value in (None, "true", 1, False):
        row = format_status(doc(peer(in_sync=value))).splitlines()[-1]
        assert row.split()[4] == "no", value
    assert "in sync with all 1 peer" in format_status(doc(peer()))


def test_last_sync_is_shown_in_utc():
    row = format_status(doc(peer(last_sync="2026-11-24T12:30:05+02:00"))).splitlines()[-1]
    assert "2026-11-24 10:30:05Z" in row


def test_long_errors_are_cut_to_one_line():
    row = format_status(doc(peer(error="line one\nline two " + "x" * 200))).splitlines()[-1]
    assert "line one line two" in row
    assert len(row) < 200 and row.endswith("…")


def test_odd_or_missing_fields_render_without_failing():
    text = format_status({"schema": 3, "peers": [{"node_id": None}, "not a peer"]})
    assert "status schema 3" in text
    assert "?" in text
    assert len(text.splitlines()) >= 6
    assert format_status({}).splitlines()[0].startswith("node")


# --------------------------------------------------------------------------
# ctxfs status
# --------------------------------------------------------------------------


def one_line_error(err: str, needle: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ctxfs: ") and needle in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("flags", [[], ["--json"], ["--watch"]], ids=lambda f: " ".join(f) or "plain")
def test_status_without_daemon_exits_1_with_one_line(home, run, flags):
    code, out, err = run(home, "status", *flags)
    assert code == 1 and out == ""
    one_line_error(err, f"no daemon is running for {home}")


def test_status_on_a_home_that_does_not_exist(tmp_path, run):
    code, out, err = run(tmp_path / "nowhere", "status")
    assert code == 1 and out == ""
    one_line_error(err, "no daemon is running for")
    assert not (tmp_path / "nowhere").exists()


def test_status_with_a_stale_socket_says_no_daemon(home, run):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(home / "api.sock"))
    stale.close()
    code, out, err = run(home, "status")
    assert code == 1 and out == ""
    one_line_error(err, "no daemon is running for")


def test_status_json_is_the_daemons_document(home, run):
    with DaemonThread(home) as daemon:
        code, out, err = run(home, "status", "--json")
        expected = daemon.node.status()
    assert (code, err) == (0, "")
    assert len(out.splitlines()) == 1
    assert json.loads(out) == expected
    assert json.loads(out)["schema"] == 2


def test_status_table_through_the_daemon(home, run):
    with DaemonThread(home) as daemon:
        code, out, err = run(home, "status")
        expected = format_status(daemon.node.status())
    assert (code, err) == (0, "")
    assert out == expected + "\n"
    assert PEER_ID[:12] in out and "10.0.0.2:7787" in out


def test_status_watch_refreshes_until_ctrl_c(home, run, monkeypatch):
    shown = []

    def fake_format(status):
        shown.append(status)
        if len(shown) == 3:
            raise KeyboardInterrupt
        return f"screen {len(shown)}"

    monkeypatch.setattr(cli, "format_status", fake_format)
    monkeypatch.setattr(cli, "WATCH_INTERVAL", 0.01)
    with DaemonThread(home):
        code, out, err = run(home, "status", "--watch")
    assert (code, err) == (0, "")
    assert len(shown) == 3 and all(s["schema"] == 2 for s in shown)
    # Not a terminal: no escape codes, refreshes separated by a blank line.
    assert out == "screen 1\n\nscreen 2\n"
    assert cli.CLEAR_SCREEN not in out


def test_status_module_constants():
    assert status_module.SCHEMA == 2
    assert status_module.short_id(NODE_ID) == NODE_ID[:12]


def test_refs_line_shows_the_count_and_the_names_in_conflict():
    assert "refs     0" in format_status(doc(refs=0, conflicts=[])).splitlines()
    assert "refs     3" in format_status(doc(refs=3, conflicts=[])).splitlines()
    assert "refs     3 (1 in conflict: main)" in format_status(doc(refs=3, conflicts=["main"])).splitlines()
    many = format_status(doc(refs=9, conflicts=["a", "b", "c", "d", "e"])).splitlines()
    assert "refs     9 (5 in conflict: a, b, c, …)" in many
    # A schema-1 document has no refs: no line, and no note for it either.
    schema_1 = {k: v for k, v in doc(schema=1).items() if k not in ("refs", "conflicts")}
    assert not any(line.startswith("refs") for line in format_status(schema_1).splitlines())
    assert "refs     ? (1 in conflict: ?)" in format_status(doc(refs="x", conflicts=[None])).splitlines()


def test_one_object_is_singular():
    assert "  1 object" in format_status(doc(objects=1)).splitlines()[1]
    assert format_status(doc(objects=1)).splitlines()[1].endswith("1 object")


def test_script_status_without_daemon_exits_1_with_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "CTXFS_HOME"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ctxfs"), "--home", str(tmp_path / "h"), "status"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"ctxfs: no daemon is running for {tmp_path / 'h'}\n"
