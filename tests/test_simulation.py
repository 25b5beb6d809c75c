"""The chaos simulation (scripts/chaos_sim*.py): a few 8-node seeds, fast.

The simulation drives the real sans-IO pieces (Connection, Reconciler,
IdSet, a store) through link failures and node restarts; here we check
that a few seeds converge, that a seed replays exactly (in this process
and in another one, whatever its hash seed), and that the convergence
check does catch a protocol that loses its announcements.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import chaos_sim  # noqa: E402
import chaos_sim_peer  # noqa: E402
from chaos_sim_world import MAX_HEAL_ROUNDS, simulate, topology  # noqa: E402

NODES = 8
SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def results():
    return {seed: simulate(NODES, seed) for seed in SEEDS}


def test_seeds_converge_within_the_bound(results):
    for seed, result in results.items():
        assert result.ok, (seed, result.anomalies, result.stats)
        assert result.converged and 0 < result.rounds <= MAX_HEAL_ROUNDS
        assert not [key for key in result.stats if key.startswith("anomaly_")]


def test_seeds_exercise_the_faults_and_the_protocol(results):
    """Convergence means little if nothing failed and nothing moved."""
    total = _sum_stats(results.values())
    assert total["link_failures"] > 0
    assert total["restarts"] > 0
    assert total["writes"] >= len(SEEDS) * NODES // 2
    assert total["reconciliations"] > 0
    assert total["credits"] > 0
    # Each node received each context it did not write exactly once as new:
    # none was missed, none stored twice (restarts keep the store).
    for result in results.values():
        fresh = result.stats["objects_received"] - result.stats["objects_duplicate"]
        assert fresh == (NODES - 1) * result.contexts


def _sum_stats(results) -> dict:
    total: dict[str, int] = {}
    for result in results:
        for key, value in result.stats.items():
            total[key] = total.get(key, 0) + value
    return total


def test_same_seed_same_run(results):
    again = simulate(NODES, SEEDS[0])
    first = results[SEEDS[0]]
    assert (again.trace, again.rounds, again.stats) == (first.trace, first.rounds, first.stats)
    assert len({r.trace for r in results.values()}) == len(SEEDS)


def test_replay_command_reproduces_a_seed_in_another_process(results):
    """`scripts/chaos sim --seeds 1 --first-seed S --nodes N` is the replay
    a failure prints; it must not depend on Python's per-process hash seed."""
    seed = SEEDS[1]
    for hash_seed in ("0", "4242"):
        completed = subprocess.run(
            [sys.executable, str(SCRIPTS / "chaos.py"), "sim", "--seeds", "1", "--first-seed", str(seed),
             "--nodes", str(NODES), "--verbose"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        assert completed.returncode == 0, completed.stdout + completed.stderr
        assert f"seed={seed} rounds={results[seed].rounds} " in completed.stdout
        assert f"trace={results[seed].trace[:16]}" in completed.stdout


def test_lost_announcements_do_not_converge(monkeypatch):
    """A session that never announces its new root leaves peers unaware of
    what it holds: within the bound (below the anti-entropy period) the
    seed must be reported as not converged."""
    pump = chaos_sim_peer.SimSession.pump

    def pump_without_announcing(self):
        self.announce = False
        pump(self)

    monkeypatch.setattr(chaos_sim_peer.SimSession, "pump", pump_without_announcing)
    result = simulate(NODES, SEEDS[0])
    assert not result.converged and result.rounds is None and not result.ok


def test_topology_is_connected_with_degree_at_most_four():
    for nodes in (8, 16, 64):
        edges = topology(nodes, random.Random(nodes))
        neighbours: dict[int, set[int]] = {n: set() for n in range(nodes)}
        for a, b in edges:
            assert a < b
            neighbours[a].add(b)
            neighbours[b].add(a)
        assert all(2 <= len(n) <= 4 for n in neighbours.values())
        seen, frontier = {0}, [0]
        while frontier:
            for other in neighbours[frontier.pop()] - seen:
                seen.add(other)
                frontier.append(other)
        assert seen == set(range(nodes))


def test_run_reports_the_figures_of_the_part():
    parser = argparse.ArgumentParser()
    chaos_sim.add_arguments(parser)
    options = parser.parse_args(["--seeds", "2", "--first-seed", str(SEEDS[0]), "--nodes", str(NODES)])
    outcome = chaos_sim.run(options)
    assert outcome.part == "sim" and outcome.ok
    assert outcome.figures["seeds"] == 2 and outcome.figures["failures"] == 0
    assert 0 < outcome.figures[f"rounds_median_{NODES}"] <= outcome.figures[f"rounds_max_{NODES}"] <= MAX_HEAL_ROUNDS
