"""A bundle from outside must never make us write elsewhere: links are refused, writes never follow one."""

import os
import shutil

import pytest
from cxr.runtime.errors import CxrError
from cxr.runtime.safe_io import atomic_write, refuse_links

from tests.conftest import cli, one_line_error


@pytest.mark.parametrize("planted", [".card.json.tmp", "model.fp16.onnx"])
def test_a_planted_symlink_is_refused_by_every_command_and_nothing_is_written(bundle, tmp_path, planted):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "model.fp16.onnx").unlink(missing_ok=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, copy / planted)
    for args in (
        ["cxr-export", "fp16", str(copy)],
        ["cxr-run", "info", "--model", str(copy)],
        ["cxr-run", "predict", "--model", str(copy), str(victim)],
    ):
        line = one_line_error(cli(*args, check=1))
        assert "symbolic link" in line and repr(planted) in line
    assert victim.read_text() == "precious\n"


def test_atomic_write_replaces_a_link_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "card.json"
    os.symlink(victim, target)
    atomic_write(target, "{}\n")
    assert victim.read_text() == "precious\n"
    assert not target.is_symlink() and target.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json", "victim.txt"]  # no temporary left


def test_refuse_links_names_them(tmp_path):
    os.symlink(tmp_path, tmp_path / "loop")
    with pytest.raises(CxrError, match="'loop'"):
        refuse_links(tmp_path)


def test_an_edited_card_cannot_relabel_the_images(bundle, phantoms, tmp_path):
    """Reordered classes pass every hash check (the card is not hashed by itself); the graph's own metadata
    says what it was exported with, so the bundle is refused."""
    from cxr.runtime.card import read_card, write_card

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    card = read_card(copy)
    write_card(copy, card.replace(classes=tuple(reversed(card.classes))), rehash=False)
    image = sorted((phantoms / "covid19").glob("*.png"))[0]
    line = one_line_error(cli("cxr-run", "predict", "--model", str(copy), str(image), check=1))
    assert "card.json classes" in line and "card.json was edited" in line


def test_nan_probabilities_are_an_error_not_covid(bundle, phantoms, monkeypatch):
    import numpy as np
    from cxr.runtime.backends.onnxruntime import OrtBackend
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.predict import PredictOptions, predict_stream

    opened = Bundle.open(bundle)
    backend = OrtBackend(opened.onnx_path("model", "fp32"), "fp32")
    real = backend._run_outputs  # what run_outputs and start_outputs both call

    def half_nan(batch):
        probs, features = real(batch)
        return np.where(np.arange(len(batch))[:, None] == 1, np.nan, probs), features

    monkeypatch.setattr(backend, "_run_outputs", half_nan)
    paths = sorted((phantoms / "normal").glob("*.png"))[:3]
    records = list(predict_stream(paths, opened, backend, PredictOptions()))
    assert [r["label"] is None for r in records] == [False, True, False]
    assert "non-finite probabilities" in records[1]["error"] and records[0]["error"] is None


def test_card_from_the_future_is_refused(bundle, tmp_path):
    import json

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    data = json.loads((copy / "card.json").read_text())
    data["format_version"] = 999
    (copy / "card.json").write_text(json.dumps(data))
    assert "format_version 999" in one_line_error(cli("cxr-run", "info", "--model", str(copy), check=1))


