"""Real daemons on network-namespace hosts, finding each other through mDNS only.

Each host is a network namespace on a bridge (scripts/netns-cluster); every
daemon runs with `--listen 10.77.0.I:7787 --mdns-interface 10.77.0.I` and no
--peer. Runs only as root with `ip netns` (skipped with the reason
otherwise; CI runs as root). Every wait is bounded (the bound only keeps a
broken sync from hanging the suite); nothing asserts on wall-clock time.
The timings are printed (see them with pytest -s).
"""

from __future__ import annotations

import json
import time

from netns_helpers import PORT, Bed, NetnsDaemon, bed, wait_for  # noqa: F401  (bed is a fixture)
from node_helpers import WHEN
from sync import T_STRING, CompressedContext, MemoryAtom
from sync.codec import context_to_json

# Bounds: generous, only there so that a broken discovery fails instead of hanging.
DISCOVER_BOUND = 20.0
CONVERGE_BOUND = 20.0


def make_context(text: str) -> CompressedContext:
    return CompressedContext(None, [MemoryAtom(text, T_STRING, WHEN, "netns-test", 0.5)])


def push(daemon: NetnsDaemon, ctx: CompressedContext) -> str:
    """`ctxfs push -` through the running daemon; the printed id."""
    ids = daemon.ctxfs("push", "-", input=json.dumps(context_to_json(ctx)) + "\n").stdout.split()
    assert ids == [ctx.id]
    return ids[0]


def in_sync(daemons: list[NetnsDaemon], objects: int | None = None) -> list[dict] | None:
    """The statuses if every daemon is connected to every other one and in sync with it, now."""
    statuses = [d.quick_status() for d in daemons]
    if any(s is None for s in statuses):
        return None
    ids = {s["node_id"] for s in statuses}
    if len({s["root"] for s in statuses}) != 1 or len({s["objects"] for s in statuses}) != 1:
        return None
    if objects is not None and statuses[0]["objects"] != objects:
        return None
    for status in statuses:
        members = [p for p in status["peers"] if p["node_id"] in ids]
        connected = {p["node_id"] for p in members if p["state"] == "connected"}
        if connected != ids - {status["node_id"]}:
            return None
        if not all(p["in_sync"] and p["root"] == status["root"] for p in members if p["state"] == "connected"):
            return None
    return statuses


def wait_in_sync(bed: Bed, daemons: list[NetnsDaemon], objects: int | None = None,
                 bound: float = CONVERGE_BOUND) -> list[dict]:
    return wait_for(lambda: in_sync(daemons, objects), bound,
                    message=lambda: "not in sync:\n" + bed.statuses())


def start_together(bed: Bed, indexes: list[int], cluster: str = "main") -> list[NetnsDaemon]:
    """Start daemons at (nearly) the same moment, then wait until each answers status."""
    daemons = [bed.daemon(i, cluster=cluster, start=False) for i in indexes]
    for d in daemons:
        d.start(wait=False)
    for d in daemons:
        d.wait_ready()
    return daemons


def assert_found_by_mdns(statuses: list[dict]) -> None:
    """No --peer was given: every connection was made by a node that found the other through mDNS."""
    by_id = {s["node_id"]: s for s in statuses}
    for status in statuses:
        for peer in status["peers"]:
            if peer["node_id"] not in by_id or peer["state"] != "connected":
                continue
            assert peer["source"] in ("mdns", "inbound"), peer
            back = next(p for p in by_id[peer["node_id"]]["peers"] if p["node_id"] == status["node_id"])
            assert "mdns" in (peer["source"], back["source"]), (peer, back)


