"""Issue 32's cases, run as a user would, on whichever cxr-edge the interpreter imports.

Question: what does each case cost a run (exit code, records kept, lines on stderr, a traceback)? Run it once
with this checkout and once with the commit before issue 32 on PYTHONPATH (a package shim: see README.md), and
compare the two tables. Every case builds its own inputs; the bundle is a tiny DPN-SE trained on phantoms by
the same code that is measured (an older runtime cannot read a newer card).

    python research/nothing_lost/cases.py --out research/nothing_lost/after.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PY = sys.executable


def run(args: list, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=900, **kw)


def stderr_lines(text: str) -> int:
    return len(
        [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "img/s]" not in line]
    )


def records(path: Path) -> int:
    if not path.exists():
        return 0
    count = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            json.loads(line)
            count += 1
        except ValueError:
            pass
    return count


def make_bundle(root: Path) -> Path:
    import cxr.train.models  # noqa: F401
    from cxr.train.fit import FitConfig, fit
    from cxr.train.synth import write_phantoms

    write_phantoms(root / "ph", per_class=12, size=80, seed=1)
    fit(
        FitConfig(
            data=root / "ph",
            out=root / "run",
            arch="dpn_se_tiny",
            epochs=3,
            image_size=64,
            batch_size=16,
            lr=3e-3,
            seed=0,
        )
    )
    result = run(["cxr.export.cli", "-q", "onnx", str(root / "run"), "--out", str(root / "bundle")])
    assert result.returncode == 0, result.stderr
    return root / "bundle"


def dicom(path: Path, photometric: str = "MONOCHROME2", **attributes) -> Path:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ramp = np.tile(np.linspace(0, 4080, 96).astype(np.uint16), (80, 1))
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1", generate_uid(), "CR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 80, 96, 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = ramp.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID,
        generate_uid(),
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def raw_dicom(path: Path) -> Path:
    """A dataset without preamble and file meta (the layout of the classic CR-MONO1-10-chest film)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    full = dicom(path.with_suffix(".tmp"))
    import pydicom

    ds = pydicom.dcmread(full)
    full.unlink()
    del ds.file_meta
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = True, True
    write_dataset(stream, ds)
    path.write_bytes(stream.getvalue())
    return path


def lut12(path: Path) -> Path:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new(0x00283006, "OW", (4095 - np.arange(4096)).astype("<u2").tobytes())
    item.ModalityLUTType = "US"
    return dicom(path, ModalityLUTSequence=[item])


def ward(root: Path, bundle: Path, name: str, odd: callable) -> Path:
    folder = root / name
    folder.mkdir()
    for i, film in enumerate(sorted((root / "ph").rglob("*.png"))[:8]):
        shutil.copy(film, folder / f"good{i}.png")
    odd(folder)
    return folder


def predict_case(name: str, root: Path, bundle: Path, odd: callable, *extra: str) -> dict:
    folder = ward(root, bundle, name, odd)
    out = root / f"{name}.jsonl"
    result = run(
        ["cxr.runtime.cli", "predict", str(folder), "--model", str(bundle), "--out", str(out), *extra]
    )
    return row(name, result, records(out), "of 9 inputs")


def row(case: str, result: subprocess.CompletedProcess, kept: int | str, note: str = "") -> dict:
    return {
        "case": case,
        "exit": result.returncode,
        "records kept": f"{kept} {note}".strip(),
        "stderr lines": stderr_lines(result.stderr),
        "traceback": "yes" if "Traceback" in result.stderr else "no",
        "last line": result.stderr.strip().splitlines()[-1][:110] if result.stderr.strip() else "",
    }


