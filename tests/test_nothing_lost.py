"""Nothing lost: one bad file, a fault in one step, a signal or a full disk never costs a run the records of
its good inputs; ``--out`` is checked before any work, appended as records finish and resumed on request."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import cli, one_line_error

MARK = 7  # a grey level in the corner of the film whose preprocessing is made to raise


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def films(phantoms: Path, tmp_path: Path) -> Path:
    """Eight good films and four bad ones, in one folder."""
    folder = tmp_path / "films"
    folder.mkdir()
    for i, path in enumerate(sorted(phantoms.rglob("*.png"))[:8]):
        shutil.copy(path, folder / f"good{i}.png")
    good = (folder / "good0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[:300])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.dcm").write_text("not a DICOM at all")
    marked = cv2.imread(str(folder / "good0.png"), cv2.IMREAD_GRAYSCALE)
    marked[:2, :2] = MARK  # made to fail by an exception injected below, whichever thread reads it
    cv2.imwrite(str(folder / "zzz_raises.png"), marked)
    return folder


def _job(bundle: Path, inputs: list[Path], **options):
    from cxr.runtime.predict_job import PredictJob

    return PredictJob(inputs=[str(p) for p in inputs], model=bundle, backend="onnxruntime", **options)


def test_every_fault_of_one_input_is_that_inputs_record(bundle, films, tmp_path, monkeypatch):
    import cxr.runtime.reading as reading
    from cxr.runtime.predict_job import run_predict

    real_preprocess = reading.preprocess

    def preprocess(gray, size, pre=None):  # an unexpected exception deep in one input's preprocessing
        if (gray[:2, :2] == MARK).all():
            raise ZeroDivisionError("injected")
        return real_preprocess(gray, size, pre)

    monkeypatch.setattr(reading, "preprocess", preprocess)
    out = tmp_path / "r.jsonl"
    summary = run_predict(_job(bundle, [films], out=out, batch_size=4))
    records = {Path(r["path"]).name: r for r in _records(out)}
    assert len(records) == 12 and summary.exit_code == 2
    assert all(records[f"good{i}.png"]["label"] for i in range(8))
    assert "ZeroDivisionError: injected" in records["zzz_raises.png"]["error"]
    assert records["zzz_raises.png"]["error"].startswith(str(films / "zzz_raises.png"))
    assert "truncated" in records["truncated.png"]["error"] and "empty" in records["empty.jpg"]["error"]
    assert records["text.dcm"]["error"] and summary.failed == 4 and summary.predicted == 8


def test_a_batch_that_fails_is_retried_image_by_image(bundle, films, tmp_path, monkeypatch):
    from cxr.runtime.backends.onnxruntime import OrtBackend
    from cxr.runtime.predict_job import run_predict

    real_run = OrtBackend._run_outputs

    def run(self, batch):  # this one image breaks any call it is part of
        if any(int(image.sum()) == poisoned for image in batch):
            raise RuntimeError("kernel fault")
        return real_run(self, batch)

    from cxr.runtime.bundle import Bundle
    from cxr.runtime.preprocess import load_and_preprocess

    card = Bundle.open(bundle).card
    poisoned = int(load_and_preprocess(films / "good3.png", card.input.size, pre=card.preprocessing).sum())
    monkeypatch.setattr(OrtBackend, "_run_outputs", run)
    out = tmp_path / "r.jsonl"
    run_predict(_job(bundle, [films / f"good{i}.png" for i in range(8)], out=out, batch_size=8))
    records = _records(out)
    assert [r["label"] is not None for r in records] == [True] * 3 + [False] + [True] * 4
    assert "RuntimeError: kernel fault" in records[3]["error"]


def test_out_is_checked_before_any_work(bundle, films, tmp_path):
    started = time.perf_counter()
    folder = one_line_error(
        cli("cxr-run", "predict", str(films), "--model", str(bundle), "--out", str(films), check=2)
    )
    assert "is a folder" in folder
    film = films / "good0.png"
    before = film.read_bytes()
    named = tmp_path / "study.jsonl"
    shutil.copy(film, named)  # a JPEG called study.jsonl: once replaced by the results
    result = cli("cxr-run", "predict", str(named), "--model", str(bundle), "--out", str(named), check=2)
    assert "one of the inputs" in one_line_error(result) and named.read_bytes() == before
    assert "backend:" not in result.stderr  # refused before the backend opened
    missing = cli(
        "cxr-run",
        "predict",
        str(film),
        "--model",
        str(bundle),
        "--out",
        str(tmp_path / "no/r.jsonl"),
        check=2,
    )
    assert "does not exist" in one_line_error(missing)
    assert time.perf_counter() - started < 60


def test_a_folder_that_cannot_be_written_is_refused_in_one_line(tmp_path, monkeypatch):
    from cxr.runtime.errors import CxrUsageError
    from cxr.runtime.output import plan_output

    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode)
    )
    with pytest.raises(CxrUsageError, match="not writable"):
        plan_output(tmp_path / "r.jsonl", [], "sha256:x")


def test_an_existing_out_is_refused_unless_resumed_or_overwritten(bundle, films, tmp_path):
    from cxr.runtime.predict_job import run_predict

    out = tmp_path / "r.jsonl"
    goods = [films / f"good{i}.png" for i in range(8)]
    run_predict(_job(bundle, goods[:3], out=out))
    first = out.read_text()
    refused = cli("cxr-run", "predict", str(goods[0]), "--model", str(bundle), "--out", str(out), check=2)
    assert "--resume" in one_line_error(refused) and out.read_text() == first
    with out.open("a") as handle:  # a kill in the middle of a line: not a record
        handle.write('{"path": "half')
    summary = run_predict(_job(bundle, goods, out=out, resume=True))
    assert summary.resumed == 3 and summary.inputs == 5
    lines = out.read_text().splitlines()
    assert lines[:3] == first.splitlines() and len(_records(out)) == 8  # the cut line is gone
    assert sorted(r["path"] for r in _records(out)) == sorted(str(p) for p in goods)
    summary = run_predict(_job(bundle, goods, out=out, overwrite=True))
    assert len(_records(out)) == 8 and summary.resumed == 0


def test_resume_refuses_records_of_another_bundle(bundle, films, tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"path": str(films / "good0.png"), "bundle_digest": "sha256:other"}) + "\n")
    result = cli(
        "cxr-run", "predict", str(films), "--model", str(bundle), "--out", str(out), "--resume", check=1
    )
    assert "another bundle" in one_line_error(result)


SLOW_RUN = """
import sys, time
import cxr.runtime.predict as predict
real = predict.Classifying.answers
def answers(self):
    time.sleep(0.4)
    return real(self)
