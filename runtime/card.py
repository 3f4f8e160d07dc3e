"""The model card: what a bundle is, written as ``card.json`` and read back by every stage.

The runtime owns this contract; training and export write to it, predict reads it instead of
re-declaring classes, input size or normalisation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr.runtime.errors import BundleRefused, CxrError, one_line
from cxr.runtime.labels import CLASSES
from cxr.runtime.safe_io import atomic_write, read_capped, refuse_links

CARD_NAME = "card.json"
FORMAT_VERSION = 1
MAX_BUNDLE_FILE = 4 << 30  # dpn131_se fp32 is ~0.3 GB; an ONNX graph over 2 GB needs external data, refused
MAX_CARD_BYTES = 1 << 20  # a real card is a few kB; a 200 MB one is an attack on memory
MIN_INPUT, MAX_INPUT, MAX_CLASSES = 32, 4096, 64
SAFE_TEXT = re.compile(r"[^\x00-\x1f\x7f/\\]{1,64}")  # printable, no path separators
SAFE_FILE = re.compile(
    r"[A-Za-z0-9_.-]{1,128}"
)  # no separators, no control characters: never outside the bundle


@dataclass(frozen=True)
class InputSpec:
    """What the exported graphs take: uint8 single-channel pixels, N x 1 x size x size."""

    size: int = 224
    channels: int = 1
    dtype: str = "uint8"
    name: str = "image"


RESIZE = "short_side_then_center_crop"
INTERPOLATION = "area"  # area when shrinking, cubic when enlarging (cxr.runtime.preprocess.resize_short_side)
DICOM_WINDOWS = ("minmax", "window")  # how a windowed DICOM becomes 8 bits (cxr.runtime.dicom)
MAX_BORDER_MASK = 0.25  # a band this wide at every edge would blank half the view


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """Host preprocessing (decode, grayscale, short side -> size, centre crop) and the in-graph
    normalisation. Only what the runtime implements is accepted (``preprocessing_problem``)."""

    resize: str = RESIZE
    interpolation: str = INTERPOLATION
    # The network sees the grayscale image repeated to 3 channels, then (x/255 - mean) / std per channel.
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    normalisation_in_graph: bool = True
    # Shortcut suppression (cxr.runtime.suppress); a card without these keys predates them: all off.
    thorax_crop: bool = False
    clahe: bool = False
    border_mask: float = 0.0
    # A windowed DICOM: "window" maps the window's output range onto 0..255; "minmax" (cards without the key)
    # stretches the windowed values' own min..max, as bundles before it did.
    dicom_window: str = "window"


@dataclass(frozen=True, kw_only=True)
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
    # per graph or engine file: its outputs on the fixed probe inputs, reproduced at every open
    known_answers: dict[str, Any] = field(default_factory=dict)
    # the out-of-distribution gate: method, layers, threshold (its numbers are in ood.npz, hashed)
    ood: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Card:
        if not isinstance(data.get("classes"), list):
            raise CxrError("card.json is not a valid model card: classes must be a list of names")
        try:
            version = data.get("format_version", FORMAT_VERSION)
            if type(version) is not int:
                raise TypeError(f"format_version must be a whole number, got {version!r}")
            card = cls(
                classes=tuple(data["classes"]),
                arch=data.get("arch", ""),
                input=InputSpec(**_object(data, "input")),
                preprocessing=_preprocessing_from(data.get("preprocessing", {})),
                **{key: data.get(key, {}) for key in DICT_SECTIONS},
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CxrError(f"card.json is not a valid model card: {one_line(exc, 200)}") from None
        if card.format_version > FORMAT_VERSION or card.format_version < 1:
            raise CxrError(
                f"card.json format_version {card.format_version}: this cxr-edge reads version "
                f"{FORMAT_VERSION} (upgrade cxr-edge, or re-export the bundle)"
            )
        problem = card.problem()
        if problem:
            raise CxrError(f"card.json is not a valid model card: {problem}")
        return card

    def problem(self) -> str | None:
        """What makes this card unusable or unsafe (None when it is fine): checked on every read and write."""
        size = self.input.size
        if type(size) is not int or not MIN_INPUT <= size <= MAX_INPUT:
            return (
                f"input.size must be a whole number of pixels from {MIN_INPUT} to {MAX_INPUT}, got {size!r}"
            )
        if self.input.channels != 1 or self.input.dtype != "uint8" or self.input.name != "image":
            return (
                f"input must be 1 channel of uint8 named 'image', got {self.input.channels!r} x "
                f"{self.input.dtype!r} named {str(self.input.name)[:40]!r}"
            )
        problem = preprocessing_problem(self.preprocessing) or _sections_problem(self)
        if problem:
            return problem
        names = self.classes
        if (
            not 2 <= len(names) <= MAX_CLASSES
            or len(set(names)) != len(names)
            or not all(isinstance(c, str) and SAFE_TEXT.fullmatch(c) for c in names)
        ):
            return f"classes must be 2 to {MAX_CLASSES} distinct printable names of at most 64 characters"
        for name, digest in self.files.items():
            if not isinstance(name, str) or not SAFE_FILE.fullmatch(name) or name in (".", ".."):
                return f"files may only name plain files inside the bundle, got {str(name)[:60]!r}"
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                return f"files[{name!r}] is not a sha256 digest"
        return None

    def replace(self, **changes: Any) -> Card:
        return dataclasses.replace(self, **changes)


def _preprocessing_from(data: dict[str, Any]) -> Preprocessing:
    """The card's preprocessing; keys it lacks take the value of the bundles written before them."""
    if not isinstance(data, dict):
        raise TypeError(f"preprocessing must be an object, got {type(data).__name__}")
    values = {"dicom_window": "minmax", **data}
    for key in ("mean", "std"):
        if key in values:
            if not isinstance(values[key], (list, tuple)):
                raise TypeError(f"preprocessing.{key} must be a list of 3 numbers, got {values[key]!r}")
            values[key] = tuple(values[key])
    return Preprocessing(**values)


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def preprocessing_problem(pre: Preprocessing) -> str | None:
    """Why the runtime cannot do what ``pre`` says, by type and range (None when it can): a value it does not
    implement is refused, never ignored."""
    return _fixed_steps_problem(pre) or _suppression_problem(pre)


