"""The single preprocessing definition, shared by training, export and the bedside runtime.

decode (PNG/JPEG 8/16-bit, DICOM) -> grayscale uint8 -> short side to ``size`` -> centre crop.
Every problem with a file is a one-line ``CxrError``, so a batch can record it and go on.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
from cxr.runtime.errors import CxrError

DEFAULT_MAX_PIXELS = 64_000_000  # decompression-bomb guard; a 4k x 4k DICOM is 16 MP
MIN_SIDE = 16
MAX_FILE_BYTES = 1 << 30  # an uncompressed 16-bit RGBA image at the pixel limit is 512 MB
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic"}


def sniff_format(head: bytes) -> str | None:
    """Identify a file by its first bytes (never by its name): 'png', 'jpeg', 'dicom' or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return None


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a chest X-ray file to a 2-D uint8 grayscale array (any size)."""
    path = Path(path)
    try:
        size = path.stat().st_size if path.is_file() else 0
        if size > MAX_FILE_BYTES:
            raise CxrError(f"{path}: {size / 2**30:.1f} GiB file, larger than any image accepted here")
        data = path.read_bytes()
    except IsADirectoryError:
        raise CxrError(f"{path}: folder contains no PNG, JPEG or DICOM images") from None
    except FileNotFoundError:
        raise CxrError(f"{path}: no such file (or a pattern that matched nothing)") from None
    except OSError as exc:
        raise CxrError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_image(data, str(path), path.suffix, max_pixels)


def decode_image(data: bytes, name: str, suffix: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded bytes (a file's or a request's) to 2-D uint8 grayscale; ``name`` prefixes errors."""
    if not data:
        raise CxrError(f"{name}: empty file (0 bytes)")
    kind = sniff_format(data[:132])
    if kind is None and suffix.lower() in DICOM_SUFFIXES:
        kind = "dicom"  # DICOM files without the 128-byte preamble still exist in the wild
    if kind == "dicom":
        gray = _read_dicom(data, name, max_pixels)
    elif kind in ("png", "jpeg"):
        gray = _read_raster(data, name, kind, max_pixels)
    else:
        raise CxrError(f"{name}: not a PNG, JPEG or DICOM image")
    if min(gray.shape) < MIN_SIDE:
        raise CxrError(f"{name}: image is {gray.shape[1]}x{gray.shape[0]} px, smaller than {MIN_SIDE} px a side")
    return gray


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise CxrError(
            f"{name}: {width}x{height} px exceeds the pixel limit of {max_pixels:,} (raise --max-pixels if genuine)"
        )


def _read_raster(data: bytes, name: str, kind: str, max_pixels: int) -> np.ndarray:
    from PIL import Image  # header-only read, so the size check happens before any decode

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Exception as exc:  # PIL raises many types for broken headers
        raise CxrError(f"{name}: corrupt {kind.upper()} header ({type(exc).__name__})") from None
    _check_pixels(name, width, height, max_pixels)
    encoded = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    if image is None or image.shape[0] != height or image.shape[1] != width:
        raise CxrError(f"{name}: corrupt or truncated {kind.upper()} data")
    if kind == "jpeg" and _jpeg_truncated(encoded):
        raise CxrError(f"{name}: truncated JPEG (no end-of-image marker)")
    return to_uint8(to_gray(image))


def _jpeg_truncated(data: np.ndarray) -> bool:
    tail = data[-2048:].tobytes().rstrip(b"\x00\r\n ")
    return not tail.endswith(b"\xff\xd9")


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


def to_uint8(image: np.ndarray) -> np.ndarray:
    """8-bit stays as is; 16-bit, integer or float data are stretched min..max onto 0..255."""
    if image.dtype == np.uint8:
        return image
    values = image.astype(np.float64)
    low, high = float(np.min(values)), float(np.max(values))
    if not np.isfinite(low) or not np.isfinite(high):
        raise CxrError("image has non-finite pixel values")
    if high <= low:
        return np.zeros(image.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _read_dicom(data: bytes, path: str, max_pixels: int) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise CxrError(f"{path}: corrupt DICOM ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise CxrError(f"{path}: DICOM has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise CxrError(
            f"{path}: DICOM photometric interpretation {photometric or 'missing'} is not supported "
            "(chest X-rays are MONOCHROME1/2)"
        )
    _check_pixels(path, int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), max_pixels)
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax) or "unknown"
        raise CxrError(f"{path}: cannot decode DICOM pixel data (transfer syntax {name}: {exc})") from None
    if pixels.ndim != 2:
        raise CxrError(f"{path}: DICOM pixel data has shape {pixels.shape}; expected one 2-D frame")
    values = apply_modality_lut(pixels, ds)
    values = apply_voi_lut(values, ds) if ("WindowCenter" in ds or "VOILUTSequence" in ds) else values
    values = np.asarray(values, dtype=np.float64)
    if photometric == "MONOCHROME1":  # high values are dark: invert so bone is bright as in MONOCHROME2
        values = values.max() + values.min() - values
    return to_uint8(values)


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


def preprocess(gray: np.ndarray, size: int) -> np.ndarray:
    """Deterministic evaluation preprocessing: short side -> size, centre crop; uint8 (size, size)."""
    return np.ascontiguousarray(center_crop(resize_short_side(gray, size), size))


def load_and_preprocess(path: str | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    return preprocess(read_image(path, max_pixels), size)
