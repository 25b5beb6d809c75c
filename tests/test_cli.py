"""Tests for daemon.cli: the `ctxfs` command contract of design.md.

Most tests call `daemon.cli.main` in-process against a home under tmp_path;
the `test_script_*` tests run the installed console script to prove the
entry point, its exit codes and its one-line stderr.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import sqlite3
import stat
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from daemon import cli, security
from sync.codec import atom_to_json, context_from_json, context_to_json, type_from_json
from sync.model import (
    T_INT,
    T_LIST,
    T_STRING,
    CompressedContext,
    MemoryAtom,
    estimate_tokens,
)

CTXFS = Path(sys.executable).parent / "ctxfs"
HEX = frozenset("0123456789abcdef")
T0 = datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc)

# Copied verbatim from design.md, "Interchange JSON (what `push` reads)".
DESIGN_EXAMPLE = """\
{"base_hash": null,
 "delta_atoms": [{"content": "User prefers Python", "relevance_score": 0.9,
                  "type_sig": {"name": "String", "kind": "STAR", "parameters": [], "constraints": []},
                  "timestamp": "2026-11-24T10:00:00+00:00", "source_hash": "conv_001"}],
 "delta_molecules": [{"atoms": [], "relations": {"supports": [[0, 1]]},
                      "molecule_type": {"name": "Context", "kind": "CONTEXT", "parameters": [], "constraints": []},
                      "metadata": {}}],
 "removed_hashes": [],
 "compression_metadata": {"source": "initial"}}
"""

# What every command prints for an atom: its hash and its interchange-JSON fields.
ATOM_KEYS = {"hash", "content", "type_sig", "timestamp", "source_hash", "relevance_score"}

# A longer error line than this is not "one clear line".
MAX_ERROR_LINE = 400


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code = code
        self.out = out
        self.err = err

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


@pytest.fixture(autouse=True)
def _no_ambient_home(monkeypatch):
    monkeypatch.delenv("CTXFS_HOME", raising=False)


@pytest.fixture
def run(capsys):
    """run(home, *args, stdin=bytes|None) -> Result, calling cli.main in-process."""

    def call(home: Path | None, *args: str, stdin: bytes | None = None) -> Result:
        argv = ([] if home is None else ["--home", str(home)]) + list(args)
        out = io.StringIO()
        capsys.readouterr()
        saved = sys.stdin
        if stdin is not None:
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        try:
            code = cli.main(argv, out=out)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        finally:
            sys.stdin = saved
        return Result(code, out.getvalue(), capsys.readouterr().err)

    return call


def script(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CTXFS_HOME"}
    return subprocess.run(
        [str(CTXFS), *args], input=input, capture_output=True, timeout=60, env=env
    )


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err[:2000]!r}"
    assert lines[0].startswith("ctxfs: "), lines[0]
    assert len(lines[0]) <= MAX_ERROR_LINE, f"error line is {len(lines[0])} characters: {lines[0][:300]!r}..."
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def rows(home: Path) -> list[tuple[bytes, bytes]]:
    """Every stored (id, data) row, read straight from SQLite."""
    db = sqlite3.connect(home / "store.db")
    try:
        return db.execute("SELECT id, data FROM contexts ORDER BY id").fetchall()
    finally:
        db.close()


def printed(atom_json: dict) -> str:
    """An atom's type as the text output prints it, from its JSON."""
    return str(type_from_json(atom_json["type_sig"], "type_sig"))


def atom(content: str, relevance: float, type_sig=T_STRING, source: str = "test") -> MemoryAtom:
    return MemoryAtom(content, type_sig, T0, source, relevance)


def ctx(base: str | None, *atoms: MemoryAtom, removed=(), **metadata) -> CompressedContext:
    return CompressedContext(base, atoms, (), frozenset(removed), metadata)


def jsonl(*contexts: CompressedContext) -> str:
    return "".join(json.dumps(context_to_json(c)) + "\n" for c in contexts)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def home(tmp_path, run) -> Path:
    """An initialised, empty node home."""
    h = tmp_path / "node"
    assert run(h, "init").code == 0
    return h


def push(run, home: Path, tmp_path: Path, *contexts: CompressedContext) -> list[str]:
    path = write(tmp_path / f"push-{secrets.token_hex(4)}.jsonl", jsonl(*contexts))
    result = run(home, "push", str(path))
    assert result.code == 0, result.err
    assert result.lines == [c.id for c in contexts]
    return result.lines


# A root and one delta over it: six live atoms of three types.
ROOT = ctx(
    None,
    atom("User prefers Python", 0.9),
    atom("Project uses trio for concurrency", 0.5),
    atom("42", 0.7, T_INT),
    atom("Likes short answers", 0.2),
    atom("[1, 2, 3]", 0.6, T_LIST(T_INT)),
    source="root",
)
CHILD = ctx(ROOT.id, atom("Deadline is Friday", 0.95), source="child")
EXPECTED_ORDER = [
    "[String] Deadline is Friday",
    "[String] User prefers Python",
    "[Int] 42",
    "[List[Int]] [1, 2, 3]",
    "[String] Project uses trio for concurrency",
    "[String] Likes short answers",
]


@pytest.fixture
def rich(home, tmp_path, run) -> Path:
    push(run, home, tmp_path, ROOT, CHILD)
    return home


# --------------------------------------------------------------------------
# init, cluster-key, home resolution
# --------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_home_store_and_private_keys(tmp_path, run):
    h = tmp_path / "fresh" / "node"
    result = run(h, "init")
    assert result.code == 0, result.err
    assert len(result.lines) == 1
    node_id = result.lines[0]
    assert len(node_id) == 64 and HEX.issuperset(node_id)
    assert (h / "store.db").is_file()
    assert _mode(h) == 0o700
    assert _mode(h / "cluster.key") == 0o600
    assert _mode(h / "node.key") == 0o600
    # The printed id is the id of the key on disk, not some other value.
    assert node_id == security.node_id(security.read_node_key(h / "node.key"))
    assert len(security.read_cluster_key(h / "cluster.key")) == security.CLUSTER_KEY_BYTES


def test_init_is_safe_to_repeat(home, run):
    first_id = security.node_id(security.read_node_key(home / "node.key"))
    cluster = (home / "cluster.key").read_bytes()
    node = (home / "node.key").read_bytes()
    again = run(home, "init")
    assert again.code == 0, again.err
    assert again.lines == [first_id]
    assert (home / "cluster.key").read_bytes() == cluster
    assert (home / "node.key").read_bytes() == node


