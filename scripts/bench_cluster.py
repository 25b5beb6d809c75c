"""Cluster benchmark: what one write costs as the number of nodes grows.

    scripts/bench cluster [--nodes 2,4,8,16,32] [--k 1000] [--idle-seconds 20]
                          [--max-peers 8] [--bed-hosts 16] [--no-bed]
                          [--bound 180] [--seed 1] [--json]

Loopback: for each N of --nodes, N `ctxfs daemon` processes on 127.0.0.1
(--no-mdns), each with its own home in one cluster and every other node
as --peer (the full peer list mDNS gives in a lab; the ports are picked
before anything starts). Bed: --bed-hosts hosts of the network-namespace
bed (tests/netns_helpers.Bed, as scripts/bench bed uses it), daemons with
default settings and no --peer: mDNS only. The bed needs root and
`ip netns`; without them it is skipped with one line.

Each cluster is measured once every node answers and its set of connected
peers has held still for STABLE_SECONDS, all in sync, the connection graph
connected (and, with a daemon that has no --max-peers, every node connected
to every other):

connections  per node, status rows in state "connected" (and "known"),
             cross-checked with the daemon's established TCP sockets (ss).
idle         over --idle-seconds: each node's TCP payload bytes sent +
             received (the kernel's per-socket counters, `ss -tinp`, run
             inside the node's namespace on the bed; on the bed also eth0's
             counters, which include mDNS and headers), its CPU (utime +
             stime from /proc/PID/stat) and VmRSS at the end.
write        k small contexts (bench_node.small_contexts: roots and chains
             of depth <= 2, 1-3 short atoms) pushed through node 0's local
             API in one LocalClient.push call. Timed from just before the
             call: when it returns (node 0 committed), and when every node's
             `objects` (status over its API socket every 20 ms, one open
             connection per node) reaches the expected count. Once all
             report one root with every connected peer in sync, and
             TAIL_SECONDS more for trailing announcements, each node's CPU
             seconds and TCP bytes in and out are read again: the write's
             cost is the difference (a few seconds of idle traffic
             included). payload = the k contexts' canonical bytes.

--max-peers is passed (on the bed: `max_peers` in config.toml) only when
`ctxfs daemon --help` lists it; the setting used is reported. Every daemon
is stopped, every home and namespace removed, whatever happens. Prints a
Markdown table (one row per cluster) for docs/benchmarks.md; asserts
nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests", ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
import chaos_common  # noqa: E402,F401  (stands in for pytest where the test extra is missing)
import netns_helpers  # noqa: E402
from bench_node import _source_state, init_home, small_contexts  # noqa: E402
from process_helpers import CTXFS, Daemon, _env  # noqa: E402

from daemon.client import LocalClient  # noqa: E402
from daemon.endpoint import DaemonNotRunning, LocalApiError  # noqa: E402

# The issue's own method polls every node's status every 20 ms.
POLL = 0.02
SETTLE_POLL = 0.25
# Connected sets unchanged this long (and everything else ready): settled.
# Longer than the first reconnect backoffs (0.5 s, 1 s), so a dial that is
# about to be retried is not mistaken for the final topology.
STABLE_SECONDS = 3.0
# After all are in sync, counters are read this much later: announcements
# and reconciliations that follow the last object count toward the write.
TAIL_SECONDS = 1.0
STOP_BOUND = 10.0
COMMAND_BOUND = 60.0
# The interface contract's default degree; passed explicitly when supported.
DEFAULT_MAX_PEERS = 8
FAILURES = (RuntimeError, AssertionError, LocalApiError, OSError, subprocess.SubprocessError)


def progress(text: str) -> None:
    print(f"[cluster] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


class LoopbackDaemon(Daemon):
    """A process_helpers.Daemon on a port picked before any node starts, so
    that every node can be given every other as --peer from the start."""

    def __init__(self, home: Path, log_dir: Path, name: str, port: int, extra: list[str]) -> None:
        super().__init__(home, log_dir, name)
        self.listen = f"127.0.0.1:{port}"
        self.extra = list(extra)
        self.netns: str | None = None

    def start(self, peers=(), *, wait: bool = False, bound: float = 0.0) -> LoopbackDaemon:
        assert not wait, "readiness is polled for all nodes at once"
        self.peers = list(peers)
        self.starts += 1
        self._log_path = self.log_dir / f"{self.name}.{self.starts}.log"
        argv = [str(CTXFS), "--home", str(self.home), "daemon", "--listen", self.listen, "--no-mdns", *self.extra]
        for peer in self.peers:
            argv += ["--peer", peer]
        with open(self._log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=_env(), start_new_session=True)
        return self


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held together while picked, so distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def stop_all(daemons: list[Daemon]) -> None:
    """SIGTERM to all at once, STOP_BOUND for all together, then SIGKILL; all reaped."""
    running = [d for d in daemons if d.proc is not None and d.proc.poll() is None]
    for d in running:
        with contextlib.suppress(ProcessLookupError):
            d.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_BOUND
    for d in running:
        try:
            d.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()


def check_alive(daemons: list[Daemon]) -> None:
    for d in daemons:
        if d.proc.poll() is not None:
            raise RuntimeError(f"{d.name} exited {d.proc.returncode}:\n{d.stderr()[-2000:]}")


# ---------------------------------------------------------------- what the kernel says

_SS_HEAD = re.compile(r"(\S+):(\d+)\s+(\S+):(\d+)\s+users:\(\(.*?pid=(\d+)")


def tcp_counters(pids: set[int], netns: str | None) -> dict[tuple, dict]:
    """Per established TCP socket of these processes: payload bytes sent and received."""
    argv = ["ss", "-tinpH", "state", "established"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=COMMAND_BOUND).stdout
    result: dict[tuple, dict] = {}
    key = None
    for line in out.splitlines():
        if line[:1].isspace():  # the detail line of the socket above it
            if key is not None:
                fields = dict(re.findall(r"\b(bytes_sent|bytes_received):(\d+)", line))
                result[key] = {k: int(fields.get(k, 0)) for k in ("bytes_sent", "bytes_received")}
            key = None
            continue
        match = _SS_HEAD.search(line)
        key = None
        if match and int(match.group(5)) in pids:
            key = (int(match.group(5)), f"{match.group(1)}:{match.group(2)}", f"{match.group(3)}:{match.group(4)}")
            result[key] = {"bytes_sent": 0, "bytes_received": 0}
    return result


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def eth0_bytes(netns: str) -> int:
    """Bytes received + sent on a bed host's eth0: TCP, mDNS and headers."""
    out = subprocess.run(["ip", "-j", "-s", "-n", netns, "link", "show", "dev", "eth0"], check=True,
                         capture_output=True, text=True, timeout=COMMAND_BOUND).stdout
    stats = json.loads(out)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


