"""Is this a chest film? The gate is fitted with the model, travels in the bundle, and every record says how
far its input is from the training films."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import cli, one_line_error


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def chest_passed_strangers_flagged(out: Path, films: list[Path]) -> tuple[list[dict], list[dict]]:
    """The records of a run over ``films`` and the strangers: every one scored, most films passed, every
    stranger flagged."""
    records = {Path(r["path"]).name: r for r in _records(out)}
    chest = [records[f.name] for f in films]
    others = [r for name, r in records.items() if name not in {f.name for f in films}]
    assert all(isinstance(r["ood_score"], float) for r in chest + others)
    assert np.mean([r["in_distribution"] for r in chest]) >= 0.8
    assert all(r["in_distribution"] is False for r in others)
    return chest, others


@pytest.fixture(scope="module")
def strangers(tmp_path_factory) -> Path:
    """A few images that are no chest film: a photograph, a page of text, a CT slice, a hand phantom."""
    from cxr.bench.ood_sets import write_ood_sets

    root = tmp_path_factory.mktemp("strangers")
    sets = write_ood_sets(root / "all", variants=1, anatomy=4)
    chosen = root / "chosen"
    chosen.mkdir()
    for kind in ("photo", "document", "ct_mr_us", "other_anatomy"):
        for path in sets[kind][:2]:
            shutil.copy(path, chosen / f"{kind}_{path.name}")
    return chosen


def test_fit_writes_a_gate_and_export_carries_it(trained_run, bundle):
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.ood import GATE_FILE, bundle_gate

    card = json.loads((trained_run / "card.json").read_text())
    assert (trained_run / GATE_FILE).is_file() and card["ood"]["file"] == GATE_FILE
    opened = Bundle.open(bundle)
    gate = bundle_gate(opened)
    assert gate is not None and GATE_FILE in opened.card.files  # hashed like every bundle file
    assert opened.card.ood["method"] == gate.method and "image" in gate.method
    assert opened.card.ood["threshold"] == pytest.approx(gate.threshold, rel=1e-5)
    assert 0 <= opened.card.ood["validation_flagged"] <= 0.2


def test_every_record_says_how_far_its_input_is_and_strangers_are_flagged(
    bundle, phantoms, strangers, tmp_path
):
    films = sorted(phantoms.rglob("*.png"))[::12]
    out = tmp_path / "r.jsonl"
    cli(
        "cxr-run",
        "predict",
        *map(str, films),
        str(strangers),
        "--model",
        str(bundle),
        "--out",
        str(out),
        check=None,
    )
    chest, others = chest_passed_strangers_flagged(out, films)
    assert all(any("is this a chest film?" in w for w in r["warnings"]) for r in others)
    assert min(r["ood_score"] for r in others) > max(r["ood_score"] for r in chest if r["in_distribution"])
    strict = tmp_path / "strict.jsonl"
    cli(
        "cxr-run",
        "predict",
        str(strangers),
        "--model",
        str(bundle),
        "--out",
        str(strict),
        "--strict",
        check=2,
    )
    assert all(r["label"] is None and r["error"] for r in _records(strict))


def test_a_flagged_overlay_says_so_in_words(bundle, strangers, tmp_path):
    photo = next(p for p in strangers.iterdir() if p.name.startswith("photo"))
    cli(
        "cxr-run",
        "predict",
        str(photo),
        "--model",
        str(bundle),
        "--explain",
        "--samples",
        "20",
        "--explain-dir",
        str(tmp_path / "maps"),
        "--out",
        str(tmp_path / "r.jsonl"),
    )
    overlay = cv2.imread(str(next((tmp_path / "maps").iterdir())))
    band = overlay[-30:, : overlay.shape[0]]
    red = (band[:, :, 2] > 150) & (band[:, :, 1] < 80) & (band[:, :, 0] < 80)
    assert red.sum() > 50  # the red words on the dark band at the foot of the picture


def test_csv_carries_the_score(bundle, phantoms, tmp_path):
    import csv

    out = tmp_path / "r.csv"
    cli("cxr-run", "predict", str(next(phantoms.rglob("*.png"))), "--model", str(bundle), "--out", str(out))
    row = next(csv.DictReader(out.open()))
    assert float(row["ood_score"]) == pytest.approx(float(row["ood_score"])) and row["in_distribution"] in (
        "True",
        "False",
    )


def test_a_bundle_without_a_gate_keeps_working_and_says_so_once(bundle, phantoms, tmp_path):
    from cxr.runtime.card import read_card, write_card

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "ood.npz").unlink()
    write_card(copy, read_card(copy).replace(ood={}))  # as bundles exported before gates are
    films = [str(p) for p in sorted(phantoms.rglob("*.png"))[:3]]
    out = tmp_path / "r.jsonl"
    result = cli("cxr-run", "predict", *films, "--model", str(copy), "--out", str(out))
    assert result.stderr.count("has no out-of-distribution gate") == 1
    assert all(r["ood_score"] is None and r["in_distribution"] is None and r["label"] for r in _records(out))


def test_the_gate_round_trips_and_rethresholds(trained_run):
    from cxr.runtime.errors import CxrError
    from cxr.runtime.ood import Gate

    gate = Gate.from_bytes((trained_run / "ood.npz").read_bytes())
    again = Gate.from_bytes(gate.to_bytes())
    features = np.random.default_rng(0).normal(size=(5, gate.feature_layout[-1][2]))
    stats = np.random.default_rng(1).random((5, len(gate.image.mean)))
    assert np.allclose(gate.scores(features, stats), again.scores(features, stats))
    looser = gate.with_keep(0.99)
    assert looser.threshold >= gate.threshold and looser.keep == 0.99
    with pytest.raises(CxrError, match="not a readable out-of-distribution gate"):
        Gate.from_bytes(b"PK\x03\x04 not a gate")


def test_export_ood_keep_rethresholds_the_bundles_gate(trained_run, tmp_path):
    cli("cxr-export", "onnx", str(trained_run), "--out", str(tmp_path / "b"), "--ood-keep", "0.99")
    card = json.loads((tmp_path / "b" / "card.json").read_text())
    assert card["ood"]["keep"] == 0.99
    bad = cli(
        "cxr-export", "onnx", str(trained_run), "--out", str(tmp_path / "c"), "--ood-keep", "1.5", check=2
    )
    assert "--ood-keep" in one_line_error(bad)


def test_dicom_headers_add_their_evidence(tmp_path):
    from cxr.runtime.preprocess import load_image

    from tests.test_dicom import _dataset, _save

    hip = load_image(_save(tmp_path / "hip.dcm", _dataset(BodyPartExamined="HIP")))
    assert any("BodyPartExamined HIP is not the chest" in w for w in hip.warnings)
    lateral = load_image(_save(tmp_path / "lat.dcm", _dataset(BodyPartExamined="CHEST", ViewPosition="LL")))
    assert [w for w in lateral.warnings if "lateral view" in w] and not any(
        "not the chest" in w for w in lateral.warnings
    )


def test_the_benchmark_measures_the_gate_per_kind(bundle, trained_run, phantoms, tmp_path):
    result = cli(
        "cxr-bench",
        "ood",
        "--model",
        str(bundle),
        "--run",
        str(trained_run),
        str(phantoms),
        "--out",
        str(tmp_path),
        "--compare",
    )
    report = json.loads((tmp_path / "ood.json").read_text())
    assert report["shipped"]["photo"]["auroc"] > 0.9 and report["shipped"]["document"]["flagged"] > 0.8
    assert set(report["comparison"]) >= {"msp", "energy", "mahalanobis all + image"}
    assert report["cost"]["gate_ms"] > 0 and "| photo |" in (tmp_path / "ood.md").read_text()
    assert "Candidates" in result.stdout