def test_init_with_key_file_joins_that_cluster(tmp_path, run):
    key_text = base64.b64encode(secrets.token_bytes(32)).decode()
    key_file = write(tmp_path / "cluster.txt", key_text + "\n")
    ids = []
    for name in ("a", "b"):
        result = run(tmp_path / name, "init", "--cluster-key-file", str(key_file))
        assert result.code == 0, result.err
        ids.append(result.lines[0])
        shown = run(tmp_path / name, "cluster-key")
        assert shown.code == 0, shown.err
        assert shown.lines == [key_text]
        assert _mode(tmp_path / name / "cluster.key") == 0o600
    assert ids[0] != ids[1], "two nodes of one cluster must have distinct node ids"
    # Repeating init with the same key file is fine.
    assert run(tmp_path / "a", "init", "--cluster-key-file", str(key_file)).lines == [ids[0]]


def test_init_with_another_clusters_key_leaves_the_home_alone(home, tmp_path, run):
    held = (home / "cluster.key").read_bytes()
    other = write(tmp_path / "other.key", base64.b64encode(secrets.token_bytes(32)).decode())
    result = run(home, "init", "--cluster-key-file", str(other))
    assert result.code == 1
    assert result.out == ""
    assert_one_line_error(result.err, str(home))
    assert (home / "cluster.key").read_bytes() == held
    assert run(home, "cluster-key").lines == [held.decode().strip()]


@pytest.mark.parametrize(
    "content, needle",
    [
        ("this is not base64 at all!", "base64"),
        (base64.b64encode(b"\x01" * 16).decode(), "32 bytes"),
        ("", "32 bytes"),
        (None, "cannot read"),
    ],
    ids=["not-base64", "16-bytes", "empty", "missing-file"],
)
def test_init_with_malformed_key_file_fails_clearly(tmp_path, run, content, needle):
    key_file = tmp_path / "bad.key"
    if content is not None:
        write(key_file, content)
    h = tmp_path / "node"
    result = run(h, "init", "--cluster-key-file", str(key_file))
    assert result.code == 1
    assert_one_line_error(result.err, needle)
    assert not (h / "cluster.key").exists()
    assert not (h / "store.db").exists()


def test_ctxfs_home_env_is_used_without_home_flag(tmp_path, run, monkeypatch):
    env_home = tmp_path / "from-env"
    monkeypatch.setenv("CTXFS_HOME", str(env_home))
    result = run(None, "init")
    assert result.code == 0, result.err
    assert (env_home / "store.db").exists()
    assert result.lines == [security.node_id(security.read_node_key(env_home / "node.key"))]
    assert run(None, "heads").code == 0
    # --home still wins over the environment.
    flag_home = tmp_path / "from-flag"
    assert run(flag_home, "init").code == 0
    assert (flag_home / "node.key").exists()
    assert run(None, "init").lines == result.lines


def test_home_may_follow_the_command(tmp_path, run, monkeypatch):
    monkeypatch.setenv("CTXFS_HOME", str(tmp_path / "from-env"))
    h = tmp_path / "after"
    init = run(None, "init", "--home", str(h))
    assert init.code == 0, init.err
    assert (h / "store.db").exists() and not (tmp_path / "from-env").exists()
    payload = write(tmp_path / "ex.json", DESIGN_EXAMPLE)
    (cid,) = run(None, "push", str(payload), "--home", str(h)).lines
    assert run(None, "expand", cid, "--home", str(h)).lines == ["[String] User prefers Python"]
    assert run(None, "ref", "set", "--home", str(h), "main", cid).code == 0  # a nested command too
    assert [r["target"] for r in json.loads(run(None, "ref", "list", "--home", str(h), "--json").out)] == [cid]
    # Given twice, the later one wins.
    assert run(tmp_path / "elsewhere", "heads", "--ids", "--home", str(h)).lines == [cid]
    assert not (tmp_path / "elsewhere").exists()


def test_version(run):
    from importlib.metadata import version

    assert run(None, "--version").code == 0
    shown = script("--version")
    assert shown.returncode == 0
    assert shown.stdout.decode() == f"ctxfs {version('ctxfs')}\n"


@pytest.mark.parametrize(
    "args",
    [
        ["cluster-key"],
        ["push", "PUSHFILE"],
        ["expand", "ab" * 32],
        ["query", "ab" * 32],
        ["log", "ab" * 32],
        ["heads"],
        ["fsck"],
    ],
    ids=lambda a: a[0],
)
def test_commands_on_uninitialised_home_say_run_init(tmp_path, run, args):
    payload = write(tmp_path / "in.json", DESIGN_EXAMPLE)
    args = [str(payload) if a == "PUSHFILE" else a for a in args]
    h = tmp_path / "never-initialised"
    result = run(h, *args)
    assert result.code == 1
    assert result.out == ""
    assert_one_line_error(result.err, "ctxfs init")
    assert not (h / "store.db").exists(), "a failed command must not create a store"


# --------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------


def test_push_design_example_prints_its_id(home, tmp_path, run):
    expected = context_from_json(json.loads(DESIGN_EXAMPLE))
    result = run(home, "push", str(write(tmp_path / "ex.json", DESIGN_EXAMPLE)))
    assert result.code == 0, result.err
    assert result.lines == [expected.id]
    assert len(rows(home)) == 1
    assert run(home, "heads", "--ids").lines == [expected.id]
    assert run(home, "expand", expected.id).lines == ["[String] User prefers Python"]
    # Pushing it again is harmless and prints the same id.
    again = run(home, "push", str(tmp_path / "ex.json"))
    assert again.lines == [expected.id]
    assert len(rows(home)) == 1


def test_push_json_lines_prints_ids_in_order(home, tmp_path, run):
    a = ctx(None, atom("first", 0.5))
    b = ctx(a.id, atom("second", 0.6))
    c = ctx(b.id, atom("third", 0.7))
    result = run(home, "push", str(write(tmp_path / "chain.jsonl", jsonl(a, b, c))))
    assert result.code == 0, result.err
    assert result.lines == [a.id, b.id, c.id]
    assert run(home, "log", "--ids", c.id).lines == [a.id, b.id, c.id]
    assert run(home, "expand", c.id).lines == ["[String] third", "[String] second", "[String] first"]


@pytest.mark.parametrize(
    "bad_line",
    [
        '{"base_hash": null, "delta_atoms": [',
        json.dumps({"delta_atoms": [{"content": "x", "relevance_score": "0.9", "timestamp": T0.isoformat(),
                                     "source_hash": "s", "type_sig": {"name": "String", "kind": "STAR"}}]}),
        json.dumps({"base_hash": None, "colour": "blue"}),
        "[]",
    ],
    ids=["truncated-json", "relevance-as-string", "unknown-field", "array"],
)
def test_push_json_lines_with_one_bad_line_stores_nothing(home, tmp_path, run, bad_line):
    push(run, home, tmp_path, ROOT)
    before, heads_before = rows(home), run(home, "heads").lines
    a = ctx(ROOT.id, atom("fine", 0.5))
    c = ctx(a.id, atom("also fine", 0.5))
    text = jsonl(a) + bad_line + "\n" + jsonl(c)
    result = run(home, "push", str(write(tmp_path / "bad.jsonl", text)))
    assert result.code == 1
    assert result.out == ""
    assert_one_line_error(result.err, "line 2")
    assert rows(home) == before
    assert run(home, "heads").lines == heads_before


