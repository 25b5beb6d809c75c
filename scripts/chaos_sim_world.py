"""A deterministic world of simulated ctxfs nodes: topology, links, scheduler, faults.

Why a simulation: the other chaos parts run real daemons, whose timing no
run repeats. Here every choice — which link delivers next and how many of
its bytes, which link fails, which node restarts, who writes what — comes
from one `random.Random` seeded by (nodes, seed), so a failing seed replays
exactly, in one process, in seconds.

The model:

- **Topology.** The union of two random Hamiltonian cycles over the nodes:
  connected by construction, degree 4 for almost every node (a repeated
  edge is kept once), diameter ~log3(N). The same rule for every N, so
  rounds-to-converge across node counts compare like with like. Or
  (`--topology overlay`) the daemon's own bounded-degree overlay: every
  node dials the peers `sync.overlay.choose_links` picks among all node
  ids (at most `--degree`), as a lab cluster on one LAN would.
- **Links.** One connection per edge, the lower-numbered node dialling. A
  link is two byte queues between two real `Connection`s. Failing it drops
  both ends' sessions and whatever bytes were still queued (a message cut
  in the middle included); restoring it starts a new connection with HELLO.
- **A round** is the unit of time: every link direction delivers the bytes
  it had queued when the round began, in a random order of directions and
  in random-sized pieces (interleaving pieces of different links). Bytes a
  delivery produces wait for the next round, so a round is one network
  hop for every link at once; a request and its reply take two rounds.
- **Fault phase** (`FAULT_ROUNDS` rounds): nodes write contexts (roots, or
  deltas on any context they hold, their own or received); after any
  delivery the link may fail or the receiving node may restart (links
  dropped, memory lost, the store kept — what was ACKed is on disk — and
  down for up to `MAX_DOWN_ROUNDS` rounds); down links come back at random.
- **Heal phase**: every node up, every link connected, no more faults or
  writes. Rounds are counted until every node's index root equals the root
  of the set of all contexts written (and its store holds exactly that
  set, and it owes no fetch claim). A seed that needs more than
  `max_heal_rounds` did not converge.
- **Protocol** (`protocol`): "2", every node the current daemon (objects
  on request, chaos_sim_peer.py); "1", every node the release before it
  (every holder pushes); "mixed", even-numbered nodes the current daemon
  and odd-numbered ones the older release, which must still interwork.
"""

from __future__ import annotations

import collections
import hashlib
import random
import traceback
from datetime import datetime, timedelta, timezone

import attrs

from chaos_sim_peer import ANTI_ENTROPY_ROUNDS, Clock, PeerGone, SimNode, SimSession
from sync.codec import encode_context
from sync.errors import ProtocolError
from sync.idset import IdSet
from sync import overlay
from sync.model import T_STRING, CompressedContext, MemoryAtom

PROTOCOLS = ("1", "2", "mixed")

# Long enough for every node to write a few contexts and for most links to
# fail at least once while data is moving; short enough that a 64-node seed
# takes seconds.
FAULT_ROUNDS = 40
# A node writes about FAULT_ROUNDS * WRITE_PROBABILITY = 2 contexts: the
# total grows with N, so bigger clusters also move more data (every node
# must receive all ~2N of them: the work grows as N squared, and 64-node
# seeds take seconds each).
WRITE_PROBABILITY = 0.05
# Most writes extend some context the node holds (a lineage crossing nodes:
# its base must travel before it); the rest start new lineages.
CHAIN_PROBABILITY = 0.7
# Context sizes: a few hundred bytes to a few KiB, so a push of a few dozen
# (a node catching up, from 16-32 nodes up) overflows the 64 KiB window and
# waits for credit. Bigger contexts would make that happen at 8 nodes too,
# but bytes cost time: at 7 KB a 64-node seed takes twice as long.
MIN_CONTENT_BYTES, MAX_CONTENT_BYTES = 200, 4000
# After a delivery, the link fails (its bytes in flight are lost) with this
# probability: a busy link fails every ten rounds or so.
LINK_FAILURE_PROBABILITY = 0.05
# After a delivery, the receiving node crashes with this probability: about
# one restart per node per fault phase.
RESTART_PROBABILITY = 0.004
MAX_DOWN_ROUNDS = 3
# Each round of the fault phase, a failed link between two live nodes
# comes back with this probability (a few rounds of partition, typically).
RESTORE_PROBABILITY = 0.3
# Pieces: a delivery takes all of a direction's budget this often, else a
# random part of it, so frames are cut and links interleave mid-message.
WHOLE_DELIVERY_PROBABILITY = 0.6
# Heal rounds within which every seed must converge. Measured: under 100 at
# 64 nodes. The bound stays below the anti-entropy period
# (chaos_sim_peer.ANTI_ENTROPY_ROUNDS, the daemon's 30 s), so a seed passes
# on announcements alone: one that needs the safety net has lost an
# announcement, and one that needs more is stuck (a livelock), not slow.
MAX_HEAL_ROUNDS = 250
assert MAX_HEAL_ROUNDS < ANTI_ENTROPY_ROUNDS

