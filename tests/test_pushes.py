"""A push of many contexts is one stream, spooled, committed in one transaction.

Unit tests of the spool and of the store's batched put, then the local API
with a real store (windows overflowed, ACKs split, a refusal mid-push, a
client that gives up or leaves), then real processes interrupted mid-push.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import trio

from daemon import pushes
from daemon.localapi import LocalApiError, LocalApiServer, LocalClient
from daemon.paths import HomePaths
from helpers import atom, delta, root
from process_helpers import CTXFS, cluster, read_store_ids, wait_until  # noqa: F401 (fixture)
from sync.codec import DecodeError, context_to_json, encode_context
from sync.connection import ConnectionClosed
from sync.errors import ErrorCode
from sync.messages import MAX_IDS_PER_MESSAGE, Ack, Error, ExpandRequest, PushContext, StatusRequest
from sync.store import MissingBase, SQLiteContextStore
from test_localapi import FakeNode, RawClient

GUARD = 60


def small(n: int):
    return [root(atom(f"fact {k}", 0.5), source=f"small {k}") for k in range(n)]


def sized(n: int, size: int):
    return [root(atom(f"{k} " + "x" * size, 0.5), source=f"sized {k}") for k in range(n)]


# --------------------------------------------------------------------------
# the spool and the store
# --------------------------------------------------------------------------


def test_spool_gives_back_what_was_written_in_order_and_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(pushes, "COMMIT_BATCH_BYTES", 3000)
    blobs = [encode_context(c) for c in sized(20, 500)]
    spool = pushes.Spool(tmp_path)
    spool.write(blobs[:7])
    spool.write(blobs[7:])
    batches = list(spool.batches())
    assert [b for batch in batches for b in batch] == blobs
    assert len(batches) > 1 and all(sum(map(len, batch)) < 3000 + 600 for batch in batches)
    assert (spool.count, spool.size) == (20, sum(map(len, blobs)))
    spool.close()
    assert list(tmp_path.iterdir()) == []  # anonymous: nothing left in the home


def test_spool_refuses_past_its_bounds_and_ref_updates(tmp_path, monkeypatch):
    blob = encode_context(small(1)[0])
    monkeypatch.setattr(pushes, "MAX_PUSH_CONTEXTS", 2)
    spool = pushes.Spool(tmp_path)
    spool.write([blob, blob])
    with pytest.raises(pushes.PushRefused, match="at most 2 contexts"):
        spool.write([blob])
    monkeypatch.setattr(pushes, "MAX_PUSH_BYTES", len(blob))
    with pytest.raises(pushes.PushRefused, match="at most 0 MiB"):
        pushes.Spool(tmp_path).write([blob, blob])
    with pytest.raises(pushes.PushRefused, match="ref update"):
        pushes.Spool(tmp_path).write([b"\x99\xa3ref" + bytes(10)])


def test_batched_put_is_one_transaction_and_later_batches_build_on_earlier(tmp_path):
    store = SQLiteContextStore(tmp_path / "store.db")
    base = small(1)[0]
    child = delta(base, atom("child", 0.5))
    assert store.put_encoded_batches([[encode_context(base)], [encode_context(child)]]) == [base.id, child.id]
    # A bad object in a later batch: nothing of the earlier ones is kept.
    fresh = small(3)[1:]
    with pytest.raises(DecodeError):
        store.put_encoded_batches([[encode_context(fresh[0])], [b"\x96\x01junk"]])
    orphan = delta(fresh[1], atom("orphan", 0.5))
    with pytest.raises(MissingBase):
        store.put_encoded_batches(iter([[encode_context(fresh[0])], [encode_context(orphan)]]))
    assert not store.has(fresh[0].id) and len(store) == 2
    store.close()


# --------------------------------------------------------------------------
# the local API
# --------------------------------------------------------------------------


@pytest.fixture
def node(paths):
    store = SQLiteContextStore(paths.store)
    yield FakeNode(paths, store)
    store.close()


@pytest.fixture
async def server(node, nursery) -> LocalApiServer:
    srv = LocalApiServer(node)
    await nursery.start(srv.serve)
    return srv


async def test_a_push_larger_than_the_window_commits_once_with_every_id_acked(server, node, paths):
    contexts = sized(600, 40_000)  # ~24 MB: beyond the 16 MiB stream window
    seen = []
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            ids = await client.push(contexts, progress=lambda sent, total: seen.append((sent, total)))
    assert ids == [c.id for c in contexts]
    assert node.pushed == [ids]  # one commit
    assert seen[-1] == (600, 600) and len(seen) > 1
    assert len(node.store) == 600


async def test_acks_of_a_push_beyond_one_message_of_ids(server, node, paths):
    contexts = small(MAX_IDS_PER_MESSAGE + 5)
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            assert await client.push(contexts) == [c.id for c in contexts]
    assert node.pushed == [[c.id for c in contexts]]


async def test_a_push_refused_mid_way_stores_nothing_and_the_client_stops_sending(server, node, paths, monkeypatch):
    monkeypatch.setattr(pushes, "MAX_PUSH_BYTES", 20 * 2**20)
    contexts = sized(1000, 40_000)  # 40 MB: refused after 20, the client must not wait for credit
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            with pytest.raises(LocalApiError, match="at most 20 MiB") as info:
                await client.push(contexts)
            assert info.value.code is ErrorCode.BAD_REQUEST
            # The connection goes on, its window whole again.
            assert await client.push(contexts[:500]) == [c.id for c in contexts[:500]]
    assert len(node.store) == 500


async def test_a_bad_object_anywhere_in_a_push_stores_none_of_it(server, node, paths):
    good = small(10)
    with trio.fail_after(GUARD):
        raw, stream_id = await _push_stream(paths)
        for ctx in good[:5]:
            await _send(raw, stream_id, encode_context(ctx), more=True)
        await _send(raw, stream_id, b"\x96\x01\xc0\x90\x90\x90\x81", more=True)
        for ctx in good[5:-1]:
            await _send(raw, stream_id, encode_context(ctx), more=True)
        await _send(raw, stream_id, encode_context(good[-1]))
        event = await raw.event()
        while not isinstance(event.message, Error):
            event = await raw.event()
    assert event.stream_id == stream_id and event.message.code == ErrorCode.DECODE_ERROR
    assert len(node.store) == 0 and node.pushed == []


async def test_a_push_given_up_half_way_stores_nothing_and_frees_its_window(server, node, paths):
    contexts = sized(300, 40_000)  # 12 MB: most of the window, held until given up
    with trio.fail_after(GUARD):
        async with LocalClient.connect(paths) as client:
            with trio.CancelScope() as scope:
                # Cancelled once part of it is sent (the daemon spools it).
                await client.push(contexts, progress=lambda sent, total: scope.cancel())
            assert scope.cancelled_caught
            await wait_for(lambda: not _requests(server))
            assert len(node.store) == 0
            # Two more pushes of most of a window each: credit was returned.
            for part in (contexts[:200], contexts[100:]):
                assert await client.push(part) == [c.id for c in part]
    assert len(node.store) == 300


async def test_a_client_that_leaves_mid_push_leaves_nothing_behind(server, node, paths):
    contexts = small(20)
    with trio.fail_after(GUARD):
        raw, stream_id = await _push_stream(paths)
        for ctx in contexts:
            await _send(raw, stream_id, encode_context(ctx), more=True)
        await raw.stream.aclose()
        await wait_for(lambda: not server.statistics().clients)
    assert len(node.store) == 0 and node.pushed == []
    assert not _open_spools(os.getpid(), paths.root)  # its spool is closed (and so gone)


async def test_another_message_on_a_push_stream_is_a_protocol_error(server, node, paths):
    with trio.fail_after(GUARD):
        raw, stream_id = await _push_stream(paths)
        await _send(raw, stream_id, encode_context(small(1)[0]), more=True)
        await raw.send(StatusRequest(), stream_id)
        event = await raw.event()
        while isinstance(event, ConnectionClosed) is False and event.stream_id != 0:
            event = await raw.event()
    assert isinstance(event.message, Error) and event.message.code == ErrorCode.PROTOCOL_ERROR
    assert len(node.store) == 0
    # The server serves others on.
    async with LocalClient.connect(paths) as client:
        assert await client.push(small(2)) == [c.id for c in small(2)]


async def test_a_single_context_push_keeps_the_one_message_form(server, node, paths):
    ctx = small(1)[0]
    with trio.fail_after(GUARD):
        raw, stream_id = await _push_stream(paths)
        await _send(raw, stream_id, encode_context(ctx))
        event = await raw.event()
        while not isinstance(event.message, Ack):
            event = await raw.event()
    assert event.message.ids == (bytes.fromhex(ctx.id),)


async def _push_stream(paths: HomePaths):
    """A raw local-API client past its handshake, and a new stream for a push."""
    raw = await RawClient.open(paths)
    await raw.handshake()
    return raw, raw.conn.open_stream()


async def _send(raw, stream_id: int, context: bytes, *, more: bool = False) -> None:
    await raw.send(PushContext(context=context, more=more), stream_id)


async def wait_for(predicate, poll: float = 0.01):
    while not predicate():
        await trio.sleep(poll)


def _requests(server) -> int:
    return sum(c.requests for c in server.statistics().clients)


# --------------------------------------------------------------------------
# real processes interrupted mid-push
# --------------------------------------------------------------------------

# A client that pushes half of a push and then waits to be killed.
_HALF_PUSH = textwrap.dedent("""
    import sys, trio
    from daemon.localapi import LocalClient
    from daemon.paths import HomePaths
    from sync.codec import encode_context
    from sync.messages import PushContext, encode_payload
    from helpers import atom, root

    async def main():
        async with LocalClient.connect(HomePaths(sys.argv[1])) as client:
            stream_id = client.conn.open_stream()
            for k in range(int(sys.argv[2])):
                ctx = root(atom(f"half {k}", 0.5))
                message = PushContext(context=encode_context(ctx), more=True)
                await client.send_flow([(message, len(encode_payload(message)))], stream_id)
            print("sent", flush=True)
            await trio.sleep_forever()

    trio.run(main)
