"""Node benchmarks: transfer, large, propagation and idle, each beside its reference.

    scripts/bench node --what transfer|large|propagation|idle|all|syncthing
                       [--n 100000] [--shape chains|roots] [--bound 900]
                       [--large-count 200] [--large-bytes 1000000]
                       [--pushes 20] [--idle-seconds 60] [--idle-contexts 1000]
                       [--syncthing-max-files N | --no-syncthing]
                       [--repeat 1] [--profile [--cprofile]] [--json]

Everything runs on 127.0.0.1 only, in a fresh temporary directory.

transfer     N small contexts (roots and chains of depth <= 2, 1-3 short
             atoms; --shape roots: roots only) are put straight into node
             A's SQLite store (put_many, 10,000 a batch); A runs as a real
             `ctxfs daemon` process; then an empty B is started as another
             `ctxfs daemon` process peering with A. Timed: from B's Popen
             until B's root (asked over B's local API every 10 ms) equals A's.
             Beside it: `git fetch` of N blobs with the very same bytes from a
             `git daemon` on 127.0.0.1 into an empty bare repository (source
             made by `git fast-import`, one commit, blobs as <id[:2]>/<id[2:]>,
             then `git repack -a -d`; only the fetch is timed). Ratio
             ctxfs/git; target <= 1.0. A B that does not converge within
             --bound seconds is reported with how much it holds.
             B's RSS is read when it converges and again once it is idle
             (its CPU time still for two seconds: it has indexed the text
             it received and handed free heap back), b_rss_mb_settled.
             Also beside it: Syncthing (below) with the same N blobs as files
             (--syncthing-max-files caps N for it; the ratio is then per item).
large        the same with LARGE_COUNT contexts of one ~1 MB atom (random hex
             text); MB/s of canonical bytes; beside it a raw TCP copy of the
             same number of bytes between two threads of this process.
             Ratio ctxfs/raw; target >= 0.25. For context, the disk under
             the stores: the same bytes appended to a file with an fsync
             after every context, and after every 16 MiB. Also beside it:
             Syncthing with the same LARGE_COUNT contexts as files.
syncthing    only the Syncthing reference, for the transfer and the large
             sets (the very bytes the two benchmarks above would use).
propagation  three nodes chained A - B - C. In-process (one trio loop): PUSHES
             times one context is added on A (node.add_contexts) and C's id
             index is polled every 1 ms until it holds it. Processes: three
             `ctxfs daemon`s; the context is pushed through A's local API
             (as `ctxfs push` does) and C's status is asked every 1 ms until
             its object count grows. Median and p90; target <= 1000 ms.
idle         three `ctxfs daemon` processes in a triangle, each store filled
             beforehand with the same IDLE_CONTEXTS contexts, in sync; payload
             bytes each TCP socket of theirs sent and received over
             IDLE_SECONDS, from the kernel's per-socket counters (`ss -tinp`:
             bytes_sent, bytes_received); VmRSS/VmHWM from /proc/PID/status.
             Targets: <= 1024 B/s per peer, RSS <= 80 MB.

--profile    (transfer and large) after the timed runs, once more with the
             receiving node B in this process (A a daemon), then with the
             sending node A in this process (B a daemon), under coarse
             timers (thread CPU and wall time per stage: reconciliation,
             framing and msgpack, TLS, decode+verify, SQLite COMMIT...)
             and a timeline of store calls: where each side's time goes.
             --cprofile adds cProfile hot spots (much slower). Probed runs
             are not the reported figures.
Syncthing (scripts/bench_syncthing.py; installed with apt-get if missing,
skipped with one line if it cannot be): two instances on 127.0.0.1, A
send-only holding the files as <id[:2]>/<id[2:]>, B receive-only and
empty; discovery, relays, NAT, usage and crash reporting off. Timed from
B's connection to A until B's folder is complete, and from B's process
start; B's bytes are checked. ratio_ctxfs_over_syncthing compares ctxfs
from B's API answering with Syncthing from the connection (each from the
point its B can sync; Syncthing's start includes a ~1 s hashing
self-test); ..._from_b_start compares both from B's process start.
The timed runs also report the CPU seconds of A's and B's processes
(main = trio thread; other = store worker threads), from /proc.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import json
import os
import pstats
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_syncthing  # noqa: E402
from daemon import cli, localapi, security  # noqa: E402
from daemon.config import NodeConfig  # noqa: E402
from daemon.indexer import QUIET_SECONDS  # noqa: E402
from daemon.node import Node  # noqa: E402
from daemon.paths import HomePaths  # noqa: E402
from sync import T_STRING, CompressedContext, MemoryAtom, SQLiteContextStore  # noqa: E402
from sync.codec import bytes_id, encode_context  # noqa: E402

WHEN = datetime(2026, 11, 24, 10, tzinfo=timezone.utc)
CTXFS = Path(sys.executable).parent / "ctxfs"
WORDS = ("user", "prefers", "python", "tabs", "dark", "mode", "tests", "trio", "sqlite", "deploys",
         "on", "fridays", "never", "always", "likes", "short", "answers", "with", "examples", "rust")
TARGETS = {"transfer": 1.0, "large": 0.25, "propagation_ms": 1000.0, "idle_bytes_per_s": 1024.0, "rss_mb": 80.0}


# ---------------------------------------------------------------- data


def small_contexts(n: int, rng: random.Random, chains: bool = True) -> list[tuple[str, bytes, CompressedContext]]:
    """Roots and short chains (depth <= 2) of contexts with 1-3 short atoms (only roots if not chains)."""
    out = []
    tips: list[tuple[str, int]] = []  # recent contexts that may get a child: (id, depth)
    for i in range(n):
        atoms = [
            MemoryAtom(" ".join(rng.choices(WORDS, k=rng.randint(2, 4))) + f" #{i}.{j}", T_STRING, WHEN,
                       f"conv_{i // 50}", round(rng.random(), 3))
            for j in range(rng.choices((1, 2, 3), (5, 3, 2))[0])
        ]
        base = None
        if chains and tips and rng.random() < 0.5:
            base, depth = tips.pop(rng.randrange(len(tips)))
        else:
            depth = -1
        ctx = CompressedContext(base, atoms, (), set(), {"n": i})
        data = encode_context(ctx)
        cid = bytes_id(data)
        if depth + 1 < 3:
            tips.append((cid, depth + 1))
            tips = tips[-64:]
        out.append((cid, data, ctx))
    return out


def large_contexts(count: int, size: int, rng: random.Random) -> list[tuple[str, bytes, CompressedContext]]:
    out = []
    for i in range(count):
        text = rng.randbytes(size // 2).hex()
        ctx = CompressedContext(None, [MemoryAtom(text, T_STRING, WHEN, f"big_{i}", 0.5)], (), set(), {"n": i})
        data = encode_context(ctx)
        out.append((bytes_id(data), data, ctx))
    return out


def fill_store(path: Path, items: list[tuple[str, bytes, CompressedContext]], batch: int) -> None:
    store = SQLiteContextStore(path)
    try:
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            ids = store.put_many([ctx for _, _, ctx in chunk])
            assert ids == [cid for cid, _, _ in chunk]
        # A's full-text index current, as on a node that has been running:
        # else A's daemon catches it up during the timed transfer.
        while store.index_text_page():
            pass
    finally:
        store.close()


def sizes(items) -> dict:
    lengths = [len(d) for _, d, _ in items]
    return {"bytes_total": sum(lengths), "bytes_min": min(lengths),
            "bytes_mean": round(sum(lengths) / len(lengths), 1), "bytes_max": max(lengths)}


# ---------------------------------------------------------------- daemons


def init_home(home: Path, cluster_key: Path | None = None) -> str:
    argv = ["--home", str(home), "init"] + (["--cluster-key-file", str(cluster_key)] if cluster_key else [])
    assert cli.main(argv, out=io.StringIO()) == 0
    return security.node_id(security.read_node_key(home / "node.key"))


class Daemon:
    """A real `ctxfs daemon` process on 127.0.0.1, its log in the home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc: subprocess.Popen | None = None
        self._log = None

    def argv(self, peers: list[str]) -> list[str]:
        cmd = [str(CTXFS), "--home", str(self.home), "daemon", "--listen", "127.0.0.1:0", "--no-mdns"]
        for peer in peers:
            cmd += ["--peer", peer]
        return cmd

    def start(self, peers: list[str] = ()) -> None:
        self._log = open(self.home / "daemon.log", "ab")
        self.proc = subprocess.Popen(self.argv(list(peers)), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.home / "daemon.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def rss(self) -> dict:
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
        return fields


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(whole process, its main thread) CPU seconds, user + system, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def read(path: str) -> float:
        fields = Path(path).read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")


async def poll_status(daemon: Daemon, done, *, poll: float, bound: float) -> tuple[dict, float]:
    """Ask the daemon's status every `poll` s until done(status); (status, time its API first answered)."""
    api_up = None
    with trio.fail_after(bound):
        while True:
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"daemon {daemon.home} exited:\n{daemon.log_tail()}")
            try:
                async with localapi.LocalClient.connect(daemon.home) as client:
                    while True:
                        status = await client.status()
                        if api_up is None:
                            api_up = time.perf_counter()
                        if done(status):
                            return status, api_up
                        await trio.sleep(poll)
            except (localapi.DaemonNotRunning, localapi.LocalApiError, OSError):
                await trio.sleep(0.005)


