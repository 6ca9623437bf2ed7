"""Ed25519 signatures over typed payloads, and SHA-256 commitments."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import BadInput, Refused


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def keys_digest(*keys: bytes) -> bytes:
    """One digest binding a trial's uploaded keys, in upload order (receipts carry it)."""
    return sha256(b"".join(sha256(key) for key in keys))


def signed_bytes(kind: str, payload: bytes) -> bytes:
    """Domain separation: a receipt can never be replayed as an offer."""
    return kind.encode() + b"\x00" + payload


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[Signer, bool]:
        """The identity key at `path` (PEM, mode 0600), created on first use."""
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise Refused(f"{path} is not an Ed25519 private key; move it away to create "
                              f"a new identity")
            return cls(key), False
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        return cls(key), True

    def sign(self, kind: str, payload: bytes) -> bytes:
        return self._key.sign(signed_bytes(kind, payload))


def verify(public_key: bytes, kind: str, payload: bytes, signature: bytes,
           signer: str = "seller") -> None:
    """Raise Refused unless `signature` is the key holder's signature of (kind, payload)."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            signature, signed_bytes(kind, payload))
    except (InvalidSignature, ValueError) as exc:
        raise Refused(f"the {signer}'s signature on this {kind.rsplit('.', 1)[-1]} does not "
                      f"verify: it was altered or not signed by the {signer}'s key") from exc


def fingerprint(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


def public_key_arg(text: str, flag: str, hint: str) -> bytes:
    """An Ed25519 public key given on a command line: 64 hex characters, or a file holding
    them; `hint` says where the user gets it."""
    path = Path(text)
    value = path.read_text().strip() if path.is_file() else text.strip()
    try:
        key = bytes.fromhex(value)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise BadInput(f"{flag} needs an Ed25519 public key as 64 hex characters (or a file "
                       f"holding them; {hint}), got {value[:80]!r}")
    return key
