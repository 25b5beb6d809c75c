"""Refs across three daemon processes: a move travels, a partition makes a
conflict every node sees, and one merge resolves it everywhere."""

from __future__ import annotations

import json

from process_helpers import cluster, ctxfs  # noqa: F401  (cluster is a fixture)
from sync.codec import context_to_json

from test_processes import make_context, wait_converged


def ref_show(daemon) -> dict:
    return json.loads(daemon.ctxfs("ref", "show", "main", "--json").stdout)


def push_ref(daemon, context, *extra: str) -> str:
    line = json.dumps(context_to_json(context)) + "\n"
    [cid] = daemon.ctxfs("push", "--ref", "main", *extra, "-", input=line).stdout.split()
    return cid


def test_a_partition_conflict_is_seen_everywhere_and_one_merge_resolves_it(cluster):
    a = cluster.daemon("a")
    c = cluster.daemon("c", peers=[a])
    b = cluster.daemon("b", peers=[a, c])  # B dials both: after its restart (new port) it dials them again
    first = make_context(["the project is ctxfs"])
    push_ref(a, first)
    wait_converged([a, b, c], peers={a: 2, b: 2, c: 2})
    for daemon in (b, c):  # a ref and its target travelled; `expand main` works on every node
        assert ref_show(daemon)["target"] == first.id
        assert "the project is ctxfs" in daemon.ctxfs("expand", "main").stdout

    b.stop()  # a partition: B goes on alone, offline, straight into its store
    on_a = make_context(["A learned about refs"], base=first.id)
    on_b = make_context(["B learned about merges"], base=first.id)
    push_ref(a, on_a)
    line = json.dumps(context_to_json(on_b)) + "\n"
    assert ctxfs(b.home, "push", "--ref", "main", "-", input=line).stdout.split() == [on_b.id]
    wait_converged([a, c], peers={a: 1, c: 1})
    assert ref_show(c)["target"] == on_a.id

    b.restart()  # the partition heals
    wait_converged([a, b, c], peers={a: 2, b: 2, c: 2})
    for daemon in (a, b, c):
        shown = ref_show(daemon)
        assert shown["conflict"] is True and sorted(shown["candidates"]) == sorted([on_a.id, on_b.id])
        assert daemon.status()["conflicts"] == ["main"]
    winner = ref_show(a)["target"]
    assert {ref_show(d)["target"] for d in (b, c)} == {winner}  # one documented winner everywhere
    result = c.ctxfs("expand", "main")
    assert "in conflict" in result.stderr and "ctxfs ref set main" in result.stderr

    [merged] = c.ctxfs("merge", on_a.id, on_b.id, "--ref", "main", "-m", "reunite").stdout.split()
    wait_converged([a, b, c], peers={a: 2, b: 2, c: 2})
    for daemon in (a, b, c):
        shown = ref_show(daemon)
        assert shown["conflict"] is False and shown["target"] == merged
        text = daemon.ctxfs("expand", "main").stdout
        assert "A learned about refs" in text and "B learned about merges" in text
        assert daemon.status()["conflicts"] == []
