"""Syncthing as a reference for `scripts/bench node`: the same bytes, as files, copied A -> empty B.

Two Syncthing instances on 127.0.0.1, each with its own home, know each
other only by explicit tcp://127.0.0.1:PORT addresses. Everything that
would reach past this machine is switched off in config.xml before the
first start: global and local discovery, relays, NAT traversal (UPnP,
NAT-PMP), usage and crash reporting, upgrades; the listener is TCP only
(no QUIC, so no STUN). STMONITORED=1 makes the started process the
worker itself (no monitor parent and no restarts); setLowPriority is
off so that it competes for the CPU as a ctxfs daemon does.

A shares one folder send-only, B receive-only: the same one-way copy into
an empty peer that the ctxfs figures time, and nothing B does can flow
back to A. The file-system watcher is off and periodic rescans are off
(rescanIntervalS=0); each instance scans its folder once when it starts.
A's scan (the hashing, as A's ctxfs store is filled before B starts) is
waited for before B is started and is not timed.

Timed, per run: from B's connection to A (the time of B's DeviceConnected
event, from its REST /rest/events, on the same wall clock as this
process) until B's /rest/db/status has every file of the global state
locally with nothing needed; and from B's process start to the same
point, the figure most like ctxfs's own (which starts B's process too).
B's files are then compared byte for byte with what A was given. Both
processes are stopped and reaped and both homes removed, whatever
happens.
"""

from __future__ import annotations

import copy
import functools
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import attrs

FOLDER_ID = "bench"
# B is asked every 10 ms while it pulls, as ctxfs's B is.
POLL_SECONDS = 0.01
# Hashing 100,000 small files (or 200 MB) on a busy 2-core machine.
SCAN_BOUND = 900.0
# Both instances dial at start; a miss would only be retried after
# reconnectionIntervalS (60 s), so past this the setup is broken.
CONNECT_BOUND = 60.0
# From SIGTERM until SIGKILL when stopping an instance.
STOP_GRACE = 10.0
# Syncthing's own directories at the top of a folder (a leftover temporary
# file, .syncthing.NAME.tmp, is not skipped: it means B is not complete).
SYNCTHING_DIRS = re.compile(r"^\.st(folder|versions)$")

# STMONITORED: the started process is the worker itself (no monitor parent
# that restarts it or uploads crash reports).
ENV = {"STMONITORED": "1", "STNORESTART": "1", "STNOUPGRADE": "1", "STNODEFAULTFOLDER": "1"}
# What a timeout reports of a folder's /rest/db/status.
STATUS_KEYS = ("state", "globalFiles", "localFiles", "needTotalItems", "globalBytes", "inSyncBytes", "pullErrors")

OPTIONS = {
    "globalAnnounceEnabled": "false",
    "localAnnounceEnabled": "false",
    "relaysEnabled": "false",
    "natEnabled": "false",
    "announceLANAddresses": "false",
    "urAccepted": "-1",  # usage reporting declined
    "crashReportingEnabled": "false",
    "autoUpgradeIntervalH": "0",
    "startBrowser": "false",
    "setLowPriority": "false",
}


class SyncthingError(Exception):
    """A Syncthing run that did not get to a checked, complete B."""


@attrs.frozen(kw_only=True)
class SyncthingRun:
    files: int
    bytes: int
    connected_to_complete_seconds: float
    b_start_to_complete_seconds: float
    b_start_to_connected_seconds: float
    a_scan_seconds: float  # not part of either timed figure
    b_bytes_in: int  # Syncthing's own inBytesTotal for B's connection to A
    cpu_seconds_a: float  # from B's start until B is complete
    cpu_seconds_b: float


@attrs.frozen(kw_only=True)
class SyncthingCli:
    executable: str
    version: str
    subcommands: bool  # `syncthing generate|serve` (as 1.19 has) rather than the older `syncthing --generate=DIR`

    def generate(self, home: Path) -> list[str]:
        if self.subcommands:
            return [self.executable, "generate", f"--home={home}", "--no-default-folder", "--skip-port-probing"]
        return [self.executable, f"--generate={home}"]

    def serve(self, home: Path) -> list[str]:
        flags = [f"--home={home}", "--no-browser"]  # no restarts, no upgrades: see ENV
        return [self.executable, "serve", *flags] if self.subcommands else [self.executable, *flags]



