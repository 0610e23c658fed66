"""Authenticity: Ed25519 signatures over a detector file's content digest (``cryptography``).

The integrity digests (``integrity.py``) stop accidents and naive edits; whoever can rewrite a
file can recompute them. A signature made with a private key that stays with the publisher
proves that the file is the one they exported. What is signed is
``b"ufad-signature-v1\\n" + ufad.content_sha256`` (ASCII hex), and ``ufad.content_sha256``
covers everything a client acts on, the graph included (FORMAT.md, "Integrity").

The signature travels inside the file, as the metadata entry ``ufad.signature``:
``{"alg": "ed25519", "key_id": <first 16 hex of sha256(raw public key)>, "content_sha256": ...,
"signature": <base64>}``. Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public),
readable by openssl and every crypto library. No cryptography is written here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from . import format as fmt
from . import integrity
from .errors import DependencyError, InputError, SignatureError

SIGNED_DOMAIN = b"ufad-signature-v1\n"
ALG = "ed25519"
KeyLike = Any  # a PEM path, PEM bytes, or a cryptography Ed25519 key object


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise DependencyError(
            "signing and verifying signatures needs the sign extra: pip install 'ufad[sign]' "
            "(the cryptography package)."
        ) from None
    return ed25519, serialization, InvalidSignature


def key_id(public_key) -> str:
    """First 16 hex digits of sha256 of the raw 32-byte public key: names a key in messages."""
    _, serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _pem(key: KeyLike, what: str) -> tuple[bytes, str]:
    if isinstance(key, (bytes, bytearray)):
        return bytes(key), "the given key bytes"
    path = Path(key)
    if not path.is_file():
        raise InputError(f"{what} {path}: no such file")
    return path.read_bytes(), str(path)


def load_private_key(key: KeyLike):
    """An Ed25519 private key from a PEM file / bytes (or the key object itself)."""
    ed25519, serialization, _ = _crypto()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    data, where = _pem(key, "private key")
    try:
        k = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise InputError(f"{where}: not an unencrypted PEM private key ({e}). Make one with "
                         "`ufad keygen KEY`.") from None
    if not isinstance(k, ed25519.Ed25519PrivateKey):
        raise InputError(f"{where}: a {type(k).__name__}, expected an Ed25519 key (`ufad keygen KEY`).")
    return k


def load_public_key(key: KeyLike):
    """An Ed25519 public key from a PEM file / bytes (a private key is accepted too)."""
    ed25519, serialization, _ = _crypto()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.public_key()
    data, where = _pem(key, "public key")
    try:
        k = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            k = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as e:
            raise InputError(f"{where}: not a PEM public key ({e}). Use the KEY.pub file that "
                             "`ufad keygen KEY` wrote.") from None
    if not isinstance(k, ed25519.Ed25519PublicKey):
        raise InputError(f"{where}: a {type(k).__name__}, expected an Ed25519 public key.")
    return k


def generate_keypair(private_path: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``private_path`` (mode 0600) and ``private_path.pub``."""
    ed25519, serialization, _ = _crypto()
    priv_path = Path(private_path)
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not overwrite:
            raise InputError(f"{p} exists; refusing to overwrite a key (delete it first).")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        priv_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pub_path.write_bytes(pub)
    except OSError as e:
        raise InputError(f"cannot write the key pair at {priv_path}: {e.strerror}") from None
    return priv_path, pub_path


def sign(data: bytes, private_key: KeyLike, path: str = "<model>") -> bytes:
    """The file's bytes with a ``ufad.signature`` entry for ``private_key`` (replacing any).

    The file must pass its integrity check first: a signature vouches for what was verified.
    """
    from .session import verified_parts

    parts, info = verified_parts(data, path)
    if info.format_version < 2:
        raise SignatureError(f"{path} uses ufad format version 1, whose metadata is not covered "
                             "by its digest; re-export it with this ufad before signing.")
    key = load_private_key(private_key)
    message = SIGNED_DOMAIN + parts.content_sha256.encode("ascii")
    entry = {"alg": ALG, "key_id": key_id(key.public_key()), "content_sha256": parts.content_sha256,
             "signature": base64.b64encode(key.sign(message)).decode("ascii")}
    return integrity.with_metadata(data, fmt.KEY_SIGNATURE, json.dumps(entry, sort_keys=True))


def verify(parts: integrity.ModelParts, public_key: KeyLike, path: str = "<model>") -> str:
    """Check the file's signature against ``public_key``; return the key id. The integrity
    check must have passed on ``parts`` already (``AnomalySession`` does both)."""
    _, _, InvalidSignature = _crypto()
    key = load_public_key(public_key)
    kid = key_id(key)
    raw = parts.metadata.get(fmt.KEY_SIGNATURE)
    if raw is None:
        raise SignatureError(f"{path} is not signed, and a signature by key {kid} was required. "
                             "Sign it with `ufad sign`, or get the signed file from its publisher.")
    try:
        entry = json.loads(raw)
        sig = base64.b64decode(entry["signature"], validate=True)
        alg, signed_digest, signer = entry["alg"], entry["content_sha256"], entry.get("key_id", "?")
    except (ValueError, KeyError, TypeError):
        raise SignatureError(f"{path}: its {fmt.KEY_SIGNATURE} entry is malformed; the file was "
                             "edited. Do not trust it.") from None
    if alg != ALG:
        raise SignatureError(f"{path}: signature algorithm {alg!r} is not {ALG!r}.")
    if signer != kid:
        raise SignatureError(f"{path} is signed by key {signer}, not by the given key {kid}. "
                             "Do not trust it, or verify it with its publisher's public key.")
    if signed_digest != parts.content_sha256:
        raise SignatureError(f"{path}: the signature is for other content "
                             f"({str(signed_digest)[:16]}...), not this file's "
                             f"({parts.content_sha256[:16]}...): the file was changed after signing. "
                             "Do not trust it.")
    try:
        key.verify(sig, SIGNED_DOMAIN + parts.content_sha256.encode("ascii"))
    except InvalidSignature:
        raise SignatureError(f"{path}: the signature does not verify with key {kid}: it was "
                             "forged or edited. Do not trust this file.") from None
    return kid
