"""Discovery and push convergence on a 3-host network-namespace bed.

    sudo ./scripts/bench bed [--runs 10] [--bound 60] [--json]

Needs root and `ip netns` (exits 2 otherwise). Each run builds a fresh bed
with tests/netns_helpers.Bed (scripts/netns-cluster: hosts PREFIX-h1..3 on
a bridge, 10.77.0.1-3, all inside namespaces of their own; no traffic leaves
them), makes three fresh homes sharing one cluster key (with the test
config.toml: mdns_announce_seconds = 2, ping_seconds = 0.5,
idle_timeout_seconds = 2.5), then:

discover   starts the three daemons at once (`ip netns exec HOST ctxfs
           --home H daemon --listen 10.77.0.I:7787 --mdns-interface
           10.77.0.I`, no --peer) and times from the first Popen until every
           daemon reports both others connected and in sync (status over
           each home's API socket, every 20 ms).
push       pushes one small context into host 1 through its local API and
           times from just before the push until all three report the same
           root, one object, and both peers connected and in sync.

Every wait is bounded by --bound seconds. The daemons are stopped and the
bed deleted after every run, whatever happened. Prints median, min and max
of both figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

if importlib.util.find_spec("pytest") is None:
    # A venv without the test extra: netns_helpers imports pytest only for its fixture, unused here.
    sys.modules["pytest"] = types.SimpleNamespace(fixture=lambda f: f, skip=None)

import netns_helpers  # noqa: E402
from netns_helpers import Bed  # noqa: E402

from daemon import localapi  # noqa: E402
from sync import T_STRING, CompressedContext, MemoryAtom  # noqa: E402

WHEN = datetime(2026, 11, 24, 10, tzinfo=timezone.utc)
POLL = 0.02
HOSTS = 3


def all_in_sync(statuses: list[dict | None], objects: int) -> bool:
    """Every daemon is connected to both others, in sync with each, same root, `objects` objects."""
    if any(s is None for s in statuses):
        return False
    ids = {s["node_id"] for s in statuses}
    if len({s["root"] for s in statuses}) != 1 or any(s["objects"] != objects for s in statuses):
        return False
    for status in statuses:
        members = [p for p in status["peers"] if p["node_id"] in ids and p["state"] == "connected"]
        if {p["node_id"] for p in members} != ids - {status["node_id"]}:
            return False
        if not all(p["in_sync"] and p["root"] == status["root"] for p in members):
            return False
    return True


class Poller:
    """One open API connection per home, reopened when it fails; status of all, in turn."""

    def __init__(self, daemons, nursery: trio.Nursery) -> None:
        self.daemons = daemons
        self.nursery = nursery
        self.clients: list[localapi.LocalClient | None] = [None] * len(daemons)
        self.closers: list[trio.Event | None] = [None] * len(daemons)

    async def _open(self, i: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        done = trio.Event()
        started = False
        try:
            async with localapi.LocalClient.connect(self.daemons[i].home) as client:
                self.clients[i], self.closers[i] = client, done
                started = True
                task_status.started()
                await done.wait()
        except (localapi.DaemonNotRunning, localapi.LocalApiError, OSError):
            pass  # not answering yet (or gone): the caller sees no client
        finally:
            self.clients[i] = self.closers[i] = None
            if not started:
                task_status.started()

    def _drop(self, i: int) -> None:
        if self.closers[i] is not None:
            self.closers[i].set()

    async def status(self, i: int) -> dict | None:
        daemon = self.daemons[i]
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"{daemon.name} exited {daemon.proc.returncode}:\n{daemon.stderr()[-2000:]}")
        if self.clients[i] is None:
            await self.nursery.start(self._open, i)
            if self.clients[i] is None:
                return None
        try:
            return await self.clients[i].status()
        except (localapi.LocalApiError, OSError):
            self._drop(i)
            return None

    async def statuses(self) -> list[dict | None]:
        return [await self.status(i) for i in range(len(self.daemons))]

    async def wait(self, objects: int, bound: float, what: str) -> float:
        """Poll until all in sync; the perf_counter time it was seen."""
        last: list = []
        try:
            with trio.fail_after(bound):
                while True:
                    last = await self.statuses()
                    if all_in_sync(last, objects):
                        return time.perf_counter()
                    await trio.sleep(POLL)
        except trio.TooSlowError:
            raise RuntimeError(f"{what}: not in sync within {bound} s; last statuses:\n"
                               + "\n".join(json.dumps(s) for s in last)) from None

    def close(self) -> None:
        for i in range(len(self.daemons)):
            self._drop(i)


async def measure(daemons, bound: float, run: int) -> tuple[float, float]:
    async with trio.open_nursery() as nursery:
        poller = Poller(daemons, nursery)
        try:
            start = time.perf_counter()
            for d in daemons:
                d.start(wait=False)
            discovered = await poller.wait(0, bound, "discover") - start

            ctx = CompressedContext(None, [MemoryAtom(f"bench bed run {run} {time.time_ns()}", T_STRING,
                                                      WHEN, "bench-bed", 0.5)])
            pushed_at = time.perf_counter()
            await poller.status(0)  # make sure host 1's connection is open
            ids = await poller.clients[0].push([ctx])
            assert ids == [ctx.id], ids
            synced = await poller.wait(1, bound, "push") - pushed_at
            return discovered, synced
        finally:
            poller.close()


def one_run(base: Path, bound: float, run: int) -> tuple[float, float]:
    bed = Bed(base / f"r{run}")
    daemons = []
    try:
        bed.up(HOSTS)
        daemons = [bed.daemon(i, start=False) for i in range(1, HOSTS + 1)]
        return trio.run(measure, daemons, bound, run)
    finally:
        try:
            for d in daemons:
                if d.proc is not None:
                    d.stop()
        finally:
            bed.close()


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": [round(v, 3) for v in values]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench bed")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--bound", type=float, default=60.0, help="seconds allowed for each wait")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    reason = netns_helpers.unavailable()
    if reason:
        print(f"scripts/bench bed: {reason}; run as root: sudo ./scripts/bench bed", file=sys.stderr)
        return 2
    netns_helpers._remove_stale_beds()

    command = "./scripts/bench bed " + shlex.join(argv) if argv else "./scripts/bench bed"
    discover: list[float] = []
    push: list[float] = []
    wall = time.perf_counter()
    # Short paths: the API socket path must fit in sun_path.
    base = Path(tempfile.mkdtemp(prefix="ctxfs-bed-"))
    try:
        for run in range(1, args.runs + 1):
            try:
                d, p = one_run(base, args.bound, run)
            except (RuntimeError, AssertionError, subprocess.SubprocessError) as exc:
                print(f"scripts/bench bed: run {run} failed: {exc}", file=sys.stderr)
                return 1
            discover.append(d)
            push.append(p)
            if not args.json:
                print(f"run {run:<3} discover {d:.3f} s, push {p:.3f} s", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    result = {
        "command": command,
        "runs": args.runs,
        "hosts": HOSTS,
        "daemon_config": netns_helpers.DAEMON_CONFIG.strip().replace("\n", "; "),
        "discover_seconds": summary(discover),
        "push_seconds": summary(push),
        "wall_seconds": round(time.perf_counter() - wall, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'command':28} {command}")
        print(f"{'runs':28} {args.runs} ({HOSTS} hosts, fresh bed each)")
        print(f"{'daemon config':28} {result['daemon_config']}")
        for name in ("discover", "push"):
            s = result[f"{name}_seconds"]
            print(f"{name + '_median_s':28} {s['median']}")
            print(f"{name + '_min_s':28} {s['min']}")
            print(f"{name + '_max_s':28} {s['max']}")
        print(f"{'wall_seconds':28} {result['wall_seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