def sample(daemons: list) -> dict:
    pids = {d.pid for d in daemons}
    tcp: dict[tuple, dict] = {}
    for netns in {d.netns for d in daemons}:
        tcp.update(tcp_counters(pids, netns))
    return {
        "at": time.perf_counter(), "tcp": tcp,
        "cpu": {d.pid: cpu_seconds(d.pid) for d in daemons},
        "eth0": {d.pid: eth0_bytes(d.netns) for d in daemons if d.netns is not None},
    }


def per_node(before: dict, after: dict, daemons: list) -> list[dict]:
    """What each node did between two samples. A socket opened in between
    counts from zero; one closed in between is lost (and counted as such)."""
    out = []
    for d in daemons:
        sent = received = 0
        for key, end in after["tcp"].items():
            if key[0] == d.pid:
                start = before["tcp"].get(key, {"bytes_sent": 0, "bytes_received": 0})
                sent += end["bytes_sent"] - start["bytes_sent"]
                received += end["bytes_received"] - start["bytes_received"]
        closed = sum(1 for key in before["tcp"] if key[0] == d.pid and key not in after["tcp"])
        row = {"sent": sent, "received": received, "closed": closed,
               "cpu": after["cpu"][d.pid] - before["cpu"][d.pid]}
        if d.pid in after["eth0"]:
            row["eth0"] = after["eth0"][d.pid] - before["eth0"][d.pid]
        out.append(row)
    return out


def spread(values) -> dict:
    values = list(values)
    return {"mean": round(statistics.fmean(values), 3), "max": round(max(values), 3)}


# ---------------------------------------------------------------- status over the API socket


