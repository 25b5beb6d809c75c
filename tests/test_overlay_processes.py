"""The overlay with real daemons: a node dials at most max_peers, heals when
a chosen peer dies, and a write still reaches every node."""

from __future__ import annotations

import json

from process_helpers import cluster, free_ports, quick_status, wait_until  # noqa: F401 (fixture)
from sync.codec import context_to_json
from helpers import atom, root

BOUND = 60.0


def states(daemon) -> dict[str, str]:
    status = quick_status(daemon.home)
    return {} if status is None else {p["address"]: p["state"] for p in status["peers"]}


def connected(daemon) -> set[str]:
    return {address for address, state in states(daemon).items() if state == "connected"}


def test_a_node_dials_exactly_max_peers_and_heals_when_one_dies(cluster):
    # The others dial nobody: every session of `a` is one it dialled.
    others = [cluster.daemon(name) for name in "bcde"]
    a = cluster.daemon("a", start=False)
    (a.home / "config.toml").write_text("max_peers = 2\n")
    a.start([o.listen for o in others])

    def settled():
        s = states(a)
        return sorted(s.values()) == ["connected", "connected", "known", "known"] and s

    first = wait_until(settled, BOUND, message=lambda: f"a's peers: {states(a)}\n{cluster.stderr()}")
    chosen = {address for address, state in first.items() if state == "connected"}
    # Each chosen node sees exactly one inbound peer (a); the others none.
    for other in others:
        sessions = connected(other)
        assert len(sessions) == (1 if other.listen in chosen else 0), (other.listen, sessions)

    # A chosen peer dies: another known one takes its place.
    victim = next(o for o in others if o.listen in chosen)
    victim.kill()

    def healed():
        now = connected(a)
        return len(now) == 2 and victim.listen not in now and now

    now = wait_until(healed, BOUND, message=lambda: f"a's peers: {states(a)}\n{cluster.stderr()}")
    assert now & chosen == chosen - {victim.listen}
    assert states(a)[victim.listen] != "known"  # unreachable, probed now and then


def test_a_push_reaches_every_node_through_the_overlay(cluster):
    names = [f"n{k}" for k in range(6)]
    daemons = [cluster.daemon(name, start=False) for name in names]
    for daemon in daemons:
        (daemon.home / "config.toml").write_text("max_peers = 2\n")
    # Full peer lists, as discovery would give, on ports chosen up front.
    listens = [f"127.0.0.1:{port}" for port in free_ports(len(daemons))]
    for daemon, listen in zip(daemons, listens):
        daemon.start([address for address in listens if address != listen], wait=False, listen=listen)
    for daemon in daemons:
        daemon.wait_ready()
    contexts = [root(atom(f"overlay fact {k}", 0.5)) for k in range(50)]
    text = "".join(json.dumps(context_to_json(c)) + "\n" for c in contexts)
    daemons[0].ctxfs("push", input=text)

    def everyone_has_them():
        counts = [(quick_status(d.home) or {}).get("objects") for d in daemons]
        return all(c == 50 for c in counts) or None

    wait_until(everyone_has_them, BOUND,
               message=lambda: f"objects: {[(quick_status(d.home) or {}).get('objects') for d in daemons]}")
    # Nobody dialled everyone: with 5 others and max_peers 2, some are only known.
    assert any("known" in states(d).values() for d in daemons)
