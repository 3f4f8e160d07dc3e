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
        assert not ov.graph._requests and ov.graph._parallel  # the one-stream compile was dropped
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
        ex.graph._parallel.clear()
        classifier.run(np.zeros((1, 1, 64, 64), dtype=np.uint8))
        ex.streams = 2
        image = np.zeros((64, 64), dtype=np.uint8)
        segments = (np.arange(64 * 64).reshape(64, 64) // 512).astype(np.int32)
        ex.set_image(image, image, segments)
        ex.run(np.ones((3, 8), dtype=np.uint8))
    assert len(asked) == 2 and all(config["INFERENCE_PRECISION_HINT"] == "f32" for config in asked)
    assert {config["PERFORMANCE_HINT"] for config in asked} == {"LATENCY", "THROUGHPUT"}


def test_bf16_is_refused_on_a_cpu_without_the_instructions(bundle, monkeypatch):
    from cxr.runtime import cpu_features
    from cxr.runtime.backends.openvino import OvBackend
    from cxr.runtime.backends.select import open_classifier, runnable_here
    from cxr.runtime.errors import CxrError

    assert cpu_features.bf16_refusal({"avx2", "fma"}).endswith(cpu_features.NO_BF16)
    assert cpu_features.bf16_refusal({"avx512f", "avx512_bf16"}) is None
    assert cpu_features.bf16_refusal({"amx_bf16"}) is None
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: {"avx2"})
    with pytest.raises(CxrError, match="bf16 needs a CPU with AVX512-BF16 or AMX-BF16"):
        OvBackend(bundle / "model.onnx", "bf16")
    with pytest.raises(CxrError, match="--backend openvino: bf16 needs"):
        open_classifier(Bundle.open(bundle), "openvino", "bf16")
    with pytest.raises(CxrError, match="--backend onnxruntime: onnxruntime does not run bf16 .*openvino"):
        open_classifier(Bundle.open(bundle), "onnxruntime", "bf16")
    assert ("openvino", "bf16") not in runnable_here(Bundle.open(bundle))


@pytest.mark.skipif(
    __import__("cxr.runtime.cpu_features").runtime.cpu_features.bf16_refusal() is not None,
    reason="this CPU has no AVX512-BF16/AMX-BF16",
)
def test_bf16_runs_the_fp32_graph_in_bf16_after_its_own_parity_and_auto_picks_it(bundle, phantoms, tmp_path):
    import shutil

    from cxr.runtime.backends.openvino import OvBackend

    pixels = np.random.default_rng(3).integers(0, 256, (4, 1, 64, 64), dtype=np.uint8)
    with OvBackend(bundle / "model.onnx", "fp32") as f32, OvBackend(bundle / "model.onnx", "bf16") as bf16:
        assert bf16.provider.endswith("CPU bf16") and f32.provider.endswith("CPU f32")
        gap = np.abs(bf16.run(pixels) - f32.run(pixels)).max()
    assert 0 < gap < 1e-2  # computed in bf16 (not silently f32), and close to fp32
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    image = str(sorted((phantoms / "normal").glob("*.png"))[0])
    base = ("cxr-run", "predict", "--model", str(copy), image)
    assert "the bf16 graph has never run parity" in one_line_error(cli(*base, "--precision", "bf16", check=1))
    report = tmp_path / "parity.json"
    run_parity(copy, phantoms, "openvino-bf16", report)
    result = json.loads(report.read_text())["backends"]["openvino-bf16"]
    assert result["passed"] and result["runs_on"].endswith("CPU bf16)") and "bf16" in result["cpu_bf16"]
    ran = cli(*base, "--precision", "bf16")
    assert json.loads(ran.stdout)["precision"] == "bf16" and "backend: openvino bf16 on cpu" in ran.stderr
    picked = cli(*base, "--precision", "auto")  # int8 is faster but has not run parity on this copy
    assert json.loads(picked.stdout)["precision"] == "bf16"
    assert "openvino int8: parity not run" in picked.stderr


def test_precision_auto_picks_the_fastest_validated_file_of_each_backend(bundle, phantoms, tmp_path):
    """OpenVINO's int8 once its parity passed (ONNX Runtime CPU's int8 is slower than its fp32: never)."""
    import shutil

    from cxr.runtime.backends.select import open_classifier
    from cxr.runtime.errors import CxrError

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    before, reason = open_classifier(Bundle.open(copy), "openvino", "auto")
    with before:
        assert before.precision in ("bf16", "fp32") and "openvino int8: parity not run" in reason
    run_parity(copy, phantoms, "int8", tmp_path / "parity.json")
    for backend, wanted in (("openvino", "int8"), ("onnxruntime", "fp32"), ("auto", "int8")):
        opened, reason = open_classifier(Bundle.open(copy), backend, "auto")
        with opened:
            assert (opened.name, opened.precision) == ("openvino" if backend == "auto" else backend, wanted)
    explaining, reason = open_classifier(Bundle.open(copy), "openvino", "auto", maps=True)
    with explaining:  # a job that explains keeps to precisions whose maps hold the fp32 map's top 5
        assert explaining.precision != "int8" and "openvino int8: its LIME maps keep under 90 %" in reason
    card = json.loads((copy / "card.json").read_text())
    card["parity"]["backends"]["int8"]["passed"] = False
    card["parity"]["backends"]["onnx"] = {"passed": False}
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(
        CxrError, match="--precision auto: nothing validated runs here .*onnxruntime fp32: parity failed"
    ):
        open_classifier(Bundle.open(copy), "onnxruntime", "auto")


