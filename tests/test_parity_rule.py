"""Parity rules that know their sample size: one flip is not a failure, a real shift is."""

import numpy as np
from cxr.export.parity import DEFAULT_RULES, compare
from cxr.runtime.labels import CLASSES
from cxr.runtime.metrics import classification_report


def _paired(changes: list[tuple[int, int, int]], per_class: int = 150):
    """Reference predictions all right; then (true class, predicted instead, count) changes for the
    backend."""
    labels = np.repeat(np.arange(4), per_class)
    reference = np.eye(4, dtype=np.float32)[labels] * 0.9 + 0.025
    other = reference.copy()
    for true, wrong, count in changes:
        rows = np.flatnonzero(labels == true)[:count]
        other[rows] = np.eye(4, dtype=np.float32)[wrong] * 0.9 + 0.025
    return labels, reference, other


def _judge(changes):
    labels, reference, other = _paired(changes)
    ref_report = classification_report(labels, reference.argmax(1), CLASSES)
    return compare(reference, other, labels, CLASSES, ref_report, DEFAULT_RULES["fp16"])


def test_one_flip_in_a_class_of_150_passes_and_is_reported():
    result = _judge([(3, 2, 1)])
    assert result["passed"], result["failures"]
    assert result["flips"] == 1 and result["n"] == 600
    viral = result["classes"]["pneumonia_viral"]
    assert (viral["n"], viral["flips"], viral["lost"], viral["gained"]) == (150, 1, 1, 0)
    assert (
        result["deltas_pt"]["pneumonia_viral.recall"] < -0.5
    )  # the old fixed 0.5-pt rule would have failed it


def test_a_real_shift_in_one_class_fails_by_mcnemar():
    result = _judge([(0, 1, 9)])  # nine COVID-19 films lost
    assert not result["passed"]
    assert any(f.startswith("covid19 recall shifted (9 lost, 0 gained of 150") for f in result["failures"])
    assert result["covid_recall_delta_pt"] == -6.0


def test_many_small_flips_fail_the_flip_rate_test():
    result = _judge([(0, 1, 3), (1, 0, 3), (2, 3, 3), (3, 2, 3)])  # 12 of 600 = 2 %, none alone significant
    assert not result["passed"]
    assert any("12 of 600 predictions changed" in f for f in result["failures"])
    assert all(shift["mcnemar_p"] > 0.05 for shift in result["classes"].values())


def test_unvalidated_graphs_are_refused_until_parity_passes(bundle, phantoms, tmp_path):
    import shutil

    from tests.conftest import cli, one_line_error, run_parity

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    image = str(sorted((phantoms / "normal").glob("*.png"))[0])
    line = one_line_error(
        cli("cxr-run", "predict", "--model", str(copy), image, "--precision", "int8", check=1)
    )
    assert "int8 graph has never run parity" in line and "--allow-unvalidated" in line
    info = cli("cxr-run", "info", "--model", str(copy)).stdout
    assert "fp32 model    parity passed" in info and "int8 model    parity not run" in info
    run_parity(copy, phantoms, "fp16", tmp_path / "p.json")
    cli("cxr-run", "predict", "--model", str(copy), image, "--precision", "fp16")  # passed: no flag needed
    cli("cxr-export", "fp16", str(copy))  # a new fp16 graph has not passed anything yet
    assert "fp16 graph has never run parity" in one_line_error(
        cli("cxr-run", "predict", "--model", str(copy), image, "--precision", "fp16", check=1)
    )


def test_int8_parity_on_a_vnni_cpu_does_not_vouch_for_a_cpu_without(bundle, phantoms, tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    import pytest
    from cxr.runtime import cpu_features
    from cxr.runtime.backends.select import check_validated, int8_cpu_risk
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.errors import CxrError

    from tests.conftest import run_parity

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    run_parity(copy, phantoms, "int8", tmp_path / "p.json", check=None)
    recorded = Bundle.open(copy).card.parity["backends"]["int8"]["cpu_int8"]
    assert recorded == cpu_features.cpu_int8_features()  # parity says which CPU it ran on

    card = Bundle.open(copy).card
    int8 = card.provenance["int8"]

    def case(weights: str, checked_on: str | None) -> SimpleNamespace:
        result = {"passed": True, **({"cpu_int8": checked_on} if checked_on else {})}
        notes = {**int8, "model": {**int8["model"], "weights": weights}}
        edited = card.replace(
            provenance={**card.provenance, "int8": notes}, parity={"backends": {"int8": result}}
        )
        return SimpleNamespace(card=edited, folder=copy)

    cpu_int8 = SimpleNamespace(name="openvino", precision="int8", device="cpu")
    full, seven = "int8 per-channel symmetric", "int8 per-channel symmetric, 7-bit range"
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: {"avx2", "fma"})  # an older x86 CPU
    with pytest.raises(CxrError, match="passed parity on avx512_vnni, but this CPU has no VNNI/AMX"):
        check_validated(case(full, "avx512_vnni"), cpu_int8, allow_unvalidated=False)
    warning = check_validated(case(full, None), cpu_int8, allow_unvalidated=True)
    assert "a CPU not recorded" in warning and "used anyway" in warning
    assert (
        check_validated(case(seven, "avx512_vnni"), cpu_int8, False) is None
    )  # 7-bit weights cannot saturate
    assert (
        check_validated(case(full, cpu_features.NO_INT8_DOT), cpu_int8, False) is None
    )  # checked on such a CPU
    gpu = SimpleNamespace(name="onnxruntime", precision="int8", device="cuda")
    assert int8_cpu_risk(case(full, "avx512_vnni").card, gpu) is None
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: {"avx2", "avx512_vnni"})
    assert check_validated(case(full, "avx512_vnni"), cpu_int8, False) is None
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: {"asimd"})
    assert check_validated(case(full, "avx512_vnni"), cpu_int8, False) is None  # ARM: no such kernels


def test_cpu_features_name_the_instructions_int8_and_latency_depend_on():
    from cxr.runtime.cpu_features import NO_INT8_DOT, cpu_int8_features, cpu_vector_isa

    zen4 = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma"}
    zen3 = {"avx2", "fma", "sse4_2"}
    assert cpu_vector_isa(zen4) == "avx512f" and cpu_vector_isa(zen3) == "avx2"
    assert cpu_int8_features(zen4) == "avx512_vnni, avx_vnni" and cpu_int8_features(zen3) == NO_INT8_DOT
    assert cpu_vector_isa(set()).startswith("none of")
