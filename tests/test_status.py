"""Tests for daemon.status (the `ctxfs status` table) and the `status` command."""

from __future__ import annotations

import json
import socket
from datetime import datetime, timezone

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

NOW = datetime(2026, 11, 24, 10, 5, tzinfo=timezone.utc)  # 5 minutes after peer()'s last sync


def table(status: dict, **kwargs) -> list[str]:
    """The peer table's lines: from the column header on."""
    lines = format_status(status, now=NOW, **kwargs).splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("PEER")):]


def assert_fits(text: str, width: int = status_module.WIDTH) -> None:
    too_wide = [line for line in text.splitlines() if len(line) > width]
    assert not too_wide, too_wide


def test_header_shows_short_node_id_listen_root_and_objects():
    text = format_status(doc())
    lines = text.splitlines()
    assert lines[0].split() == ["node", NODE_ID[:12], "listening", "on", "0.0.0.0:7787"]
    assert lines[1].split() == ["root", ROOT_HEX[:12], "123", "objects"]
    assert "no peers" in text
    assert NODE_ID not in text  # short ids only


def test_one_row_per_peer_in_80_columns_with_the_error_on_its_own_line():
    lines = table(doc(
        peer(),
        peer(node_id="ef" * 32, address="10.0.0.3:7787", source="static", state="disconnected",
             root=None, in_sync=False, last_sync=None, objects_sent=0, objects_received=0,
             error="cannot connect: Connection refused"),
    ))
    assert lines[0].split() == ["PEER", "ADDRESS", "STATE", "IN", "SYNC", "LAST", "SYNC", "SENT/RECV"]
    assert lines[1].split() == [PEER_ID[:12], "10.0.0.2:7787", "connected", "yes", "5m", "ago", "5/7"]
    assert lines[2].split() == ["efefefefefef", "10.0.0.3:7787", "disconnected", "no", "never", "0/0"]
    # The error is whole, under its row, starting under ADDRESS.
    assert lines[3] == " " * status_module.NOTE_INDENT + "cannot connect: Connection refused"
    assert len(lines) == 4
    # Columns line up: every row starts its ADDRESS at the same offset.
    assert lines[0].index("ADDRESS") == lines[1].index("10.0.0.2") == lines[2].index("10.0.0.3")


def test_the_default_table_fits_80_columns_at_its_widest():
    # The widest IPv4 address, the longest state, large counters, long
    # errors and a header with a long conflict name: still 80 columns.
    peers = [
        peer(node_id=f"{i:02x}" * 32, address="255.255.255.255:65535", state="disconnected", in_sync=False,
             objects_sent=12345, objects_received=6789, last_sync="2026-11-20T10:00:00+00:00",
             error="no word from the peer for 31 s " * 6)
        for i in range(3)
    ]
    text = format_status(doc(*peers, refs=2, conflicts=["projects/" + "x" * 150, "main"],
                             store_error="the store cannot be written now: " + "database or disk is full " * 4),
                         now=NOW)
    assert_fits(text)
    assert "255.255.255.255:65535" in text and "12345/6789" in text
    # The old table was ~150 columns: the wide one still has everything on the row.
    wide = format_status(doc(*peers), wide=True, now=NOW)
    assert any(len(line) > 150 for line in wide.splitlines())


def test_an_address_too_long_for_its_column_goes_on_a_line_of_its_own():
    address = "[fe80::1ff:fe23:4567:890a%enp0s31f6]:7787"
    text = format_status(doc(peer(address=address, objects_sent=123456, objects_received=654321)), now=NOW)
    assert_fits(text)
    lines = table(doc(peer(address=address, objects_sent=123456, objects_received=654321)))
    assert lines[1].split()[1] == "(below)"
    assert lines[2].strip() == f"address {address}"


def test_wide_shows_source_utc_times_and_whole_notes_on_the_row():
    error = "not a cluster member (TLS: tlsv1 alert unknown ca: self-signed certificate in certificate chain) " * 3
    lines = table(doc(peer(), peer(node_id="ef" * 32, source="static", state="disconnected", in_sync=False,
                                   error=error)), wide=True)
    assert lines[0].split() == ["PEER", "ADDRESS", "SOURCE", "STATE", "IN", "SYNC", "LAST", "SYNC",
                                "SENT/RECEIVED", "NOTE"]
    assert lines[1].split() == [PEER_ID[:12], "10.0.0.2:7787", "mdns", "connected", "yes",
                                "2026-11-24", "10:00:00Z", "5/7", "-"]
    assert lines[2].endswith(" ".join(error.split()))
    assert len(lines) == 3