def _fixed_steps_problem(pre: Preprocessing) -> str | None:
    """Resize, interpolation and the normalisation the graphs carry: one way each."""
    fixed = {"resize": RESIZE, "interpolation": INTERPOLATION}
    for key, value in fixed.items():
        if getattr(pre, key) != value:
            got = getattr(pre, key)
            return f"preprocessing.{key} must be {value!r} (the only one implemented), got {got!r}"[:160]
    if pre.normalisation_in_graph is not True:
        return "preprocessing.normalisation_in_graph must be true (the graphs normalise; hosts send uint8)"
    for key in ("mean", "std"):
        values = getattr(pre, key)
        if len(values) != 3 or not all(_is_number(v) for v in values):
            return f"preprocessing.{key} must be 3 finite numbers, got {list(values)!r}"[:160]
    if not all(0 < v <= 10 for v in pre.std) or not all(-10 <= v <= 10 for v in pre.mean):
        return f"preprocessing.std must be in (0, 10] and mean in [-10, 10], got {pre.std} and {pre.mean}"
    return None


def _suppression_problem(pre: Preprocessing) -> str | None:
    """The shortcut-suppression steps and the DICOM window: switches, a share of the side, a known name."""
    for key in ("thorax_crop", "clahe"):
        if type(getattr(pre, key)) is not bool:
            return f"preprocessing.{key} must be true or false, got {getattr(pre, key)!r}"[:160]
    if not _is_number(pre.border_mask) or not 0 <= pre.border_mask < MAX_BORDER_MASK:
        return (
            f"preprocessing.border_mask must be a number in [0, {MAX_BORDER_MASK}) (a share of the side), "
            f"got {pre.border_mask!r}"[:160]
        )
    if pre.dicom_window not in DICOM_WINDOWS:
        choices = ", ".join(DICOM_WINDOWS)
        return f"preprocessing.dicom_window must be one of {choices}, got {pre.dicom_window!r}"[:160]
    return None


def _sections_problem(card: Card) -> str | None:
    """The free-form sections must at least have the shape every reader expects."""
    for key in DICT_SECTIONS:
        if not isinstance(getattr(card, key), dict):
            return f"{key} must be an object, got {type(getattr(card, key)).__name__}"
    backends = card.parity.get("backends", {})
    if not isinstance(backends, dict) or not all(
        isinstance(v, dict) and type(v.get("passed", False)) is bool for v in backends.values()
    ):
        return "parity.backends must map each backend to an object with a true/false 'passed'"
    if not isinstance(card.arch, str):
        return f"arch must be a name, got {card.arch!r}"
    return None