def status_of(daemon: Daemon, done=lambda s: s["listen"] is not None, bound: float = 600) -> dict:
    return trio.run(lambda: poll_status(daemon, done, poll=0.05, bound=bound))[0]


def in_sync(peers: int):
    def done(status: dict) -> bool:
        connected = [p for p in status["peers"] if p["state"] == "connected"]
        return len(connected) >= peers and all(p["in_sync"] for p in connected)
    return done


class NoConvergence(Exception):
    pass


# B is idle once its CPU time grows by less than IDLE_CPU_SECONDS over
# IDLE_WINDOW_SECONDS (after a bulk sync it waits for writes to settle,
# indexes the text it received, then hands free heap back: the window is
# longer than that wait); not idle within IDLE_BOUND_SECONDS: its RSS then
# is reported, with that wait.
IDLE_WINDOW_SECONDS = 2 * QUIET_SECONDS
IDLE_CPU_SECONDS = 0.02
IDLE_BOUND_SECONDS = 60.0


def wait_idle(daemon: Daemon) -> tuple[float, dict]:
    """Seconds until the daemon went idle (see above), and its RSS then."""
    start = time.perf_counter()
    last = cpu_seconds(daemon.proc.pid)[0]
    while time.perf_counter() - start < IDLE_BOUND_SECONDS:
        time.sleep(IDLE_WINDOW_SECONDS)
        now = cpu_seconds(daemon.proc.pid)[0]
        if now - last < IDLE_CPU_SECONDS:
            break
        last = now
    return time.perf_counter() - start, daemon.rss()