@functools.cache
def find_or_install() -> SyncthingCli | None:
    """The installed Syncthing, after `apt-get install -y syncthing` if it is missing; None if it cannot be had."""
    if shutil.which("syncthing") is None:
        print("syncthing is not installed: apt-get install -y syncthing ...", file=sys.stderr, flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "syncthing"]
        try:
            if subprocess.run(install, env=env, capture_output=True).returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
                subprocess.run(install, env=env, capture_output=True)
        except OSError:
            pass
    executable = shutil.which("syncthing")
    if executable is None:
        print("syncthing reference skipped: `apt-get install -y syncthing` did not install it", file=sys.stderr, flush=True)
        return None
    version = subprocess.run([executable, "--version"], capture_output=True, text=True).stdout.strip()
    usage = subprocess.run([executable, "--help"], capture_output=True, text=True)
    subcommands = re.search(r"^\s+generate\b", usage.stdout + usage.stderr, re.M) is not None
    return SyncthingCli(executable=executable, version=version, subcommands=subcommands)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Instance:
    """One Syncthing process: its home (keys, config, database, log), its folder, its REST API."""

    def __init__(self, cli: SyncthingCli, root: Path, name: str) -> None:
        self.cli = cli
        self.name = name
        self.home = root / f"{name}-home"
        self.folder = root / f"{name}-folder"
        self.gui_port = free_port()
        self.listen_port = free_port()
        self.api_key = secrets.token_hex(16)
        self.device_id = ""
        self._event_seen = 0
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._http: http.client.HTTPConnection | None = None

    def generate(self) -> None:
        done = subprocess.run(self.cli.generate(self.home), env=self._env(), capture_output=True, text=True)
        if done.returncode != 0:
            raise SyncthingError(f"{self.name}: generating a home failed: {(done.stdout + done.stderr).strip()[-300:]}")
        devices = ET.parse(self.home / "config.xml").getroot().findall("device")
        if len(devices) != 1:
            raise SyncthingError(f"{self.name}: expected one device in the generated config, found {len(devices)}")
        self.device_id = devices[0].get("id")
        self.folder.mkdir(exist_ok=True)
        (self.folder / ".stfolder").mkdir(exist_ok=True)

    def configure(self, peer: Instance, folder_type: str) -> None:
        """Rewrite the generated config.xml: the peer, one shared folder, 127.0.0.1 only, nothing outside."""
        path = self.home / "config.xml"
        tree = ET.parse(path)
        root = tree.getroot()
        defaults = root.find("defaults")  # the installed version's own defaults (1.13+), else bare elements
        device_default = defaults.find("device") if defaults is not None else None
        folder_default = defaults.find("folder") if defaults is not None else None

        me = root.find("device")
        me.set("name", self.name)
        other = copy.deepcopy(device_default) if device_default is not None else ET.Element("device")
        other.attrib.update({"id": peer.device_id, "name": peer.name})
        for old in other.findall("address"):
            other.remove(old)
        ET.SubElement(other, "address").text = f"tcp://127.0.0.1:{peer.listen_port}"
        root.insert(list(root).index(me) + 1, other)

        for old in root.findall("folder"):  # a default folder, should a version make one regardless
            root.remove(old)
        folder = copy.deepcopy(folder_default) if folder_default is not None else ET.Element("folder")
        folder.attrib.update({"id": FOLDER_ID, "label": FOLDER_ID, "path": str(self.folder), "type": folder_type,
                              "rescanIntervalS": "0", "fsWatcherEnabled": "false"})
        for old in folder.findall("device"):
            folder.remove(old)
        for device_id in sorted((self.device_id, peer.device_id)):
            ET.SubElement(folder, "device", {"id": device_id, "introducedBy": ""})
        root.insert(0, folder)

        gui = root.find("gui")
        gui.attrib.update({"enabled": "true", "tls": "false"})
        _set(gui, "address", f"127.0.0.1:{self.gui_port}")
        _set(gui, "apikey", self.api_key)

        options = root.find("options")
        for old in options.findall("listenAddress"):
            options.remove(old)
        ET.SubElement(options, "listenAddress").text = f"tcp://127.0.0.1:{self.listen_port}"
        for key, value in OPTIONS.items():
            _set(options, key, value)
        tree.write(path, encoding="unicode")

    def _env(self) -> dict:
        # HOME too, so that nothing outside this instance's home is read or written.
        return {**os.environ, **ENV, "HOME": str(self.home)}

    def start(self) -> None:
        self._log = open(self.home / "syncthing.log", "ab")
        self.proc = subprocess.Popen(self.cli.serve(self.home), env=self._env(), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=self._log)

    def get(self, path: str) -> dict:
        if self._http is None:
            self._http = http.client.HTTPConnection("127.0.0.1", self.gui_port, timeout=10)
        try:
            self._http.request("GET", path, headers={"X-API-Key": self.api_key})
            response = self._http.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self._http.close()
            self._http = None
            raise
        if response.status != 200:
            raise SyncthingError(f"{self.name}: GET {path}: HTTP {response.status}: {body[:200]!r}")
        return json.loads(body)

    def connected_at(self, device_id: str) -> float | None:
        """When this instance connected to that device (wall clock), from its event log; None if not yet.

        /rest/system/connections stamps a connection to the second only;
        events carry nanoseconds. The unfiltered event subscription exists
        from the start and keeps the last 1,000 events: they are read from
        the moment the API answers, long before a pull could push the
        connection out of the buffer.
        """
        for event in self.get(f"/rest/events?since={self._event_seen}&timeout=0"):
            if event["id"] != self._event_seen + 1:
                raise SyncthingError(f"{self.name}: events {self._event_seen + 1}..{event['id'] - 1} were dropped")
            self._event_seen = event["id"]
            if event["type"] == "DeviceConnected" and event["data"]["id"] == device_id:
                return _wall(event["time"])
        return None

    def folder_status(self) -> dict:
        return self.get(f"/rest/db/status?folder={FOLDER_ID}")

    def wait(self, what: str, probe, done, bound: float, poll: float = POLL_SECONDS):
        """Call probe() every `poll` s until done(its answer); that answer."""
        deadline = time.monotonic() + bound
        last = None
        while True:
            if self.proc.poll() is not None:
                raise SyncthingError(f"{self.name} exited ({self.proc.returncode}) waiting for {what}:\n{self.log_tail()}")
            try:
                last = probe()
                if done(last):
                    return last
            except (OSError, http.client.HTTPException, json.JSONDecodeError):
                pass  # the REST API is not up yet
            if time.monotonic() > deadline:
                if isinstance(last, dict):
                    last = {k: v for k, v in last.items() if k in STATUS_KEYS} or last
                raise SyncthingError(f"{self.name}: no {what} within {bound:g} s; last answer {last}; "
                                     f"last lines of its log:\n{self.log_tail(5)}")
            time.sleep(poll)

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.home / "syncthing.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _set(parent: ET.Element, tag: str, text: str) -> None:
    child = parent.find(tag)
    if child is None:
        child = ET.SubElement(parent, tag)
    child.text = text


