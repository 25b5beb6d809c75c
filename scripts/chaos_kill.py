"""kill -9 a receiving node during a large sync and right after ACKs; check every promise after each kill.

    scripts/chaos kill [--trials 100] [--seed 1] [--small 4000] [--chains 4] [--chain-depth 250]
                       [--large 16] [--large-bytes 1000000] [--partial-share 0.25]
                       [--sync-bound 60] [--keep-failures DIR]

Everything runs on 127.0.0.1, in a temporary directory removed at the end.

The data set is made once per run: SMALL roots and short chains, CHAINS
chains CHAIN_DEPTH long, LARGE contexts of about LARGE_BYTES each (roots,
deltas over small contexts, some with small children), written straight
into the sender A's store; a "partly filled" receiver store holds a random
ancestor-closed subset of it. A runs the whole campaign as a real `ctxfs
daemon` (through scripts/chaos_kill_sender.py, which logs every ACK A
receives and can kill B the moment one arrives). Each trial copies a
receiver home (empty, or partly filled with probability PARTIAL_SHARE) and
starts B = `ctxfs daemon --peer A`; while B syncs, a writer pushes a chain
of contexts into B through B's local API (what `ctxfs push` does: the call
returns only after B's ACK, i.e. after the commit) and records each id B
acknowledged. Then B gets SIGKILL, by turns:

  during_sync       at a random moment of the sync (uniform over the time
                    an unhindered sync of that home took, from B's API up);
  after_client_ack  by the writer, the instant a push returned;
  after_peer_ack    by A, the instant an ACK from B for OBJECTS arrived.

After the kill, with B dead: the store files are copied aside (evidence),
SQLite's `PRAGMA integrity_check` must say "ok", `ctxfs fsck` must exit 0,
and every id B acknowledged (to the writer, and to A as logged by A) must
be in B's store. B is restarted on the same home and must come up and
reach A's root (which then holds the writer's contexts too) within
SYNC_BOUND seconds; after a clean stop its store must hold A's data set and
everything acknowledged. A failed trial's homes, logs and crash copy are
kept (under --keep-failures, else a new directory in /tmp) and named.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from chaos_common import Outcome  # noqa: E402
from daemon import cli  # noqa: E402
from daemon.localapi import DaemonNotRunning, LocalClient  # noqa: E402
from sync import T_STRING, CompressedContext, MemoryAtom, SQLiteContextStore  # noqa: E402

CTXFS = Path(sys.executable).parent / "ctxfs"
SENDER = Path(__file__).resolve().parent / "chaos_kill_sender.py"
WHEN = datetime(2026, 11, 24, 10, tzinfo=timezone.utc)
WORDS = ("user", "prefers", "python", "tabs", "dark", "mode", "tests", "trio", "sqlite", "deploys",
         "on", "fridays", "never", "always", "likes", "short", "answers", "with", "examples", "rust")
MODES = ("during_sync", "after_client_ack", "after_peer_ack")
# A daemon must answer on its API socket this soon after exec.
START_BOUND = 30.0
# Once B is dead, A must notice its session ended within this (then every
# ACK B sent has been read by A, or lost with the connection).
SESSION_END_BOUND = 15.0
# An armed ACK kill that no ACK triggers within this falls back to a plain kill.
ARMED_BOUND = 5.0
# How long `ctxfs fsck` may take on a store of the data set.
FSCK_BOUND = 120.0
# How often waits ask a daemon's status (in-process, over its API socket).
POLL = 0.05


# ---------------------------------------------------------------- the data set


def make_data(args: argparse.Namespace, rng: random.Random) -> list[CompressedContext]:
    """Every context of the data set, bases before their children."""
    out: list[CompressedContext] = []
    tips: list[tuple[str, int]] = []

    def atom(text: str, source: str) -> MemoryAtom:
        return MemoryAtom(text, T_STRING, WHEN, source, round(rng.random(), 3))

    for i in range(args.small):  # roots and chains of depth <= 2
        atoms = [atom(" ".join(rng.choices(WORDS, k=rng.randint(2, 4))) + f" #{i}.{j}", f"conv_{i // 50}")
                 for j in range(rng.randint(1, 3))]
        base, depth = tips.pop(rng.randrange(len(tips))) if tips and rng.random() < 0.5 else (None, -1)
        ctx = CompressedContext(base, atoms, (), set(), {"n": i})
        out.append(ctx)
        if depth + 1 < 2:
            tips = (tips + [(ctx.id, depth + 1)])[-64:]
    for c in range(args.chains):  # long chains: parents-first order matters across a kill
        base = None
        for d in range(args.chain_depth):
            ctx = CompressedContext(base, [atom(f"chain {c} step {d}", f"chain_{c}")], (), set(), {"chain": c, "d": d})
            out.append(ctx)
            base = ctx.id
    roots = [ctx.id for ctx in out[: args.small] if ctx.base_hash is None]
    for i in range(args.large):  # ~1 MB: roots, deltas over small roots, some with a small child
        base = None if i % 2 == 0 else rng.choice(roots)
        text = rng.randbytes(args.large_bytes // 2).hex()
        ctx = CompressedContext(base, [atom(text, f"big_{i}")], (), set(), {"big": i})
        out.append(ctx)
        if i % 3 == 0:
            out.append(CompressedContext(ctx.id, [atom(f"note on big {i}", f"big_{i}")], (), set(), {"big_child": i}))
    return out


def ancestor_closed_subset(contexts: list[CompressedContext], share: float, rng: random.Random) -> list[CompressedContext]:
    """About `share` of the contexts, with every base of a chosen one: a store a real node could hold."""
    by_id = {ctx.id: ctx for ctx in contexts}
    chosen: set[str] = set()
    for ctx in contexts:
        if rng.random() < share:
            cid: str | None = ctx.id
            while cid is not None and cid not in chosen:
                chosen.add(cid)
                cid = by_id[cid].base_hash
    return [ctx for ctx in contexts if ctx.id in chosen]  # still bases first


def fill_store(path: Path, contexts: list[CompressedContext]) -> None:
    store = SQLiteContextStore(path)
    try:
        for start in range(0, len(contexts), 2000):
            store.put_many(contexts[start : start + 2000])
    finally:
        store.close()


def init_home(home: Path, cluster_key: Path | None = None) -> None:
    argv = ["--home", str(home), "init"] + (["--cluster-key-file", str(cluster_key)] if cluster_key else [])
    with open(os.devnull, "w") as out:
        if cli.main(argv, out=out) != 0:
            raise RuntimeError(f"ctxfs init failed for {home}")


def store_ids(store: Path) -> set[str]:
    db = sqlite3.connect(store)
    try:
        return {row[0].hex() for row in db.execute("SELECT id FROM contexts")}
    finally:
        db.close()


# ---------------------------------------------------------------- processes


class Proc:
    """One daemon process on a home; each start logs to its own file."""

    def __init__(self, name: str, home: Path, logs: Path, argv: list[str]) -> None:
        self.name, self.home, self.logs, self.argv = name, home, logs, argv
        self.proc: subprocess.Popen | None = None
        self.lives = 0

    def start(self, peers: list[str] = ()) -> float:
        assert not self.alive
        self.lives += 1
        argv = self.argv + ["--home", str(self.home), "daemon", "--listen", "127.0.0.1:0", "--no-mdns"]
        for peer in peers:
            argv += ["--peer", peer]
        env = {k: v for k, v in os.environ.items() if k != "CTXFS_HOME"}
        with open(self.log_path(self.lives), "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         start_new_session=True)
        return time.monotonic()

    def log_path(self, life: int) -> Path:
        return self.logs / f"{self.name}.{life}.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> int:
        if self.alive:
            self.proc.kill()
        return self.proc.wait() if self.proc is not None else 0

    def stop(self, bound: float = 10.0) -> int:
        """SIGTERM; SIGKILL if it has not exited within `bound`. Returns the exit status."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(bound)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait() if self.proc is not None else 0

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path(self.lives).read_text(errors="replace") if self.lives else ""
        return "\n".join(text.splitlines()[-lines:])