DICT_SECTIONS = ("training", "metrics", "parity", "provenance", "files", "known_answers", "ood")


def _object(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise TypeError(f"{key} must be an object, got {type(value).__name__}")
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


LOCAL_KEYS = {
    "training": ("data", "out"),
    "provenance": ("source_run",),
}  # paths on the machine that trained it


def public_dict(card: Card) -> dict[str, Any]:
    """The card as a server shows it to any client: without local paths (training data, run folder, the
    parity report's data, and any other value that names a path on the machine that made the bundle)."""
    data = card.to_dict()
    hidden = {**LOCAL_KEYS, "parity": ("data",)}
    for section, keys in hidden.items():
        if isinstance(data.get(section), dict):
            data[section] = {k: v for k, v in data[section].items() if k not in keys}
    return _without_paths(data)


LOCAL_PATH = re.compile(r"(?:^|[\s'\"(=:,])(?:~?/|\.\.?/|[A-Za-z]:[\\/]|\\\\)[^\s/\\]")


def _without_paths(value: Any) -> Any:
    """``value`` with every string that names an absolute, home or relative path dropped (dict entries and
    list items alike): a card written by a newer stage must not leak a path the list above misses."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if not _names_path(v)}
    if isinstance(value, (list, tuple)):
        return [_without_paths(v) for v in value if not _names_path(v)]
    return value


def _names_path(value: Any) -> bool:
    return isinstance(value, str) and LOCAL_PATH.search(value) is not None


# The one parity label scheme (the report's keys and the card's parity.backends): each ONNX graph run by ONNX
# Runtime has its own label; any other runner is PREFIX-precision, TensorRT engines under ENGINE_LABEL.
# bf16 is OpenVINO's compute mode of the fp32 graph, so its file's result is OpenVINO's own.
PARITY_LABELS = {"fp32": "onnx", "fp16": "fp16", "int8": "int8", "bf16": "openvino-bf16"}
ENGINE_LABEL = "engine"


def parity_label(precision: str, prefix: str | None = None) -> str:
    """'onnx', 'fp16', 'int8' for the ONNX graphs; 'engine-fp16', 'openvino-int8' ... for other runners."""
    return f"{prefix}-{precision}" if prefix else PARITY_LABELS[precision]


def file_parity_label(precision: str, engine: bool = False) -> str:
    """The label whose result says whether the bundle file itself (its graph or its engine) passed parity."""
    return parity_label(precision, ENGINE_LABEL if engine else None)


def parity_state(card: Card, precision: str, engine: bool = False) -> str:
    """'passed', 'failed' or 'not run' for the graph (or engine) of ``precision``. The fp32 ONNX graph is
    checked against PyTorch when it is exported, so it counts as passed until a parity run says otherwise."""
    result = card.parity.get("backends", {}).get(file_parity_label(precision, engine))
    if result is not None:
        return "passed" if result.get("passed") else "failed"
    return "passed" if precision == "fp32" and not engine else "not run"


def forget_parity(card: Card, labels: list[str]) -> Card:
    """A graph written anew has not passed parity yet, whatever its predecessor did."""
    backends = {k: v for k, v in card.parity.get("backends", {}).items() if k not in labels}
    return card.replace(parity={**card.parity, "backends": backends})


def graph_metadata(card: Card) -> dict[str, str]:
    """What every exported graph carries in its metadata_props: the card's meaning (classes, input,
    preprocessing)."""
    data = card.to_dict()
    return {
        "cxr.classes": json.dumps(list(card.classes)),
        "cxr.input": json.dumps(data["input"]),
        "cxr.preprocessing": json.dumps(data["preprocessing"]),
        "cxr.arch": card.arch,
    }


def metadata_mismatch(card: Card, graph: dict[str, str]) -> str | None:
    """Which of the card's classes/input/preprocessing differ from what the graph was exported with (or
    None)."""
    wanted = graph_metadata(card)
    for key in ("cxr.classes", "cxr.input", "cxr.preprocessing"):
        if key in graph and _meaning(key, graph[key]) != _meaning(key, wanted[key]):
            return f"card.json {key.split('.')[1]} {wanted[key]} but the graph was exported with {graph[key]}"
    return None


def _meaning(key: str, text: str) -> Any:
    """A metadata value as compared: preprocessing with its defaults filled (older graphs lack newer keys)."""
    value = json.loads(text)
    if key == "cxr.preprocessing" and isinstance(value, dict):
        try:
            return dataclasses.asdict(_preprocessing_from(value))
        except (TypeError, ValueError):
            return value
    return value


def read_card(folder: Path) -> Card:
    """Read ``folder/card.json``; one-line CxrError when it is missing or malformed."""
    return read_card_and_digest(folder)[0]


def card_digest(data: bytes) -> str:
    """The bundle digest: sha256 of card.json's bytes. The card lists the sha256 of every file, and every file
    is checked against it before use, so pinning this digest pins the whole bundle."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_card_and_digest(folder: Path) -> tuple[Card, str]:
    """The card and the digest of the very bytes it was parsed from."""
    card, raw = read_card_bytes(folder)
    return card, card_digest(raw)