def time_daemon_sync(root: Path, a: Daemon, a_status: dict, name: str, bound: float) -> dict:
    """Start an empty daemon peering with A; seconds until its root is A's."""
    b = Daemon(root / name)
    init_home(b.home, a.home / "cluster.key")
    try:
        a_cpu = cpu_seconds(a.proc.pid)
        start = time.perf_counter()
        b.start([a_status["listen"]])
        try:
            status, api_up = trio.run(lambda: poll_status(
                b, lambda s: s["root"] == a_status["root"], poll=0.01, bound=bound))
        except trio.TooSlowError:
            held = status_of(b, bound=10)
            raise NoConvergence(
                f"B's root did not reach A's within {bound:.0f} s; B holds {held['objects']} of "
                f"{a_status['objects']} objects; last lines of B's log:\n{b.log_tail(5)}") from None
        end = time.perf_counter()
        rss = b.rss()
        b_cpu, a_cpu_end = cpu_seconds(b.proc.pid), cpu_seconds(a.proc.pid)
        b_received = sum(c.get("bytes_received", 0) for c in socket_counters({b.proc.pid}).values())
        settled_after, rss_settled = wait_idle(b)
        a_rss_settled = a.rss()  # the sender, idle too by then
    finally:
        b.stop()
    assert status["objects"] == a_status["objects"]
    cpu = {"b_main_thread": b_cpu[1], "b_other_threads": b_cpu[0] - b_cpu[1],
           "a_main_thread": a_cpu_end[1] - a_cpu[1], "a_other_threads": (a_cpu_end[0] - a_cpu[0]) - (a_cpu_end[1] - a_cpu[1])}
    return {"seconds": end - start, "api_up_seconds": api_up - start, "rss": rss, "cpu": cpu,
            "rss_settled": rss_settled, "settled_after_seconds": settled_after, "a_rss_settled": a_rss_settled,
            "b_tcp_bytes_received": b_received}


# ---------------------------------------------------------------- git reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], check=True, capture_output=True, **kwargs)


def make_git_source(repo: Path, items: list[tuple[str, bytes, CompressedContext]]) -> None:
    """A bare repository whose one commit holds every blob (as <id[:2]>/<id[2:]>), via fast-import."""
    git("init", "-q", "--bare", str(repo))
    parts = []
    for mark, (_, data, _) in enumerate(items, 1):
        parts.append(b"blob\nmark :%d\ndata %d\n" % (mark, len(data)))
        parts.append(data)
        parts.append(b"\n")
    parts.append(b"commit refs/heads/main\ncommitter bench <bench@example.invalid> 1700000000 +0000\ndata 6\nbench\n")
    for mark, (cid, _, _) in enumerate(items, 1):
        parts.append(b"M 100644 :%d %s/%s\n" % (mark, cid[:2].encode(), cid[2:].encode()))
    parts.append(b"\n")
    git("-C", str(repo), "fast-import", "--quiet", input=b"".join(parts))


