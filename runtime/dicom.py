"""DICOM files as a ward's archive holds them -> 2-D uint8 grayscale, with what a clinician should know.

pydicom reads the file (``force``: preamble-less and meta-less datasets exist), then the standard's grayscale
pipeline runs: modality LUT (or rescale) -> VOI (VOI LUT or window) -> presentation (MONOCHROME1, Presentation
LUT Shape) -> 8 bits by the card's ``dicom_window`` step. A value the standard forbids or pydicom cannot apply
falls back with a warning on the record; a file that cannot give pixels is one cause-first ``CxrError`` line.
Nothing here prints: pydicom's warnings become the record's warnings."""

from __future__ import annotations

import io
import math
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import cv2
import numpy as np
from cxr.runtime.card import DICOM_WINDOWS
from cxr.runtime.errors import CxrError, one_line
from cxr.runtime.optional import install_hint

DEFLATED_SYNTAX = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: zlib over the whole dataset
RADIOGRAPH_MODALITIES = {"CR", "DX"}
RADIOGRAPH_SOP_CLASSES = {  # CR, DX (presentation and processing), digitised film (secondary capture)
    "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.7",
}
CHEST_PARTS = {"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LAT", "PORT CHEST", "TORAX", "THORAX_CHEST"}
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLO", "RLO"}
COLOUR_PHOTOMETRICS = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR"}
PALETTE_CHANNELS = ("Red", "Green", "Blue")
LUT_BITS_READ_AS_16 = range(10, 16)  # the standard allows 8 or 16 bits a modality LUT entry; devices write 12

# Sniffing a dataset without preamble: explicit VRs, the ones with a 4-byte length, and the longest value a
# group 0002/0008 element plausibly has.
EXPLICIT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH".split()
    + b"SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
LONG_LENGTH_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
UNDEFINED_LENGTH = 0xFFFFFFFF
MAX_HEADER_VALUE = 1 << 16
FIRST_GROUPS = (0x0002, 0x0008)  # file meta written without preamble, or a raw dataset (ACR-NEMA era)
SNIFF_ELEMENTS = 3

# warnings.catch_warnings swaps process-wide state (the filter list and showwarning) and puts back what it saw
# on entry, so two threads inside it at once (train/data.py decodes in threads) restore each other's state and
# can leave every later warning recorded into a dead list. Every such block in this runtime takes this lock
# (the raster header read too): DICOM decodes in different threads then run one at a time, which the rare
# DICOM training set can afford; a process-wide "ignore" filter would lose the warnings a record should carry.
WARNINGS_LOCK = threading.Lock()


def raw_dataset_encoding(head: bytes) -> str | None:
    """'implicit' or 'explicit' when ``head`` starts a little-endian dataset without the 128-byte preamble
    (the classic CR-MONO1-10-chest film: group 0008 straight away, no "DICM", no file meta), else None.

    Conservative, since it sorts a folder's files into images and other files: the first elements must parse
    as ascending tags starting in group 0002 or 0008, with known VRs (explicit) and even, sane lengths."""
    for implicit in (False, True):
        if _elements_plausible(head, implicit):
            return "implicit" if implicit else "explicit"
    return None


def _elements_plausible(head: bytes, implicit: bool) -> bool:
    """At least two element headers in ``head`` parse as the start of a dataset in this VR encoding."""
    offset, previous, parsed = 0, (-1, -1), 0
    while parsed < SNIFF_ELEMENTS and offset + 8 <= len(head):
        tag = struct.unpack_from("<HH", head, offset)
        if tag <= previous or (parsed == 0 and tag[0] not in FIRST_GROUPS):
            return False
        header = _element_header(head, offset, implicit and tag[0] != 0x0002)  # file meta: explicit VR
        if header is None:
            return parsed >= 2
        size, length = header
        if length == UNDEFINED_LENGTH:
            return parsed + 1 >= 2  # a sequence: its items cannot be skipped here
        if length % 2 or length > MAX_HEADER_VALUE or (tag[1] == 0 and length != 4):
            return False  # DICOM values have even lengths; a group length is one UL
        previous, parsed, offset = tag, parsed + 1, offset + size + length
    return parsed >= 2


