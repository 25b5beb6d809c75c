"""Run real `ctxfs` processes (daemons and commands) inside a test.

Each daemon is its own process with its own home, listening on 127.0.0.1 on
a port the kernel picks; peers are given with --peer. Every wait is a poll
with a bound: the bound only keeps a broken daemon from hanging the suite,
and on expiry the daemon's stderr is in the failure message.

The `cluster` fixture (import it into the test module that uses it) kills
and reaps every process it started, whatever the test did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

# The console script of the venv the tests run in.
CTXFS = Path(sys.executable).parent / "ctxfs"
# How long a daemon may take from exec to answering `status` with its port.
START_BOUND = 20.0
# How long a daemon may take to stop after SIGTERM before it is killed.
STOP_BOUND = 10.0
# How long one CLI command may run.
COMMAND_BOUND = 60.0

T = TypeVar("T")


def ctxfs(home: Path | None, *args: str, input: str | None = None, check: bool = True,
          timeout: float = COMMAND_BOUND) -> subprocess.CompletedProcess:
    """Run one `ctxfs [--home HOME] ARGS...` command to completion; text output."""
    argv = [str(CTXFS)] + (["--home", str(home)] if home is not None else []) + list(args)
    result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                            env=_env())
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv[1:])} exited {result.returncode}\n"
            f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
        )
    return result


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CTXFS_HOME", None)  # --home always names the node
    return env


def wait_until(predicate: Callable[[], T], bound: float, *, poll: float = 0.05,
               message: str | Callable[[], str] = "condition not met") -> T:
    """Call `predicate` until it returns something truthy, and return that.

    Raises AssertionError after `bound` seconds; `message` (or its result) says why.
    An exception from the predicate propagates at once.
    """
    deadline = time.monotonic() + bound
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"not within {bound} s: {text}")
        time.sleep(poll)


class Daemon:
    """One `ctxfs daemon` process on a home; restartable on the same home."""

    def __init__(self, home: Path, log_dir: Path, name: str) -> None:
        self.home = home
        self.name = name
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.peers: list[str] = []
        self.listen: str | None = None
        self.starts = 0
        self._log_path: Path | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, peers: Sequence[str] = (), *, wait: bool = True, bound: float = START_BOUND,
              listen: str = "127.0.0.1:0") -> Daemon:
        """Start the daemon (it must not be running); wait until it answers `status`."""
        assert not self.running, f"{self.name} is already running"
        self.peers = list(peers)
        self.starts += 1
        self.listen = None
        self._log_path = self.log_dir / f"{self.name}.{self.starts}.log"
        argv = [str(CTXFS), "--home", str(self.home), "daemon", "--listen", listen, "--no-mdns"]
        for peer in self.peers:
            argv += ["--peer", peer]
        with open(self._log_path, "wb") as log:
            # Its own session: a Ctrl-C on the test run goes to pytest, which
            # then stops the daemons through the fixture.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=_env(), start_new_session=True)
        if wait:
            self.wait_ready(bound)
        return self

    def wait_ready(self, bound: float = START_BOUND) -> str:
        """Until `status --json` answers with a listen address; returns it ("127.0.0.1:PORT")."""

        def ready() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode} while starting\n{self.stderr()}")
            try:
                result = ctxfs(self.home, "status", "--json", check=False, timeout=bound)
            except subprocess.TimeoutExpired:
                return None  # a daemon that accepts but does not answer: the bound decides
            if result.returncode != 0:
                return None
            return json.loads(result.stdout).get("listen")

        self.listen = wait_until(ready, bound, poll=0.1,
                                 message=lambda: f"{self.name} did not answer status\n{self.stderr()}")
        return self.listen

    def stop(self, bound: float = STOP_BOUND) -> int:
        """SIGTERM, wait up to `bound`, then SIGKILL; always reaped. Returns the exit status."""
        if self.proc is None:
            raise AssertionError(f"{self.name} was never started")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(bound)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL and reap: a crash as the kernel sees it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait() if self.proc is not None else 0

    def restart(self, peers: Sequence[str] | None = None, **kwargs) -> Daemon:
        """Start again on the same home (after stop or kill); same peers unless given."""
        if self.running:
            self.stop()
        return self.start(self.peers if peers is None else peers, **kwargs)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    # ------------------------------------------------------------ commands

    def ctxfs(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return ctxfs(self.home, *args, **kwargs)

    def status(self) -> dict:
        return json.loads(self.ctxfs("status", "--json").stdout)

    def stderr(self) -> str:
        """What every start of this daemon wrote to stderr (the last 8 KB)."""
        parts = []
        for n in range(1, self.starts + 1):
            path = self.log_dir / f"{self.name}.{n}.log"
            if path.exists():
                parts.append(f"--- {self.name} start {n} stderr ---\n" + path.read_text(errors="replace")[-8192:])
        return "\n".join(parts)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Daemon {self.name} {state} listen={self.listen}>"


class Cluster:
    """Homes under one directory, one cluster key, and the daemons on them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.daemons: list[Daemon] = []
        self._key_file: Path | None = None

    def home(self, name: str) -> Path:
        """An initialised home in the cluster (the first `init` makes the cluster key)."""
        home = self.root / name
        if self._key_file is None:
            ctxfs(home, "init")
            self._key_file = self.root / "cluster.key"
            self._key_file.write_text(ctxfs(home, "cluster-key").stdout)
        else:
            ctxfs(home, "init", "--cluster-key-file", str(self._key_file))
        return home

    def daemon(self, name: str, peers: Sequence[str | Daemon] = (), *, start: bool = True) -> Daemon:
        """A daemon on a new home `name`; peers may be addresses or running daemons."""
        daemon = Daemon(self.home(name), self.logs, name)
        self.daemons.append(daemon)
        if start:
            daemon.start([p.listen if isinstance(p, Daemon) else p for p in peers])
        return daemon

    def stderr(self) -> str:
        return "\n".join(d.stderr() for d in self.daemons)

    def close(self) -> None:
        """Kill every process still running and reap it."""
        for daemon in self.daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.proc.kill()
        for daemon in self.daemons:
            if daemon.proc is not None:
                daemon.proc.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A Cluster in tmp_path whose processes are killed and reaped after the test, pass or fail.

    The daemons' stderr is printed at teardown: pytest shows it for a failed test.
    """
    # Short paths: the API socket path must fit in sun_path (108 bytes).
    group = Cluster(tmp_path / "c")
    try:
        yield group
    finally:
        group.close()
        print(group.stderr())


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held open together, so all distinct)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def read_store_ids(store: Path) -> set[str]:
    """The ids in a store.db as hex, read with the sqlite3 module (not through ctxfs).

    Opened read-write, as the daemon would: after a crash the first opener
    recovers the WAL.
    """
    import sqlite3

    db = sqlite3.connect(store)
    try:
        return {row[0].hex() for row in db.execute("SELECT id FROM contexts")}
    finally:
        db.close()


def quick_status(home: Path) -> dict | None:
    """The status document straight from the daemon's API socket, without a new process.

    Milliseconds instead of a CLI start: for polls that must catch a moment
    (a transfer under way). None when no daemon answers.
    """
    import trio

    from daemon.localapi import DaemonNotRunning, LocalClient
    from daemon.paths import HomePaths

    async def ask() -> dict | None:
        try:
            async with LocalClient.connect(HomePaths(home)) as client:
                return await client.status()
        except DaemonNotRunning:
            return None

    return trio.run(ask)