async def ask(home: Path) -> dict | None:
    try:
        async with LocalClient.connect(home) as client:
            return await client.status()
    except (DaemonNotRunning, LocalApiError, OSError):
        return None


async def ask_all(daemons: list) -> list[dict | None]:
    answers: list[dict | None] = [None] * len(daemons)

    async def one(i: int) -> None:
        answers[i] = await ask(daemons[i].home)

    async with trio.open_nursery() as nursery:
        for i in range(len(daemons)):
            nursery.start_soon(one, i)
    return answers


def connected_ids(status: dict) -> frozenset[str]:
    return frozenset(p["node_id"] for p in status["peers"] if p.get("state") == "connected" and p.get("node_id"))


def all_in_sync(statuses: list[dict]) -> bool:
    return len({s["root"] for s in statuses}) == 1 and all(
        p.get("in_sync") is True for s in statuses for p in s["peers"] if p.get("state") == "connected")


def graph(statuses: list[dict]) -> dict:
    """The connection graph: is it connected, hops from node 0, diameter."""
    ids = [s["node_id"] for s in statuses]
    edges: dict[str, set[str]] = {i: set() for i in ids}
    for s in statuses:
        for peer in connected_ids(s) & edges.keys():
            edges[s["node_id"]].add(peer)
            edges[peer].add(s["node_id"])

    from_0 = _bfs(edges, ids[0])
    whole = len(from_0) == len(ids)
    return {"connected": whole, "hops_from_node0": max(from_0.values()),
            "diameter": max(max(_bfs(edges, i).values()) for i in ids) if whole else None}


def _bfs(edges: dict[str, set[str]], source: str) -> dict[str, int]:
    distance, frontier = {source: 0}, [source]
    while frontier:
        following = []
        for node in frontier:
            for peer in edges[node]:
                if peer not in distance:
                    distance[peer] = distance[node] + 1
                    following.append(peer)
        frontier = following
    return distance


async def wait_settled(daemons: list, full_mesh: bool, bound: float) -> list[dict]:
    """Until every node answers, all in sync, the graph connected (a full
    mesh if required) and every node's connected set unchanged for STABLE_SECONDS."""
    last, since, statuses = None, trio.current_time(), []
    try:
        with trio.fail_after(bound):
            while True:
                check_alive(daemons)
                statuses = await ask_all(daemons)
                if any(s is None or s.get("listen") is None for s in statuses):
                    last = None
                else:
                    sets = tuple(connected_ids(s) for s in statuses)
                    if sets != last:
                        last, since = sets, trio.current_time()
                    ready = (all(sets) and all_in_sync(statuses) and graph(statuses)["connected"]
                             and (not full_mesh or all(len(x) == len(daemons) - 1 for x in sets)))
                    if ready and trio.current_time() - since >= STABLE_SECONDS:
                        return statuses
                await trio.sleep(SETTLE_POLL)
    except trio.TooSlowError:
        counts = [len(connected_ids(s)) if s else None for s in statuses]
        answered = bool(statuses) and all(s is not None for s in statuses)
        state = (f"in sync {all_in_sync(statuses)}, graph connected {graph(statuses)['connected']}, "
                 f"connected sets unchanged for {trio.current_time() - since:.1f} s" if answered else "not all answering")
        raise RuntimeError(f"not settled within {bound:.0f} s; connected peers per node {counts}; {state}") from None