def test_push_json_lines_unknown_base_names_the_line(home, tmp_path, run):
    a = ctx(None, atom("fine", 0.5))
    orphan = ctx("cd" * 32, atom("orphan", 0.5))
    result = run(home, "push", str(write(tmp_path / "orphan.jsonl", jsonl(a, orphan))))
    assert result.code == 1
    assert rows(home) == []
    # The user wrote lines, not ids: the message should say which line.
    assert_one_line_error(result.err, "cd" * 32, "line 2")


def test_push_json_array_prints_ids_in_order(home, tmp_path, run):
    a = ctx(None, atom("first", 0.5))
    b = ctx(a.id, atom("second", 0.6))
    text = json.dumps([context_to_json(a), context_to_json(b)], indent=2)  # as people write arrays
    result = run(home, "push", str(write(tmp_path / "chain.json", text)))
    assert result.code == 0, result.err
    assert result.lines == [a.id, b.id]
    assert run(home, "log", "--ids", b.id).lines == [a.id, b.id]
    # The design example, wrapped in an array, is the same one context.
    wrapped = run(home, "push", "-", stdin=("[" + DESIGN_EXAMPLE + "]").encode())
    assert wrapped.lines == [context_from_json(json.loads(DESIGN_EXAMPLE)).id]


@pytest.mark.parametrize(
    "second, needle",
    [
        ({"base_hash": "cd" * 32}, "item 2: context "),
        ({"delta_atoms": "no"}, "item 2: delta_atoms: expected an array"),
        ([], "item 2: context: expected an object, got an array"),
    ],
    ids=["unknown-base", "bad-field", "nested-array"],
)
def test_push_json_array_with_one_bad_item_stores_nothing(home, tmp_path, run, second, needle):
    first = context_to_json(ctx(None, atom("fine", 0.5)))
    result = run(home, "push", str(write(tmp_path / "bad.json", json.dumps([first, second]))))
    assert result.code == 1
    assert result.out == ""
    assert_one_line_error(result.err, needle)
    assert rows(home) == []


def test_push_from_stdin(home, run):
    for args in (["push", "-"], ["push"]):
        result = run(home, *args, stdin=DESIGN_EXAMPLE.encode())
        assert result.code == 0, result.err
        assert result.lines == [context_from_json(json.loads(DESIGN_EXAMPLE)).id]
    lines = jsonl(ROOT, CHILD).encode()
    result = run(home, "push", "-", stdin=lines)
    assert result.lines == [ROOT.id, CHILD.id]
    assert len(rows(home)) == 3


class _Terminal(io.TextIOWrapper):
    def isatty(self) -> bool:
        return True


def test_push_from_a_terminal_says_what_it_waits_for(home, run, monkeypatch):
    monkeypatch.setattr(sys, "stdin", _Terminal(io.BytesIO(DESIGN_EXAMPLE.encode()), encoding="utf-8"))
    result = run(home, "push")
    assert result.code == 0, result.err
    assert result.lines == [context_from_json(json.loads(DESIGN_EXAMPLE)).id]
    assert result.err == ("ctxfs: reading contexts from the terminal (a JSON object, an array, or JSON Lines); "
                          "end with Ctrl-D, or give a FILE\n")
    # Piped input (no terminal) gets no hint.
    assert run(home, "push", stdin=DESIGN_EXAMPLE.encode()).err == ""


