"""A local client that stops reading must not make the daemon buffer its data.

A real daemon process holds an expansion of ~40 MB of atoms. A client asks
for the stream with a small window, reads one chunk and stalls. The daemon's
resident memory may grow by about a window and a batch of chunks, not by
the stream; meanwhile another client is served.
"""

from __future__ import annotations

import random
from pathlib import Path

import trio

from daemon.client import LocalClient
from daemon.paths import HomePaths
from node_helpers import WHEN
from process_helpers import cluster  # noqa: F401  (a fixture)
from sync import T_STRING, CompressedContext, MemoryAtom

CONTEXTS = 4
ATOMS_PER_CONTEXT = 10_000
ATOM_BYTES = 1000
# The smallest windows a peer may advertise (sync.connection.MIN_WINDOW).
SMALL_WINDOW = 64 * 1024
# What the daemon may add while the client stalls: its window, a batch of
# chunks built ahead (32 chunks of 10 atoms of 1 KB), and allocator noise.
# Buffering the stream would take the stream's ~40 MB and more.
ALLOWED_GROWTH = 24 * 1024 * 1024
GUARD = 120  # bound on each phase, so a broken daemon fails instead of hanging


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def big_chain() -> list[CompressedContext]:
    rng = random.Random(3)
    words = [f"w{rng.getrandbits(40):x}" for _ in range(5000)]
    chain, base = [], None
    for level in range(CONTEXTS):
        atoms = []
        for i in range(ATOMS_PER_CONTEXT):
            text = f"{level}.{i} " + " ".join(rng.choices(words, k=ATOM_BYTES // 12))
            atoms.append(MemoryAtom(text[:ATOM_BYTES], T_STRING, WHEN, "bench", rng.random()))
        ctx = CompressedContext(base, atoms)
        chain.append(ctx)
        base = ctx.id
    return chain


async def test_a_stalled_stream_client_costs_a_window_not_the_stream(cluster):  # noqa: F811
    daemon = cluster.daemon("a")
    paths = HomePaths(daemon.home)
    chain = big_chain()
    tip = chain[-1].id
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            await client.push(chain)
            # Warm up: a query expands the chain once, so the daemon holds
            # the expansion (the stream is then cut from it) before we
            # measure; a text query also catches the full-text index up, so
            # the daemon's indexer does not do it while we measure.
            assert len(await client.query(tip, limit=1)) == 1
            await client.query(tip, text="warm", limit=1)
    before = rss_bytes(daemon.pid)
    streamed = CONTEXTS * ATOMS_PER_CONTEXT * ATOM_BYTES

    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths, stream_window=SMALL_WINDOW, connection_window=2 * SMALL_WINDOW) as slow:
            async with slow.expand_stream(tip, chunk_size=10) as chunks:
                first = await chunks.__anext__()
                assert first.atoms
                # Stall: read nothing more. Give the daemon time to do its worst.
                peak = before
                for _ in range(20):
                    await trio.sleep(0.1)
                    peak = max(peak, rss_bytes(daemon.pid))
                # Another client is served while this one stalls.
                async with LocalClient.connect(paths) as other:
                    status = await other.status()
                assert status["objects"] == CONTEXTS
    assert peak - before < ALLOWED_GROWTH, (before, peak, streamed)
