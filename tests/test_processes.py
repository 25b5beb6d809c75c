"""Real `ctxfs daemon` processes on 127.0.0.1, driven through the CLI.

What test_node.py shows in one process, shown here the way users run it:
separate processes, signals, SIGKILL at awkward moments, restarts on the
same home. Every wait is bounded (a broken daemon fails the test with its
stderr, it does not hang the suite); no test asserts on wall-clock time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from node_helpers import WHEN
from process_helpers import (  # noqa: F401  (cluster is a fixture)
    CTXFS,
    Cluster,
    Daemon,
    cluster,
    ctxfs,
    quick_status,
    read_store_ids,
    wait_until,
)
from sync import T_STRING, CompressedContext, MemoryAtom
from sync.codec import context_to_json

# Bounds: generous, only there so that a broken sync fails instead of hanging.
CONVERGE_BOUND = 30.0
STOP_BOUND = 10.0


def make_context(texts: list[str], base: str | None = None, relevances: list[float] | None = None) -> CompressedContext:
    relevances = relevances or [0.5] * len(texts)
    return CompressedContext(
        base, [MemoryAtom(text, T_STRING, WHEN, "process-test", r) for text, r in zip(texts, relevances)]
    )


def push(daemon: Daemon, *contexts: CompressedContext) -> list[str]:
    """`ctxfs push -` with JSON Lines on stdin, through the running daemon; the printed ids."""
    lines = "".join(json.dumps(context_to_json(c)) + "\n" for c in contexts)
    ids = daemon.ctxfs("push", "-", input=lines).stdout.split()
    assert ids == [c.id for c in contexts]
    return ids


def converged(daemons: list[Daemon], *, peers: dict[Daemon, int] | None = None) -> list[dict] | None:
    """The statuses if every daemon has the same root and is in sync with every connected peer.

    `peers` asks for at least that many connected peers per daemon (a node
    with no connection is trivially "in sync" with nobody).
    """
    statuses = [d.status() for d in daemons]
    if len({s["root"] for s in statuses}) != 1 or len({s["objects"] for s in statuses}) != 1:
        return None
    for daemon, status in zip(daemons, statuses):
        connected = [p for p in status["peers"] if p["state"] == "connected"]
        if not all(p["in_sync"] and p["root"] == status["root"] for p in connected):
            return None
        if peers is not None and len(connected) < peers.get(daemon, 0):
            return None
    return statuses


def wait_converged(daemons: list[Daemon], *, peers: dict[Daemon, int] | None = None,
                   bound: float = CONVERGE_BOUND) -> list[dict]:
    def why() -> str:
        lines = []
        for d in daemons:
            try:
                lines.append(f"{d.name}: {json.dumps(d.status())}")
            except AssertionError as exc:
                lines.append(f"{d.name}: no status: {exc}")
        return "no convergence:\n" + "\n".join(lines) + "\n" + "\n".join(d.stderr() for d in daemons)

    return wait_until(lambda: converged(daemons, peers=peers), bound, poll=0.1, message=why)


def fsck_ok(home: Path) -> None:
    result = ctxfs(home, "fsck", check=False)
    assert result.returncode == 0, f"fsck {home.name}: {result.stdout}{result.stderr}"
    assert "all sound" in result.stdout


def integrity_check(store: Path) -> str:
    """PRAGMA integrity_check through the sqlite3 shell (the sqlite3 module if there is none)."""
    if shutil.which("sqlite3"):
        result = subprocess.run(["sqlite3", str(store), "PRAGMA integrity_check;"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()
    db = sqlite3.connect(store)
    try:
        return "\n".join(row[0] for row in db.execute("PRAGMA integrity_check"))
    finally:
        db.close()


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got {text!r}"
    return lines[0]


# --------------------------------------------------------------------------
# convergence
# --------------------------------------------------------------------------


def test_a_push_on_a_reaches_the_end_of_a_three_node_chain(cluster: Cluster):
    a = cluster.daemon("a")
    b = cluster.daemon("b", peers=[a])
    c = cluster.daemon("c", peers=[b])
    wait_converged([a, b, c], peers={a: 1, b: 2, c: 1})

    ctx = make_context(["User prefers Python", "User works on sync daemons", "Likes short output"],
                       relevances=[0.9, 0.4, 0.7])
    [cid] = push(a, ctx)

    statuses = wait_converged([a, b, c], peers={a: 1, b: 2, c: 1})
    node_ids = {d: s["node_id"] for d, s in zip([a, b, c], statuses)}
    for daemon, status in zip([a, b, c], statuses):
        assert status["schema"] == 2
        assert status["refs"] == 0 and status["conflicts"] == []
        assert status["objects"] == 1
        assert status["root"] == statuses[0]["root"]
        assert status["listen"] == daemon.listen
        assert all(p["in_sync"] and p["state"] == "connected" for p in status["peers"])
    # The chain's shape, as each node sees it.
    assert {p["node_id"] for p in statuses[0]["peers"]} == {node_ids[b]}
    assert {p["node_id"] for p in statuses[1]["peers"]} == {node_ids[a], node_ids[c]}
    assert {p["node_id"] for p in statuses[2]["peers"]} == {node_ids[b]}
    [c_peer] = statuses[2]["peers"]
    assert c_peer["source"] == "static" and c_peer["address"] == b.listen
    assert c_peer["objects_received"] == 1 and c_peer["error"] is None

    expanded = json.loads(c.ctxfs("expand", cid, "--json").stdout)
    assert expanded["id"] == cid
    assert expanded["expansion_path"] == [cid]
    assert [atom["content"] for atom in expanded["atoms"]] == [
        "User prefers Python", "Likes short output", "User works on sync daemons"  # by relevance
    ]
    assert [atom["hash"] for atom in expanded["atoms"]] == [
        a.content_hash for a in sorted(ctx.delta_atoms, key=lambda x: -x.relevance_score)
    ]
    assert c.ctxfs("heads", "--ids").stdout.split() == [cid]


# --------------------------------------------------------------------------
# crashes and restarts
# --------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["dialer", "listener"])
def test_a_killed_node_catches_up_after_restart(cluster: Cluster, victim: str):
    """B dials A. SIGKILL one of them; the other takes pushes; the victim restarts and catches up.

    The listener comes back on a new port, so then the dialer is restarted
    with the new address.
    """
    a = cluster.daemon("a")
    b = cluster.daemon("b", peers=[a])
    [first] = push(a, make_context(["before the crash"]))
    wait_converged([a, b], peers={a: 1, b: 1})

    dead, alive = (b, a) if victim == "dialer" else (a, b)
    dead.kill()
    assert dead.proc.returncode == -signal.SIGKILL
    missed = [make_context(["missed 1"], first)]
    missed.append(make_context(["missed 2"], missed[0].id))
    missed.append(make_context(["missed root"]))
    for ctx in missed:
        push(alive, ctx)
    assert alive.status()["objects"] == 4

    if victim == "dialer":
        b.restart()
    else:
        a.restart()
        b.restart(peers=[a.listen])
    statuses = wait_converged([a, b], peers={a: 1, b: 1})
    assert statuses[0]["objects"] == 4
    assert b.ctxfs("log", "--ids", missed[1].id).stdout.split() == [first, missed[0].id, missed[1].id]
    assert sorted(dead.ctxfs("heads", "--ids").stdout.split()) == sorted([missed[1].id, missed[2].id])

    for daemon in (a, b):
        assert daemon.stop(STOP_BOUND) == 0, daemon.stderr()
        fsck_ok(daemon.home)


def _contexts_for_transfer(count: int, rng: random.Random) -> list[CompressedContext]:
    """A long chain with roots mixed in (a fifth of them), ~1.5 KB each: several OBJECTS batches."""
    contexts = []
    base = None
    for i in range(count):
        filler = rng.randbytes(750).hex()
        if i % 5 == 4:
            contexts.append(make_context([f"root {i} {filler}"]))
        else:
            contexts.append(make_context([f"step {i} {filler}"], base, [rng.random()]))
            base = contexts[-1].id
    return contexts


# ~15 MB: four OBJECTS messages and more, so that B commits them in more
# than one step even when it commits what queued together.
TRANSFER_COUNT = 10000


def test_kill_9_during_sync_loses_nothing_and_sync_resumes(cluster: Cluster, tmp_path: Path):
    seed = int(os.environ.get("CTXFS_TEST_SEED") or random.randrange(1 << 30))
    print(f"seed {seed} (CTXFS_TEST_SEED={seed} repeats the choices)")
    rng = random.Random(seed)
    a = cluster.daemon("a")
    contexts = _contexts_for_transfer(TRANSFER_COUNT, rng)
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(context_to_json(c)) + "\n" for c in contexts))
    ids = a.ctxfs("push", str(batch)).stdout.split()
    assert ids == [c.id for c in contexts]
    a_status = a.status()
    assert a_status["objects"] == TRANSFER_COUNT

    # Kill B at a random point mid-transfer: once it holds at least `target`
    # objects (by its own status), after a random few milliseconds more. A
    # transfer that ends first is not this test's case: try again on a new home.
    for attempt in range(3):
        b = cluster.daemon(f"b{attempt}", start=False)
        target = rng.randrange(1, TRANSFER_COUNT // 2)
        b.start([a.listen], wait=False)
        last = wait_until(lambda: _holds_at_least(b, target), CONVERGE_BOUND, poll=0.002,
                          message=lambda: f"b never held {target} objects\n{b.stderr()}")
        if last["objects"] < TRANSFER_COUNT:
            delay = rng.uniform(0, 0.02)
            time.sleep(delay)
            b.kill()
            held = read_store_ids(b.home / "store.db")
            print(f"attempt {attempt}: target {target}, status said {last['objects']}, "
                  f"+{delay * 1000:.1f} ms, store holds {len(held)} of {TRANSFER_COUNT}")
            if len(held) < TRANSFER_COUNT:
                break
        else:
            b.kill()
    else:
        pytest.fail(f"three transfers finished before B could be killed mid-way\n{cluster.stderr()}")

    # What the daemon said it held, it holds: its status counts committed ids only.
    assert len(held) >= last["objects"]
    assert held <= set(ids)
    # The crashed store is sound, for SQLite and for ctxfs.
    assert integrity_check(b.home / "store.db") == "ok"
    fsck_ok(b.home)
    # Parents first: whatever arrived has its whole lineage (fsck checked
    # every lineage; here one, through `log`).
    deepest = max((i for i, c in enumerate(contexts) if c.id in held and c.base_hash), default=None)
    if deepest is not None:
        lineage = b.ctxfs("log", "--ids", contexts[deepest].id).stdout.split()
        assert lineage[-1] == contexts[deepest].id and set(lineage) <= held

    # Sync resumes where it stopped.
    b.restart()
    statuses = wait_converged([a, b], peers={a: 1, b: 1})
    assert statuses[1]["root"] == a_status["root"]
    assert statuses[1]["objects"] == TRANSFER_COUNT
    after = read_store_ids(b.home / "store.db")
    assert held <= after
    assert after == set(ids)
    b.stop()
    fsck_ok(b.home)


def _holds_at_least(daemon: Daemon, target: int) -> dict | None:
    if not daemon.running:
        raise AssertionError(f"{daemon.name} exited {daemon.proc.returncode}\n{daemon.stderr()}")
    status = quick_status(daemon.home)
    return status if status is not None and status["objects"] >= target else None


# --------------------------------------------------------------------------
# process contract
# --------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_daemon_cleanly(cluster: Cluster, signum: int):
    a = cluster.daemon("a")
    b = cluster.daemon("b", peers=[a])  # with a live peer session to close
    push(b, make_context(["something to sync"]))
    wait_converged([a, b], peers={a: 1, b: 1})
    socket_path = b.home / "api.sock"
    assert socket_path.exists()

    b.proc.send_signal(signum)
    try:
        code = b.proc.wait(STOP_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{signal.Signals(signum).name}: b still runs after {STOP_BOUND} s\n{b.stderr()}")
    assert code == 0, b.stderr()
    assert not socket_path.exists()
    assert "Traceback" not in b.stderr()
    # The other side saw it go, and stays up.
    wait_until(lambda: all(p["state"] != "connected" for p in a.status()["peers"]), CONVERGE_BOUND,
               message=lambda: json.dumps(a.status()))
    assert a.running


def test_a_second_daemon_on_the_same_home_exits_1_with_one_line(cluster: Cluster):
    a = cluster.daemon("a")
    second = subprocess.run(
        [str(CTXFS), "--home", str(a.home), "daemon",
         "--listen", "127.0.0.1:0", "--no-mdns"],
        capture_output=True, text=True, timeout=STOP_BOUND * 3, stdin=subprocess.DEVNULL,
    )
    assert second.returncode == 1, second.stderr
    line = one_line(second.stderr)
    assert str(a.home) in line and "already" in line
    assert second.stdout == ""
    # The first one is untouched: same socket, still answering.
    assert a.running
    assert a.status()["listen"] == a.listen


def test_status_without_a_daemon_exits_1_with_one_line(cluster: Cluster, tmp_path: Path):
    def no_daemon(home: Path) -> None:
        for args in (["status"], ["status", "--json"]):
            result = ctxfs(home, *args, check=False)
            assert result.returncode == 1 and result.stdout == "", result
            assert str(home) in one_line(result.stderr)

    no_daemon(tmp_path / "never-initialised")
    a = cluster.daemon("a", start=False)
    no_daemon(a.home)  # initialised, never started
    a.start()
    a.kill()
    assert (a.home / "api.sock").exists()
    no_daemon(a.home)  # killed: a stale socket nobody answers on
