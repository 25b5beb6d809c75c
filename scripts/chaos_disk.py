"""Full disk: a receiving node's home on a small tmpfs fills up mid-sync, then space is freed.

Per run: node A's home lives on a tmpfs of --disk-mb MB, most of it taken
by a ballast file; node B holds --contexts contexts of ~--context-kb KB
that do not fit in what is left. B syncs to A until A's disk is full.
Checked while full: A is still running, `status` says the disk is full,
A still answers reads, and its store passes `PRAGMA integrity_check`.
Then the ballast is deleted (space returns, nothing restarted): A must
resume by itself and converge with B, and pass fsck. Needs root (mount).
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from chaos_common import Outcome, context
from daemon.localapi import LocalClient
from daemon.paths import HomePaths
from process_helpers import Cluster, Daemon, ctxfs, quick_status, wait_until

# Distinct words in the filler contexts.
VOCABULARY = 5000
# How long A may take to notice the full disk, and to converge after space returns.
FULL_BOUND = 120.0
RESUME_BOUND = 120.0


def add_arguments(parser) -> None:
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--disk-mb", type=int, default=40, help="size of A's tmpfs (default 40)")
    parser.add_argument("--ballast-mb", type=int, default=28, help="of which a ballast file takes (default 28)")
    parser.add_argument("--contexts", type=int, default=100, help="contexts B holds (default 100)")
    parser.add_argument("--context-kb", type=int, default=200, help="size of each (default 200 KB)")
    parser.add_argument("--keep", action="store_true")


def run(options) -> Outcome:
    if os.geteuid() != 0:
        return Outcome(part="disk", ok=False, figures={"reason": "needs root (mounts a tmpfs)"})
    rows = [_one_run(options, number) for number in range(1, options.runs + 1)]
    ok = all(row["ok"] for row in rows)
    resumes = [row["resume_s"] for row in rows if row["resume_s"] is not None]
    figures = {
        "runs": len(rows),
        "ok_runs": sum(row["ok"] for row in rows),
        "paused_with_disk_full": sum(row["paused"] for row in rows),
        "reads_while_full": sum(row["reads"] for row in rows),
        "integrity_while_full": sum(row["integrity"] == "ok" for row in rows),
        "resume_s_median": round(statistics.median(resumes), 2) if resumes else None,
        "resume_s_max": round(max(resumes), 2) if resumes else None,
        "daemon_exits": sum(row["exits"] for row in rows),
        "lost_acked": sum(row["lost"] for row in rows),
    }
    return Outcome(part="disk", ok=ok, figures=figures)


def _one_run(options, number: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="ctxfs-chaos-disk-"))
    mount = root / "disk"
    mount.mkdir()
    cluster = Cluster(root / "nodes")
    row = {"ok": False, "paused": False, "reads": False, "integrity": None, "resume_s": None, "exits": 0, "lost": 0}
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={options.disk_mb}m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        home_a = mount / "a"
        ctxfs(home_a, "init", "--cluster-key-file", str(_key_file(cluster)))
        ballast = mount / "ballast"
        with open(ballast, "wb") as f:
            f.write(b"\0" * (options.ballast_mb * 1024 * 1024))
        a = Daemon(home_a, cluster.logs, f"a{number}")
        cluster.daemons.append(a)
        a.start()
        [kept] = trio.run(_push, home_a, [context(f"kept on A, run {number}")])
        b = cluster.daemon(f"b{number}", peers=[a])
        rng = random.Random(number)
        # Words from a vocabulary, as text has them: random unique tokens
        # would make the full-text index several times the text (every
        # word a term of its own) and no realistic disk would fit it.
        vocabulary = [f"w{rng.getrandbits(24):x}" for _ in range(VOCABULARY)]
        filler = [context(" ".join(rng.choice(vocabulary) for _ in range(options.context_kb * 1024 // 8)))
                  for _ in range(options.contexts)]
        b_ids = trio.run(_push, b.home, filler)
        wait_until(lambda: (quick_status(home_a) or {}).get("store_error") == "disk full", FULL_BOUND,
                   poll=0.2, message=lambda: f"A never reported a full disk\n{a.stderr()}")
        row["paused"] = a.running
        row["reads"] = "kept on A" in a.ctxfs("expand", kept, check=False).stdout
        row["integrity"] = _integrity(home_a / "store.db")
        print(f"disk run {number}: full; A running={a.running}, reads={row['reads']}, "
              f"integrity={row['integrity']}; deleting the ballast", flush=True)
        ballast.unlink()
        freed = time.monotonic()
        target = b.status()["root"]
        wait_until(lambda: (quick_status(home_a) or {}).get("root") == target, RESUME_BOUND, poll=0.1,
                   message=lambda: f"A did not catch up after space returned\n{a.stderr()}")
        row["resume_s"] = time.monotonic() - freed
        held = set(_ids(home_a / "store.db"))
        row["lost"] = sum(1 for cid in [kept] + b_ids if cid not in held)
        row["exits"] = 0 if a.running else 1
        fsck = a.ctxfs("fsck", check=False).returncode
        row["ok"] = (row["paused"] and row["reads"] and row["integrity"] == "ok" and row["lost"] == 0
                     and row["exits"] == 0 and fsck == 0)
        print(f"disk run {number}: resumed and converged {row['resume_s']:.2f} s after space returned; "
              f"fsck exit {fsck}; {'ok' if row['ok'] else 'FAILED'}", flush=True)
    except AssertionError as exc:
        print(f"disk run {number}: FAILED: {str(exc)[:2000]}", flush=True)
        row["exits"] = sum(1 for d in cluster.daemons if not d.running)
    finally:
        cluster.close()
        subprocess.run(["umount", str(mount)], check=False)
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
    return row


def _key_file(cluster: Cluster) -> Path:
    cluster.home("keymaker")  # the first home makes the cluster key
    return cluster.root / "cluster.key"


async def _push(home: Path, contexts) -> list[str]:
    async with LocalClient.connect(HomePaths(home)) as client:
        return await client.push(contexts)


def _integrity(store: Path) -> str:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def _ids(store: Path) -> list[str]:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        return [row[0].hex() for row in db.execute("SELECT id FROM contexts")]
    finally:
        db.close()
