"""Tests for `ctxfs show`, `log`, `heads` and `merge`, without a daemon."""

from __future__ import annotations

import json
from pathlib import Path

from sync.codec import context_to_json
from sync.store import SQLiteContextStore
from test_cli import (  # noqa: F401  (run, home and _no_ambient_home are fixtures)
    CHILD,
    ROOT,
    _no_ambient_home,
    assert_one_line_error,
    atom,
    ctx,
    home,
    jsonl,
    push,
    rich,
    run,
    write,
)
from test_cli_refs import all_rows, show as ref_show

LOG_KEYS = {"id", "base", "time", "message", "added", "removed", "refs"}
T0_TEXT = "2026-11-24T10:00:00Z"


def sync_stores(source: Path, target: Path) -> None:
    """Copy every object of one home's store into another's, as reconciliation would."""
    src, dst = SQLiteContextStore(source / "store.db"), SQLiteContextStore(target / "store.db")
    try:
        order = [oid for oid, _ in src.send_order(list(src.ids()))]
        dst.put_encoded(src.get_many_bytes(order))
    finally:
        src.close()
        dst.close()


def contents(run, home: Path, cid: str) -> set[str]:
    return {a["content"] for a in json.loads(run(home, "expand", cid, "--json").out)["atoms"]}


# --------------------------------------------------------------------------
# show
# --------------------------------------------------------------------------


def test_show_json_has_every_field(rich, run):
    assert run(rich, "ref", "set", "main", CHILD.id).code == 0
    removal = ctx(CHILD.id, atom("Later", 0.3), removed=[ROOT.delta_atoms[0].content_hash], message="tidy up")
    push(run, rich, rich.parent, removal)
    doc = json.loads(run(rich, "show", removal.id[:10], "--json").out)
    assert doc["id"] == removal.id and doc["base"] == CHILD.id and doc["depth"] == 2
    assert doc["time"] == "2026-11-24T10:00:00+00:00"
    assert doc["message"] == "tidy up" and doc["compression_metadata"] == {"message": "tidy up"}
    assert (doc["added"], doc["removed"], doc["molecules"]) == (1, 1, 0)
    [added] = doc["atoms_added"]
    assert added == {"hash": removal.delta_atoms[0].content_hash, **context_to_json(removal)["delta_atoms"][0]}
    assert (added["type_sig"]["name"], added["relevance_score"]) == ("String", 0.3)
    assert doc["removed_hashes"] == [ROOT.delta_atoms[0].content_hash]
    assert doc["refs"] == []
    assert json.loads(run(rich, "show", "main", "--json").out)["refs"] == ["main"]
    root = json.loads(run(rich, "show", ROOT.id, "--json").out)
    assert root["base"] is None and root["depth"] == 0 and root["added"] == 5 and root["message"] is None


def test_show_human_is_short_and_readable(rich, run):
    assert run(rich, "ref", "set", "main", CHILD.id).code == 0
    result = run(rich, "show", "main")
    assert result.code == 0 and result.err == ""
    assert result.lines == [
        f"context  {CHILD.id} (main)",
        f"base     {ROOT.id}",
        "depth    1",
        f"time     {T0_TEXT}",
        'metadata {"source": "child"}',
        "delta    +1 atoms, -0 atoms, 0 molecules",
        "",
        "+ 0.95 [String] Deadline is Friday",
    ]
    assert "base     (none: a root)" in run(rich, "show", ROOT.id).out


def test_show_of_an_unknown_id_is_one_line(rich, run):
    result = run(rich, "show", "ef" * 32)
    assert result.code == 1 and result.out == ""
    assert_one_line_error(result.err, "no context")


# --------------------------------------------------------------------------
# log, heads
# --------------------------------------------------------------------------


