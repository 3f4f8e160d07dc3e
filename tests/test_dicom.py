"""DICOM files as a ward's archive holds them (cxr.runtime.dicom); every case is generated with pydicom."""

import io
import threading
import warnings
import zipfile

import numpy as np
import pytest
from cxr.runtime.errors import CxrError
from cxr.runtime.preprocess import decode, load_image, read_image, sniff_format

pydicom = pytest.importorskip("pydicom")
from pydicom.dataelem import RawDataElement  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_dataset  # noqa: E402
from pydicom.tag import Tag  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid  # noqa: E402

RAMP = np.tile(np.linspace(0, 4080, 96).astype(np.uint16), (80, 1))  # 12-bit stored values, dark to bright


def _dataset(pixels=RAMP, photometric="MONOCHROME2", **attributes):
    """A CR image dataset (no file meta) of ``pixels`` plus any attributes, set by keyword."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16 if pixels.dtype == np.uint16 else 8
    ds.BitsStored = 12 if pixels.dtype == np.uint16 else 8
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    return ds


def _save(path, ds, syntax=ExplicitVRLittleEndian):
    """A standard file: preamble, "DICM", file meta."""
    with warnings.catch_warnings():  # pydicom's complaints about the odd values some tests write on purpose
        warnings.simplefilter("ignore")
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(path, enforce_file_format=True)
    return path


def _raw(path, ds, implicit=True):
    """A bare little-endian dataset: no preamble, no "DICM", no file meta (the CR-MONO1-10-chest layout)."""
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = True, implicit
    write_dataset(stream, ds)
    path.write_bytes(stream.getvalue())
    return path


def _raw_value(ds, keyword, vr, value: bytes):
    """Set an attribute to bytes pydicom would refuse to build (a non-numeric DS, an odd-length US)."""
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
@pytest.mark.parametrize("name", ["film.dcm", "CR-MONO1-10-chest"])
def test_a_dataset_without_preamble_or_meta_decodes_whatever_its_name(tmp_path, implicit, name):
    raw = _raw(tmp_path / name, _dataset(), implicit)
    assert sniff_format(raw.read_bytes()[:132]) == "dicom"  # the 132 bytes inputs.py sniffs suffice
    standard = read_image(_save(tmp_path / "standard.dcm", _dataset()))
    assert np.array_equal(read_image(raw), standard)
    assert standard[0, 0] == 0 and standard[0, -1] == 255


def test_a_group_length_first_and_file_meta_without_preamble_are_recognised(tmp_path):
    acr_nema = _dataset()
    acr_nema.add_new(0x00080000, "UL", 0)  # old files open with the group length of group 0008
    raw = _raw(tmp_path / "acr", acr_nema, implicit=True)
    meta_first = _dataset()
    meta_first.file_meta = FileMetaDataset()
    meta_first.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta_first.preamble = None
    pydicom.dcmwrite(tmp_path / "meta_first", meta_first, enforce_file_format=False)
    for path in (raw, tmp_path / "meta_first"):
        assert path.read_bytes()[128:132] != b"DICM"
        assert sniff_format(path.read_bytes()[:132]) == "dicom", path.name
        assert read_image(path)[0, -1] == 255


def test_sniff_claims_no_random_bytes_text_json_or_archives():
    rng = np.random.default_rng(7)
    others = [rng.integers(0, 256, 1024, dtype=np.uint8).tobytes() for _ in range(2000)]
    others += [bytes([8, 0]) + rng.integers(0, 256, 1022, dtype=np.uint8).tobytes() for _ in range(2000)]
    others += [bytes([8, 0, 5, 0]) + rng.integers(0, 256, 1020, dtype=np.uint8).tobytes() for _ in range(500)]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("a.txt", "hello")
    others += [
        archive.getvalue(),
        b'{"classes": ["covid19"], "input": {"size": 224}}',
        b"patient,label\nP1,normal\n" * 20,
        b"%PDF-1.7\n" + bytes(200),
        bytes(1024),  # zeros: an empty preamble with no "DICM" after it
        b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100",  # one element only: not enough to judge
    ]
    claimed = [head[:16] for head in others if sniff_format(head) is not None]
    assert claimed == []
    raw = DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, False
    write_dataset(raw, _dataset())
    assert sniff_format(raw.getvalue()[:132]) == "dicom"  # the same check claims a real one


@pytest.mark.parametrize(
    "attributes,raw,named",
    [
        ({"WindowCenter": 2000, "WindowWidth": 0}, None, "WindowWidth = 0"),
        ({"WindowCenter": 2000, "WindowWidth": -400}, None, "WindowWidth = -400"),
        ({"WindowCenter": 2000}, ("WindowWidth", "DS", b"wide"), "WindowWidth = 'wide' is not a number"),
        ({"WindowWidth": 400}, None, "WindowCenter is missing"),
        ({"WindowCenter": [2000, 1000], "WindowWidth": 400}, None, "WindowCenter has 2 values"),
        (
            {"WindowCenter": 2000, "WindowWidth": 400, "VOILUTFunction": "CUBIC"},
            None,
            "Unsupported (0028,1056) VOI LUT Function value 'CUBIC'",
        ),
    ],
    ids=["width-0", "width-negative", "width-text", "center-missing", "multiplicity", "unknown-function"],
)
def test_a_window_the_standard_forbids_shows_the_full_range_with_a_warning(tmp_path, attributes, raw, named):
    ds = _dataset(**attributes)
    if raw:
        _raw_value(ds, *raw)
    decoded = load_image(_save(tmp_path / "w.dcm", ds), dicom_window="window")
    assert np.array_equal(decoded.gray, read_image(_save(tmp_path / "plain.dcm", _dataset())))
    assert any(named in w and "full range" in w for w in decoded.warnings), decoded.warnings


@pytest.mark.parametrize(
    "bits,entries,cause",
    [(9, list(range(4096)), "9' bits per LUT entry"), (16, [700] * 4096, "output range is 700..700")],
    ids=["9-bit", "constant"],  # pydicom raises NotImplementedError; a LUT with one output is no LUT
)
def test_a_voi_lut_that_cannot_be_applied_falls_back_with_a_warning(tmp_path, bits, entries, cause):
    item = Dataset()
    item.LUTDescriptor = [4096, 0, bits]
    item.add_new(0x00283006, "US", entries)  # LUT Data
    decoded = load_image(_save(tmp_path / "voi.dcm", _dataset(VOILUTSequence=[item])))
    notes = [w for w in decoded.warnings if "VOILUTSequence cannot be applied" in w]
    assert len(notes) == 1 and cause in notes[0], decoded.warnings
    assert decoded.gray[0, 0] == 0 and decoded.gray[0, -1] == 255


def test_a_valid_voi_lut_maps_its_own_output_range(tmp_path):
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", [min(v, 2047) for v in range(4096)])  # clips: the right half is all 2047
    gray = read_image(_save(tmp_path / "voi.dcm", _dataset(VOILUTSequence=[item])))
    assert gray[0, -1] == 255 and gray[0, 0] == 0 and (gray[0, 48:] == 255).all()


def _modality_lut(bits, data: bytes, entries=4096):
    item = Dataset()
    item.LUTDescriptor = [entries, 0, bits]
    item.add_new(0x00283006, "OW", data)  # LUT Data
    item.ModalityLUTType = "US"
    return item


def test_a_12_bit_modality_lut_descriptor_is_read_as_16_bit(tmp_path):
    inverting = (4095 - np.arange(4096)).astype("<u2").tobytes()
    lut = _modality_lut(12, inverting)  # a real device wrote 12: pydicom says "uint12 not understood"
    decoded = load_image(_save(tmp_path / "lut12.dcm", _dataset(ModalityLUTSequence=[lut])))
    assert any("12 bits per entry" in w and "16-bit" in w for w in decoded.warnings), decoded.warnings
    assert decoded.gray[0, 0] == 255 and decoded.gray[0, -1] == 0  # the LUT was applied: it inverts


def test_a_modality_lut_that_fails_otherwise_falls_back_to_the_rescale(tmp_path):
    short = np.arange(10, dtype="<u2").tobytes()  # 10 entries where the descriptor says 4096
    ds = _dataset(ModalityLUTSequence=[_modality_lut(16, short)], RescaleSlope=-1, RescaleIntercept=4095)
    decoded = load_image(_save(tmp_path / "lut.dcm", ds))
    assert any("ModalityLUTSequence cannot be applied" in w for w in decoded.warnings), decoded.warnings
    assert decoded.gray[0, 0] == 255 and decoded.gray[0, -1] == 0  # the (inverting) rescale was used


def _palette(ds, entries=256):
    ramp = (np.arange(entries) * 257).astype("<u2").tobytes()  # grey: red = green = blue
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [entries, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", ramp)
    return ds


def test_palette_colour_without_its_tables_is_one_line_and_with_them_is_luminance(tmp_path):
    indices = np.tile(np.arange(96, dtype=np.uint8) * 2, (80, 1))
    bare = _save(tmp_path / "bare.dcm", _dataset(indices, "PALETTE COLOR"))
    with pytest.raises(CxrError) as raised:
        read_image(bare)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{bare}: DICOM PALETTE COLOR image without its")
    assert "RedPaletteColorLookupTableDescriptor" in message and "BluePaletteColorLookupTableData" in message
    decoded = load_image(_save(tmp_path / "pal.dcm", _palette(_dataset(indices, "PALETTE COLOR"))))
    assert any("colour DICOM (PALETTE COLOR) converted to luminance" in w for w in decoded.warnings)
    assert decoded.gray[0, 0] == 0 and decoded.gray[0, -1] == 255
    assert np.all(np.diff(decoded.gray[0].astype(int)) >= 0)  # the grey palette keeps the ramp's order


@pytest.mark.parametrize(
    "photometric,shape,inverted,contradiction",
    [
        ("MONOCHROME2", None, False, False),
        ("MONOCHROME2", "IDENTITY", False, False),
        ("MONOCHROME2", "INVERSE", True, False),
        ("MONOCHROME1", None, True, False),
        ("MONOCHROME1", "INVERSE", True, False),  # the standard's pairing: inverted once, not twice
        ("MONOCHROME1", "IDENTITY", True, True),  # contradicts the photometric, which is followed
    ],
)
def test_presentation_lut_shape_decides_which_way_bone_points(
    tmp_path, photometric, shape, inverted, contradiction
):
    attributes = {"PresentationLUTShape": shape} if shape else {}
    decoded = load_image(_save(tmp_path / "p.dcm", _dataset(RAMP, photometric, **attributes)))
    high_stored = (decoded.gray[0, 0], decoded.gray[0, -1])  # stored 0 on the left, 4080 on the right
    assert high_stored == ((255, 0) if inverted else (0, 255))
    assert any("contradicts MONOCHROME1" in w for w in decoded.warnings) == contradiction


def _old_minmax(path):
    """The decode before the card step: modality, VOI, MONOCHROME1 flip, min..max stretch of the result."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    values = apply_modality_lut(ds.pixel_array, ds)
    values = apply_voi_lut(values, ds) if ("WindowCenter" in ds or "VOILUTSequence" in ds) else values
    values = np.asarray(values, dtype=np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = values.max() + values.min() - values
    return np.round((values - values.min()) * (255.0 / (values.max() - values.min()))).astype(np.uint8)


def _film_with_outliers():
    """A film inside its window (1200..2600 of a 1000..3000 window) with 0.035 % of pixels far above it."""
    film = np.tile(np.linspace(1200, 2600, 200), (200, 1)).astype(np.uint16)
    outliers = film.copy()
    outliers.flat[:: len(film.flat) // 14] = 4000
    return film, outliers


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_window_minmax_is_the_old_decode_and_window_maps_the_window(tmp_path, photometric):
    window = {"WindowCenter": 2000, "WindowWidth": 2000, "RescaleSlope": 1, "RescaleIntercept": 0}
    film, outliers = _film_with_outliers()
    clean = _save(tmp_path / "clean.dcm", _dataset(film, photometric, **window))
    spiked = _save(tmp_path / "spiked.dcm", _dataset(outliers, photometric, **window))
    for path in (clean, spiked):
        assert np.array_equal(read_image(path, dicom_window="minmax"), _old_minmax(path))
    by_window = read_image(clean, dicom_window="window")
    expected = np.round((film.astype(float) - 999.5) / 1999 * 255)  # pydicom's LINEAR window, onto 0..255
    expected = expected if photometric == "MONOCHROME2" else 255 - expected
    assert np.abs(by_window.astype(int) - expected).max() <= 1
    kept = outliers != 4000

    def mean(path, mode):
        return read_image(path, dicom_window=mode)[kept].mean()

    assert abs(mean(spiked, "window") - mean(clean, "window")) < 0.01  # a window ignores the outliers
    assert abs(mean(spiked, "minmax") - mean(clean, "minmax")) > 6  # they move a min..max stretch


def test_without_a_window_both_modes_stretch_the_full_range(tmp_path):
    film, _ = _film_with_outliers()
    path = _save(tmp_path / "plain.dcm", _dataset(film))
    window, minmax = read_image(path, dicom_window="window"), read_image(path, dicom_window="minmax")
    assert np.array_equal(window, minmax) and window.min() == 0 and window.max() == 255


@pytest.mark.parametrize("mode", ["window", "minmax"])
def test_a_window_that_whites_out_every_pixel_falls_back_with_a_warning(tmp_path, mode):
    path = _save(tmp_path / "white.dcm", _dataset(RAMP // 2 + 100, WindowCenter=20, WindowWidth=10))
    decoded = load_image(path, dicom_window=mode)
    assert any("sends every pixel to one value" in w and "WindowCenter 20" in w for w in decoded.warnings)
    assert decoded.gray[0, 0] == 0 and decoded.gray[0, -1] == 255


def test_a_card_step_the_runtime_does_not_know_is_refused(tmp_path):
    with pytest.raises(CxrError, match="dicom_window must be one of"):
        read_image(_save(tmp_path / "a.dcm", _dataset()), dicom_window="auto")


def test_truncated_pixel_data_says_how_much_is_there(tmp_path):
    path = _save(tmp_path / "cut.dcm", _dataset())
    path.write_bytes(path.read_bytes()[:-1000])
    declared = RAMP.size * 2
    with pytest.raises(CxrError) as raised:
        read_image(path)
    assert str(raised.value) == (
        f"{path}: DICOM pixel data has {declared - 1000:,} of the {declared:,} bytes its header declares "
        "(Rows x Columns x frames x samples x bits): a truncated file?"
    )


def test_a_decoder_raising_anything_is_one_line_naming_the_file(tmp_path, monkeypatch):
    path = _save(tmp_path / "d.dcm", _dataset())

    def explode(self):
        raise KeyError("decoder state\nlost")

    monkeypatch.setattr(Dataset, "pixel_array", property(explode))
    with pytest.raises(CxrError) as raised:
        read_image(path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{path}: cannot decode DICOM pixel data")
    assert "KeyError" in message and "Explicit VR Little Endian" in message


def test_an_odd_vr_is_one_line_naming_the_attribute(tmp_path):
    path = _save(tmp_path / "odd.dcm", _dataset())
    rows = b"\x28\x00\x10\x00US\x02\x00"
    assert path.read_bytes().count(rows) == 1
    path.write_bytes(path.read_bytes().replace(rows, b"\x28\x00\x10\x00FD\x02\x00"))  # 2 bytes of a double
    with pytest.raises(CxrError) as raised:
        read_image(path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{path}: DICOM attribute Rows")


def test_pydicom_warnings_become_the_record_s_warnings_and_are_not_printed(tmp_path, capfd):
    ds = _dataset(WindowCenter=2000, WindowWidth=400)
    _raw_value(ds, "SOPClassUID", "UI", b"1.2.840.10008.5.1.4.1.1.1x")  # pydicom: "Invalid value for VR UI"
    path = _save(tmp_path / "warn.dcm", ds)
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        decoded = load_image(path)
    notes = [w for w in decoded.warnings if w.startswith("pydicom: ")]
    assert escaped == [] and len(notes) == 1 and "Invalid value for VR UI" in notes[0], decoded.warnings
    assert capfd.readouterr().err == ""


def test_threads_decoding_dicom_leave_the_warnings_machinery_as_it_was(tmp_path):
    """catch_warnings is not thread-safe: decoding in threads (as train/data.py does) must not leave the
    process's filters or showwarning swapped."""
    ds = _dataset(Modality="", WindowCenter=2000, WindowWidth=0)
    _raw_value(ds, "SOPClassUID", "UI", b"1.2.840.10008.5.1.4.1.1.1x")
    data = _save(tmp_path / "t.dcm", ds).read_bytes()
    before = (warnings.showwarning, list(warnings.filters))
    results = []

    def work():
        results.extend(len(decode(data, "t.dcm").warnings) for _ in range(20))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (warnings.showwarning, list(warnings.filters)) == before
    assert len(results) == 120 and set(results) == {3}  # each record: the width, SOP class, pydicom's


def test_a_zero_rescale_slope_is_a_header_fault_not_a_blank_film(tmp_path):
    decoded = load_image(_save(tmp_path / "slope0.dcm", _dataset(RescaleSlope=0, RescaleIntercept=100)))
    assert any("RescaleSlope = 0" in w for w in decoded.warnings)
    assert decoded.gray[0, 0] == 0 and decoded.gray[0, -1] == 255  # the stored ramp, shown
