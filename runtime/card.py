"""The model card: what a bundle is, written as ``card.json`` and read back by every stage.

The runtime owns this contract; training and export write to it, predict reads it instead of
re-declaring classes, input size or normalisation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr.runtime.errors import CxrError
from cxr.runtime.labels import CLASSES

CARD_NAME = "card.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class InputSpec:
    """What the exported graphs take: uint8 single-channel pixels, N x 1 x size x size."""

    size: int = 224
    channels: int = 1
    dtype: str = "uint8"
    name: str = "image"


@dataclass(frozen=True)
class Preprocessing:
    """Host preprocessing (decode, grayscale, short side -> size, centre crop) and the in-graph normalisation."""

    resize: str = "short_side_then_center_crop"
    interpolation: str = "area"
    # The network sees the grayscale image repeated to 3 channels, then (x/255 - mean) / std per channel.
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    normalisation_in_graph: bool = True


@dataclass(frozen=True)
class Card:
    """Everything a stage needs to know about a model, plus the sha256 of each bundle file."""

    classes: tuple[str, ...] = CLASSES
    arch: str = "dpn92_se"
    input: InputSpec = field(default_factory=InputSpec)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Card:
        try:
            return cls(
                classes=tuple(data["classes"]),
                arch=str(data.get("arch", "")),
                input=InputSpec(**data.get("input", {})),
                preprocessing=_preprocessing_from(data.get("preprocessing", {})),
                training=dict(data.get("training", {})),
                metrics=dict(data.get("metrics", {})),
                parity=dict(data.get("parity", {})),
                provenance=dict(data.get("provenance", {})),
                files=dict(data.get("files", {})),
                format_version=int(data.get("format_version", FORMAT_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CxrError(f"card.json is not a valid model card: {exc}") from None

    def replace(self, **changes: Any) -> Card:
        return dataclasses.replace(self, **changes)


def _preprocessing_from(data: dict[str, Any]) -> Preprocessing:
    values = dict(data)
    for key in ("mean", "std"):
        if key in values:
            values[key] = tuple(float(v) for v in values[key])
    return Preprocessing(**values)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_card(folder: Path) -> Card:
    """Read ``folder/card.json``; one-line CxrError when it is missing or malformed."""
    path = Path(folder) / CARD_NAME
    if not Path(folder).is_dir():
        raise CxrError(f"{folder}: not a folder (expected a run or model bundle folder)")
    if not path.is_file():
        raise CxrError(f"{folder}: no {CARD_NAME} (is this a run or model bundle folder?)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CxrError(f"{path}: unreadable card ({exc})") from None
    if not isinstance(data, dict):
        raise CxrError(f"{path}: card must be a JSON object")
    return Card.from_dict(data)


def write_card(folder: Path, card: Card, rehash: bool = True) -> Card:
    """Write ``card.json`` atomically; with ``rehash`` the sha256 of every other file in the folder is updated."""
    folder = Path(folder)
    if rehash:
        card = card.replace(files=hash_bundle_files(folder))
    tmp = folder / f".{CARD_NAME}.tmp"
    tmp.write_text(json.dumps(card.to_dict(), indent=2, sort_keys=False) + "\n")
    tmp.replace(folder / CARD_NAME)
    return card


def record_files(folder: Path, card: Card, names: list[str]) -> Card:
    """Add (or refresh) the sha256 of the files this stage just wrote; the others must still match.

    Re-hashing everything would bless a tampered file, so existing entries are verified, not refreshed.
    """
    for name in card.files:
        if name not in names:
            verify_file(folder, card, name)
    files = dict(card.files)
    files.update({name: sha256_file(Path(folder) / name) for name in names})
    return write_card(folder, card.replace(files=files), rehash=False)


def hash_bundle_files(folder: Path) -> dict[str, str]:
    """sha256 of every regular, non-hidden file in the bundle except the card itself."""
    return {
        p.name: sha256_file(p)
        for p in sorted(Path(folder).iterdir())
        if p.is_file() and p.name != CARD_NAME and not p.name.startswith(".")
    }


def verify_file(folder: Path, card: Card, name: str) -> Path:
    """Check one bundle file against the card's sha256 before it is used."""
    path = Path(folder) / name
    if not path.is_file():
        raise CxrError(f"{path}: missing from the bundle")
    expected = card.files.get(name)
    if expected is None:
        raise CxrError(f"{path}: not listed in card.json (was it added by hand?)")
    if sha256_file(path) != expected:
        raise CxrError(f"{path}: sha256 does not match card.json (file changed or tampered); re-export the bundle")
    return path


def verify_bundle(folder: Path, card: Card) -> None:
    """Check every file the card lists."""
    for name in card.files:
        verify_file(folder, card, name)
