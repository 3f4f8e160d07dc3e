"""The research scripts (``research/``): each still answers its question on the test bundle, so the results
README cites can be reproduced with the code of today."""

import json
from unittest.mock import patch

import numpy as np
import pytest
from cxr.runtime.backends.onnxruntime import OrtExplainer
from cxr.runtime.bundle import Bundle
from cxr.runtime.errors import CxrError, CxrUsageError
from cxr.runtime.explain import ExplainConfig, explain_image
from cxr.runtime.settle import SPREAD_BOUND, STABLE_FITS


@pytest.mark.slow
def test_fp16_variants_measures_both_exports(bundle, phantoms, tmp_path):
    import onnx
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.preprocess import load_and_preprocess

    from research.gpu.fp16_variants import compare, earlier_graphs

    opened = Bundle.open(bundle)
    earlier = earlier_graphs(opened, tmp_path)
    means = [
        sum(n.op_type == "ReduceMean" for n in onnx.load(str(path)).graph.node)
        for path in (earlier["model"], bundle / "model.onnx")
    ]
    assert means[0] == means[1] > 0  # the SE means kept as ReduceMean, as exports used to
    image = load_and_preprocess(sorted((phantoms / "normal").glob("*.png"))[0], opened.card.input.size)
    results = compare(opened, tmp_path, [image, image])
    assert set(results) == {"pooled_fp16", "reducemean_fp32"}
    for result in results.values():
        assert result["classifier_b64_img_s"] > 0 and result["explainer"]["steady_s_per_image"] > 0
        # one image alone takes less than a batch of 64 (the two figures come from one measurement each)
        assert result["classifier_b1_p50_ms"] < 1000 * 64 / result["classifier_b64_img_s"]
        assert result["explainer"]["device"] == "cpu" and result["explainer"]["warm_up_s"] > 0


def test_cold_start_times_the_first_map_in_a_fresh_process(bundle, phantoms):
    from research.gpu.cold_start import cold_start

    image = sorted((phantoms / "normal").glob("*.png"))[0]
    result = cold_start(bundle, image, "fp32:16,fp8:16,fp16:32:heuristic", rounds=1, samples=64)
    run = result["variants"]["fp32:16"]["runs"][0]
    assert run["device"] == "cpu" and run["first_image_s"] > run["open_s"] > 0 and run["steady_s"] > 0
    assert result["variants"]["fp32:16"]["median_first_image_s"] == run["first_image_s"]
    assert (
        run["search"] == "exhaustive"
        and result["variants"]["fp16:32:heuristic"]["runs"][0]["search"] == "heuristic"
    )
    heuristic = result["variants"]["fp16:32:heuristic"]
    assert heuristic["median_steady_s"] > 0
    assert heuristic["median_steady_s"] == heuristic["runs"][0]["steady_s"]  # one round: its own time
    assert (heuristic["runs"][0]["precision"], heuristic["runs"][0]["batch"]) == ("fp16", 32)
    for bad in ("fp16", "fp16:big", "fp16:32:fast"):  # a usage error, not an exit from library code
        with pytest.raises(CxrUsageError, match="precision:batch"):
            cold_start(bundle, image, bad)
    assert "fp8" in result["variants"]["fp8:16"]["runs"][0]["error"]
    assert result["variants"]["fp8:16"]["median_first_image_s"] is None