predict.Classifying.answers = answers
from cxr.runtime.cli import main
sys.argv = ["cxr-run", *sys.argv[1:]]
main()
"""


def _slow_predict(
    bundle: Path, films: Path, out: Path, seconds: float = 0.4, backend: str = "onnxruntime", **popen
) -> subprocess.Popen:
    script = out.parent / "slow_predict.py"
    script.write_text(SLOW_RUN.replace("time.sleep(0.4)", f"time.sleep({seconds})"))
    return subprocess.Popen(
        [
            sys.executable,
            str(script),
            "predict",
            str(films),
            "--model",
            str(bundle),
            "--backend",
            backend,
            "--batch-size",
            "1",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _wait_for_records(out: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} records in time: {process.communicate()}")


@pytest.mark.parametrize(
    "sig,code,backend",
    [
        (signal.SIGTERM, 143, "onnxruntime"),
        (signal.SIGINT, 130, "onnxruntime"),
        (signal.SIGKILL, -9, "onnxruntime"),
        (signal.SIGTERM, 143, "openvino"),  # runs one batch ahead: the batch in flight is dropped, not lost
    ],
)
def test_an_interrupted_run_keeps_every_finished_record(bundle, films, tmp_path, sig, code, backend):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO not installed")
    out = tmp_path / "r.jsonl"
    process = _slow_predict(bundle, films, out, backend=backend)
    _wait_for_records(out, 3, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    records = _records(out)  # every line whole
    assert 3 <= len(records) < 12 and all(r["bundle_digest"].startswith("sha256:") for r in records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["films", "r.jsonl", "slow_predict.py"]  # no litter
    if sig != signal.SIGKILL:
        assert "Traceback" not in stderr
        assert (
            f"interrupted by {sig.name}: {len(records)} record(s) kept in {out}; rerun with --resume"
            in stderr
        )
    resumed = cli(
        "cxr-run", "predict", str(films), "--model", str(bundle), "--out", str(out), "--resume", check=2
    )
    assert f"{len(records)} already in" in resumed.stderr
    assert sorted(r["path"] for r in _records(out)) == sorted(str(p) for p in films.iterdir())


def test_a_full_disk_keeps_the_whole_records_and_says_so(bundle, films, tmp_path):
    out = tmp_path / "r.jsonl"
    limit = 2500  # bytes: a few records, then the file system says no more (as a full disk would)

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr.runtime.cli",
            "predict",
            str(films),
            "--model",
            str(bundle),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=300,
    )
    records = _records(out)
    assert result.returncode == 1 and 0 < len(records) < 12 and out.stat().st_size <= limit
    line = one_line_error(result)
    assert f"{len(records)} record(s) kept in {out}" in line and "rerun with --resume" in line


def test_a_full_disk_during_an_export_stage_is_one_line_and_the_bundle_stays(bundle, phantoms, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}

    def small_files() -> None:  # the int8 graph cannot be written, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = max(p.stat().st_size for p in copy.iterdir() if p.name == "card.json") * 2
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = ("int8", str(copy), "--calib", str(phantoms), "--samples", "8")
    result = subprocess.run(
        [sys.executable, "-m", "cxr.export.cli", *args],
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=300,
    )
    assert result.returncode == 1
    assert "no space left to write" in one_line_error(result)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before  # the stage's work folder is gone too
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".bundle.lock") == ["bundle"]


def test_an_export_stage_on_a_bundle_missing_a_listed_file_is_one_line(bundle, phantoms, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "model.fp16.onnx").unlink()
    result = cli("cxr-export", "int8", str(copy), "--calib", str(phantoms), check=1)
    assert one_line_error(result).endswith("model.fp16.onnx: missing from the bundle")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".bundle.lock") == ["bundle"]


def test_an_overlay_that_cannot_be_written_is_that_records_error(bundle, films, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the overlay folder should be")
    out = tmp_path / "r.jsonl"
    result = cli(
        "cxr-run",
        "predict",
        str(films / "good0.png"),
        str(films / "good1.png"),
        "--model",
        str(bundle),
        "--out",
        str(out),
        "--explain",
        "--samples",
        "20",
        "--explain-dir",
        str(blocked),
        check=2,
    )
    records = _records(out)
    assert len(records) == 2 and all("overlay" in r["error"] and r["label"] for r in records)
    assert "Traceback" not in result.stderr


def test_files_follow_the_umask(bundle, films, tmp_path):
    out = tmp_path / "r.jsonl"
    overlays = tmp_path / "maps"
    code = (
        "import os, sys; os.umask(0o027)\n"
        "from cxr.runtime.cli import main\n"
        f"sys.argv = ['cxr-run', 'predict', {str(films / 'good0.png')!r}, '--model', {str(bundle)!r}, "
        f"'--out', {str(out)!r}, '--explain', '--samples', '20', '--explain-dir', {str(overlays)!r}]\n"
        "main()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    assert out.stat().st_mode & 0o777 == 0o640
    assert [p.stat().st_mode & 0o777 for p in overlays.iterdir()] == [0o640]


def test_csv_cells_cannot_run_as_formulas_and_odd_names_are_written(bundle, films, tmp_path):
    import csv

    odd = tmp_path / os.fsdecode(b"caf\xe9.png")  # not UTF-8: crashed the CSV writer
    shutil.copy(films / "good0.png", odd)
    shutil.copy(films / "good1.png", tmp_path / "=HYPERLINK(1).png")
    out = tmp_path / "r.csv"

    def predict(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cxr.runtime.cli", "predict", os.fsencode(odd), "=HYPERLINK(1).png"]
            + ["--model", str(bundle), "--out", str(out), *extra],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
        )

    assert predict().returncode == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["path"] for r in rows] == [str(tmp_path / "caf\\xe9.png"), "'=HYPERLINK(1).png"]
    assert all(r["label"] for r in rows)
    resumed = predict("--resume")
    assert resumed.returncode == 0 and "all 2 inputs are already recorded" in resumed.stderr


def test_a_folder_nested_1500_deep_is_searched(films, tmp_path):
    from cxr.runtime.inputs import discover

    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        for _ in range(1500):
            os.mkdir("d")
            os.chdir("d")
        shutil.copy(films / "good0.png", "deep.png")
        os.chdir(here)
        found = discover([str(tmp_path / "d")])
        assert [p.name for p in found.inputs] == ["deep.png"] and not found.errors
    finally:
        _remove_deep(tmp_path, here)


def _remove_deep(top: Path, here: str) -> None:
    """Remove the nested folders bottom-up without recursion (pytest's cleanup would recurse and fail)."""
    os.chdir(top)
    depth = 0
    while os.path.isdir("d"):
        os.chdir("d")
        depth += 1
    for name in os.listdir("."):
        os.unlink(name)
    for _ in range(depth):
        os.chdir("..")
        os.rmdir("d")
    os.chdir(here)


def test_quiet_prints_nothing_on_a_clean_run_and_a_run_with_nothing_to_label_fails(bundle, films, tmp_path):
    quiet = cli(
        "cxr-run",
        "-q",
        "predict",
        str(films / "good0.png"),
        str(films / "good1.png"),
        "--model",
        str(bundle),
        "--out",
        str(tmp_path / "r.jsonl"),
    )
    assert quiet.stderr == "" and quiet.stdout == ""
    loud = cli(
        "cxr-run",
        "predict",
        str(films / "good0.png"),
        "--model",
        str(bundle),
        "--out",
        str(tmp_path / "s.jsonl"),
    )
    assert "backend:" in loud.stderr and "1 predicted" in loud.stderr
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(30):
        (notes / f"n{i}.txt").write_text("not an image")
    result = cli("cxr-run", "predict", str(notes), "--model", str(bundle), check=1)
    assert "nothing to predict: 30 not images" in one_line_error(result)


@pytest.mark.parametrize(
    "args,words",
    [
        (("--explain", "--seed", "-1"), "--seed must be"),
        (("--resume",), "--resume needs --out"),
    ],
)
def test_bad_options_are_one_line(bundle, films, args, words):
    result = cli("cxr-run", "predict", str(films / "good0.png"), "--model", str(bundle), *args, check=2)
    assert words in one_line_error(result)


def test_third_party_tracebacks_stay_in_the_debug_log():
    code = textwrap.dedent(
        """
        import logging, sys, warnings
        from cxr.runtime.cli_util import configure_logging
        configure_logging(int(sys.argv[1]), sys.stderr)
        try:
            raise ValueError("decoder exploded\\nsecond line")
        except ValueError:
            logging.getLogger("pydicom").exception("Unable to decode the pixel data")
        warnings.warn("a pydicom UserWarning")
        logging.getLogger("cxr.test").warning("ours")
        """
    )
    normal = subprocess.run([sys.executable, "-c", code, "0"], capture_output=True, text=True, timeout=60)
    assert normal.stderr == "ours\n"
    verbose = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True, timeout=60)
    lines = verbose.stderr.splitlines()
    assert "Traceback" not in verbose.stderr and any("Unable to decode" in line for line in lines)
    assert any("a pydicom UserWarning" in line for line in lines) and len(lines) == 3


