"""The gate at int8: the export measures which of the gate's parts int8 keeps, and an int8 backend reads the
gate on those parts only (int8's noise in the early stages' features flagged every film before)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli, run_parity
from tests.test_ood import _records, chest_passed_strangers_flagged, strangers  # noqa: F401  (its fixture)


def _features(bundle: Path, films: list[Path], precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """The graph's features and the gate's image statistics of ``films``."""
    from cxr.runtime.backends.onnxruntime import CPU_EP, OrtBackend
    from cxr.runtime.bundle import Bundle, onnx_name
    from cxr.runtime.reading import prepare

    opened = Bundle.open(bundle)
    prepared = [prepare(path, path.name, opened.card, 10**8) for path in films]
    images = np.stack([p.image for p in prepared])[:, None]
    with OrtBackend(bundle / onnx_name("model", precision), precision, providers=[CPU_EP]) as backend:
        features = backend.run_outputs_chunked(images)[1]
    return features.astype(np.float64), np.stack([p.stats for p in prepared])


def test_the_gate_on_fewer_parts_is_thresholded_anew(trained_run):
    from cxr.runtime.errors import CxrError
    from cxr.runtime.ood import Gate

    gate = Gate.from_bytes((trained_run / "ood.npz").read_bytes())
    assert gate.part_scores.shape == (len(gate.validation_scores), len(gate.part_names))
    assert np.allclose(gate.part_scores.sum(axis=1), gate.validation_scores)
    last = gate.part_names[-2]  # the final layer's part
    fewer = gate.only([last, "image"])
    assert fewer.part_names == [last, "image"] and fewer.keep == gate.keep
    wanted = np.quantile(gate.part_scores[:, -2:].sum(axis=1), gate.keep)
    assert fewer.threshold == pytest.approx(wanted) and fewer.threshold != pytest.approx(gate.threshold)
    again = Gate.from_bytes(fewer.to_bytes())
    assert np.array_equal(again.part_scores, fewer.part_scores) and again.method == fewer.method
    with pytest.raises(CxrError, match="no part 'mahalanobis:nowhere'"):
        gate.only(["mahalanobis:nowhere"])
    from dataclasses import replace

    with pytest.raises(CxrError, match="refit"):
        replace(gate, part_scores=np.zeros((0, 0))).only(["image"])


def test_a_part_a_precision_moves_is_left_out(bundle, phantoms):
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.ood import bundle_gate
    from cxr.runtime.ood_precision import GATE_DRIFT, precision_entry

    gate = bundle_gate(Bundle.open(bundle))
    films = sorted(phantoms.rglob("*.png"))[::6]
    reference, stats = _features(bundle, films)
    moved = reference.copy()
    first = gate.parts[0]
    noise = np.random.default_rng(0).normal(size=(len(films), first.stop - first.start))
    moved[:, first.start : first.stop] += 5 * first.scale * noise  # int8's kind of harm, on one part only
    entry = precision_entry(gate, reference, moved, stats)
    assert entry["drift_p95"][first.name] > GATE_DRIFT and first.name not in entry["parts"]
    assert entry["parts"] == [p for p in gate.part_names if p != first.name]
    assert entry["agreement"] == 1.0 and entry["films"] == len(films)  # the kept parts did not move
    untouched = precision_entry(gate, reference, reference, stats)
    assert untouched["parts"] == gate.part_names and max(untouched["drift_p95"].values()) == 0


def test_int8_reads_the_gate_on_the_parts_its_export_kept(bundle, phantoms, strangers, tmp_path):  # noqa: F811
    from cxr.runtime.card import read_card
    from cxr.runtime.ood import Gate

    entry = read_card(bundle).ood["precisions"]["int8"]
    gate = Gate.from_bytes((bundle / "ood.npz").read_bytes())
    assert entry["films"] >= 8 and "image" in entry["parts"] and entry["agreement"] >= 0.9
    for name, drift in entry["drift_p95"].items():
        assert (name in entry["parts"]) == (drift <= entry["limit"])
    assert entry["threshold"] == pytest.approx(gate.only(entry["parts"]).threshold, rel=1e-5)
    films = sorted(phantoms.rglob("*.png"))[::12]
    out = tmp_path / "r.jsonl"
    result = cli(
        "cxr-run",
        "predict",
        *map(str, films),
        str(strangers),
        "--model",
        str(bundle),
        "--backend",
        "onnxruntime",
        "--precision",
        "int8",
        "--allow-unvalidated",
        "--out",
        str(out),
        check=None,
    )
    assert "out-of-distribution gate with int8: " in result.stderr
    chest_passed_strangers_flagged(out, films)


def test_an_int8_graph_never_checked_runs_without_a_gate_and_says_so_once(bundle, phantoms, tmp_path):
    from cxr.runtime.card import read_card, write_card

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    card = read_card(copy)
    write_card(copy, card.replace(ood={k: v for k, v in card.ood.items() if k != "precisions"}))
    films = [str(p) for p in sorted(phantoms.rglob("*.png"))[:3]]
    out = tmp_path / "r.jsonl"
    args = ("--model", str(copy), "--backend", "onnxruntime", "--allow-unvalidated", "--out", str(out))
    result = cli("cxr-run", "predict", *films, "--precision", "int8", *args)
    assert result.stderr.count("was not checked against int8's features") == 1
    assert "run 'cxr-export int8' again" in result.stderr
    assert all(r["ood_score"] is None and r["in_distribution"] is None and r["label"] for r in _records(out))
    fp32 = cli("cxr-run", "predict", *films, "--precision", "fp32", "--overwrite", *args)
    assert "not checked" not in fp32.stderr
    assert all(isinstance(r["ood_score"], float) for r in _records(out))


def test_fp16_and_another_backend_move_no_part_of_the_gate(bundle, phantoms):
    """The whole gate holds where only rounding differs (fp16, OpenVINO): a gate fitted on fewer films than
    its components keeps no residual term, whose scale would be rounding itself."""
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.ood import bundle_gate
    from cxr.runtime.ood_precision import GATE_DRIFT, score_drift

    gate = bundle_gate(Bundle.open(bundle))
    films = sorted(phantoms.rglob("*.png"))[::6]
    reference, _ = _features(bundle, films)
    fp16, _ = _features(bundle, films, "fp16")
    drift = score_drift(gate, reference, fp16)
    assert max(drift.values()) <= GATE_DRIFT / 4, drift
    assert all(part.residual_scale == 0 or part.residual_scale > 1e-3 for part in gate.parts)


def test_parity_judges_the_gate_each_backend_reads(bundle, phantoms, tmp_path):
    from cxr.runtime.card import read_card, write_card
    from cxr.runtime.ood import Gate

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    report = tmp_path / "parity.json"
    run_parity(copy, phantoms, "onnx,int8", report)
    results = json.loads(report.read_text())["backends"]
    kept = read_card(copy).ood["precisions"]["int8"]["parts"]
    gate = Gate.from_bytes((copy / "ood.npz").read_bytes())
    assert results["onnx"]["gate"]["reads"] == gate.method and results["onnx"]["gate"]["disagree"] == 0
    int8 = results["int8"]["gate"]
    assert int8["reads"] == " + ".join(kept) and int8["agreement"] >= 0.9
    assert read_card(copy).parity["backends"]["int8"]["gate_agreement"] == int8["agreement"]
    # a card claiming int8 keeps every part (what every int8 graph read before the check): parity fails it
    card = read_card(copy)
    claimed = {**card.ood["precisions"]["int8"], "parts": gate.part_names}
    write_card(copy, card.replace(ood={**card.ood, "precisions": {"int8": claimed}}))
    failed = run_parity(copy, phantoms, "int8", report, check=1)
    assert "the out-of-distribution gate decided otherwise on" in failed.stdout + failed.stderr
    assert json.loads(report.read_text())["backends"]["int8"]["passed"] is False
