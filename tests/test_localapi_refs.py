"""Refs through the local API: REF_SET and REFS_REQUEST against a real node
(in-process, real SQLite and Unix socket), the CLI through a running daemon,
and one test with two `ctxfs daemon` processes."""

from __future__ import annotations

import io
import json
import sys
import threading
from pathlib import Path

import pytest
import trio

from daemon import cli
from daemon.localapi import LocalApiError, LocalClient
from daemon.node import Node
from node_helpers import context, fast_config, make_home, start_node
from process_helpers import Cluster, cluster, wait_until  # noqa: F401  (cluster is a fixture)
from sync.codec import context_to_json
from sync.errors import ErrorCode
from sync.messages import Ack, RefSet, RefsRequest, RefsResponse

GUARD = 30  # a safety net against a hung test, not a timing assertion


async def test_the_client_takes_a_ref_name_wherever_it_takes_an_id(tmp_path):
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, tmp_path, "a")
        first = context("the value of main")
        await node.add_contexts([first])
        await node.set_ref("main", first.id)
        with trio.fail_after(GUARD):
            async with LocalClient.connect(node.paths) as client:
                assert await client.context_id("main") == bytes.fromhex(first.id)
                by_name, by_id = await client.expand("main"), await client.expand(first.id)
                assert by_name == by_id and by_name.atoms[0].content == "the value of main"
                assert await client.query("main") == list(by_id.atoms)
                assert [c.atoms async for c in client.expand_stream("main")] == [by_id.atoms]
                with pytest.raises(LocalApiError) as info:
                    await client.expand("nope")
                assert info.value.code is ErrorCode.NOT_FOUND
                with pytest.raises(ValueError):
                    await client.expand("a/../b")  # neither an id nor a valid ref name
        nursery.cancel_scope.cancel()


async def test_ref_round_trip_through_the_local_api(tmp_path):
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, tmp_path, "a")
        first, second = context("first"), context("second")
        await node.add_contexts([first, second])
        heard = []
        node.watch_refs(heard.append)
        with trio.fail_after(GUARD):
            async with LocalClient.connect(node.paths) as client:
                [uid] = await client.ref_set("main", first.id)
                assert heard == ["main"]  # written by the node, announced
                ref = await client.ref("main")
                assert ref["target"] == first.id and ref["conflict"] is False
                assert ref["candidates"] == [first.id] and ref["node_id"] == node.node_id
                [uid2] = await client.ref_set("main", second.id)
                assert await client.refs() == [await client.ref("main")]
                log = await client.ref_log("main")
                assert [u["id"] for u in log] == [uid2, uid] and log[0]["supersedes"] == [uid]

                # The server's own checks, whatever the client library does.
                with pytest.raises(LocalApiError) as info:
                    await client._call(RefSet(name="a/../b", target=bytes.fromhex(first.id)), Ack)
                assert info.value.code is ErrorCode.BAD_REQUEST
                with pytest.raises(LocalApiError) as info:
                    await client.ref_set("main", "ee" * 32)
                assert info.value.code is ErrorCode.MISSING_BASE
                with pytest.raises(LocalApiError) as info:
                    await client.ref("nope")
                assert info.value.code is ErrorCode.NOT_FOUND
                with pytest.raises(LocalApiError) as info:
                    await client.ref_delete("nope")
                assert info.value.code is ErrorCode.NOT_FOUND
                with pytest.raises(LocalApiError) as info:
                    await client._call(RefsRequest(log=True), RefsResponse)
                assert info.value.code is ErrorCode.BAD_REQUEST
                assert (await client.ref("main"))["target"] == second.id  # none of that changed it

                [deleted] = await client.ref_delete("main")
                assert await client.refs() == []
                assert (await client.ref_log("main"))[0] == {**(await client.ref_log("main"))[0], "id": deleted,
                                                             "target": None}
                assert await client.status()  # the connection is still fine
        assert await node.run_sync(lambda: list(node.store.fsck())) == []
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# the CLI through a running daemon (a real Node in a thread of its own)
# --------------------------------------------------------------------------


