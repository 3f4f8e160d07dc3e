import json
import shutil

import cxr.train.models  # noqa: F401
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cxr.export.engine_build import Profile, network_flags, profile_shapes, sidecar_facts
from cxr.export.onnx_export import read_metadata
from cxr.runtime.card import read_card, record_files, sha256_file, verify_bundle
from cxr.runtime.engine_sidecar import check_sidecar, read_sidecar, write_sidecar
from cxr.runtime.errors import CxrError
from cxr.train.run import load_run

from tests.conftest import AUTO_CPU_BACKEND, cli, one_line_error


def _ort(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_bundle_graphs_pass_checker_and_match_pytorch(bundle, trained_run):
    _, model = load_run(trained_run)
    pixels = np.random.default_rng(3).integers(0, 256, (5, 1, 64, 64), dtype=np.uint8)
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels)).numpy()
    onnx.checker.check_model(str(bundle / "model.onnx"), full_check=True)
    graph = onnx.load(str(bundle / "model.onnx"))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert np.abs(_ort(bundle / "model.onnx", {"image": pixels}) - expected).max() < 1e-4
    fp16 = _ort(bundle / "model.fp16.onnx", {"image": pixels})
    assert fp16.dtype == np.float32 and np.abs(fp16 - expected).max() < 2e-2
    assert (fp16.argmax(1) == expected.argmax(1)).all()


def test_fp16_graph_pools_se_means_in_fp16(bundle):
    """Every SE gate's spatial mean is a GlobalAveragePool in fp16: no Cast pair around it."""
    from cxr.export.fp16 import spatial_means_to_pooling

    fp32 = onnx.load(str(bundle / "model.onnx"))
    means = sum(n.op_type == "ReduceMean" for n in fp32.graph.node)
    fp16 = onnx.load(str(bundle / "model.fp16.onnx"))
    ops = [n.op_type for n in fp16.graph.node]
    assert means > 0 and "ReduceMean" not in ops and ops.count("GlobalAveragePool") >= means
    producer = {out: n.op_type for n in fp16.graph.node for out in n.output}
    feeds = {name: n.op_type for n in fp16.graph.node for name in n.input}
    pools = [
        n for n in fp16.graph.node if n.op_type == "GlobalAveragePool" and feeds.get(n.output[0]) == "Conv"
    ]
    assert len(pools) >= means  # the SE gates' means and the head's (the gate's feature pools feed no Conv)
    assert all(producer[n.input[0]] != "Cast" for n in pools)  # pooled in fp16, not cast to fp32 first
    assert spatial_means_to_pooling(fp16) == 0  # nothing left to rewrite
    over_channels = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1)],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    assert spatial_means_to_pooling(over_channels) == 0  # a mean over channels is not a pooling