def test_three_hosts_find_each_other_and_converge_after_a_push(bed: Bed):
    bed.up(3)
    started = time.monotonic()
    daemons = start_together(bed, [1, 2, 3])
    answering = time.monotonic()
    statuses = wait_in_sync(bed, daemons, objects=0, bound=DISCOVER_BOUND)
    connected = time.monotonic()
    assert_found_by_mdns(statuses)
    for status, daemon in zip(statuses, daemons):
        assert status["listen"] == f"{daemon.address}:{PORT}"
        for peer in status["peers"]:
            if peer["source"] == "mdns":
                host = peer["address"].rsplit(":", 1)[0]
                assert host in {d.address for d in daemons} - {daemon.address}, peer

    pushed = time.monotonic()
    cid = push(daemons[0], make_context("found through mDNS"))
    wait_in_sync(bed, daemons, objects=1)
    synced = time.monotonic()
    assert {s["root"] for s in (d.quick_status() for d in daemons)} == {daemons[0].quick_status()["root"]}
    assert all(d.ctxfs("log", "--ids", cid).stdout.split() == [cid] for d in daemons)
    print(f"netns timings: start to all connected {connected - started:.3f} s "
          f"(all answering to all connected {connected - answering:.3f} s); "
          f"push to all in sync {synced - pushed:.3f} s")


def cut_off(daemons: list[NetnsDaemon], lost: NetnsDaemon) -> bool:
    """`lost` has no connection left, and no other daemon has one to it."""
    statuses = {d.name: d.quick_status() for d in daemons}
    lost_id = statuses[lost.name]["node_id"]
    if any(p["state"] == "connected" for p in statuses[lost.name]["peers"]):
        return False
    return not any(p["node_id"] == lost_id and p["state"] == "connected"
                   for s in statuses.values() for p in s["peers"])


def test_a_host_whose_link_goes_down_misses_a_push_and_catches_up(bed: Bed):
    bed.up(3)
    daemons = start_together(bed, [1, 2, 3])
    wait_in_sync(bed, daemons, objects=0, bound=DISCOVER_BOUND)
    h1, h2, h3 = daemons

    bed.link(3, "down")
    try:
        push(h1, make_context("while h3 was away"))
        wait_in_sync(bed, [h1, h2], objects=1)
        # h3 is off the LAN: the push cannot have reached it. The link stays
        # down until the heartbeat has dropped h3 everywhere (mDNS would keep
        # it for ~19 minutes): catching up then needs a new connection.
        wait_for(lambda: cut_off(daemons, h3), DISCOVER_BOUND,
                 message=lambda: "h3 still connected:\n" + bed.statuses())
        assert h3.quick_status()["objects"] == 0
    finally:
        bed.link(3, "up")
    back = time.monotonic()
    wait_in_sync(bed, daemons, objects=1)
    print(f"netns timings: link up to all in sync {time.monotonic() - back:.3f} s")


def test_a_node_with_another_cluster_key_sees_the_adverts_but_gets_no_context(bed: Bed):
    bed.up(4)
    members = start_together(bed, [1, 2, 3])
    intruder = bed.daemon(4, cluster="other")
    wait_in_sync(bed, members, objects=0, bound=DISCOVER_BOUND)
    member_addresses = {f"{d.address}:{PORT}" for d in members}
    intruder_address = f"{intruder.address}:{PORT}"

    push(members[0], make_context("members only"))
    push(intruder, make_context("from outside"))
    statuses = wait_in_sync(bed, members, objects=1)

    def refused(status: dict, addresses: set[str]) -> bool:
        rows = {p["address"]: p for p in status["peers"] if p["source"] == "mdns"}
        return all(a in rows and "not a cluster member" in (rows[a]["error"] or "") for a in addresses)

    # The intruder saw every member's advert, dialled it, and was refused...
    wait_for(lambda: refused(intruder.quick_status(), member_addresses), DISCOVER_BOUND,
             message=lambda: "intruder not refused by every member:\n" + bed.statuses())
    # ...and every member saw the intruder's advert, dialled it, and refused it.
    wait_for(lambda: all(refused(m.quick_status(), {intruder_address}) for m in members), DISCOVER_BOUND,
             message=lambda: "not every member refused the intruder:\n" + bed.statuses())

    mine = intruder.quick_status()
    assert mine["objects"] == 1
    assert all(p["state"] != "connected" and p["objects_sent"] == 0 and p["objects_received"] == 0
               for p in mine["peers"]), mine
    statuses = in_sync(members, objects=1) or wait_in_sync(bed, members, objects=1)
    assert mine["root"] != statuses[0]["root"]
    for status in statuses:
        outsider = [p for p in status["peers"] if p["address"] == intruder_address]
        assert outsider and all(p["state"] != "connected" and p["objects_sent"] == 0
                                and p["objects_received"] == 0 for p in outsider), status
