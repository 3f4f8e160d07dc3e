"""Known answers: every graph and engine reproduces, at every open, the outputs it gave on fixed probes when
it was written; graphs with non-finite weights are refused at export and at load."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from cxr.runtime.bundle import Bundle
from cxr.runtime.card import Card, InputSpec, read_card, write_card
from cxr.runtime.errors import BundleRefused, CxrError
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import AUTO_CPU_BACKEND, cli, one_line_error
from tests.fake_tensorrt import FakeCudart, FakeEngine, explainer_profiles, fake_trt

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="OpenVINO is not installed"
)
GRAPH_FILES = (
    "model.onnx",
    "explain.onnx",
    "model.fp16.onnx",
    "explain.fp16.onnx",
    "model.int8.onnx",
    "explain.int8.onnx",
)


def _copy(bundle: Path, tmp_path: Path, name: str = "bundle") -> Path:
    copy = tmp_path / name
    shutil.copytree(bundle, copy)
    return copy


def _poison(path: Path, value: float = np.nan) -> str:
    """Set one weight of the largest float initializer to ``value`` in place; returns its name."""
    graph = onnx.load(str(path))
    floats = [i for i in graph.graph.initializer if i.data_type == TensorProto.FLOAT]
    init = max(floats, key=lambda i: int(np.prod(i.dims)))
    array = numpy_helper.to_array(init).copy()
    array.flat[0] = value
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(graph, str(path))
    return init.name


def _rehash(folder: Path, **changes) -> None:
    """What a careless edit or an attacker does: the card's hashes follow the files."""
    write_card(folder, read_card(folder).replace(**changes))


def _open(folder: Path, backend: str, precision: str = "fp32", graph: str = "model"):
    from cxr.runtime.backends.select import open_classifier, open_explainer

    opener = open_classifier if graph == "model" else open_explainer
    opened, reason = opener(Bundle.open(folder), backend, precision)
    opened.close()
    return reason


# (e) export records them ---------------------------------------------------------------------------------


def test_export_records_known_answers_for_every_graph_it_wrote(bundle):
    from cxr.runtime.known_answers import PROBE_SET, explainer_probe, pixel_facts

    card = read_card(bundle)
    assert set(card.known_answers) == set(GRAPH_FILES)
    for name, entry in card.known_answers.items():
        rows = 4 if name.startswith("explain") else 3
        assert entry["probe_set"] == PROBE_SET and entry["computed_by"].startswith("onnxruntime ")
        assert np.array(entry["probs"]).shape == (rows, len(card.classes))
        step = 1 / 127 if "int8" in name else 5e-4  # int8 outputs are quantised in steps of 1/127, fp16 ~1e-4
        np.testing.assert_allclose(np.array(entry["probs"]).sum(axis=1), 1, atol=2 * step)
    probe = explainer_probe(card)
    assert (
        card.known_answers["explain.onnx"]["pixels_sha256"]
        == pixel_facts([probe.image, probe.fill])["pixels_sha256"]
    )
    # the explainer's all-on row is the unperturbed chest film: the classifier's first answer
    np.testing.assert_allclose(
        card.known_answers["explain.onnx"]["probs"][0],
        card.known_answers["model.onnx"]["probs"][0],
        atol=1e-5,
    )


def test_recorded_answers_are_what_onnx_runtime_gives_now(bundle):
    from cxr.runtime.backends.onnxruntime import CPU_EP, OrtBackend
    from cxr.runtime.known_answers import run_classifier

    card = read_card(bundle)
    with OrtBackend(bundle / "model.int8.onnx", "int8", [CPU_EP]) as backend:
        probs, facts = run_classifier(backend, card)
    entry = card.known_answers["model.int8.onnx"]
    assert np.abs(probs - np.array(entry["probs"])).max() < 1e-6
    assert facts["pixels_sha256"] == entry["pixels_sha256"]


