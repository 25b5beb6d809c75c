"""Node identity and cluster membership keys.

A cluster key is 32 random bytes, kept base64 in `cluster.key` (mode 0600);
every member of a cluster holds the same one. A node's identity is its own
Ed25519 key in `node.key` (PEM, mode 0600); its node id is SHA-256 of the
raw public key, 64 hex characters. Key material is never logged.

Membership is proved with TLS (see `daemon.tls`). From the cluster key every
member derives the same Ed25519 cluster CA: the key by HKDF, the certificate
with every field fixed, and since Ed25519 signatures are deterministic the
CA certificate comes out byte-identical on every member. Each node gets a
certificate for its own key, signed by that CA, issued afresh in memory
whenever the identity is loaded -- so it can never go stale when the cluster
key changes. Every member holds the CA key and could sign any key: the
cluster is one circle of trust, and a node id is bound to the key that
proves itself in the handshake, never to a certificate's name.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import os
import secrets
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from daemon.paths import HomePaths

CLUSTER_KEY_BYTES = 32
# The scheme of the URI in a node certificate that says where the node listens.
LISTEN_URI_SCHEME = "ctxfs"


class KeyFileError(Exception):
    """A key file that is missing, unreadable or malformed (message: one line)."""


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 from the start: no window where it is readable."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def new_cluster_key() -> bytes:
    return secrets.token_bytes(CLUSTER_KEY_BYTES)


def parse_cluster_key(text: str, source: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{source}: not a base64 cluster key") from None
    if len(key) != CLUSTER_KEY_BYTES:
        raise KeyFileError(f"{source}: a cluster key is {CLUSTER_KEY_BYTES} bytes, this one is {len(key)}")
    return key


def format_cluster_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def read_cluster_key(path: Path) -> bytes:
    try:
        text = path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read cluster key {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_cluster_key(text, str(path))


def write_cluster_key(path: Path, key: bytes) -> None:
    _write_private(path, (format_cluster_key(key) + "\n").encode("ascii"))


def new_node_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_private(path, pem)
    return key


def read_node_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyFileError(f"cannot read node key {path}: {exc.strerror}") from None
    except ValueError:
        raise KeyFileError(f"{path}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def node_id(key: Ed25519PrivateKey) -> str:
    return public_key_id(key.public_key())


def public_key_id(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex: a node id (or a CA's fingerprint)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------- cluster CA

# Changing any of these changes every member's CA: old and new nodes would no
# longer recognise each other. Bump the version in the info string instead.
CA_KEY_INFO = b"ctxfs cluster ca v1"
CA_SERIAL_INFO = b"ctxfs cluster ca serial v1"
CA_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
# RFC 5280 4.1.2.5: "no well-defined expiration date".
CA_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
# A node certificate is reissued at every start, so its lifetime only needs
# to outlast a running daemon; a day back absorbs clock skew between peers.
NODE_CERT_BACKDATE = datetime.timedelta(days=1)
NODE_CERT_LIFETIME = datetime.timedelta(days=36525)  # a hundred years


def cluster_ca_key(cluster_key: bytes) -> Ed25519PrivateKey:
    if len(cluster_key) != CLUSTER_KEY_BYTES:
        raise ValueError(f"a cluster key is {CLUSTER_KEY_BYTES} bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=CA_KEY_INFO)
    return Ed25519PrivateKey.from_private_bytes(hkdf.derive(cluster_key))


def cluster_id(ca_public_key: Ed25519PublicKey) -> str:
    """A short public name for a cluster: the CA key's fingerprint, 16 hex."""
    return public_key_id(ca_public_key)[:16]


def _ca_certificate(ca_key: Ed25519PrivateKey) -> x509.Certificate:
    public = ca_key.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ctxfs cluster {cluster_id(public)}")])
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    # A positive serial of at most 159 bits, so it fits RFC 5280's 20 octets.
    serial = int.from_bytes(hashlib.sha256(CA_SERIAL_INFO + raw).digest()[:20], "big") >> 1 or 1
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(CA_NOT_BEFORE)
        .not_valid_after(CA_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(ca_key, algorithm=None)  # Ed25519: deterministic, so byte-identical everywhere
    )


def cluster_ca_pem(cluster_key: bytes) -> bytes:
    """The cluster CA certificate, PEM; the same bytes on every member."""
    return _ca_certificate(cluster_ca_key(cluster_key)).public_bytes(serialization.Encoding.PEM)


def issue_node_cert(cluster_key: bytes, node_key: Ed25519PrivateKey, *, listen: str | None = None) -> bytes:
    """A certificate for `node_key` signed by the cluster CA, PEM; CN = node id.

    `listen` ("HOST:PORT", where the node accepts peers) goes in as the URI
    `ctxfs://HOST:PORT` of its subject alternative names: a peer the node
    dials learns from it where the node can be reached (the connection only
    shows a port the kernel picked), and shows that in its status. It is
    the node's own word, and names nothing TLS checks.
    """
    ca_key = cluster_ca_key(cluster_key)
    ca_cert = _ca_certificate(ca_key)
    public = node_key.public_key()
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    builder = x509.CertificateBuilder()
    if listen is not None:
        uri = x509.UniformResourceIdentifier(f"{LISTEN_URI_SCHEME}://{listen}")
        builder = builder.add_extension(x509.SubjectAlternativeName([uri]), critical=False)
    cert = (
        builder
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, public_key_id(public))]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - NODE_CERT_BACKDATE)
        .not_valid_after(now + NODE_CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        # Every node is both a TLS server (accepting) and a client (dialling).
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, algorithm=None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, cert_sign: bool = False, digital_signature: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


# ---------------------------------------------------------------- identity


@attrs.frozen(kw_only=True)
class NodeIdentity:
    """What a node proves itself with in TLS. The repr shows no key material.

    `private_dir` is where `daemon.tls` may put the short-lived 0600 file
    that `ssl.SSLContext.load_cert_chain` needs (None: the system temp dir).
    """

    node_id: str
    node_key: Ed25519PrivateKey = attrs.field(repr=False)
    node_cert_pem: bytes = attrs.field(repr=False)
    ca_cert_pem: bytes = attrs.field(repr=False)
    cluster_id: str
    private_dir: Path | None = None

    def node_key_pem(self) -> bytes:
        return self.node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def make_identity(cluster_key: bytes, node_key: Ed25519PrivateKey, *, private_dir: Path | None = None,
                  listen: str | None = None) -> NodeIdentity:
    return NodeIdentity(
        node_id=node_id(node_key),
        node_key=node_key,
        node_cert_pem=issue_node_cert(cluster_key, node_key, listen=listen),
        ca_cert_pem=cluster_ca_pem(cluster_key),
        cluster_id=cluster_id(cluster_ca_key(cluster_key).public_key()),
        private_dir=private_dir,
    )


def load_identity(paths: HomePaths, *, listen: str | None = None) -> NodeIdentity:
    """Read the home's cluster key and node key; issue this run's node
    certificate (naming `listen`, see issue_node_cert).

    Raises KeyFileError (one line, no key material) when a key is missing or bad.
    """
    return make_identity(read_cluster_key(paths.cluster_key), read_node_key(paths.node_key), private_dir=paths.root,
                         listen=listen)