def test_in_sync_is_yes_only_for_a_literal_true():
    for value in (None, "true", 1, False):
        for wide in (False, True):
            row = table(doc(peer(in_sync=value)), wide=wide)[1]
            assert row.split()[4 if wide else 3] == "no", value
    assert "in sync with the 1 connected peer" in format_status(doc(peer()))


def test_last_sync_is_relative_by_default_and_utc_in_wide():
    assert table(doc(peer(last_sync="2026-11-24T12:04:55+02:00")))[1].split()[4:6] == ["5s", "ago"]
    assert table(doc(peer(last_sync="2026-11-24T07:05:00+00:00")))[1].split()[4:6] == ["3h", "ago"]
    assert table(doc(peer(last_sync="2026-11-21T10:05:00+00:00")))[1].split()[4:6] == ["3d", "ago"]
    assert table(doc(peer(last_sync="2026-11-24T10:05:30+00:00")))[1].split()[4:6] == ["just", "now"]
    assert table(doc(peer(last_sync="not a time")))[1].split()[4:7] == ["not", "a", "time"]
    assert "2026-11-24 10:30:05Z" in table(doc(peer(last_sync="2026-11-24T12:30:05+02:00")), wide=True)[1]


def test_long_errors_are_wrapped_whole_not_cut_to_a_stub():
    # The old table cut this to "self-…" at the end of a 150-column row.
    error = "not a cluster member (TLS: certificate verify failed: self-signed certificate in certificate chain)"
    lines = table(doc(peer(state="disconnected", in_sync=False, error=error)))
    notes = lines[2:]
    assert 1 < len(notes) <= status_module.MAX_NOTE_LINES
    assert all(line.startswith(" " * status_module.NOTE_INDENT) for line in notes)
    assert " ".join(" ".join(notes).split()) == error
    assert_fits("\n".join(lines))


def test_an_error_beyond_the_note_lines_is_cut_at_a_word_and_whole_in_wide():
    error = "line one\nline two " + " ".join(f"word{i}" for i in range(200))
    lines = table(doc(peer(error=error)))
    notes = lines[2:]
    assert len(notes) == status_module.MAX_NOTE_LINES
    assert notes[0].strip().startswith("line one line two word0")
    assert notes[-1].endswith(" …")
    assert all(word.startswith("word") for word in notes[-1].split()[:-1])  # no half words
    assert_fits("\n".join(lines))
    assert table(doc(peer(error=error)), wide=True)[1].endswith("word199")


def test_a_peers_words_cannot_drive_the_terminal():
    lines = format_status(doc(peer(error="bad\x1b[2J\x1b[Hthing\x07", goodbye="bye\x1b]0;owned\x07",
                                   state="disconnected", address="10.0.0.2:1\x1b[31m")), now=NOW)
    assert "\x1b" not in lines and "\x07" not in lines
    assert "bad [2J [Hthing" in lines


def test_a_peer_that_left_says_so_with_its_reason():
    left = peer(state="disconnected", in_sync=False, goodbye="node stopping",
                disconnected_at="2026-11-24T10:03:00+00:00", error=None)
    lines = table(doc(left))
    assert lines[1].split()[2] == "left"
    assert lines[2].strip() == "left 2m ago: node stopping"
    assert "connection lost" not in "\n".join(lines)
    # Dialled again and refused meanwhile: both are said.
    lines = table(doc(dict(left, state="connecting", error="cannot connect: Connection refused")))
    assert [line.strip() for line in lines[2:]] == ["left 2m ago: node stopping", "cannot connect: Connection refused"]
    wide = table(doc(left), wide=True)[1]
    assert " left " in wide and wide.endswith("left 2026-11-24 10:03:00Z: node stopping")
    # A GOODBYE without a reason; and a stale goodbye on a connected row is not shown.
    assert table(doc(dict(left, goodbye="")))[2].strip() == "left 2m ago"
    assert table(doc(peer(goodbye="node stopping")))[1].split()[2] == "connected"
    assert len(table(doc(peer(goodbye="node stopping")))) == 2


def test_an_inbound_peer_shows_where_it_listens_when_it_said_so():
    inbound = peer(source="inbound", address="10.0.0.2:50123", listen="10.0.0.2:7787")
    assert table(doc(inbound))[1].split()[1] == "10.0.0.2:7787"
    assert table(doc(inbound), wide=True)[1].split()[1:3] == ["10.0.0.2:7787", "inbound"]
    # An older daemon (no listen field) or an older peer (null): where it came from.
    assert table(doc(peer(source="inbound", address="10.0.0.2:50123")))[1].split()[1] == "10.0.0.2:50123"
    assert table(doc(dict(inbound, listen=None)))[1].split()[1] == "10.0.0.2:50123"