def test_classifier_batches_run_on_parallel_streams_one_batch_ahead_with_onnxruntime_answers(
    bundle, phantoms, monkeypatch
):
    """A batch of 8 runs in 4 parts on 2 streams (on any core count: streams are asked for here), predict
    starts each batch before collecting the one before, and every record is the one ONNX Runtime gives."""
    from cxr.runtime.backends import openvino
    from cxr.runtime.backends.onnxruntime import CPU_EP, OrtBackend
    from cxr.runtime.predict import PredictOptions, predict_stream

    monkeypatch.setattr(openvino, "parallel_streams", lambda rows, min_rows: 2 if rows >= 8 else 1)
    opened = Bundle.open(bundle)
    paths = sorted(phantoms.rglob("*.png"))[:21]
    started, collected = [], []
    with openvino.OvBackend(bundle / "model.onnx", "fp32") as ov:
        assert ov.runs_ahead and ov.ready_for(8) == "batches of 8 on 2 streams"
        assert ov.streams_for(8) == (2, 4) and ov.streams_for(4) == (1, 1)
        real = ov.graph.start_split

        def recording(feeds, split, streams, jobs=None):
            started.append(len(feeds[split]))
            wait = real(feeds, split, streams, jobs)
            return lambda: collected.append(len(started)) or wait()

        ov.graph.start_split = recording
        records = list(predict_stream(paths, opened, ov, PredictOptions(batch_size=8)))
    assert started == [8, 8, 8] and collected == [2, 3, 3]  # batch 1 collected after batch 2 started
    with OrtBackend(bundle / "model.onnx", "fp32", [CPU_EP]) as ort:
        want = list(predict_stream(paths, opened, ort, PredictOptions(batch_size=8)))
    assert [r["path"] for r in records] == [str(p) for p in paths]
    got = np.array([[r["probs"][c] for c in opened.card.classes] for r in records])
    expected = np.array([[r["probs"][c] for c in opened.card.classes] for r in want])
    assert np.abs(got - expected).max() < 1e-5


def test_a_parallel_compile_that_disagrees_is_compiled_anew_then_given_up(bundle, monkeypatch):
    """Each OpenVINO parallel compile is right or wrong for its life (int8 was wrong in 4 of 12 compiles under
    load, 1 of 12 idle, on the Xeon): a wrong one is compiled anew; after STREAM_COMPILES wrong ones the
    batch size runs one stream, and the run's backend line says why."""
    from cxr.runtime.backends import openvino

    monkeypatch.setattr(openvino, "parallel_streams", lambda rows, min_rows: 2 if rows >= 8 else 1)
    wrong_compiles, wrong_requests = {"left": 1}, []  # the requests are kept: no id is reused
    real_compile = openvino._Compiled._compile

    class WrongCompile:
        def __init__(self, compiled):
            self.compiled = compiled

        def create_infer_request(self):
            wrong_requests.append(self.compiled.create_infer_request())
            return wrong_requests[-1]

    def compile_(graph, shapes, config):
        compiled = real_compile(graph, shapes, config)
        if config["PERFORMANCE_HINT"] == "THROUGHPUT" and wrong_compiles["left"] > 0:
            wrong_compiles["left"] -= 1
            return WrongCompile(compiled)
        return compiled

    real_outputs = openvino._Compiled._outputs_of

    def outputs_of(graph, request):
        probs, features = real_outputs(graph, request)
        return (probs + 0.3 if any(request is r for r in wrong_requests) else probs), features

    monkeypatch.setattr(openvino._Compiled, "_compile", compile_)
    monkeypatch.setattr(openvino._Compiled, "_outputs_of", outputs_of)
    pixels = np.random.default_rng(3).integers(0, 256, (8, 1, 64, 64), dtype=np.uint8)
    with openvino.OvBackend(bundle / "model.onnx", "fp32") as ov:
        assert ov.ready_for(8) == "batches of 8 on 2 streams" and wrong_compiles["left"] == 0
        assert len(wrong_requests) == 4  # the first compile's 4 requests, then a new compile
        parallel = ov.run(pixels)
        single = np.concatenate([ov.run(p[None]) for p in pixels])
        assert np.abs(parallel - single).max() < 1e-5  # the second compile is the one kept
    wrong_compiles["left"] = openvino.STREAM_COMPILES
    with openvino.OvBackend(bundle / "model.onnx", "fp32") as ov:
        line = ov.ready_for(8)
        assert ov.streams_for(8) == (1, 1) and line.startswith("batches of 8 on 1 stream (2 parallel streams")
        assert f"in {openvino.STREAM_COMPILES} compiles" in line and not ov.graph._parallel
        assert np.abs(ov.run(pixels) - single).max() < 1e-5