def _element_header(head: bytes, offset: int, implicit: bool) -> tuple[int, int] | None:
    """(header size, value length) of the element at ``offset``; (0, odd) for an impossible VR; None when the
    header runs past ``head``."""
    if implicit:
        return 8, struct.unpack_from("<I", head, offset + 4)[0]
    vr = head[offset + 4 : offset + 6]
    if vr not in EXPLICIT_VRS:
        return 0, 1
    if vr not in LONG_LENGTH_VRS:
        return 8, struct.unpack_from("<H", head, offset + 6)[0]
    if offset + 12 > len(head):
        return None
    if head[offset + 6 : offset + 8] != b"\0\0":
        return 0, 1
    return 12, struct.unpack_from("<I", head, offset + 8)[0]


@contextmanager
def warnings_as_notes(notes: list[str] | None) -> Iterator[None]:
    """Warnings raised inside become ``notes`` (one short line each, deduplicated; None drops them), never
    printed. Holds ``WARNINGS_LOCK`` (see there why)."""
    with WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught if notes is not None else ():
                text = str(warning.message).split(" Please see ")[0]  # pydicom's link to the standard
                line = f"pydicom: {one_line(text, 160)}"
                if issubclass(warning.category, UserWarning) and line not in notes:
                    notes.append(line)


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


def check_pixel_limit(name: str, width: int, height: int, max_pixels: int) -> None:
    """The decompression-bomb guard, before any decode."""
    if width * height > max_pixels:
        raise CxrError(
            f"{name}: {width}x{height} px exceeds the pixel limit of {max_pixels:,} (raise --max-pixels if "
            "genuine)"
        )


def read_dicom(
    data: bytes, name: str, max_pixels: int, notes: list[str], dicom_window: str = "window"
) -> np.ndarray:
    """A DICOM file's first frame as 2-D uint8 grayscale; warnings go to ``notes``. ``dicom_window`` is the
    card's step: "window" maps a window's output range onto 0..255, "minmax" the windowed values' range."""
    if dicom_window not in DICOM_WINDOWS:
        raise CxrError(f"dicom_window must be one of {', '.join(DICOM_WINDOWS)}, got {dicom_window!r}")
    check_inflated_size(data, name, max_pixels)
    with warnings_as_notes(notes):
        ds = _parse(data, name)
        photometric, frames = _check_header(ds, name, max_pixels)
        _dicom_warnings(ds, name, notes)
        pixels = _pixel_array(ds, name)
        if frames > 1 and pixels.ndim >= 3:
            notes.append(f"{frames} frames: the first is used")
            pixels = pixels[0]
        if photometric in COLOUR_PHOTOMETRICS:
            return _colour_to_gray(pixels, ds, name, photometric, notes)
        if pixels.ndim != 2:
            raise CxrError(f"{name}: DICOM pixel data has shape {pixels.shape}; expected one 2-D frame")
        return _gray_to_uint8(pixels, ds, name, photometric, dicom_window, notes)


def _parse(data: bytes, name: str) -> Any:
    """The dataset, with a transfer syntax set when the file has none (raw datasets), so its pixels decode."""
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise CxrError(f"{name}: corrupt DICOM ({type(exc).__name__}: {one_line(exc, 120)})") from None
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding  # how pydicom found the dataset encoded
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = syntax if little is not False else ExplicitVRBigEndian
    return ds


def _attr(ds: Any, keyword: str, name: str, default: Any = None) -> Any:
    """An attribute's value, or a one-line error naming it when pydicom cannot read it (an odd VR, a bad
    value)."""
    try:
        value = ds.get(keyword, default)
    except Exception as exc:
        raise CxrError(
            f"{name}: DICOM attribute {keyword} cannot be read ({type(exc).__name__}: {one_line(exc, 100)})"
        ) from None
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _text(ds: Any, keyword: str, name: str) -> str:
    return str(_attr(ds, keyword, name, "") or "").strip()


