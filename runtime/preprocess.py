"""The single preprocessing definition, shared by training, export and the bedside runtime.

decode (PNG/JPEG 8/16-bit, DICOM) -> grayscale uint8 -> [thorax crop, CLAHE] -> short side to ``size`` ->
centre crop -> [border band]; the bracketed steps are the card's shortcut suppression
(``cxr.runtime.suppress``). Every problem with a file is a one-line ``CxrError``, so a batch can record it and
go on."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from cxr.runtime.errors import CxrError, one_line
from cxr.runtime.suppress import view_steps, whole_film_steps_with_mask

if TYPE_CHECKING:
    from cxr.runtime.card import Preprocessing

DEFAULT_MAX_PIXELS = 64_000_000  # decompression-bomb guard; a 4k x 4k DICOM is 16 MP
MIN_SIDE = 16
SMALL_SIDE = 64  # below this a "radiograph" is an icon or thumbnail: warned
NEAR_BINARY_SHARE = 0.95  # two grey levels covering this share of pixels: a mask or a document, warned
RADIOGRAPH_MODALITIES = {"CR", "DX"}
MAX_FILE_BYTES = 1 << 30  # an uncompressed 16-bit RGBA image at the pixel limit is 512 MB
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic", ".tif", ".tiff", ".bmp", ".webp", ".gif"}


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

    DICOM first: its 128-byte preamble may itself hold a TIFF header (dual-personality files)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    for kind, magic in RASTER_SIGNATURES:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


@dataclass(frozen=True)
class Decoded:
    """A decoded image and what a clinician should know about it (not a radiograph? converted colour?)."""

    gray: np.ndarray
    warnings: tuple[str, ...] = ()


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode a chest X-ray file to 2-D uint8 grayscale (any size), with its warnings."""
    path = Path(path)
    try:
        size = path.stat().st_size if path.is_file() else 0
        if size > MAX_FILE_BYTES:
            raise CxrError(f"{path}: {size / 2**30:.1f} GiB file, larger than any image accepted here")
        data = path.read_bytes()
    except IsADirectoryError:
        raise CxrError(f"{path}: folder contains no images") from None
    except FileNotFoundError:
        raise CxrError(f"{path}: no such file (or a pattern that matched nothing)") from None
    except OSError as exc:
        raise CxrError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode(data, str(path), path.suffix, max_pixels)


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a chest X-ray file to a 2-D uint8 grayscale array (any size)."""
    return load_image(path, max_pixels).gray


def decode_image(
    data: bytes, name: str, suffix: str = "", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode encoded bytes (a file's or a request's) to 2-D uint8 grayscale; ``name`` prefixes errors."""
    return decode(data, name, suffix, max_pixels).gray


