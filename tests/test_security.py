"""Cluster CA, node certificates and the TLS membership check (daemon.security, daemon.tls)."""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import socket
import ssl
import stat

import attrs
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from daemon import security, tls
from daemon.paths import HomePaths

HANDSHAKE_TIMEOUT = 5
WELCOME = b"welcome, member"
# Each test makes a handful of connections; the server's handler never
# blocks on reporting one.
OUTCOME_BUFFER = 16


def identity(cluster_key: bytes) -> security.NodeIdentity:
    return security.make_identity(cluster_key, Ed25519PrivateKey.generate())


@pytest.fixture
def cluster_key() -> bytes:
    return security.new_cluster_key()


@attrs.frozen(kw_only=True)
class Outcome:
    """What the server saw of one connection."""

    kind: str  # "member" | "refused" | "lost"
    detail: str = ""
    peer: str | None = None
    data: bytes = b""


@contextlib.asynccontextmanager
async def serving(ident: security.NodeIdentity):
    """A TLS server on 127.0.0.1: it greets members by node id and echoes
    their first message. Yields (port, receive channel of Outcome)."""
    ctx = tls.server_context(ident)
    send, receive = trio.open_memory_channel(OUTCOME_BUFFER)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                ssl_stream = await tls.wrap_server(stream, ctx)
        except tls.NotAMember as exc:
            send.send_nowait(Outcome(kind="refused", detail=exc.message))
            return
        except trio.BrokenResourceError as exc:
            send.send_nowait(Outcome(kind="lost", detail=repr(exc.__cause__)))
            return
        async with ssl_stream:
            peer = tls.peer_node_id(ssl_stream)
            await ssl_stream.send_all(WELCOME + b" " + peer.encode())
            data = await ssl_stream.receive_some()
            send.send_nowait(Outcome(kind="member", peer=peer, data=data))
            await ssl_stream.send_all(b"echo:" + data)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1], receive
        nursery.cancel_scope.cancel()


async def dial(port: int, ident: security.NodeIdentity) -> trio.SSLStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        return await tls.wrap_client(stream, tls.client_context(ident))


async def next_outcome(receive) -> Outcome:
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        return await receive.receive()


# ---------------------------------------------------------------- certificates


def test_ca_is_deterministic_per_cluster_key(cluster_key):
    first = security.cluster_ca_pem(cluster_key)
    assert security.cluster_ca_pem(cluster_key) == first
    # Two members build it independently, with different node keys.
    assert identity(cluster_key).ca_cert_pem == identity(cluster_key).ca_cert_pem == first
    other = security.cluster_ca_pem(security.new_cluster_key())
    assert other != first
    assert x509.load_pem_x509_certificate(other).public_key() != x509.load_pem_x509_certificate(first).public_key()


def test_ca_certificate_fields(cluster_key):
    ca = x509.load_pem_x509_certificate(security.cluster_ca_pem(cluster_key))
    ca_public = security.cluster_ca_key(cluster_key).public_key()
    fingerprint = security.public_key_id(ca_public)[:16]
    assert ca.subject == ca.issuer
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"ctxfs cluster {fingerprint}"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.not_valid_before_utc == datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
    assert ca.not_valid_after_utc.year == 9999
    assert ca.public_key() == ca_public
    ca_public.verify(ca.signature, ca.tbs_certificate_bytes)  # self-signed