async def measure_write(daemons: list, contexts: list, payload: int, bound: float) -> dict:
    """Push on node 0; every 20 ms each node's object count until it has them all."""
    k = len(contexts)
    async with contextlib.AsyncExitStack() as stack:
        pusher = await stack.enter_async_context(LocalClient.connect(daemons[0].home))
        clients = [await stack.enter_async_context(LocalClient.connect(d.home)) for d in daemons]
        held = [(await c.status())["objects"] for c in clients]
        if len(set(held)) != 1:
            raise RuntimeError(f"nodes hold different counts before the write: {held}")
        expected = held[0] + k
        seen: list[float | None] = [None] * len(daemons)
        pushed: list[float] = []
        before = sample(daemons)
        start = time.perf_counter()
        observer_start = time.process_time()  # this process: the polling costs CPU too

        async def push() -> None:
            ids = await pusher.push(contexts)
            pushed.append(time.perf_counter())
            if len(ids) != k:
                raise RuntimeError(f"push acknowledged {len(ids)} of {k}")

        async def watch(i: int) -> None:
            while (await clients[i].status())["objects"] < expected:
                await trio.sleep(POLL)
            seen[i] = time.perf_counter()
        observer_cpu: list[float] = []

        try:
            with trio.fail_after(bound):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(push)
                    for i in range(len(daemons)):
                        nursery.start_soon(watch, i)
        except trio.TooSlowError:
            held = [(await c.status())["objects"] for c in clients]
            raise RuntimeError(f"not converged within {bound:.0f} s: objects per node {held}, want {expected}") from None
        try:
            with trio.fail_after(bound):
                while not all_in_sync([await c.status() for c in clients]):
                    await trio.sleep(POLL)
        except trio.TooSlowError:
            raise RuntimeError(f"all hold {expected} objects but not in sync within {bound:.0f} s") from None
        in_sync = time.perf_counter()
        observer_cpu.append(time.process_time() - observer_start)
        await trio.sleep(TAIL_SECONDS)
        after = sample(daemons)
    nodes = per_node(before, after, daemons)
    memory = [memory_mb(d.pid) for d in daemons]
    result = {
        "push_returns_s": round(pushed[0] - start, 3),
        "converged_s": round(max(seen) - start, 3),
        "node_converged_s": {"median": round(statistics.median(seen) - start, 3)},
        "in_sync_s": round(in_sync - start, 3),
        "observer_cpu_s": round(observer_cpu[0], 2),
        "measured_over_s": round(after["at"] - before["at"], 2),
        "cpu_s": spread(n["cpu"] for n in nodes),
        "bytes_in": spread(n["received"] for n in nodes),
        "bytes_out": spread(n["sent"] for n in nodes),
        "in_per_payload": spread(n["received"] / payload for n in nodes),
        "out_per_payload": spread(n["sent"] / payload for n in nodes),
        "node0": {"cpu_s": round(nodes[0]["cpu"], 3), "bytes_in": nodes[0]["received"], "bytes_out": nodes[0]["sent"]},
        "sockets_closed": sum(n["closed"] for n in nodes),
        "rss_mb_after": spread(m["VmRSS"] for m in memory),
        "hwm_mb_max": round(max(m["VmHWM"] for m in memory), 1),
    }
    if all("eth0" in n for n in nodes):
        result["eth0_bytes"] = spread(n["eth0"] for n in nodes)
    return result


def measure_idle(daemons: list, seconds: float) -> dict:
    before = sample(daemons)
    time.sleep(seconds)
    after = sample(daemons)
    elapsed = after["at"] - before["at"]
    nodes = per_node(before, after, daemons)
    result = {
        "seconds": round(elapsed, 1),
        "bytes_per_s": spread((n["sent"] + n["received"]) / elapsed for n in nodes),
        "cpu_percent": spread(100 * n["cpu"] / elapsed for n in nodes),
        "rss_mb": spread(memory_mb(d.pid)["VmRSS"] for d in daemons),
        "sockets_closed": sum(n["closed"] for n in nodes),
        "tcp_sockets": spread(sum(1 for key in before["tcp"] if key[0] == d.pid) for d in daemons),
    }
    if all("eth0" in n for n in nodes):
        result["eth0_bytes_per_s"] = spread(n["eth0"] / elapsed for n in nodes)
    return result


def measure(daemons: list, where: str, max_peers: int | None, args, contexts: list, payload: int) -> dict:
    """Everything for one running cluster (the daemons just started)."""
    started = time.perf_counter()
    statuses = trio.run(wait_settled, daemons, max_peers is None, args.bound)
    row = {
        "nodes": len(daemons), "where": where, "max_peers": max_peers,
        "settle_s": round(time.perf_counter() - started, 1),
        "connections": spread(len(connected_ids(s)) for s in statuses),
        "known": spread(sum(1 for p in s["peers"] if p.get("state") == "known") for s in statuses),
        "graph": graph(statuses),
    }
    progress(f"{where}, {len(daemons)} nodes: settled in {row['settle_s']} s; idle for {args.idle_seconds} s")
    row["idle"] = measure_idle(daemons, args.idle_seconds)
    row["tcp_sockets"] = row["idle"].pop("tcp_sockets")
    progress(f"{where}, {len(daemons)} nodes: pushing {len(contexts)} contexts on node 0")
    row["write"] = trio.run(measure_write, daemons, contexts, payload, args.bound)
    return row