def test_graphs_with_external_data_are_refused(bundle, phantoms, tmp_path):
    """Weights in model.onnx.data would be read from a file the card never hashed: such graphs are refused."""
    import onnx
    from cxr.runtime.card import read_card, record_files

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    graph = onnx.load(str(copy / "model.onnx"))
    onnx.save_model(
        graph,
        str(copy / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    card = read_card(copy)
    record_files(
        copy,
        card.replace(files={k: v for k, v in card.files.items() if k != "model.onnx"}),
        ["model.onnx", "model.onnx.data"],
    )
    image = sorted((phantoms / "covid19").glob("*.png"))[0]
    line = one_line_error(
        cli("cxr-run", "predict", "--model", str(copy), str(image), "--backend", "onnxruntime", check=1)
    )
    assert "model.onnx" in line and "external data" in line


@pytest.mark.parametrize(
    "change, message",
    [
        ({"input": {"size": -1}}, "input.size"),
        ({"input": {"size": "64"}}, "input.size"),
        ({"input": {"size": 64.5}}, "input.size"),
        ({"classes": []}, "classes"),
        ({"classes": "abc"}, "classes"),
        ({"files": {"../../etc/passwd": "0" * 64}}, "plain files inside the bundle"),
        ({"files": {"/etc/hostname": "0" * 64}}, "plain files inside the bundle"),
    ],
)
def test_malformed_cards_are_one_line_errors(bundle, tmp_path, change, message):
    import json

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    data = json.loads((copy / "card.json").read_text())
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key == "input" else value
    (copy / "card.json").write_text(json.dumps(data))
    assert message in one_line_error(cli("cxr-run", "info", "--model", str(copy), check=1))


def test_deep_or_huge_cards_are_refused_without_a_traceback(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "card.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in one_line_error(cli("cxr-run", "info", "--model", str(copy), check=1))
    with open(copy / "card.json", "w") as handle:
        handle.write('{"classes": ["a", "b"], "pad": "' + "x" * (2 << 20) + '"}')
    assert "more than a model card can be" in one_line_error(
        cli("cxr-run", "info", "--model", str(copy), check=1)
    )


def test_info_exits_non_zero_when_a_file_changed(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with open(copy / "explain.onnx", "ab") as handle:
        handle.write(b"\0")
    result = cli("cxr-run", "info", "--model", str(copy), check=1)
    assert "SHA MISMATCH" in result.stdout and "changed since export" in result.stderr


def test_triton_export_never_replaces_a_folder_it_did_not_write(bundle, tmp_path):
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "notes.md").write_text("mine\n")

    def export(name: str, *extra: str, check: int = 0):
        args = ("triton", str(bundle), "--out", str(repo), "--name", name, "--format", "onnx", *extra)
        return cli("cxr-export", *args, check=check)

    line = one_line_error(export("docs", check=1))
    assert "not a model folder written by cxr-export" in line and "--force" in line
    assert (repo / "docs" / "notes.md").read_text() == "mine\n"
    export("cxr")
    export("cxr")  # ours: replaced
    export("docs", "--force")
    assert not (repo / "docs" / "notes.md").exists() and (repo / "docs" / "config.pbtxt").is_file()


def test_triton_export_checks_the_plan_against_its_sidecar(bundle, tmp_path):
    import json

    from cxr.runtime.card import read_card, record_files

    from tests.test_triton_repo import _bundle_with_plan

    copy = _bundle_with_plan(bundle, tmp_path, max_batch=16)
    sidecar = copy / "model.fp16.engine.json"
    facts = json.loads(sidecar.read_text())
    facts["plan_sha256"] = "0" * 64  # a sidecar that claims another plan
    sidecar.write_text(json.dumps(facts))
    record_files(copy, read_card(copy), [sidecar.name])
    line = one_line_error(
        cli("cxr-export", "triton", str(copy), "--out", str(tmp_path / "repo"), "--max-batch", "16", check=1)
    )
    assert "does not match its sidecar" in line and not (tmp_path / "repo" / "cxr").exists()


def test_the_served_card_holds_no_local_paths(bundle):
    from cxr.runtime.card import public_dict, read_card

    card = read_card(bundle)
    assert card.provenance.get("source_run") and card.training.get("data")  # what the bundle itself keeps
    shown = public_dict(card)
    assert (
        "source_run" not in shown["provenance"]
        and "data" not in shown["training"]
        and "out" not in shown["training"]
    )
    assert list(shown["classes"]) == list(card.classes) and shown["files"] == card.files


def test_a_pinned_digest_refuses_any_other_bundle(bundle, phantoms, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    printed = cli("cxr-export", "fp16", str(copy)).stdout
    digest = printed.strip().splitlines()[-1].split("bundle digest: ")[1]
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    image = str(sorted((phantoms / "covid19").glob("*.png"))[0])
    cli("cxr-run", "predict", "--model", str(copy), image, "--expect-digest", digest)
    assert (
        f"digest: {digest}" in cli("cxr-run", "info", "--model", str(copy), "--expect-digest", digest).stdout
    )
    from cxr.runtime.card import read_card, write_card

    write_card(
        copy, read_card(copy).replace(metrics={"accuracy": 0.99}), rehash=False
    )  # any change to the card
    line = one_line_error(
        cli("cxr-run", "predict", "--model", str(copy), image, "--expect-digest", digest, check=1)
    )
    assert "not the expected" in line and digest in line


def _dataset(path, pixel_bytes, syntax):
    """A 64 x 64 8-bit DX DICOM whose pixel data is ``pixel_bytes`` bytes, whatever the header declares: the
    image's 4,096 bytes hold a ramp (not a blank image), the rest are zeros (they deflate ~1000:1)."""
    import numpy as np

    from tests.test_runtime import _dicom

    image = bytes(range(64)) * 64
    data = image[:pixel_bytes] + bytes(max(0, pixel_bytes - len(image)))
    return _dicom(path, np.zeros((64, 64), np.uint8), syntax=syntax, pixel_data=data)


def test_a_deflate_bomb_is_refused_before_it_inflates(tmp_path):
    from cxr.runtime.preprocess import read_image
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    bomb = tmp_path / "bomb.dcm"
    _dataset(bomb, 32 << 20, DeflatedExplicitVRLittleEndian)
    assert bomb.stat().st_size < 100_000  # 32 MB of (almost all) zeros deflate to a few dozen kB
    with pytest.raises(CxrError, match="inflates to more than"):
        read_image(bomb, max_pixels=10_000)  # admits ~1 MB inflated
    padded = tmp_path / "padded.dcm"
    _dataset(padded, 1 << 20, ExplicitVRLittleEndian)
    with pytest.raises(CxrError, match="header declares 4,096"):
        read_image(padded)
    fine = tmp_path / "fine.dcm"
    _dataset(fine, 64 * 64, DeflatedExplicitVRLittleEndian)
    assert read_image(fine).shape == (64, 64)


def test_a_deflate_bomb_costs_no_memory(tmp_path):
    """The bomb is refused while inflating under the cap: the process's peak memory barely moves."""
    import subprocess
    import sys

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    bomb = tmp_path / "bomb.dcm"
    _dataset(bomb, 64 << 20, DeflatedExplicitVRLittleEndian)
    code = (
        "import resource, pydicom\nfrom cxr.runtime.preprocess import read_image\nfrom cxr.runtime.errors "
        "import CxrError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"try:\n    read_image({str(bomb)!r}, max_pixels=1_000_000)\nexcept CxrError as exc:\n    "
        "print(exc)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    message, grown_mb = result.stdout.strip().splitlines()
    assert "inflates to more than" in message
    assert int(grown_mb) < 4 * 7  # under 4x the largest admitted image (1 MP x 16 bit x 3 samples = 6 MB)


def test_a_signed_bundle_is_trusted_and_any_change_or_other_key_is_refused(bundle, phantoms, tmp_path):
    pytest.importorskip("cryptography", reason="signing needs the [sign] extra")
    from cxr.runtime.card import read_card, write_card

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    image = str(sorted((phantoms / "covid19").glob("*.png"))[0])
    cli("cxr-export", "keygen", str(tmp_path / "site"))
    cli("cxr-export", "keygen", str(tmp_path / "other"))
    assert (tmp_path / "site.key").stat().st_mode & 0o077 == 0
    unsigned = one_line_error(
        cli("cxr-run", "info", "--model", str(copy), "--trusted-key", str(tmp_path / "site.pub"), check=1)
    )
    assert "not signed" in unsigned
    cli("cxr-export", "sign", str(copy), "--key", str(tmp_path / "site.key"))
    cli("cxr-run", "predict", "--model", str(copy), image, "--trusted-key", str(tmp_path / "site.pub"))
    other = one_line_error(
        cli(
            "cxr-run",
            "predict",
            "--model",
            str(copy),
            image,
            "--trusted-key",
            str(tmp_path / "other.pub"),
            check=1,
        )
    )
    assert "not signed by" in other
    write_card(copy, read_card(copy).replace(metrics={"accuracy": 0.99}), rehash=False)
    changed = one_line_error(
        cli(
            "cxr-run",
            "predict",
            "--model",
            str(copy),
            image,
            "--trusted-key",
            str(tmp_path / "site.pub"),
            check=1,
        )
    )
    assert "changed since signing" in changed
