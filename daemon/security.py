"""Node identity and cluster membership keys.

A cluster key is 32 random bytes, kept base64 in `cluster.key` (mode 0600);
every member of a cluster holds the same one. A node's identity is its own
Ed25519 key in `node.key` (PEM, mode 0600); its node id is SHA-256 of the
raw public key, 64 hex characters. Key material is never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CLUSTER_KEY_BYTES = 32


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
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()
