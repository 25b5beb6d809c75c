"""MCP benchmark: what `ctxfs mcp`'s tools cost, seen from an MCP client.

    scripts/bench mcp [--atoms 10000] [--calls 50] [--warmup 5] [--writers 4]
                      [--facts 50] [--batch 1000] [--seed 1] [--json]

One daemon process (tests/process_helpers.Cluster) on a fresh home; `main`
is filled with `--atoms` atoms through the local API (REF_APPEND, `--batch`
atoms per delta). Each atom holds eight words drawn from a 500-word made-up
vocabulary, so one word matches about 1.6 % of the atoms and three words
about 4.7 % (the exact fractions are computed and reported).

Then `ctxfs --home H mcp` runs as a real subprocess, driven by the official
MCP SDK's stdio client (as tests/test_mcp.py does), and each call is timed
on the client from request to answer, `--calls` times after `--warmup`
untimed calls: `recall` (limit 20) without text, with one word and with
three words; `context(max_tokens=2000)`; `remember` of one fact (the tool
returns once the delta is committed and the ref moved); and `recall`
right after a `remember` (the ref's new value is not yet expanded).

Concurrency: `--writers` MCP server processes on the same home, all
connected first, then each remembers `--facts` facts to `main` at once. The
facts found in `main` afterwards (through `ctxfs expand main`, not MCP)
must number writers x facts, with `main` not in conflict; wall time from
the start signal to the last answer, and facts/s.

Offline: the daemon is stopped and the same measurements run again on the
same home with no daemon (the MCP server opens the store itself).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos_common  # noqa: E402, F401  (puts tests/ on sys.path)
from daemon.localapi import LocalClient  # noqa: E402
from daemon.paths import HomePaths  # noqa: E402
from mcp import Client, StdioServerParameters  # noqa: E402
from process_helpers import CTXFS, Cluster, ctxfs  # noqa: E402
from sync import T_STRING, MemoryAtom  # noqa: E402

VOCABULARY = 500
WORDS_PER_ATOM = 8
# Client-side bound on one call: only against a hang.
CALL_BOUND = 300.0
CONCURRENT_PREFIX = "concurrent writer"

# The operations timed, in table order: (key, label).
OPERATIONS = (
    ("recall", "recall, no text (limit 20)"),
    ("recall_1word", "recall, 1-word text (limit 20)"),
    ("recall_3words", "recall, 3-word text (limit 20)"),
    ("context", "context(max_tokens=2000)"),
    ("remember", "remember 1 fact (round trip)"),
    ("recall_after_remember", "recall right after a remember"),
)


# --------------------------------------------------------------------------
# the data


def vocabulary(rng: random.Random) -> list[str]:
    """Distinct made-up words, consonant-vowel syllables ending in a/o/u
    (nothing the Porter stemmer shortens, none a real English word)."""
    consonants, vowels = "bdfgklmnprstvz", "aiou"
    words: set[str] = set()
    while len(words) < VOCABULARY:
        syllables = [rng.choice(consonants) + rng.choice(vowels) for _ in range(3)]
        syllables[-1] = syllables[-1][0] + rng.choice("aou")
        words.add("".join(syllables))
    return sorted(words)


def make_atoms(count: int, words: list[str], rng: random.Random) -> list[MemoryAtom]:
    now = datetime.now(timezone.utc)
    return [
        MemoryAtom(f"note {i}: " + " ".join(rng.sample(words, WORDS_PER_ATOM)), T_STRING, now, "bench",
                   round(rng.random(), 3))
        for i in range(count)
    ]


def match_fraction(atoms: list[MemoryAtom], query: str) -> float:
    wanted = set(query.split())
    hits = sum(1 for a in atoms if wanted & set(a.content.split()))
    return hits / len(atoms) if atoms else 0.0


async def fill(home: Path, atoms: list[MemoryAtom], batch: int) -> None:
    async with LocalClient.connect(HomePaths(home)) as client:
        for start in range(0, len(atoms), batch):
            await client.ref_append("main", atoms[start:start + batch], (),
                                    {"message": f"bench fill {start}", "source": "bench"})


# --------------------------------------------------------------------------
# MCP calls


def server(home: Path) -> StdioServerParameters:
    return StdioServerParameters(command=str(CTXFS), args=["--home", str(home), "mcp"])


async def call(client: Client, tool: str, arguments: dict) -> str:
    with trio.fail_after(CALL_BOUND):
        result = await client.call_tool(tool, arguments)
    text = result.content[0].text if result.content else ""
    if result.is_error:
        raise RuntimeError(f"{tool} {arguments}: {text}")
    return text


async def timed(client: Client, tool: str, arguments: dict) -> float:
    started = time.perf_counter()
    await call(client, tool, arguments)
    return time.perf_counter() - started


class Facts:
    """Unique fact texts for remember."""

    def __init__(self, tag: str) -> None:
        self.tag, self.n = tag, 0

    def next(self) -> str:
        self.n += 1
        return f"{self.tag} fact {self.n}"


async def single_client(home: Path, calls: int, warmup: int, one_word: str, three_words: str,
                        tag: str) -> tuple[float, dict[str, int], dict[str, list[float]]]:
    """(seconds to start the server and initialise the session, atoms each text
    query finds with limit 1000, {operation: seconds per call})."""
    reads = {
        "recall": ("recall", {"limit": 20}),
        "recall_1word": ("recall", {"text": one_word, "limit": 20}),
        "recall_3words": ("recall", {"text": three_words, "limit": 20}),
        "context": ("context", {"max_tokens": 2000}),
    }
    facts = Facts(tag)
    times: dict[str, list[float]] = {key: [] for key, _ in OPERATIONS}
    started = time.perf_counter()
    async with Client(server(home), mode="legacy", read_timeout_seconds=CALL_BOUND) as client:
        startup = time.perf_counter() - started
        found = {key: len(json.loads(await call(client, "recall", {"text": text, "limit": 1000}))["atoms"])
                 for key, text in (("1word", one_word), ("3words", three_words))}
        for key, (tool, arguments) in reads.items():
            for _ in range(warmup):
                await call(client, tool, arguments)
            for _ in range(calls):
                times[key].append(await timed(client, tool, arguments))
        for i in range(warmup + calls):
            took = await timed(client, "remember", {"facts": [facts.next()]})
            if i >= warmup:
                times["remember"].append(took)
        for i in range(warmup + calls):
            await call(client, "remember", {"facts": [facts.next()]})
            took = await timed(client, "recall", {"limit": 20})
            if i >= warmup:
                times["recall_after_remember"].append(took)
    return startup, found, times


async def concurrent_writers(home: Path, writers: int, facts: int, tag: str) -> float:
    """Wall seconds for `writers` MCP servers to remember `facts` facts each, at once."""
    go = trio.Event()
    ready = trio.Semaphore(0)
    finished: list[float] = []

    async def write(w: int) -> None:
        async with Client(server(home), mode="legacy", read_timeout_seconds=CALL_BOUND) as client:
            ready.release()
            await go.wait()
            for i in range(facts):
                await call(client, "remember", {"facts": [f"{CONCURRENT_PREFIX} {tag} {w} fact {i}"]})
            finished.append(time.perf_counter())

    async with trio.open_nursery() as nursery:
        for w in range(writers):
            nursery.start_soon(write, w)
        for _ in range(writers):
            await ready.acquire()
        started = time.perf_counter()
        go.set()
    return max(finished) - started


def count_concurrent(home: Path, tag: str) -> tuple[int, bool]:
    """(facts of the concurrency run held by main, whether main is in conflict), via the CLI."""
    lines = ctxfs(home, "expand", "main", timeout=CALL_BOUND).stdout.splitlines()
    held = sum(1 for line in lines if line.startswith(f"[String] {CONCURRENT_PREFIX} {tag} "))
    conflict = "conflict" in ctxfs(home, "ref", "list").stdout
    return held, conflict


# --------------------------------------------------------------------------
# figures


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return {"n": len(ordered), "median_ms": ms(statistics.median(ordered)), "p95_ms": ms(p95),
            "max_ms": ms(ordered[-1])}


def measure(home: Path, options, one_word: str, three_words: str, mode: str) -> dict:
    startup, found, times = trio.run(single_client, home, options.calls, options.warmup, one_word, three_words,
                                     f"{mode} single")
    result = {"startup_ms": ms(startup), "text_found": found,
              "operations": {key: summary(times[key]) for key, _ in OPERATIONS}}
    if options.writers > 0 and options.facts > 0:
        wall = trio.run(concurrent_writers, home, options.writers, options.facts, mode)
        held, conflict = count_concurrent(home, mode)
        expected = options.writers * options.facts
        result["concurrency"] = {
            "writers": options.writers, "facts_each": options.facts, "expected": expected, "held": held,
            "conflict": conflict, "ok": held == expected and not conflict, "wall_s": round(wall, 2),
            "facts_per_s": round(expected / wall, 1),
        }
    return result


def run(options) -> dict:
    rng = random.Random(options.seed)
    words = vocabulary(rng)
    atoms = make_atoms(options.atoms, words, rng)
    one_word = words[7]
    three_words = " ".join(words[100:103])
    result = {
        "command": "./scripts/bench mcp " + " ".join(options.argv),
        "atoms": options.atoms, "calls": options.calls, "warmup": options.warmup,
        "queries": {
            "1word": {"text": one_word, "match_fraction": round(match_fraction(atoms, one_word), 4)},
            "3words": {"text": three_words, "match_fraction": round(match_fraction(atoms, three_words), 4)},
        },
    }
    root = Path(tempfile.mkdtemp(prefix="ctxfs-bench-mcp-"))
    cluster = Cluster(root)
    try:
        daemon = cluster.daemon("a")
        started = time.perf_counter()
        trio.run(fill, daemon.home, atoms, options.batch)
        result["fill_s"] = round(time.perf_counter() - started, 2)
        result["daemon"] = measure(daemon.home, options, one_word, three_words, "daemon")
        daemon.stop()
        result["offline"] = measure(daemon.home, options, one_word, three_words, "offline")
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    result["offline_over_daemon"] = {
        key: round(result["offline"]["operations"][key]["median_ms"] / d["median_ms"], 2)
        for key, d in result["daemon"]["operations"].items() if d["median_ms"] > 0
    }
    return result


def print_table(result: dict) -> None:
    q, found = result["queries"], result["daemon"]["text_found"]
    print(f"command: {result['command']}")
    print(f"main: {result['atoms']:,} atoms (filled in {result['fill_s']} s); "
          f"1-word text {q['1word']['text']!r} matches {q['1word']['match_fraction']:.1%} "
          f"(recall limit 1000 finds {found['1word']}), "
          f"3-word text {q['3words']['text']!r} matches {q['3words']['match_fraction']:.1%} "
          f"(finds {found['3words']})")
    print(f"{result['calls']} timed calls each after {result['warmup']} warm-up calls; ms, client side\n")
    d, o = result["daemon"], result["offline"]
    print("| operation | daemon median | daemon p95 | offline median | offline p95 | offline ÷ daemon |")
    print("|---|---|---|---|---|---|")
    for key, label in OPERATIONS:
        dd, oo = d["operations"][key], o["operations"][key]
        print(f"| {label} | {dd['median_ms']} | {dd['p95_ms']} | {oo['median_ms']} | {oo['p95_ms']} | "
              f"{result['offline_over_daemon'].get(key, '–')} |")
    print(f"| server start + initialize (once) | {d['startup_ms']} | – | {o['startup_ms']} | – | – |")
    for mode in ("daemon", "offline"):
        c = result[mode].get("concurrency")
        if c:
            print(f"\nconcurrency ({mode}): {c['writers']} MCP servers x {c['facts_each']} remembers at once: "
                  f"{c['held']}/{c['expected']} facts in main, conflict: {'yes' if c['conflict'] else 'no'} "
                  f"({'ok' if c['ok'] else 'FAILED'}); {c['wall_s']} s wall, {c['facts_per_s']} facts/s")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench mcp", description=__doc__.split("\n")[0])
    parser.add_argument("--atoms", type=int, default=10_000, help="atoms in main before timing (10000)")
    parser.add_argument("--calls", type=int, default=50, help="timed calls per operation (50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before each operation (5)")
    parser.add_argument("--writers", type=int, default=4, help="concurrent MCP servers (4; 0: skip)")
    parser.add_argument("--facts", type=int, default=50, help="remembers per concurrent server (50)")
    parser.add_argument("--batch", type=int, default=1000, help="atoms per delta when filling main (1000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    options = parser.parse_args(argv)
    if options.atoms < 1 or options.calls < 1 or options.warmup < 0 or options.batch < 1:
        parser.error("--atoms, --calls and --batch must be at least 1, --warmup at least 0")
    options.argv = argv
    result = run(options)
    if options.json:
        print(json.dumps(result))
    else:
        print_table(result)
    concurrency = [result[m].get("concurrency") for m in ("daemon", "offline")]
    return 0 if all(c is None or c["ok"] for c in concurrency) else 1