def test_log_is_newest_first_one_line_each(rich, run, tmp_path):
    top = ctx(CHILD.id, atom("Top", 0.1), removed=[ROOT.delta_atoms[1].content_hash], message="drop trio\nmore")
    push(run, rich, tmp_path, top)
    assert run(rich, "ref", "set", "main", top.id).code == 0
    assert run(rich, "log", "main").lines == [
        f"{top.id[:12]} {T0_TEXT} +1 -1 (main) drop trio",
        f"{CHILD.id[:12]} {T0_TEXT} +1 -0",
        f"{ROOT.id[:12]} {T0_TEXT} +5 -0",
    ]
    assert run(rich, "log", "main", "-n", "1").lines == [f"{top.id[:12]} {T0_TEXT} +1 -1 (main) drop trio"]
    entries = json.loads(run(rich, "log", top.id, "--json").out)
    assert [e["id"] for e in entries] == [top.id, CHILD.id, ROOT.id]
    assert all(set(e) == LOG_KEYS for e in entries)
    assert entries[0] == {"id": top.id, "base": CHILD.id, "time": "2026-11-24T10:00:00+00:00",
                          "message": "drop trio\nmore", "added": 1, "removed": 1, "refs": ["main"]}
    assert entries[2]["base"] is None and entries[2]["message"] is None and entries[2]["refs"] == []
    assert [e["id"] for e in json.loads(run(rich, "log", top.id, "--json", "-n", "2").out)] == [top.id, CHILD.id]
    # The old output, kept for scripts.
    assert run(rich, "log", "--ids", "main").lines == [ROOT.id, CHILD.id, top.id]


def test_a_context_adding_no_atoms_has_no_time(rich, run, tmp_path):
    bare = ctx(CHILD.id, removed=[CHILD.delta_atoms[0].content_hash])
    push(run, rich, tmp_path, bare)
    assert run(rich, "log", bare.id, "-n", "1").lines == [f"{bare.id[:12]} {'-':20} +0 -1"]
    assert json.loads(run(rich, "log", bare.id, "--json", "-n", "1").out)[0]["time"] is None


def test_control_characters_in_a_message_do_not_reach_the_terminal(rich, run, tmp_path):
    loud = ctx(CHILD.id, atom("x", 0.1), message="\x1b[2Jboom")
    push(run, rich, tmp_path, loud)
    [line] = run(rich, "log", loud.id, "-n", "1").lines
    assert "\x1b" not in line and line.endswith("?[2Jboom")


def test_heads_lines_json_and_ids(rich, run, tmp_path):
    side = ctx(ROOT.id, atom("Side", 0.1), message="side line")
    push(run, rich, tmp_path, side)
    assert run(rich, "ref", "set", "main", CHILD.id).code == 0
    heads = sorted([CHILD.id, side.id])
    assert run(rich, "heads", "--ids").lines == heads
    lines = run(rich, "heads").lines
    assert [line.split()[0] for line in lines] == [h[:12] for h in heads]
    assert f"{side.id[:12]} {T0_TEXT} +1 -0 side line" in lines
    assert f"{CHILD.id[:12]} {T0_TEXT} +1 -0 (main)" in lines
    entries = json.loads(run(rich, "heads", "--json").out)
    assert [e["id"] for e in entries] == heads and all(set(e) == LOG_KEYS for e in entries)
    assert json.loads(run(rich, "log", side.id, "--json", "-n", "1").out) == [e for e in entries if e["id"] == side.id]


# --------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------


LAPTOP = ctx(CHILD.id, atom("Laptop fact", 0.4), message="laptop")
DESKTOP = ctx(CHILD.id, atom("Desktop fact", 0.3), removed=[ROOT.delta_atoms[3].content_hash], message="desktop")


def test_merge_stores_ours_plus_theirs_changes(rich, run, tmp_path):
    push(run, rich, tmp_path, LAPTOP, DESKTOP)
    result = run(rich, "merge", LAPTOP.id[:8], DESKTOP.id[:8], "-m", "reunite")
    assert result.code == 0 and result.err == ""
    [merged] = result.lines
    doc = json.loads(run(rich, "show", merged, "--json").out)
    assert doc["base"] == LAPTOP.id and doc["message"] == "reunite"
    assert doc["compression_metadata"]["merge"] == {"ours": LAPTOP.id, "theirs": DESKTOP.id, "ancestor": CHILD.id}
    assert [a["content"] for a in doc["atoms_added"]] == ["Desktop fact"]
    assert doc["removed_hashes"] == [ROOT.delta_atoms[3].content_hash]
    assert contents(run, rich, merged) == (contents(run, rich, LAPTOP.id) | {"Desktop fact"}) - {"Likes short answers"}
    # Again: the same context, stored once.
    assert run(rich, "merge", LAPTOP.id, DESKTOP.id, "-m", "reunite").lines == [merged]
    assert run(rich, "fsck").code == 0