def test_records_stream_to_out_before_the_run_ends(bundle, films, tmp_path):
    out = tmp_path / "r.jsonl"
    process = _slow_predict(bundle, films, out)
    _wait_for_records(out, 2, process)
    assert process.poll() is None  # still running, and two whole records already on disk
    assert len(_records(out)) >= 2
    process.terminate()
    process.communicate(timeout=120)


def test_probabilities_are_unchanged_by_the_new_loop(bundle, films, tmp_path):
    """The loop's refactor must not change an answer: records equal a direct backend call."""
    from cxr.runtime.backends.onnxruntime import OrtBackend
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.predict_job import run_predict
    from cxr.runtime.preprocess import load_and_preprocess

    goods = [films / f"good{i}.png" for i in range(8)]
    out = tmp_path / "r.jsonl"
    run_predict(_job(bundle, goods, out=out, batch_size=3))
    opened = Bundle.open(bundle)
    pixels = np.stack(
        [load_and_preprocess(p, opened.card.input.size, pre=opened.card.preprocessing) for p in goods]
    )
    expected = OrtBackend(opened.onnx_path("model", "fp32"), "fp32").run(pixels[:, None])
    got = np.array([[r["probs"][c] for c in opened.card.classes] for r in _records(out)])
    assert np.abs(got - expected).max() < 1e-5