def _wall(stamp: str) -> float:
    """A Syncthing RFC 3339 time (nanoseconds, offset) as seconds since the epoch."""
    return datetime.fromisoformat(stamp).timestamp()


def write_files(folder: Path, files: Sequence[tuple[str, bytes]]) -> None:
    for relpath, data in files:
        path = folder / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def check_files(folder: Path, files: Sequence[tuple[str, bytes]]) -> None:
    """B's folder holds exactly these files with exactly these bytes."""
    want = dict(files)
    found = set()
    differ = []
    for dirpath, dirnames, filenames in os.walk(folder):
        if Path(dirpath) == folder:
            dirnames[:] = [d for d in dirnames if not SYNCTHING_DIRS.match(d)]
        for name in filenames:
            relpath = os.path.relpath(os.path.join(dirpath, name), folder)
            found.add(relpath)
            if relpath in want and Path(dirpath, name).read_bytes() != want[relpath]:
                differ.append(relpath)
    missing, extra = set(want) - found, found - set(want)
    if missing or extra or differ:
        raise SyncthingError(f"B's files are not A's: {len(missing)} missing, {len(differ)} differ, "
                             f"{len(extra)} extra (e.g. {sorted(missing | extra | set(differ))[:3]})")


def run_once(cli: SyncthingCli, root: Path, files: Sequence[tuple[str, bytes]], bound: float) -> SyncthingRun:
    """One fresh pair under `root`: A holds `files` (relative path, bytes); time until B has them all."""
    total = sum(len(data) for _, data in files)
    a, b = Instance(cli, root, "a"), Instance(cli, root, "b")
    try:
        for inst in (a, b):
            inst.generate()
        a.configure(b, "sendonly")
        b.configure(a, "receiveonly")
        write_files(a.folder, files)

        scan_start = time.perf_counter()
        a.start()
        a.wait("scan of A's folder", a.folder_status,
               lambda s: s["state"] == "idle" and s["localFiles"] == len(files), SCAN_BOUND, poll=0.05)
        a_scan = time.perf_counter() - scan_start

        b_start, b_start_wall = time.perf_counter(), time.time()
        cpu_a = cpu_seconds(a.proc.pid)
        b.start()

        def connected(inst: Instance, peer: Instance):
            entry = inst.get("/rest/system/connections")["connections"].get(peer.device_id, {})
            return entry if entry.get("connected") else None

        connected_wall = b.wait("connection to A", lambda: b.connected_at(a.device_id),
                                lambda at: at is not None, CONNECT_BOUND)
        a.wait("connection to B", lambda: connected(a, b), bool, CONNECT_BOUND)

        def complete(s: dict) -> bool:
            return (s["globalFiles"] == len(files) and s["localFiles"] == len(files)
                    and s["needTotalItems"] == 0 and s["inSyncBytes"] == s["globalBytes"])

        b.wait("complete folder on B", b.folder_status, complete, bound)
        done, done_wall = time.perf_counter(), time.time()
        cpu = (cpu_seconds(a.proc.pid) - cpu_a, cpu_seconds(b.proc.pid))
        bytes_in = (connected(b, a) or {}).get("inBytesTotal", 0)
        check_files(b.folder, files)
        return SyncthingRun(
            files=len(files), bytes=total,
            connected_to_complete_seconds=done_wall - connected_wall,
            b_start_to_complete_seconds=done - b_start,
            b_start_to_connected_seconds=connected_wall - b_start_wall,
            a_scan_seconds=a_scan, b_bytes_in=bytes_in, cpu_seconds_a=cpu[0], cpu_seconds_b=cpu[1])
    finally:
        for inst in (b, a):
            inst.stop()


