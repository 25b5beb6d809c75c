"""`ctxfs daemon` as a user meets it: which home it runs on, what its
mistakes say, and how much it logs (-v, -q), with a time on every line.

Daemons here are real processes on 127.0.0.1 with mDNS off; each test
stops (and if need be kills) what it started.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from daemon import cli
from node_helpers import context
from process_helpers import CTXFS, START_BOUND, STOP_BOUND, cluster, wait_until  # noqa: F401  (cluster: a fixture)
from sync.codec import context_to_json

# `2026-11-24 10:00:00.123+01:00 INFO daemon.node: ...`
STAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) daemon\.")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CTXFS_HOME", "JOURNAL_STREAM")}
    env.update(extra)
    return env


@contextlib.contextmanager
def daemon(args: Sequence[str], log: Path, *, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`ctxfs ARGS` running until the block ends (SIGTERM, then SIGKILL); always reaped."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(CTXFS), *args], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=env or clean_env(), start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_BOUND)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(proc: subprocess.Popen, status_args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Until `ctxfs STATUS_ARGS status --json` answers; the status document."""

    def ready() -> dict | None:
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited {proc.returncode}\n{log.read_text(errors='replace')}")
        result = subprocess.run([str(CTXFS), *status_args, "status", "--json"], capture_output=True, text=True,
                                env=env or clean_env(), timeout=START_BOUND)
        return json.loads(result.stdout) if result.returncode == 0 else None

    return wait_until(ready, START_BOUND, poll=0.1, message=lambda: log.read_text(errors="replace"))


