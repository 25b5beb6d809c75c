"""The README's Python client example, verbatim, against a live daemon; and
the client itself under asyncio and under trio (it is written with anyio).

The example is taken from README.md (the ```python block after "use the
Python client") and run as its own process with the venv's Python, as a
reader would run it, so a README that stops working fails here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import trio

from daemon.client import DaemonNotRunning, LocalApiError, LocalClient
from process_helpers import COMMAND_BOUND, Cluster, cluster  # noqa: F401  (cluster is a fixture)
from sync.codec import context_to_json
from sync.errors import ErrorCode
from node_helpers import context

README = Path(__file__).resolve().parent.parent / "README.md"
GUARD = 30  # a safety net against a hung test, not a timing assertion


def readme_client_example() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("use the Python client")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, "README.md has no ```python block after 'use the Python client'"
    return match.group(1)


def run_example(home: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "example.py"
    script.write_text(readme_client_example(), encoding="utf-8")
    env = dict(os.environ, CTXFS_HOME=str(home))  # as the README runs it
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=COMMAND_BOUND, env=env, cwd=tmp_path)


def test_the_readme_client_example_runs_verbatim(cluster: Cluster, tmp_path):
    daemon = cluster.daemon("a")
    for attempt in (1, 2):  # twice: a reader may run it again on the same home
        result = run_example(daemon.home, tmp_path)
        assert result.returncode == 0, f"run {attempt}: exit {result.returncode}\n{result.stderr}"
        lines = result.stdout.splitlines()
        assert len(lines) == 4, result.stdout
        assert lines[0] == "[String] User prefers Python"
        assert re.fullmatch(r"notes moved: [0-9a-f]{12} -> [0-9a-f]{12}", lines[1]), lines[1]
        assert lines[2:] == ["[String] User prefers Python", "[String] User works on sync daemons"]
    # The program really went through the daemon: the ref and both contexts are in its store.
    notes = json.loads(daemon.ctxfs("ref", "show", "notes", "--json").stdout)
    assert notes["target"].startswith(lines[1].rsplit(" ", 1)[1])
    shown = daemon.ctxfs("expand", "notes").stdout.splitlines()
    assert shown == lines[2:]


def test_the_readme_example_reports_a_missing_daemon(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    result = run_example(home, tmp_path)
    assert result.returncode != 0
    assert "DaemonNotRunning" in result.stderr


# ---------------------------------------------------------------- asyncio and trio


async def exercise(home: Path) -> list[str]:
    """Push (a dict and an object), resolve by prefix and ref name, expand,
    stream, query, watch: what every client program does, any event loop."""
    first = context("asyncio or trio")
    second = context("either loop", base=first.id, relevance=0.9)
    seen = []
    with anyio.fail_after(GUARD):
        async with LocalClient.connect(str(home)) as client:  # a str home
            ids = await client.push([context_to_json(first), second])  # a dict, then an object
            assert ids == [first.id, second.id]
            await client.ref_set("loop", first.id)
            assert await client.resolve(first.id[:6]) == first.id
            assert await client.resolve(first.id[:6].upper()) == first.id
            assert await client.resolve("loop") == first.id
            expanded = await client.expand(second.id[:10])
            seen += [a.content for a in expanded.atoms]
            assert [a.content for a in await client.query("loop", text="asyncio")] == ["asyncio or trio"]
            async with client.watch_refs(["loop"]) as changes:
                assert [r["target"] for r in changes.snapshot] == [first.id]
                await client.ref_set("loop", second.id)
                change = await changes.__anext__()
                assert (change.name, change.old, change.new) == ("loop", first.id, second.id)
            async with client.expand_stream("loop", chunk_size=1) as chunks:
                seen += [a.content async for chunk in chunks for a in chunk.atoms]
            with pytest.raises(LocalApiError) as info:
                await client.expand("0000")  # a prefix of no context
            assert info.value.code is ErrorCode.NOT_FOUND
            with pytest.raises(ValueError):
                await client.push([{"base_hash": "nope"}])  # not a context: DecodeError, nothing sent
            await client.ping()
            assert (await client.status())["node_id"]
    return seen


EXPECTED = ["either loop", "asyncio or trio", "either loop", "asyncio or trio"]


def test_the_client_works_under_asyncio(cluster: Cluster):
    daemon = cluster.daemon("a")
    assert asyncio.run(exercise(daemon.home)) == EXPECTED


def test_the_client_works_under_trio(cluster: Cluster):
    daemon = cluster.daemon("a")
    assert trio.run(exercise, daemon.home) == EXPECTED


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_no_daemon_is_daemon_not_running_under_either_loop(tmp_path, backend):
    async def connect() -> None:
        async with LocalClient.connect(tmp_path):
            pass

    with pytest.raises(DaemonNotRunning):
        anyio.run(connect, backend=backend)


def test_an_ambiguous_prefix_names_its_candidates(cluster: Cluster):
    daemon = cluster.daemon("a")
    seen: dict[str, object] = {}
    for i in range(100_000):  # two contexts whose ids share 4 hex digits (~300 tries)
        c = context(f"fact {i}")
        if c.id[:4] in seen:
            pair = [seen[c.id[:4]], c]
            break
        seen[c.id[:4]] = c

    async def main() -> LocalApiError:
        async with LocalClient.connect(daemon.home) as client:
            await client.push(pair)
            assert await client.resolve(pair[1].id[:40]) == pair[1].id
            with pytest.raises(LocalApiError) as info:
                await client.resolve(pair[0].id[:4])
            return info.value

    error = asyncio.run(main())
    assert error.code is ErrorCode.BAD_REQUEST and "ambiguous" in error.message
    assert pair[0].id[:16] in error.message and pair[1].id[:16] in error.message
