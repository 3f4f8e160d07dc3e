"""Ed25519 signatures over a bundle's card: trust that a user can pin to a key rather than to one digest.

The card lists the sha256 of every bundle file and every file is checked against it before use, so a valid
signature over ``card.json``'s bytes vouches for the whole bundle. The signature lives in ``.card.json.sig``
(hidden, so it is never hashed into the card it signs). Needs ``cryptography`` (``pip install
'cxr-edge[sign]'``), imported only here.
"""

from __future__ import annotations

import base64
from pathlib import Path

from cxr.runtime.errors import CxrError
from cxr.runtime.optional import require
from cxr.runtime.safe_io import atomic_write

SIGNATURE_NAME = ".card.json.sig"


def _crypto():
    exceptions = require("cryptography.exceptions", "signing")
    serialization = require("cryptography.hazmat.primitives.serialization", "signing")
    ed25519 = require("cryptography.hazmat.primitives.asymmetric.ed25519", "signing")
    return serialization, ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey, exceptions.InvalidSignature


def generate_key(private_path: Path, public_path: Path) -> None:
    """A new Ed25519 key pair as PEM files (the private one readable by its owner only)."""
    serialization, private_cls, _, _ = _crypto()
    key = private_cls.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write(private_path, private, private=True)
    atomic_write(public_path, public)


def _load(path: Path, private: bool):
    serialization, private_cls, public_cls, _ = _crypto()
    try:
        data = Path(path).read_bytes()
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (OSError, ValueError, TypeError) as exc:
        raise CxrError(
            f"{path}: not a readable PEM {'private' if private else 'public'} key ({exc})"
        ) from None
    if not isinstance(key, private_cls if private else public_cls):
        raise CxrError(f"{path}: not an Ed25519 key")
    return key


def sign_card(folder: Path, private_key: Path) -> Path:
    """Sign ``folder/card.json`` as it is now; returns the signature file."""
    card = (Path(folder) / "card.json").read_bytes()
    signature = _load(private_key, private=True).sign(card)
    target = Path(folder) / SIGNATURE_NAME
    atomic_write(target, base64.b64encode(signature) + b"\n")
    return target


def verify_card(folder: Path, card_bytes: bytes, public_key: Path) -> None:
    """Refuse unless ``card_bytes`` (the card as it was read) carry a valid signature by ``public_key``."""
    _, _, _, invalid = _crypto()
    key = _load(public_key, private=False)
    path = Path(folder) / SIGNATURE_NAME
    if not path.is_file() or path.is_symlink():
        raise CxrError(f"{folder}: not signed (no {SIGNATURE_NAME}); refused by --trusted-key")
    try:
        key.verify(base64.b64decode(path.read_bytes().strip(), validate=True), card_bytes)
    except (invalid, ValueError):
        raise CxrError(
            f"{folder}: card.json is not signed by {public_key} (changed since signing, or another "
            "key); refused"
        ) from None
