"""The single preprocessing definition, shared by training, export and the bedside runtime.

decode (PNG/JPEG 8/16-bit, DICOM in ``cxr.runtime.dicom``) -> grayscale uint8 -> [thorax crop, CLAHE] ->
short side to ``size`` -> centre crop -> [border band]; the bracketed steps are the card's shortcut
suppression (``cxr.runtime.suppress``). Every problem with a file is a one-line ``CxrError``, so a batch
can record it and go on."""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from cxr.runtime.dicom import (
    check_pixel_limit,
    raw_dataset_encoding,
    read_dicom,
    to_uint8,
    warnings_as_notes,
)
from cxr.runtime.errors import CxrError
from cxr.runtime.suppress import view_steps, whole_film_steps_with_mask

if TYPE_CHECKING:
    from cxr.runtime.card import Preprocessing

DEFAULT_MAX_PIXELS = 64_000_000  # decompression-bomb guard; a 4k x 4k DICOM is 16 MP
MIN_SIDE = 16
SMALL_SIDE = 64  # below this a "radiograph" is an icon or thumbnail: warned
NEAR_BINARY_SHARE = 0.95  # two grey levels covering this share of pixels: a mask or a document, warned
MAX_FILE_BYTES = 1 << 30  # an uncompressed 16-bit RGBA image at the pixel limit is 512 MB
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
SNIFF_BYTES = 1024  # "DICM" sits at offset 128; a raw dataset's first elements may need a few hundred bytes


RASTER_SIGNATURES = (  # (format, magic bytes at offset 0)
    ("png", b"\x89PNG\r\n\x1a\n"),
    ("jpeg", b"\xff\xd8\xff"),
    ("tiff", b"II*\x00"),
    ("tiff", b"MM\x00*"),
    ("gif", b"GIF87a"),
    ("gif", b"GIF89a"),
    ("bmp", b"BM"),
)
RASTERS = ("png", "jpeg", "tiff", "bmp", "webp", "gif")


def sniff_format(head: bytes) -> str | None:
    """Identify a file by its first bytes (never by its name): a raster format, 'dicom' or None.

    DICOM first: its 128-byte preamble may itself hold a TIFF header (dual-personality files). Last, a DICOM
    dataset without preamble or file meta (old archives), judged by its first elements' structure."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    for kind, magic in RASTER_SIGNATURES:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return "dicom" if raw_dataset_encoding(head) else None


@dataclass(frozen=True)
class Decoded:
    """A decoded image and what a clinician should know about it (not a radiograph? converted colour?)."""

    gray: np.ndarray
    warnings: tuple[str, ...] = ()

    @property
    def colour(self) -> bool:
        """Converted from colour (a photograph more often than a radiograph): the out-of-distribution gate's
        image statistics count it."""
        return any(w.startswith(("colour image converted", "colour DICOM")) for w in self.warnings)


def load_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, dicom_window: str = "window"
) -> Decoded:
    """Decode a chest X-ray file to 2-D uint8 grayscale (any size), with its warnings. ``dicom_window`` is the
    card's ``preprocessing.dicom_window`` (how a windowed DICOM becomes 8 bits)."""
    path = Path(path)
    try:
        data = _read_regular_file(path)
    except IsADirectoryError:
        raise CxrError(f"{path}: folder contains no images") from None
    except FileNotFoundError:
        raise CxrError(f"{path}: no such file (or a pattern that matched nothing)") from None
    except OSError as exc:
        raise CxrError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode(data, str(path), path.suffix, max_pixels, dicom_window=dicom_window)