def _dicom_int(ds: Any, keyword: str, name: str, default: int | None = None) -> int:
    """An integer attribute, or a one-line error that names it and its value."""
    value = _attr(ds, keyword, name, default)
    if value is None:
        raise CxrError(f"{name}: DICOM attribute {keyword} is missing")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CxrError(
            f"{name}: DICOM attribute {keyword} = {str(value)[:40]!r} is not a whole number"
        ) from None


def _check_header(ds: Any, name: str, max_pixels: int) -> tuple[str, int]:
    """Everything that must hold before pixels are decoded; returns (photometric interpretation, frames)."""
    if "PixelData" not in ds:
        raise CxrError(f"{name}: DICOM has no pixel data (a report, plan or directory, not an image)")
    photometric = _text(ds, "PhotometricInterpretation", name)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") and photometric not in COLOUR_PHOTOMETRICS:
        raise CxrError(
            f"{name}: DICOM PhotometricInterpretation {photometric or 'is missing'}: not an image this "
            "runtime reads (MONOCHROME1/2, RGB, YBR)"
        )
    columns, rows = _dicom_int(ds, "Columns", name), _dicom_int(ds, "Rows", name)
    frames = max(1, _dicom_int(ds, "NumberOfFrames", name, 1))
    check_pixel_limit(name, columns, rows * frames, max_pixels)  # every frame is decoded: all count
    _check_pixel_data_length(ds, name, rows * columns * frames, photometric)
    if photometric == "PALETTE COLOR":
        _check_palette(ds, name)
    return photometric, frames


def _check_pixel_data_length(ds: Any, name: str, pixels: int, photometric: str) -> None:
    """Native pixel data must hold what Rows x Columns x frames x samples x bits declare (a truncated file
    does not), and may not be much longer."""
    element = _attr(ds, "PixelData", name)  # converts the raw element, so an odd VR is named
    if ds["PixelData"].is_undefined_length or element is None:
        return  # encapsulated (compressed) frames: their decoder checks them
    samples = max(1, _dicom_int(ds, "SamplesPerPixel", name, 1))
    expected = (pixels * samples * max(1, _dicom_int(ds, "BitsAllocated", name, 8)) + 7) // 8
    if photometric == "YBR_FULL_422" and samples == 3:
        expected = expected * 2 // 3  # two chroma samples are shared by each pair of pixels
    actual = len(element)
    if actual < expected:
        raise CxrError(
            f"{name}: DICOM pixel data has {actual:,} of the {expected:,} bytes its header declares "
            "(Rows x Columns x frames x samples x bits): a truncated file?"
        )
    if actual > 2 * expected + 4096:
        raise CxrError(
            f"{name}: DICOM pixel data is {actual:,} bytes, its header declares {expected:,} "
            "(Rows x Columns x frames x samples x bits); refused"
        )


def _check_palette(ds: Any, name: str) -> None:
    """PALETTE COLOR pixels are indices: without the red, green and blue tables there is no picture."""
    descriptors = [f"{c}PaletteColorLookupTableDescriptor" for c in PALETTE_CHANNELS]
    tables = [f"{c}PaletteColorLookupTableData" for c in PALETTE_CHANNELS]
    segmented = [f"Segmented{c}PaletteColorLookupTableData" for c in PALETTE_CHANNELS]
    missing = [keyword for keyword in descriptors if keyword not in ds]
    if not all(keyword in ds for keyword in segmented):
        missing += [keyword for keyword in tables if keyword not in ds]
    if missing:
        raise CxrError(f"{name}: DICOM PALETTE COLOR image without its palette: {', '.join(missing)} missing")


def _dicom_warnings(ds: Any, name: str, notes: list[str]) -> None:
    """A modality or SOP class that is not a radiograph (CT, MR, RT dose ...) gets a warning, not a
    diagnosis."""
    modality, sop = _text(ds, "Modality", name), _text(ds, "SOPClassUID", name)
    if modality and modality not in RADIOGRAPH_MODALITIES:
        notes.append(f"DICOM Modality {modality} is not a radiograph (CR/DX)")
    elif sop and sop not in RADIOGRAPH_SOP_CLASSES:
        notes.append(f"DICOM SOP class {getattr(ds.SOPClassUID, 'name', sop)} is not a radiograph")
    part = _text(ds, "BodyPartExamined", name).upper()
    if part and part not in CHEST_PARTS:  # a CR of the hip passes the modality check: the header still tells
        notes.append(f"DICOM BodyPartExamined {part[:16]} is not the chest")
    view = _text(ds, "ViewPosition", name).upper()
    if view in LATERAL_VIEWS:
        notes.append(f"DICOM ViewPosition {view}: a lateral view (the model learned frontal PA/AP films)")