def test_odd_dicom_headers_in_a_folder_cost_no_other_record(bundle, films, tmp_path):
    """The run that exited 1 with a 55-line traceback and no --out file: now every good film is recorded,
    each odd header is a warning or its own one-line error, and stderr holds no traceback."""
    from tests.test_dicom import RAMP, _dataset, _modality_lut, _raw, _save

    folder = tmp_path / "ward"
    shutil.copytree(films, folder)
    _save(folder / "window_width_0.dcm", _dataset(WindowCenter=2000, WindowWidth=0))
    lut12 = _modality_lut(12, (4095 - np.arange(4096)).astype("<u2").tobytes())
    _save(folder / "lut_12_bits.dcm", _dataset(ModalityLUTSequence=[lut12]))
    _save(folder / "palette_without_lut.dcm", _dataset(RAMP.astype(np.uint8), "PALETTE COLOR"))
    truncated = _save(folder / "truncated_pixels.dcm", _dataset())
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    _raw(folder / "CR-MONO1-10-chest", _dataset())  # no preamble, no meta, no suffix
    odd_vr = _save(folder / "odd_vr.dcm", _dataset())
    odd_vr.write_bytes(
        odd_vr.read_bytes().replace(b"\x28\x00\x10\x00US\x02\x00", b"\x28\x00\x10\x00FD\x02\x00")
    )
    out = tmp_path / "r.jsonl"
    result = cli("cxr-run", "-q", "predict", str(folder), "--model", str(bundle), "--out", str(out), check=2)
    records = {Path(r["path"]).name: r for r in _records(out)}
    assert len(records) == 18 and "Traceback" not in result.stderr
    assert all(records[f"good{i}.png"]["label"] for i in range(8))
    for warned in ("window_width_0.dcm", "lut_12_bits.dcm"):
        assert records[warned]["label"] and records[warned]["warnings"], records[warned]
    assert records["CR-MONO1-10-chest"]["label"] and records["CR-MONO1-10-chest"]["error"] is None
    for failed in ("palette_without_lut.dcm", "truncated_pixels.dcm", "odd_vr.dcm"):
        error = records[failed]["error"]
        assert error and "\n" not in error and error.startswith(str(folder / failed)), error
    lines = result.stderr.splitlines()
    assert all(line.startswith(("warning: ", "error: ")) for line in lines), result.stderr


