"""Set reconciliation benchmark.

    scripts/bench reconcile --n 100000 --d 1000 [--seed 1] [--json]
    scripts/bench reconcile --grid            # n in {10k, 100k, 1M} x d in {0, 1, 10, 100, 1000, 10% of n}

Builds two IdSets of N random ids each (from a seeded RNG) that differ in D
ids, half missing on each side; runs one reconciliation in memory, every
message through the real wire path: a RECONCILE message encoded by
`sync.messages` and framed by `sync.frames`, then decoded the same way the
daemon decodes it; checks that both sides end with exactly the difference.
Bytes counted are the frames' bytes. `seconds` times the reconciliation
alone; `build_seconds` the two sets.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sync.idset import IdSet  # noqa: E402
from sync import frames  # noqa: E402
from sync.messages import MessageType, Reconcile, decode_payload, encode_payload  # noqa: E402
from sync.reconcile import Reconciler, from_wire, to_wire  # noqa: E402
GRID_N = (10_000, 100_000, 1_000_000)


def make_sets(n: int, d: int, seed: int) -> tuple[IdSet, IdSet, set[bytes], set[bytes], float]:
    """Two sets of n ids; a lacks `only_b`, b lacks `only_a` (d // 2 and d - d // 2)."""
    rng = random.Random(seed)
    blob = rng.randbytes(32 * (n + d - d // 2))
    ids = [blob[i : i + 32] for i in range(0, len(blob), 32)]
    only_a, only_b = ids[n - d // 2 : n], ids[n:]
    start = time.perf_counter()
    a = IdSet(ids[:n])
    b = IdSet(ids[: n - d // 2])
    b.add_many(only_b)
    a.root(), b.root()  # hashes are computed lazily: count them as building
    return a, b, set(only_a), set(only_b), time.perf_counter() - start


def run(n: int, d: int, seed: int = 1) -> dict:
    a, b, only_a, only_b, build = make_sets(n, d, seed)
    start = time.perf_counter()
    alice = Reconciler(a, initiator=True, nonce=seed.to_bytes(16, "big"))
    bob = Reconciler(b, initiator=False)
    sizes = {"a": 0, "b": 0}
    messages = 0
    msg, sender, receiver, side = alice.initial_message(), alice, bob, "a"
    while msg is not None:
        payload = encode_payload(Reconcile(body=tuple(to_wire(msg))))
        wire = b"".join(frames.fragment(MessageType.RECONCILE, 1, payload, frames.DEFAULT_MAX_FRAME_SIZE))
        sizes[side] += len(wire)
        messages += 1
        received = decode_payload(MessageType.RECONCILE, payload)
        msg = receiver.receive(from_wire(list(received.body)))
        sender, receiver, side = receiver, sender, "b" if side == "a" else "a"
    seconds = time.perf_counter() - start
    correct = (alice.done and bob.done and alice.to_send == only_a and alice.to_request == only_b
               and bob.to_send == only_b and bob.to_request == only_a)
    total = sizes["a"] + sizes["b"]
    return {
        "n": n, "d": d, "seed": seed,
        "round_trips": (messages + 1) // 2, "messages": messages, "passes": max(alice.passes, bob.passes),
        "bytes_a_to_b": sizes["a"], "bytes_b_to_a": sizes["b"], "bytes_total": total,
        "bytes_per_difference": round(total / d, 1) if d else None,
        "naive_bytes": n * 32, "correct": correct,
        "seconds": round(seconds, 3), "build_seconds": round(build, 3),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def grid(seed: int) -> list[dict]:
    rows = []
    for n in GRID_N:
        for d in sorted({0, 1, 10, 100, 1000, n // 10}):
            row = run(n, d, seed)
            print(f"n={n} d={d}: {row['round_trips']} RT, {row['bytes_total']} B, "
                  f"{row['seconds']} s, correct={row['correct']}", file=sys.stderr)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| n | d | round trips | bytes a→b | bytes b→a | bytes total | bytes/diff | naive bytes "
            "| correct | reconcile s | build s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        per = "–" if r["bytes_per_difference"] is None else f"{r['bytes_per_difference']:.1f}"
        lines.append(f"| {r['n']:,} | {r['d']:,} | {r['round_trips']} | {r['bytes_a_to_b']:,} | "
                     f"{r['bytes_b_to_a']:,} | {r['bytes_total']:,} | {per} | {r['naive_bytes']:,} | "
                     f"{'yes' if r['correct'] else '**NO**'} | {r['seconds']:.2f} | {r['build_seconds']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench reconcile", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="ids on each side")
    parser.add_argument("--d", type=int, default=1000, help="ids in the symmetric difference")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--grid", action="store_true", help="run the whole grid, print a Markdown table")
    args = parser.parse_args(argv)
    if args.grid:
        rows = grid(args.seed)
        print(json.dumps(rows) if args.json else markdown(rows))
        return 0 if all(r["correct"] for r in rows) else 1
    if not 0 <= args.d // 2 <= args.n:
        parser.error("need 0 <= d <= 2n")
    row = run(args.n, args.d, args.seed)
    if args.json:
        print(json.dumps(row))
    else:
        for key, value in row.items():
            print(f"{key:22} {value}")
    return 0 if row["correct"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
