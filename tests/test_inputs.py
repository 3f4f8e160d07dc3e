"""Inputs found by content, not by name: nothing vanishes, every file found is accounted for."""

import json
import os
import re

import cv2
import numpy as np
import pytest
from cxr.runtime.errors import CxrError
from cxr.runtime.inputs import discover
from cxr.runtime.preprocess import read_image

from tests.conftest import cli
from tests.test_runtime import _dicom


def _png(path, size=80, value=None):
    image = (
        np.random.default_rng(size).integers(0, 255, (size, size), dtype=np.uint8)
        if value is None
        else np.full((size, size), value, np.uint8)
    )
    path.write_bytes(cv2.imencode(".png", image)[1].tobytes())
    return path


@pytest.fixture
def messy_folder(tmp_path):
    """A PACS-like export: odd names, no extensions, other formats, links, a loop and a README."""
    root = tmp_path / "export"
    (root / "sub").mkdir(parents=True)
    gray = np.tile(np.linspace(0, 255, 96, dtype=np.float64), (80, 1)).astype(np.uint8)
    _dicom(root / "IM0001.IMA", gray)
    _dicom(root / "CR.1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457", gray)
    _dicom(root / "sub" / "scan.dcm.bak", gray)
    _png(root / "I0000001.img")
    for suffix in (".tif", ".bmp", ".webp"):
        cv2.imwrite(str(root / f"film{suffix}"), gray)
    (root / "README.txt").write_text("exported by a PACS\n")
    os.symlink(root / "missing.png", root / "broken.png")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _png(outside / "linked.png", 72)
    os.symlink(outside, root / "linked_folder")
    os.symlink(root, root / "sub" / "loop")  # a link back up the tree
    return root


def test_every_file_is_judged_by_its_bytes(messy_folder):
    found = discover([str(messy_folder)])
    names = sorted(p.name for p in found.inputs)
    assert names == sorted(
        [
            "IM0001.IMA",
            "CR.1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457",
            "scan.dcm.bak",
            "I0000001.img",
            "film.tif",
            "film.bmp",
            "film.webp",
            "broken.png",
            "linked.png",
        ]
    )
    assert [p.name for p in found.not_images] == ["README.txt"]
    (broken,) = [p for p in found.inputs if p.name == "broken.png"]
    assert "broken symbolic link" in found.errors[broken]
    for path in found.inputs:
        if path not in found.errors:
            assert read_image(path).ndim == 2


def test_unreadable_folder_is_a_failure_with_its_reason(messy_folder, monkeypatch):
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = discover([str(messy_folder)])
    (sub,) = [p for p in found.inputs if p.name == "sub"]
    assert "cannot read folder (Permission denied)" in found.errors[sub]