SLOW_READ = """
import sys, time
import cxr.runtime.reading as reading
real = reading.prepare
def prepare(*args, **kwargs):
    time.sleep(0.4)  # the signal lands while an input is being read
    return real(*args, **kwargs)
reading.prepare = prepare
from cxr.runtime.cli import main
sys.argv = ["cxr-run", *sys.argv[1:]]
main()
"""


def test_a_signal_is_never_an_inputs_failure(bundle, films, tmp_path):
    out = tmp_path / "r.jsonl"
    script = tmp_path / "slow_read.py"
    script.write_text(SLOW_READ)
    command = [
        sys.executable,
        str(script),
        "predict",
        str(films),
        "--model",
        str(bundle),
        "--backend",
        "onnxruntime",
        "--batch-size",
        "1",
        "--out",
        str(out),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_records(out, 2, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert not any("RunInterrupted" in str(r["error"]) or "SIGTERM" in str(r["error"]) for r in _records(out))
    resumed = cli(
        "cxr-run", "predict", str(films), "--model", str(bundle), "--out", str(out), "--resume", check=2
    )
    paths = [r["path"] for r in _records(out)]
    assert sorted(paths) == sorted(str(p) for p in films.iterdir()), resumed.stderr  # each input once


def test_two_runs_never_share_one_out(bundle, films, tmp_path):
    from cxr.runtime.errors import CxrError
    from cxr.runtime.output import RecordWriter, plan_output

    out = tmp_path / "r.jsonl"
    process = _slow_predict(bundle, films, out, seconds=3)
    _wait_for_records(out, 1, process)
    second = cli(
        "cxr-run", "predict", str(films), "--model", str(bundle), "--out", str(out), "--resume", check=1
    )
    assert "another run is writing it" in one_line_error(second)
    process.terminate()
    process.communicate(timeout=120)
    late = tmp_path / "late.jsonl"
    plan = plan_output(late, [], "sha256:x")  # checked while it did not exist ...
    late.write_text("someone else's\n")  # ... then made by another run
    with pytest.raises(CxrError, match="appeared after the run started"):
        RecordWriter(plan, ("a", "b"))
    assert late.read_text() == "someone else's\n"
    mine = tmp_path / "mine.jsonl"
    writer = RecordWriter(plan_output(mine, [], "sha256:x"), ("a", "b"))
    os.replace(late, mine)  # the name now means another file: closing empty must not remove it
    writer.close()
    assert mine.read_text() == "someone else's\n"


def test_overlays_are_named_per_input_and_never_taken_over(bundle, films, tmp_path):
    first, second = tmp_path / "d1", tmp_path / "d2"
    first.mkdir(), second.mkdir()
    shutil.copy(films / "good0.png", first / "x.png")
    shutil.copy(films / "good1.png", second / "x.png")
    out, maps = tmp_path / "r.jsonl", tmp_path / "maps"
    common = (
        "--model",
        str(bundle),
        "--explain",
        "--samples",
        "20",
        "--explain-dir",
        str(maps),
        "--out",
        str(out),
    )
    cli("cxr-run", "predict", str(first / "x.png"), *common)
    before = {p.name: p.read_bytes() for p in maps.iterdir()}
    cli("cxr-run", "predict", str(first / "x.png"), str(second / "x.png"), *common, "--resume")
    overlays = [r["explanation"]["overlay"] for r in _records(out)]
    assert len(set(overlays)) == 2 and all(Path(o).name.startswith("x_") for o in overlays)
    assert all((maps / name).read_bytes() == data for name, data in before.items())  # the first map kept
    inside = cli(
        "cxr-run",
        "predict",
        str(first),
        "--model",
        str(bundle),
        "--explain",
        "--explain-dir",
        str(first / "maps"),
        check=2,
    )
    assert "inside the input folder" in one_line_error(inside)


def test_csv_quoting_is_undone_exactly_on_resume(bundle, films, tmp_path):
    for name in ("'=a.png", "=a.png"):
        shutil.copy(films / "good0.png", tmp_path / name)
    out = tmp_path / "r.csv"
    run = lambda *names, extra=(): subprocess.run(  # noqa: E731
        [
            sys.executable,
            "-m",
            "cxr.runtime.cli",
            "predict",
            *names,
            "--model",
            str(bundle),
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run("'=a.png").returncode == 0
    resumed = run("'=a.png", "=a.png", extra=("--resume",))
    assert resumed.returncode == 0 and "1 predicted; 1 already in" in resumed.stderr, resumed.stderr


def test_a_csv_header_on_a_full_disk_leaves_no_file(bundle, films, tmp_path):
    out = tmp_path / "r.csv"

    def tiny_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50, 50))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr.runtime.cli",
            "predict",
            str(films),
            "--model",
            str(bundle),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        preexec_fn=tiny_files,
        timeout=300,
    )
    assert result.returncode == 1 and not out.exists() and "File too large" in one_line_error(result)


def test_stdout_closed_or_full_is_one_line(bundle, films):
    image = str(films / "good0.png")
    command = [sys.executable, "-m", "cxr.runtime.cli", "predict", image, "--model", str(bundle)]
    closed = subprocess.run(
        command, stderr=subprocess.PIPE, text=True, timeout=300, preexec_fn=lambda: os.close(1)
    )
    assert closed.returncode == 1 and "stdout is closed" in one_line_error(closed)
    with open("/dev/full", "w") as full:
        result = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 1 and "stdout: No space left on device" in one_line_error(result)


def test_a_fifo_or_device_in_place_of_a_film_is_refused_not_read(tmp_path):
    import threading

    from cxr.runtime.errors import CxrError
    from cxr.runtime.preprocess import load_image

    fifo = tmp_path / "film.png"
    os.mkfifo(fifo)
    outcome = {}

    def read(path):
        try:
            load_image(path)
        except CxrError as exc:
            outcome[str(path)] = str(exc)

    for path in (fifo, Path("/dev/zero")):
        reader = threading.Thread(target=read, args=(path,), daemon=True)
        reader.start()
        reader.join(timeout=30)
        assert not reader.is_alive() and "not a regular file" in outcome[str(path)]


def test_jpeg_end_of_image_is_found_past_trailing_bytes_and_a_thumbnail(tmp_path):
    import cv2
    from cxr.runtime.errors import CxrError
    from cxr.runtime.preprocess import load_image
    from PIL import Image

    film = np.tile(np.arange(200, dtype=np.uint8), (160, 1))
    thumb = tmp_path / "thumb.jpg"
    Image.fromarray(film[::8, ::8]).save(thumb)
    exif = Image.Exif()
    path = tmp_path / "film.jpg"
    Image.fromarray(film).save(path, exif=exif, quality=90)
    data = path.read_bytes()
    (tmp_path / "trailing.jpg").write_bytes(data + b"\x00garbage after the end" * 200)
    assert load_image(tmp_path / "trailing.jpg").gray.shape == (160, 200)
    ok, encoded = cv2.imencode(".jpg", film)
    with_thumb = encoded.tobytes()
    app1 = (
        b"\xff\xe1" + (len(thumb.read_bytes()) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + thumb.read_bytes()
    )
    cut = with_thumb[:2] + app1 + with_thumb[2 : len(with_thumb) // 2]  # a thumbnail's end, then a cut scan
    (tmp_path / "cut.jpg").write_bytes(cut)
    with pytest.raises(CxrError, match="truncated JPEG"):
        load_image(tmp_path / "cut.jpg")


def test_control_characters_in_names_never_reach_the_terminal(bundle, films, tmp_path):
    name = "\x1b[2Jsneaky\x07.png"
    shutil.copy(films / "good0.png", tmp_path / name)
    result = cli("cxr-run", "predict", str(tmp_path / name), "--model", str(bundle), "--strict", check=None)
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