def decode(data: bytes, name: str, suffix: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Encoded bytes -> grayscale and warnings. Every problem is one cause-first line naming ``name``."""
    if not data:
        raise CxrError(f"{name}: empty file (0 bytes)")
    kind = sniff_format(data[:132])
    if kind is None and suffix.lower() in DICOM_SUFFIXES:
        kind = "dicom"  # DICOM files without the 128-byte preamble still exist in the wild
    notes: list[str] = []
    if kind == "dicom":
        gray = _read_dicom(data, name, max_pixels, notes)
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
    counts = np.bincount(
        gray[:: max(1, gray.shape[0] // 256), :: max(1, gray.shape[1] // 256)].ravel(), minlength=256
    )
    if np.sort(counts)[-2:].sum() >= NEAR_BINARY_SHARE * counts.sum():
        notes.append("near-binary image (two grey levels: a mask or a scanned document?)")
    return notes


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise CxrError(
            f"{name}: {width}x{height} px exceeds the pixel limit of {max_pixels:,} (raise --max-pixels if "
            "genuine)"
        )


EXIF_ORIENTATION = 0x0112


def _read_raster(data: bytes, name: str, kind: str, max_pixels: int, notes: list[str]) -> np.ndarray:
    """Size and EXIF orientation from the header (Pillow, no decode), the --max-pixels check, then the
    decode."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = (
        None  # --max-pixels below is the one limit (Pillow's own fired before it was read)
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                _check_pixels(name, width, height, max_pixels)
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


DEFLATED_SYNTAX = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: zlib over the whole dataset
RADIOGRAPH_SOP_CLASSES = {  # CR, DX (presentation and processing), digitised film (secondary capture)
    "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.7",
}
COLOUR_PHOTOMETRICS = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR"}


def _dicom_int(ds: object, keyword: str, path: str, default: int | None = None) -> int:
    """An integer attribute, or a one-line error that names it and its value."""
    value = ds.get(keyword, default)
    if value is None:
        raise CxrError(f"{path}: DICOM attribute {keyword} is missing")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CxrError(
            f"{path}: DICOM attribute {keyword} = {str(value)[:40]!r} is not a whole number"
        ) from None


def _read_dicom(data: bytes, path: str, max_pixels: int, notes: list[str]) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    _check_inflated_size(data, path, max_pixels)
    try:
        with warnings.catch_warnings():  # pydicom's multi-line UserWarnings: the problems that matter raise
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise CxrError(f"{path}: corrupt DICOM ({type(exc).__name__}: {one_line(exc, 120)})") from None
    if "PixelData" not in ds:
        raise CxrError(f"{path}: DICOM has no pixel data (a report, plan or directory, not an image)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") and photometric not in COLOUR_PHOTOMETRICS:
        raise CxrError(
            f"{path}: DICOM PhotometricInterpretation {photometric or 'is missing'}: not an image this "
            "runtime reads (MONOCHROME1/2, RGB, YBR)"
        )
    columns, rows = _dicom_int(ds, "Columns", path), _dicom_int(ds, "Rows", path)
    frames = max(1, _dicom_int(ds, "NumberOfFrames", path, 1))
    _check_pixels(path, columns, rows * frames, max_pixels)  # every frame is decoded: all count
    _check_pixel_data_length(ds, path, rows * columns * frames)
    _dicom_warnings(ds, notes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except Exception as exc:
        raise CxrError(f"{path}: {_decode_failure(ds, exc)}") from None
    if frames > 1 and pixels.ndim >= 3:
        notes.append(f"{frames} frames: the first is used")
        pixels = pixels[0]
    if photometric in COLOUR_PHOTOMETRICS:
        rgb = apply_color_lut(pixels, ds) if photometric == "PALETTE COLOR" else pixels
        notes.append(f"colour DICOM ({photometric}) converted to luminance")
        return to_uint8(cv2.cvtColor(np.asarray(rgb).astype(np.float32), cv2.COLOR_RGB2GRAY))
    if pixels.ndim != 2:
        raise CxrError(f"{path}: DICOM pixel data has shape {pixels.shape}; expected one 2-D frame")
    values = apply_modality_lut(pixels, ds)
    values = apply_voi_lut(values, ds) if ("WindowCenter" in ds or "VOILUTSequence" in ds) else values
    values = np.asarray(values, dtype=np.float64)
    if photometric == "MONOCHROME1":  # high values are dark: invert so bone is bright as in MONOCHROME2
        values = values.max() + values.min() - values
    return to_uint8(values)


def _max_decoded_bytes(max_pixels: int) -> int:
    """The most memory one admitted image may need: 16-bit, 3 samples, at the pixel limit, plus 1 MB of
    header."""
    return max_pixels * 2 * 3 + (1 << 20)


def _check_inflated_size(data: bytes, path: str, max_pixels: int) -> None:
    """A deflated dataset is inflated here first under a hard cap (pydicom would inflate it whole): a 2 MB
    file must not become gigabytes in memory."""
    import zlib

    if DEFLATED_SYNTAX not in data[:4096]:
        return
    import pydicom

    stream = io.BytesIO(data)
    try:
        pydicom.filereader.read_preamble(stream, force=True)
        pydicom.filereader._read_file_meta_info(stream)
    except Exception as exc:
        raise CxrError(f"{path}: corrupt DICOM file meta ({type(exc).__name__})") from None
    cap = _max_decoded_bytes(max_pixels)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data[stream.tell() :], cap + 1)
    except zlib.error as exc:
        raise CxrError(f"{path}: corrupt deflated DICOM ({exc})") from None
    if len(inflated) > cap or inflater.unconsumed_tail:
        raise CxrError(
            f"{path}: deflated DICOM inflates to more than {cap:,} bytes, beyond what the pixel limit "
            f"of {max_pixels:,} admits (raise --max-pixels if genuine)"
        )


def _check_pixel_data_length(ds: object, path: str, pixels: int) -> None:
    """Uncompressed pixel data may not be much longer than Rows x Columns x frames x samples x bytes
    declare."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and getattr(syntax, "is_compressed", False):
        return
    expected = (
        pixels
        * max(1, _dicom_int(ds, "SamplesPerPixel", path, 1))
        * max(1, _dicom_int(ds, "BitsAllocated", path, 8))
        // 8
    )
    actual = len(ds.PixelData)
    if actual > 2 * expected + 4096:
        raise CxrError(
            f"{path}: DICOM pixel data is {actual:,} bytes, its header declares {expected:,} "
            "(Rows x Columns x frames x samples x bits); refused"
        )


def _dicom_warnings(ds: object, notes: list[str]) -> None:
    """A modality or SOP class that is not a radiograph (CT, MR, RT dose ...) gets a warning, not a
    diagnosis."""
    modality = str(ds.get("Modality", "")).strip()
    sop = str(ds.get("SOPClassUID", "")).strip()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        notes.append(f"DICOM Modality {modality} is not a radiograph (CR/DX)")
    elif sop and sop not in RADIOGRAPH_SOP_CLASSES:
        notes.append(f"DICOM SOP class {getattr(ds.SOPClassUID, 'name', sop)} is not a radiograph")


def _decode_failure(ds: object, exc: Exception) -> str:
    """Why the pixel data could not be decoded, cause first: a missing decoder names the extra that has it."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(syntax, "name", None) or str(syntax or "unknown")
    text = one_line(exc)
    tried = "raised by all available plugins" in text  # decoders exist and each refused these bytes
    if (
        syntax is not None
        and getattr(syntax, "is_compressed", False)
        and not tried
        and "plugin" in text.lower()
    ):
        return f"no decoder here for DICOM transfer syntax {name}: pip install 'cxr-edge[dicom]'"
    return f"cannot decode DICOM pixel data (transfer syntax {name}; corrupt or unsupported): {text[:160]}"


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
    return preprocess(read_image(path, max_pixels), size, pre)