def reference(files: Sequence[tuple[str, bytes]], *, workdir: Path, bound: float, repeat: int = 1) -> dict:
    """`syncthing_*` fields for a benchmark's result: the median of `repeat` fresh runs, or why there are none."""
    cli = find_or_install()
    if cli is None:
        return {"syncthing": "skipped: not installed and `apt-get install -y syncthing` failed"}
    runs = []
    try:
        for _ in range(repeat):
            root = Path(tempfile.mkdtemp(prefix="syncthing-", dir=workdir))
            try:
                runs.append(run_once(cli, root, files, bound))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    except SyncthingError as exc:
        return {"syncthing_version": cli.version, "syncthing_files": len(files), "syncthing_error": str(exc)}
    last = runs[-1]
    return {
        "syncthing_version": cli.version,
        "syncthing_files": last.files,
        "syncthing_bytes": last.bytes,
        "syncthing_seconds": round(statistics.median(r.connected_to_complete_seconds for r in runs), 3),
        "syncthing_runs": [round(r.connected_to_complete_seconds, 3) for r in runs],
        "syncthing_seconds_from_b_start": round(statistics.median(r.b_start_to_complete_seconds for r in runs), 3),
        "syncthing_b_connected_after_s": round(statistics.median(r.b_start_to_connected_seconds for r in runs), 3),
        "syncthing_a_scan_seconds_untimed": round(statistics.median(r.a_scan_seconds for r in runs), 2),
        "syncthing_b_bytes_in_last_run": last.b_bytes_in,
        "syncthing_cpu_seconds_last_run": {"a": round(last.cpu_seconds_a, 2), "b": round(last.cpu_seconds_b, 2)},
        "syncthing_bytes_checked": True,
    }
