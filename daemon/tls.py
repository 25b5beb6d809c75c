"""TLS between cluster members: the membership check on every peer connection.

Both sides run TLS 1.3 with `CERT_REQUIRED` against the cluster CA, and
nothing else is trusted (no system roots). Who lacks the cluster key cannot
finish the handshake, so no byte of the sync protocol ever reaches it and
none of its bytes is read: `wrap_server` / `wrap_client` return only once
the handshake is done, and raise `NotAMember` otherwise.

Peers are named by node id, not host name, so `check_hostname` is off; the
authenticated node id is the hash of the key the peer proved it holds
(`peer_node_id`), never what the peer says about itself.

Timeouts are the caller's: put `wrap_*` under `trio.fail_after`, or a peer
that connects and sends nothing holds the handshake open.
"""

from __future__ import annotations

import os
import ssl
import tempfile

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon.config import ConfigError, format_address, parse_address
from daemon.security import LISTEN_URI_SCHEME, NodeIdentity, public_key_id


# Long enough for a TLS alert (a few dozen bytes) to leave on a live
# connection; short because the connection is being abandoned anyway.
ALERT_DEADLINE = 0.5


class NotAMember(Exception):
    """The TLS handshake failed: the peer is not in our cluster, or we are not in its.

    The message is one line, e.g.
    "not a cluster member (TLS: certificate verify failed: unable to get local issuer certificate)".
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def server_context(identity: NodeIdentity) -> ssl.SSLContext:
    """A context for accepting peers; it demands a certificate from the cluster CA."""
    ctx = _context(identity, server_side=True)
    ctx.num_tickets = 0  # sessions are never resumed; don't send tickets
    return ctx


def client_context(identity: NodeIdentity) -> ssl.SSLContext:
    """A context for dialling peers; it presents our certificate, demands theirs."""
    return _context(identity, server_side=False)


def _context(identity: NodeIdentity, *, server_side: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # before verify_mode: a client context refuses otherwise
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=identity.ca_cert_pem.decode("ascii"))
    _load_chain(ctx, identity)
    return ctx


def _load_chain(ctx: ssl.SSLContext, identity: NodeIdentity) -> None:
    """`load_cert_chain` reads only files: give it a 0600 one, gone right after."""
    fd, path = tempfile.mkstemp(prefix=".tls-", suffix=".pem", dir=identity.private_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(identity.node_cert_pem + identity.node_key_pem())
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


async def wrap_server(stream: trio.abc.Stream, ctx: ssl.SSLContext) -> trio.SSLStream:
    """TLS on an accepted stream, handshake done; `NotAMember` if the peer isn't one."""
    return await _handshake(trio.SSLStream(stream, ctx, server_side=True))


async def wrap_client(stream: trio.abc.Stream, ctx: ssl.SSLContext) -> trio.SSLStream:
    """TLS on a dialled stream, handshake done; `NotAMember` if the peer isn't one.

    In TLS 1.3 the server checks our certificate after our side of the
    handshake is done: a server that refuses us shows as a broken stream on
    the first receive, not here. A server outside our cluster is refused here.
    """
    return await _handshake(trio.SSLStream(stream, ctx, server_side=False))


async def _handshake(ssl_stream: trio.SSLStream) -> trio.SSLStream:
    """Finish the handshake. On any failure, cancellation included, the
    transport is closed here: the caller has nothing left to clean up."""
    try:
        await ssl_stream.do_handshake()
    except trio.BrokenResourceError as exc:
        # EOF mid-handshake is a lost connection, not a verdict on membership.
        refused = refusal(exc)
        if refused is not None:
            await _send_alert(ssl_stream)
        await trio.aclose_forcefully(ssl_stream.transport_stream)
        if refused is not None:
            raise refused from None
        raise
    except BaseException:
        await trio.aclose_forcefully(ssl_stream.transport_stream)
        raise
    return ssl_stream


async def _send_alert(ssl_stream: trio.SSLStream) -> None:
    """Send the alert OpenSSL wrote on failure, which trio leaves unsent.

    Without it the peer sees a bare EOF instead of "unknown ca" and cannot
    tell a refusal from a dropped connection. trio keeps the outgoing buffer
    private, so this looks for it and does nothing if it isn't there.
    """
    outgoing = getattr(ssl_stream, "_outgoing", None)
    if not isinstance(outgoing, ssl.MemoryBIO) or not outgoing.pending:
        return
    with trio.move_on_after(ALERT_DEADLINE) as scope:
        scope.shield = True
        try:
            await ssl_stream.transport_stream.send_all(outgoing.read())
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
            pass


def refusal(exc: BaseException) -> NotAMember | None:
    """The membership refusal behind a broken TLS stream, if that is what it is.

    In TLS 1.3 a server checks the dialler's certificate after the dialler's
    handshake is done, so a server that refuses us (e.g. its clock puts our
    certificate in the future) shows up as `trio.BrokenResourceError` on our
    first receive, caused by an `ssl.SSLError` alert. For anything else: None.
    """
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else None
    if isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLEOFError):
        return NotAMember(f"not a cluster member (TLS: {_describe(cause)})")
    return None


def _describe(exc: ssl.SSLError) -> str:
    """A short lower-case reason, e.g. "tlsv1 alert unknown ca"."""
    text = (exc.reason or "").lower().replace("_", " ") or str(exc)
    detail = getattr(exc, "verify_message", None)
    return f"{text}: {detail}" if detail else text


def peer_node_id(ssl_stream: trio.SSLStream) -> str:
    """The peer's authenticated node id: SHA-256 of the key its certificate holds.

    Call only after a successful `wrap_*`; the certificate has then been
    verified against the cluster CA and the peer has proved it holds the key.
    """
    der = ssl_stream.getpeercert(binary_form=True)
    if der is None:
        raise NotAMember("not a cluster member (TLS: no peer certificate)")
    public_key = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(public_key, Ed25519PublicKey):
        raise NotAMember("not a cluster member (TLS: peer key is not Ed25519)")
    return public_key_id(public_key)


# Hosts that mean "every interface": a peer listening on one is reached at
# the address its connection comes from.
_ANY_HOST = frozenset({"0.0.0.0", "::", ""})
# Longest listen address taken from a certificate: a DNS name and a port.
MAX_LISTEN_TEXT = 300


def peer_listen_address(ssl_stream: trio.SSLStream, source_host: str) -> str | None:
    """Where the peer says it accepts connections (its certificate's
    `ctxfs://HOST:PORT`, see security.issue_node_cert), with a wildcard host
    replaced by `source_host`; None if its certificate does not say (an
    older node) or says something unreadable.

    Call only after a successful `wrap_*`. The peer's word, not proven: for
    status to show, never to decide anything.
    """
    der = ssl_stream.getpeercert(binary_form=True)
    if der is None:
        return None
    try:
        names = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return None
    prefix = f"{LISTEN_URI_SCHEME}://"
    for uri in names.value.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(prefix) and len(uri) <= MAX_LISTEN_TEXT and uri[len(prefix):].isprintable():
            try:
                host, port = parse_address(uri[len(prefix):], "listen")
            except ConfigError:
                return None
            return format_address(source_host if host in _ANY_HOST else host, port) if port else None
    return None