def _pixel_array(ds: Any, name: str) -> np.ndarray:
    """The decoded pixels; a decoder raising anything is one line naming the transfer syntax."""
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:
        raise CxrError(f"{name}: {_decode_failure(ds, exc)}") from None


def _decode_failure(ds: Any, exc: Exception) -> str:
    """Why the pixel data could not be decoded, cause first: a missing decoder names the extra that has it."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(syntax, "name", None) or str(syntax or "unknown")
    text = one_line(exc)
    tried = "raised by all available plugins" in text  # decoders exist and each refused these bytes
    try:
        compressed = syntax is not None and syntax.is_compressed
    except Exception:  # pydicom raises for a UID it does not know as a transfer syntax
        compressed = False
    if compressed and not tried and "plugin" in text.lower():
        return f"no decoder here for DICOM transfer syntax {name}: {install_hint('pylibjpeg')}"
    return (
        f"cannot decode DICOM pixel data (transfer syntax {name}; corrupt or unsupported): "
        f"{type(exc).__name__}: {text[:160]}"
    )


def _colour_to_gray(pixels: np.ndarray, ds: Any, name: str, photometric: str, notes: list[str]) -> np.ndarray:
    """Colour (RGB, YBR as pydicom converts it, or palette indices through their tables) -> luminance."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            pixels = apply_color_lut(pixels, ds)
        except Exception as exc:
            raise CxrError(
                f"{name}: DICOM palette cannot be applied ({type(exc).__name__}: {one_line(exc, 120)})"
            ) from None
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise CxrError(f"{name}: DICOM {photometric} pixel data has shape {pixels.shape}; expected colour")
    notes.append(f"colour DICOM ({photometric}) converted to luminance")
    return to_uint8(cv2.cvtColor(np.asarray(pixels[..., :3]).astype(np.float32), cv2.COLOR_RGB2GRAY))


def _gray_to_uint8(
    pixels: np.ndarray, ds: Any, name: str, photometric: str, dicom_window: str, notes: list[str]
) -> np.ndarray:
    """Modality -> VOI -> presentation -> 8 bits. "minmax" stretches the shown values' own min..max (as
    bundles before the card step did, byte for byte); "window" maps the VOI's output range (the window
    clips)."""
    values = _modality(pixels, ds, notes)
    shown, out_range = _voi(values, ds, notes)
    shown = np.asarray(shown, dtype=np.float64)
    if not np.isfinite(shown).all():
        raise CxrError(f"{name}: DICOM pixel values are not finite after the modality LUT or rescale")
    if out_range is not None and shown.min() == shown.max() and np.ptp(values) > 0:
        notes.append(f"{_voi_description(ds)} sends every pixel to one value: no window, full range shown")
        shown, out_range = np.asarray(values, dtype=np.float64), None
    window = dicom_window == "window" and out_range is not None
    low, high = out_range if window else (shown.min(), shown.max())
    if _inverted(ds, photometric, notes):  # bone bright, as MONOCHROME2 shows it
        shown = high + low - shown
    if not window:
        return to_uint8(shown)
    return np.round((np.clip(shown, low, high) - low) * (255.0 / (high - low))).astype(np.uint8)


