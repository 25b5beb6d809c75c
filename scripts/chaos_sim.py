"""Deterministic simulation: N ctxfs nodes in one process, seeded faults, every seed must converge.

`scripts/chaos sim` runs seeds first-seed, first-seed+1, ... at each node
count and prints, per node count, how many heal rounds convergence took
(what a round is, the topology and the fault model: chaos_sim_world.py),
and what share of the objects nodes received they already held (`dup%`).
`--protocol 1` runs the release before protocol version 2 (every holder
pushes), so the two can be compared on the same seeds. A seed is one
(node count, seed) pair and depends on nothing else, so a failure printed
as `--seeds 1 --first-seed S --nodes N ...` replays exactly.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos_common import Outcome  # noqa: E402
from chaos_sim_world import FAULT_ROUNDS, MAX_HEAL_ROUNDS, PROTOCOLS, SeedResult, simulate  # noqa: E402

DEFAULT_NODE_COUNTS = "8,16,32,64"
# Seeds per node count by default: 4 counts x 50 = 200 seeds in all. Work
# grows as N squared (every node receives all ~2N contexts): measured 6 min
# of CPU, 9 min on the shared 2-core machine, 70 % of it the 64-node seeds;
# 200 seeds at 64 nodes alone would take over 20 min.
DEFAULT_SEEDS = 50


def add_arguments(parser) -> None:
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                        help=f"seeds per node count (default {DEFAULT_SEEDS}; x4 node counts = 200 seeds)")
    parser.add_argument("--first-seed", type=int, default=1, help="first seed number (default 1)")
    parser.add_argument("--nodes", type=_node_counts, default=_node_counts(DEFAULT_NODE_COUNTS),
                        help=f"comma-separated node counts (default {DEFAULT_NODE_COUNTS})")
    parser.add_argument("--fault-rounds", type=int, default=FAULT_ROUNDS,
                        help=f"rounds of faults and writes before the heal (default {FAULT_ROUNDS})")
    parser.add_argument("--max-rounds", type=int, default=MAX_HEAL_ROUNDS,
                        help=f"heal rounds a seed may take to converge (default {MAX_HEAL_ROUNDS})")
    parser.add_argument("--topology", choices=("cycles", "overlay"), default="cycles",
                        help="two random Hamiltonian cycles (default), or the daemon's overlay rule")
    parser.add_argument("--degree", type=int, default=8,
                        help="with --topology overlay: peers each node dials (the daemon's max_peers)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="2",
                        help="2: nodes ask for what they lack (default); 1: every holder pushes (the release "
                             "before version 2); mixed: even nodes 2, odd nodes 1")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes (default 1: the machine is shared; results do not depend on it)")
    parser.add_argument("--verbose", action="store_true", help="one line per seed")


def _node_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 2:
        raise ValueError("node counts must be integers >= 2")
    return counts


def run(options) -> Outcome:
    results: dict[int, list[SeedResult]] = {}
    failures: list[str] = []
    seeds = range(options.first_seed, options.first_seed + options.seeds)
    for nodes in options.nodes:
        started = time.monotonic()
        results[nodes] = []
        for seed, (result, failure) in zip(seeds, _map(options, nodes, seeds)):
            if result is not None:
                results[nodes].append(result)
            if failure is not None:
                failures.append(failure)
                print(failure, flush=True)
            if options.verbose and result is not None:
                print(f"  nodes={nodes} seed={seed} rounds={result.rounds} contexts={result.contexts} "
                      f"dup={result.stats.get('objects_duplicate', 0)}/{result.stats.get('objects_received', 0)} "
                      f"trace={result.trace[:16]}", flush=True)
        print(f"nodes={nodes}: {len(seeds)} seeds in {time.monotonic() - started:.0f} s", flush=True)
    _print_table(options, results)
    return Outcome(part="sim", ok=not failures, figures=_figures(options, results, failures))


def _map(options, nodes: int, seeds: range):
    """(result, failure) per seed, in seed order; in worker processes with --jobs > 1."""
    settings = (options.fault_rounds, options.max_rounds, options.topology, options.degree, options.protocol)
    if options.jobs <= 1:
        return (_run_seed(nodes, seed, settings) for seed in seeds)
    pool = concurrent.futures.ProcessPoolExecutor(options.jobs)
    with pool:
        return list(pool.map(_run_seed, [nodes] * len(seeds), seeds, [settings] * len(seeds)))


def _run_seed(nodes: int, seed: int, settings: tuple) -> tuple[SeedResult | None, str | None]:
    """One seed; a crash of the simulation is a failure with its traceback, not a stop."""
    fault_rounds, max_rounds, kind, degree, protocol = settings
    replay = (f"scripts/chaos sim --seeds 1 --first-seed {seed} --nodes {nodes} --topology {kind} --degree {degree} "
              f"--protocol {protocol}")
    try:
        result = simulate(nodes, seed, fault_rounds=fault_rounds, max_heal_rounds=max_rounds,
                          topology_kind=kind, degree=degree, protocol=protocol)
    except Exception:  # noqa: BLE001 - reported with the seed that replays it
        return None, f"FAILED nodes={nodes} seed={seed}: simulation raised\n{traceback.format_exc()}  replay: {replay}"
    if result.ok:
        return result, None
    problems = []
    if result.diameter is None:
        problems.append("the topology is not connected")
    if not result.converged:
        problems.append(f"did not converge within {max_rounds} heal rounds")
    problems += [f"{k}={v}" for k, v in sorted(result.stats.items()) if k.startswith("anomaly_")]
    problems += list(result.anomalies)
    return result, f"FAILED nodes={nodes} seed={seed}: " + "; ".join(problems) + f"\n  replay: {replay}"


def _percentile(values: list[int], fraction: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


_HEADER = (f"{'nodes':>5} {'seeds':>5} {'conv':>5} {'r_med':>5} {'r_p95':>5} {'r_max':>5} {'ctxs':>5} "
           f"{'diam':>4} {'msgs/seed':>9} {'MB/seed':>7} {'dup%':>5} {'recon':>6} {'waits':>6} {'retry':>6} "
           f"{'mbase':>5} {'t-out':>5} {'fails':>5} {'rstrt':>5} {'a-e':>4}")
_LEGEND = ("conv: seeds converged; r_*: heal rounds to converge; ctxs: contexts written; diam: the "
           "topology's largest diameter over the seeds; msgs, MB: all "
           "messages and bytes delivered (fault + heal); dup%: objects received already held; recon: "
           "reconciliations initiated; waits: OBJECTS held back for lack of credit; retry: RETRY errors "
           "(set changed mid-reconciliation); mbase: pushes refused for a missing base (version 2: a base "
           "asked of another peer came later); t-out: sync turns given up waiting for (SYNC_TURN_WAIT); "
           "fails, rstrt: link failures, node restarts; a-e: anti-entropy rescues (per seed means)")


def _print_table(options, results: dict[int, list[SeedResult]]) -> None:
    print(f"fault phase {options.fault_rounds} rounds; rounds to converge counted after heal; "
          f"topology {options.topology}" + (f" (degree {options.degree})" if options.topology == "overlay" else "")
          + f"; protocol {options.protocol}")
    print(_HEADER)
    for nodes, rows in results.items():
        if rows:
            print(_row(nodes, rows))
    print(_LEGEND)


def _row(nodes: int, rows: list[SeedResult]) -> str:
    rounds = [r.rounds for r in rows if r.converged]

    def mean(key: str) -> float:
        return statistics.fmean(r.stats.get(key, 0) for r in rows)

    median, p95, worst = (statistics.median(rounds), _percentile(rounds, 0.95), max(rounds)) if rounds else ("-",) * 3
    return (f"{nodes:>5} {len(rows):>5} {len(rounds):>5} {median:>5} {p95:>5} {worst:>5} "
            f"{statistics.fmean(r.contexts for r in rows):>5.0f} {max(r.diameter or 0 for r in rows):>4} {mean('messages'):>9.0f} {mean('bytes') / 1e6:>7.2f} "
            f"{_duplicate_percent(rows):>5.1f} {mean('reconciliations'):>6.0f} {mean('credit_waits'):>6.0f} "
            f"{mean('retries'):>6.1f} {mean('missing_base_refusals'):>5.1f} {mean('turn_timeouts'):>5.1f} "
            f"{mean('link_failures'):>5.0f} {mean('restarts'):>5.1f} "
            f"{mean('anti_entropy_syncs'):>4.1f}")


def _duplicate_percent(rows: list[SeedResult]) -> float:
    """Of all objects the seeds' nodes received, the share they already held."""
    received = sum(r.stats.get("objects_received", 0) for r in rows)
    duplicate = sum(r.stats.get("objects_duplicate", 0) for r in rows)
    return 100 * duplicate / received if received else 0.0


def _figures(options, results: dict[int, list[SeedResult]], failures: list[str]) -> dict:
    figures: dict = {"seeds": len(options.nodes) * options.seeds}
    for nodes, rows in results.items():
        rounds = [r.rounds for r in rows if r.converged]
        if rounds:
            figures[f"rounds_median_{nodes}"] = statistics.median(rounds)
            figures[f"rounds_max_{nodes}"] = max(rounds)
            figures[f"diameter_{nodes}"] = max(r.diameter or 0 for r in rows)
        if rows:
            figures[f"duplicate_pct_{nodes}"] = round(_duplicate_percent(rows), 1)
    figures["failures"] = len(failures)
    return figures