def signal_case(root: Path, bundle: Path, sig: signal.Signals) -> dict:
    folder = root / f"many_{sig.name}"
    folder.mkdir()
    film = sorted((root / "ph").rglob("*.png"))[0]
    for i in range(3000):
        os.link(film, folder / f"f{i:04d}.png")
    out = root / f"{sig.name}.jsonl"
    process = subprocess.Popen(
        [
            PY,
            "-m",
            "cxr.runtime.cli",
            "predict",
            str(folder),
            "--model",
            str(bundle),
            "--batch-size",
            "1",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(6)
    process.send_signal(sig)
    _, err = process.communicate(timeout=300)
    temp = list(root.glob(f".{sig.name}.jsonl.*.tmp"))
    kept = records(out)
    note = f"in --out; {sum(records(t) for t in temp)} in {len(temp)} hidden temp file(s)"
    return row(
        f"{sig.name} during a 3000-film run",
        subprocess.CompletedProcess([], process.returncode, "", err),
        kept,
        note,
    )


def disk_full_case(root: Path, bundle: Path) -> dict:
    folder = ward(root, bundle, "full", lambda f: None)
    out = root / "full.jsonl"

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))

    result = subprocess.run(
        [PY, "-m", "cxr.runtime.cli", "predict", str(folder), "--model", str(bundle), "--out", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=600,
    )
    litter = len(list(root.glob(".full.jsonl.*")))
    return row(
        "disk full after a few records (RLIMIT_FSIZE)", result, records(out), f"of 8; {litter} temp files"
    )


def card_case(
    root: Path, bundle: Path, name: str, section: str, key: str, value: object, command: str
) -> dict:
    copy = root / f"card_{name}"
    shutil.copytree(bundle, copy)
    data = json.loads((copy / "card.json").read_text())
    data.setdefault(section, {})[key] = value
    (copy / "card.json").write_text(json.dumps(data))
    folder = root / "ph"
    out = root / f"card_{name}.jsonl"
    if command == "info":
        result = run(["cxr.runtime.cli", "info", "--model", str(copy)])
        return row(f"card {section}.{key} = {value!r}: info", result, "-")
    result = run(["cxr.runtime.cli", "predict", str(folder), "--model", str(copy), "--out", str(out)])
    labels = {json.loads(line)["label"] for line in out.read_text().splitlines()} if out.exists() else set()
    return row(
        f"card {section}.{key} = {value!r}: predict",
        result,
        records(out),
        f"of 48, {len(labels)} distinct label(s)",
    )


def nan_weights_case(root: Path, bundle: Path) -> dict:
    """One weight of model.onnx set to NaN and the card re-hashed (a corrupted copy, a careless edit)."""
    import onnx
    from cxr.runtime.card import read_card, write_card

    copy = root / "nan_bundle"
    shutil.copytree(bundle, copy)
    graph = onnx.load(str(copy / "model.onnx"))
    weights = next(
        t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4
    )
    values = onnx.numpy_helper.to_array(weights).copy()
    values.flat[0] = np.nan
    weights.CopyFrom(onnx.numpy_helper.from_array(values, weights.name))
    onnx.save(graph, str(copy / "model.onnx"))
    write_card(copy, read_card(copy))
    out = root / "nan.jsonl"
    result = run(
        [
            "cxr.runtime.cli",
            "predict",
            str(root / "ph"),
            "--model",
            str(copy),
            "--backend",
            "openvino",
            "--out",
            str(out),
        ]
    )
    labels = {json.loads(line)["label"] for line in out.read_text().splitlines()} if out.exists() else set()
    return row(
        "a NaN weight in model.onnx, card re-hashed, OpenVINO",
        result,
        records(out),
        f"of 48, labels {sorted(str(x) for x in labels)}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nothing-lost-"))
    bundle = make_bundle(root)
    rows = [
        predict_case(
            "window_width_0", root, bundle, lambda f: dicom(f / "ww0.dcm", WindowCenter=2000, WindowWidth=0)
        ),
        predict_case("lut_12_bits", root, bundle, lambda f: lut12(f / "lut12.dcm")),
        predict_case("palette_without_lut", root, bundle, lambda f: dicom(f / "pal.dcm", "PALETTE COLOR")),
        predict_case("cr_chest_no_meta_dcm", root, bundle, lambda f: raw_dicom(f / "CR-MONO1-10-chest.dcm")),
        predict_case("cr_chest_no_meta_bare", root, bundle, lambda f: raw_dicom(f / "CR-MONO1-10-chest")),
        predict_case(
            "all_white_window",
            root,
            bundle,
            lambda f: dicom(f / "white.dcm", WindowCenter=-5000, WindowWidth=10),
        ),
        signal_case(root, bundle, signal.SIGTERM),
        signal_case(root, bundle, signal.SIGINT),
        signal_case(root, bundle, signal.SIGKILL),
        disk_full_case(root, bundle),
        nan_weights_case(root, bundle),
    ]
    film = root / "study.jsonl"
    shutil.copy(sorted((root / "ph").rglob("*.png"))[0], film)
    before = film.read_bytes()
    result = run(["cxr.runtime.cli", "predict", str(film), "--model", str(bundle), "--out", str(film)])
    rows.append(
        row(
            "--out names the input film study.jsonl",
            result,
            "-",
            "film intact" if film.read_bytes() == before else "FILM REPLACED",
        )
    )
    started = time.perf_counter()
    result = run(
        ["cxr.runtime.cli", "predict", str(root / "ph"), "--model", str(bundle), "--out", str(root / "ph")]
    )
    rows.append(
        row("--out is a folder", result, "-", f"answered after {time.perf_counter() - started:.1f} s")
    )
    odd = root / "odd"
    odd.mkdir()
    shutil.copy(sorted((root / "ph").rglob("*.png"))[0], odd / os.fsdecode(b"caf\xe9.png"))
    result = run(
        ["cxr.runtime.cli", "predict", str(odd), "--model", str(bundle), "--out", str(root / "odd.csv")]
    )
    rows.append(
        row("non-UTF-8 file name, --out x.csv", result, (root / "odd.csv").exists() and "csv written" or 0)
    )
    deep = root / "deep"
    here = os.getcwd()
    os.makedirs(deep)
    os.chdir(deep)
    for _ in range(1500):
        os.mkdir("d")
        os.chdir("d")
    shutil.copy(sorted((root / "ph").rglob("*.png"))[0], "x.png")
    os.chdir(here)
    result = run(
        ["cxr.runtime.cli", "predict", str(deep), "--model", str(bundle), "--out", str(root / "deep.jsonl")]
    )
    rows.append(row("a folder nested 1,500 deep", result, records(root / "deep.jsonl"), "of 1"))
    image = str(sorted((root / "ph").rglob("*.png"))[0])
    result = run(["cxr.runtime.cli", "predict", image, "--model", str(bundle), "--explain", "--seed", "-1"])
    rows.append(row("--explain --seed -1", result, "-"))
    rows += [
        card_case(root, bundle, "parity_info", "parity", "backends", {"fp16": "passed"}, "info"),
        card_case(root, bundle, "parity_predict", "parity", "backends", {"fp16": "passed"}, "predict"),
        card_case(root, bundle, "border", "preprocessing", "border_mask", 0.6, "predict"),
        card_case(root, bundle, "nan", "preprocessing", "border_mask", float("nan"), "predict"),
        card_case(root, bundle, "text", "preprocessing", "border_mask", "0.05", "predict"),
        card_case(root, bundle, "crop", "preprocessing", "thorax_crop", "false", "predict"),
        card_case(root, bundle, "resize", "preprocessing", "resize", "stretch", "predict"),
    ]
    quiet = run(
        [
            "cxr.runtime.cli",
            "-q",
            "predict",
            image,
            image,
            "--model",
            str(bundle),
            "--out",
            str(root / "quiet.jsonl"),
        ]
    )
    rows.append(row("-q on a clean run of 2 films", quiet, records(root / "quiet.jsonl")))
    empty = root / "no_images"
    empty.mkdir()
    for i in range(100):
        (empty / f"note{i}.txt").write_text("not an image")
    rows.append(
        row(
            "a folder of 100 non-images",
            run(["cxr.runtime.cli", "predict", str(empty), "--model", str(bundle)]),
            "-",
        )
    )
    formula = root / "formula"
    formula.mkdir()
    shutil.copy(image, formula / "=HYPERLINK(1).png")
    result = run(
        [
            "cxr.runtime.cli",
            "predict",
            "=HYPERLINK(1).png",
            "--model",
            str(bundle),
            "--out",
            str(root / "formula.csv"),
        ],
        cwd=formula,
    )
    cell = (
        (root / "formula.csv").read_text().splitlines()[1].split(",")[0]
        if (root / "formula.csv").exists()
        else ""
    )
    rows.append(row("CSV cell of a file named =HYPERLINK(1).png", result, "-", f"cell {cell!r}"))
    mode = oct((root / "quiet.jsonl").stat().st_mode & 0o777) if (root / "quiet.jsonl").exists() else "-"
    rows.append(
        {
            "case": "--out file mode under umask 022",
            "exit": "-",
            "records kept": mode,
            "stderr lines": "-",
            "traceback": "-",
            "last line": "",
        }
    )
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]).replace("|", "/") for k in header) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