def _modality(pixels: np.ndarray, ds: Any, notes: list[str]) -> np.ndarray:
    """Stored values -> modality values (LUT or rescale). A 10..15-bit LUT descriptor (pydicom: "uint12 not
    understood") is read as 16-bit; any other failure falls back to rescale, then to the stored values."""
    from pydicom.pixels import apply_modality_lut

    try:
        sequence = ds.get("ModalityLUTSequence")
        if sequence:
            _widen_lut_descriptor(sequence[0], notes)
        elif _zero_slope(ds):  # every pixel would become the intercept: a header fault, not a blank film
            notes.append("DICOM RescaleSlope = 0 (every pixel would be the intercept): stored values used")
            for keyword in ("RescaleSlope", "RescaleIntercept"):
                if keyword in ds:
                    delattr(ds, keyword)
            return pixels
        return apply_modality_lut(pixels, ds)
    except Exception as exc:
        cause = one_line(exc, 100)
    if "ModalityLUTSequence" in ds:
        notes.append(f"DICOM ModalityLUTSequence cannot be applied ({cause}): rescale or stored values used")
        del ds.ModalityLUTSequence  # so neither the rescale nor the window's range reads it again
        try:
            return apply_modality_lut(pixels, ds)
        except Exception as exc:
            cause = one_line(exc, 100)
    notes.append(f"DICOM RescaleSlope/RescaleIntercept cannot be applied ({cause}): stored values used")
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            delattr(ds, keyword)
    return pixels


def _zero_slope(ds: Any) -> bool:
    try:
        return "RescaleSlope" in ds and float(ds.RescaleSlope) == 0
    except (TypeError, ValueError):
        return False


def _widen_lut_descriptor(item: Any, notes: list[str]) -> None:
    """LUT Descriptor bits 10..15 -> 16: the entries are stored in 16-bit words either way."""
    descriptor = list(item.LUTDescriptor)
    if len(descriptor) == 3 and descriptor[2] in LUT_BITS_READ_AS_16:
        notes.append(
            f"DICOM Modality LUT Descriptor says {descriptor[2]} bits per entry (the standard allows 8 or "
            "16): read as 16-bit"
        )
        item.LUTDescriptor = [descriptor[0], descriptor[1], 16]


def _voi(values: np.ndarray, ds: Any, notes: list[str]) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The VOI transform's output and its known output range; (values, None) when no VOI applies. A VOI LUT
    Sequence is preferred (as in pydicom); one pydicom cannot apply falls back to the window, then to none."""
    from pydicom.pixels import apply_windowing

    if "VOILUTSequence" in ds:
        try:
            if ds.VOILUTSequence:  # an empty sequence is no LUT
                return _voi_lut(values, ds)
        except Exception as exc:
            notes.append(f"DICOM VOILUTSequence cannot be applied ({one_line(exc, 100)}): not used")
        del ds.VOILUTSequence  # what follows (the window, its description) must not read it
    if not _window_usable(ds, notes):
        return values, None
    try:
        with np.errstate(all="ignore"):  # pydicom's y range: what it gives below and above the window
            ends = apply_windowing(np.array([-np.inf, np.inf]), ds)
        return apply_windowing(values, ds), _value_range(ends)
    except Exception as exc:
        notes.append(
            f"{_voi_description(ds)} cannot be applied ({one_line(exc, 100)}): no window, full range shown"
        )
        return values, None


def _voi_lut(values: np.ndarray, ds: Any) -> tuple[np.ndarray, tuple[float, float]]:
    """The first VOI LUT applied by pydicom, and the range of its entries (what it can output)."""
    from pydicom.pixels import apply_voi

    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    entries, first = (descriptor[0] or 1 << 16), descriptor[1]
    table = apply_voi(np.arange(first, first + entries), ds)
    return apply_voi(_as_indices(values), ds), _value_range(table)


def _as_indices(values: np.ndarray) -> np.ndarray:
    """Whole-number floats (a rescale of 1 and 0) -> integers: LUTs index by integers, and pydicom warns that
    a float index "may give incorrect results"."""
    if values.dtype.kind == "f" and np.isfinite(values).all() and np.array_equal(values, np.round(values)):
        return values.astype(np.int64)
    return values


def _value_range(outputs: np.ndarray) -> tuple[float, float]:
    """The range a VOI can output; a VOI that sends everything to one value is refused (callers fall back)."""
    low, high = float(np.min(outputs)), float(np.max(outputs))
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"its output range is {low:g}..{high:g}")
    return low, high


def _window_usable(ds: Any, notes: list[str]) -> bool:
    """Whether the window attributes can be handed to pydicom; why not is a warning naming them (the standard
    wants both, as numbers in equal multiplicity, a width >= 1 for LINEAR and > 0 otherwise)."""
    numbers = {keyword: _numbers(ds, keyword) for keyword in ("WindowCenter", "WindowWidth")}
    given = [keyword for keyword, values in numbers.items() if values != []]
    if not given:
        return False
    if len(given) == 1:
        missing = "WindowWidth" if given == ["WindowCenter"] else "WindowCenter"
        notes.append(f"DICOM {missing} is missing beside {given[0]}: no window, full range shown")
        return False
    for keyword, values in numbers.items():
        if values is None or not all(math.isfinite(v) for v in values):
            raw = one_line(ds[keyword].value, 40)
            notes.append(f"DICOM {keyword} = {raw!r} is not a number: no window, full range shown")
            return False
    centers, widths = numbers["WindowCenter"], numbers["WindowWidth"]
    if len(centers) != len(widths):
        notes.append(
            f"DICOM WindowCenter has {len(centers)} values and WindowWidth {len(widths)}: no window, full "
            "range shown"
        )
        return False
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if widths[0] < 1 if function == "LINEAR" else widths[0] <= 0:
        least = "at least 1" if function == "LINEAR" else "above 0"
        notes.append(
            f"DICOM WindowWidth = {widths[0]:g} (the standard wants {least} for {function}): no window, full "
            "range shown"
        )
        return False
    return True


def _numbers(ds: Any, keyword: str) -> list[float] | None:
    """An attribute's values as floats: [] when absent or empty, None when one is not a number."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return []
        single = isinstance(value, (str, bytes)) or not isinstance(value, Iterable)  # VM 1, or a MultiValue
        return [float(v) for v in ([value] if single else value)]
    except Exception:
        return None


