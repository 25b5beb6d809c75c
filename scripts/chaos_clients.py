"""Hostile local clients: mutated frames, stalled stream readers and an idle flood against api.sock.

A daemon A and an honest peer B run as real processes; B keeps pushing
contexts that must reach A throughout. Against A's Unix socket, in turn:

  1. fuzzing clients send `chaos_frames.Forge` frames (local API flavour),
     reconnecting whenever A ends them, while stalled readers open the most
     stream expansions a client may (32 each) of a 40,000-atom context A
     has never expanded, and never read a byte;
  2. an idle flood: hundreds of connections that say HELLO and then
     nothing; those over A's client limit must be told LIMIT_EXCEEDED, and
     once they leave a new client is served.

Checked: A never exits; it sends only declared messages; its RSS stays
under --rss-bound-mb; B's pushes keep arriving; A's store passes fsck.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

import trio

import chaos_common
from chaos_common import Attack, Outcome, context, healthy_pusher
from chaos_frames import Forge
from daemon.localapi import LocalClient
from daemon.paths import HomePaths
from sync.connection import NEED_DATA, Connection
from sync.errors import ErrorCode
from sync.messages import Error, StreamRequest, make_hello
from process_helpers import Cluster

# Atoms in the context the stalled readers stream: the size that once took
# a daemon past 1 GB with one stalled client.
STALLED_ATOMS = 40_000
# A client that says HELLO must hear the daemon's within this.
HELLO_BOUND = 10.0
# Frames a fuzzing client sends before it reconnects on its own.
FRAMES_PER_CONNECTION = 400


def add_arguments(parser) -> None:
    parser.add_argument("--frames", type=int, default=100_000, help="hostile frames in all (default 100000)")
    parser.add_argument("--fuzzers", type=int, default=3, help="fuzzing clients at once (default 3)")
    parser.add_argument("--stalled", type=int, default=4, help="stalled stream readers, 32 streams each (default 4)")
    parser.add_argument("--idle", type=int, default=300, help="idle connections in the flood (default 300)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rss-bound-mb", type=float, default=400.0, help="A's RSS must stay below this (default 400)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")


def run(options) -> Outcome:
    root = Path(tempfile.mkdtemp(prefix="ctxfs-chaos-clients-"))
    cluster = Cluster(root)
    try:
        a = cluster.daemon("a")
        b = cluster.daemon("b", peers=[a])
        seeded = chaos_common.seed_contexts(a.home, 100, tag="clients")
        big = trio.run(push_big, a.home)
        attack = Attack(a)
        flood = trio.run(_campaign, options, attack, b, seeded + [bytes.fromhex(big)], bytes.fromhex(big))
        fsck = a.ctxfs("fsck", check=False).returncode if a.running else None
        lost = sum(1 for cid in attack.healthy_ids if not chaos_common.store_holds(a.home / "store.db", cid))
    finally:
        cluster.close()
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
    figures = attack.figures(fsck=fsck, lost=lost, rss_bound_mb=options.rss_bound_mb)
    figures.update(stalled_streams=options.stalled * 32, **flood)
    print(f"clients: {figures}")
    ok = (attack.held(fsck=fsck, lost=lost, rss_bound_mb=options.rss_bound_mb, frames_wanted=options.frames)
          and flood["served_after_flood"] and flood["idle_refused"] == options.idle - flood["idle_accepted"])
    return Outcome(part="clients", ok=ok, figures=figures)


async def push_big(home: Path) -> str:
    atoms = [f"stalled reader fact {i} " + "word " * 8 for i in range(STALLED_ATOMS)]
    big = context(atoms[0])
    big = type(big)(None, [type(big.delta_atoms[0])(text, big.delta_atoms[0].type_sig, big.delta_atoms[0].timestamp,
                                                      "chaos", (i % 100) / 100) for i, text in enumerate(atoms)])
    async with LocalClient.connect(HomePaths(home)) as client:
        [cid] = await client.push([big])
    return cid


async def _campaign(options, attack: Attack, b, ids: list[bytes], big: bytes) -> dict:
    socket_path = str(HomePaths(attack.daemon.home).api_socket)
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(attack.rss.run)
        nursery.start_soon(healthy_pusher, b.home, attack.daemon.home, attack.healthy_ids, attack.lags)
        async with trio.open_nursery() as stalled:
            stalled_done = trio.Event()
            for _ in range(options.stalled):
                stalled.start_soon(stalled_reader, socket_path, big, stalled_done)
            async with trio.open_nursery() as fuzzers:
                for index in range(options.fuzzers):
                    share = options.frames // options.fuzzers + (index < options.frames % options.fuzzers)
                    rng = random.Random(options.seed * 1000 + index)
                    fuzzers.start_soon(_fuzzer, socket_path, share, rng, ids, attack)
            stalled_done.set()
        print(f"clients: {attack.frames} frames over {attack.connections} connections "
              f"in {time.monotonic() - started:.0f} s; idle flood of {options.idle}", flush=True)
        flood = await _idle_flood(options, socket_path, attack.daemon.home)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    return flood


async def _open(socket_path: str) -> tuple[trio.SocketStream, Connection]:
    """A client connection past HELLO (the daemon's HELLO read into the Connection)."""
    stream = await trio.open_unix_socket(socket_path)
    conn = Connection(hello=make_hello(node_id=bytes(32), root=bytes(32), count=0,
                                       stream_window=64 * 1024, connection_window=64 * 1024), dialer=True)
    try:
        await stream.send_all(conn.start())
        with trio.fail_after(HELLO_BOUND):
            while conn.next_event() is NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data:
                    raise trio.BrokenResourceError("closed before HELLO")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, conn


async def _refused(stream: trio.SocketStream, conn: Connection) -> bool:
    """Whether the daemon follows its HELLO with ERROR LIMIT_EXCEEDED (it does at once)."""
    with trio.move_on_after(0.5):
        while (event := conn.next_event()) is NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            if not data:
                break
        else:
            return isinstance(event.message, Error) and event.message.code == ErrorCode.LIMIT_EXCEEDED
    return False


async def stalled_reader(socket_path: str, big: bytes, done: trio.Event) -> None:
    """The most stream expansions one client may have, then not a byte read."""
    stream, conn = await _open(socket_path)
    try:
        for _ in range(32):
            await stream.send_all(conn.send(StreamRequest(id=big, chunk_size=10), conn.open_stream()))
        await done.wait()
    finally:
        await trio.aclose_forcefully(stream)


async def _fuzzer(socket_path: str, share: int, rng: random.Random, ids: list[bytes], attack: Attack) -> None:
    sent = 0
    while sent < share and attack.alive:  # a dead daemon ends the attack (and fails the part)
        try:
            stream, _conn = await _open(socket_path)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            await trio.sleep(0.05)
            continue
        forge = Forge(rng, dialer=True, ids=ids, local_api=True)
        sent += await attack.send_frames(stream, forge, min(FRAMES_PER_CONNECTION, share - sent))


async def _idle_flood(options, socket_path: str, home: Path) -> dict:
    """Connections that say HELLO and nothing more; the ones over the limit are told so."""
    flood = {"idle_accepted": 0, "idle_refused": 0, "served_after_flood": False}
    streams = []
    try:
        for _ in range(options.idle):
            stream, conn = await _open(socket_path)
            streams.append(stream)
            flood["idle_refused" if await _refused(stream, conn) else "idle_accepted"] += 1
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)
    with trio.fail_after(HELLO_BOUND * 3):
        while True:  # the daemon sees them go; then a new client is served
            try:
                async with LocalClient.connect(HomePaths(home)) as client:
                    await client.status()
                    flood["served_after_flood"] = True
                    return flood
            except Exception:
                await trio.sleep(0.1)