class NodeThread:
    def __init__(self, root: Path, name: str) -> None:
        self.paths, self.node_id = make_home(root, name)
        self.node = Node(paths=self.paths, config=fast_config(), node_id=self.node_id)
        self.heard: list[str] = []
        self._ready = threading.Event()
        self._token = None
        self._scope = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main():
            self._token = trio.lowlevel.current_trio_token()
            self.node.watch_refs(self.heard.append)
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.node.run)
                    self._ready.set()

        try:
            trio.run(main)
        except BaseException as exc:  # reported on exit
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> NodeThread:
        self._thread.start()
        assert self._ready.wait(GUARD)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc_info) -> None:
        if self._token is not None:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(GUARD)
        if self._error is not None:
            raise self._error


def ctxfs(home: Path, *args: str, stdin: str | None = None) -> tuple[int, str]:
    out = io.StringIO()
    saved = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8")
    try:
        return cli.main(["--home", str(home), *args], out=out), out.getvalue()
    finally:
        sys.stdin = saved


def jsonl(*contexts) -> str:
    return "".join(json.dumps(context_to_json(c)) + "\n" for c in contexts)


def test_cli_refs_go_through_the_daemon(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CTXFS_HOME", raising=False)
    base = context("base")
    child = context("child", base.id)
    other = context("other")
    with NodeThread(tmp_path, "a") as daemon:
        home = daemon.paths.root
        assert ctxfs(home, "push", "--ref", "main", "-", stdin=jsonl(base)) == (0, base.id + "\n")
        assert daemon.heard == ["main"]  # the daemon wrote it, not the CLI
        assert ctxfs(home, "push", "--ref", "main", "-", stdin=jsonl(child))[0] == 0
        capsys.readouterr()
        assert ctxfs(home, "push", "--ref", "main", "-", stdin=jsonl(other))[0] == 1
        assert "does not build on" in capsys.readouterr().err
        assert daemon.heard == ["main", "main"]
        assert ctxfs(home, "ref", "set", "side", base.id)[0] == 0
        code, out = ctxfs(home, "ref", "show", "main", "--json")
        through = json.loads(out)
        assert code == 0 and through["target"] == child.id and through["node_id"] == daemon.node_id
        listed = ctxfs(home, "ref", "list", "--json")[1]
        logged = ctxfs(home, "ref", "log", "main", "--json")[1]
        expanded = ctxfs(home, "expand", "main")[1]
        assert expanded.splitlines() == ["[String] base", "[String] child"]
        assert ctxfs(home, "ref", "delete", "side")[0] == 0
        assert daemon.heard == ["main", "main", "side", "side"]
    # Without the daemon: the very same answers from the store.
    assert ctxfs(home, "ref", "show", "main", "--json")[1] == out
    assert ctxfs(home, "ref", "log", "main", "--json")[1] == logged
    assert [r["name"] for r in json.loads(listed)] == ["main", "side"]
    assert [r["name"] for r in json.loads(ctxfs(home, "ref", "list", "--json")[1])] == ["main"]
    assert ctxfs(home, "fsck")[0] == 0


# --------------------------------------------------------------------------
# two daemon processes
# --------------------------------------------------------------------------


def test_a_ref_set_on_one_daemon_shows_on_its_peer(cluster: Cluster):
    a = cluster.daemon("a")
    b = cluster.daemon("b", peers=[a])
    ctx = context("shared main line")
    [cid] = a.ctxfs("push", "-", input=jsonl(ctx)).stdout.split()
    a.ctxfs("ref", "set", "main", cid)

    def shown_on_b() -> dict | None:
        result = b.ctxfs("ref", "show", "main", "--json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    on_b = wait_until(shown_on_b, GUARD, poll=0.2, message=lambda: cluster.stderr())
    assert on_b == json.loads(a.ctxfs("ref", "show", "main", "--json").stdout)
    assert on_b["target"] == cid and on_b["node_id"] == a.status()["node_id"]
    assert b.ctxfs("expand", "main").stdout == a.ctxfs("expand", cid).stdout
