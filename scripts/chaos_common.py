"""What every part of the chaos campaign shares: the outcome record, the
test helpers on sys.path, and the watchers the hostile parts run."""

from __future__ import annotations

import collections
import importlib.machinery
import importlib.util
import math
import struct
import sys
import types
from datetime import datetime, timezone
from pathlib import Path

import attrs
import trio

TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
if importlib.util.find_spec("pytest") is None:
    # A venv without the test extra: the helpers import pytest only for
    # fixtures. A real module object with a spec, so that later find_spec
    # calls (bench_bed, chaos_net) see it as present.
    stub = types.ModuleType("pytest")
    stub.__spec__ = importlib.machinery.ModuleSpec("pytest", None)
    stub.fixture = lambda f: f
    stub.skip = None
    sys.modules["pytest"] = stub

from daemon.localapi import LocalClient  # noqa: E402
from daemon.paths import HomePaths  # noqa: E402
from sync import T_STRING, CompressedContext, MemoryAtom  # noqa: E402
from sync.errors import ErrorCode  # noqa: E402
from sync.messages import MessageType, decode_payload  # noqa: E402

WHEN = datetime(2026, 11, 29, tzinfo=timezone.utc)
# How often the hostile parts sample the daemon's RSS.
RSS_PERIOD = 0.25
# How long a healthy peer's push may take to reach the daemon under attack
# before it counts as lost.
HEALTHY_BOUND = 60.0
# The healthy peer pushes one context this often.
HEALTHY_PERIOD = 0.5
# After its last frame a hostile connection reads what the daemon still
# says (its ERROR, if it is ending the session) for this long.
LAST_WORDS = 0.2


@attrs.define
class Outcome:
    """One part's verdict and the figures docs/reliability.md records."""

    part: str
    ok: bool
    figures: dict = attrs.field(factory=dict)


def context(text: str, base: str | None = None) -> CompressedContext:
    return CompressedContext(base, [MemoryAtom(text, T_STRING, WHEN, "chaos", 0.5)])


def seed_contexts(home: Path, count: int, *, tag: str) -> list[bytes]:
    """Push `count` contexts (chains of ten) through the daemon of `home`; their ids."""

    async def push() -> list[str]:
        contexts, base = [], None
        for i in range(count):
            ctx = context(f"{tag} seed {i}", base if i % 10 else None)
            contexts.append(ctx)
            base = ctx.id
        async with LocalClient.connect(HomePaths(home)) as client:
            return await client.push(contexts)

    return [bytes.fromhex(i) for i in trio.run(push)]


class RssWatch:
    """Samples a process's resident set size; `max_mb` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_mb = 0.0
        self.samples: list[float] = []

    def sample(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    mb = int(line.split()[1]) / 1024
                    self.max_mb = max(self.max_mb, mb)
                    self.samples.append(mb)
                    return mb
        except OSError:
            return None
        return None

    async def run(self) -> None:
        while True:
            self.sample()
            await trio.sleep(RSS_PERIOD)


class ReplyCounter:
    """Reads what the daemon sends a hostile peer; counts declared and
    undeclared replies (an unknown type, or an ERROR with an unknown code)."""

    def __init__(self) -> None:
        self.types: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.undeclared = 0

    async def read(self, stream: trio.abc.Stream, closed: trio.Event) -> None:
        """Until the daemon closes the connection (then `closed` is set)."""
        buffer = bytearray()
        try:
            while chunk := await stream.receive_some(65536):
                buffer += chunk
                self._parse(buffer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            closed.set()

    def _parse(self, buffer: bytearray) -> None:
        while len(buffer) >= 10:
            msg_type, flags, _stream, length = struct.unpack_from(">BBII", buffer)
            if len(buffer) < 10 + length:
                return
            payload = bytes(buffer[10:10 + length])
            del buffer[:10 + length]
            try:
                kind = MessageType(msg_type)
            except ValueError:
                self.undeclared += 1
                continue
            self.types[kind.name] += 1
            if kind is MessageType.ERROR and not flags:
                try:
                    code = decode_payload(kind, payload).code
                    self.errors[ErrorCode(code).name] += 1
                except ValueError:
                    self.undeclared += 1

    def errors_summary(self) -> str:
        return " ".join(f"{name}:{count}" for name, count in self.errors.most_common()) or "none"


def store_holds(store: Path, context_id: str) -> bool:
    """Read straight from a daemon's SQLite file (read-only): its API may be
    the thing under attack."""
    import sqlite3

    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT 1 FROM contexts WHERE id = ?", (bytes.fromhex(context_id),)).fetchone() is not None
    finally:
        db.close()


async def healthy_pusher(source: Path, target: Path, pushed: list[str], lags: list[float]) -> None:
    """An honest peer's work: push a context on `source` every HEALTHY_PERIOD
    and time its arrival in `target`'s store; one that never arrives has lag inf."""
    n = 0
    async with LocalClient.connect(HomePaths(source)) as writer:
        while True:
            n += 1
            [cid] = await writer.push([context(f"healthy {n} {trio.current_time()}")])
            pushed.append(cid)
            started = trio.current_time()
            lag = math.inf
            with trio.move_on_after(HEALTHY_BOUND):
                while not await trio.to_thread.run_sync(store_holds, target / "store.db", cid):
                    await trio.sleep(0.02)
                lag = trio.current_time() - started
            lags.append(lag)
            await trio.sleep(HEALTHY_PERIOD)