def test_predict_accounts_for_every_file(bundle, messy_folder, tmp_path):
    out = tmp_path / "out.jsonl"
    result = cli(
        "cxr-run",
        "predict",
        "--model",
        str(bundle),
        str(messy_folder),
        str(tmp_path / "nope.png"),
        "--out",
        str(out),
        check=2,
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    failed = [r for r in records if r["error"]]
    assert len(records) == 10 and len(failed) == 2  # 8 images + broken link + missing file
    assert re.search(
        r"8 predicted;( \d+ of them with warnings \(see their 'warnings'\);)? 2 failed", result.stderr
    )
    assert "1 not image: README.txt" in result.stderr
    assert any("broken symbolic link" in r["error"] for r in failed)
    assert any("no such file" in r["error"] for r in failed)


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    image = np.zeros((40, 100), np.uint8)
    image[:, :10] = 255  # a bright band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    Image.fromarray(image).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = read_image(tmp_path / "rotated.jpg")
    assert upright.shape == (100, 40) and upright[:10].mean() > 200  # the band is now on top


def test_max_pixels_is_the_one_limit(tmp_path):
    """A header claiming 15000 x 15000 px: refused by --max-pixels by default; with a higher limit Pillow's
    own bomb guard no longer fires first (the file is then simply corrupt)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 15000, 15000, 8, 0, 0, 0, 0))
    data = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    (tmp_path / "huge.png").write_bytes(data)
    with pytest.raises(CxrError, match=r"exceeds the pixel limit .*--max-pixels"):
        read_image(tmp_path / "huge.png")
    with pytest.raises(CxrError) as raised:
        read_image(tmp_path / "huge.png", max_pixels=300_000_000)
    assert "DecompressionBomb" not in str(raised.value) and "corrupt" in str(raised.value)


def _pydicom_file(name):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom does not ship {name}")
    return path


def test_compressed_dicom_decodes_with_the_extra_and_names_it_without():
    """JPEG-LS needs the [dicom] extra's decoders; without them the error says which syntax and what to
    install."""
    import subprocess
    import sys

    pytest.importorskip("pylibjpeg", reason="the [dicom] extra is not installed")
    path = _pydicom_file("MR_small_jpeg_ls_lossless.dcm")
    assert read_image(path).shape == (64, 64)
    code = (
        "import sys\nfor name in ('pylibjpeg', 'libjpeg', 'openjpeg', 'jpeg_ls', 'gdcm'):\n    "
        "sys.modules[name] = None\n"
        "from cxr.runtime.preprocess import read_image\nfrom cxr.runtime.errors import CxrError\n"
        f"try:\n    read_image({path!r})\nexcept CxrError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "no decoder here for DICOM transfer syntax JPEG-LS Lossless" in result.stdout, (
        result.stdout + result.stderr
    )
    assert "pip install 'cxr-edge[dicom]'" in result.stdout and result.stdout.count("\n") == 1


def test_not_radiographs_are_warned_and_strict_fails_them(bundle, tmp_path):
    from cxr.runtime.preprocess import load_image

    ct = load_image(_pydicom_file("CT_small.dcm"))
    assert any("Modality CT is not a radiograph" in w for w in ct.warnings)
    colour = tmp_path / "photo.png"
    rgb = np.zeros((120, 160, 3), np.uint8)
    rgb[..., 2] = np.linspace(0, 255, 160, dtype=np.uint8)  # a red ramp: really colour
    cv2.imwrite(str(colour), rgb)
    assert any("colour image converted" in w for w in load_image(colour).warnings)
    mask = tmp_path / "mask.png"
    cv2.imwrite(str(mask), np.where(np.arange(100)[:, None] < 40, 255, 0).astype(np.uint8).repeat(100, 1))
    assert any("near-binary" in w for w in load_image(mask).warnings)
    blank = _png(tmp_path / "blank.png", 100, value=0)
    with pytest.raises(CxrError, match=r"blank.png: blank image \(every pixel is grey level 0\): nothing to"):
        load_image(blank)
    icon = _png(tmp_path / "icon.png", 32)
    assert any("under 64 px" in w for w in load_image(icon).warnings)
    gray_rgb = tmp_path / "gray_as_rgb.png"
    cv2.imwrite(str(gray_rgb), np.dstack([np.tile(np.arange(100, dtype=np.uint8), (90, 1))] * 3))
    assert load_image(gray_rgb).warnings == ()  # grey stored as RGB is not colour
    out = tmp_path / "out.jsonl"
    inputs = [str(ct_path) for ct_path in (_pydicom_file("CT_small.dcm"),)] + [str(colour), str(gray_rgb)]
    result = cli("cxr-run", "predict", "--model", str(bundle), *inputs, "--out", str(out))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    gate = "not like the training films"
    decoding = [[w for w in r["warnings"] if not w.startswith(gate)] for r in records]
    assert [bool(w) for w in decoding] == [True, True, False]  # the gate may flag all three besides
    assert "of them with warnings" in result.stderr and result.stderr.count("warning: ") >= 2
    cli(
        "cxr-run",
        "predict",
        "--model",
        str(bundle),
        *inputs,
        "--strict",
        "--out",
        str(out),
        "--overwrite",
        check=2,
    )
    strict_records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["error"] for r, w in zip(strict_records, decoding) if w)  # a warning fails it with --strict


def test_dicom_errors_name_the_attribute_and_stay_on_one_line(tmp_path):
    bad_frames = _pydicom_file("reportsi_with_empty_number_tags.dcm")  # no pixel data: one line, cause first
    with pytest.raises(CxrError) as raised:
        read_image(bad_frames)
    assert "\n" not in str(raised.value) and "no pixel data" in str(raised.value)
    with pytest.raises(CxrError, match="DICOM attribute NumberOfFrames = '1A' is not a whole number"):
        read_image(_pydicom_file("badVR.dcm"))  # pydicom's own file with NumberOfFrames '1A'
    gray = np.tile(np.linspace(0, 255, 96, dtype=np.float64), (80, 1)).astype(np.uint8)
    rgb = _dicom(tmp_path / "rgb.dcm", np.dstack([gray, gray // 2, gray // 3]), "RGB")
    from cxr.runtime.preprocess import load_image

    decoded = load_image(rgb)
    assert decoded.gray.shape == (80, 96) and any(
        "colour DICOM (RGB) converted" in w for w in decoded.warnings
    )