def test_node_certificate_is_signed_by_the_cluster_ca(cluster_key):
    ident = identity(cluster_key)
    cert = x509.load_pem_x509_certificate(ident.node_cert_pem)
    ca = x509.load_pem_x509_certificate(ident.ca_cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ident.node_id
    assert security.public_key_id(cert.public_key()) == ident.node_id
    assert cert.issuer == ca.subject
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    # Issued afresh with a random serial each time, under the same CA.
    again = x509.load_pem_x509_certificate(security.make_identity(cluster_key, ident.node_key).node_cert_pem)
    assert again.serial_number != cert.serial_number
    assert again.public_key() == cert.public_key()


def test_load_identity_from_home(tmp_path, cluster_key):
    home = HomePaths(tmp_path)
    security.write_cluster_key(home.cluster_key, cluster_key)
    node_key = security.new_node_key(home.node_key)
    ident = security.load_identity(home)
    assert ident.node_id == security.node_id(node_key)
    assert ident.ca_cert_pem == security.cluster_ca_pem(cluster_key)
    assert ident.private_dir == tmp_path
    for key_file in (home.cluster_key, home.node_key):
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    # No key material in the repr (it is what ends up in logs and tracebacks).
    text = repr(ident)
    assert "PRIVATE" not in text and "CERTIFICATE" not in text and ident.node_id in text
    # Building contexts leaves no copy of the key behind in the home.
    before = sorted(p.name for p in tmp_path.iterdir())
    tls.server_context(ident)
    tls.client_context(ident)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_load_identity_without_keys(tmp_path):
    with pytest.raises(security.KeyFileError, match="cluster key"):
        security.load_identity(HomePaths(tmp_path))


def test_contexts_are_tls13_only_and_verify_both_ways(cluster_key):
    ident = identity(cluster_key)
    for ctx in (tls.server_context(ident), tls.client_context(ident)):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname
        # Only the cluster CA is trusted, no system roots.
        assert [c["subject"] for c in ctx.get_ca_certs()] == [
            ((("commonName", f"ctxfs cluster {ident.cluster_id}"),),)
        ]


# ---------------------------------------------------------------- members


async def test_members_handshake_both_ways(cluster_key):
    a, b = identity(cluster_key), identity(cluster_key)
    for server, client in ((a, b), (b, a)):
        async with serving(server) as (port, outcomes):
            async with await dial(port, client) as stream:
                assert tls.peer_node_id(stream) == server.node_id
                greeting = await stream.receive_some()
                assert greeting == WELCOME + b" " + client.node_id.encode()
                await stream.send_all(b"hello from " + client.node_id.encode())
                assert await stream.receive_some() == b"echo:hello from " + client.node_id.encode()
            outcome = await next_outcome(outcomes)
            assert outcome.kind == "member"
            assert outcome.peer == client.node_id
            assert outcome.data == b"hello from " + client.node_id.encode()


async def test_members_over_memory_streams(cluster_key):
    a, b = identity(cluster_key), identity(cluster_key)
    left, right = trio.testing.memory_stream_pair()
    seen = {}

    async def side(name, wrap, stream, ctx):
        seen[name] = await wrap(stream, ctx)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "server", tls.wrap_server, left, tls.server_context(a))
        nursery.start_soon(side, "client", tls.wrap_client, right, tls.client_context(b))
    assert tls.peer_node_id(seen["server"]) == b.node_id
    assert tls.peer_node_id(seen["client"]) == a.node_id
    await seen["client"].send_all(b"x" * 100_000)
    received = b""
    while len(received) < 100_000:
        received += await seen["server"].receive_some()
    assert received == b"x" * 100_000


# ---------------------------------------------------------------- non-members


async def test_other_cluster_fails_on_both_sides(cluster_key):
    member, stranger = identity(cluster_key), identity(security.new_cluster_key())
    async with serving(member) as (port, outcomes):
        with pytest.raises(tls.NotAMember, match="not a cluster member .*certificate verify failed"):
            await dial(port, stranger)
        outcome = await next_outcome(outcomes)
        assert outcome.kind == "refused"
        assert "unknown ca" in outcome.detail
    # And the other way round: a stranger's server is refused by our dialler.
    async with serving(stranger) as (port, outcomes):
        with pytest.raises(tls.NotAMember, match="certificate verify failed"):
            await dial(port, member)
        assert (await next_outcome(outcomes)).kind == "refused"


def stranger_ssl_context(cert_pem: bytes | None, key_pem: bytes | None, tmp_path) -> ssl.SSLContext:
    """A plain stdlib TLS 1.3 client that trusts any server (so its side of
    the handshake completes) and offers the given certificate, if any."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert_pem is not None:
        chain = tmp_path / "stranger.pem"
        chain.write_bytes(cert_pem + key_pem)
        ctx.load_cert_chain(chain)
    return ctx


def plain_tls_client(port: int, ctx: ssl.SSLContext, payload: bytes) -> tuple[bytes, str]:
    """Blocking stdlib client, run in a thread: handshake, send `payload` at
    once, then read until the server closes. Returns (application bytes
    received, how it ended)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT) as raw:
        try:
            with ctx.wrap_socket(raw) as conn:
                # TLS 1.3: the client is done before the server has checked
                # its certificate, so it can send application data at once.
                conn.sendall(payload)
                while chunk := conn.recv(65536):
                    received += chunk
                return received, "eof"
        except (ssl.SSLError, OSError) as exc:
            return received, repr(exc)


async def test_stranger_sending_data_gets_nothing_and_is_never_read(cluster_key, tmp_path):
    """The key property: a client with another cluster's certificate that
    skips its own checks and sends application data straight away gets no
    byte back, and the server's application never receives one."""
    member = identity(cluster_key)
    stranger = identity(security.new_cluster_key())
    ctx = stranger_ssl_context(stranger.node_cert_pem, stranger.node_key_pem(), tmp_path)
    async with serving(member) as (port, outcomes):
        received, ending = await trio.to_thread.run_sync(plain_tls_client, port, ctx, b"steal this")
        outcome = await next_outcome(outcomes)
    assert received == b""
    assert "unknown ca" in ending  # the server said why, in a TLS alert
    assert outcome.kind == "refused" and outcome.data == b""
    assert "certificate verify failed" in outcome.detail