def test_fp16_export_replaces_the_fp16_entries_and_keeps_the_others(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    card = read_card(copy)
    stale = {**card.known_answers["model.fp16.onnx"], "probs": [[0.25] * 4] * 3}
    write_card(
        copy, card.replace(known_answers={**card.known_answers, "model.fp16.onnx": stale}), rehash=False
    )
    cli("cxr-export", "fp16", str(copy))
    after = read_card(copy).known_answers
    assert (
        after["model.fp16.onnx"]["probs"] == card.known_answers["model.fp16.onnx"]["probs"] != stale["probs"]
    )
    assert after["model.onnx"] == card.known_answers["model.onnx"]
    assert after["model.int8.onnx"] == card.known_answers["model.int8.onnx"]


def test_export_refuses_a_graph_with_nan_weights(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    _poison(copy / "model.onnx")
    _rehash(copy)
    line = one_line_error(cli("cxr-export", "fp16", str(copy), check=1))
    assert "NaN or Inf" in line and "model" in line


# (a) NaN weights -------------------------------------------------------------------------------------------


@pytest.fixture
def nan_bundle(bundle, tmp_path):
    copy = _copy(bundle, tmp_path, "nan")
    _poison(copy / "model.onnx")
    _rehash(copy)
    return copy


@pytest.mark.parametrize("backend", ["onnxruntime", "auto", pytest.param("openvino", marks=needs_openvino)])
def test_nan_weights_are_refused_at_load_on_every_backend(nan_bundle, backend):
    with pytest.raises(BundleRefused, match=r"model\.onnx: 1 of its [\d,]+ float weights are NaN or Inf"):
        _open(nan_bundle, backend)


def test_nan_weights_refused_through_the_cli_in_one_line(nan_bundle, phantoms):
    image = sorted((phantoms / "normal").glob("*.png"))[0]
    result = cli("cxr-run", "predict", "--model", str(nan_bundle), str(image), check=1)
    line = one_line_error(result)
    assert "model.onnx" in line and "NaN or Inf" in line and "refused" in line


@needs_openvino
def test_known_answers_catch_nan_weights_where_openvino_answers_anyway(nan_bundle, monkeypatch):
    """Without the weight scan, OpenVINO gives finite near-uniform probabilities for a NaN graph; the known
    answers refuse it all the same, naming backend, precision, file and the difference."""
    from cxr.runtime import bundle as bundle_module
    from cxr.runtime.backends.openvino import OvBackend
    from cxr.runtime.known_answers import classifier_probe

    monkeypatch.setattr(bundle_module, "check_weights_once", lambda *args: None)
    with OvBackend(nan_bundle / "model.onnx", "fp32") as ov:
        assert np.all(np.isfinite(ov.run(classifier_probe(read_card(nan_bundle))[:1])))  # the failure mode
    with pytest.raises(CxrError, match=r"^openvino fp32 model\.onnx: known answers differ by [\d.e+-]+ \("):
        _open(nan_bundle, "openvino")
    with pytest.raises(CxrError, match="no backend could run this bundle") as refused:
        _open(nan_bundle, "auto")
    assert "known answers differ" in str(refused.value) and "\n" not in str(refused.value)


# (b) another graph -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_another_graph_under_a_name_is_refused_naming_the_difference(bundle, tmp_path, backend):
    copy = _copy(bundle, tmp_path)
    shutil.copy(copy / "model.int8.onnx", copy / "model.fp16.onnx")
    shutil.copy(copy / "explain.int8.onnx", copy / "explain.fp16.onnx")
    _rehash(copy)
    for graph, name in (("model", "model.fp16.onnx"), ("explain", "explain.fp16.onnx")):
        with pytest.raises(CxrError, match=rf"^{backend} fp16 {name}: known answers differ by") as refused:
            _open(copy, backend, "fp16", graph)
        worst = float(str(refused.value).split("differ by ")[1].split()[0])
        assert worst > 0.01 and "tolerance 0.005" in str(refused.value)
    assert _open(copy, backend, "fp32")  # the other graphs still open


# (c) preprocessing drift -----------------------------------------------------------------------------------


def _shifted(real):
    return lambda gray, size, pre=None: np.clip(real(gray, size, pre).astype(np.int16) + 1, 0, 255).astype(
        np.uint8
    )


def test_a_one_grey_level_preprocessing_shift_is_refused(bundle, monkeypatch):
    from cxr.runtime import preprocess

    monkeypatch.setattr(preprocess, "preprocess", _shifted(preprocess.preprocess))
    for graph in ("model", "explain"):
        with pytest.raises(
            BundleRefused, match=r"probe pixels' mean is 1 grey levels off export's \(tolerance 0\.25\)"
        ):
            _open(bundle, "onnxruntime", "fp32", graph)


def test_another_interpolation_is_refused(bundle, monkeypatch):
    import cv2
    from cxr.runtime import preprocess

    def linear(gray, size):
        height, width = gray.shape
        scale = size / min(height, width)
        shape = (max(size, round(width * scale)), max(size, round(height * scale)))
        return cv2.resize(gray, shape, interpolation=cv2.INTER_LINEAR)

    monkeypatch.setattr(preprocess, "resize_short_side", linear)
    with pytest.raises(BundleRefused, match="preprocesses images differently from the stage that exported"):
        _open(bundle, "onnxruntime", "int8")


def test_the_answers_themselves_see_the_shift_on_a_trained_model(bundle, monkeypatch):
    """Beyond the pixel check: the trained test model's answers move by far more than the fp32 tolerance."""
    from cxr.runtime import known_answers, preprocess

    monkeypatch.setattr(preprocess, "preprocess", _shifted(preprocess.preprocess))
    monkeypatch.setattr(known_answers, "check_pixels", lambda *args: None)
    with pytest.raises(CxrError, match="known answers differ by") as refused:
        _open(bundle, "onnxruntime", "fp32")
    assert float(str(refused.value).split("differ by ")[1].split()[0]) > 100 * 1e-5


# (d) old bundles -------------------------------------------------------------------------------------------


def test_an_old_bundle_opens_and_says_so_once(bundle, tmp_path, caplog):
    copy = _copy(bundle, tmp_path, "old")
    _rehash(copy, known_answers={})
    with caplog.at_level(logging.WARNING):
        assert _open(copy, "auto").startswith(AUTO_CPU_BACKEND)
        assert _open(copy, "onnxruntime", "fp16", "explain")
    lines = [r.getMessage() for r in caplog.records if "known answers" in r.getMessage()]
    assert lines == ["no known answers in this bundle (exported before they existed): re-export to add them"]


def test_a_probe_set_this_runtime_does_not_know_refuses(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    card = read_card(copy)
    answers = {**card.known_answers, "model.onnx": {**card.known_answers["model.onnx"], "probe_set": 99}}
    write_card(copy, card.replace(known_answers=answers), rehash=False)
    with pytest.raises(BundleRefused, match="probe set 99, this cxr-edge knows 1"):
        _open(copy, "onnxruntime")


# (f) engines, against the fake TensorRT --------------------------------------------------------------------


@pytest.fixture
def engine_bundle(tmp_path, monkeypatch):
    """A 2-class, 32 px bundle whose fp16 engines 'build' into fake plans: (folder, install(engines))."""
    from cxr.export import engine_build
    from cxr.runtime.backends import tensorrt as trt_backend

    folder = tmp_path / "engines"
    folder.mkdir()
    weights = [numpy_helper.from_array(np.ones(3, np.float32), "w")]
    for name in ("model.fp16.onnx", "explain.fp16.onnx"):  # only their weights are read: the plan is faked
        (folder / name).write_bytes(_model(weights))
    write_card(folder, Card(classes=("clear", "opaque"), input=InputSpec(size=32)))
    cudart = FakeCudart()
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_backend, "tensorrt_available", lambda: True)
    monkeypatch.setattr(
        trt_backend, "device_facts", lambda: {"gpu_name": "Fake", "compute_capability": "9.0"}
    )
    monkeypatch.setattr(
        engine_build, "build_plan", lambda source, *args: (f"plan of {source.name}".encode(), "10.13.0")
    )

    def install(scale: float = 1.0) -> None:
        engines = {
            b"plan of model.fp16.onnx": FakeEngine(
                {"image": ((1, 1, 32, 32), (4, 1, 32, 32), (4, 1, 32, 32))}, scale=scale
            ),
            b"plan of explain.fp16.onnx": FakeEngine(explainer_profiles(size=32, batch=4), scale=scale),
        }
        monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake_trt(engines))

    return folder, install


def test_engines_record_tensorrts_own_answers_at_build(engine_bundle):
    from cxr.export.engine_build import Profile, build_engines
    from cxr.runtime.known_answers import classifier_probe

    folder, install = engine_bundle
    install()
    build_engines(folder, "fp16", Profile(1, 4, 4))
    card = read_card(folder)
    model, explain = card.known_answers["model.fp16.engine"], card.known_answers["explain.fp16.engine"]
    means = classifier_probe(card).reshape(3, -1).mean(axis=1) / 255  # what the fake engine answers
    np.testing.assert_allclose(np.array(model["probs"])[:, 0], means, atol=1e-6)
    np.testing.assert_allclose(np.array(explain["probs"])[:, 0], [0.016, 0, 0.008, 0.008], atol=1e-6)
    assert model["computed_by"] == "TensorRT 10.13.0 on Fake"
    assert "model.fp16.onnx" not in card.known_answers  # only files written by the stage


def test_no_engine_is_built_from_nan_weights(engine_bundle):
    from cxr.export.engine_build import Profile, build_engines

    folder, install = engine_bundle
    install()
    (folder / "model.fp16.onnx").write_bytes(
        _model([numpy_helper.from_array(np.full(3, np.nan, np.float32))])
    )
    _rehash(folder)
    with pytest.raises(BundleRefused, match=r"model\.fp16\.onnx: 3 of its 3 float weights are NaN or Inf"):
        build_engines(folder, "fp16", Profile(1, 4, 4))
    assert not (folder / "model.fp16.engine").exists()


def test_a_wrong_engine_is_refused_and_the_right_one_opens(engine_bundle):
    from cxr.export.engine_build import Profile, build_engines

    folder, install = engine_bundle
    install()
    build_engines(folder, "fp16", Profile(1, 4, 4))
    assert _open(folder, "tensorrt", "fp16").startswith("tensorrt fp16 on cuda")
    assert _open(folder, "tensorrt", "fp16", "explain").startswith("tensorrt fp16 on cuda")
    install(scale=0.5)  # same plan bytes and sidecar, other answers: a wrong engine or a broken GPU
    with pytest.raises(
        CxrError, match=r"^tensorrt fp16 model\.fp16\.engine on cuda: known answers differ by"
    ):
        _open(folder, "tensorrt", "fp16")
    with pytest.raises(
        CxrError, match=r"explain\.fp16\.engine on cuda: known answers differ by .*tolerance 0\.002"
    ):
        _open(folder, "tensorrt", "fp16", "explain")


# (g) the weight scan ---------------------------------------------------------------------------------------


def _model(initializers: list[TensorProto], nodes: list | None = None) -> bytes:
    """A graph holding ``initializers`` (and ``nodes``): what the scan reads, never run."""
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    nodes = nodes or [helper.make_node("Identity", [initializers[0].name], ["y"])]
    graph = helper.make_graph(nodes, "g", [], [out], initializers)
    return helper.make_model(graph).SerializeToString()


@pytest.mark.parametrize(
    "tensor",
    [
        numpy_helper.from_array(np.array([1, np.nan, 3], np.float32), "raw_f32"),
        helper.make_tensor("packed_f32", TensorProto.FLOAT, [3], [1.0, float("inf"), 2.0]),
        numpy_helper.from_array(np.array([0.5, -np.inf], np.float16), "raw_f16"),
        helper.make_tensor("int32_f16", TensorProto.FLOAT16, [2], np.array([0.5, np.nan], np.float16)),
        helper.make_tensor("packed_f64", TensorProto.DOUBLE, [2], [1.0, float("nan")]),
        helper.make_tensor("int32_bf16", TensorProto.BFLOAT16, [2], [1.0, float("inf")]),
    ],
    ids=lambda t: t.name,
)
def test_weight_scan_finds_nan_and_inf_in_every_float_storage(tensor):
    from cxr.runtime.onnx_weights import check_weights, scan_weights

    clean = numpy_helper.from_array(np.ones(5, np.float32), "clean")
    scan = scan_weights(_model([clean, tensor]))
    assert (scan.values, scan.bad_values, scan.bad_tensors) == (
        5 + int(np.prod(tensor.dims)),
        1,
        (tensor.name,),
    )
    with pytest.raises(
        BundleRefused, match=rf"^g\.onnx: 1 of its {scan.values} float weights .*'{tensor.name}'"
    ):
        check_weights(_model([clean, tensor]), "g.onnx")


def test_weight_scan_looks_into_constant_nodes_and_subgraphs():
    from cxr.runtime.onnx_weights import scan_weights

    bad = numpy_helper.from_array(np.array([np.inf], np.float32), "const_value")
    constant = helper.make_node("Constant", [], ["c"], value=bad)
    branch = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["b"], value=numpy_helper.from_array(np.array([np.nan], np.float32))
            )
        ],
        "then",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.array([np.nan, 1], np.float32), "branch_init")],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    branching = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    scan = scan_weights(_model([cond], [constant, branching]))
    assert (
        scan.bad_values == 1 + 2 * 2
        and "const_value" in scan.bad_tensors
        and "branch_init" in scan.bad_tensors
    )


def test_clean_graphs_pass_and_every_weight_is_counted(bundle):
    from cxr.runtime.onnx_weights import scan_weights

    for name in ("model.onnx", "model.fp16.onnx", "explain.int8.onnx"):
        graph = onnx.load(str(bundle / name))
        floats = [
            int(np.prod(t.dims))
            for t in graph.graph.initializer
            if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
        ]
        scan = scan_weights((bundle / name).read_bytes())
        assert scan.bad_values == 0 and scan.values >= sum(floats) > 0, name


def test_weights_are_scanned_once_per_content(bundle, monkeypatch):
    from cxr.runtime import onnx_weights

    scanned = []
    real = onnx_weights.check_weights
    monkeypatch.setattr(
        onnx_weights, "check_weights", lambda data, path: scanned.append(path) or real(data, path)
    )
    monkeypatch.setattr(onnx_weights, "_checked", set())
    opened = Bundle.open(bundle)
    opened.verified_bytes("model.int8.onnx")
    opened.verified_bytes("model.int8.onnx")
    assert scanned == [bundle / "model.int8.onnx"]
