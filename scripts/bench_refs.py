"""Refs benchmark: what one ref move costs on the wire, and how fast it crosses a chain.

    scripts/bench refs [--moves 20] [--n 100000] [--json]

1. Reconciliation for a difference of one ref update among n objects: a
   ref update's id is a SHA-256 like a context's, in the same id space, so
   this is bench_reconcile's run at d = 1 (real RECONCILE frames), plus the
   OBJECTS frame that carries a real signed update.
2. Propagation: three daemon processes A - B - C on 127.0.0.1 (B peers
   with A and C; A and C do not know each other). `--moves` times: A's
   daemon sets `main` to a new context (through its local API), and the
   clock runs until C's API answers `main` with that target. Median and
   max are reported. Contexts are stored on every node first, so only the
   ref update travels.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_reconcile  # noqa: E402
import chaos_common  # noqa: E402  (puts tests/ on sys.path)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from daemon.localapi import LocalClient  # noqa: E402
from daemon.paths import HomePaths  # noqa: E402
from process_helpers import Cluster, wait_until  # noqa: E402
from sync import frames, refs  # noqa: E402
from sync.messages import Objects, encode_payload  # noqa: E402

# How long one move may take to reach C before the run is a failure.
MOVE_BOUND = 30.0


def wire_cost(n: int) -> dict:
    reconcile = bench_reconcile.run(n, 1)
    update = refs.make_update(name="main", target="ab" * 32, supersedes=["cd" * 32],
                              key=Ed25519PrivateKey.generate(), time=datetime.now(timezone.utc))
    data = refs.encode_update(update)
    payload = encode_payload(Objects(ids=(bytes.fromhex(update.id),), objects=(data,), final=True))
    return {
        "n": n,
        "reconcile_bytes": reconcile["bytes_total"],
        "reconcile_correct": reconcile["correct"],
        "reconcile_round_trips": reconcile["round_trips"],
        "update_bytes": len(data),
        "objects_frame_bytes": frames.HEADER_SIZE + len(payload),
    }


def propagation(moves: int) -> list[float]:
    root = Path(tempfile.mkdtemp(prefix="ctxfs-bench-refs-"))
    cluster = Cluster(root)
    try:
        a = cluster.daemon("a")
        b = cluster.daemon("b", peers=[a])
        c = cluster.daemon("c", peers=[b])
        contexts = [chaos_common.context(f"ref target {i}") for i in range(moves)]
        for daemon in (a, b, c):
            trio.run(_push, daemon.home, contexts)
        wait_until(lambda: a.status()["root"] == c.status()["root"], 60, message="A and C never converged")
        return [trio.run(_move, a.home, c.home, ctx.id) for ctx in contexts]
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


async def _push(home: Path, contexts) -> None:
    async with LocalClient.connect(HomePaths(home)) as client:
        await client.push(contexts)


async def _move(source: Path, target: Path, context_id: str) -> float:
    async with LocalClient.connect(HomePaths(source)) as writer, LocalClient.connect(HomePaths(target)) as reader:
        started = time.perf_counter()
        await writer.ref_set("main", context_id)
        with trio.fail_after(MOVE_BOUND):
            while True:
                try:
                    if (await reader.ref("main"))["target"] == context_id:
                        return time.perf_counter() - started
                except Exception:
                    pass  # not there yet (NOT_FOUND before the first move)
                await trio.sleep(0.001)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench refs", description=__doc__.split("\n")[0])
    parser.add_argument("--moves", type=int, default=20)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)
    result = wire_cost(options.n)
    times = propagation(options.moves)
    result.update(moves=len(times), propagation_ms_median=round(statistics.median(times) * 1000, 1),
                  propagation_ms_max=round(max(times) * 1000, 1))
    if options.json:
        print(json.dumps(result))
    else:
        print(f"one ref update among n={result['n']:,}: reconciliation {result['reconcile_bytes']} B in "
              f"{result['reconcile_round_trips']} round trips; the update {result['update_bytes']} B, "
              f"its OBJECTS frame {result['objects_frame_bytes']} B")
        print(f"ref move A -> B -> C (3 processes), {result['moves']} moves: median "
              f"{result['propagation_ms_median']} ms, max {result['propagation_ms_max']} ms")
    return 0
