"""Hostile members: mutated and random frames against a live daemon while a healthy peer syncs.

A daemon A and an honest peer B run as real processes on 127.0.0.1. Hostile
members (genuine cluster members: they pass TLS and HELLO) send A frames
from `chaos_frames.Forge`, reconnecting whenever A ends their session.
Throughout, B keeps pushing contexts and each must reach A. Checked:

  * A never exits (with --stalled, local clients stall stream expansions
    on A at the same time);
  * everything A sends a hostile member is a declared message (a known
    type; every ERROR with a known code);
  * A's RSS stays under --rss-bound-mb;
  * every context B pushed reaches A (the healthy peer keeps syncing), and
    A's store passes fsck at the end.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

import trio

import chaos_common
from chaos_common import Outcome, ReplyCounter, RssWatch, healthy_pusher
from chaos_frames import Forge
import chaos_clients
from daemon.paths import HomePaths

import hostile_helpers  # tests/, on sys.path through chaos_common
from process_helpers import Cluster, read_store_ids


# After its last frame a hostile member reads what A still says for this long.
LAST_WORDS = 0.2


def add_arguments(parser) -> None:
    parser.add_argument("--frames", type=int, default=100_000, help="hostile frames to send in all (default 100000)")
    parser.add_argument("--hostiles", type=int, default=3, help="hostile members at once (default 3)")
    parser.add_argument("--per-connection", type=int, default=400,
                        help="frames a hostile sends before it reconnects on its own (default 400)")
    parser.add_argument("--stalled", type=int, default=1,
                        help="local clients stalling 32 stream expansions each, at the same time (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rss-bound-mb", type=float, default=400.0,
                        help="A's RSS must stay below this (default 400 MB)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, homes)")


def run(options) -> Outcome:
    root = Path(tempfile.mkdtemp(prefix="ctxfs-chaos-members-"))
    cluster = Cluster(root)
    try:
        a = cluster.daemon("a")
        b = cluster.daemon("b", peers=[a])
        seeded = chaos_common.seed_contexts(a.home, 200, tag="members")
        big = trio.run(chaos_clients.push_big, a.home) if options.stalled else None
        result = trio.run(_campaign, options, root, a, b, seeded, big)
        a_alive = a.running
        fsck = a.ctxfs("fsck", check=False).returncode if a_alive else None
        held = read_store_ids(a.home / "store.db")
        lost = [cid for cid in result["healthy_ids"] if cid not in held]
    finally:
        cluster.close()
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
    replies: ReplyCounter = result["replies"]
    figures = {
        "frames": result["frames"],
        "connections": result["connections"],
        "errors_by_code": replies.errors_summary(),
        "undeclared_replies": replies.undeclared,
        "max_rss_mb": round(result["rss"].max_mb, 1),
        "rss_bound_mb": options.rss_bound_mb,
        "healthy_pushed": len(result["healthy_ids"]),
        "healthy_lag_s_max": round(max(result["lags"], default=0.0), 2),
        "healthy_lost": len(lost),
        "daemon_exits": 0 if a_alive else 1,
        "fsck": "ok" if fsck == 0 else f"exit {fsck}",
    }
    ok = (a_alive and fsck == 0 and replies.undeclared == 0 and not lost
          and result["rss"].max_mb < options.rss_bound_mb and result["frames"] >= options.frames)
    print(f"members: {figures}")
    return Outcome(part="members", ok=ok, figures=figures)


async def _campaign(options, root: Path, a, b, seeded: list[bytes], big: str | None) -> dict:
    host, port = a.listen.rsplit(":", 1)
    address = (host, int(port))
    state = {"frames": 0, "connections": 0, "replies": ReplyCounter(), "rss": RssWatch(a.pid),
             "healthy_ids": [], "lags": [], "alive": lambda: a.running}
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(state["rss"].run)
        nursery.start_soon(healthy_pusher, b.home, a.home, state["healthy_ids"], state["lags"])
        stalled_done = trio.Event()
        socket_path = str(HomePaths(a.home).api_socket)
        for _ in range(options.stalled):
            nursery.start_soon(chaos_clients.stalled_reader, socket_path, bytes.fromhex(big), stalled_done)
        async with trio.open_nursery() as hostiles:
            for index in range(options.hostiles):
                rng = random.Random(options.seed * 1000 + index)
                hostiles.start_soon(_hostile, options, root, address, index, rng, seeded, state)
        print(f"members: {state['frames']} frames over {state['connections']} connections "
              f"in {time.monotonic() - started:.0f} s", flush=True)
        await trio.sleep(2)  # a last push of B's, seen through
        nursery.cancel_scope.cancel()
    return state


async def _hostile(options, root: Path, address, index: int, rng: random.Random, seeded, state) -> None:
    name = f"hostile{index}"
    share = options.frames // options.hostiles + (index < options.frames % options.hostiles)
    sent = 0
    while sent < share and state["alive"]():  # a dead daemon ends the attack (and fails the part)
        try:
            member = await hostile_helpers.HostileMember.connect(address, root, name)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, AssertionError):
            await trio.sleep(0.05)  # over A's inbound limit, or A is busy: try again
            continue
        state["connections"] += 1
        forge = Forge(rng, dialer=True, ids=seeded, local_api=False)
        closed = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(state["replies"].read, member.stream, closed)
            try:
                for _ in range(min(options.per_connection, share - sent)):
                    if closed.is_set():
                        break  # A ended the session: a new one
                    _kind, data = forge.next()
                    await member.stream.send_all(data)
                    sent += 1
                    state["frames"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            with trio.move_on_after(LAST_WORDS):  # A's ERROR, if it is ending the session
                await closed.wait()
            nursery.cancel_scope.cancel()
        await member.aclose()