class Attack:
    """What the hostile parts share: counters, the daemon's RSS, the healthy
    peer's pushes, and the loop that sends one connection's frames."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.frames = 0
        self.connections = 0
        self.replies = ReplyCounter()
        self.rss = RssWatch(daemon.pid)
        self.healthy_ids: list[str] = []
        self.lags: list[float] = []

    @property
    def alive(self) -> bool:
        return self.daemon.running

    async def send_frames(self, stream: trio.abc.Stream, forge, count: int) -> int:
        """Up to `count` forged frames on one connection, until the daemon
        ends it; returns how many were written. Reads every reply."""
        self.connections += 1
        sent = 0
        closed = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.replies.read, stream, closed)
            try:
                while sent < count and not closed.is_set():
                    _kind, data = forge.next()
                    await stream.send_all(data)
                    sent += 1
                    self.frames += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            with trio.move_on_after(LAST_WORDS):
                await closed.wait()
            nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(stream)
        return sent

    def figures(self, *, fsck: int | None, lost: int, rss_bound_mb: float) -> dict:
        return {
            "frames": self.frames,
            "connections": self.connections,
            "errors_by_code": self.replies.errors_summary(),
            "undeclared_replies": self.replies.undeclared,
            "max_rss_mb": round(self.rss.max_mb, 1),
            "rss_bound_mb": rss_bound_mb,
            "healthy_pushed": len(self.healthy_ids),
            "healthy_lag_s_max": round(max(self.lags, default=0.0), 2),
            "healthy_lost": lost,
            "daemon_exits": 0 if fsck is not None else 1,
            "internal_errors": self.internal_errors(),
            "fsck": "ok" if fsck == 0 else f"exit {fsck}",
        }

    def internal_errors(self) -> int:
        """Sessions the daemon ended by an internal error (its bug, not the
        attacker's fault): each is a failure of the part, even if logged
        and survived. Read from every log file the daemon wrote."""
        count = 0
        for path in sorted(self.daemon.log_dir.glob(f"{self.daemon.name}.*.log")):
            text = path.read_text(errors="replace")
            count += text.count("internal error") + text.count("Traceback")
        return count

    def held(self, *, fsck: int | None, lost: int, rss_bound_mb: float, frames_wanted: int) -> bool:
        """Every promise of a hostile part: no exit, fsck, only declared
        replies, no internal error, nothing lost, RSS under the bound, every
        frame sent."""
        return (fsck == 0 and self.replies.undeclared == 0 and lost == 0 and self.internal_errors() == 0
                and self.rss.max_mb < rss_bound_mb and self.frames >= frames_wanted)
