"""OpenVINO backend: same answers as ONNX Runtime, chosen by auto on a CPU box, covered by latency and
parity."""

import json

import numpy as np
import pytest
from cxr.runtime.bundle import Bundle

from tests.conftest import cli, one_line_error, run_parity

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'cxr-edge[openvino]')")


def test_classifier_and_explainer_match_onnxruntime(bundle, phantoms):
    from cxr.runtime.backends.onnxruntime import CPU_EP, OrtBackend, OrtExplainer
    from cxr.runtime.backends.openvino import OvBackend, OvExplainer
    from cxr.runtime.preprocess import load_and_preprocess
    from cxr.runtime.segment import segment, segment_means

    opened = Bundle.open(bundle)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 1, 64, 64), dtype=np.uint8)
    with (
        OvBackend(bundle / "model.onnx", "fp32") as ov,
        OrtBackend(bundle / "model.onnx", "fp32", [CPU_EP]) as ort,
    ):
        assert np.abs(ov.run(pixels) - ort.run(pixels)).max() < 1e-5
        assert ov.metadata["cxr.classes"] == json.dumps(list(opened.card.classes))
    image = load_and_preprocess(sorted(phantoms.rglob("*.png"))[0], 64)
    segments = segment(image)
    rows = np.random.default_rng(1).integers(0, 2, (40, segments.max() + 1), dtype=np.uint8)
    with (
        OvExplainer(bundle / "explain.onnx", "fp32") as ov,
        OrtExplainer(bundle / "explain.onnx", "fp32", [CPU_EP]) as ort,
    ):
        for explainer in (ov, ort):
            explainer.set_image(image, segment_means(image, segments), segments)
        got = np.concatenate([ov.run(rows[:32]), ov.run(rows[32:])])
        want = np.concatenate([ort.run(rows[:32]), ort.run(rows[32:])])
    assert np.abs(got - want).max() < 1e-5


def test_auto_picks_openvino_on_a_cpu_box_and_predict_explains_with_it(bundle, phantoms, tmp_path):
    images = [str(p) for p in sorted((phantoms / "normal").glob("*.png"))[:2]]
    out = tmp_path / "out.jsonl"
    result = cli(
        "cxr-run",
        "predict",
        "--model",
        str(bundle),
        *images,
        "--explain",
        "--samples",
        "200",
        "--explain-dir",
        str(tmp_path / "overlays"),
        "--out",
        str(out),
    )
    assert "backend: openvino fp32 on cpu (OpenVINO" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["backend"] == "openvino" and r["explanation"]["samples"] == 200 for r in records)
    forced = cli("cxr-run", "predict", "--model", str(bundle), images[0], "--backend", "onnxruntime")
    assert "backend: onnxruntime fp32 on cpu" in forced.stderr

    base = ("cxr-run", "predict", "--model", str(bundle), images[0], "--explain", "--samples", "auto")
    settled = tmp_path / "settled.jsonl"
    cli(*base, "--settle-agreement", "0.9", "--explain-dir", str(tmp_path / "o2"), "--out", str(settled))
    explanation = json.loads(settled.read_text())["explanation"]
    assert "bootstrap top-5 agreement" in explanation["stopped"] or explanation["stopped"].startswith(
        "cap of"
    )
    assert explanation["sampler"] == "paired" and records[0]["explanation"]["sampler"] == "plain"
    for bad, message in (
        (("--settle-agreement", "1.5"), "between 0 and 1"),
        (("--samples", "200"), "auto only"),
        (("--sampler", "halves"), "--sampler must be one of paired, plain, got 'halves'"),
    ):
        args = [*base, "--settle-agreement", "0.5", *bad] if bad[0] == "--samples" else [*base, *bad]
        assert message in one_line_error(cli(*args, check=2))


def test_latency_and_parity_cover_openvino(bundle, phantoms, tmp_path):
    cli(
        "cxr-bench",
        "latency",
        "--model",
        str(bundle),
        "--batch-sizes",
        "2",
        "--warmup-s",
        "0.1",
        "--duration-s",
        "0.3",
        "--backends",
        "onnxruntime-fp32,openvino-fp32",
        "--one-at-a-time",
        "--out",
        str(tmp_path),
    )
    data = json.loads(next(tmp_path.glob("latency_*.json")).read_text())
    assert set(data["backends"]) == {"onnxruntime-fp32", "openvino-fp32"}
    assert data["b1_order"] == "one backend after another"
    report = tmp_path / "parity.json"
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    run_parity(copy, phantoms, "onnx,openvino", report)
    results = json.loads(report.read_text())["backends"]
    assert {"openvino-fp32", "openvino-fp16", "openvino-int8"} <= set(results)
    assert results["openvino-fp32"]["passed"] and results["openvino-fp32"]["max_abs_dprob"] < 1e-4