def test_script_push_on_a_real_terminal_prints_the_hint_first(tmp_path):
    import pty
    import select

    h = str(tmp_path / "node")
    assert script("--home", h, "init").returncode == 0
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "CTXFS_HOME"}
    proc = subprocess.Popen([str(CTXFS), "--home", h, "push"], stdin=follower, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    os.close(follower)
    try:
        # The hint comes before any input: the command does not sit silent.
        # (60 s is a guard against a hung test, not a timing assertion.)
        assert select.select([proc.stderr], [], [], 60)[0], "no word on stderr while waiting for the terminal"
        hint = proc.stderr.readline().decode()
        assert hint.startswith("ctxfs: reading contexts from the terminal"), hint
        os.write(leader, json.dumps(json.loads(DESIGN_EXAMPLE)).encode() + b"\n\x04")  # Ctrl-D: end of input
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    assert proc.returncode == 0, err
    assert out.decode().split() == [context_from_json(json.loads(DESIGN_EXAMPLE)).id]


def _example(**changes) -> str:
    doc = json.loads(DESIGN_EXAMPLE)
    for path, value in changes.items():
        target = doc
        keys = path.split("__")
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        last = keys[-1]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return json.dumps(doc)


BAD_INPUTS = {
    "unparsable": ('{"base_hash": null, "delta_atoms": [}', "not JSON"),
    "empty-array": ("[]", "input holds no context"),
    "array-of-non-objects": ("[1, 2]", "item 1: context: expected an object"),
    "relevance-string": (_example(delta_atoms__0__relevance_score="0.9"), "relevance_score"),
    "content-number": (_example(delta_atoms__0__content=42), "content"),
    "unknown-base": (_example(base_hash="ef" * 32), "ef" * 32),
    "malformed-base": (_example(base_hash="not-an-id"), "base_hash"),
    "uppercase-base": (_example(base_hash="AB" * 32), "base_hash"),
    "malformed-removed": (_example(removed_hashes=["12345"]), "removed_hashes"),
    "unknown-kind": (_example(delta_atoms__0__type_sig__kind="SQUARE"), "kind"),
    "unknown-field": (_example(colour="blue"), "colour"),
    "empty": ("", ""),
    "whitespace-only": ("  \n\n", ""),
    "bad-timestamp": (_example(delta_atoms__0__timestamp="yesterday"), "timestamp"),
    "relevance-nan": (_example(delta_atoms__0__relevance_score=float("nan")), "relevance"),
    "relevance-bool": (_example(delta_atoms__0__relevance_score=True), "relevance_score"),
    "missing-content": (json.dumps({"delta_atoms": [{"type_sig": {"name": "String", "kind": "STAR"},
                                                     "timestamp": T0.isoformat(), "source_hash": "s"}]}), "content"),
    # What the model says no one should write (model.check_new_context).
    "empty-object": ("{}", "a root context (base_hash null) must add at least one atom or molecule"),
    "root-of-metadata-only": ('{"compression_metadata": {"source": "x"}}', "must add at least one atom"),
    "root-that-removes": (_example(removed_hashes=["ab" * 32]), "removed_hashes: a root context"),
    "relevance-1.5": (_example(delta_atoms__0__relevance_score=1.5),
                      "delta_atoms[0].relevance_score: must be between 0 and 1, got 1.5"),
    "relevance-negative": (_example(delta_atoms__0__relevance_score=-0.5), "delta_atoms[0].relevance_score"),
}


@pytest.mark.parametrize("text, needle", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_push_bad_input_fails_with_one_line_and_changes_nothing(home, tmp_path, run, text, needle):
    push(run, home, tmp_path, ROOT)
    before = rows(home)
    result = run(home, "push", str(write(tmp_path / "bad.json", text)))
    assert result.code == 1
    assert result.out == ""
    assert_one_line_error(result.err, needle)
    assert rows(home) == before


def _nested_type(depth: int) -> str:
    sig = '{"name": "String", "kind": "STAR", "parameters": [], "constraints": []}'
    for _ in range(depth):
        sig = '{"name": "List", "kind": "ARROW", "parameters": [%s], "constraints": []}' % sig
    return sig


# Inputs a careless or hostile producer can send. Each must be refused like
# any other bad input: one line, exit 1, store untouched, no traceback.
HOSTILE_INPUTS = {
    # JSON allows arbitrarily large integers; float() of one overflows.
    "relevance-huge-integer": _example(delta_atoms__0__relevance_score=10**400),
    # A valid ISO-8601 time whose UTC equivalent is outside datetime's range.
    "timestamp-out-of-range": _example(delta_atoms__0__timestamp="0001-01-01T00:00:00+01:00"),
    "timestamp-out-of-range-high": _example(delta_atoms__0__timestamp="9999-12-31T23:59:59-01:00"),
    # Relation indices are integers; this one does not fit MessagePack's 64 bits.
    "relation-index-beyond-64-bits": _example(delta_molecules__0__relations={"supports": [[0, 2**70]]}),
    # JSON "\ud800" is a lone surrogate: valid JSON, not encodable as UTF-8.
    "lone-surrogate-in-content": DESIGN_EXAMPLE.replace("User prefers Python", "\\ud800"),
    "lone-surrogate-in-source": DESIGN_EXAMPLE.replace("conv_001", "\\udfff"),
    "lone-surrogate-in-metadata-key": DESIGN_EXAMPLE.replace('"source": "initial"', '"\\ud800": 1'),
    # Nesting deeper than the JSON parser's recursion limit.
    "deeply-nested-json": '{"compression_metadata": {"x": ' + "[" * 50_000 + "]" * 50_000 + "}}",
    # A type nested past MAX_TYPE_DEPTH: refused, but the message must stay one readable line.
    "type-nested-too-deep": DESIGN_EXAMPLE.replace(
        '{"name": "String", "kind": "STAR", "parameters": [], "constraints": []}', _nested_type(60)
    ),
}


@pytest.mark.parametrize("text", HOSTILE_INPUTS.values(), ids=HOSTILE_INPUTS.keys())
def test_push_hostile_input_fails_with_one_line_and_changes_nothing(home, tmp_path, run, text):
    push(run, home, tmp_path, ROOT)
    before = rows(home)
    result = run(home, "push", str(write(tmp_path / "bad.json", text)))
    assert result.code == 1
    assert_one_line_error(result.err)
    assert rows(home) == before


def test_push_input_not_utf8_or_unreadable(home, tmp_path, run):
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"base_hash": null, "compression_metadata": {"x": "caf\xe9"}}')
    result = run(home, "push", str(bad))
    assert result.code == 1
    assert_one_line_error(result.err, "UTF-8")
    result = run(home, "push", str(tmp_path / "does-not-exist.json"))
    assert result.code == 1
    assert_one_line_error(result.err, "does-not-exist.json")
    result = run(home, "push", str(tmp_path))
    assert result.code == 1
    assert_one_line_error(result.err)
    assert rows(home) == []


# --------------------------------------------------------------------------
# expand
# --------------------------------------------------------------------------


def test_expand_text_is_type_and_content_most_relevant_first(rich, run):
    result = run(rich, "expand", CHILD.id)
    assert result.code == 0, result.err
    assert result.lines == EXPECTED_ORDER
    # The root alone lacks the child's atom.
    assert run(rich, "expand", ROOT.id).lines == EXPECTED_ORDER[1:]


def test_expand_json_shape_and_order(rich, run):
    result = run(rich, "expand", "--json", CHILD.id)
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert set(doc) >= {"id", "atoms", "molecules", "expansion_path", "total_tokens", "type_summary"}
    assert doc["id"] == CHILD.id
    assert doc["expansion_path"] == [ROOT.id, CHILD.id]
    atoms = doc["atoms"]
    assert len(atoms) == 6
    for a in atoms:
        assert set(a) == ATOM_KEYS
        assert len(a["hash"]) == 64 and HEX.issuperset(a["hash"])
        assert a["source_hash"] == "test"
        assert datetime.fromisoformat(a["timestamp"]) == T0
    relevances = [a["relevance_score"] for a in atoms]
    assert relevances == sorted(relevances, reverse=True)
    assert [f"[{printed(a)}] {a['content']}" for a in atoms] == EXPECTED_ORDER
    by_content = {a.content: a for a in ROOT.delta_atoms + CHILD.delta_atoms}
    assert all(a["hash"] == by_content[a["content"]].content_hash for a in atoms)
    assert doc["total_tokens"] == sum(estimate_tokens(a["content"]) for a in atoms)
    assert doc["type_summary"] == {"String": 4, "Int": 1, "List[Int]": 1}
    assert doc["molecules"] == []


def test_every_command_prints_atoms_in_one_vocabulary(rich, run):
    # The model's field names (those push reads) plus the atom's hash, in
    # expand --json, expand --stream --json, query --json and show --json.
    atoms = ROOT.delta_atoms + CHILD.delta_atoms
    expected = {a.content_hash: {"hash": a.content_hash, **atom_to_json(a)} for a in atoms}
    printed_by = {
        "expand --json": json.loads(run(rich, "expand", "--json", CHILD.id).out)["atoms"],
        "expand --stream --json": [a for line in run(rich, "expand", "--stream", "--json", CHILD.id).lines
                                   for a in json.loads(line)["atoms"]],
        "query --json": json.loads(run(rich, "query", "--json", CHILD.id).out),
        "show --json": json.loads(run(rich, "show", "--json", ROOT.id).out)["atoms_added"],
    }
    for command, atoms in printed_by.items():
        assert atoms, command
        assert all(a == expected[a["hash"]] for a in atoms), command


def test_expand_json_keeps_molecules(home, tmp_path, run):
    cid = run(home, "push", str(write(tmp_path / "ex.json", DESIGN_EXAMPLE))).lines[0]
    doc = json.loads(run(home, "expand", "--json", cid).out)
    assert doc["molecules"] == json.loads(DESIGN_EXAMPLE)["delta_molecules"]


def test_expand_min_relevance_filters_and_recounts(rich, run):
    result = run(rich, "expand", "--json", "--min-relevance", "0.6", CHILD.id)
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert [a["content"] for a in doc["atoms"]] == ["Deadline is Friday", "User prefers Python", "42", "[1, 2, 3]"]
    assert all(a["relevance_score"] >= 0.6 for a in doc["atoms"])
    assert doc["type_summary"] == dict(Counter(printed(a) for a in doc["atoms"]))
    assert doc["type_summary"] == {"String": 2, "Int": 1, "List[Int]": 1}
    assert doc["total_tokens"] == sum(estimate_tokens(a["content"]) for a in doc["atoms"])
    text = run(rich, "expand", "--min-relevance", "0.6", CHILD.id)
    assert text.lines == EXPECTED_ORDER[:4]


def test_expand_max_tokens_limits_output(rich, run):
    # Token costs, most relevant first: 3, 3, 1, 3, 6, 3.
    result = run(rich, "expand", "--max-tokens", "7", CHILD.id)
    assert result.code == 0, result.err
    assert result.lines == EXPECTED_ORDER[:3]
    doc = json.loads(run(rich, "expand", "--json", "--max-tokens", "7", CHILD.id).out)
    assert doc["total_tokens"] == 7
    assert len(doc["atoms"]) == 3
    assert doc["type_summary"] == {"String": 2, "Int": 1}


def test_expand_max_tokens_takes_the_most_relevant_atoms_that_fit(rich, run):
    # Costs 3, 3, 1, 3, 6, 3: within 5 the second atom no longer fits, "42" does.
    result = run(rich, "expand", "--max-tokens", "5", CHILD.id)
    assert result.code == 0, result.err
    assert result.lines == [EXPECTED_ORDER[0], EXPECTED_ORDER[2]]
    assert result.err == ""
    doc = json.loads(run(rich, "expand", "--json", "--max-tokens", "5", CHILD.id).out)
    assert [a["content"] for a in doc["atoms"]] == ["Deadline is Friday", "42"]
    assert doc["total_tokens"] == 4


def test_expand_max_tokens_that_nothing_fits_says_why(rich, run):
    # The two atoms at 0.9 and above take 3 tokens each.
    for args in (["expand"], ["expand", "--json"]):
        result = run(rich, *args, "--max-tokens", "2", "--min-relevance", "0.9", CHILD.id)
        assert result.code == 0, result.err
        assert result.err == "ctxfs: no atom fits in 2 tokens (the smallest takes 3); raise --max-tokens\n"
        if "--json" in args:
            assert json.loads(result.out)["atoms"] == []
        else:
            assert result.out == ""
    # Nothing to fit is no surprise: no note.
    empty = run(rich, "expand", "--max-tokens", "2", "--min-relevance", "0.99", CHILD.id)
    assert (empty.code, empty.out, empty.err) == (0, "", "")


@pytest.mark.parametrize("chunk_size, sizes", [(2, [2, 2, 2]), (4, [4, 2]), (10, [6])])
def test_expand_stream_json_chunks(rich, run, chunk_size, sizes):
    result = run(rich, "expand", "--stream", "--json", "--chunk-size", str(chunk_size), CHILD.id)
    assert result.code == 0, result.err
    chunks = [json.loads(line) for line in result.lines]
    assert [len(c["atoms"]) for c in chunks] == sizes
    for i, chunk in enumerate(chunks):
        assert set(chunk) == {"chunk_id", "atoms", "is_final", "cumulative_tokens", "progress"}
        assert chunk["chunk_id"] == i
        assert chunk["is_final"] is (i == len(chunks) - 1)
        for a in chunk["atoms"]:
            assert set(a) == ATOM_KEYS
    streamed = [a for c in chunks for a in c["atoms"]]
    full = json.loads(run(rich, "expand", "--json", CHILD.id).out)
    assert [a["hash"] for a in streamed] == [a["hash"] for a in full["atoms"]]
    assert [f"[{printed(a)}] {a['content']}" for a in streamed] == EXPECTED_ORDER
    assert streamed == full["atoms"]  # one vocabulary, one shape
    assert chunks[-1]["cumulative_tokens"] == full["total_tokens"]
    assert chunks[-1]["progress"] == 1.0
    progress = [c["progress"] for c in chunks]
    assert progress == sorted(progress)


def test_expand_chunk_size_without_stream_is_refused(rich, tmp_path, run):
    for args in (["expand"], ["expand", "--json"]):
        result = run(rich, *args, "--chunk-size", "2", CHILD.id)
        assert result.code == 1
        assert result.out == ""
        assert_one_line_error(result.err, "--chunk-size needs --stream")
    # The default chunk size is still ten atoms.
    (more,) = push(run, rich, tmp_path, ctx(CHILD.id, *(atom(f"extra {i}", 0.1) for i in range(12))))
    many = run(rich, "expand", "--stream", "--json", more)
    assert [len(json.loads(line)["atoms"]) for line in many.lines] == [10, 8]


def test_expand_stream_text_and_min_relevance(rich, run):
    result = run(rich, "expand", "--stream", "--chunk-size", "2", CHILD.id)
    assert result.code == 0, result.err
    assert result.lines == EXPECTED_ORDER
    result = run(rich, "expand", "--stream", "--json", "--min-relevance", "0.65", CHILD.id)
    chunks = [json.loads(line) for line in result.lines]
    assert [a["content"] for c in chunks for a in c["atoms"]] == ["Deadline is Friday", "User prefers Python", "42"]
    assert chunks[-1]["is_final"] is True


def test_id_prefix_works_for_expand_log_and_query(rich, run):
    prefix = CHILD.id[:8]
    assert run(rich, "expand", prefix).lines == EXPECTED_ORDER
    assert json.loads(run(rich, "expand", "--json", prefix.upper()).out)["id"] == CHILD.id
    assert run(rich, "log", "--ids", prefix).lines == [ROOT.id, CHILD.id]
    assert len(run(rich, "query", prefix).lines) == 6


@pytest.mark.parametrize(
    "given, needle",
    [
        ("ef" * 32, "ef" * 32),  # well-formed, not stored
        ("0000ffff", "0000ffff"),  # a prefix neither stored id has (ids are fixed by the content)
        ("xyz-not-an-id", "not a context id"),
        ("ab" * 33, "not a context id"),
        ("abc", "not a context id"),  # shorter than the minimum prefix
        ("", "not a context id"),
    ],
    ids=["unknown", "unknown-prefix", "garbage", "too-long", "short-prefix", "empty"],
)
def test_expand_bad_id_fails_with_one_line(rich, run, given, needle):
    for args in (["expand"], ["expand", "--json"], ["log"], ["query"]):
        result = run(rich, *args, given)
        assert result.code == 1, args
        assert result.out == ""
        assert_one_line_error(result.err, needle)


def test_ambiguous_prefix_is_refused(home, tmp_path, run):
    seen: dict[str, CompressedContext] = {}
    for i in range(100_000):
        c = ctx(None, atom(f"fact {i}", 0.5))
        twin = seen.setdefault(c.id[:4], c)
        if twin is not c:
            break
    push(run, home, tmp_path, twin, c)
    result = run(home, "expand", c.id[:4])
    assert result.code == 1
    # It names the candidates (as the daemon's RESOLVE does): the user picks one.
    assert_one_line_error(result.err, "ambiguous", twin.id[:16], c.id[:16], "give more digits")
    assert run(home, "expand", c.id[:12]).lines == [f"[String] {c.delta_atoms[0].content}"]


# --------------------------------------------------------------------------
# deltas that remove atoms
# --------------------------------------------------------------------------


def test_delta_removing_an_atom_hides_it(rich, tmp_path, run):
    doc = json.loads(run(rich, "expand", "--json", CHILD.id).out)
    victim = next(a for a in doc["atoms"] if a["content"] == "User prefers Python")
    delta = {"base_hash": CHILD.id, "delta_atoms": [], "delta_molecules": [],
             "removed_hashes": [victim["hash"]], "compression_metadata": {}}
    pushed = run(rich, "push", str(write(tmp_path / "rm.json", json.dumps(delta))))
    assert pushed.code == 0, pushed.err
    (removed_id,) = pushed.lines
    after = run(rich, "expand", removed_id)
    assert after.lines == [line for line in EXPECTED_ORDER if line != "[String] User prefers Python"]
    # Its parents still hold the atom.
    assert "[String] User prefers Python" in run(rich, "expand", CHILD.id).lines

    # Same delta without the removal: a different context, a different id.
    keep = dict(delta, removed_hashes=[])
    kept = run(rich, "push", str(write(tmp_path / "keep.json", json.dumps(keep))))
    assert kept.code == 0, kept.err
    assert kept.lines[0] != removed_id
    assert run(rich, "expand", kept.lines[0]).lines == EXPECTED_ORDER
    assert sorted(run(rich, "heads", "--ids").lines) == sorted([removed_id, kept.lines[0]])


def test_push_removing_an_atom_the_base_does_not_hold_is_refused(rich, tmp_path, run):
    before = rows(rich)
    never = atom("never stored", 0.5).content_hash
    bad = ctx(CHILD.id, removed=[never])
    result = run(rich, "push", str(write(tmp_path / "rm.json", jsonl(bad))))
    assert result.code == 1
    assert result.out == ""
    assert_one_line_error(result.err, f"context {bad.id} removes atom {never}, which its base {CHILD.id} does not hold")
    assert rows(rich) == before
    # An atom removed earlier in the same push is no longer held either.
    victim = ROOT.delta_atoms[0].content_hash
    first = ctx(CHILD.id, removed=[victim])
    again = ctx(first.id, atom("more", 0.5), removed=[victim])
    result = run(rich, "push", str(write(tmp_path / "twice.jsonl", jsonl(first, again))))
    assert result.code == 1
    assert_one_line_error(result.err, "line 2: ", f"removes atom {victim}")
    assert rows(rich) == before
    # Adding an atom and removing it further down the same push is fine.
    added = ctx(CHILD.id, atom("short-lived", 0.5))
    dropped = ctx(added.id, removed=[added.delta_atoms[0].content_hash])
    assert push(run, rich, tmp_path, added, dropped) == [added.id, dropped.id]
    assert run(rich, "expand", dropped.id).lines == EXPECTED_ORDER


# --------------------------------------------------------------------------
# log, heads, fsck
# --------------------------------------------------------------------------


def test_log_ids_prints_lineage_root_first(home, tmp_path, run):
    # `log --ids` keeps the output `log` had before it printed one line per
    # context newest first (tests/test_cli_history.py has that).
    a = ctx(None, atom("a", 0.1))
    b = ctx(a.id, atom("b", 0.2))
    c = ctx(b.id, atom("c", 0.3))
    push(run, home, tmp_path, a, b, c)
    assert run(home, "log", "--ids", c.id).lines == [a.id, b.id, c.id]
    assert run(home, "log", "--ids", b.id).lines == [a.id, b.id]
    assert run(home, "log", "--ids", a.id).lines == [a.id]
    assert run(home, "log", "--ids", "-n", "2", c.id).lines == [b.id, c.id]  # the newest two, root first


def test_heads_lists_every_tip(home, tmp_path, run):
    assert run(home, "heads", "--ids").lines == []
    left = ctx(ROOT.id, atom("left", 0.5))
    right = ctx(ROOT.id, atom("right", 0.5))
    push(run, home, tmp_path, ROOT)
    assert run(home, "heads", "--ids").lines == [ROOT.id]
    push(run, home, tmp_path, left, right)
    heads = run(home, "heads", "--ids")
    assert heads.code == 0
    assert sorted(heads.lines) == sorted([left.id, right.id])
    assert ROOT.id not in heads.lines


def test_fsck_passes_a_sound_store(rich, run):
    result = run(rich, "fsck")
    assert result.code == 0, result.out + result.err
    assert result.err == ""
    assert result.lines == ["fsck: 2 objects, all sound"]


def test_fsck_counts_in_words_that_agree(home, tmp_path, run):
    assert run(home, "fsck").lines == ["fsck: 0 objects, all sound"]
    push(run, home, tmp_path, ROOT)
    assert run(home, "fsck").lines == ["fsck: 1 object, all sound"]
    _corrupt_any(home, ROOT.id)
    assert run(home, "fsck").err == "fsck: 1 problem in 1 object\n"
    push(run, home, tmp_path, ctx(None, atom("another", 0.5)))
    assert run(home, "fsck").err == "fsck: 1 problem in 2 objects\n"


def _corrupt(home: Path, cid: str) -> None:
    db = sqlite3.connect(home / "store.db")
    try:
        (data,) = db.execute("SELECT data FROM contexts WHERE id = ?", (bytes.fromhex(cid),)).fetchone()
        # Flip the content of one atom: still valid MessagePack, wrong hash.
        altered = data.replace(b"Deadline", b"Deadlink")
        assert altered != data
        db.execute("UPDATE contexts SET data = ? WHERE id = ?", (altered, bytes.fromhex(cid)))
        db.commit()
    finally:
        db.close()


@pytest.mark.parametrize(
    "args",
    [
        ["expand", "CHILD"],
        ["expand", "--json", "CHILD"],
        ["expand", "--stream", "--json", "CHILD"],
        ["query", "CHILD"],
        ["show", "CHILD"],
        ["log", "CHILD"],
        ["heads"],
    ],
    ids=lambda a: " ".join(a),
)
def test_an_object_whose_bytes_do_not_match_its_id_is_never_served(rich, run, args):
    # Git checks hashes on read; so do we: a damaged row is named, not shown.
    _corrupt(rich, CHILD.id)
    before = rows(rich)
    result = run(rich, *[{"CHILD": CHILD.id, "ROOT": ROOT.id}.get(a, a) for a in args])
    assert result.code == 1
    assert result.out == ""
    assert_one_line_error(result.err, CHILD.id, "bytes do not match its id", "ctxfs fsck")
    assert "Deadlink" not in result.err
    assert rows(rich) == before
    # The sound part of the store is still served.
    assert run(rich, "expand", ROOT.id).lines == EXPECTED_ORDER[1:]


def _corrupt_any(home: Path, cid: str) -> None:
    """One byte more at the end of a stored context (no longer its id's bytes)."""
    db = sqlite3.connect(home / "store.db")
    try:
        with db:
            (data,) = db.execute("SELECT data FROM contexts WHERE id = ?", (bytes.fromhex(cid),)).fetchone()
            db.execute("UPDATE contexts SET data = ? WHERE id = ?", (data + b"\x00", bytes.fromhex(cid)))
    finally:
        db.close()


def test_fsck_names_an_altered_object(rich, run):
    _corrupt(rich, CHILD.id)
    result = run(rich, "fsck")
    assert result.code == 1
    assert CHILD.id in result.out
    assert ROOT.id not in result.out
    assert "Traceback" not in result.err
    assert "1 problem" in result.err


# --------------------------------------------------------------------------
# query
# --------------------------------------------------------------------------


def test_query_by_type(rich, run):
    result = run(rich, "query", "--type", "String", CHILD.id)
    assert result.code == 0, result.err
    assert [line.split(" ", 1)[1] for line in result.lines] == [
        line for line in EXPECTED_ORDER if line.startswith("[String]")
    ]
    lists = run(rich, "query", "--type", "List[Int]", "--json", CHILD.id)
    assert [a["content"] for a in json.loads(lists.out)] == ["[1, 2, 3]"]
    assert json.loads(run(rich, "query", "--type", "Bool", "--json", CHILD.id).out) == []


def test_query_limit_min_relevance_and_json(rich, run):
    result = run(rich, "query", "--limit", "2", "--json", CHILD.id)
    assert result.code == 0, result.err
    hits = json.loads(result.out)
    assert isinstance(hits, list)
    assert [h["content"] for h in hits] == ["Deadline is Friday", "User prefers Python"]
    for h in hits:
        assert {"hash", "content", "type_sig", "timestamp", "source_hash", "relevance_score"} <= set(h)
        assert h["type_sig"]["name"] == "String"
    assert hits[0]["hash"] == CHILD.delta_atoms[0].content_hash
    filtered = json.loads(run(rich, "query", "--min-relevance", "0.65", "--json", CHILD.id).out)
    assert [h["relevance_score"] for h in filtered] == [0.95, 0.9, 0.7]
    text = run(rich, "query", "--min-relevance", "0.65", CHILD.id)
    assert text.lines[0] == "0.95 [String] Deadline is Friday"
    assert len(text.lines) == 3


def test_query_text(rich, run):
    result = run(rich, "query", "--text", "python deadlines", CHILD.id)
    assert result.code == 0, result.err
    assert result.lines == ["0.95 [String] Deadline is Friday", "0.90 [String] User prefers Python"]
    typed = run(rich, "query", "--text", "python trio", "--min-relevance", "0.6", "--json", CHILD.id)
    assert [h["content"] for h in json.loads(typed.out)] == ["User prefers Python"]
    assert run(rich, "query", "--text", "uses trio", "--limit", "1", CHILD.id).lines == [
        "0.50 [String] Project uses trio for concurrency"
    ]


@pytest.mark.parametrize("text", ['"', "*", "OR", "NEAR(", "'; DROP TABLE contexts; --"])
def test_query_text_is_never_fts_syntax(rich, run, text):
    result = run(rich, "query", "--text", text, "--json", CHILD.id)
    assert result.code == 0, result.err
    assert json.loads(result.out) == []


def test_query_blank_text_is_no_filter(rich, run):
    assert run(rich, "query", "--text", " ", CHILD.id).lines == run(rich, "query", CHILD.id).lines


def test_query_text_too_long_fails_clearly(rich, run):
    result = run(rich, "query", "--text", "x" * 5000, CHILD.id)
    assert result.code == 1
    assert_one_line_error(result.err, "--text")


def _drop_text_index(home: Path) -> None:
    db = sqlite3.connect(home / "store.db")
    try:
        db.execute("DROP TABLE atom_text")
        db.commit()
    finally:
        db.close()


def test_fsck_notes_a_missing_text_index_and_repair_rebuilds_it(rich, run):
    _drop_text_index(rich)
    noted = run(rich, "fsck")
    assert noted.code == 0, noted.err  # a missing derived index is no problem: it is rebuilt on use
    assert "full-text index is missing" in noted.out
    repaired = run(rich, "fsck", "--repair")
    assert repaired.code == 0, repaired.err
    assert repaired.lines[0] == "fsck: rebuilt the full-text index (6 atoms)"
    assert "all sound" in repaired.lines[-1]
    assert "full-text" not in run(rich, "fsck").out
    assert run(rich, "query", "--text", "friday", CHILD.id).lines == ["0.95 [String] Deadline is Friday"]


def test_fsck_is_silent_about_an_index_merely_behind_and_a_query_catches_it_up(rich, run):
    def marker() -> str:
        with sqlite3.connect(rich / "store.db") as db:
            return db.execute("SELECT value FROM meta WHERE key = 'fulltext'").fetchone()[0]

    assert marker() == "2 0"  # pushed straight into the store: nothing indexed yet
    assert run(rich, "fsck").lines == ["fsck: 2 objects, all sound"]
    assert run(rich, "query", "--text", "friday", CHILD.id).lines == ["0.95 [String] Deadline is Friday"]
    assert marker() == "2 2"


def test_fsck_repair_mends_the_atom_indexes_before_the_text_index_reads_them(rich, run):
    db = sqlite3.connect(rich / "store.db")
    try:  # ROOT given CHILD's atom index: it parses, and names the wrong atom
        db.execute("UPDATE contexts SET atom_index = (SELECT atom_index FROM contexts WHERE id = ?) WHERE id = ?",
                   (bytes.fromhex(CHILD.id), bytes.fromhex(ROOT.id)))
        db.commit()
    finally:
        db.close()
    repaired = run(rich, "fsck", "--repair")
    assert repaired.code == 0, repaired.err
    assert repaired.lines[:2] == ["fsck: rebuilt the atom index of 1 context(s)",
                                  "fsck: rebuilt the full-text index (6 atoms)"]
    assert run(rich, "query", "--text", "python", ROOT.id).lines == ["0.90 [String] User prefers Python"]
    assert run(rich, "query", "--text", "friday", CHILD.id).lines == ["0.95 [String] Deadline is Friday"]


def test_query_text_rebuilds_a_missing_index_on_first_use(rich, run):
    _drop_text_index(rich)
    assert run(rich, "query", "--text", "concurrency", CHILD.id).lines == [
        "0.50 [String] Project uses trio for concurrency"
    ]
    assert "full-text" not in run(rich, "fsck").out


@pytest.mark.parametrize("bad_type", ["List[", "]", "List[Int", "A B"])
def test_query_bad_type_fails_clearly(rich, run, bad_type):
    result = run(rich, "query", "--type", bad_type, CHILD.id)
    assert result.code == 1
    assert result.out == ""
    assert_one_line_error(result.err, "--type")


@pytest.mark.parametrize("limit", ["-1", "0", "two"])
def test_query_bad_limit_is_rejected(rich, run, limit):
    result = run(rich, "query", "--limit", limit, CHILD.id)
    assert result.code == 2
    assert result.out == ""
    assert "--limit" in result.err
    assert "Traceback" not in result.err


def test_negative_min_relevance_is_rejected(rich, run):
    for command in ("query", "expand"):
        result = run(rich, command, "--min-relevance", "-0.5", CHILD.id)
        assert result.code == 2
        assert "--min-relevance" in result.err


# --------------------------------------------------------------------------
# a deep chain
# --------------------------------------------------------------------------


def test_ten_thousand_deep_chain(home, tmp_path, run):
    depth = 10_000
    contexts = []
    base = None
    for i in range(depth):
        c = ctx(base, atom(f"fact {i}", 0.5))
        contexts.append(c)
        base = c.id
    pushed = run(home, "push", str(write(tmp_path / "deep.jsonl", jsonl(*contexts))))
    assert pushed.code == 0, pushed.err
    assert pushed.lines == [c.id for c in contexts]
    tip = contexts[-1].id

    log = run(home, "log", "--ids", tip)
    assert log.code == 0, log.err
    assert len(log.lines) == depth
    assert log.lines[0] == contexts[0].id and log.lines[-1] == tip
    newest = run(home, "log", "-n", "2", tip).lines
    assert [line.split()[0] for line in newest] == [tip[:12], contexts[-2].id[:12]]

    expanded = run(home, "expand", "--json", tip)
    assert expanded.code == 0, expanded.err
    doc = json.loads(expanded.out)
    assert len(doc["atoms"]) == depth
    assert len(doc["expansion_path"]) == depth
    # Equal relevance: lineage order, root's atom first.
    assert doc["atoms"][0]["content"] == "fact 0"
    assert doc["atoms"][-1]["content"] == f"fact {depth - 1}"

    assert run(home, "heads", "--ids").lines == [tip]
    assert run(home, "fsck").code == 0


# --------------------------------------------------------------------------
# the installed console script
# --------------------------------------------------------------------------


def test_script_init_push_expand(tmp_path):
    assert CTXFS.exists(), f"console script missing at {CTXFS}"
    h = str(tmp_path / "node")
    init = script("--home", h, "init")
    assert init.returncode == 0, init.stderr
    node_id = init.stdout.decode().strip()
    assert len(node_id) == 64 and HEX.issuperset(node_id)
    pushed = script("--home", h, "push", input=DESIGN_EXAMPLE.encode())
    assert pushed.returncode == 0, pushed.stderr
    (cid,) = pushed.stdout.decode().split()
    assert cid == context_from_json(json.loads(DESIGN_EXAMPLE)).id
    expanded = script("--home", h, "expand", cid[:8])
    assert expanded.returncode == 0, expanded.stderr
    assert expanded.stdout.decode() == "[String] User prefers Python\n"
    assert expanded.stderr == b""


def test_script_bad_input_exits_1_with_one_line(tmp_path):
    h = str(tmp_path / "node")
    assert script("--home", h, "init").returncode == 0
    for payload in (b"{not json", b"[]", _example(base_hash="ef" * 32).encode()):
        result = script("--home", h, "push", "-", input=payload)
        assert result.returncode == 1
        assert result.stdout == b""
        assert_one_line_error(result.stderr.decode())
    assert script("--home", h, "heads").stdout == b""


def test_script_uninitialised_home_exits_1(tmp_path):
    result = script("--home", str(tmp_path / "nothing-here"), "heads")
    assert result.returncode == 1
    assert_one_line_error(result.stderr.decode(), "ctxfs init")
    assert not (tmp_path / "nothing-here").exists()


def test_script_usage_error_exits_2(tmp_path):
    result = script("--home", str(tmp_path), "no-such-command")
    assert result.returncode == 2
    assert b"usage: ctxfs" in result.stderr


def test_script_fsck_exit_status(tmp_path):
    h = tmp_path / "node"
    assert script("--home", str(h), "init").returncode == 0
    pushed = script("--home", str(h), "push", input=jsonl(ROOT, CHILD).encode())
    assert pushed.stdout.decode().split() == [ROOT.id, CHILD.id]
    sound = script("--home", str(h), "fsck")
    assert sound.returncode == 0, sound.stdout + sound.stderr
    _corrupt(h, CHILD.id)
    broken = script("--home", str(h), "fsck")
    assert broken.returncode == 1
    assert CHILD.id in broken.stdout.decode()
    assert b"Traceback" not in broken.stderr


def test_script_home_that_is_a_file_fails_with_one_line(tmp_path):
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("I am not a directory\n")
    result = script("--home", str(not_a_dir), "init")
    assert result.returncode == 1
    assert_one_line_error(result.stderr.decode(), str(not_a_dir))
    assert not_a_dir.read_text() == "I am not a directory\n"


def test_fsck_names_a_wrong_atom_index_and_repair_rebuilds_it(rich, run):
    db = sqlite3.connect(rich / "store.db")
    try:
        db.execute("UPDATE contexts SET atom_index = NULL WHERE id = ?", (bytes.fromhex(CHILD.id),))
        db.commit()
    finally:
        db.close()
    named = run(rich, "fsck")
    assert named.code == 1
    assert [line.split(":")[0] for line in named.lines] == [CHILD.id]
    assert "atom index" in named.out and "--repair" in named.out
    repaired = run(rich, "fsck", "--repair")
    assert repaired.code == 0, repaired.err
    assert "fsck: rebuilt the atom index of 1 context(s)" in repaired.lines
    assert "all sound" in repaired.lines[-1]
    assert run(rich, "fsck").code == 0