async def test_client_without_certificate_is_refused(cluster_key, tmp_path):
    member = identity(cluster_key)
    ctx = stranger_ssl_context(None, None, tmp_path)
    async with serving(member) as (port, outcomes):
        received, ending = await trio.to_thread.run_sync(plain_tls_client, port, ctx, b"hello?")
        outcome = await next_outcome(outcomes)
    assert received == b""
    assert "certificate required" in ending
    assert outcome.kind == "refused" and "did not return a certificate" in outcome.detail


async def test_client_with_self_signed_certificate_is_refused(cluster_key, tmp_path):
    member = identity(cluster_key)
    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, security.node_id(key))])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm=None)
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    ctx = stranger_ssl_context(cert.public_bytes(serialization.Encoding.PEM), key_pem, tmp_path)
    async with serving(member) as (port, outcomes):
        received, ending = await trio.to_thread.run_sync(plain_tls_client, port, ctx, b"hello?")
        outcome = await next_outcome(outcomes)
    assert received == b""
    assert "unknown ca" in ending
    assert outcome.kind == "refused" and "certificate verify failed" in outcome.detail


async def test_refusal_after_the_dialler_handshake_is_recognised(cluster_key, tmp_path):
    """TLS 1.3: a dialler learns the server refused its certificate only on
    its first receive; `tls.refusal` turns that into NotAMember."""
    member = identity(cluster_key)
    stranger = identity(security.new_cluster_key())
    ctx = stranger_ssl_context(stranger.node_cert_pem, stranger.node_key_pem(), tmp_path)
    async with serving(member) as (port, outcomes):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ssl_stream = await tls.wrap_client(stream, ctx)  # our side is done...
        await ssl_stream.send_all(b"anyone there?")
        with pytest.raises(trio.BrokenResourceError) as caught:
            await ssl_stream.receive_some()  # ...theirs is not
        await trio.aclose_forcefully(ssl_stream)
        assert (await next_outcome(outcomes)).kind == "refused"
    refused = tls.refusal(caught.value)
    assert isinstance(refused, tls.NotAMember)
    assert refused.message == "not a cluster member (TLS: tlsv1 alert unknown ca)"
    assert tls.refusal(trio.BrokenResourceError()) is None
    assert tls.refusal(OSError("reset")) is None


async def test_plain_tcp_garbage_is_refused(cluster_key):
    member = identity(cluster_key)
    async with serving(member) as (port, outcomes):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"CTXFS HELLO, no TLS here\r\n" * 4)
            received = b""
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                with contextlib.suppress(trio.BrokenResourceError):
                    while chunk := await stream.receive_some():
                        received += chunk
        outcome = await next_outcome(outcomes)
    assert outcome.kind == "refused"
    # At most a TLS alert record (content type 21), never the greeting.
    assert received == b"" or received[0] == 21
    assert WELCOME not in received


async def test_tls12_is_refused_even_for_a_member(cluster_key):
    member, other = identity(cluster_key), identity(cluster_key)
    ctx = tls.client_context(other)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with serving(member) as (port, outcomes):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with pytest.raises(tls.NotAMember, match="protocol version"):
            await tls.wrap_client(stream, ctx)
        outcome = await next_outcome(outcomes)
    assert outcome.kind == "refused" and "unsupported protocol" in outcome.detail


# ---------------------------------------------------------------- cleanup


async def test_wrap_closes_the_transport_when_the_handshake_times_out(cluster_key, autojump_clock):
    member = identity(cluster_key)
    server_side, client_side = trio.testing.memory_stream_pair()
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(10):
            await tls.wrap_server(server_side, tls.server_context(member))
    # The silent client sees the connection closed, not a hanging one.
    assert await client_side.receive_some() == b""


async def test_wrap_closes_the_transport_when_refused(cluster_key):
    member, stranger = identity(cluster_key), identity(security.new_cluster_key())
    left, right = trio.testing.memory_stream_pair()
    results = {}

    async def side(name, wrap, stream, ctx):
        with pytest.raises(tls.NotAMember):
            await wrap(stream, ctx)
        results[name] = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "server", tls.wrap_server, left, tls.server_context(member))
        nursery.start_soon(side, "client", tls.wrap_client, right, tls.client_context(stranger))
    assert results == {"server": True, "client": True}
    with pytest.raises(trio.ClosedResourceError):
        await left.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await right.send_all(b"x")