def test_settle_sweep_replays_exactly_what_auto_computes(bundle, phantoms, tmp_path):
    from cxr.bench.lime_bench import load_images

    from research.lime.settle_sweep import Rule, Tape, plot_sweep, run_sweep

    images = sorted((phantoms / "covid19").glob("*.png"))[:2]
    shipped, strict, agreeing = (
        Rule(SPREAD_BOUND, STABLE_FITS),
        Rule(0.05, 5),
        Rule(SPREAD_BOUND, STABLE_FITS, 0.95),
    )
    rules = [shipped, strict, agreeing]
    tapes, out = tmp_path / "tapes", tmp_path / "sweep.json"
    result = run_sweep(
        bundle, images, "fp32", budget=400, backend="onnxruntime", rules=rules, tapes=tapes, out=out
    )
    assert json.loads(out.read_text())["rules"] == result["rules"]  # written as it goes
    plot_sweep(result, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert len(list(tapes.glob("*.npz"))) == 2
    opened = Bundle.open(bundle)
    loaded = load_images(opened, images, 0)  # as the sweep loads them (the card's preprocessing)
    with OrtExplainer(opened.onnx_path("explain", "fp32"), "fp32") as explainer:
        for image, row in zip(loaded, result["per_image"]):
            plain_auto = ExplainConfig(samples=400, seed=0, adaptive=True, paired=False)  # the taped rows
            direct = explain_image(image, explainer, plain_auto)
            replayed = row["rules"][shipped.key]
            assert replayed["samples"] == direct.samples  # the replayed stop is where the real one stops
            assert row["rules"][strict.key]["samples"] >= replayed["samples"]
            assert row["rules"][agreeing.key]["samples"] >= replayed["samples"]  # one more condition
            assert row["full_budget_vs_reference"]["top5_overlap"] == 1.0  # fp32 vs itself
        table = {(r["spread_bound"], r["stable_fits"], r["min_agreement"]): r for r in result["rules"]}
        assert table[(SPREAD_BOUND, STABLE_FITS, 0.0)]["shipped"] and not table[(0.05, 5, 0.0)]["shipped"]
        assert (
            table[(0.05, 5, 0.0)]["mean_samples"] >= table[(SPREAD_BOUND, STABLE_FITS, 0.0)]["mean_samples"]
        )

        # a rerun replays the saved tapes: no model runs, same table
        with patch("research.lime.settle_sweep.explain_image", wraps=explain_image) as calls:
            again = run_sweep(
                bundle, images, "fp32", budget=400, backend="onnxruntime", rules=rules, tapes=tapes
            )
        assert again["rules"] == result["rules"]
        assert all(isinstance(call.args[1], Tape) for call in calls.call_args_list)

        image = loaded[0]
        tape = Tape(explainer)
        explain_image(image, tape, ExplainConfig(samples=64, seed=0))
        with pytest.raises(RuntimeError, match="rows the tape does not hold"):
            explain_image(image, tape.replay(), ExplainConfig(samples=64, seed=1))
    with pytest.raises(CxrError, match="at least 2 equal fits"):
        ExplainConfig(adaptive=True, spread_bound=0.1, stable_fits=1)


def test_sampler_compare_scores_both_samplers_on_rows_the_reference_never_saw(bundle, phantoms, tmp_path):
    from cxr.bench.lime_bench import load_images
    from cxr.bench.lime_fidelity import compare_weights

    from research.lime.sampler_compare import format_compare, run_compare
    from research.lime.settle_sweep import Rule, open_tape, run_sweep, tape_reference

    images = sorted((phantoms / "pneumonia_bacterial").glob("*.png"))[:1]
    tapes, out = tmp_path / "tapes", tmp_path / "compare.json"
    shipped = Rule(SPREAD_BOUND, STABLE_FITS)
    run_sweep(bundle, images, "fp32", budget=300, backend="onnxruntime", rules=[shipped], tapes=tapes)
    result = run_compare(bundle, images, tapes, rows=200, seed=1, backend="onnxruntime", out=out)
    assert json.loads(out.read_text())["summary"] == result["summary"]
    assert out.with_suffix(".png").stat().st_size > 1000
    row = result["per_image"][0]
    for sampler in ("plain", "paired"):
        assert list(row[sampler]["curve"]) == ["100", "150", "200"]
        assert all(0 <= v["top5_overlap"] <= 1 for v in row[sampler]["curve"].values())
    opened = Bundle.open(bundle)
    image = load_images(opened, images, 0)[0]
    reference = tape_reference(open_tape(tapes, images[0])[0])
    with OrtExplainer(opened.onnx_path("explain", "fp32"), "fp32") as explainer:
        direct = explain_image(
            image, explainer, ExplainConfig(samples=200, seed=1, adaptive=True), label=row["label"]
        )
        plain = explain_image(image, explainer, ExplainConfig(samples=200, seed=1), label=row["label"])
    # the curve's last point is the fixed-budget map on the same rows, scored against the sweep's reference
    assert row["plain"]["curve"]["200"] == compare_weights(reference, plain.weights)
    assert (
        row["paired"]["rules"][shipped.key]["samples"] == direct.samples
    )  # auto's default, replayed exactly
    assert "paired overlap/Spearman by rows" in format_compare(result)
    with pytest.raises(CxrError, match="at seed 0"):  # the reference's own rows would flatter every stop
        run_compare(bundle, images, tapes, rows=200, seed=0, backend="onnxruntime")


def test_lime_noise_measures_the_int8_error_and_its_correction(bundle, phantoms, tmp_path):
    from research.lime.lime_noise import run_noise
    from research.lime.settle_sweep import Rule, run_sweep

    images = sorted((phantoms / "pneumonia_viral").glob("*.png"))[:1]
    for precision in ("int8", "fp32"):
        tapes = tmp_path / precision
        run_sweep(
            bundle, images, precision, budget=200, backend="onnxruntime", rules=[Rule(0.15, 3)], tapes=tapes
        )
        result = run_noise(bundle, images, tapes, 64, precision, backend="onnxruntime")
        row = result["per_image"][str(images[0])]
        assert row["signal"] > 0 and 0 <= row["ceiling"] <= 1
        assert set(row["overlap"]) == {"n200", "n200+fp32 m32", "n200+fp32 m64"}
        if precision == "fp32":  # the same graph: no error, a perfect ceiling, nothing to correct
            assert row["error"] < 1e-6 and row["ceiling"] == 1.0
            assert row["overlap"]["n200+fp32 m64"] == row["overlap"]["n200"] == 1.0
        else:
            assert row["error"] > 1e-6  # int8 answers differ from fp32 on the same rows
    with pytest.raises(CxrError, match="taped for another bundle or precision"):
        run_noise(bundle, images, tmp_path / "fp32", 32, "int8", backend="onnxruntime")
    with pytest.raises(CxrError, match="no tape in"):  # an image the sweep never taped
        run_noise(bundle, images, tmp_path / "none", 32, "fp32", backend="onnxruntime")


def test_predict_explain_times_the_run_from_its_own_values(bundle, phantoms, tmp_path):
    """gpu_check's predict step is the library call the CLI makes; its figures are the run's own values."""
    from research.gpu.gpu_summary import summarise
    from research.gpu.predict_explain import predict_explain

    images = [str(p) for p in sorted((phantoms / "covid19").glob("*.png"))[:3]]
    result = predict_explain(bundle, images, tmp_path, precision="fp32", samples=100, seed=3)
    opening, timing = result["opening"], result["timing"]
    assert result["exit_code"] == 0 and timing["images"] == timing["explained"] == 3 and timing["errors"] == 0
    assert 0 < opening["classifier_open_s"] < opening["first_result_s"] and opening["explainer_open_s"] > 0
    lines = (tmp_path / "predict_explain_fp32.jsonl").read_text().splitlines()
    timings = [json.loads(line)["explanation"]["timing"] for line in lines]
    seconds = [t["total_s"] + t["overlay_s"] for t in timings]
    assert timing["first_s"] == seconds[0]
    assert timing["steady_s_per_image"] == pytest.approx(np.mean(seconds[1:]))
    (tmp_path / "predict_explain.json").write_text(json.dumps(result))
    summary = summarise(tmp_path)
    assert summary["predict_explain_fp16"] == timing and summary["predict_explain_fp16_opening"] == opening


def test_gate_precision_finds_what_int8_moves_and_the_gate_the_runtime_reads(bundle, phantoms):
    from research.ood.gate_precision import measure

    result = measure(bundle, phantoms, 40)
    rows = {(r["backend"], r["precision"]): r for r in result["rows"] if "drift_p95" in r}
    assert result["films"] == 40 and ("onnxruntime", "fp32") in rows and ("onnxruntime", "int8") in rows
    assert max(rows["onnxruntime", "fp32"]["drift_p95"].values()) == 0
    int8 = rows["onnxruntime", "int8"]
    assert int8["gate_read"] != rows["onnxruntime", "fp32"]["gate_read"]  # int8 moved a part: left out
    assert int8["flagged_gate_read"] <= 0.2 < int8["flagged_whole_gate"]