def _voi_description(ds: Any) -> str:
    """The window or VOI LUT in a warning, e.g. 'DICOM window WindowCenter 40, WindowWidth 1'."""
    if "WindowCenter" in ds and "WindowWidth" in ds and "VOILUTSequence" not in ds:
        center, width = (one_line(ds[k].value, 30) for k in ("WindowCenter", "WindowWidth"))
        return f"DICOM window (WindowCenter {center}, WindowWidth {width})"
    return "DICOM VOI LUT"


def _inverted(ds: Any, photometric: str, notes: list[str]) -> bool:
    """Whether high values are dark: MONOCHROME1, or Presentation LUT Shape INVERSE on MONOCHROME2. The
    standard pairs MONOCHROME1 with INVERSE, so the two invert once; IDENTITY on MONOCHROME1 contradicts the
    photometric interpretation, which is followed."""
    try:
        shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    except Exception:
        shape = "?"
    if shape not in ("", "IDENTITY", "INVERSE"):
        notes.append(f"DICOM PresentationLUTShape {shape[:20]!r} is unknown (IDENTITY or INVERSE): ignored")
    if photometric == "MONOCHROME1":
        if shape == "IDENTITY":
            notes.append(
                "DICOM PresentationLUTShape IDENTITY contradicts MONOCHROME1 (the standard pairs it with "
                "INVERSE): MONOCHROME1 followed, high values shown dark"
            )
        return True
    return shape == "INVERSE"


def _max_decoded_bytes(max_pixels: int) -> int:
    """The most memory one admitted image may need: 16-bit, 3 samples, at the pixel limit, plus 1 MB of
    header."""
    return max_pixels * 2 * 3 + (1 << 20)


def check_inflated_size(data: bytes, name: str, max_pixels: int) -> None:
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
        raise CxrError(f"{name}: corrupt DICOM file meta ({type(exc).__name__})") from None
    cap = _max_decoded_bytes(max_pixels)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data[stream.tell() :], cap + 1)
    except zlib.error as exc:
        raise CxrError(f"{name}: corrupt deflated DICOM ({exc})") from None
    if len(inflated) > cap or inflater.unconsumed_tail:
        raise CxrError(
            f"{name}: deflated DICOM inflates to more than {cap:,} bytes, beyond what the pixel limit "
            f"of {max_pixels:,} admits (raise --max-pixels if genuine)"
        )