# ---------------------------------------------------------------- the two beds


def run_loopback(base: Path, n: int, max_peers: int | None, args, contexts: list, payload: int) -> dict:
    root = base / f"n{n}"
    logs = root / "logs"
    logs.mkdir(parents=True)
    extra = ["--max-peers", str(max_peers)] if max_peers is not None else []
    daemons: list[LoopbackDaemon] = []
    try:
        for i, port in enumerate(free_ports(n)):
            home = root / f"h{i}"
            init_home(home, root / "h0" / "cluster.key" if i else None)
            daemons.append(LoopbackDaemon(home, logs, f"h{i}", port, extra))
        for d in daemons:
            d.start([o.listen for o in daemons if o is not d])
        return measure(daemons, "127.0.0.1", max_peers, args, contexts, payload)
    finally:
        stop_all(daemons)
        shutil.rmtree(root, ignore_errors=True)


def run_bed(base: Path, hosts: int, max_peers: int | None, args, contexts: list, payload: int) -> dict:
    bed = netns_helpers.Bed(base / "bed")
    try:
        bed.up(hosts)
        for i in range(1, hosts + 1):
            d = bed.daemon(i, start=False)
            # Daemon defaults (not the tests' fast timers): the idle figures are a lab's.
            (d.home / "config.toml").write_text(f"max_peers = {max_peers}\n" if max_peers is not None else "")
            d.netns = bed.host(i)
        for d in bed.daemons:
            d.start(wait=False)
        return measure(bed.daemons, "netns bed, mDNS", max_peers, args, contexts, payload)
    finally:
        try:
            stop_all(bed.daemons)
        finally:
            bed.close()


# ---------------------------------------------------------------- output


def _pair(figure: dict, fmt: str) -> str:
    return f"{figure['mean']:{fmt}} / {figure['max']:{fmt}}"


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| nodes | where | max_peers | connections per node (TCP sockets) mean / max | push returns (s) "
        "| all converged (s) | CPU s per node mean / max | bytes in ÷ payload mean / max "
        "| bytes out ÷ payload mean / max | idle B/s per node mean / max | RSS MB per node mean / max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['nodes']} | {r['where']} | failed: {' '.join(r['error'].split())[:200]} |")
            continue
        w, i = r["write"], r["idle"]
        lines.append(
            f"| {r['nodes']} | {r['where']} | {r['max_peers'] if r['max_peers'] is not None else '– (all)'} "
            f"| {_pair(r['connections'], '.1f')} ({_pair(r['tcp_sockets'], '.1f')}) "
            f"| {w['push_returns_s']:.3f} | {w['converged_s']:.3f} | {_pair(w['cpu_s'], '.2f')} "
            f"| {_pair(w['in_per_payload'], '.2f')} | {_pair(w['out_per_payload'], '.2f')} "
            f"| {_pair(i['bytes_per_s'], '.0f')} | {_pair(i['rss_mb'], '.1f')} |")
    return lines