def test_explain_streams_divide_the_batch_within_the_cores():
    from cxr.runtime.backends.openvino import explain_streams

    assert [explain_streams(cores) for cores in (1, 2, 3, 4, 16)] == [1, 2, 2, 4, 4]
    assert explain_streams(16, batch=6) == 2
    assert explain_streams(8, batch=33) == 1


def test_explainer_streams_keep_row_order(bundle, phantoms):
    from cxr.runtime.backends.onnxruntime import CPU_EP, OrtExplainer
    from cxr.runtime.backends.openvino import OvExplainer
    from cxr.runtime.preprocess import load_and_preprocess
    from cxr.runtime.segment import segment, segment_means

    image = load_and_preprocess(sorted(phantoms.rglob("*.png"))[1], 64)
    segments = segment(image)
    rows = np.random.default_rng(2).integers(0, 2, (29, segments.max() + 1), dtype=np.uint8)
    with OrtExplainer(bundle / "explain.onnx", "fp32", [CPU_EP]) as ort:
        ort.set_image(image, segment_means(image, segments), segments)
        want = ort.run(rows)
    for streams in (1, 2, 4):
        with OvExplainer(bundle / "explain.onnx", "fp32") as ov:
            ov.streams = streams
            ov.set_image(image, segment_means(image, segments), segments)
            got = ov.run(rows)
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5, streams


def test_int8_explainer_runs_one_stream_and_others_keep_streams_only_when_they_agree(bundle, monkeypatch):
    """int8 compiled for 2 streams gave wrong rows in some process starts on the AVX2 host (one stream never
    did): int8 runs one stream; fp32 checks a probe batch both ways at open and falls back to one stream,
    saying so, when they differ."""
    from cxr.runtime.backends import openvino

    monkeypatch.setattr(openvino, "explain_streams", lambda batch: 2)
    with openvino.OvExplainer(bundle / "explain.int8.onnx", "int8") as ov:
        assert ov.streams == 1 and "int8: parallel int8 streams gave wrong rows" in ov.provider
    with openvino.OvExplainer(bundle / "explain.onnx", "fp32") as ov:
        assert ov.streams == 2 and ov.provider.endswith(", 2 streams")
        assert all(key[0] == 2 for key in ov.graph._requests)  # the one-stream compile was dropped
    honest = openvino._Compiled.run_split
    monkeypatch.setattr(
        openvino._Compiled,
        "run_split",
        lambda graph, feeds, split, streams: honest(graph, feeds, split, streams) + 0.01 * (streams > 1),
    )
    with openvino.OvExplainer(bundle / "explain.onnx", "fp32") as ov:
        assert ov.streams == 1 and ov.provider.endswith(
            ", 1 stream (parallel streams disagreed with one stream on a probe batch)"
        )


def test_every_openvino_compile_asks_for_f32_compute(bundle):
    """bf16 (AMX, AVX512_BF16 CPUs) or f16 compute would run a graph validated as fp32 at lower precision."""
    from cxr.runtime.backends.openvino import OvBackend, OvExplainer

    asked = []
    with (
        OvBackend(bundle / "model.onnx", "fp32") as classifier,
        OvExplainer(bundle / "explain.onnx", "fp32") as ex,
    ):
        for graph in (classifier.graph, ex.graph):
            compile_model = graph.core.compile_model
            graph.core = type("Recording", (), {})()
            graph.core.compile_model = lambda model, device, config, real=compile_model: (
                asked.append(config) or real(model, device, config)
            )
        ex.graph._requests.clear()  # the open's probe compiled before the recorder: compile again
        classifier.run(np.zeros((1, 1, 64, 64), dtype=np.uint8))
        ex.streams = 2
        image = np.zeros((64, 64), dtype=np.uint8)
        segments = (np.arange(64 * 64).reshape(64, 64) // 512).astype(np.int32)
        ex.set_image(image, image, segments)
        ex.run(np.ones((3, 8), dtype=np.uint8))
    assert len(asked) == 2 and all(config["INFERENCE_PRECISION_HINT"] == "f32" for config in asked)
    assert {config["PERFORMANCE_HINT"] for config in asked} == {"LATENCY", "THROUGHPUT"}