@pytest.mark.parametrize(
    ("peers", "summary"),
    [
        ([], "no peers"),
        ([peer()], "in sync with the 1 connected peer"),
        ([peer(), peer(node_id="ef" * 32)], "in sync with all 2 connected peers"),
        ([peer(), peer(node_id="ef" * 32, in_sync=False)], "not in sync: 1 of 2 connected peers in sync"),
        ([peer(in_sync=False)], "not in sync: 0 of 1 connected peer in sync"),
        ([peer(), peer(node_id="ef" * 32, state="disconnected", in_sync=False)],
         "in sync with the 1 connected peer; 1 not connected"),
        ([peer(state="connecting", in_sync=False), peer(state="disconnected", in_sync=False)],
         "no peer connected (2 not connected)"),
        # Known but not dialled (the overlay's choice) is said apart.
        ([peer(), peer(node_id="ef" * 32, state="known", in_sync=False),
          peer(node_id="ab" * 32, state="disconnected", in_sync=False)],
         "in sync with the 1 connected peer; 1 not connected, 1 known, not dialled"),
        ([peer(state="known", in_sync=False)], "no peer connected (1 known, not dialled)"),
    ],
)
def test_the_sync_line_counts_connected_peers(peers, summary):
    assert f"sync     {summary}" in format_status(doc(*peers)).splitlines()


@pytest.mark.parametrize(
    ("peers", "allow_alone", "problem"),
    [
        ([peer()], False, None),
        ([peer(), peer(state="disconnected", in_sync=False)], False, None),  # not connected: not counted
        ([peer(), peer(in_sync=False)], False, "1 of 2 connected peers not in sync"),
        ([peer(in_sync=None)], True, "1 of 1 connected peer not in sync"),
        ([peer(in_sync="true")], False, "1 of 1 connected peer not in sync"),
        ([], False, "no peer is connected"),
        ([peer(state="connecting", in_sync=False)], False, "no peer is connected"),
        ([], True, None),
        ([peer(state="disconnected", in_sync=False)], True, None),
        (["junk", {"state": "connected"}], False, "1 of 1 connected peer not in sync"),
    ],
)
def test_sync_problem_judges_connected_peers_only(peers, allow_alone, problem):
    assert status_module.sync_problem(doc(*peers), allow_alone=allow_alone) == problem


def test_sync_problem_of_a_document_that_is_not_one():
    assert status_module.sync_problem({}) == "no peer is connected"
    assert status_module.sync_problem({"peers": "x"}, allow_alone=True) is None
    assert status_module.sync_problem(None) == "no peer is connected"


def test_odd_or_missing_fields_render_without_failing():
    text = format_status({"schema": 3, "peers": [{"node_id": None}, "not a peer",
                                                  {"state": "disconnected", "goodbye": 5, "disconnected_at": 7}]})
    assert "status schema 3" in text
    assert "?" in text
    assert len(text.splitlines()) >= 7
    assert format_status({}).splitlines()[0].startswith("node")
    assert format_status({"peers": [{"goodbye": "x", "disconnected_at": "junk"}]}, wide=True)


# --------------------------------------------------------------------------
# ctxfs status
# --------------------------------------------------------------------------


def one_line_error(err: str, needle: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ctxfs: ") and needle in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("flags", [[], ["--json"], ["--watch"], ["--wait"], ["--wait", "--timeout", "5"]],
                         ids=lambda f: " ".join(f) or "plain")
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
        wide_code, wide, _ = run(home, "status", "--wide")
    # The fake daemon's one peer is connected and not in sync.
    assert (code, err) == (status_module.EXIT_NOT_IN_SYNC, "")
    assert out == expected + "\n"
    assert PEER_ID[:12] in out and "10.0.0.2:7787" in out
    assert wide_code == 3 and wide.splitlines()[-2].split()[-1] == "NOTE"


def test_status_watch_refreshes_until_ctrl_c(home, run, monkeypatch):
    shown = []

    def fake_format(status, **_options):
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


# --------------------------------------------------------------------------
# exit statuses, --wait
# --------------------------------------------------------------------------


def serving(daemon: DaemonThread, *documents: dict) -> list[int]:
    """Make the fake daemon answer STATUS with `documents` in turn (the last
    one from then on); returns the list whose length counts the requests."""
    asked: list[int] = []

    def status() -> dict:
        asked.append(1)
        return documents[min(len(asked), len(documents)) - 1]

    daemon.node.status = status
    return asked