""")


def _half_pusher(home, count: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(os.path.dirname(__file__)), os.getcwd()]))
    proc = subprocess.Popen([sys.executable, "-c", _HALF_PUSH, str(home), str(count)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "sent", proc.stderr.read()
    return proc


def test_killing_the_pushing_client_mid_push_stores_nothing(cluster):
    daemon = cluster.daemon("a")
    proc = _half_pusher(daemon.home, 200)
    try:
        proc.kill()
    finally:
        proc.wait()
    status = wait_until(lambda: daemon.status()["objects"] == 0 and daemon.status(), 10)
    assert status["objects"] == 0
    assert daemon.ctxfs("push", input=context_to_json_line(small(1)[0])).returncode == 0
    assert len(read_store_ids(daemon.home / "store.db")) == 1


def test_stopping_the_daemon_mid_push_stores_nothing(cluster):
    daemon = cluster.daemon("a")
    proc = _half_pusher(daemon.home, 200)
    try:
        assert daemon.stop() == 0
    finally:
        proc.kill()
        proc.wait()
    assert read_store_ids(daemon.home / "store.db") == set()


def test_ctrl_c_on_ctxfs_push_leaves_all_or_nothing(cluster):
    daemon = cluster.daemon("a")
    contexts = sized(3000, 5000)
    text = "".join(context_to_json_line(c) for c in contexts)
    (daemon.home.parent / "in.jsonl").write_text(text)
    proc = subprocess.Popen([str(CTXFS), "--home", str(daemon.home), "push", str(daemon.home.parent / "in.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Interrupt it while it sends (the daemon has taken some of it).
    wait_until(lambda: proc.poll() is not None or _spooling(daemon), 30, poll=0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    stored = read_store_ids(daemon.home / "store.db")
    if proc.returncode == 0:  # it finished before the signal came
        assert stored == {c.id for c in contexts} and out.split() == [c.id for c in contexts]
    else:
        assert proc.returncode == 130, err
        assert out == ""
        daemon.wait_ready()
        assert read_store_ids(daemon.home / "store.db") == set()


def _spooling(daemon) -> bool:
    return _open_spools(daemon.pid, daemon.home) > 0


def _open_spools(pid: int, home) -> int:
    """Files a process holds open in `home` that no longer have a name: a
    push's spool (an anonymous file)."""
    fds = f"/proc/{pid}/fd"
    count = 0
    for fd in os.listdir(fds):
        try:
            target = os.readlink(os.path.join(fds, fd))
        except OSError:
            continue
        count += target.startswith(str(home)) and target.endswith("(deleted)")
    return count


