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
from chaos_common import Attack, Outcome, healthy_pusher
from chaos_frames import Forge
import chaos_clients
from daemon.paths import HomePaths

import hostile_helpers  # tests/, on sys.path through chaos_common
from process_helpers import Cluster, read_store_ids


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
        attack = Attack(a)
        trio.run(_campaign, options, root, attack, b, seeded, big)
        fsck = a.ctxfs("fsck", check=False).returncode if a.running else None
        held = read_store_ids(a.home / "store.db")
        lost = sum(1 for cid in attack.healthy_ids if cid not in held)
    finally:
        cluster.close()
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
    figures = attack.figures(fsck=fsck, lost=lost, rss_bound_mb=options.rss_bound_mb)
    figures["stalled_streams"] = options.stalled * 32
    print(f"members: {figures}")
    ok = attack.held(fsck=fsck, lost=lost, rss_bound_mb=options.rss_bound_mb, frames_wanted=options.frames)
    return Outcome(part="members", ok=ok, figures=figures)


async def _campaign(options, root: Path, attack: Attack, b, seeded: list[bytes], big: str | None) -> None:
    host, port = attack.daemon.listen.rsplit(":", 1)
    address = (host, int(port))
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(attack.rss.run)
        nursery.start_soon(healthy_pusher, b.home, attack.daemon.home, attack.healthy_ids, attack.lags)
        stalled_done = trio.Event()
        socket_path = str(HomePaths(attack.daemon.home).api_socket)
        for _ in range(options.stalled):
            nursery.start_soon(chaos_clients.stalled_reader, socket_path, bytes.fromhex(big), stalled_done)
        async with trio.open_nursery() as hostiles:
            for index in range(options.hostiles):
                share = options.frames // options.hostiles + (index < options.frames % options.hostiles)
                rng = random.Random(options.seed * 1000 + index)
                hostiles.start_soon(_hostile, options, root, address, f"hostile{index}", share, rng, seeded, attack)
        print(f"members: {attack.frames} frames over {attack.connections} connections "
              f"in {time.monotonic() - started:.0f} s", flush=True)
        await trio.sleep(2)  # a last push of B's, seen through
        nursery.cancel_scope.cancel()


async def _hostile(options, root: Path, address, name: str, share: int, rng: random.Random, seeded,
                   attack: Attack) -> None:
    sent = 0
    while sent < share and attack.alive:  # a dead daemon ends the attack (and fails the part)
        try:
            member = await hostile_helpers.HostileMember.connect(address, root, name)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, AssertionError):
            await trio.sleep(0.05)  # over A's inbound limit, or A is busy: try again
            continue
        forge = Forge(rng, dialer=True, ids=seeded, local_api=False)
        sent += await attack.send_frames(member.stream, forge, min(options.per_connection, share - sent))