def time_git_fetch(root: Path, port: int, name: str) -> tuple[float, int]:
    dest = root / name
    git("init", "-q", "--bare", str(dest))
    cmd = ["git", "-C", str(dest), "fetch", "-q", "--no-tags", f"git://127.0.0.1:{port}/src.git",
           "+refs/heads/main:refs/heads/main"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    count = int(git("-C", str(dest), "count-objects", "-v").stdout.decode().split("in-pack: ")[1].split()[0])
    return seconds, count


class GitDaemon:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> GitDaemon:
        self.proc = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", f"--base-path={self.base}", "--export-all",
             "--listen=127.0.0.1", f"--port={self.port}", str(self.base)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("git daemon did not start")
                time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- Syncthing reference


def syncthing_reference(args, root: Path, items, limit: int | None = None) -> dict:
    """Syncthing copying the same bytes as files, laid out as in the git reference; or why it did not."""
    if args.no_syncthing or limit == 0:
        return {"syncthing": "skipped (--no-syncthing or --syncthing-max-files 0)"}
    files = [(f"{cid[:2]}/{cid[2:]}", data) for cid, data, _ in items[:limit]]
    result = bench_syncthing.reference(files, workdir=root, bound=args.bound, repeat=args.repeat)
    if "syncthing_seconds" in result:
        result["syncthing_files_per_s"] = round(len(files) / result["syncthing_seconds"])
        total = result["syncthing_bytes"]
        result["syncthing_mb_per_s"] = round(total / result["syncthing_seconds"] / 1e6, 1)
        result["syncthing_mb_per_s_from_b_start"] = round(total / result["syncthing_seconds_from_b_start"] / 1e6, 1)
    return result


# ---------------------------------------------------------------- raw TCP reference


def raw_tcp_seconds(total: int, chunk: int = 1 << 20) -> float:
    """Copy `total` bytes over one loopback TCP connection, sender in a thread."""
    payload = memoryview(os.urandom(chunk))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def send() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            left = total
            while left:
                n = min(chunk, left)
                s.sendall(payload[:n])
                left -= n

    buffer = bytearray(chunk)
    start = time.perf_counter()
    sender = threading.Thread(target=send)
    sender.start()
    conn, _ = listener.accept()
    got = 0
    with conn:
        while got < total:
            n = conn.recv_into(buffer)
            if not n:
                break
            got += n
    seconds = time.perf_counter() - start
    sender.join()
    listener.close()
    assert got == total
    return seconds


def fsync_write_seconds(path: Path, count: int, size: int) -> float:
    """Append `count` blocks of `size` bytes to one file, fsync after each: the disk under the store."""
    block = os.urandom(size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(count):
            os.write(fd, block)
            os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()


# ---------------------------------------------------------------- profiling


class _TimedConnection:
    """Stands in for a store's sqlite3 connection; times COMMIT (the fsync) and the other statements."""

    def __init__(self, db, probe: Probe) -> None:
        self._db = db
        self._probe = probe

    def execute(self, sql, *args):
        label = "sqlite COMMIT (fsync)" if sql == "COMMIT" else "sqlite other statements"
        with self._probe.timed(label):
            return self._db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


class Probe:
    """Coarse timers (thread CPU and wall) around the main stages of one in-process node.

    Patches classes for the length of a `with` block: use with one
    in-process node at a time. Stages can nest ("of which" in the report).
    With cprofile=True, also cProfile of the trio thread and the store
    thread (wall-clock timer: it charges GIL waits too; read it for the
    shape, not the totals).
    """

    def __init__(self, cprofile: bool = False) -> None:
        self.figures: dict[str, list[float]] = {}  # label -> [calls, cpu, wall]
        self.store_calls: list[tuple[str, int, float, float]] = []  # (function, items, start, end)
        self.reconciled: list[float] = []
        self.traffic: dict[str, list[int]] = {}  # "sent|received TYPE" -> [messages, bytes]
        self.main_prof = cProfile.Profile() if cprofile else None
        self.thread_prof = cProfile.Profile() if cprofile else None
        self._restore: list[tuple[object, str, object]] = []

    @contextlib.contextmanager
    def timed(self, label: str):
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            yield
        finally:
            entry = self.figures.setdefault(label, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += time.thread_time() - cpu
            entry[2] += time.perf_counter() - wall

    def _patch(self, owner, name: str, replacement) -> None:
        self._restore.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, replacement)

    def _wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        probe = self

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            with probe.timed(label):
                return original(*args, **kwargs)

        self._patch(owner, name, wrapper)

    def __enter__(self) -> Probe:
        import ssl

        from daemon import peer
        from sync import codec, connection, reconcile, store

        probe = self
        original_reconciled = peer.PeerSession._reconciled
        original_store_init = store.SQLiteContextStore.__init__

        async def run_sync(node, fn, *args):
            def timed():
                t = time.perf_counter()
                if probe.thread_prof:
                    probe.thread_prof.enable()
                try:
                    with probe.timed("store thread: all calls"):
                        return fn(*args)
                finally:
                    if probe.thread_prof:
                        probe.thread_prof.disable()
                    items = len(args[0]) if args and hasattr(args[0], "__len__") else 0
                    probe.store_calls.append((getattr(fn, "__name__", "?"), items, t, time.perf_counter()))
            return await trio.to_thread.run_sync(timed, limiter=node._store_limiter)

        def reconciled(session, reconciler):
            probe.reconciled.append(time.perf_counter())
            return original_reconciled(session, reconciler)

        def store_init(store_self, *args, **kwargs):
            original_store_init(store_self, *args, **kwargs)
            store_self._db = _TimedConnection(store_self._db, probe)

        self._patch(Node, "run_sync", run_sync)
        self._patch(peer.PeerSession, "_reconciled", reconciled)
        self._patch(store.SQLiteContextStore, "__init__", store_init)
        self._wrap(store.SQLiteContextStore, "put_encoded_batches", "store: put_encoded_batches (a received commit)")
        self._wrap(store, "_decode_batch", "store: decode + verify (re-encode) each context")
        self._wrap(store.SQLiteContextStore, "send_order", "store: send_order (plan a push, parents first)")
        self._wrap(store.SQLiteContextStore, "get_many_bytes", "store: get_many_bytes (read objects to push)")
        self._wrap(reconcile.Reconciler, "receive", "reconcile: Reconciler.receive")
        self._wrap(reconcile.Reconciler, "initial_message", "reconcile: Reconciler.initial_message")
        self._wrap(reconcile, "to_wire", "reconcile: to_wire")
        self._wrap(reconcile, "from_wire", "reconcile: from_wire")
        self._wrap(connection.Connection, "receive_data", "protocol: receive_data (frame parsing)")
        self._wrap(connection.Connection, "next_event", "protocol: next_event (reassembly, msgpack decode, message build)")
        self._wrap(connection.Connection, "send", "protocol: send (message encode, framing)")
        timed_next_event, timed_send = connection.Connection.next_event, connection.Connection.send

        def count(key: str, size: int) -> None:
            entry = probe.traffic.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += size

        def next_event(conn, *args, **kwargs):
            event = timed_next_event(conn, *args, **kwargs)
            if isinstance(event, connection.Received):
                count(f"received {event.message.TYPE.name}", event.size)
            return event

        def send(conn, message, *args, **kwargs):
            data = timed_send(conn, message, *args, **kwargs)
            count(f"sent {message.TYPE.name}", len(data))
            return data

        connection.Connection.next_event, connection.Connection.send = next_event, send
        self._wrap(peer, "encode_payload", "protocol: encode_payload in send_flow (size check)")
        self._wrap(codec, "bytes_id", "peer: SHA-256 id check of received objects")
        self._wrap(Node, "_apply_pending", "index: IdSet.add_many + root")
        self._wrap(ssl.SSLObject, "read", "tls: SSLObject.read (decrypt)")
        self._wrap(ssl.SSLObject, "write", "tls: SSLObject.write (encrypt)")
        self.start = time.perf_counter()
        self.trio_cpu = time.thread_time()
        if self.main_prof:
            self.main_prof.enable()
        return self

    def __exit__(self, *exc) -> None:
        if self.main_prof:
            self.main_prof.disable()
        self.trio_cpu = time.thread_time() - self.trio_cpu
        self.end = time.perf_counter()
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)

    def report(self, top: int) -> dict:
        rel = lambda t: round(t - self.start, 3)  # noqa: E731
        by_fn: dict[str, list] = {}
        for name, items, t0, t1 in self.store_calls:
            entry = by_fn.setdefault(name, [0, 0, 0.0, None, None])
            entry[0] += 1
            entry[1] += items
            entry[2] += t1 - t0
            entry[3] = rel(t0) if entry[3] is None else entry[3]
            entry[4] = rel(t1)
        stages = [f"{'stage':66} calls   cpu_s  wall_s"]
        stages += [f"{label:66} {n:5d} {cpu:7.3f} {wall:7.3f}"
                   for label, (n, cpu, wall) in sorted(self.figures.items())]
        result = {
            "seconds": self.end - self.start,
            "trio_thread_cpu_seconds": self.trio_cpu,
            "reconciliations_done_at": [rel(t) for t in self.reconciled][:10],
            "stages": stages,
            "peer_traffic": [f"{key:24} {n:7d} messages {size:12d} bytes" for key, (n, size) in sorted(self.traffic.items())],
            "store_calls": [f"{name}: {n} calls, {items} items, {busy:.3f} s busy, first at {first} s, last done at {last} s"
                            for name, (n, items, busy, first, last) in by_fn.items()],
        }
        if self.main_prof:
            result["cprofile_trio_thread"] = _top(self.main_prof, top)
            result["cprofile_store_thread"] = _top(self.thread_prof, top)
        return result


def profile_receiver(root: Path, a_status: dict, a_home: Path, name: str, top: int, cprofile: bool) -> dict:
    """B (receiving) in this process under Probe; A is the daemon process."""
    home = root / name
    node_id = init_home(home, a_home / "cluster.key")
    config = NodeConfig(listen=("127.0.0.1", 0), peers=(_address(a_status["listen"]),), mdns=False)
    node = Node(paths=HomePaths(home), config=config, node_id=node_id)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            while node.root().hex() != a_status["root"]:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    with Probe(cprofile) as probe:
        trio.run(run)
    return probe.report(top)


def profile_sender(root: Path, a: Daemon, name: str, top: int, cprofile: bool) -> dict:
    """A (sending) in this process under Probe (the A daemon must be stopped); B is a daemon process."""
    node_id = security.node_id(security.read_node_key(a.home / "node.key"))
    node = Node(paths=HomePaths(a.home), config=NodeConfig(listen=("127.0.0.1", 0), mdns=False), node_id=node_id)
    b = Daemon(root / name)
    init_home(b.home, a.home / "cluster.key")

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(node.run)
            with Probe(cprofile) as probe:
                b.start([f"{host}:{port}"])
                while not any(s.info.root == node.root() for s in node.sessions.values()):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        return probe

    try:
        probe = trio.run(run)
    finally:
        b.stop()
    return probe.report(top)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _top(prof: cProfile.Profile, top: int) -> list[str]:
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    lines = [l for l in out.getvalue().splitlines() if re.match(r"\s+\d", l)]
    total = sum(v[2] for v in stats.stats.values())  # tottime of everything
    return [f"{total:.2f} s in all (wall clock); ncalls tottime percall cumtime percall function"] + lines[:top]


# ---------------------------------------------------------------- benchmarks


def bench_transfer(args, root: Path) -> dict:
    rng = random.Random(args.seed)
    t = time.perf_counter()
    items = small_contexts(args.n, rng, chains=args.shape == "chains")
    a = Daemon(root / "a")
    init_home(a.home)
    fill_store(a.home / "store.db", items, 10_000)
    setup = time.perf_counter() - t
    result = {"n": args.n, "shape": args.shape, **sizes(items), "setup_seconds": round(setup, 1),
              "roots": sum(1 for _, _, c in items if c.base_hash is None)}

    make_git_source(root / "git" / "src.git", items)
    git("-C", str(root / "git" / "src.git"), "repack", "-a", "-d", "-q")
    a.start()
    try:
        a_status = status_of(a, lambda s: s["listen"] is not None and s["objects"] == args.n)
        result["a_rss_mb"] = round(a.rss()["VmRSS"], 1)
        runs, git_runs, git_objects = [], [], 0
        with GitDaemon(root / "git") as gd:
            for r in range(args.repeat):
                git_s, git_objects = time_git_fetch(root / "git", gd.port, f"dst{r}.git")
                git_runs.append(git_s)
                try:
                    runs.append(time_daemon_sync(root, a, a_status, f"b{r}", args.bound))
                    a_hwm = a.rss()["VmHWM"]
                except NoConvergence as exc:
                    result.update({"git_seconds": round(git_s, 3), "git_objects_fetched": git_objects,
                                   "ctxfs_seconds": None, "error": str(exc), "met": False})
                    return result
        if args.profile:
            result["profile_receiver"] = profile_receiver(root, a_status, a.home, "bprof", args.top, args.cprofile)
    finally:
        a.stop()
    if args.profile:
        result["profile_sender"] = profile_sender(root, a, "bprof2", args.top, args.cprofile)
    ctxfs_s = statistics.median(r["seconds"] for r in runs)
    ctxfs_after_up = statistics.median(r["seconds"] - r["api_up_seconds"] for r in runs)
    git_s = statistics.median(git_runs)
    syncthing = syncthing_reference(args, root, items, args.syncthing_max_files)
    if "syncthing_seconds" in syncthing:  # seconds per item, as Syncthing may have had fewer
        per_item = syncthing["syncthing_seconds"] / syncthing["syncthing_files"]
        per_item_from_start = syncthing["syncthing_seconds_from_b_start"] / syncthing["syncthing_files"]
        syncthing["ratio_ctxfs_over_syncthing"] = round(ctxfs_after_up / args.n / per_item, 2)
        syncthing["ratio_ctxfs_over_syncthing_from_b_start"] = round(ctxfs_s / args.n / per_item_from_start, 2)
    result.update({
        "ctxfs_seconds": round(ctxfs_s, 3),
        "ctxfs_runs": [round(r["seconds"], 3) for r in runs],
        "ctxfs_b_api_up_seconds": round(statistics.median(r["api_up_seconds"] for r in runs), 3),
        "ctxfs_contexts_per_s": round(args.n / ctxfs_s),
        "b_tcp_payload_bytes_received_last_run": runs[-1]["b_tcp_bytes_received"],
        "cpu_seconds_last_run": {k: round(v, 2) for k, v in runs[-1]["cpu"].items()},
        "b_rss_mb_after": round(runs[-1]["rss"]["VmRSS"], 1),
        "b_rss_mb_settled": round(runs[-1]["rss_settled"]["VmRSS"], 1),
        "b_settled_after_seconds": round(runs[-1]["settled_after_seconds"], 1),
        "b_hwm_mb": round(runs[-1]["rss"]["VmHWM"], 1),
        "a_hwm_mb": round(a_hwm, 1),
        "a_rss_mb_settled": round(runs[-1]["a_rss_settled"]["VmRSS"], 1),
        "git_seconds": round(git_s, 3),
        "git_runs": [round(s, 3) for s in git_runs],
        "git_objects_fetched": git_objects,
        "ratio_ctxfs_over_git": round(ctxfs_s / git_s, 2),
        "ctxfs_seconds_after_b_api_up": round(ctxfs_after_up, 3),
        **syncthing,
        "target": f"<= {TARGETS['transfer']} (ratio_ctxfs_over_git)",
        "met": ctxfs_s / git_s <= TARGETS["transfer"],
    })
    return result


def bench_large(args, root: Path) -> dict:
    rng = random.Random(args.seed)
    items = large_contexts(args.large_count, args.large_bytes, rng)
    a = Daemon(root / "a")
    init_home(a.home)
    fill_store(a.home / "store.db", items, 10)
    total = sum(len(d) for _, d, _ in items)
    result = {"contexts": len(items), **sizes(items)}
    a.start()
    try:
        a_status = status_of(a, lambda s: s["listen"] is not None and s["objects"] == len(items))
        runs, raw = [], []
        for r in range(args.repeat):
            runs.append(time_daemon_sync(root, a, a_status, f"b{r}", args.bound))
            raw += [raw_tcp_seconds(total) for _ in range(3)]
        disk_s = fsync_write_seconds(root / "fsync.bin", len(items), args.large_bytes)
        disk16_s = fsync_write_seconds(root / "fsync.bin", max(1, total // (16 << 20)), 16 << 20)
        a_rss = a.rss()
        if args.profile:
            result["profile_receiver"] = profile_receiver(root, a_status, a.home, "bprof", args.top, args.cprofile)
    finally:
        a.stop()
    if args.profile:
        result["profile_sender"] = profile_sender(root, a, "bprof2", args.top, args.cprofile)
    ctxfs_s = statistics.median(r["seconds"] for r in runs)
    api_up = statistics.median(r["api_up_seconds"] for r in runs)
    raw_s = statistics.median(raw)
    ctxfs_rate, raw_rate = total / ctxfs_s / 1e6, total / raw_s / 1e6
    ctxfs_rate_after_up = total / (ctxfs_s - api_up) / 1e6
    syncthing = syncthing_reference(args, root, items)
    if "syncthing_seconds" in syncthing:  # rates: the same bytes on both sides
        syncthing["ratio_ctxfs_over_syncthing"] = round(
            ctxfs_rate_after_up / (total / syncthing["syncthing_seconds"] / 1e6), 3)
        syncthing["ratio_ctxfs_over_syncthing_from_b_start"] = round(
            ctxfs_rate / (total / syncthing["syncthing_seconds_from_b_start"] / 1e6), 3)
    result.update({
        "ctxfs_seconds": round(ctxfs_s, 3),
        "ctxfs_runs": [round(r["seconds"], 3) for r in runs],
        "ctxfs_mb_per_s": round(ctxfs_rate, 1),
        "ctxfs_b_api_up_seconds": round(api_up, 3),
        "ctxfs_mb_per_s_after_b_up": round(ctxfs_rate_after_up, 1),
        "b_tcp_payload_bytes_received_last_run": runs[-1]["b_tcp_bytes_received"],
        "cpu_seconds_last_run": {k: round(v, 2) for k, v in runs[-1]["cpu"].items()},
        "b_rss_mb_after": round(runs[-1]["rss"]["VmRSS"], 1),
        "b_rss_mb_settled": round(runs[-1]["rss_settled"]["VmRSS"], 1),
        "b_settled_after_seconds": round(runs[-1]["settled_after_seconds"], 1),
        "b_hwm_mb": round(runs[-1]["rss"]["VmHWM"], 1),
        "a_hwm_mb": round(a_rss["VmHWM"], 1),
        "a_rss_mb_settled": round(runs[-1]["a_rss_settled"]["VmRSS"], 1),
        "disk_fsync_per_context_mb_per_s": round(total / disk_s / 1e6, 1),
        "disk_fsync_per_16mib_mb_per_s": round(max(1, total // (16 << 20)) * (16 << 20) / disk16_s / 1e6, 1),
        "raw_tcp_seconds": round(raw_s, 4),
        "raw_tcp_mb_per_s": round(raw_rate, 1),
        "ratio_ctxfs_over_raw": round(ctxfs_rate / raw_rate, 3),
        **syncthing,
        "target": f">= {TARGETS['large']} (ratio_ctxfs_over_raw)",
        "met": ctxfs_rate / raw_rate >= TARGETS["large"],
    })
    return result


def _propagation_inprocess(args, root: Path) -> dict:
    async def run() -> dict:
        nodes: list[Node] = []
        async with trio.open_nursery() as nursery:
            peers = ()
            for name in "abc":
                home = root / name
                node_id = init_home(home, root / "a" / "cluster.key" if nodes else None)
                config = NodeConfig(listen=("127.0.0.1", 0), peers=peers, mdns=False)
                node = Node(paths=HomePaths(home), config=config, node_id=node_id)
                peers = (await nursery.start(node.run),)
                nodes.append(node)
            a, b, c = nodes
            with trio.fail_after(30):
                while not (len(b.sessions) == 2 and len(c.sessions) == 1):
                    await trio.sleep(0.01)
            await trio.sleep(0.5)
            totals, commits, hop_b = [], [], []
            rng = random.Random(args.seed)
            for i in range(args.pushes):
                ctx = CompressedContext(None, [MemoryAtom(f"pushed fact {i}", T_STRING, WHEN, "bench", 0.5)])
                want = bytes.fromhex(ctx.id)
                seen_b = None
                start = time.perf_counter()
                await a.add_contexts([ctx])
                committed = time.perf_counter()
                with trio.fail_after(30):
                    while want not in c.index:
                        if seen_b is None and want in b.index:
                            seen_b = time.perf_counter()
                        await trio.sleep(0.001)
                end = time.perf_counter()
                totals.append((end - start) * 1000)
                commits.append((committed - start) * 1000)
                hop_b.append(((seen_b or end) - start) * 1000)
                await trio.sleep(rng.uniform(0.2, 0.4))
            nursery.cancel_scope.cancel()
        return {"ms": totals, "a_commit_ms": commits, "b_ms": hop_b}

    return trio.run(run)


def _propagation_processes(args, root: Path) -> dict:
    """The same with three `ctxfs daemon` processes: push through A's local API, poll C's status."""
    a, b, c = (Daemon(root / name) for name in "abc")
    init_home(a.home)
    for d in (b, c):
        init_home(d.home, a.home / "cluster.key")
    try:
        a.start()
        b.start([status_of(a)["listen"]])
        c.start([status_of(b)["listen"]])
        status_of(c, in_sync(1), bound=30)
        status_of(b, in_sync(2), bound=30)

        async def run() -> dict:
            totals, commits = [], []
            rng = random.Random(args.seed)
            async with localapi.LocalClient.connect(a.home) as client_a, localapi.LocalClient.connect(c.home) as client_c:
                await trio.sleep(0.5)
                for i in range(args.pushes):
                    ctx = CompressedContext(None, [MemoryAtom(f"pushed fact {i}", T_STRING, WHEN, "bench", 0.5)])
                    before = (await client_c.status())["objects"]
                    start = time.perf_counter()
                    await client_a.push([ctx])
                    committed = time.perf_counter()
                    with trio.fail_after(30):
                        while (await client_c.status())["objects"] == before:
                            await trio.sleep(0.001)
                    end = time.perf_counter()
                    totals.append((end - start) * 1000)
                    commits.append((committed - start) * 1000)
                    await trio.sleep(rng.uniform(0.2, 0.4))
            return {"ms": totals, "a_commit_ms": commits}

        return trio.run(run)
    finally:
        for d in (c, b, a):
            d.stop()


def _summary(r: dict) -> dict:
    ms = sorted(r["ms"])
    p90 = ms[max(0, -(-len(ms) * 9 // 10) - 1)]
    med = statistics.median(ms)
    out = {
        "pushes": len(ms),
        "median_ms": round(med, 1), "p90_ms": round(p90, 1), "max_ms": round(ms[-1], 1), "min_ms": round(ms[0], 1),
        "a_commit_median_ms": round(statistics.median(r["a_commit_ms"]), 1),
        "all_ms": [round(x, 1) for x in r["ms"]],
    }
    if "b_ms" in r:
        out["b_seen_median_ms"] = round(statistics.median(r["b_ms"]), 1)
    return out


def bench_propagation(args, root: Path) -> dict:
    inproc = _summary(_propagation_inprocess(args, root / "inprocess"))
    procs = _summary(_propagation_processes(args, root / "processes"))
    worst = max(inproc["p90_ms"], procs["p90_ms"])
    return {
        **{f"inprocess.{k}": v for k, v in inproc.items()},
        **{f"processes.{k}": v for k, v in procs.items()},
        "target": f"p90 <= {TARGETS['propagation_ms']:.0f} ms",
        "met": worst <= TARGETS["propagation_ms"],
    }





_SS_LINE = re.compile(r"(\S+):(\d+)\s+(\S+):(\d+)\s+users:\(\(.*?pid=(\d+)")


def socket_counters(pids: set[int]) -> dict[tuple, dict]:
    """Per established TCP socket of these processes: kernel payload counters."""
    out = subprocess.run(["ss", "-tinpH", "state", "established"], check=True, capture_output=True, text=True).stdout
    result = {}
    lines = out.splitlines()
    for head, detail in zip(lines[::2], lines[1::2]):
        m = _SS_LINE.search(head)
        if not m or int(m.group(5)) not in pids:
            continue
        fields = dict(re.findall(r"(bytes_sent|bytes_received|segs_out|segs_in):(\d+)", detail))
        key = (int(m.group(5)), f"{m.group(1)}:{m.group(2)}", f"{m.group(3)}:{m.group(4)}")
        result[key] = {k: int(v) for k, v in fields.items()}
    return result


def bench_idle(args, root: Path) -> dict:
    rng = random.Random(args.seed)
    items = small_contexts(args.idle_contexts, rng)
    a, b, c = (Daemon(root / name) for name in "abc")
    init_home(a.home)
    for d in (b, c):
        init_home(d.home, a.home / "cluster.key")
    for d in (a, b, c):  # the same contexts everywhere: in sync from the first HELLO
        fill_store(d.home / "store.db", items, 10_000)
    try:
        a.start()
        la = status_of(a)["listen"]
        b.start([la])
        lb = status_of(b)["listen"]
        c.start([la, lb])
        for d in (a, b, c):
            status_of(d, lambda s: in_sync(2)(s) and s["objects"] == len(items), bound=120)
        rss_start = {n: d.rss() for n, d in zip("abc", (a, b, c))}
        pids = {d.proc.pid: n for n, d in zip("abc", (a, b, c))}
        before = socket_counters(set(pids))
        start = time.perf_counter()
        time.sleep(args.idle_seconds)
        after = socket_counters(set(pids))
        seconds = time.perf_counter() - start
        rss_end = {n: d.rss() for n, d in zip("abc", (a, b, c))}
        still = [status_of(d, in_sync(2), bound=5)["root"] for d in (a, b, c)]
    finally:
        for d in (c, b, a):
            d.stop()
    per_socket = {}
    for key, end in after.items():
        if key not in before:
            continue
        pid, local, remote = key
        sent = end.get("bytes_sent", 0) - before[key].get("bytes_sent", 0)
        received = end.get("bytes_received", 0) - before[key].get("bytes_received", 0)
        segs = (end["segs_out"] - before[key]["segs_out"]) + (end["segs_in"] - before[key]["segs_in"])
        per_socket[f"{pids[pid]} {local}->{remote}"] = {
            "payload_bytes_per_s": round((sent + received) / seconds, 2),
            "sent": sent, "received": received,
            # payload + 52 bytes of IPv4+TCP (with timestamps) headers per segment, both ways
            "wire_bytes_per_s_est": round((sent + received + 52 * segs) / seconds, 2),
        }
    worst = max((v["payload_bytes_per_s"] for v in per_socket.values()), default=float("nan"))
    worst_wire = max((v["wire_bytes_per_s_est"] for v in per_socket.values()), default=float("nan"))
    rss_max = max(max(r["VmRSS"] for r in rss_start.values()), max(r["VmRSS"] for r in rss_end.values()))
    return {
        "seconds": round(seconds, 1), "contexts_per_node": len(items), "sockets": len(per_socket),
        "sockets_lost_during_window": len(set(before) - set(after)),
        "max_payload_bytes_per_s_per_peer": worst,
        "max_wire_bytes_per_s_per_peer_est": worst_wire,
        "per_socket": per_socket,
        "rss_mb_in_sync": {n: round(r["VmRSS"], 1) for n, r in rss_start.items()},
        "rss_mb_after_window": {n: round(r["VmRSS"], 1) for n, r in rss_end.items()},
        "hwm_mb": {n: round(r["VmHWM"], 1) for n, r in rss_end.items()},
        "still_in_sync": len(set(still)) == 1,
        "target": f"<= {TARGETS['idle_bytes_per_s']:.0f} B/s per peer; RSS <= {TARGETS['rss_mb']:.0f} MB",
        "met": worst <= TARGETS["idle_bytes_per_s"] and rss_max <= TARGETS["rss_mb"],
    }


def bench_syncthing_only(args, root: Path) -> dict:
    """The Syncthing reference alone, with the very bytes `transfer` and `large` would use."""
    small = small_contexts(args.n, random.Random(args.seed), chains=args.shape == "chains")
    transfer = syncthing_reference(args, root, small, args.syncthing_max_files)
    del small
    large = syncthing_reference(args, root, large_contexts(args.large_count, args.large_bytes, random.Random(args.seed)))
    return {**{f"transfer.{k}": v for k, v in transfer.items()}, **{f"large.{k}": v for k, v in large.items()}}


BENCHES = {"transfer": bench_transfer, "large": bench_large, "propagation": bench_propagation, "idle": bench_idle}
ALL = tuple(BENCHES)
BENCHES["syncthing"] = bench_syncthing_only


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench node")
    parser.add_argument("--what", choices=[*BENCHES, "all"], default="all")
    parser.add_argument("--n", type=int, default=100_000, help="small contexts (transfer)")
    parser.add_argument("--shape", choices=("chains", "roots"), default="chains",
                        help="transfer set: roots and short chains (default), or roots only")
    parser.add_argument("--bound", type=float, default=900.0, help="seconds before a transfer counts as not converging")
    parser.add_argument("--large-count", type=int, default=200)
    parser.add_argument("--large-bytes", type=int, default=1_000_000, help="approximate canonical size of each large context")
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--idle-contexts", type=int, default=1000, help="contexts every idle node holds")
    parser.add_argument("--syncthing-max-files", type=int, default=None,
                        help="transfer: give Syncthing only the first N contexts (0: skip it); default all")
    parser.add_argument("--no-syncthing", action="store_true", help="leave the Syncthing reference out")
    parser.add_argument("--repeat", type=int, default=1, help="runs of transfer/large and their references (median)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also probe the receiving and the sending node (transfer, large)")
    parser.add_argument("--cprofile", action="store_true", help="with --profile: cProfile hot spots too (slows the probed runs)")
    parser.add_argument("--top", type=int, default=25, help="profile lines per thread")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    command = " ".join(["./scripts/bench node", *([shlex.join(argv)] if argv else [])])
    head = {"command": command, "source": _source_state(), "loadavg_at_start": os.getloadavg()[0], "cpus": os.cpu_count(),
            "git_version": subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()}
    if not args.json:
        for key, value in head.items():
            print(f"{key:36} {value}")
    results = dict(head)
    for what in ALL if args.what == "all" else [args.what]:
        with tempfile.TemporaryDirectory(prefix=f"ctxfs-bench-{what}-") as tmp:
            results[what] = BENCHES[what](args, Path(tmp))
        if not args.json:
            _print_section(what, results[what])
    if args.json:
        print(json.dumps(results))
    return 0


def _source_state() -> str:
    """HEAD and the modified files under daemon/ and sync/: what was measured."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = git("-C", str(repo), "rev-parse", "--short", "HEAD").stdout.decode().strip()
        dirty = git("-C", str(repo), "status", "--porcelain", "--", "daemon", "sync").stdout.decode().split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def _print_section(name: str, result: dict) -> None:
    print(f"[{name}]")
    for key, value in result.items():
        if key.startswith("profile"):
            for k, v in value.items():
                if isinstance(v, list) and k != "reconciliations_done_at":
                    print(f"  {key}.{k}:")
                    for line in v:
                        print(f"    {line}")
                else:
                    print(f"  {key + '.' + k:34} {v if isinstance(v, list) else round(v, 3)}")
        elif key == "per_socket":
            for sock, figures in value.items():
                print(f"  {sock:60} {figures}")
        else:
            print(f"  {key:34} {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
