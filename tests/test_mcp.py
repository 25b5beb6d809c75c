"""`ctxfs mcp` driven by the official MCP SDK's own client over stdio.

Every test launches `<venv>/bin/ctxfs --home H mcp` as a real subprocess
through `mcp.Client(StdioServerParameters(...))`, under trio. Daemons, when
a test needs them, are real processes too (process_helpers.Cluster).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import mcp_types as types
import pytest
import trio
from mcp import Client, StdioServerParameters

from process_helpers import CTXFS, cluster, ctxfs  # noqa: F401  (cluster is a fixture)

# How long a notification may take to arrive: a bound against a hang only.
NOTIFY_BOUND = 20.0
TOOLS = {"remember", "forget", "recall", "context", "history", "refs", "sync_status"}


def server(home: Path, *extra: str) -> StdioServerParameters:
    return StdioServerParameters(command=str(CTXFS), args=["--home", str(home), "mcp", *extra])


@contextlib.asynccontextmanager
async def connect(home: Path, *extra: str, mode: str = "legacy", **kwargs):
    async with Client(server(home, *extra), mode=mode, read_timeout_seconds=60, **kwargs) as client:
        yield client


def text(result: types.CallToolResult) -> str:
    return result.content[0].text


def ok(result: types.CallToolResult) -> dict:
    assert not result.is_error, text(result)
    return json.loads(text(result))


def error(result: types.CallToolResult) -> str:
    assert result.is_error, text(result)
    return text(result)


def home_with_or_without_daemon(cluster, with_daemon: bool) -> Path:  # noqa: F811
    if with_daemon:
        return cluster.daemon("a").home
    return cluster.home("a")


# --------------------------------------------------------------------------


async def test_tools_are_listed_with_their_schemas(tmp_path):
    home = tmp_path / "h"
    ctxfs(home, "init")
    async with connect(home) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
    assert set(listed) == TOOLS
    for tool in listed.values():
        assert tool.description
        schema = tool.input_schema
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        for prop in schema["properties"].values():
            assert prop.get("description") or "anyOf" in prop.get("items", {}), tool.name
    remember = listed["remember"].input_schema
    assert remember["required"] == ["facts"]
    assert set(remember["properties"]) == {"facts", "ref", "message"}
    fact_object = remember["properties"]["facts"]["items"]["anyOf"][1]
    assert set(fact_object["properties"]) == {"content", "type", "relevance", "source"}
    assert fact_object["required"] == ["content"]
    assert listed["forget"].input_schema["required"] == ["atom_hashes"]
    assert set(listed["recall"].input_schema["properties"]) == {
        "text", "type", "min_relevance", "max_age_seconds", "limit", "ref"}
    assert set(listed["context"].input_schema["properties"]) == {"ref", "max_tokens"}
    assert set(listed["history"].input_schema["properties"]) == {"ref", "limit"}
    assert listed["refs"].input_schema["properties"] == {}
    assert listed["recall"].annotations.read_only_hint is True


@pytest.mark.parametrize("with_daemon", [False, True], ids=["offline", "daemon"])
async def test_remember_recall_context_forget(cluster, with_daemon):  # noqa: F811
    home = home_with_or_without_daemon(cluster, with_daemon)
    async with connect(home) as client:
        first = ok(await client.call_tool("remember", {
            "facts": ["User prefers Python",
                      {"content": "User works on sync daemons", "relevance": 0.7, "type": "Note", "source": "conv_1"}],
            "message": "what the user said"}))
        assert [a["content"] for a in first["remembered"]] == ["User prefers Python", "User works on sync daemons"]
        recalled = ok(await client.call_tool("recall", {}))
        assert recalled["context_id"] == first["context_id"]
        assert [(a["content"], a["relevance"]) for a in recalled["atoms"]] == [
            ("User prefers Python", 1.0), ("User works on sync daemons", 0.7)]
        notes = ok(await client.call_tool("recall", {"type": "Note", "min_relevance": 0.5}))
        assert [a["source"] for a in notes["atoms"]] == ["conv_1"]
        daemons = ok(await client.call_tool("recall", {"text": "daemons"}))
        assert [a["content"] for a in daemons["atoms"]] == ["User works on sync daemons"]
        assert ok(await client.call_tool("recall", {"text": "haskell"}))["atoms"] == []

        prompt = text(await client.call_tool("context", {}))
        assert prompt == "[String] User prefers Python\n[Note] User works on sync daemons"
        assert text(await client.call_tool("context", {"max_tokens": 4})) == "[String] User prefers Python"

        python = recalled["atoms"][0]["hash"]
        second = ok(await client.call_tool("forget", {"atom_hashes": [python], "message": "stale"}))
        assert [a["content"] for a in ok(await client.call_tool("recall", {}))["atoms"]] == [
            "User works on sync daemons"]
        history = ok(await client.call_tool("history", {}))
        assert [(c["id"], c["message"]) for c in history["contexts"]] == [
            (second["context_id"], "stale"), (first["context_id"], "what the user said")]
        assert ok(await client.call_tool("refs", {}))["refs"][0]["target"] == second["context_id"]
        status = ok(await client.call_tool("sync_status", {}))
        assert status["daemon"] is with_daemon
    # What the tools wrote is the ref the CLI reads.
    assert ctxfs(home, "expand", "main").stdout == "[Note] User works on sync daemons\n"


async def test_default_ref_and_the_resource(tmp_path):
    home = tmp_path / "h"
    ctxfs(home, "init")
    async with connect(home, "--ref", "projects/x") as client:
        ok(await client.call_tool("remember", {"facts": ["in x"]}))
        ok(await client.call_tool("remember", {"facts": ["in main"], "ref": "main"}))
        assert text(await client.call_tool("context", {})) == "[String] in x"
        resource = await client.read_resource("ctxfs://ref/main")
        assert resource.contents[0].text == "[String] in main"
        listed = {r.uri for r in (await client.list_resources()).resources}
        assert listed == {"ctxfs://ref/main", "ctxfs://ref/projects/x"}


async def test_bad_arguments_are_tool_errors_and_the_server_goes_on(tmp_path):
    home = tmp_path / "h"
    ctxfs(home, "init")
    async with connect(home) as client:
        assert "no ref main" in error(await client.call_tool("recall", {}))
        assert "facts" in error(await client.call_tool("remember", {}))
        assert "facts[0]" in error(await client.call_tool("remember", {"facts": [42]}))
        assert "facts[0].relevance" in error(await client.call_tool("remember", {
            "facts": [{"content": "x", "relevance": "high"}]}))
        assert "unknown field 'weight'" in error(await client.call_tool("remember", {
            "facts": [{"content": "x", "weight": 1}]}))
        assert "ref:" in error(await client.call_tool("remember", {"facts": ["x"], "ref": "bad name"}))
        assert "unknown argument 'colour'" in error(await client.call_tool("recall", {"colour": "red"}))
        assert "no tool 'teleport'" in error(await client.call_tool("teleport", {}))
        assert "limit" in error(await client.call_tool("recall", {"limit": 0}))
        assert "type" in error(await client.call_tool("recall", {"type": "List["}))
        assert "atom_hashes[0]" in error(await client.call_tool("forget", {"atom_hashes": ["abc"]}))
        ok(await client.call_tool("remember", {"facts": ["kept"]}))
        assert "holds no atom" in error(await client.call_tool("forget", {"atom_hashes": ["ab" * 32]}))
        assert "text:" in error(await client.call_tool("recall", {"text": 7}))
        # Still serving, and nothing above was stored.
        assert [a["content"] for a in ok(await client.call_tool("recall", {}))["atoms"]] == ["kept"]
        assert len(ok(await client.call_tool("history", {}))["contexts"]) == 1


async def test_a_write_to_a_ref_in_conflict_is_refused_with_its_candidates(tmp_path):
    home = tmp_path / "h"
    ctxfs(home, "init")
    first = ctxfs(home, "push", "--ref", "main", input=_context("one")).stdout.strip()
    second = ctxfs(home, "push", input=_context("two")).stdout.strip()
    # An update that supersedes nothing: a concurrent write, as from a peer.
    _concurrent_set(home, "main", second)
    async with connect(home) as client:
        refused = error(await client.call_tool("remember", {"facts": ["x"]}))
        assert "in conflict" in refused and first in refused and second in refused
        assert "in conflict" in ok(await client.call_tool("recall", {}))["warning"]


def _context(content: str) -> str:
    return json.dumps({"base_hash": None, "delta_atoms": [{
        "content": content, "relevance_score": 0.5,
        "type_sig": {"name": "String", "kind": "STAR", "parameters": [], "constraints": []},
        "timestamp": "2026-11-24T10:00:00+00:00", "source_hash": "t"}],
        "delta_molecules": [], "removed_hashes": [], "compression_metadata": {}})


def _concurrent_set(home: Path, name: str, target: str) -> None:
    from datetime import datetime, timezone

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sync import refs
    from sync.store import SQLiteContextStore

    store = SQLiteContextStore(home / "store.db")
    try:
        update = refs.make_update(name=name, target=target, supersedes=[], key=Ed25519PrivateKey.generate(),
                                  time=datetime.now(timezone.utc))
        store.put_ref_updates([update])
        assert store.ref_value(name).conflict
    finally:
        store.close()


# --------------------------------------------------------------------------
# subscriptions: a peer moves the ref


def _resource_updates(seen: list[str], arrived: trio.Event):
    async def handler(message) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            seen.append(message.params.uri)
            arrived.set()

    return handler


async def test_a_subscriber_hears_when_a_peer_moves_the_ref(cluster):  # noqa: F811
    a = cluster.daemon("a")
    b = cluster.daemon("b", peers=[a])
    seen: list[str] = []
    arrived = trio.Event()
    async with connect(a.home, message_handler=_resource_updates(seen, arrived)) as client:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # resources/subscribe: deprecated by the 2026 protocol only
            await client.subscribe_resource("ctxfs://ref/main")
            await client.subscribe_resource("ctxfs://ref/other")
        b.ctxfs("push", "--ref", "main", input=_context("pushed on b"))
        with trio.fail_after(NOTIFY_BOUND):
            await arrived.wait()
        assert seen[0] == "ctxfs://ref/main"
        resource = await client.read_resource("ctxfs://ref/main")
        assert resource.contents[0].text == "[String] pushed on b"


async def test_a_listen_stream_hears_a_local_write_of_another_process(tmp_path):
    """The 2026-07-28 way (subscriptions/listen), with no daemon: another
    MCP server process writes, this one finds the change in the store."""
    home = tmp_path / "h"
    ctxfs(home, "init")
    async with connect(home, mode="auto") as listener, connect(home) as writer:
        async with listener.listen(resource_subscriptions=["ctxfs://ref/main"]) as events:
            ok(await writer.call_tool("remember", {"facts": ["from the other process"]}))
            with trio.fail_after(NOTIFY_BOUND):
                event = await events.__anext__()
        assert event.uri == "ctxfs://ref/main"


# --------------------------------------------------------------------------
# concurrent writers


@pytest.mark.parametrize("with_daemon", [True, False], ids=["daemon", "offline"])
async def test_four_servers_remembering_at_once_lose_nothing(cluster, with_daemon):  # noqa: F811
    home = home_with_or_without_daemon(cluster, with_daemon)
    writers, facts = 4, 50

    async def write(w: int) -> None:
        async with connect(home) as client:
            for i in range(facts):
                ok(await client.call_tool("remember", {"facts": [f"writer {w} fact {i}"]}))

    async with trio.open_nursery() as nursery:
        for w in range(writers):
            nursery.start_soon(write, w)
    async with connect(home) as client:
        held = ok(await client.call_tool("recall", {"limit": 1000}))["atoms"]
        history = ok(await client.call_tool("history", {"limit": 1000}))["contexts"]
    assert sorted(a["content"] for a in held) == sorted(
        f"writer {w} fact {i}" for w in range(writers) for i in range(facts))
    assert len(history) == writers * facts  # one chain: every write built on the one before
    assert "conflict" not in ctxfs(home, "ref", "list").stdout


async def test_the_readme_mcp_configuration_starts_a_working_server(cluster):  # noqa: F811
    """The `mcpServers` block of README.md, as a user would paste it, with
    this checkout's `scripts/ctxfs` and a test home in place of the paths."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```json\n(\{\s*\"mcpServers\".*?)\n```", readme, re.S)
    assert block, "README.md has no mcpServers block"
    entry = json.loads(block.group(1))["mcpServers"]["ctxfs"]
    assert entry["command"].endswith("/scripts/ctxfs") and "mcp" in entry["args"]
    home = cluster.home("readme")
    home_at = entry["args"].index("--home") + 1
    assert entry["args"][home_at].endswith("/ctxfs")  # the default home's name
    args = [str(home) if i == home_at else arg for i, arg in enumerate(entry["args"])]
    script = Path(__file__).resolve().parent.parent / "scripts" / "ctxfs"
    params = StdioServerParameters(command=str(script), args=args)
    async with Client(params, mode="legacy", read_timeout_seconds=120) as client:
        assert TOOLS <= {tool.name for tool in (await client.list_tools()).tools}
        remembered = ok(await client.call_tool("remember", {"facts": ["configured from the README"]}))
        recalled = ok(await client.call_tool("recall", {"text": "README"}))
        assert [a["content"] for a in recalled["atoms"]] == ["configured from the README"]
        assert remembered
