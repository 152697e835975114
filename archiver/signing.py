"""Signed archives: an Ed25519 signature beside each ``.mar``, checked before it is registered.

``SHA256SUMS`` inside an archive catches changes after the build, but whoever can rewrite the
archive can rewrite its sums too. A signature made with a private key that never leaves the
build machine, checked with its public key on the serving machine, closes that gap:

    ts-archive keygen keys/archive        # keys/archive (private, mode 600) and keys/archive.pub
    ts-archive sign model_store/*.mar --key keys/archive      # writes NAME.mar.sig beside each
    ts-archive verify model_store/net.mar --public-key keys/archive.pub
    ts-manage register net.mar --public-key keys/archive.pub  # refuses unsigned or changed archives

The signature covers the SHA-256 of the archive's bytes, so it covers every file in it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

from .errors import ArchiverError

SUFFIX = ".sig"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ArchiverError("signing archives needs the cryptography package: pip install 'serveready[sign]'") from None
    return serialization, ed25519


def signature_path(archive: Path) -> Path:
    return archive.with_name(archive.name + SUFFIX)


def _digest(archive: Path) -> bytes:
    h = hashlib.sha256()
    with open(archive, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def generate_key(private: Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair: ``private`` (PEM, owner-only) and ``private.pub``; refuses to overwrite."""
    serialization, ed25519 = _crypto()
    public = private.with_name(private.name + ".pub")
    for path in (private, public):
        if path.exists():
            raise ArchiverError(f"{path} exists: keys are never overwritten (move it away first)")
    private.parent.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def sign(archive: Path, private: Path) -> Path:
    """Write ``archive``'s signature to ``NAME.mar.sig`` (base64); returns its path."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise ArchiverError(f"{private} is not a readable private key: {err}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ArchiverError(f"{private} is not an Ed25519 private key (ts-archive keygen makes one)")
    path = signature_path(archive)
    path.write_text(base64.b64encode(key.sign(_digest(archive))).decode() + "\n")
    return path


def signature_problems(archive: Path, public: Path) -> list[str]:
    """What is wrong with ``archive``'s signature against ``public`` (empty: signed by its private key, unchanged)."""
    serialization, ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature

    try:
        key = serialization.load_pem_public_key(public.read_bytes())
    except (OSError, ValueError, TypeError) as err:
        return [f"{public} is not a readable public key: {err}"]
    if not isinstance(key, ed25519.Ed25519PublicKey):
        return [f"{public} is not an Ed25519 public key"]
    path = signature_path(archive)
    if not path.is_file():
        return [f"it is not signed: no {path.name} beside it (ts-archive sign)"]
    try:
        key.verify(base64.b64decode(path.read_text().strip(), validate=True), _digest(archive))
    except (InvalidSignature, ValueError):
        return [f"its signature {path.name} does not match: the archive changed after it was signed, or another key signed it"]
    return []