def run_in_process(capsys, *argv: str) -> tuple[int, str]:
    """cli.main for commands that end before any daemon runs: (exit status, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main(list(argv), out=io.StringIO())
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ctxfs: ")
    return lines[0]


# --------------------------------------------------------------------------
# which home
# --------------------------------------------------------------------------


def test_a_mistyped_home_is_refused_and_not_created(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CTXFS_HOME", raising=False)
    typo = tmp_path / "contxtfs"
    code, err = run_in_process(capsys, "--home", str(typo), "daemon", "--listen", "127.0.0.1:0", "--no-mdns")
    assert code == 1
    line = one_line(err)
    assert f"no ctxfs node at {typo}" in line and f"`ctxfs --home {typo} init`" in line and "--init" in line
    assert not typo.exists()


def test_a_home_from_the_environment_is_refused_the_same_way(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CTXFS_HOME", str(tmp_path / "elsewhere"))
    code, err = run_in_process(capsys, "daemon", "--no-mdns")
    assert code == 1 and "run `ctxfs --home" in one_line(err)
    assert not (tmp_path / "elsewhere").exists()


def test_an_empty_directory_is_no_node_either(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CTXFS_HOME", raising=False)
    (tmp_path / "empty").mkdir()
    code, err = run_in_process(capsys, "--home", str(tmp_path / "empty"), "daemon", "--no-mdns")
    assert code == 1 and "no ctxfs node at" in one_line(err)
    assert list((tmp_path / "empty").iterdir()) == []


def test_init_makes_the_node_of_a_named_home(tmp_path):
    home, log = tmp_path / "h", tmp_path / "d.log"
    with daemon(["--home", str(home), "daemon", "--init", "--listen", "127.0.0.1:0", "--no-mdns"], log) as proc:
        status = wait_ready(proc, ["--home", str(home)], log)
    assert proc.returncode == 0
    assert (home / "cluster.key").exists() and (home / "node.key").exists() and (home / "store.db").exists()
    assert "first run: made a new node in a new cluster at" in log.read_text()
    # Again: the node exists, nothing is made anew.
    with daemon(["--home", str(home), "daemon", "--init", "--listen", "127.0.0.1:0", "--no-mdns"], log) as proc:
        assert wait_ready(proc, ["--home", str(home)], log)["node_id"] == status["node_id"]
    assert "first run" not in log.read_text()


def test_the_default_home_is_made_on_first_run(tmp_path):
    """The README's first command, `ctxfs daemon`, on a machine that never ran ctxfs
    (here: a user data dir of its own; on 127.0.0.1 without mDNS, as tests must)."""
    env = clean_env(XDG_DATA_HOME=str(tmp_path / "data"), HOME=str(tmp_path))
    log = tmp_path / "d.log"
    with daemon(["daemon", "--listen", "127.0.0.1:0", "--no-mdns"], log, env=env) as proc:
        status = wait_ready(proc, [], log, env)
    home = tmp_path / "data" / "ctxfs"
    assert proc.returncode == 0, log.read_text()
    assert (home / "node.key").exists() and status["node_id"]
    assert oct((home).stat().st_mode & 0o777) == "0o700"
    assert f"first run: made a new node in a new cluster at {home}" in log.read_text()


# --------------------------------------------------------------------------
# mistakes named
# --------------------------------------------------------------------------


def test_a_peer_given_as_a_port_only_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CTXFS_HOME", raising=False)
    assert run_in_process(capsys, "--home", str(tmp_path / "h"), "init")[0] == 0
    code, err = run_in_process(capsys, "--home", str(tmp_path / "h"), "daemon", "--no-mdns", "--peer", "17702")
    assert code == 1 and "peer: '17702' is a port without a host" in one_line(err)


def test_a_port_in_use_names_the_address(tmp_path):
    home, log = tmp_path / "h", tmp_path / "d.log"
    assert run_quiet(["--home", str(home), "init"]).returncode == 0
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_quiet(["--home", str(home), "daemon", "--listen", f"127.0.0.1:{port}", "--no-mdns"])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"ctxfs: cannot listen on 127.0.0.1:{port}: address already in use; "), last
    assert "--listen" in last
    assert not (home / "api.sock").exists()  # it cleaned up after itself


def run_quiet(args: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(CTXFS), *args], capture_output=True, text=True, env=clean_env(), timeout=START_BOUND)


# --------------------------------------------------------------------------
# how much it logs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("flags, shown, hidden", [
    ([], {"INFO"}, {"DEBUG"}),
    (["-v"], {"INFO", "DEBUG"}, set()),
    (["-q"], set(), {"INFO", "DEBUG"}),
], ids=["default", "verbose", "quiet"])
def test_verbose_and_quiet_set_what_is_logged_and_every_line_has_its_time(tmp_path, flags, shown, hidden):
    home, log = tmp_path / "h", tmp_path / "d.log"
    assert run_quiet(["--home", str(home), "init"]).returncode == 0
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # never listens: dials fail (a DEBUG line each, one WARNING)
    try:
        peer = f"127.0.0.1:{refused.getsockname()[1]}"
        args = ["--home", str(home), "daemon", *flags, "--listen", "127.0.0.1:0", "--no-mdns", "--peer", peer]
        with daemon(args, log) as proc:
            wait_ready(proc, ["--home", str(home)], log)
            wait_until(lambda: "WARNING" in log.read_text(), START_BOUND, message=lambda: log.read_text())
            if "DEBUG" in shown:
                wait_until(lambda: "DEBUG" in log.read_text(), START_BOUND, message=lambda: log.read_text())
    finally:
        refused.close()
    lines = log.read_text().splitlines()
    levels = {line.split(" ")[2] for line in lines}
    assert shown <= levels and not hidden & levels, lines
    assert all(STAMPED.match(line) for line in lines), lines
    assert any(f"peer {peer} (static): cannot connect: connection refused" in line for line in lines)


def test_a_sync_between_daemons_is_one_line_with_what_moved(cluster):
    """What a user of two daemons sees: a line saying how many objects came."""
    a = cluster.daemon("a")
    lines = "".join(json.dumps(context_to_json(context(f"fact {i}"))) + "\n" for i in range(200))
    a.ctxfs("push", "-", input=lines)
    b = cluster.daemon("b", peers=[a])
    a_id = a.status()["node_id"]

    def line() -> str | None:
        return next((x for x in b.stderr().splitlines() if "received 200 objects" in x), None)

    found = wait_until(line, START_BOUND, message=lambda: b.stderr())
    assert STAMPED.match(found), found
    assert f"INFO daemon.peer: peer {a_id[:12]} ({a.listen}): in sync after " in found
    assert found.endswith("sent 0 objects (0 B)")
