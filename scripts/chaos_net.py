"""Network faults on the namespace bed: impaired links, a link down and up, a 2/3 partition (root only).

    sudo ./scripts/chaos net [--runs 3] [--contexts 200] [--impair auto|netem|emulated] [--only S,...]

Every run of every scenario builds a fresh bed with tests/netns_helpers.Bed
(scripts/netns-cluster: hosts PREFIX-h1..5 = 10.77.0.1-5, each veth's other
end `vI` on bridge br0 in the bed's own bridge namespace; nothing outside
those namespaces is touched), makes five homes on one cluster key, starts
five daemons with the test config (mdns_announce_seconds = 2, ping_seconds =
0.5, idle_timeout_seconds = 2.5) and no --peer, and waits until they found
each other through mDNS (every node connected to the four others, in sync).
Then one fault:

impair     every frame between hosts is delayed 100 ms ± 20 ms (uniform),
           10 % are lost, 25 % skip the delay (reordering), 1 % are
           duplicated: `tc qdisc add dev eth0 root netem delay 100ms 20ms
           loss 10% reorder 25% duplicate 1%` in every host namespace, so
           each frame crosses exactly one netem (its sender's) and both
           directions of every pair are impaired alike. Where the kernel has
           no sch_netem, --impair auto (the default) says so (figure
           `netem`) and runs the scenario on scripts/chaos_net_switch.py:
           a user-space switch in the bridge namespace that stands in for
           br0 (the ports leave br0) and gives every frame the same fate on
           entry, by netem's model. --impair netem refuses to stand in. --contexts contexts (a third of the batches chained on the
           node's previous push) are pushed in batches of 5 round-robin on
           the five nodes while impaired; the time is from the last ACK until
           all five report the expected root, still impaired.
linkdown   host V's eth0 goes down (`ip -n HOST link set eth0 down`; V is
           h5, h4, ... by run) for at least --down-seconds and until the
           heartbeat has dropped every session to V; meanwhile the four others
           push --fault-writes contexts and must converge among themselves,
           and V pushes a few of its own. The time is from eth0 up until all
           five hold both sides' writes.
partition  the ports of h3, h4, h5 move to a second bridge br1 in the
           bridge namespace (`ip -n BR link set vI master br1`): an L2 split
           that drops unicast and multicast alike, with no filter rule to get
           wrong. Each side writes --fault-writes / 2 contexts and must
           converge within itself (its time is reported) and not see the
           other side's; the split holds at least --partition-seconds and
           until no session crosses it. Heal moves the ports back to br0; the
           time is from then until all five hold both sides' writes.

"Converged" means every daemon's status root equals the root of the exact
set of ids pushed and acknowledged (sync.idset.IdSet: the root commits to
the set), so nothing acknowledged was lost and nothing else appeared. After
that the full mesh (every pair connected again, after the impairment is
lifted) is awaited and timed, as a note. Every daemon must still be running
at the end and exit 0 on SIGTERM. "drops" counts peer sessions that ended
before the daemons were stopped, as logged at both ends (a duplicate session
closed after two nodes dialled each other at once counts too). Logs of a
failed run are kept and their path printed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chaos_common import Outcome  # noqa: E402  (first: it puts tests/ on sys.path, pytest or not)
import netns_helpers  # noqa: E402
from chaos_net_impair import EmulatedImpairment, Netem, must, netem_unavailable, sh, short_reason  # noqa: E402
from netns_helpers import Bed, NetnsDaemon  # noqa: E402
from process_helpers import read_store_ids  # noqa: E402

from daemon.localapi import LocalClient  # noqa: E402
from sync import T_STRING, CompressedContext, MemoryAtom  # noqa: E402
from sync.idset import IdSet  # noqa: E402

SCENARIOS = ("impair", "linkdown", "partition")
HOSTS = 5
SIDES = ((1, 2), (3, 4, 5))
BATCH = 5
POLL = 0.1
WHEN = datetime(2026, 11, 24, 10, tzinfo=timezone.utc)
# Discovery of five fresh daemons takes about a second; the rest is slack for a busy machine.
DISCOVER_BOUND = 30.0
# The heartbeat (idle_timeout_seconds = 2.5) drops a dead session well within this.
CUT_BOUND = 20.0
# After the roots agree, how long every pair may take to be connected again.
MESH_BOUND = 30.0


class RunFailed(Exception):
    """A promise did not hold in one run; the message says which and shows the evidence."""


# ---------------------------------------------------------------- options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=3, help="runs of each scenario (default 3)")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated scenarios to run (default {','.join(SCENARIOS)})")
    parser.add_argument("--contexts", type=int, default=200, help="contexts pushed while impaired (default 200)")
    parser.add_argument("--fault-writes", type=int, default=40,
                        help="contexts pushed during a link-down or a partition (default 40)")
    parser.add_argument("--down-seconds", type=float, default=6.0, help="least time a link stays down (default 6)")
    parser.add_argument("--partition-seconds", type=float, default=6.0,
                        help="least time a partition holds (default 6)")
    parser.add_argument("--bound", type=float, default=120.0, help="seconds allowed for each convergence (default 120)")
    parser.add_argument("--impair", choices=("auto", "netem", "emulated"), default="auto",
                        help="auto: tc netem, or the user-space switch where the kernel lacks netem (said in "
                             "the figures); netem: never the switch; emulated: the switch, deliberately")
    parser.add_argument("--delay-ms", type=float, default=100.0)
    parser.add_argument("--jitter-ms", type=float, default=20.0)
    parser.add_argument("--loss", type=float, default=10.0, help="percent (default 10)")
    parser.add_argument("--reorder", type=float, default=25.0, help="percent sent without the delay (default 25)")
    parser.add_argument("--duplicate", type=float, default=1.0, help="percent (default 1)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs of passing runs too")


# ---------------------------------------------------------------- one run


def expected_root(ids: set[str]) -> str:
    return IdSet(bytes.fromhex(i) for i in ids).root().hex()


def full_mesh(statuses: list[dict | None]) -> bool:
    """Every node connected to every other one and in sync with it."""
    if any(s is None for s in statuses):
        return False
    ids = {s["node_id"] for s in statuses}
    for status in statuses:
        live = {p["node_id"]: p for p in status["peers"] if p["node_id"] in ids and p["state"] == "connected"}
        if set(live) != ids - {status["node_id"]} or not all(p["in_sync"] for p in live.values()):
            return False
    return True


async def _push(home: Path, contexts: list[CompressedContext]) -> list[str]:
    async with LocalClient.connect(home) as client:
        return await client.push(contexts)


class Run:
    """One fresh bed with five daemons; `close()` stops them and deletes the bed, whatever happened."""

    def __init__(self, base: Path, label: str, bound: float) -> None:
        self.bed = Bed(base / label)
        self.label = label
        self.bound = bound
        self.daemons: list[NetnsDaemon] = []
        self.tips: dict[int, str | None] = {}
        self.written = 0
        self.exits: list[str] = []
        self.ended: dict[Path, int] = {}

    def start(self) -> None:
        self.bed.up(HOSTS)
        self.daemons = [self.bed.daemon(i, start=False) for i in range(1, HOSTS + 1)]
        for d in self.daemons:
            d.start(wait=False)
        for d in self.daemons:
            d.wait_ready()
        began = time.monotonic()
        while not full_mesh(self.statuses()):
            if time.monotonic() - began > DISCOVER_BOUND:
                raise RunFailed(f"five fresh daemons did not find each other within {DISCOVER_BOUND} s:\n"
                                + self.bed.statuses())
            time.sleep(POLL)

    def daemon(self, index: int) -> NetnsDaemon:
        return self.daemons[index - 1]

    # ------------------------------------------------------------ observing

    def statuses(self, members=range(1, HOSTS + 1)) -> list[dict | None]:
        found = []
        for index in members:
            d = self.daemon(index)
            if d.proc.poll() is not None:
                raise RunFailed(f"{d.name} exited {d.proc.returncode}:\n{d.stderr()[-3000:]}")
            try:
                found.append(d.quick_status())
            except Exception:  # busy or restarting: not converged this time round
                found.append(None)
        return found

    def wait_roots(self, members, ids: set[str], since: float, what: str) -> float:
        """Seconds from `since` until every member reports the root of exactly `ids`."""
        root = expected_root(ids)
        while True:
            statuses = self.statuses(members)
            if all(s is not None and s["root"] == root for s in statuses):
                return time.monotonic() - since
            if time.monotonic() - since > self.bound:
                raise RunFailed(f"{what}: not converged within {self.bound:g} s\n"
                                + self.evidence(members, ids))
            time.sleep(POLL)

    def evidence(self, members, ids: set[str]) -> str:
        lines = []
        for index in members:
            d = self.daemon(index)
            status = None
            try:
                status = d.quick_status()
            except Exception as exc:
                status = {"error": repr(exc)}
            try:
                held = read_store_ids(d.home / "store.db")
                store = f"store: {len(ids - held)} of {len(ids)} expected missing, {len(held - ids)} unexpected"
            except Exception as exc:
                store = f"store unreadable: {exc!r}"
            peers = ", ".join(f"{p['address']}:{p['state']}{'/in_sync' if p['in_sync'] else ''}"
                              for p in (status or {}).get("peers", []))
            lines.append(f"  {d.name}: objects {(status or {}).get('objects')}; {store}; peers {peers}")
        return "\n".join(lines)

    def wait_cut(self, inside, outside, what: str) -> None:
        """Until no node of `inside` has a live session to a node of `outside`, or the other way."""
        began = time.monotonic()
        while True:
            statuses = dict(zip(range(1, HOSTS + 1), self.statuses()))
            ids = {i: s["node_id"] for i, s in statuses.items() if s}
            crossing = [
                (a, b) for group, other in ((inside, outside), (outside, inside)) for a in group
                for b in other if statuses.get(a) and any(
                    p["node_id"] == ids.get(b) and p["state"] == "connected" for p in statuses[a]["peers"])
            ]
            if len(ids) == HOSTS and not crossing:
                return
            if time.monotonic() - began > CUT_BOUND:
                raise RunFailed(f"{what}: sessions still connected across the fault after {CUT_BOUND} s: "
                                f"{crossing}\n{self.bed.statuses()}")
            time.sleep(POLL)

    def wait_mesh(self, since: float) -> float | None:
        """Seconds from `since` until every pair is connected and in sync again; None past MESH_BOUND."""
        began = time.monotonic()
        while not full_mesh(self.statuses()):
            if time.monotonic() - began > MESH_BOUND:
                return None
            time.sleep(POLL)
        return time.monotonic() - since

    # ------------------------------------------------------------ acting

    def push(self, index: int, count: int, *, chained: bool = False) -> set[str]:
        """`count` contexts into host `index` through its API; chained ones build on its previous push."""
        contexts = []
        base = self.tips.get(index) if chained else None
        for _ in range(count):
            self.written += 1
            atom = MemoryAtom(f"chaos net {self.label} h{index} #{self.written} {time.time_ns()}",
                              T_STRING, WHEN, "chaos-net", 0.5)
            ctx = CompressedContext(base, [atom])
            contexts.append(ctx)
            if chained:
                base = ctx.id
        ids = trio.run(_push, self.daemon(index).home, contexts)
        if ids != [c.id for c in contexts]:
            raise RunFailed(f"h{index} acknowledged {ids}, not what was pushed")
        self.tips[index] = ids[-1]
        return set(ids)

    def spread(self, members, total: int) -> set[str]:
        """`total` contexts in batches round-robin over `members`, every third batch chained."""
        ids: set[str] = set()
        batch = 0
        while len(ids) < total:
            index = members[batch % len(members)]
            ids |= self.push(index, min(BATCH, total - len(ids)), chained=batch % 3 == 2)
            batch += 1
        return ids

    def link(self, index: int, state: str) -> None:
        self.bed.link(index, state)

    def bridge(self, ports, bridge: str) -> None:
        ns = f"{self.bed.prefix}-br"
        if bridge != "br0" and sh(["ip", "-n", ns, "link", "show", "dev", bridge]).returncode != 0:
            must(["ip", "-n", ns, "link", "add", bridge, "type", "bridge"])
            must(["ip", "-n", ns, "link", "set", bridge, "type", "bridge", "mcast_snooping", "0"])
            must(["ip", "-n", ns, "link", "set", bridge, "up"])
        for index in ports:
            must(["ip", "-n", ns, "link", "set", f"v{index}", "master", bridge])

    # ------------------------------------------------------------ ending

    def close(self) -> None:
        """Every daemon must still run and exit 0 on SIGTERM; then the bed goes, whatever happened."""
        # Sessions that end from here on end because the daemons are being stopped.
        self.ended = {path: path.stat().st_size for path in self.bed.logs.glob("*.log")}
        try:
            for d in self.daemons:
                if d.proc is None:
                    continue
                if d.proc.poll() is not None:
                    self.exits.append(f"{d.name} had exited {d.proc.returncode}")
                    continue
                code = d.stop()
                if code != 0:
                    self.exits.append(f"{d.name} exited {code} on SIGTERM")
        finally:
            self.bed.close()

    def log_summary(self) -> tuple[Counter, int]:
        """WARNING-or-worse lines of the daemons' logs (ids and numbers masked), and peer sessions
        dropped before the run began stopping the daemons."""
        found: Counter = Counter()
        drops = 0
        for path in sorted(self.bed.logs.glob("*.log")):
            owner, in_traceback, stopping = None, False, False
            text = path.read_bytes()
            measured = text[:self.ended.get(path, len(text))].count(b"\n")
            for number, line in enumerate(text.decode(errors="replace").splitlines()):
                stopping = stopping or number >= measured
                if line.startswith("Traceback"):
                    in_traceback = True
                    continue
                if in_traceback:
                    if line.startswith(" "):
                        continue
                    # The exception line ends it; a traceback under no WARNING/ERROR line went uncaught.
                    found[_mask(f"{owner or 'UNCAUGHT'} ... {line}")] += 1
                    if owner:
                        found[_mask(owner)] -= 1
                    in_traceback, owner = False, None
                    continue
                if line.startswith(("WARNING", "ERROR", "CRITICAL")):
                    owner = line
                    found[_mask(line)] += 1
                else:
                    owner = None
                if not stopping and line.startswith("INFO daemon.peer:") and line.endswith(" disconnected"):
                    drops += 1
        return +found, drops


def _mask(line: str) -> str:
    return re.sub(r"[0-9a-f]{8,}|\d+(\.\d+)*", "#", line)[:200]


# ---------------------------------------------------------------- the scenarios


def scenario_impair(run: Run, options, number: int) -> dict:
    hosts = [run.bed.host(i) for i in range(1, HOSTS + 1)]
    if options.impair_mode == "netem":
        impairment = Netem(hosts, options)
    else:
        impairment = EmulatedImpairment(f"{run.bed.prefix}-br", HOSTS, options)
    try:
        impairment.start()
        began = time.monotonic()
        ids = run.spread(list(range(1, HOSTS + 1)), options.contexts)
        pushed = time.monotonic()
        converge = run.wait_roots(range(1, HOSTS + 1), ids, pushed, "impaired")
        result = {"converge_s": converge, "writes_s": pushed - began, "ids": ids, "since": pushed}
    finally:
        impairment.stop()
    result["note"] = f"{options.contexts} pushed in {result['writes_s']:.1f} s; {impairment.summary()}"
    return result


def scenario_linkdown(run: Run, options, number: int) -> dict:
    victim = HOSTS - (number - 1) % HOSTS
    others = [i for i in range(1, HOSTS + 1) if i != victim]
    base = run.spread(list(range(1, HOSTS + 1)), 10)
    run.wait_roots(range(1, HOSTS + 1), base, time.monotonic(), "before the link went down")
    run.link(victim, "down")
    try:
        down = time.monotonic()
        theirs = run.spread(others, options.fault_writes)
        mine = run.spread([victim], max(1, options.fault_writes // 8))
        side = run.wait_roots(others, base | theirs, down, f"the four others while h{victim} was down")
        run.wait_roots([victim], base | mine, down, f"h{victim} alone")
        run.wait_cut([victim], others, f"h{victim} link down")
        time.sleep(max(0.0, options.down_seconds - (time.monotonic() - down)))
        held = time.monotonic() - down
    finally:
        run.link(victim, "up")
    up = time.monotonic()
    ids = base | theirs | mine
    converge = run.wait_roots(range(1, HOSTS + 1), ids, up, f"after h{victim}'s link came up")
    return {"converge_s": converge, "side_s": side, "held_s": held, "ids": ids, "since": up,
            "note": f"h{victim} down {held:.1f} s"}


def scenario_partition(run: Run, options, number: int) -> dict:
    a, b = SIDES
    base = run.spread(list(range(1, HOSTS + 1)), 10)
    run.wait_roots(range(1, HOSTS + 1), base, time.monotonic(), "before the partition")
    healed = False
    run.bridge(b, "br1")
    try:
        split = time.monotonic()
        side_a = run.spread(list(a), options.fault_writes // 2)
        side_b = run.spread(list(b), options.fault_writes // 2)
        time_a = run.wait_roots(a, base | side_a, split, "side {1,2} within itself")
        time_b = run.wait_roots(b, base | side_b, split, "side {3,4,5} within itself")
        run.wait_cut(a, b, "partition")
        time.sleep(max(0.0, options.partition_seconds - (time.monotonic() - split)))
        # Neither side saw the other's writes, even after holding: the split was real.
        run.wait_roots(a, base | side_a, split, "side {1,2} at the end of the partition")
        run.wait_roots(b, base | side_b, split, "side {3,4,5} at the end of the partition")
        held = time.monotonic() - split
        run.bridge(b, "br0")
        healed = True
    finally:
        if not healed:
            try:
                run.bridge(b, "br0")
            except Exception:
                pass  # the bed is deleted next anyway
    heal = time.monotonic()
    ids = base | side_a | side_b
    converge = run.wait_roots(range(1, HOSTS + 1), ids, heal, "after the heal")
    return {"converge_s": converge, "side_s": max(time_a, time_b), "held_s": held, "ids": ids, "since": heal,
            "note": f"sides {time_a:.1f}/{time_b:.1f} s, split {held:.1f} s"}


SCENARIO_FUNCTIONS = {"impair": scenario_impair, "linkdown": scenario_linkdown, "partition": scenario_partition}


def one_run(base: Path, scenario: str, number: int, options) -> dict:
    run = Run(base, f"{scenario[0]}{number}", options.bound)
    record: dict = {"scenario": scenario, "run": number, "ok": False}
    try:
        run.start()
        result = SCENARIO_FUNCTIONS[scenario](run, options, number)
        record.update(result)
        mesh = run.wait_mesh(result.get("since", time.monotonic() - result["converge_s"]))
        record["mesh_s"] = mesh
        # Still exactly what was pushed, everywhere, after the mesh settled.
        run.wait_roots(range(1, HOSTS + 1), result["ids"], time.monotonic(), "at the end")
        record["ok"] = True
    except Exception as exc:  # whatever broke, the run failed; the other runs go on
        record["error"] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RunFailed) else str(exc)
    finally:
        try:
            run.close()
        except Exception as exc:  # the bed could not be removed: say so, loudly
            record["ok"] = False
            record["error"] = (record.get("error", "") + f"\nclosing the bed failed: {exc}").strip()
        record["exits"] = run.exits
        if run.exits:
            record["ok"] = False
        record["log_lines"], record["drops"] = run.log_summary()
        record["logs"] = str(run.bed.root)
    record.pop("ids", None)
    return record


# ---------------------------------------------------------------- the part


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    return (statistics.median(values), max(values)) if values else (None, None)


def _terminated(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def run(options) -> Outcome:
    wanted = [s.strip() for s in options.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SCENARIOS))
    if unknown or not wanted or options.runs < 1:
        return Outcome(part="net", ok=False, figures={"reason": f"bad options: --only {options.only} --runs {options.runs}"})
    reason = netns_helpers.unavailable()
    if reason:
        return Outcome(part="net", ok=False, figures={"reason": f"{reason}; run as root: sudo ./scripts/chaos net"})
    netns_helpers._remove_stale_beds()

    figures: dict = {}
    problems: list[str] = []
    options.impair_mode = "netem"
    if "impair" in wanted:
        lacking = netem_unavailable() if options.impair != "emulated" else "not tried (--impair emulated)"
        figures["netem"] = "yes" if lacking is None else f"no ({short_reason(lacking)})"
        if lacking is not None:
            if options.impair == "netem":
                print(f"tc netem unavailable: {lacking}", flush=True)
                problems.append("no tc netem here: impaired scenario not run")
                wanted.remove("impair")
            else:
                options.impair_mode = "emulated"
                print(f"tc netem unavailable: {lacking}\n"
                      f"  -> the impaired scenario runs on the user-space switch (scripts/chaos_net_switch.py)",
                      flush=True)

    base = Path(tempfile.mkdtemp(prefix="ctxfs-net-"))  # short: API socket paths must fit in sun_path
    records: list[dict] = []
    keep = options.keep_logs
    # A SIGTERM to the campaign unwinds like Ctrl-C: every finally kills its daemons and deletes its bed.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        for scenario in wanted:
            for number in range(1, options.runs + 1):
                record = one_run(base, scenario, number, options)
                records.append(record)
                state = "ok" if record["ok"] else "FAILED"
                print(f"{scenario:<9} run {number}: {state:<6} converge {_fmt(record.get('converge_s'))} s, "
                      f"mesh {_fmt(record.get('mesh_s'))} s, {record['drops']} sessions dropped; "
                      f"{record.get('note', '')}", flush=True)
                if not record["ok"]:
                    keep = True
                    print("  " + record.get("error", "").replace("\n", "\n  "), flush=True)
                for exit_ in record["exits"]:
                    print(f"  daemon: {exit_}", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if keep:
            print(f"daemon logs kept in {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)

    print()
    fault = {"impair": (f"{'netem' if options.impair_mode == 'netem' else 'switch'} "
                        f"{options.delay_ms:g}±{options.jitter_ms:g}ms {options.loss:g}% loss "
                        f"{options.reorder:g}% reord {options.duplicate:g}% dup; {options.contexts} ctx"),
             "linkdown": f"one eth0 down >= {options.down_seconds:g} s; {options.fault_writes} ctx",
             "partition": f"{{1,2}}|{{3,4,5}} >= {options.partition_seconds:g} s; {options.fault_writes} ctx"}
    print(f"{'scenario':<10} {'fault':<54} {'runs ok':>7} {'converge s med/max':>19} {'sides s max':>11} "
          f"{'mesh s max':>10} {'drops':>5}")
    for scenario in wanted:
        rows = [r for r in records if r["scenario"] == scenario]
        good = [r for r in rows if r["ok"]]
        med, top = _stats([r["converge_s"] for r in good])
        sides = [r["side_s"] for r in good if "side_s" in r]
        meshes = [r["mesh_s"] for r in good]
        mesh = "-" if not meshes else ("never" if None in meshes else _fmt(max(meshes)))
        print(f"{scenario:<10} {fault[scenario]:<54} {f'{len(good)}/{len(rows)}':>7} "
              f"{f'{_fmt(med)} / {_fmt(top)}':>19} {_fmt(max(sides) if sides else None):>11} "
              f"{mesh:>10} {sum(r['drops'] for r in rows):>5}")
        figures[f"{scenario}_s"] = f"{_fmt(med)}/{_fmt(top)}"
        if len(good) < len(rows):
            problems.append(f"{scenario}: {len(rows) - len(good)} of {len(rows)} runs failed")
        if any(r.get("mesh_s", 0) is None for r in good):
            print(f"  note: after {scenario}, some pair of nodes was not connected again within {MESH_BOUND:g} s")

    lines: Counter = Counter()
    for record in records:
        lines.update(record["log_lines"])
    if lines:
        print("\ndaemon log lines at WARNING or above, all runs (ids and numbers masked):")
        for line, count in lines.most_common(10):
            print(f"  {count:>4} x {line}")
    exits = sum(len(r["exits"]) for r in records)
    figures["runs"] = options.runs
    figures["daemon_exits"] = exits
    figures["failed_runs"] = sum(1 for r in records if not r["ok"])
    if exits:
        problems.append(f"{exits} daemon exits")
    if problems:
        figures["reason"] = "; ".join(problems)
    return Outcome(part="net", ok=not problems, figures=figures)