@pytest.mark.parametrize(
    ("peers", "flags", "expected"),
    [
        ([peer()], [], 0),
        ([peer(), peer(node_id="ef" * 32, in_sync=False)], [], 3),
        ([peer(in_sync=False), peer(node_id="ef" * 32, in_sync=False)], [], 3),  # the "0 of 2"
        ([peer(), peer(node_id="ef" * 32, state="disconnected", in_sync=False)], [], 0),
        ([], [], 3),
        ([], ["--allow-alone"], 0),
        ([peer(state="connecting", in_sync=False)], ["--allow-alone"], 0),
        ([peer(in_sync=False)], ["--allow-alone"], 3),
        ([peer(in_sync=False)], ["--json"], 0),  # the document says it per peer
        ([peer(in_sync=False)], ["--wide"], 3),
    ],
)
def test_status_exits_0_in_sync_and_3_when_not(home, run, peers, flags, expected):
    with DaemonThread(home) as daemon:
        serving(daemon, doc(*peers))
        code, out, err = run(home, "status", *flags)
    assert (code, err) == (expected, "")
    assert out.strip()


def test_wait_returns_0_as_soon_as_every_connected_peer_is_in_sync(home, run, monkeypatch):
    monkeypatch.setattr(cli, "WAIT_INTERVAL", 0.01)
    behind = doc(peer(), peer(node_id="ef" * 32, in_sync=False, root=OTHER_ROOT))
    alone = doc()
    synced = doc(peer(), peer(node_id="ef" * 32), peer(node_id="01" * 32, state="disconnected", in_sync=False))
    with DaemonThread(home) as daemon:
        asked = serving(daemon, alone, behind, behind, synced, behind)
        code, out, err = run(home, "status", "--wait")
    assert (code, err) == (0, "")
    assert len(asked) == 4  # not before, and not one request more
    assert "in sync with all 2 connected peers; 1 not connected" in out  # the status it ended on
    assert out.count("\n") == len(format_status(synced).splitlines())  # shown once


def test_wait_json_prints_the_document_it_ended_on(home, run, monkeypatch):
    monkeypatch.setattr(cli, "WAIT_INTERVAL", 0.01)
    synced = doc(peer())
    with DaemonThread(home) as daemon:
        serving(daemon, doc(peer(in_sync=False)), synced)
        code, out, err = run(home, "status", "--wait", "--json", "--timeout", "60")
    assert (code, err) == (0, "")
    assert json.loads(out) == synced


def test_wait_needs_a_connected_peer_unless_allowed_alone(home, run, monkeypatch):
    monkeypatch.setattr(cli, "WAIT_INTERVAL", 0.01)
    with DaemonThread(home) as daemon:
        asked = serving(daemon, doc(), doc(), doc(peer()))
        assert run(home, "status", "--wait")[0] == 0
        assert len(asked) == 3
        asked.clear()
        serving(daemon, doc())
        code, out, err = run(home, "status", "--wait", "--allow-alone")
    assert (code, err) == (0, "") and "no peers" in out


def test_wait_exits_1_at_the_timeout_with_one_line_saying_why(home, run, monkeypatch):
    monkeypatch.setattr(cli, "WAIT_INTERVAL", 0.01)
    behind = doc(peer(), peer(node_id="ef" * 32, in_sync=False))
    with DaemonThread(home) as daemon:
        asked = serving(daemon, behind)
        code, out, err = run(home, "status", "--wait", "--timeout", "0.2")
        zero = run(home, "status", "--wait", "--timeout", "0", "--json")
    assert code == 1
    one_line_error(err, "not in sync after 0.2 s: 1 of 2 connected peers not in sync")
    assert "not in sync: 1 of 2 connected peers in sync" in out  # the last status is shown
    assert len(asked) > 1  # it asked again before giving up
    assert zero[0] == 1 and json.loads(zero[1]) == behind
    one_line_error(zero[2], "not in sync after 0 s")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--timeout", "3"], "--timeout goes with --wait"), (["--wait", "--timeout", "-1"], "must be a finite number"),
     (["--wait", "--timeout", "nan"], "must be a finite number"), (["--wait", "--watch"], "not allowed with")],
)
def test_status_options_that_do_not_go_together(home, run, capsys, flags, needle):
    with DaemonThread(home):
        try:
            code, out, err = run(home, "status", *flags)
        except SystemExit as exc:  # argparse's own refusals
            code, out, err = exc.code, "", capsys.readouterr().err
    assert code in (1, 2) and out == ""
    assert needle in err and "Traceback" not in err