T0 = datetime(2026, 11, 24, tzinfo=timezone.utc)


@attrs.frozen(kw_only=True)
class SeedResult:
    """What one seed did: the verdict, rounds to converge, and its counters."""

    nodes: int
    seed: int
    converged: bool
    rounds: int | None  # heal rounds until convergence; None if it never came
    contexts: int
    trace: str  # SHA-256 over every scheduling decision and byte delivered
    stats: dict[str, int]
    anomalies: tuple[str, ...]  # protocol errors between honest nodes, with tracebacks
    diameter: int | None = None  # of the topology (None: not connected)

    @property
    def ok(self) -> bool:
        return self.converged and not self.anomalies and not any(k.startswith("anomaly_") for k in self.stats)


def node_versions(protocol: str, number: int) -> tuple[int, ...]:
    """The protocol versions node `number` speaks under `protocol` (PROTOCOLS)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    if protocol == "1" or (protocol == "mixed" and number % 2):
        return (1,)
    return (1, 2)


def node_id(number: int) -> bytes:
    return hashlib.sha256(b"ctxfs-sim node %d" % number).digest()


def topology(nodes: int, rng: random.Random, kind: str = "cycles", degree: int = 8) -> list[tuple[int, int]]:
    """Edges (a < b): the union of two random Hamiltonian cycles, or
    ("overlay") the links every node chooses by the daemon's own rule
    (sync/overlay.py, each node dialling at most `degree`)."""
    if kind == "overlay":
        ids = [node_id(n) for n in range(nodes)]
        number = {i: n for n, i in enumerate(ids)}
        return sorted({(min(a, number[b]), max(a, number[b]))
                       for a in range(nodes) for b in overlay.choose_links(ids[a], ids, degree)})
    edges: set[tuple[int, int]] = set()
    for _ in range(2):
        order = list(range(nodes))
        rng.shuffle(order)
        for i, a in enumerate(order):
            b = order[(i + 1) % nodes]
            if a != b:
                edges.add((min(a, b), max(a, b)))
    return sorted(edges)


class Link:
    """An edge of the topology; when up, two sessions and the bytes between them."""

    def __init__(self, number: int, a: SimNode, b: SimNode) -> None:
        self.number = number
        self.ends = (a, b)
        self.up = False
        self.sessions: tuple[SimSession, SimSession] | None = None
        self.queues = (bytearray(), bytearray())  # [0]: a -> b, [1]: b -> a

    def connect(self, nonces) -> None:
        a, b = self.ends
        self.queues = (bytearray(), bytearray())
        self.sessions = (
            SimSession(a, b.number, dialer=True, outbox=self.queues[0], nonces=nonces),
            SimSession(b, a.number, dialer=False, outbox=self.queues[1], nonces=nonces),
        )
        a.sessions[b.number], b.sessions[a.number] = self.sessions
        self.up = True

    def fail(self) -> None:
        """Both ends forget the connection; bytes in flight are lost."""
        self.up = False
        for node, session in zip(self.ends, self.sessions):
            # Out of the node first: ending its reconciliations may change
            # the root, and a dead session has nothing to announce it on.
            if node.sessions.get(session.peer) is session:
                del node.sessions[session.peer]
            session.drop()
        self.sessions = None
        self.queues = (bytearray(), bytearray())


class Simulation:
    """One seed: build the world, run the fault phase, heal, count rounds."""

    def __init__(self, nodes: int, seed: int, *, fault_rounds: int = FAULT_ROUNDS,
                 max_heal_rounds: int = MAX_HEAL_ROUNDS, topology_kind: str = "cycles", degree: int = 8,
                 protocol: str = "2") -> None:
        self.seed = seed
        self.fault_rounds = fault_rounds
        self.max_heal_rounds = max_heal_rounds
        self.rng = random.Random(f"ctxfs-sim/{nodes}/{seed}")
        self.clock = Clock()
        self.stats: collections.Counter[str] = collections.Counter()
        self.trace = hashlib.sha256()
        self.anomalies: list[str] = []
        self.nodes = [SimNode(i, self.clock, self.stats, node_versions(protocol, i)) for i in range(nodes)]
        edges = topology(nodes, self.rng, topology_kind, degree)
        self.links = [Link(i, self.nodes[a], self.nodes[b]) for i, (a, b) in enumerate(edges)]
        self.diameter = overlay.diameter({n: [b for a, b in edges if a == n] for n in range(nodes)})
        self.links_of: dict[int, list[Link]] = {n.number: [] for n in self.nodes}
        for link in self.links:
            for node in link.ends:
                self.links_of[node.number].append(link)
        self.written: set[bytes] = set()
        for link in self.links:
            link.connect(self._nonce)

    def _nonce(self) -> bytes:
        return self.rng.randbytes(16)

    # ------------------------------------------------------------ the run

    def run(self) -> SeedResult:
        for _ in range(self.fault_rounds):
            self._fault_round_start()
            self._round(faults=True)
        self._heal()
        target = IdSet(self.written).root()
        rounds = None
        for heal_round in range(self.max_heal_rounds + 1):
            if self._converged(target):
                rounds = heal_round
                break
            self._round(faults=False)
        return SeedResult(
            nodes=len(self.nodes), seed=self.seed, converged=rounds is not None, rounds=rounds,
            contexts=len(self.written), trace=self.trace.hexdigest(), stats=dict(self.stats),
            anomalies=tuple(self.anomalies), diameter=self.diameter,
        )

    def _converged(self, target: bytes) -> bool:
        if not all(node.index.root() == target for node in self.nodes):
            return False
        # The index is what reconciliation trusts; the store is what survives.
        for node in self.nodes:
            if len(node.store) != len(self.written):
                self.anomalies.append(f"node {node.number}: index agrees but the store holds {len(node.store)} contexts")
            # Everything is here: a claim left would hold up the node's sync
            # turns (and, in the daemon, status) for nothing.
            if node.fetches.owed():
                self.anomalies.append(f"node {node.number}: converged with {node.fetches.owed()} fetch claims left")
        return True

    def _heal(self) -> None:
        """No more faults: every node up, every link connected."""
        for node in self.nodes:
            if not node.up:
                self._bring_up(node)
        for link in self.links:
            if not link.up:
                link.connect(self._nonce)
        self._pump_all()

    # ------------------------------------------------------------ one round

    def _round(self, *, faults: bool) -> None:
        self.clock.now += 1
        self.trace.update(b"round %d" % self.clock.now)
        for node in self.nodes:
            if node.up:
                node.apply_stale()
                for session in list(node.sessions.values()):
                    session.tick()
        self._pump_all()
        # Every direction's budget is what it holds now; later bytes wait.
        active = [[link, d, len(link.queues[d])] for link in self.links if link.up for d in (0, 1) if link.queues[d]]
        while active:
            pick = self.rng.randrange(len(active))
            link, direction, budget = active[pick]
            size = budget if self.rng.random() < WHOLE_DELIVERY_PROBABILITY else self.rng.randint(1, budget)
            if size == budget:
                active[pick] = active[-1]
                active.pop()
            else:
                active[pick][2] -= size
            if not link.up:
                continue  # failed earlier this round: its budget went with it
            self._deliver(link, direction, size)
            if faults and link.up:
                self._delivery_faults(link, link.ends[1 - direction])

    def _deliver(self, link: Link, direction: int, size: int) -> None:
        queue = link.queues[direction]
        data = bytes(queue[:size])
        del queue[:size]
        self.trace.update(b"%d:%d:%d:" % (link.number, direction, size))
        self.trace.update(data)
        self.stats["bytes"] += size
        receiver = link.ends[1 - direction]
        try:
            link.sessions[1 - direction].receive(data)
        except (ProtocolError, PeerGone) as exc:
            # Two honest nodes never break the protocol: this is a finding.
            self.anomalies.append(
                f"round {self.clock.now}, link {link.ends[0].number}-{link.ends[1].number}, "
                f"node {receiver.number} receiving: {exc!r}\n{traceback.format_exc()}"
            )
            link.fail()
            return
        self._pump(receiver)

    def _pump(self, node: SimNode) -> None:
        for session in list(node.sessions.values()):
            session.pump()

    def _pump_all(self) -> None:
        for node in self.nodes:
            if node.up:
                self._pump(node)

    # ------------------------------------------------------------ faults and writes

    def _fault_round_start(self) -> None:
        now = self.clock.now + 1  # the round about to run
        for node in self.nodes:
            if not node.up and node.down_until <= now:
                self._bring_up(node)
        for link in self.links:
            if not link.up and all(n.up for n in link.ends) and self.rng.random() < RESTORE_PROBABILITY:
                link.connect(self._nonce)
        for node in self.nodes:
            if node.up and self.rng.random() < WRITE_PROBABILITY:
                self._write(node)

    def _delivery_faults(self, link: Link, receiver: SimNode) -> None:
        roll = self.rng.random()
        if roll < LINK_FAILURE_PROBABILITY:
            self.stats["link_failures"] += 1
            self.trace.update(b"fail %d" % link.number)
            link.fail()
        elif roll < LINK_FAILURE_PROBABILITY + RESTART_PROBABILITY:
            self._crash(receiver)

    def _crash(self, node: SimNode) -> None:
        self.stats["restarts"] += 1
        self.trace.update(b"crash %d" % node.number)
        for link in self.links_of[node.number]:
            if link.up:
                link.fail()
        node.up = False
        node.down_until = self.clock.now + self.rng.randint(0, MAX_DOWN_ROUNDS)

    def _bring_up(self, node: SimNode) -> None:
        node.restart()
        self.trace.update(b"up %d %s" % (node.number, node.index.root()))

    def _write(self, node: SimNode) -> None:
        """A local push: a new root, or a delta on a context the node holds."""
        number = self.stats["writes"]
        self.stats["writes"] += 1
        held = list(node.store.ids())
        base = self.rng.choice(held) if held and self.rng.random() < CHAIN_PROBABILITY else None
        text = self.rng.randbytes(self.rng.randint(MIN_CONTENT_BYTES, MAX_CONTENT_BYTES) // 2).hex()
        atom = MemoryAtom(f"node {node.number} note {number}: {text}", T_STRING,
                          T0 + timedelta(seconds=number), f"sim-node-{node.number}", self.rng.random())
        context = CompressedContext(base, (atom,), compression_metadata={"writer": node.number, "write": number})
        (cid,) = node.add_encoded([encode_context(context)])
        self.written.add(bytes.fromhex(cid))
        self.trace.update(b"write %d %s" % (node.number, cid.encode()))
        self._pump(node)


def simulate(nodes: int, seed: int, **options) -> SeedResult:
    return Simulation(nodes, seed, **options).run()