def test_int8_graph_is_qdq_and_agrees(bundle, phantoms):
    from cxr.runtime.preprocess import load_and_preprocess

    graph = onnx.load(str(bundle / "model.int8.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    paths = sorted(phantoms.rglob("*.png"))[::2]
    pixels = np.stack([load_and_preprocess(p, 64) for p in paths])[:, None]
    reference = _ort(bundle / "model.onnx", {"image": pixels})
    quantized = _ort(bundle / "model.int8.onnx", {"image": pixels})
    assert np.mean(reference.argmax(1) == quantized.argmax(1)) >= 0.98


def _lime_feeds(bundle, phantoms, rows: int = 6):
    """One phantom's image, fill, segments and seeded on/off rows (row 0 all on), and the images they make."""
    from cxr.runtime.preprocess import load_and_preprocess
    from cxr.runtime.segment import segment, segment_means

    image = load_and_preprocess(sorted(phantoms.rglob("*.png"))[1], 64)
    segments = segment(image, "slic", 12, 0)
    fill = segment_means(image, segments)
    z = np.random.default_rng(5).integers(0, 2, (rows, int(segments.max()) + 1), dtype=np.uint8)
    z[0] = 1
    composed = np.where(z[:, segments].astype(bool), image, fill)[:, None]  # what LIME means by each row
    feeds = {"image": image[None, None], "fill": fill[None, None], "segments": segments, "z": z}
    return feeds, composed


def test_int8_explainer_is_the_int8_classifier_behind_the_composer(bundle, phantoms):
    """explain.int8.onnx gives, per on/off row, model.int8.onnx's answer on the image that row composes: row 0
    is the int8 classifier's answer, and no second int8 calibration exists to disagree with it."""
    feeds, composed = _lime_feeds(bundle, phantoms)
    explained = _ort(bundle / "explain.int8.onnx", feeds)
    assert np.abs(explained - _ort(bundle / "model.int8.onnx", {"image": composed})).max() < 1e-5
    notes = read_card(bundle).provenance["int8"]
    assert notes["explain"]["calibration"] == notes["model"]["calibration"]
    assert "model.int8.onnx" in notes["explain"]["graph"]
    assert read_metadata(bundle / "explain.int8.onnx") == read_metadata(bundle / "model.int8.onnx")


def test_composer_matches_the_exported_explainer(bundle, phantoms, tmp_path):
    """The ONNX composer is graphs.Explainer: behind the fp32 classifier it gives explain.onnx's rows."""
    from cxr.export.compose import explainer_from_classifier

    feeds, _ = _lime_feeds(bundle, phantoms)
    explainer_from_classifier(bundle / "model.onnx", tmp_path / "explain.onnx", 64)
    onnx.checker.check_model(str(tmp_path / "explain.onnx"), full_check=True)
    ours, exported = _ort(tmp_path / "explain.onnx", feeds), _ort(bundle / "explain.onnx", feeds)
    assert ours.shape == (6, 4) and np.abs(ours - exported).max() < 1e-5


def test_composer_refuses_a_classifier_that_does_not_cast_its_input(tmp_path):
    from cxr.export.compose import explainer_from_classifier

    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["probs"])],
        "g",
        [helper.make_tensor_value_info("image", onnx.TensorProto.UINT8, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("probs", onnx.TensorProto.UINT8, [1, 1, 8, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    with pytest.raises(CxrError, match="must feed only Cast nodes"):
        explainer_from_classifier(tmp_path / "m.onnx", tmp_path / "e.onnx", 8)
    assert not (tmp_path / "e.onnx").exists()


def test_metadata_round_trip_and_card_hashes(bundle):
    card = read_card(bundle)
    metadata = read_metadata(bundle / "model.onnx")
    assert json.loads(metadata["cxr.classes"]) == list(card.classes)
    assert json.loads(metadata["cxr.input"])["size"] == card.input.size
    assert json.loads(metadata["cxr.preprocessing"])["mean"] == list(card.preprocessing.mean)
    for name in ("model.onnx", "explain.onnx", "model.fp16.onnx", "model.int8.onnx"):
        assert card.files[name] == sha256_file(bundle / name)
    verify_bundle(bundle, card)


def test_tampered_file_is_refused(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(CxrError, match="sha256 does not match"):
        verify_bundle(copy, read_card(copy))
    result = cli("cxr-run", "predict", "--model", str(copy), str(copy / "card.json"), check=1)
    assert "sha256 does not match" in one_line_error(result)
    with pytest.raises(CxrError, match="sha256 does not match"):
        record_files(copy, read_card(copy), ["model.fp16.onnx"])


@pytest.mark.slow
def test_parity_passes_then_fails_on_a_perturbed_bundle(bundle, phantoms, tmp_path):
    report, passing = tmp_path / "parity.json", tmp_path / "passing"
    shutil.copytree(
        bundle, passing
    )  # parity writes its results into the card: keep the shared bundle as built
    ok = cli(
        "cxr-export",
        "parity",
        str(passing),
        str(phantoms),
        "--backends",
        "onnx,fp16",
        "--report",
        str(report),
    )
    data = json.loads(report.read_text())
    assert data["passed"] and data["backends"]["onnx"]["top1_agreement"] == 1.0
    assert "PASS" in ok.stdout
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    graph = onnx.load(str(broken / "model.onnx"))
    for init in graph.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 4:
            array = onnx.numpy_helper.to_array(init) * 1.5
            init.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), init.name))
    onnx.save(graph, str(broken / "model.onnx"))
    card = read_card(broken)  # its known answers go too: they would refuse the changed graph before parity
    record_files(  # could judge it (tests/test_known_answers.py checks that refusal)
        broken,
        card.replace(
            files={k: v for k, v in card.files.items() if k != "model.onnx"},
            known_answers={k: v for k, v in card.known_answers.items() if k != "model.onnx"},
        ),
        ["model.onnx"],
    )
    failed = cli(
        "cxr-export",
        "parity",
        str(broken),
        str(phantoms),
        "--backends",
        "onnx",
        "--report",
        str(tmp_path / "p2.json"),
        check=1,
    )
    assert "FAIL" in failed.stdout
    assert json.loads((tmp_path / "p2.json").read_text())["passed"] is False


def test_checkpoint_that_is_not_a_state_dict_is_refused(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    torch.save({"model": torch.nn.Linear(2, 2)}, run / "model.pt")  # a pickled module, not tensors
    result = cli("cxr-export", "onnx", str(run), "--out", str(tmp_path / "b"), check=1)
    assert "not a plain state dict" in one_line_error(result) or "not a state dict" in one_line_error(result)


def test_missing_run_and_empty_calibration_folder(bundle, tmp_path):
    assert "no card.json" in one_line_error(
        cli("cxr-export", "onnx", str(tmp_path), "--out", str(tmp_path / "b"), check=1)
    )
    empty = tmp_path / "calib"
    empty.mkdir()
    copy = tmp_path / "b2"
    shutil.copytree(bundle, copy)
    assert "no readable calibration images" in one_line_error(
        cli("cxr-export", "int8", str(copy), "--calib", str(empty), check=1)
    )


def test_int8_check_data_chooses_on_other_images_and_says_so(bundle, phantoms, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted((phantoms / "normal").iterdir())[:3]:
        shutil.copy(path, few / path.name)
    args = ("cxr-export", "int8", str(copy), "--calib", str(phantoms), "--samples", "8", "--check", "16")
    error = one_line_error(cli(*args, "--check-data", str(few), check=1))
    assert f"{few}: 3 readable images; int8 needs at least 8 held-out images" in error
    result = cli(*args, "--check-data", str(phantoms / "covid19"), "--calibration", "minmax")
    notes = read_card(copy).provenance["int8"]["model"]
    assert notes["held_out_from"] == "check-data" and notes["held_out_images"] == 16
    assert notes["calibration_images"] == 8
    assert "held-out agreement" in result.stdout


def test_nncf_graph_is_signed_qdq_keeps_excluded_nodes_float_and_agrees(bundle, phantoms, tmp_path):
    from cxr.export.int8 import classifier_feeds, draw_images, quantize_int8
    from cxr.export.int8_tune import predict

    images = draw_images(phantoms, 64, 40, seed=3)
    source = onnx.load(str(bundle / "model.onnx")).graph
    kept = next(node.name for node in source.node if node.op_type == "Conv")
    out = tmp_path / "nncf.onnx"
    notes = quantize_int8(bundle / "model.onnx", out, classifier_feeds(images[:24]), "nncf", [kept])
    assert notes["calibration"] == "nncf" and notes["kept_in_float"] == [kept]
    graph = onnx.load(str(out)).graph
    points = {i.name: i for i in graph.initializer}
    pairs = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(pairs) > 20
    for node in pairs:  # TensorRT's explicit quantisation takes signed int8 with zero point 0 only
        zero = onnx.numpy_helper.to_array(points[node.input[2]])
        assert zero.dtype == np.int8 and not zero.any(), node.name
    conv = next(n for n in graph.node if n.name == kept)
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert all(producers.get(name) != "DequantizeLinear" for name in conv.input)
    feeds = classifier_feeds(images[24:])
    agree = predict(out, feeds).argmax(1) == predict(bundle / "model.onnx", feeds).argmax(1)
    assert agree.mean() >= 0.9


def test_sensitivity_is_ranked_on_an_ort_graph_when_nncf_wins(tmp_path):
    from cxr.export.int8_tune import Trial, ranking_graph

    trials = [
        Trial(method="minmax", reduce_range=False, excluded=[], agreement=0.90, max_abs_dprob=0.2),
        Trial(method="percentile", reduce_range=True, excluded=[], agreement=0.95, max_abs_dprob=0.1),
        Trial(method="nncf", reduce_range=False, excluded=[], agreement=0.97, max_abs_dprob=0.1),
    ]
    paths = {(t.method, t.reduce_range): tmp_path / f"{t.method}{t.reduce_range}.onnx" for t in trials}
    assert ranking_graph(trials, paths, trials[1]) == paths["percentile", True]
    assert ranking_graph(trials, paths, trials[2]) == paths["percentile", True]
    assert ranking_graph(trials[2:], paths, trials[2]) is None


def test_kept_in_float_line_stays_short():
    from cxr.export.cli import kept_summary

    assert kept_summary([]) == "none"
    assert kept_summary(["a", "b"]) == "a, b"
    many = [f"/net/n{i}" for i in range(79)]
    assert kept_summary(many) == "79 nodes, e.g. /net/n0, /net/n1 (all in card.json)"


def test_build_engine_without_tensorrt_names_the_extra(bundle):
    pytest.importorskip("cxr.runtime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    result = cli("cxr-export", "build-engine", str(bundle), check=1)
    assert "cxr-edge[trt]" in one_line_error(result)


def test_profile_validation_is_a_one_line_error(bundle):
    with pytest.raises(CxrError, match="min <= opt <= max"):
        Profile(1, 64, 32)
    result = cli("cxr-export", "build-engine", str(bundle), "--min-batch", "8", "--opt-batch", "4", check=1)
    assert "min <= opt <= max" in one_line_error(result)


def test_profile_shapes_for_classifier_and_explainer():
    shapes = profile_shapes("model", 224, Profile(1, 32, 64))
    assert shapes == {"image": ((1, 1, 224, 224), (32, 1, 224, 224), (64, 1, 224, 224))}
    explain = profile_shapes("explain", 224, Profile(1, 64, 64), max_segments=200)
    assert explain["z"] == ((1, 1), (64, 64), (64, 200))
    assert explain["segments"] == ((224, 224),) * 3 and explain["fill"][2] == (1, 1, 224, 224)


def test_network_flags_by_tensorrt_version():
    assert network_flags("11.4.0", None) == 0  # strong typing always on, no flag in TRT 11
    assert network_flags("10.13.2", 1) == 2  # 1 << STRONGLY_TYPED
    with pytest.raises(CxrError, match="too old"):
        network_flags("8.6.1", 1)


def test_sidecar_contents_and_mismatch_messages(tmp_path):
    onnx_file = tmp_path / "model.fp16.onnx"
    onnx_file.write_bytes(b"graph")
    plan = tmp_path / "model.fp16.engine"
    plan.write_bytes(b"plan bytes")
    facts = sidecar_facts(
        "model",
        "fp16",
        onnx_file,
        profile_shapes("model", 64, Profile()),
        "10.13.2",
        {"gpu_name": "Orin", "compute_capability": "8.7"},
        12.0,
    )
    write_sidecar(plan, facts)
    stored = read_sidecar(plan)
    assert stored["source_onnx_sha256"] == sha256_file(onnx_file) and stored["plan_sha256"] == sha256_file(
        plan
    )
    assert stored["profile"]["image"]["max"] == [64, 1, 64, 64] and stored["precision"] == "fp16"
    check_sidecar(plan, stored, "10.13.2", "8.7")
    with pytest.raises(CxrError, match="TensorRT 10.13.2.*rebuild"):
        check_sidecar(plan, stored, "11.4.0", "8.7")
    with pytest.raises(CxrError, match="compute capability 8.7.*rebuild"):
        check_sidecar(plan, stored, "10.13.2", "9.0")
    plan.write_bytes(b"other")
    with pytest.raises(CxrError, match="tampered"):
        check_sidecar(plan, stored, "10.13.2", "8.7")


def test_int8_choice_is_measured_and_recorded(bundle):
    notes = read_card(bundle).provenance["int8"]["model"]
    trials = notes["trials"]
    assert [(t["method"], t["reduce_range"]) for t in trials[:6]] == [
        ("minmax", False),
        ("minmax", True),
        ("percentile", False),
        ("percentile", True),
        ("nncf", False),
        ("nncf", True),
    ]
    best = max(t["agreement"] for t in trials)
    assert notes["held_out_agreement"] == round(best, 4) and notes["calibration"] in (
        "minmax",
        "percentile",
        "nncf",
    )
    speed = read_card(bundle).provenance["int8"]["speed_cpu"]
    assert speed["onnxruntime"]["int8_b1_p50_ms"] > 0 and speed["onnxruntime"]["fp32_b1_p50_ms"] > 0
    assert ("openvino" in speed) == (AUTO_CPU_BACKEND == "openvino")


def test_sensitivity_sweep_keeps_the_worst_nodes_in_float(bundle, phantoms, tmp_path):
    from cxr.export.int8 import classifier_feeds, draw_images, quantize_int8
    from cxr.export.int8_tune import EXCLUDE_STEPS, nodes_touching, tune

    images = draw_images(phantoms, 64, 48, seed=5)
    result = tune(
        bundle / "model.onnx",
        tmp_path / "swept.onnx",
        classifier_feeds(images[:16]),
        classifier_feeds(images[16:]),
        ("minmax",),
        1.01,
        log=lambda line: None,
    )
    scores = [sqnr for _, sqnr in result.sensitivity]
    assert scores == sorted(scores) and len(scores) > 32
    assert len(result.trials) == 2 + len(EXCLUDE_STEPS)  # an unreachable target walks every step
    counts = [len(t.excluded) for t in result.trials[2:]]
    assert counts == sorted(counts) and counts[0] >= 1
    worst = next(name for name, _ in result.sensitivity if not name.endswith("weight"))
    kept = tmp_path / "kept.onnx"
    quantize_int8(
        bundle / "model.onnx",
        kept,
        classifier_feeds(images[:16]),
        "minmax",
        nodes_touching(bundle / "model.onnx", [worst]),
    )
    graph = onnx.load(str(kept)).graph
    assert any(worst in node.input for node in graph.node)  # consumed as float, not through Q/DQ
    assert not any(node.input[0] == worst for node in graph.node if node.op_type == "QuantizeLinear")
    assert (tmp_path / "swept.onnx").is_file()


def test_int8_speed_verdict_is_one_line_naming_where_int8_pays():
    from cxr.export.int8 import speed_verdict

    slow = {"fp32_b1_p50_ms": 10.0, "int8_b1_p50_ms": 24.4, "ratio": 2.44}
    speed = {
        "cpu_int8": "no VNNI/AMX int8 instructions",
        "onnxruntime": slow,
        "openvino": {**slow, "ratio": 0.9},
    }
    line = speed_verdict(speed)
    assert (
        "\n" not in line
        and line.startswith("int8 does not pay")
        and "onnxruntime 24.4 vs 10.0 ms (2.44x)" in line
    )
    assert "VNNI" in line
    speed["openvino"] = {"fp32_b1_p50_ms": 130.8, "int8_b1_p50_ms": 88.0, "ratio": 0.67}
    assert speed_verdict(speed).startswith("int8 pays on this CPU with openvino: ")