def test_merge_up_to_date_and_fast_forward_store_nothing(rich, run, tmp_path):
    push(run, rich, tmp_path, LAPTOP)
    before = all_rows(rich)
    up = run(rich, "merge", LAPTOP.id, ROOT.id)
    assert up.code == 0 and up.lines == [LAPTOP.id]
    assert_one_line_error(up.err, "already up to date", "nothing stored")
    ff = run(rich, "merge", ROOT.id, LAPTOP.id)
    assert ff.code == 0 and ff.lines == [LAPTOP.id]
    assert_one_line_error(ff.err, "fast-forward", "nothing stored")
    assert all_rows(rich) == before
    # With --ref, the ref moves all the same.
    assert run(rich, "merge", "--ref", "main", ROOT.id, LAPTOP.id).lines == [LAPTOP.id]
    assert ref_show(run, rich)["target"] == LAPTOP.id


def test_two_nodes_moved_main_and_merge_ref_resolves_it(tmp_path, run):
    laptop, desktop = tmp_path / "laptop", tmp_path / "desktop"
    for h in (laptop, desktop):
        assert run(h, "init").code == 0
    push(run, laptop, tmp_path, ROOT, CHILD)
    assert run(laptop, "ref", "set", "main", CHILD.id).code == 0
    sync_stores(laptop, desktop)
    # Apart, each moves main forward.
    assert run(laptop, "push", "--ref", "main", str(_write(tmp_path / "l.jsonl", LAPTOP))).code == 0
    assert run(desktop, "push", "--ref", "main", str(_write(tmp_path / "d.jsonl", DESKTOP))).code == 0
    sync_stores(desktop, laptop)
    ref = ref_show(run, laptop)
    assert ref["conflict"] is True and set(ref["candidates"]) == {LAPTOP.id, DESKTOP.id}

    result = run(laptop, "merge", LAPTOP.id, DESKTOP.id, "--ref", "main")
    assert result.code == 0, result.err
    [merged] = result.lines
    ref = ref_show(run, laptop)
    assert ref["conflict"] is False and ref["target"] == merged
    assert {"Laptop fact", "Desktop fact"} <= contents(run, laptop, "main")
    assert run(laptop, "expand", "main").err == ""  # no conflict warning any more
    # The other node learns the merge and agrees.
    sync_stores(laptop, desktop)
    assert ref_show(run, desktop)["target"] == merged and ref_show(run, desktop)["conflict"] is False
    assert run(laptop, "fsck").code == 0


def test_merge_ref_refuses_to_drop_a_candidate(rich, run, tmp_path):
    third = ctx(CHILD.id, atom("Third fact", 0.2), message="third")
    push(run, rich, tmp_path, LAPTOP, DESKTOP, third)
    assert run(rich, "ref", "set", "main", third.id).code == 0
    before = all_rows(rich)
    result = run(rich, "merge", LAPTOP.id, DESKTOP.id, "--ref", "main")
    assert result.code == 1 and result.out == ""
    assert_one_line_error(result.err, "merge refused", third.id, "ctxfs ref set main")
    assert all_rows(rich) == before
    # Merged two at a time, the second step keeps all three.
    first = run(rich, "merge", LAPTOP.id, DESKTOP.id).lines[0]
    second = run(rich, "merge", first, third.id, "--ref", "main")
    assert second.code == 0, second.err
    assert ref_show(run, rich)["target"] == second.lines[0]
    assert {"Laptop fact", "Desktop fact", "Third fact"} <= contents(run, rich, "main")


def test_merge_bad_input_is_one_line_and_stores_nothing(rich, run):
    before = all_rows(rich)
    for args, needle in (
        (["merge", CHILD.id, "ef" * 32], "no context"),
        (["merge", "nosuchref", CHILD.id], "not a context id or ref name"),
        (["merge", ROOT.id, CHILD.id, "--ref", "a/../b"], "'..'"),
    ):
        result = run(rich, *args)
        assert result.code == 1 and result.out == "", args
        assert_one_line_error(result.err, needle)
    assert all_rows(rich) == before


def _write(path: Path, context) -> Path:
    return write(path, jsonl(context))