def read_card_bytes(folder: Path) -> tuple[Card, bytes]:
    """The card and the very bytes it was parsed from (what a digest or a signature is checked against)."""
    path = Path(folder) / CARD_NAME
    if not Path(folder).is_dir():
        raise CxrError(f"{folder}: not a folder (expected a run or model bundle folder)")
    if not path.exists() and not path.is_symlink():
        raise CxrError(f"{folder}: no {CARD_NAME} (is this a run or model bundle folder?)")
    refuse_links(Path(folder))
    raw = read_capped(path, MAX_CARD_BYTES, "model card")
    try:
        data = json.loads(raw.decode(), object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise CxrError(f"{path}: unreadable card (nested too deeply)") from None
    except (OSError, ValueError) as exc:  # bad UTF-8 or JSON, a duplicate key, a 5,000-digit number
        raise CxrError(f"{path}: unreadable card ({one_line(exc, 120)})") from None
    if not isinstance(data, dict):
        raise CxrError(f"{path}: card must be a JSON object")
    if _depth(data) > MAX_CARD_DEPTH:
        raise CxrError(f"{path}: unreadable card (nested deeper than {MAX_CARD_DEPTH} levels)")
    return Card.from_dict(data), raw


MAX_CARD_DEPTH = 32  # a real card nests 5 deep; 900 levels broke every reader after the parser


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """One reading of a card: a key given twice (which one counts?) is refused."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice[:40]!r} given twice")
    return data


def _depth(value: Any) -> int:
    """How deep a parsed JSON value nests, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_CARD_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, level + 1) for child in children)
    return deepest


def write_card(folder: Path, card: Card, rehash: bool = True) -> Card:
    """Write ``card.json`` atomically; with ``rehash`` the sha256 of every other file in the folder is
    updated."""
    folder = Path(folder)
    if rehash:
        card = card.replace(files=hash_bundle_files(folder))
    problem = card.problem()
    if problem:
        raise CxrError(f"refused to write {folder / CARD_NAME}: {problem}")
    refuse_links(folder)
    atomic_write(folder / CARD_NAME, json.dumps(card.to_dict(), indent=2, sort_keys=False) + "\n")
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
        raise CxrError(
            f"{path}: sha256 does not match card.json (file changed or tampered); re-export the bundle"
        )
    return path


def verified_bytes(folder: Path, card: Card, name: str) -> bytes:
    """A bundle file's bytes, read once and checked against the card: the caller loads exactly what was hashed
    (opening the path again would let a file swapped in between be loaded)."""
    path = Path(folder) / name
    expected = card.files.get(name)
    if expected is None:
        raise CxrError(f"{path}: not listed in card.json (was it added by hand?)")
    if not path.is_file() or path.is_symlink():
        raise CxrError(f"{path}: missing from the bundle")
    if path.stat().st_size > MAX_BUNDLE_FILE:
        raise CxrError(f"{path}: {path.stat().st_size / 2**30:.1f} GiB, larger than any model file here")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise BundleRefused(
            f"{path}: sha256 does not match card.json (file changed or tampered); re-export the bundle"
        )
    return data


def verify_bundle(folder: Path, card: Card) -> None:
    """Check every file the card lists."""
    for name in card.files:
        verify_file(folder, card, name)