def context_to_json_line(ctx) -> str:
    import json

    return json.dumps(context_to_json(ctx)) + "\n"


# --------------------------------------------------------------------------
# the rules for new contexts hold for any local API client, not only the CLI
# --------------------------------------------------------------------------


async def test_the_daemon_refuses_what_no_one_should_write_from_any_client(tmp_path, nursery):
    from node_helpers import start_node  # a real Node: its push path applies the rules

    node = await start_node(nursery, tmp_path, "a")
    base = root(atom("kept", 0.5))
    bad = {
        "empty root": root(),
        "relevance above 1": root(atom("too sure", 1.5)),
        "removes from nothing": delta(base, atom("x", 0.5), removed=["ab" * 32]),
    }
    needles = {"empty root": "must add at least one atom", "relevance above 1": "delta_atoms[0].relevance_score",
               "removes from nothing": "ab" * 6}
    with trio.fail_after(GUARD):
        async with LocalClient.connect(node.paths) as client:
            assert await client.push([base]) == [base.id]
            for label, ctx in bad.items():
                with pytest.raises(LocalApiError) as info:
                    await client.push([small(1)[0], ctx])  # in a push of many: none of it is kept
                assert info.value.code is ErrorCode.BAD_REQUEST, label
                assert needles[label] in str(info.value), label  # the broken rule, named
                with pytest.raises(LocalApiError):
                    await client.push([ctx])  # alone
            from sync.refs import make_update
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            from datetime import datetime, timezone
            from sync.refs import encode_update

            update = make_update(name="main", target=base.id, supersedes=[], key=Ed25519PrivateKey.generate(),
                                 time=datetime.now(timezone.utc))
            raw, stream_id = await _push_stream(node.paths)
            await _send(raw, stream_id, encode_update(update))
            event = await raw.event()
            while not isinstance(event.message, Error):
                event = await raw.event()
            assert event.message.code == ErrorCode.BAD_REQUEST and "ref update" in event.message.message
    assert len(node.index) == 1
