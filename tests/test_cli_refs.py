"""Tests for `ctxfs ref ...`, `push --ref` and ref names where ids are taken,
without a daemon (straight into the store; tests/test_localapi_refs.py has
the same through a daemon)."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon import security
from sync.refs import make_update
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

SIBLING = ctx(ROOT.id, atom("A sibling of CHILD", 0.4), source="sibling")


def node_id(home: Path) -> str:
    return security.node_id(security.read_node_key(home / "node.key"))


def all_rows(home: Path) -> tuple[int, int]:
    db = sqlite3.connect(home / "store.db")
    try:
        return tuple(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("contexts", "ref_updates"))
    finally:
        db.close()


def show(run, home: Path, name: str = "main") -> dict:
    result = run(home, "ref", "show", name, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_set_show_list_log_delete(rich, run):
    assert run(rich, "ref", "list", "--json").out.strip() == "[]"
    assert run(rich, "ref", "set", "main", ROOT.id).code == 0
    assert run(rich, "ref", "set", "main", CHILD.id[:10]).code == 0  # a prefix is fine
    assert run(rich, "ref", "set", "projects/x", "main").code == 0  # so is another ref's name
    ref = show(run, rich)
    assert ref["name"] == "main" and ref["target"] == CHILD.id
    assert ref["conflict"] is False and ref["candidates"] == [CHILD.id]
    assert ref["node_id"] == node_id(rich)
    assert datetime.fromisoformat(ref["updated"]).tzinfo is not None
    listed = json.loads(run(rich, "ref", "list", "--json").out)
    assert [r["name"] for r in listed] == ["main", "projects/x"] and listed[0] == ref
    assert listed[1]["target"] == CHILD.id
    assert run(rich, "ref", "list").lines == [f"main {CHILD.id}", f"projects/x {CHILD.id}"]
    assert "target:   " + CHILD.id in run(rich, "ref", "show", "main").out

    log = json.loads(run(rich, "ref", "log", "main", "--json").out)
    assert [u["target"] for u in log] == [CHILD.id, ROOT.id]  # newest first
    assert log[0]["supersedes"] == [log[1]["id"]] and log[1]["supersedes"] == []
    assert {u["name"] for u in log} == {"main"} and {u["node_id"] for u in log} == {node_id(rich)}
    assert all(datetime.fromisoformat(u["time"]) for u in log)

    result = run(rich, "ref", "delete", "main")
    assert (result.code, result.err) == (0, "")
    assert [r["name"] for r in json.loads(run(rich, "ref", "list", "--json").out)] == ["projects/x"]
    assert_one_line_error(run(rich, "ref", "show", "main").err, "no ref main")
    log = json.loads(run(rich, "ref", "log", "main", "--json").out)
    assert log[0]["target"] is None and len(log) == 3  # the deletion is logged too
    assert run(rich, "fsck").code == 0


def test_a_ref_name_is_accepted_where_an_id_is(rich, run):
    assert run(rich, "ref", "set", "main", CHILD.id).code == 0
    for args in (["expand"], ["expand", "--json"], ["query", "--json"], ["log"]):
        assert run(rich, *args, "main").out == run(rich, *args, CHILD.id).out, args
    assert run(rich, "log", "--ids", "main").lines == [ROOT.id, CHILD.id]


def test_a_ref_named_like_a_prefix_wins_over_the_prefix(rich, run):
    prefix = ROOT.id[:6]
    assert run(rich, "ref", "set", prefix, CHILD.id).code == 0
    assert run(rich, "log", "--ids", prefix).lines == [ROOT.id, CHILD.id]  # the ref, not the prefix
    assert run(rich, "log", "--ids", ROOT.id[:7]).lines == [ROOT.id]


def test_prefixes_resolve_to_contexts_never_to_ref_updates(rich, run):
    assert run(rich, "ref", "set", "main", CHILD.id).code == 0
    [update] = json.loads(run(rich, "ref", "log", "main", "--json").out)
    result = run(rich, "expand", update["id"][:8])
    assert_one_line_error(result.err, "no context with id prefix")


def test_push_ref_fast_forward_refusal_and_force(home, tmp_path, run):
    first = run(home, "push", "--ref", "main", str(write(tmp_path / "a.jsonl", jsonl(ROOT))))
    assert first.lines == [ROOT.id] and show(run, home)["target"] == ROOT.id
    # A chain on top of the ref's target: a fast-forward.
    grand = ctx(CHILD.id, atom("Grandchild", 0.3))
    assert run(home, "push", "--ref", "main", str(write(tmp_path / "b.jsonl", jsonl(CHILD, grand)))).lines == [
        CHILD.id, grand.id]
    assert show(run, home)["target"] == grand.id
    # Not built on main's target: refused, nothing stored.
    before = all_rows(home)
    other = write(tmp_path / "c.jsonl", jsonl(SIBLING))
    result = run(home, "push", "--ref", "main", str(other))
    assert result.code == 1 and result.out == ""
    assert_one_line_error(result.err, SIBLING.id, grand.id, "--force")
    assert all_rows(home) == before and show(run, home)["target"] == grand.id
    # --force moves it anyway.
    assert run(home, "push", "--ref", "main", "--force", str(other)).lines == [SIBLING.id]
    assert show(run, home)["target"] == SIBLING.id
    assert run(home, "fsck").code == 0


def test_push_ref_with_a_bad_name_stores_nothing(home, tmp_path, run):
    result = run(home, "push", "--ref", "a..b/../c", str(write(tmp_path / "a.jsonl", jsonl(ROOT))))
    assert result.code == 1
    assert_one_line_error(result.err, "'..'")
    assert all_rows(home) == (0, 0)


def test_conflict_is_shown_and_commands_warn_on_stderr(rich, run):
    # Two writers that never saw each other: two updates superseding nothing.
    when = datetime(2026, 11, 24, 10, tzinfo=timezone.utc)
    early = make_update(name="main", target=ROOT.id, supersedes=(), key=Ed25519PrivateKey.generate(), time=when)
    late = make_update(name="main", target=CHILD.id, supersedes=(), key=Ed25519PrivateKey.generate(),
                       time=when + timedelta(seconds=1))
    store = SQLiteContextStore(rich / "store.db")
    store.put_ref_updates([early, late])
    store.close()

    ref = show(run, rich)
    assert ref["conflict"] is True and ref["candidates"] == sorted([ROOT.id, CHILD.id])
    assert ref["target"] == CHILD.id and ref["node_id"] == late.node_id  # the latest update wins
    result = run(rich, "expand", "main")
    assert result.out == run(rich, "expand", CHILD.id).out
    assert_one_line_error(result.err, "conflict", ROOT.id, CHILD.id, "ctxfs ref set main ID")
    assert "warning" in result.err

    # push --ref past one side of a conflict would drop the other: refused.
    on_root = ctx(ROOT.id, atom("Beside the child", 0.4))
    before = all_rows(rich)
    refused = run(rich, "push", "--ref", "main", str(write(rich.parent / "beside.jsonl", jsonl(on_root))))
    assert refused.code == 1 and refused.out == "" and all_rows(rich) == before
    assert_one_line_error(refused.err, "in conflict", CHILD.id, "ctxfs merge")
    assert show(run, rich)["conflict"] is True

    # A new set supersedes both: resolved.
    assert run(rich, "ref", "set", "main", ROOT.id).code == 0
    ref = show(run, rich)
    assert ref["conflict"] is False and ref["target"] == ROOT.id
    assert sorted(json.loads(run(rich, "ref", "log", "main", "--json").out)[0]["supersedes"]) == sorted(
        [early.id, late.id])
    assert run(rich, "expand", "main").err == ""


@pytest.mark.parametrize(
    "name, needle",
    [
        ("", "empty"),
        ("a/../b", "'..'"),
        ("/main", "'/'"),
        ("ma\x01in", "control character"),
        ("x" * 201, "201 bytes"),
        ("main~1", "reserved"),
        ("ab" * 32, "64 hex"),
    ],
    ids=["empty", "dotdot", "leading-slash", "control", "too-long", "reserved", "looks-like-an-id"],
)
def test_invalid_names_fail_with_one_line_and_change_nothing(rich, run, name, needle):
    before = all_rows(rich)
    for args in (["ref", "set", name, ROOT.id], ["ref", "show", name], ["ref", "log", name], ["ref", "delete", name]):
        result = run(rich, *args)
        assert result.code == 1 and result.out == "", args
        assert_one_line_error(result.err, needle)
    assert all_rows(rich) == before


def test_leading_dash_is_refused(rich, run):
    result = run(rich, "ref", "set", "--", "-main", ROOT.id)
    assert result.code == 1
    assert_one_line_error(result.err, "'-'")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["ref", "set", "main", "ef" * 32], "no context"),
        (["ref", "set", "main", "nosuchref"], "not a context id or ref name"),
        (["ref", "show", "nosuchref"], "no ref nosuchref"),
        (["ref", "log", "nosuchref"], "no ref nosuchref"),
        (["ref", "delete", "nosuchref"], "no ref nosuchref"),
        (["expand", "nosuchref"], "not a context id or ref name"),
    ],
)
def test_unknown_refs_and_targets_fail_with_one_line(rich, run, args, needle):
    result = run(rich, *args)
    assert result.code == 1 and result.out == ""
    assert_one_line_error(result.err, needle)
    assert all_rows(rich) == (2, 0)
