"""Push benchmark: `ctxfs push` through a running daemon against straight into the store.

    scripts/bench push [--large 6000] [--large-bytes 10000] [--small 1000] [--repeat 3] [--json]

Two workloads, each pushed from a JSON Lines file by the real `ctxfs push`
process (start-up included), on a fresh initialised home each time:
- large: `--large` contexts of about `--large-bytes` canonical bytes
  (the issue's 6,000 × ~10 KB ≈ 58 MB);
- small: `--small` one-atom contexts.
For each: the command with no daemon on the home (it writes the store
itself, one transaction), then with a `ctxfs daemon` running on it (the
push goes through the local API, committed by the daemon). Reported:
median seconds of `--repeat` runs and the ratio daemon / store. The
daemon's CPU seconds for the push are read from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos_common  # noqa: E402,F401  (puts tests/ on sys.path)
from process_helpers import CTXFS, Cluster, read_store_ids  # noqa: E402
from sync.codec import context_to_json  # noqa: E402
from sync.model import CompressedContext, MemoryAtom, T_STRING  # noqa: E402

WHEN = datetime(2026, 1, 1, tzinfo=timezone.utc)
PUSH_BOUND = 600.0


def write_input(path: Path, count: int, size: int, tag: str) -> int:
    """JSON Lines of `count` root contexts of about `size` bytes; returns the file's size."""
    filler = "lorem ipsum dolor sit amet " * (size // 27 + 1)
    with open(path, "w") as out:
        for k in range(count):
            atoms = [MemoryAtom(f"{tag} {k} " + filler[: max(size - 60, 1)], T_STRING, WHEN, "bench", 0.5)]
            out.write(json.dumps(context_to_json(CompressedContext(None, atoms))) + "\n")
    return path.stat().st_size


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_push(root: Path, name: str, source: Path, count: int, with_daemon: bool) -> dict:
    cluster = Cluster(root / name)
    try:
        daemon = cluster.daemon("a", start=with_daemon)
        cpu_before = cpu_seconds(daemon.pid) if with_daemon else 0.0
        start = time.perf_counter()
        result = subprocess.run([str(CTXFS), "--home", str(daemon.home), "push", str(source)],
                                capture_output=True, text=True, timeout=PUSH_BOUND)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"push failed ({result.returncode}): {result.stderr[-2000:]}")
        cpu = cpu_seconds(daemon.pid) - cpu_before if with_daemon else None
        if with_daemon:
            daemon.stop()
        stored = len(read_store_ids(daemon.home / "store.db"))
        if stored != count or len(result.stdout.split()) != count:
            raise SystemExit(f"{name}: {stored} stored, {len(result.stdout.split())} ids printed, {count} pushed")
        return {"seconds": seconds, "daemon_cpu_seconds": cpu}
    finally:
        cluster.close()


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctxfs-bench-push-") as tmp:
        root = Path(tmp)
        for label, count, size in (("large", args.large, args.large_bytes), ("small", args.small, 100)):
            if not count:
                continue
            source = root / f"{label}.jsonl"
            input_bytes = write_input(source, count, size, label)
            runs: dict[str, list[dict]] = {"store": [], "daemon": []}
            for r in range(args.repeat):
                # Alternate the order so neither side always runs on a warmer cache.
                order = ("store", "daemon") if r % 2 == 0 else ("daemon", "store")
                for mode in order:
                    runs[mode].append(one_push(root, f"{label}-{mode}-{r}", source, count, mode == "daemon"))
            store_s = statistics.median(x["seconds"] for x in runs["store"])
            daemon_s = statistics.median(x["seconds"] for x in runs["daemon"])
            rows.append({
                "workload": label, "contexts": count, "input_bytes": input_bytes,
                "store_seconds": round(store_s, 3), "daemon_seconds": round(daemon_s, 3),
                "speed_ratio": round(store_s / daemon_s, 2),
                "daemon_cpu_seconds": round(statistics.median(x["daemon_cpu_seconds"] for x in runs["daemon"]), 3),
                "repeat": args.repeat,
            })
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench push", description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=6000)
    parser.add_argument("--large-bytes", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'workload':8} {'contexts':>8} {'input MB':>8} {'store s':>8} {'daemon s':>8} {'store/daemon':>12} {'daemon CPU s':>12}")
    for r in rows:
        print(f"{r['workload']:8} {r['contexts']:>8} {r['input_bytes'] / 1e6:>8.1f} {r['store_seconds']:>8.2f} "
              f"{r['daemon_seconds']:>8.2f} {r['speed_ratio']:>12.2f} {r['daemon_cpu_seconds']:>12.2f}")
    print(f"(median of {args.repeat}; `ctxfs push FILE` processes, start-up included; ratio ≥ 0.8 is the target)")
    return 0
