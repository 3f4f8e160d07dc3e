"""Ed25519 signatures over a bundle's card: trust that a user can pin to a key rather than to one digest.

The card lists the sha256 of every bundle file and every file is checked against it before use, so a valid
signature over ``card.json``'s bytes vouches for the whole bundle. The signature lives in ``.card.json.sig``
(hidden, so it is never hashed into the card it signs). Needs ``cryptography`` (``pip install
'cxr-edge[sign]'``), imported only here.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

from cxr.runtime.errors import CxrError, one_line
from cxr.runtime.optional import require
from cxr.runtime.safe_io import atomic_write, read_capped

SIGNATURE_NAME = ".card.json.sig"


def _crypto():
    exceptions = require("cryptography.exceptions", "signing")
    serialization = require("cryptography.hazmat.primitives.serialization", "signing")
    ed25519 = require("cryptography.hazmat.primitives.asymmetric.ed25519", "signing")
    return serialization, ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey, exceptions.InvalidSignature


MAX_KEY_BYTES = 16 << 10  # an Ed25519 PEM key is ~120 bytes
MAX_SIGNATURE_BYTES = 1 << 10  # a base64 Ed25519 signature is 89 bytes


def generate_key(private_path: Path, public_path: Path, force: bool = False) -> Path | None:
    """A new Ed25519 key pair as PEM files (the private one readable by its owner only). An existing pair is
    never replaced: every bundle it signed and every bedside ``.pub`` would be orphaned. With ``force`` the
    old pair is moved aside (returned: the folder-free stem it was moved to), never deleted."""
    if not private_path.parent.is_dir():
        raise CxrError(f"{private_path.parent}: no such folder for the key pair")
    existing = [p for p in (private_path, public_path) if p.exists() or p.is_symlink()]
    moved = None
    if existing and not force:
        names = " and ".join(str(p) for p in existing)
        raise CxrError(f"{names} exists: refused to replace a key (--force moves the old pair aside)")
    serialization, private_cls, _, _ = _crypto()
    if existing:
        moved = _move_aside(private_path, public_path)
    key = private_cls.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write(private_path, private, private=True)
    atomic_write(public_path, public)
    return moved


def _move_aside(private_path: Path, public_path: Path) -> Path:
    """Rename the old pair to NAME.old-YYYYmmdd-HHMMSS[-N].key/.pub (a free name); returns its .key path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        suffix = f".old-{stamp}" + (f"-{attempt}" if attempt else "")
        targets = [p.with_name(p.stem + suffix + p.suffix) for p in (private_path, public_path)]
        if not any(t.exists() or t.is_symlink() for t in targets):
            for source, target in zip((private_path, public_path), targets):
                if source.exists() or source.is_symlink():
                    os.rename(source, target)
            return targets[0]
    raise CxrError(f"{private_path}: no free name to move the old key to")


def _load(path: Path, private: bool):
    serialization, private_cls, public_cls, _ = _crypto()
    what = "private key" if private else "public key"
    data = read_capped(path, MAX_KEY_BYTES, what)
    if private and b"PUBLIC KEY" in data:
        raise CxrError(f"{path}: a public key; --key needs the private one (the .key file of the pair)")
    if private:
        mode = os.stat(path).st_mode & 0o777
        if mode & 0o077:
            raise CxrError(
                f"{path}: a private key readable or writable by others (mode {mode:o}) is not used; "
                f"chmod 600 {path} (and make a new key if others may have read it)"
            )
    try:
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError) as exc:
        raise CxrError(f"{path}: not a readable PEM {what} ({one_line(exc, 120)})") from None
    if not isinstance(key, private_cls if private else public_cls):
        raise CxrError(f"{path}: not an Ed25519 key")
    return key


def sign_card(folder: Path, private_key: Path) -> Path:
    """Sign ``folder/card.json`` as it is now, once every file it lists matches its hash: a signature vouches
    for the whole bundle, so a bundle whose graph changed is never signed. Returns the signature file."""
    from cxr.runtime.card import read_card_bytes, verify_bundle

    key = _load(private_key, private=True)
    card, raw = read_card_bytes(Path(folder))  # the very bytes that are checked are the ones signed
    verify_bundle(Path(folder), card)
    target = Path(folder) / SIGNATURE_NAME
    atomic_write(target, base64.b64encode(key.sign(raw)) + b"\n")
    return target


def verify_card(folder: Path, card_bytes: bytes, public_key: Path) -> None:
    """Refuse unless ``card_bytes`` (the card as it was read) carry a valid signature by ``public_key``."""
    _, _, _, invalid = _crypto()
    key = _load(public_key, private=False)
    path = Path(folder) / SIGNATURE_NAME
    if not path.is_file() or path.is_symlink():
        raise CxrError(f"{folder}: not signed (no {SIGNATURE_NAME}); refused by --trusted-key")
    signature = read_capped(path, MAX_SIGNATURE_BYTES, "signature")
    try:
        key.verify(base64.b64decode(signature.strip(), validate=True), card_bytes)
    except (invalid, ValueError):
        raise CxrError(
            f"{folder}: card.json is not signed by {public_key} (changed since signing, or another "
            "key); refused"
        ) from None