def _running(pid: int) -> bool:
    """Our child has not exited yet; a child that has is left unreaped, its pid still ours."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def api_status(home: Path) -> dict | None:
    """The daemon's status over its API socket, or None when nobody answers."""

    async def ask() -> dict | None:
        try:
            async with LocalClient.connect(home) as client:
                return await client.status()
        except (DaemonNotRunning, OSError):
            return None
        except Exception:  # the daemon died mid-answer
            return None

    return trio.run(ask)


class NotWithin(Exception):
    pass


def wait_status(proc: Proc, done, bound: float, *, also: Proc | None = None) -> dict:
    """Poll `proc`'s status until done(status) (done may also read other state); raise NotWithin."""
    deadline = time.monotonic() + bound
    while True:
        for p in (proc, also):
            if p is not None and not p.alive:
                raise NotWithin(f"{p.name} exited with {p.proc.returncode}:\n{p.log_tail()}")
        status = api_status(proc.home)
        if status is not None and done(status):
            return status
        if time.monotonic() >= deadline:
            raise NotWithin(f"not within {bound} s; last status of {proc.name}: "
                            f"{None if status is None else {k: status.get(k) for k in ('root', 'objects')}}")
        time.sleep(POLL)


# ---------------------------------------------------------------- the writer


class KillSwitch:
    """Whoever claims it first kills B; claimed once per trial."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.armed = threading.Event()
        self.fired = threading.Event()
        self._lock = threading.Lock()
        self._claimed = False

    def claim(self) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True


class Writer(threading.Thread):
    """Pushes a chain of contexts into B through its local API until B dies; records each ACK."""

    def __init__(self, home: Path, tag: str, seed: int, switch: KillSwitch) -> None:
        super().__init__(daemon=True, name=f"writer-{tag}")
        self.home, self.tag, self.switch = home, tag, switch
        self.rng = random.Random(seed)
        self.acked: list[str] = []
        self.inflight: str | None = None
        self.api_up = threading.Event()
        self.api_up_at = 0.0
        self.stop = threading.Event()
        self.ended = ""

    def run(self) -> None:
        trio.run(self._main)

    def _next(self, base: str | None, n: int) -> CompressedContext:
        if self.rng.random() < 0.1:  # now and then a ~200 KB one: a commit that takes a while
            text = self.rng.randbytes(100_000).hex()
        else:
            text = f"writer {self.tag} fact {n}: " + " ".join(self.rng.choices(WORDS, k=5))
        return CompressedContext(base, [MemoryAtom(text, T_STRING, WHEN, f"writer_{self.tag}", 0.5)], (), set(), {"w": n})

    async def _main(self) -> None:
        while not self.stop.is_set():
            try:
                async with LocalClient.connect(self.home) as client:
                    self.api_up_at = time.monotonic()
                    self.api_up.set()
                    await self._push_all(client)
                return
            except DaemonNotRunning:
                await trio.sleep(0.005)
            except BaseException as exc:  # B killed: the connection ends, whatever the exception's shape
                self.ended = f"{type(exc).__name__}"
                if not isinstance(exc, Exception):
                    raise
                return

    async def _push_all(self, client: LocalClient) -> None:
        base = None
        n = 0
        while not self.stop.is_set():
            ctx = self._next(base, n)
            self.inflight = ctx.id
            await client.push([ctx])
            # Returned: B acknowledged it, so it is committed on B's disk.
            self.acked.append(ctx.id)
            self.inflight = None
            base, n = ctx.id, n + 1
            if self.switch.armed.is_set() and self.switch.claim():
                os.kill(self.switch.pid, signal.SIGKILL)
                self.switch.fired.set()
                self.ended = "killed B after an ACK"
                return
            await trio.sleep(self.rng.uniform(0.002, 0.03))


# ---------------------------------------------------------------- one trial


class Campaign:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.rng = random.Random(args.seed)
        self.logs = root / "logs"
        self.logs.mkdir()
        self.ack_log = root / "a-acks.log"
        self.ack_log.touch()
        self.arm = root / "arm"
        self.a: Proc | None = None
        self.a_listen = ""
        self.templates: dict[str, Path] = {}
        self.template_ids: dict[str, set[str]] = {}
        self.dataset: set[str] = set()
        self.window: dict[str, float] = {}  # seconds from B's API up to in sync, per template
        self.rows: list[dict] = []
        self.kept: Path | None = None

    # ------------------------------------------------------------ setup

    def build(self) -> dict:
        started = time.monotonic()
        contexts = make_data(self.args, self.rng)
        a_home = self.root / "a"
        init_home(a_home)
        fill_store(a_home / "store.db", contexts)
        self.dataset = {ctx.id for ctx in contexts}
        for name in ("empty", "partial"):
            home = self.root / f"b-{name}"
            if name == "empty":
                init_home(home, a_home / "cluster.key")
                SQLiteContextStore(home / "store.db").close()
            else:
                shutil.copytree(self.root / "b-empty", home)
                fill_store(home / "store.db", ancestor_closed_subset(contexts, 0.5, self.rng))
            self.templates[name] = home
            self.template_ids[name] = store_ids(home / "store.db")
        self.a = Proc("a", a_home, self.logs, [sys.executable, str(SENDER), str(self.ack_log), str(self.arm), "--"])
        self.a.start()
        self.a_listen = wait_status(self.a, lambda s: s.get("listen"), START_BOUND)["listen"]
        sizes = [len(ctx.delta_atoms[0].content) for ctx in contexts]
        return {"contexts": len(contexts), "mb": round(sum(sizes) / 1e6, 1), "build_s": round(time.monotonic() - started, 1),
                "partial_holds": len(self.template_ids["partial"])}

    def calibrate(self) -> None:
        """One unhindered sync per receiver template: how long a kill 'during sync' may wait."""
        for name in self.templates:
            home = self.root / f"cal-{name}"
            shutil.copytree(self.templates[name], home)
            b = Proc(f"cal-{name}", home, self.logs, [str(CTXFS)])
            try:
                b.start([self.a_listen])
                wait_status(b, lambda s: True, START_BOUND)
                up = time.monotonic()
                self._converge(b, self.args.sync_bound)
                self.window[name] = time.monotonic() - up
            finally:
                b.kill()
                shutil.rmtree(home, ignore_errors=True)

    def _converge(self, b: Proc, bound: float) -> dict:
        """Until B's root is A's. A's set only grows (by what B pushes it), so A is asked
        again only once B holds as many objects as A last did: polls cost CPU the two
        daemons need on a small machine."""
        a_last = wait_status(self.a, lambda s: True, START_BOUND)

        def same_root(status: dict) -> bool:
            nonlocal a_last
            if status["objects"] < a_last["objects"]:
                return False
            a_last = api_status(self.a.home) or a_last
            return a_last["root"] == status["root"]

        return wait_status(b, same_root, bound, also=self.a)

    # ------------------------------------------------------------ trial

    def trial(self, n: int, mode: str) -> dict:
        args = self.args
        template = "partial" if self.rng.random() < args.partial_share else "empty"
        tdir = self.root / f"t{n}"
        home = tdir / "b"
        shutil.copytree(self.templates[template], home)
        logs = tdir / "logs"
        logs.mkdir()
        row = {"n": n, "mode": mode, "template": template, "problems": []}
        problems = row["problems"]
        ack_offset = self.ack_log.stat().st_size
        b = Proc("b", home, logs, [str(CTXFS)])
        writer = None
        try:
            b.start([self.a_listen])
            switch = KillSwitch(b.proc.pid)
            writer = Writer(home, f"{n}", self.rng.randrange(2**32), switch)
            writer.start()
            if not writer.api_up.wait(START_BOUND):
                problems.append(f"B's API did not come up within {START_BOUND} s")
            delay = self.rng.uniform(0, self.window[template] * (0.8 if mode == "after_peer_ack" else 1.0))
            time.sleep(max(0.0, writer.api_up_at + delay - time.monotonic()))
            row["killed_by"] = self._kill(b, switch, mode)
            row["kill_at_s"] = round(time.monotonic() - writer.api_up_at, 3)
            if b.proc.returncode != -signal.SIGKILL:  # it died before the kill: a crash of its own
                problems.append(f"B exited {b.proc.returncode} before it was killed:\n{b.log_tail()}")
            writer.stop.set()
            writer.join(30)
            if writer.is_alive():
                problems.append("the writer did not end after B's death")
            self._check_after_kill(b, writer, tdir, ack_offset, row)
            self._restart(b, writer, row)
        except NotWithin as exc:
            problems.append(str(exc))
        finally:
            b.kill()
            if writer is not None:
                writer.stop.set()
            try:
                os.unlink(self.arm)
            except FileNotFoundError:
                pass
            for leftover in self.root.glob("arm.*"):
                leftover.unlink()
        if problems:
            row["kept"] = str(self._keep(tdir, n))
        shutil.rmtree(tdir, ignore_errors=True)
        return row

    def _kill(self, b: Proc, switch: KillSwitch, mode: str) -> str:
        """Kill B as `mode` says; returns who did it (a fallback kill is 'timer')."""
        if mode == "after_client_ack":
            switch.armed.set()
            if switch.fired.wait(ARMED_BOUND):
                b.proc.wait()
                return "writer"
        elif mode == "after_peer_ack":
            tmp = self.arm.with_name("arm.tmp")
            tmp.write_text(str(b.proc.pid))
            os.rename(tmp, self.arm)  # A never reads a half-written pid
            deadline = time.monotonic() + ARMED_BOUND
            # Not reaped while armed: A may still send SIGKILL to this pid.
            while _running(b.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.002)
            try:
                os.rename(self.arm, self.arm.with_name("arm.cancelled"))
            except FileNotFoundError:  # A renamed it first: A owns the kill
                b.proc.wait()
                return "sender"
        if switch.claim():
            b.kill()
            return "timer"
        switch.fired.wait()
        b.proc.wait()
        return "writer"

    def _check_after_kill(self, b: Proc, writer: Writer, tdir: Path, ack_offset: int, row: dict) -> None:
        problems = row["problems"]
        home = b.home
        crash = tdir / "crash"  # the files exactly as the kill left them
        crash.mkdir()
        for suffix in ("", "-wal", "-shm"):
            src = home / f"store.db{suffix}"
            if src.exists():
                shutil.copy2(src, crash / src.name)
        # A must drop the session, so that it has read every ACK B got out.
        wait_status(self.a, lambda s: not any(p.get("state") == "connected" for p in s["peers"]), SESSION_END_BOUND)
        with open(self.ack_log) as log:
            log.seek(ack_offset)
            peer_acked = set(log.read().split())
        db = sqlite3.connect(home / "store.db")
        try:
            integrity = [r[0] for r in db.execute("PRAGMA integrity_check")]
            held = {r[0].hex() for r in db.execute("SELECT id FROM contexts")}
        finally:
            db.close()
        if integrity != ["ok"]:
            problems.append(f"integrity_check: {integrity[:5]}")
        row["integrity_ok"] = integrity == ["ok"]
        fsck = subprocess.run([str(CTXFS), "--home", str(home), "fsck"], capture_output=True, text=True, timeout=FSCK_BOUND)
        row["fsck_ok"] = fsck.returncode == 0
        if fsck.returncode != 0:
            problems.append(f"fsck exited {fsck.returncode}: {(fsck.stdout + fsck.stderr)[-800:]}")
        row["client_acked"] = set(writer.acked)
        row["peer_acked"] = peer_acked
        row["lost_client"] = sorted(row["client_acked"] - held)
        row["lost_peer"] = sorted(peer_acked - held)
        if row["lost_client"] or row["lost_peer"]:
            problems.append(f"acknowledged but missing after the kill: {len(row['lost_client'])} pushed by the writer "
                            f"(e.g. {row['lost_client'][:3]}), {len(row['lost_peer'])} sent by A (e.g. {row['lost_peer'][:3]})")
        row["held_at_kill"] = len(held & self.dataset)
        row["mid_sync"] = not self.dataset <= held
        row["inflight_present"] = None if writer.inflight is None else writer.inflight in held

    def _restart(self, b: Proc, writer: Writer, row: dict) -> None:
        problems = row["problems"]
        started = b.start([self.a_listen])
        try:
            wait_status(b, lambda s: s.get("listen"), START_BOUND)
        except NotWithin as exc:
            row["restart_failed"] = True
            problems.append(f"B did not come back after the kill: {exc}")
            return
        try:
            self._converge(b, self.args.sync_bound)
            row["reconverge_s"] = time.monotonic() - started
        except NotWithin as exc:
            row["not_converged"] = True
            problems.append(f"B did not reach A's root after restart: {exc}")
            return
        rc = b.stop()
        if rc != 0:
            problems.append(f"B exited {rc} on SIGTERM after the sync:\n{b.log_tail()}")
        final = store_ids(b.home / "store.db")
        want = self.dataset | row["client_acked"] | row["peer_acked"]
        if not want <= final:
            row["not_converged"] = True
            problems.append(f"after the sync B lacks {len(want - final)} of the data set or of what it acknowledged")

    def _kept_dir(self) -> Path:
        if self.kept is None:
            base = self.args.keep_failures
            self.kept = Path(base) if base else Path(tempfile.mkdtemp(prefix="ctxfs-chaos-kill-failed-"))
            self.kept.mkdir(parents=True, exist_ok=True)
        return self.kept

    def keep_logs(self) -> None:
        """Every daemon log of the run (A's, the calibration's), when the campaign itself broke."""
        shutil.copytree(self.logs, self._kept_dir() / "logs", dirs_exist_ok=True)

    def _keep(self, tdir: Path, n: int) -> Path:
        dest = self._kept_dir() / f"trial-{n}"
        shutil.copytree(tdir, dest, ignore=shutil.ignore_patterns("api.sock"), dirs_exist_ok=True)
        shutil.copy2(self.a.log_path(self.a.lives), dest / "a.log")
        return dest


# ---------------------------------------------------------------- the part


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=100, help="kills (default 100)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--small", type=int, default=4000, help="small roots and short chains in the data set")
    parser.add_argument("--chains", type=int, default=4, help="long chains in the data set")
    parser.add_argument("--chain-depth", type=int, default=250)
    parser.add_argument("--large", type=int, default=16, help="large contexts in the data set")
    parser.add_argument("--large-bytes", type=int, default=1_000_000, help="approximate size of a large context")
    parser.add_argument("--partial-share", type=float, default=0.25,
                        help="share of trials whose receiver starts partly filled (else empty)")
    parser.add_argument("--sync-bound", type=float, default=60.0, help="seconds a restarted receiver has to reach A's root")
    parser.add_argument("--keep-failures", metavar="DIR", help="where failed trials are kept (default: a new dir in /tmp)")


def run(options: argparse.Namespace) -> Outcome:
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="ckill-"))  # short: the API socket path must fit in sun_path
    campaign = Campaign(options, root)
    figures: dict = {}
    ok = False
    try:
        data = campaign.build()
        campaign.calibrate()
        print(f"data set: {data['contexts']} contexts, {data['mb']} MB (made in {data['build_s']} s); "
              f"partly filled receiver holds {data['partial_holds']}; unhindered sync from B's API up: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in campaign.window.items()), flush=True)
        modes = [MODES[i % len(MODES)] for i in range(options.trials)]
        campaign.rng.shuffle(modes)
        for n, mode in enumerate(modes, 1):
            if not campaign.a.alive:
                raise RuntimeError(f"the sender A exited with {campaign.a.proc.returncode}:\n{campaign.a.log_tail()}")
            row = campaign.trial(n, mode)
            campaign.rows.append(row)
            _print_row(row)
        a_alive = campaign.a.alive
        figures = _figures(campaign.rows, data)
        figures["sender_survived"] = a_alive
        ok = a_alive and len(campaign.rows) == options.trials and all(not r["problems"] for r in campaign.rows)
    except Exception as exc:  # the campaign itself broke: say so with what it had
        figures = _figures(campaign.rows, {"contexts": len(campaign.dataset), "mb": None})
        figures["error"] = f"{type(exc).__name__}: {exc}"
        print(f"kill: stopped: {figures['error']}", flush=True)
        campaign.keep_logs()
    finally:
        sender_exit = campaign.a.stop() if campaign.a is not None and campaign.a.proc is not None else None
        shutil.rmtree(root, ignore_errors=True)
    if sender_exit not in (0, None):  # A must stop cleanly on SIGTERM after all that
        figures["sender_exit"] = sender_exit
        ok = False
    figures["seconds"] = round(time.monotonic() - started, 1)
    _print_summary(figures, campaign)
    return Outcome(part="kill", ok=ok, figures=figures)


def _print_row(row: dict) -> None:
    if "client_acked" in row:
        line = (f"trial {row['n']:3} {row['mode']:16} by {row.get('killed_by', '?'):6} {row['template']:7} "
                f"at {row['kill_at_s']:.2f}s held {row['held_at_kill']:5} acked(writer/A) {len(row['client_acked']):3}/"
                f"{len(row['peer_acked']):<5} lost {len(row['lost_client']) + len(row['lost_peer'])} "
                f"integrity {'ok' if row['integrity_ok'] else 'BAD'} fsck {'ok' if row['fsck_ok'] else 'BAD'}")
        if "reconverge_s" in row:
            line += f" reconverged {row['reconverge_s']:.2f}s"
    else:
        line = f"trial {row['n']:3} {row['mode']:16}"
    print(line, flush=True)
    for problem in row["problems"]:
        print(f"    PROBLEM: {problem}", flush=True)
    if "kept" in row:
        print(f"    kept: {row['kept']}", flush=True)


def _figures(rows: list[dict], data: dict) -> dict:
    checked = [r for r in rows if "client_acked" in r]
    reconverge = sorted(r["reconverge_s"] for r in rows if "reconverge_s" in r)
    by = {m: sum(1 for r in rows if r.get("killed_by") == who and r["mode"] == m)
          for m, who in (("during_sync", "timer"), ("after_client_ack", "writer"), ("after_peer_ack", "sender"))}
    inflight = [r["inflight_present"] for r in checked if r["inflight_present"] is not None]
    return {
        "trials": len(rows),
        "dataset_contexts": data["contexts"],
        "dataset_mb": data["mb"],
        "kills_during_sync": by["during_sync"],
        "kills_after_client_ack": by["after_client_ack"],
        "kills_after_peer_ack": by["after_peer_ack"],
        "armed_kills_fallen_back": sum(1 for r in rows if r["mode"] != "during_sync" and r.get("killed_by") == "timer"),
        "kills_with_sync_unfinished": sum(1 for r in checked if r["mid_sync"]),
        "acked_by_b_to_writer": sum(len(r["client_acked"]) for r in checked),
        "acked_by_b_to_a": sum(len(r["peer_acked"]) for r in checked),
        "lost_acked": sum(len(r["lost_client"]) + len(r["lost_peer"]) for r in checked),
        "integrity_failures": sum(1 for r in checked if not r["integrity_ok"]),
        "fsck_failures": sum(1 for r in checked if not r["fsck_ok"]),
        "restart_failures": sum(1 for r in rows if r.get("restart_failed")),
        "not_converged": sum(1 for r in rows if r.get("not_converged")),
        "trials_with_problems": sum(1 for r in rows if r["problems"]),
        "unacked_inflight_push_present": f"{sum(inflight)}/{len(inflight)}",
        "reconverge_median_s": round(statistics.median(reconverge), 2) if reconverge else None,
        "reconverge_max_s": round(reconverge[-1], 2) if reconverge else None,
    }


def _print_summary(figures: dict, campaign: Campaign) -> None:
    print("kill summary:")
    for key, value in figures.items():
        print(f"  {key:32} {value}")
    if campaign.kept is not None:
        print(f"  failed trials kept in {campaign.kept}")
