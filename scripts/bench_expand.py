"""Expansion and store benchmark (issue: foundation).

    scripts/bench expand [--atoms 100000] [--depth 100] [--json]

Builds a chain of DEPTH contexts holding ATOMS atoms in all in a fresh
SQLite store (with some removals and re-adds along the way), then times:
full expansion with a cold expander; expansion of one more child with the
same (warm) expander; the first streamed chunk and the whole stream with a
cold start; and SQLite put throughput for small and 1 MB contexts.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from sync import CompressedContext, ExpanderFunctor, MemoryAtom, SQLiteContextStore, T_INT, T_STRING, stream_expansion
from sync.codec import encode_context

WHEN = datetime(2026, 11, 24, 10, tzinfo=timezone.utc)


def build_chain(store, atoms: int, depth: int, rng: random.Random) -> list[str]:
    per_level = atoms // depth
    ids: list[str] = []
    base = None
    previous: list[MemoryAtom] = []
    for level in range(depth):
        delta = [
            MemoryAtom(f"fact {level} {i} about something the user said", T_STRING if i % 3 else T_INT,
                       WHEN, f"conv_{level}", rng.random())
            for i in range(per_level)
        ]
        # Remove a few atoms of the previous level: expansion must honour them.
        removed = {a.content_hash for a in previous[:5]}
        ctx = CompressedContext(base, delta, (), removed, {"level": level})
        base = store.put(ctx)
        ids.append(base)
        previous = delta
    return ids


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    times = []
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def put_throughput(path: Path, count: int, atoms_per_context: int, content_bytes: int) -> dict:
    store = SQLiteContextStore(path)
    text = "x" * content_bytes
    contexts = [
        CompressedContext(None, [MemoryAtom(f"{i} {j} {text}", T_STRING, WHEN, "bench", 0.5) for j in range(atoms_per_context)])
        for i in range(count)
    ]
    size = sum(len(encode_context(c)) for c in contexts)
    start = time.perf_counter()
    for ctx in contexts:
        store.put(ctx)
    seconds = time.perf_counter() - start
    store.close()
    return {"contexts": count, "bytes": size, "seconds": seconds,
            "contexts_per_s": count / seconds, "mb_per_s": size / seconds / 1e6}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench expand")
    parser.add_argument("--atoms", type=int, default=100_000)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteContextStore(Path(tmp) / "chain.db")
        start = time.perf_counter()
        ids = build_chain(store, args.atoms, args.depth, rng)
        build_s = time.perf_counter() - start
        tip = ids[-1]

        full_s, expanded = timed(lambda: ExpanderFunctor(store).expand(tip))
        live = len(expanded.atoms)

        warm = ExpanderFunctor(store)
        warm.expand(tip)
        child = CompressedContext(tip, [MemoryAtom("one more fact", T_STRING, WHEN, "bench", 0.99)], (), set(), {})
        child_id = store.put(child)
        child_s, child_expanded = timed(lambda: warm.expand(child_id), repeat=1)
        assert len(child_expanded.atoms) == live + 1

        first_s, _ = timed(lambda: next(stream_expansion(store, tip, chunk_size=10)))
        warm_first_s, _ = timed(lambda: next(stream_expansion(store, tip, chunk_size=10, expander=warm)))
        stream_s, chunks = timed(lambda: list(stream_expansion(store, tip, chunk_size=10)))
        assert [a.content for c in chunks for a in c.atoms] == [a.content for a in expanded.atoms]
        store.close()

        small = put_throughput(Path(tmp) / "small.db", 2000, 3, 40)
        large = put_throughput(Path(tmp) / "large.db", 20, 1000, 1000)

    result = {
        "atoms": args.atoms, "depth": args.depth, "live_atoms": live, "build_seconds": round(build_s, 3),
        "full_expansion_ms": round(full_s * 1000, 1),
        "child_after_warm_ms": round(child_s * 1000, 1),
        "first_chunk_ms": round(first_s * 1000, 1),
        "first_chunk_vs_full": round(first_s / full_s, 3),
        "full_stream_ms": round(stream_s * 1000, 1),
        "first_chunk_warm_ms": round(warm_first_s * 1000, 2),
        "small_put_contexts_per_s": round(small["contexts_per_s"]),
        "small_put_mb_per_s": round(small["mb_per_s"], 2),
        "large_put_contexts_per_s": round(large["contexts_per_s"], 1),
        "large_put_mb_per_s": round(large["mb_per_s"], 1),
        "large_context_bytes": large["bytes"] // large["contexts"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28} {value}")
    return 0