def _read_regular_file(path: Path) -> bytes:
    """A file's bytes, opened once and checked as what was opened: a FIFO or device swapped in for a film
    (``/dev/zero``, a pipe) is refused, not read for ever; a file larger than any image is refused unread."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(info.st_mode):
            raise CxrError(f"{path}: not a regular file (a pipe or a device?)")
        if info.st_size > MAX_FILE_BYTES:
            raise CxrError(
                f"{path}: {info.st_size / 2**30:.1f} GiB file, larger than any image accepted here"
            )
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise CxrError(f"{path}: grew beyond {MAX_FILE_BYTES / 2**30:.0f} GiB while being read")
    return data


def read_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, dicom_window: str = "window"
) -> np.ndarray:
    """Decode a chest X-ray file to a 2-D uint8 grayscale array (any size)."""
    return load_image(path, max_pixels, dicom_window=dicom_window).gray


def decode_image(
    data: bytes,
    name: str,
    suffix: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    dicom_window: str = "window",
) -> np.ndarray:
    """Decode encoded bytes (a file's or a request's) to 2-D uint8 grayscale; ``name`` prefixes errors."""
    return decode(data, name, suffix, max_pixels, dicom_window=dicom_window).gray


def decode(
    data: bytes,
    name: str,
    suffix: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    dicom_window: str = "window",
) -> Decoded:
    """Encoded bytes -> grayscale and warnings. Every problem is one cause-first line naming ``name``."""
    if not data:
        raise CxrError(f"{name}: empty file (0 bytes)")
    kind = sniff_format(data[:SNIFF_BYTES])
    if kind is None and suffix.lower() in DICOM_SUFFIXES:
        kind = "dicom"  # a DICOM name on a file the sniff cannot judge: pydicom's force read decides
    notes: list[str] = []
    if kind == "dicom":
        gray = read_dicom(data, name, max_pixels, notes, dicom_window)
    elif kind in RASTERS:
        gray = _read_raster(data, name, kind, max_pixels, notes)
    else:
        raise CxrError(f"{name}: not an image (PNG, JPEG, TIFF, BMP, WebP, GIF or DICOM)")
    if min(gray.shape) < MIN_SIDE:
        raise CxrError(
            f"{name}: image is {gray.shape[1]}x{gray.shape[0]} px, smaller than {MIN_SIDE} px a side"
        )
    low, high = int(gray.min()), int(gray.max())
    if low == high:  # a failed exposure or an empty frame: any label would be made up
        raise CxrError(f"{name}: blank image (every pixel is grey level {low}): nothing to classify")
    notes.extend(content_warnings(gray))
    return Decoded(gray, tuple(notes))


def content_warnings(gray: np.ndarray) -> list[str]:
    """Signs that an image is not a chest radiograph: tiny, or nearly two-valued (a mask, a scanned page)."""
    notes = []
    if min(gray.shape) < SMALL_SIDE:
        notes.append(
            f"only {gray.shape[1]}x{gray.shape[0]} px (under {SMALL_SIDE} px a side: an icon or thumbnail?)"
        )
    thinned = np.ascontiguousarray(gray[:: max(1, gray.shape[0] // 256), :: max(1, gray.shape[1] // 256)])
    # OpenCV's histogram: np.bincount's counts at 0.4x its time (a twelfth of a small film's host work)
    counts = cv2.calcHist([thinned], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    if np.sort(counts)[-2:].sum() >= NEAR_BINARY_SHARE * counts.sum():
        notes.append("near-binary image (two grey levels: a mask or a scanned document?)")
    return notes


EXIF_ORIENTATION = 0x0112


def _read_raster(data: bytes, name: str, kind: str, max_pixels: int, notes: list[str]) -> np.ndarray:
    """Size and EXIF orientation from the header (Pillow, no decode), the --max-pixels check, then the
    decode."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = (
        None  # --max-pixels below is the one limit (Pillow's own fired before it was read)
    )
    try:
        with warnings_as_notes(None):  # Pillow's warnings dropped, under the lock catch_warnings needs
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                check_pixel_limit(name, width, height, max_pixels)
                orientation = (
                    _orientation(im) if kind in ("jpeg", "tiff", "webp") else 1
                )  # PNG's EXIF needs a decode
    except CxrError:
        raise
    except Exception as exc:  # PIL raises many types for broken headers
        raise CxrError(f"{name}: corrupt {kind.upper()} header ({type(exc).__name__})") from None
    encoded = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED) if kind != "gif" else None
    if image is None and kind in ("gif", "webp", "tiff"):
        image = _pillow_decode(data)  # formats this OpenCV build may not decode
    if image is None or image.shape[0] != height or image.shape[1] != width:
        raise CxrError(f"{name}: corrupt or truncated {kind.upper()} data")
    if kind == "jpeg" and _jpeg_truncated(encoded):
        raise CxrError(f"{name}: truncated JPEG (no end-of-image marker)")
    if is_colour(image):
        notes.append("colour image converted to luminance (a photograph rather than a radiograph?)")
    return apply_orientation(to_uint8(to_gray(image)), orientation)