def details(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if "error" in r:
            continue
        w, i, g = r["write"], r["idle"], r["graph"]
        lines.append(
            f"{r['nodes']:>3} {r['where']}: settled {r['settle_s']} s; graph diameter {g['diameter']}, "
            f"{g['hops_from_node0']} hops from node 0; known (not dialled) {_pair(r['known'], '.1f')}; "
            f"node 0 CPU {w['node0']['cpu_s']} s, in {w['node0']['bytes_in']} B, out {w['node0']['bytes_out']} B; "
            f"median node converged {w['node_converged_s']['median']} s, all in sync {w['in_sync_s']} s "
            f"(the polling benchmark itself used {w['observer_cpu_s']} CPU s); "
            f"write measured over {w['measured_over_s']} s; sockets closed idle/write "
            f"{i['sockets_closed']}/{w['sockets_closed']}; idle CPU % {_pair(i['cpu_percent'], '.2f')}; "
            f"RSS after write {_pair(w['rss_mb_after'], '.1f')} MB, peak {w['hwm_mb_max']} MB"
            + (f"; eth0 idle B/s {_pair(i['eth0_bytes_per_s'], '.0f')}, eth0 write bytes {_pair(w['eth0_bytes'], '.0f')}"
               if "eth0_bytes" in w else ""))
    loop = {r["nodes"]: r for r in rows if r["where"] == "127.0.0.1" and "error" not in r}
    if 2 in loop and len(loop) > 1:
        top = max(loop)
        two, most = loop[2]["write"]["converged_s"], loop[top]["write"]["converged_s"]
        lines.append(f"all converged at {top} nodes ÷ at 2 nodes: {most / two:.2f} ({most:.3f} s / {two:.3f} s)")
    return lines


def _interrupt(signum, frame) -> None:
    # As a Ctrl-C: trio turns SIGINT into KeyboardInterrupt at a safe point,
    # and every finally (daemons, namespaces, homes) runs.
    os.kill(os.getpid(), signal.SIGINT)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="2,4,8,16,32", help="cluster sizes on 127.0.0.1, comma-separated")
    parser.add_argument("--k", type=int, default=1000, help="contexts in the write")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--max-peers", type=int, default=None,
                        help=f"passed to the daemons if they have --max-peers (default {DEFAULT_MAX_PEERS})")
    parser.add_argument("--bed-hosts", type=int, default=16)
    parser.add_argument("--no-bed", action="store_true", help="skip the network-namespace bed")
    parser.add_argument("--bound", type=float, default=180.0, help="seconds allowed for each wait")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--nodes: want sizes like 2,4,8, got {args.nodes!r}")
    if not sizes or min(sizes) < 2 or args.k < 1 or not 2 <= args.bed_hosts <= 250:
        parser.error("want --nodes sizes >= 2, --k >= 1, 2 <= --bed-hosts <= 250")

    help_text = subprocess.run([str(CTXFS), "daemon", "--help"], capture_output=True, text=True,
                               timeout=COMMAND_BOUND).stdout
    if "--max-peers" in help_text:
        max_peers = args.max_peers if args.max_peers is not None else DEFAULT_MAX_PEERS
    elif args.max_peers is not None:
        print("scripts/bench cluster: this ctxfs daemon has no --max-peers", file=sys.stderr)
        return 2
    else:
        max_peers = None

    items = small_contexts(args.k, random.Random(args.seed))
    contexts = [ctx for _, _, ctx in items]
    head = {
        "command": "./scripts/bench cluster" + (" " + shlex.join(argv) if argv else ""),
        "source": _source_state(), "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()[0],
        "k": args.k, "payload_bytes": sum(len(d) for _, d, _ in items),
        "max_peers": max_peers if max_peers is not None else "none (this daemon has no --max-peers: it dials every peer)",
    }
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    rows: list[dict] = []
    bed_note = None
    base = Path(tempfile.mkdtemp(prefix="ctxfs-cl-"))  # short: API socket paths must fit in sun_path
    try:
        for n in sizes:
            progress(f"127.0.0.1, {n} nodes: starting")
            try:
                rows.append(run_loopback(base, n, max_peers, args, contexts, head["payload_bytes"]))
            except FAILURES as exc:
                progress(f"127.0.0.1, {n} nodes: failed: {exc}")
                rows.append({"nodes": n, "where": "127.0.0.1", "error": str(exc)})
        if not args.no_bed:
            bed_note = netns_helpers.unavailable()
            if bed_note:
                print(f"scripts/bench cluster: bed skipped: {bed_note}", file=sys.stderr)
            else:
                netns_helpers._remove_stale_beds()
                progress(f"netns bed, {args.bed_hosts} hosts: starting")
                try:
                    rows.append(run_bed(base, args.bed_hosts, max_peers, args, contexts, head["payload_bytes"]))
                except FAILURES as exc:
                    progress(f"netns bed: failed: {exc}")
                    rows.append({"nodes": args.bed_hosts, "where": "netns bed, mDNS", "error": str(exc)})
    except KeyboardInterrupt:
        print("scripts/bench cluster: interrupted; daemons stopped, namespaces and homes removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)

    if args.json:
        print(json.dumps({**head, "bed_skipped": bed_note, "rows": rows}))
        return 0
    for key, value in head.items():
        print(f"{key:18} {value}")
    if bed_note:
        print(f"{'bed':18} skipped: {bed_note}")
    print()
    print("\n".join(table(rows)))
    print()
    print("\n".join(details(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
