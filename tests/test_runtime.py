import csv
import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from cxr.runtime.errors import CxrError
from cxr.runtime.preprocess import load_and_preprocess, read_image

from tests.conftest import AUTO_CPU_BACKEND, cli, one_line_error


def test_runtime_imports_without_torch():
    code = (
        "import sys, cxr.runtime, cxr.runtime.cli, cxr.runtime.predict, cxr.runtime.explain, "
        "cxr.runtime.overlay, "
        "cxr.runtime.backends.select, cxr.runtime.backends.onnxruntime, cxr.runtime.backends.tensorrt; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _dicom(
    path,
    pixels,
    photometric="MONOCHROME2",
    slope=1.0,
    intercept=0.0,
    window=None,
    with_pixels=True,
    syntax=None,
    pixel_data=None,
):
    """A DX DICOM of ``pixels``; ``syntax`` (default explicit VR little endian) and raw ``pixel_data`` bytes
    that need not match the declared size can be given (tests of hostile files)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16 if pixels.dtype == np.uint16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        ds.PixelData = pixels.tobytes() if pixel_data is None else pixel_data
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def gradient():
    return np.tile(np.linspace(0, 255, 96, dtype=np.float64), (80, 1))


def test_png_jpeg_8_16_bit_gray_rgb_rgba(tmp_path, gradient):
    gray8 = gradient.astype(np.uint8)
    files = {
        "g8.png": gray8,
        "g16.png": (gradient * 257).astype(np.uint16),
        "rgb.png": np.dstack([gray8] * 3),
        "rgba.png": np.dstack([gray8] * 3 + [np.full_like(gray8, 255)]),
        "g.jpg": gray8,
        "rgb16.png": np.dstack([(gradient * 257).astype(np.uint16)] * 3),
    }
    for name, array in files.items():
        cv2.imwrite(str(tmp_path / name), array)
        image = read_image(tmp_path / name)
        assert image.dtype == np.uint8 and image.shape == (80, 96), name
        assert abs(int(image[0, -1]) - 255) <= 3 and int(image[0, 0]) <= 3, name
        assert load_and_preprocess(tmp_path / name, 64).shape == (64, 64)


def test_dicom_monochrome1_rescale_and_window(tmp_path, gradient):
    raw = (gradient * 16).astype(np.uint16)  # 12-bit data
    mono2 = read_image(_dicom(tmp_path / "a.dcm", raw))
    mono1 = read_image(_dicom(tmp_path / "b.dcm", raw, "MONOCHROME1"))
    assert mono2[0, -1] > 250 and mono2[0, 0] < 5
    assert mono1[0, -1] < 5 and mono1[0, 0] > 250  # inverted: high values are dark
    rescaled = read_image(_dicom(tmp_path / "c.dcm", raw, slope=2.0, intercept=-1024.0))
    assert np.abs(rescaled.astype(int) - mono2.astype(int)).max() <= 1  # linear rescale keeps the picture
    windowed = read_image(_dicom(tmp_path / "d.dcm", raw, window=(2040, 1000)))
    assert windowed[0, 0] == 0 and windowed[0, -1] == 255 and 0 < windowed[0, 48] < 255
    no_suffix = _dicom(tmp_path / "IM0001", raw)
    assert read_image(no_suffix).shape == (80, 96)


@pytest.mark.parametrize(
    "maker,message",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("just text, not pixels"), "not an image"),
        (
            lambda p: p.write_bytes(cv2.imencode(".png", np.full((64, 64), 9, np.uint8))[1].tobytes()[:60]),
            "corrupt",
        ),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), "corrupt"),
        (lambda p: cv2.imwrite(str(p), np.zeros((1, 1), np.uint8)), "smaller than"),
    ],
)
def test_bad_raster_files_are_one_line_errors(tmp_path, maker, message):
    path = tmp_path / "x.png"
    maker(path)
    with pytest.raises(CxrError, match=message):
        read_image(path)


def test_truncated_jpeg_and_pixel_limit(tmp_path):
    data = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))[
        1
    ].tobytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(CxrError, match="truncated|corrupt"):
        read_image(tmp_path / "t.jpg")
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((300, 300), np.uint8))
    with pytest.raises(CxrError, match="pixel limit"):
        read_image(tmp_path / "big.png", max_pixels=50_000)


def test_dicom_without_pixels_is_refused_and_colour_is_converted(tmp_path, gradient):
    raw = gradient.astype(np.uint8)
    with pytest.raises(CxrError, match="no pixel data"):
        read_image(_dicom(tmp_path / "a.dcm", raw, with_pixels=False))
    assert (
        np.abs(read_image(_dicom(tmp_path / "b.dcm", np.dstack([raw] * 3), "RGB")).astype(int) - raw).max()
        <= 1
    )
    (tmp_path / "c.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    with pytest.raises(CxrError):
        read_image(tmp_path / "c.dcm")


def test_predict_records_exit_codes_and_schema(bundle, phantoms, tmp_path):
    (tmp_path / "bad.png").write_text("nope")
    (tmp_path / "empty_dir").mkdir()
    good = sorted((phantoms / "covid19").glob("*.png"))[:3]
    out = tmp_path / "out.jsonl"
    result = cli(
        "cxr-run",
        "predict",
        "--model",
        str(bundle),
        *map(str, good),
        str(tmp_path / "bad.png"),
        str(tmp_path / "empty_dir"),
        "--out",
        str(out),
        "--top-k",
        "2",
        check=2,
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 5 and "2 failed" in result.stderr
    for record in records[:3]:
        assert set(record) >= {"path", "label", "probs", "backend", "precision", "error"}
        assert (
            record["error"] is None
            and record["backend"] == AUTO_CPU_BACKEND
            and record["precision"] == "fp32"
        )
        assert abs(sum(record["probs"].values()) - 1) < 1e-4 and len(record["top_k"]) == 2
        assert record["label"] == max(record["probs"], key=record["probs"].get)
    assert "not an image" in records[3]["error"] and "folder contains no files" in records[4]["error"]
    assert records[3]["label"] is None
    ok = cli("cxr-run", "predict", "--model", str(bundle), str(good[0]))
    assert json.loads(ok.stdout.splitlines()[0])["path"] == str(good[0])


def test_predict_csv_and_fatal_errors(bundle, phantoms, tmp_path):
    import shutil

    from cxr.runtime.card import forget_parity, read_card, write_card

    out, copy = tmp_path / "out.csv", tmp_path / "bundle"
    shutil.copytree(bundle, copy)  # the shared bundle may have run parity in another test: start from none
    write_card(copy, forget_parity(read_card(copy), ["onnx", "fp16", "int8"]), rehash=False)
    result = cli(
        "cxr-run",
        "predict",
        "--model",
        str(copy),
        str(phantoms / "normal"),
        "--out",
        str(out),
        "--precision",
        "fp16",
        "--allow-unvalidated",
    )
    assert "has never run parity" in result.stderr and "used anyway" in result.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 48 and {r["precision"] for r in rows} == {"fp16"}
    assert {"prob_covid19", "prob_normal", "label", "error"} <= set(rows[0])
    assert "no card.json" in one_line_error(
        cli("cxr-run", "predict", "--model", str(tmp_path), "x.png", check=1)
    )
    missing = cli("cxr-run", "predict", "--model", str(bundle), "x.png", "--backend", "tensorrt", check=1)
    assert "tensorrt" in one_line_error(missing).lower()


def test_batches_stream_within_the_backend_limit(bundle, phantoms):
    from cxr.runtime.backends.onnxruntime import OrtBackend
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.predict import PredictOptions, predict_stream

    opened = Bundle.open(bundle)
    backend = OrtBackend(opened.onnx_path("model", "fp32"), "fp32", max_batch=4)
    sizes = []
    original = backend.start_outputs
    backend.start_outputs = lambda batch: sizes.append(len(batch)) or original(batch)
    paths = sorted(phantoms.rglob("*.png"))[:11]
    records = list(predict_stream(paths, opened, backend, PredictOptions(batch_size=16)))
    assert sizes == [4, 4, 3] and [r["path"] for r in records] == [str(p) for p in paths]


def test_predictions_equal_the_export_stage_ort_outputs(bundle, phantoms):
    import onnxruntime as ort
    from cxr.runtime.backends.select import open_classifier
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.predict import PredictOptions, predict_stream

    paths = sorted(phantoms.rglob("*.png"))[:6]
    opened = Bundle.open(bundle)
    backend, reason = open_classifier(opened, "auto", "fp32")
    assert reason.startswith(f"{AUTO_CPU_BACKEND} fp32 on cpu (") and "skipped tensorrt" in reason
    records = list(predict_stream(paths, opened, backend, PredictOptions()))
    pixels = np.stack([load_and_preprocess(p, 64, pre=opened.card.preprocessing) for p in paths])[:, None]
    expected = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": pixels}
    )[0]
    got = np.array([[r["probs"][c] for c in opened.card.classes] for r in records])
    assert np.abs(got - expected).max() < 1e-5


def test_info_lists_hashes_and_backends(bundle):
    result = cli("cxr-run", "info", "--model", str(bundle))
    assert "model.onnx" in result.stdout and " ok" in result.stdout
    assert re.search(
        rf"fp16 model    parity (passed|not run) +{AUTO_CPU_BACKEND} fp16 on cpu \(", result.stdout
    )
    assert re.search(rf"int8 explain  parity (passed|not run) +{AUTO_CPU_BACKEND} int8 on cpu", result.stdout)
    assert "Traceback" not in result.stderr and "EP Error" not in result.stdout + result.stderr