def is_colour(image: np.ndarray) -> bool:
    """Three or four channels whose colour channels really differ (grey stored as RGB is not colour)."""
    if image.ndim != 3 or image.shape[2] < 3:
        return False
    step = max(1, max(image.shape[:2]) // 256)
    sample = image[::step, ::step, :3].astype(np.int32)
    return bool(np.abs(sample - sample[:, :, :1]).max() > 8)


def _orientation(im: object) -> int:
    """EXIF orientation (1 = upright) from a header Pillow has read; a broken EXIF block counts as upright."""
    try:
        value = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def _pillow_decode(data: bytes) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            return np.asarray(im.convert("L"))
    except Exception:
        return None


def apply_orientation(gray: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation 1-8 -> the upright image, as a viewer shows it."""
    flipped = np.fliplr(gray) if orientation in (2, 4, 5, 7) else gray
    turns = {3: 2, 4: 2, 5: 1, 6: 3, 7: 3, 8: 1}.get(orientation, 0)  # counter-clockwise quarter turns
    return np.ascontiguousarray(np.rot90(flipped, turns))


def _jpeg_truncated(data: np.ndarray) -> bool:
    """No end-of-image marker after the last start-of-scan (neither marker can occur inside entropy-coded
    data; an EXIF thumbnail's pair comes before the main scan). Bytes after the end are no truncation."""
    raw = data.tobytes()
    return raw.rfind(b"\xff\xd9") < raw.rfind(b"\xff\xda")


def to_gray(image: np.ndarray) -> np.ndarray:
    """Drop alpha and colour: BGR(A) as decoded by OpenCV -> one channel, dtype kept."""
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        return cv2.cvtColor(image, code)
    raise CxrError(f"unsupported image layout {image.shape}")


def resize_short_side(gray: np.ndarray, size: int) -> np.ndarray:
    """Scale so the short side equals ``size`` (area filter when shrinking, cubic when enlarging)."""
    height, width = gray.shape[:2]
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) == (width, height):
        return gray
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(gray, (new_w, new_h), interpolation=interpolation)


def center_crop(gray: np.ndarray, size: int) -> np.ndarray:
    height, width = gray.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return gray[top : top + size, left : left + size]


def preprocess(gray: np.ndarray, size: int, pre: Preprocessing | None = None) -> np.ndarray:
    """Deterministic evaluation preprocessing: the card's shortcut suppression (``pre``), short side -> size,
    centre crop; uint8 (size, size). Training runs the same steps (``whole_film_steps`` / ``view_steps``)."""
    return preprocess_with_mask(gray, None, size, pre)[0]


def preprocess_with_mask(
    gray: np.ndarray, mask: np.ndarray | None, size: int, pre: Preprocessing | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``preprocess`` plus a boolean mask of the film (a lesion, the body) taken through the same geometry."""
    gray, mask = whole_film_steps_with_mask(gray, mask, pre)
    view = np.ascontiguousarray(view_steps(center_crop(resize_short_side(gray, size), size), pre))
    if mask is None:
        return view, None
    scaled = resize_short_side(mask.astype(np.uint8) * 255, size)
    return view, np.ascontiguousarray(center_crop(scaled, size)) > 127


def load_and_preprocess(
    path: str | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, pre: Preprocessing | None = None
) -> np.ndarray:
    """A file through the card's preprocessing (``pre``; None: the defaults): decode, then ``preprocess``."""
    dicom_window = pre.dicom_window if pre is not None else "window"
    return preprocess(read_image(path, max_pixels, dicom_window=dicom_window), size, pre)
