"""Bundle stages as transactions (cxr.export.stage): a stage builds beside the bundle and swaps in whole,
under a lock; a planted link, a second stage, a failure or a kill never leaves a bundle that is not the old
one or the new one, whole."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli, one_line_error


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _intact(folder: Path) -> None:
    from cxr.runtime.card import read_card, verify_bundle

    card = read_card(folder)
    verify_bundle(folder, card)
    assert {p.name for p in folder.iterdir()} - {"card.json", ".card.json.sig"} == set(card.files)
    assert not list(folder.parent.glob(f".{folder.name}.stage-*"))


def test_onnx_into_a_folder_with_a_planted_link_writes_nothing_through_it(trained_run, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours to overwrite")
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "model.onnx").symlink_to(victim)  # torch.onnx.export followed it
    result = cli("cxr-export", "onnx", str(trained_run), "--out", str(out), check=1)
    assert "symbolic link" in one_line_error(result)
    assert victim.read_text() == "not yours to overwrite" and (out / "model.onnx").is_symlink()


def test_a_stage_on_a_bundle_with_a_planted_link_is_refused(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (copy / "model.fp16.onnx").unlink()
    (copy / "model.fp16.onnx").symlink_to(victim)
    result = cli("cxr-export", "fp16", str(copy), check=1)
    assert "symbolic link" in one_line_error(result) and victim.read_text() == "keep"


def test_re_export_replaces_the_bundle_whole_and_keeps_nothing_foreign(trained_run, bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    cli("cxr-export", "onnx", str(trained_run), "--out", str(copy))  # the old fp16/int8 graphs are not kept
    names = {p.name for p in copy.iterdir()}
    assert "model.fp16.onnx" not in names and "model.int8.onnx" not in names
    card = json.loads((copy / "card.json").read_text())
    assert set(card["files"]) == names - {"card.json"}
    _intact(copy)
    (copy / "notes.txt").write_text("mine")  # never listed, never deleted: the stage refuses instead
    for stage in (("onnx", str(trained_run), "--out", str(copy)), ("fp16", str(copy))):
        result = cli("cxr-export", *stage, check=2)
        assert "does not list (notes.txt)" in one_line_error(result) and (copy / "notes.txt").exists()
    run_copy = tmp_path / "run_copy"
    shutil.copytree(trained_run, run_copy)  # a run folder has a card.json too
    result = cli("cxr-export", "onnx", str(trained_run), "--out", str(run_copy), check=2)
    assert "model.pt" in one_line_error(result) and (run_copy / "model.pt").is_file()
    other = tmp_path / "not_a_bundle"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = cli("cxr-export", "onnx", str(trained_run), "--out", str(other), check=2)
    assert "not a bundle" in one_line_error(result) and (other / "notes.txt").read_text() == "mine"


def test_a_lock_file_that_is_a_hard_link_or_a_fifo_is_refused(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.link(victim, tmp_path / ".bundle.lock")
    result = cli("cxr-export", "fp16", str(copy), check=1)
    assert "not a plain lock file" in one_line_error(result) and victim.read_text() == "precious"
    (tmp_path / ".bundle.lock").unlink()
    os.mkfifo(tmp_path / ".bundle.lock")
    assert "not a plain lock file" in one_line_error(cli("cxr-export", "fp16", str(copy), check=1))


def test_a_second_stage_is_refused_while_one_holds_the_bundle(bundle, tmp_path):
    from cxr.export.stage import bundle_lock

    copy = _copy(bundle, tmp_path)
    before = _snapshot(copy)
    with bundle_lock(copy, "int8"):
        result = cli("cxr-export", "fp16", str(copy), check=1)
    assert "cxr-export int8" in one_line_error(result) and "fp16 refused" in one_line_error(result)
    assert _snapshot(copy) == before
    cli("cxr-export", "fp16", str(copy))  # free again
    _intact(copy)


def test_two_stages_at_once_leave_one_whole_result(bundle, phantoms, tmp_path):
    copy = _copy(bundle, tmp_path)
    stages = [
        [sys.executable, "-m", "cxr.export.cli", "fp16", str(copy)],
        [
            sys.executable,
            "-m",
            "cxr.export.cli",
            "int8",
            str(copy),
            "--calib",
            str(phantoms),
            "--samples",
            "16",
            "--check",
            "0",
        ],
    ]
    running = [subprocess.Popen(s, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in stages]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in running]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 1]), results  # the second waits for nothing: it is refused, or ran after
    assert all("is changing this bundle" in err for code, err in results if code == 1)
    _intact(copy)


KILL_BEFORE_CARD = """
import os, signal, sys
import cxr.runtime.card as card
card.record_files = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # after the graphs, before the card
from cxr.export.cli import main
sys.argv = ["cxr-export", "fp16", sys.argv[1]]
main()
"""


def test_a_stage_killed_between_graphs_and_card_leaves_the_old_bundle(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    for name in ("model.fp16.onnx", "explain.fp16.onnx"):
        (copy / name).unlink()
    from cxr.runtime.card import read_card, write_card

    card = read_card(copy)
    write_card(
        copy, card.replace(known_answers={k: v for k, v in card.known_answers.items() if "fp16" not in k})
    )
    before = _snapshot(copy)
    script = tmp_path / "kill.py"
    script.write_text(KILL_BEFORE_CARD)
    killed = subprocess.run(
        [sys.executable, str(script), str(copy)], capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == -9
    assert _snapshot(copy) == before  # no fp16 graph without its card entry: the old bundle, whole
    assert list(tmp_path.glob(".bundle.stage-*"))  # the killed stage's work folder ...
    assert cli("cxr-run", "info", "--model", str(copy)).returncode == 0
    cli("cxr-export", "fp16", str(copy))
    _intact(copy)  # ... is removed by the next stage
    assert (copy / "model.fp16.onnx").is_file()


def test_a_failing_stage_leaves_the_bundle_as_it_was(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    before = _snapshot(copy)
    empty = tmp_path / "no_images"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    result = cli("cxr-export", "int8", str(copy), "--calib", str(empty), check=1)
    assert "no readable calibration images" in one_line_error(result)
    assert ".stage-" not in result.stderr  # messages name the bundle, not the work folder
    assert _snapshot(copy) == before
    _intact(copy)


def test_parity_lists_its_report_and_a_signature_is_dropped_with_a_warning(bundle, phantoms, tmp_path):
    pytest.importorskip("cryptography", reason="signing needs the [sign] extra")
    copy = _copy(bundle, tmp_path)
    cli("cxr-export", "keygen", str(tmp_path / "site"))
    cli("cxr-export", "sign", str(copy), "--key", str(tmp_path / "site.key"))
    result = cli("cxr-export", "parity", str(copy), str(phantoms), "--backends", "onnx", check=None)
    assert result.returncode in (0, 1), result.stderr
    assert "signature is dropped" in result.stdout and not (copy / ".card.json.sig").exists()
    card = json.loads((copy / "card.json").read_text())
    assert "parity.json" in card["files"]
    _intact(copy)


def test_a_bundle_others_can_write_is_warned_about(bundle, phantoms, tmp_path):
    copy = _copy(bundle, tmp_path)
    os.chmod(copy / "model.onnx", 0o666)
    image = str(next(phantoms.rglob("*.png")))
    result = cli("cxr-run", "predict", image, "--model", str(copy))
    assert "writable by group or others (model.onnx)" in result.stderr
