"""A LAN of network-namespace hosts (scripts/netns-cluster) with real daemons on it.

Each host `PREFIX-hI` has eth0 = 10.77.0.I/24 on a bridge in a namespace of
its own; nothing is made in the namespace the tests run in. Every bed gets
its own prefix (`ctxfs-t<pid>-<n>`), so two test runs on one machine never
share one, and a bed left behind by a killed run is removed by the next run.

Daemons run as `ip netns exec PREFIX-hI ctxfs --home H daemon --listen
10.77.0.I:7787 --mdns-interface 10.77.0.I` (no --peer: they find each other
through mDNS). Unix sockets and files are shared across network namespaces,
so `ctxfs --home H status` and the API client work from here.

The `bed` fixture (import it into the test module) skips with the reason
when the bed cannot be made (not root, no `ip`, no `ip netns`), and always
kills the daemons and deletes the namespaces, whatever the test did.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from process_helpers import CTXFS, START_BOUND, Daemon, _env, ctxfs, quick_status, wait_until

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "netns-cluster"
SUBNET = "10.77.0"
PORT = 7787
SCRIPT_BOUND = 30.0
# Test daemons: re-announce often, so that a host back on the LAN is seen
# soon; a short heartbeat, so that a host gone silent is dropped soon.
DAEMON_CONFIG = "mdns_announce_seconds = 2\nping_seconds = 0.5\nidle_timeout_seconds = 2.5\n"

_beds = itertools.count(1)


def unavailable() -> str | None:
    """Why no bed can be made here, or None."""
    if os.geteuid() != 0:
        return "network-namespace bed needs root (ip netns); CI runs as root"
    if shutil.which("ip") is None:
        return "network-namespace bed needs `ip` (apt install iproute2)"
    probe = f"ctxfs-probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=SCRIPT_BOUND)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=SCRIPT_BOUND)
    return None


def _remove_stale_beds() -> None:
    """Delete beds (and probes) of test runs whose process is gone."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=SCRIPT_BOUND)
    for line in listing.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(r"ctxfs-(?:t(\d+)-\d+-(?:br|h\d+)|probe(\d+))", name)
        if match is None:
            continue
        pid = int(match.group(1) or match.group(2))
        try:
            os.kill(pid, 0)
            continue  # its run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=SCRIPT_BOUND)


class NetnsDaemon(Daemon):
    """A `ctxfs daemon` on host I of a bed, found by mDNS only."""

    def __init__(self, bed: Bed, index: int, home: Path, name: str) -> None:
        super().__init__(home, bed.logs, name)
        self.bed = bed
        self.index = index
        (home / "config.toml").write_text(DAEMON_CONFIG)

    @property
    def address(self) -> str:
        return self.bed.address(self.index)

    def start(self, peers=(), *, wait: bool = True, bound: float = START_BOUND) -> NetnsDaemon:
        assert not peers, "bed daemons find each other through mDNS"
        assert not self.running, f"{self.name} is already running"
        self.starts += 1
        self._log_path = self.log_dir / f"{self.name}.{self.starts}.log"
        argv = ["ip", "netns", "exec", self.bed.host(self.index),
                str(CTXFS), "--home", str(self.home), "daemon",
                "--listen", f"{self.address}:{PORT}", "--mdns-interface", self.address]
        with open(self._log_path, "wb") as log:
            # `ip netns exec` execs ctxfs: the pid is the daemon's own.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=_env(), start_new_session=True)
        if wait:
            self.wait_ready(bound)
        return self

    def quick_status(self) -> dict | None:
        """The status straight from the API socket (milliseconds; None if not answering)."""
        return quick_status(self.home)


class Bed:
    """One netns LAN: hosts, homes, daemons; `close()` undoes everything."""

    def __init__(self, root: Path) -> None:
        self.prefix = f"ctxfs-t{os.getpid()}-{next(_beds)}"
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.daemons: list[NetnsDaemon] = []
        self.hosts = 0
        self._keys: dict[str, Path] = {}

    # ------------------------------------------------------------ the network

    def script(self, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, CTXFS_NETNS_PREFIX=self.prefix, CTXFS_NETNS_SUBNET=SUBNET)
        result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=SCRIPT_BOUND)
        if result.returncode != 0:
            raise AssertionError(f"netns-cluster {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def up(self, hosts: int) -> None:
        self.script("up", str(hosts))
        self.hosts = max(self.hosts, hosts)

    def host(self, index: int) -> str:
        return f"{self.prefix}-h{index}"

    def address(self, index: int) -> str:
        return f"{SUBNET}.{index}"

    def link(self, index: int, state: str) -> None:
        """`ip -n HOST link set eth0 up|down`."""
        assert state in ("up", "down")
        subprocess.run(["ip", "-n", self.host(index), "link", "set", "eth0", state],
                       check=True, capture_output=True, timeout=SCRIPT_BOUND)

    # ------------------------------------------------------------ nodes

    def home(self, name: str, cluster: str = "main") -> Path:
        """An initialised home in cluster `cluster` (the first home of a cluster makes its key)."""
        home = self.root / name
        key = self._keys.get(cluster)
        if key is None:
            ctxfs(home, "init")
            key = self._keys[cluster] = self.root / f"{cluster}.key"
            key.write_text(ctxfs(home, "cluster-key").stdout)
        else:
            ctxfs(home, "init", "--cluster-key-file", str(key))
        return home

    def daemon(self, index: int, *, cluster: str = "main", start: bool = True, wait: bool = True) -> NetnsDaemon:
        """A daemon on host `index` with a new home in `cluster`."""
        assert 1 <= index <= self.hosts, f"host {index} is not up"
        daemon = NetnsDaemon(self, index, self.home(f"h{index}", cluster), f"h{index}")
        self.daemons.append(daemon)
        if start:
            daemon.start(wait=wait)
        return daemon

    def stderr(self) -> str:
        return "\n".join(d.stderr() for d in self.daemons)

    def statuses(self) -> str:
        lines = []
        for d in self.daemons:
            status = d.quick_status() if d.running else None
            lines.append(f"{d.name}: {json.dumps(status) if status else 'not answering'}")
        return "\n".join(lines)

    def close(self) -> None:
        """Kill and reap every daemon, then delete every namespace of the bed."""
        for daemon in self.daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.proc.kill()
        for daemon in self.daemons:
            if daemon.proc is not None:
                daemon.proc.wait()
        self.script("down")


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    """A Bed whose daemons are killed and namespaces deleted after the test, pass or fail.

    Skips with the reason where no bed can be made. The daemons' stderr is
    printed at teardown: pytest shows it for a failed test.
    """
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    _remove_stale_beds()
    group = Bed(tmp_path / "n")  # short paths: the API socket path must fit in sun_path
    try:
        yield group
    finally:
        try:
            group.close()
        finally:
            print(group.stderr())


def wait_for(predicate, bound: float, message, poll: float = 0.05):
    """wait_until with a short poll, for the quick (API socket) statuses."""
    return wait_until(predicate, bound, poll=poll, message=message)
