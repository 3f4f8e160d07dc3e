import json
import re
import time

import numpy as np
import pytest
from cxr.runtime.backends.onnxruntime import OrtBackend, OrtExplainer
from cxr.runtime.bundle import Bundle
from cxr.runtime.errors import CxrError
from cxr.runtime.explain import ExplainConfig, explain_image
from cxr.runtime.preprocess import load_and_preprocess
from cxr.runtime.segment import segment, segment_means

from tests.conftest import cli, one_line_error


@pytest.fixture(scope="module")
def sessions(bundle):
    opened = Bundle.open(bundle)
    with (
        OrtBackend(opened.onnx_path("model", "fp32"), "fp32") as classifier,
        OrtExplainer(opened.onnx_path("explain", "fp32"), "fp32") as explainer,
    ):
        yield classifier, explainer


def _image(phantoms, label="pneumonia_bacterial", index=0):
    return load_and_preprocess(sorted((phantoms / label).glob("*.png"))[index], 64)


def test_explainer_graph_composes_the_same_images_as_the_host(sessions, phantoms):
    classifier, explainer = sessions
    image = _image(phantoms)
    segments = segment(image)
    fill = segment_means(image, segments)
    rows = np.random.default_rng(0).integers(0, 2, (6, segments.max() + 1), dtype=np.uint8)
    explainer.set_image(image, fill, segments)
    composed = np.where(rows[:, segments] == 1, image, fill)[:, None]
    assert np.abs(explainer.run(rows) - classifier.run(composed)).max() < 1e-5


def test_weights_match_stock_lime_on_the_same_rows(sessions, phantoms):
    from lime.lime_image import LimeImageExplainer

    classifier, explainer = sessions
    image = _image(phantoms)
    segments = segment(image)
    samples, seed = 300, 4
    stock = LimeImageExplainer(random_state=seed)
    ref = stock.explain_instance(
        image.astype(np.float64),
        lambda ims: classifier.run(np.round(ims[:, :, :, 0]).astype(np.uint8)[:, None]),
        top_labels=1,
        hide_color=None,
        num_samples=samples,
        segmentation_fn=lambda _: segments,
        random_seed=seed,
    )
    rows = (
        np.random.RandomState(seed)
        .randint(0, 2, samples * (segments.max() + 1))
        .reshape(samples, -1)
        .astype(np.uint8)
    )
    rows[0] = 1  # exactly the rows lime drew
    ours = explain_image(
        image, explainer, ExplainConfig(samples=samples, seed=seed), rows=rows, segments=segments
    )
    label = ref.top_labels[0]
    assert ours.label == label
    expected = dict(ref.local_exp[label])
    assert set(expected) == set(ours.weights)
    assert max(abs(expected[k] - ours.weights[k]) for k in expected) < 1e-4


def test_same_seed_identical_different_seed_different(sessions, phantoms):
    _, explainer = sessions
    image = _image(phantoms, "covid19")
    a = explain_image(image, explainer, ExplainConfig(samples=200, seed=1))
    b = explain_image(image, explainer, ExplainConfig(samples=200, seed=1))
    c = explain_image(image, explainer, ExplainConfig(samples=200, seed=2))
    assert a.weights == b.weights
    assert a.weights != c.weights


def test_the_map_explains_the_label_it_is_given_and_says_when_the_explainer_ranks_otherwise(
    sessions, phantoms
):
    """predict passes the classifier's answer: an explainer graph that ranks a near tie the other way (another
    precision or calibration) must not paint a different class than the record names."""
    from cxr.runtime.explain import explanation_record, lime_fit, sample_rows

    _, explainer = sessions
    image = _image(phantoms, "covid19")
    config = ExplainConfig(samples=200, seed=1)
    own = explain_image(image, explainer, config)
    other = (own.label + 1) % 4
    told = explain_image(image, explainer, config, label=other)
    assert own.explainer_top == told.explainer_top == own.label and told.label == other
    rows = sample_rows(np.random.default_rng(1), 200, int(told.segments.max()) + 1)
    explainer.set_image(image, segment_means(image, told.segments), told.segments)
    step = explainer.limits.max_batch
    probs = np.concatenate([explainer.run(rows[i : i + step]) for i in range(0, 200, step)])
    assert told.weights == lime_fit(rows, probs, other, 1)[0]  # the fit of the class it was told
    classes = ("covid19", "normal", "pneumonia_bacterial", "pneumonia_viral")
    record = explanation_record(told, classes, config, None)
    assert record["label"] == classes[other] and classes[own.label] in record["note"]
    assert "note" not in explanation_record(own, classes, config, None)


def test_pointing_game_on_planted_lesions(sessions, phantoms, bundle):
    """The top-3 positive segments overlap the planted lesion for >= 80 % of lesion images the model gets
    right."""
    from cxr.runtime.card import read_card
    from cxr.runtime.preprocess import preprocess_with_mask, read_image
    from cxr.train.synth import read_lesion_masks

    _, explainer = sessions
    masks = read_lesion_masks(phantoms)
    pre = read_card(bundle).preprocessing
    hits = total = 0
    for label in ("covid19", "pneumonia_bacterial", "pneumonia_viral"):
        for path in sorted((phantoms / label).glob("*.png"))[:8]:
            image, mask = preprocess_with_mask(read_image(path), masks[f"{label}/{path.name}"], 64, pre)
            explanation = explain_image(image, explainer, ExplainConfig(samples=1000, seed=0))
            if explanation.label != ["covid19", "normal", "pneumonia_bacterial", "pneumonia_viral"].index(
                label
            ):
                continue
            top = sorted(explanation.weights, key=lambda k: -explanation.weights[k])[
                :3
            ]  # 3 most supportive segments
            total += 1
            hits += any((explanation.segments == k)[mask].any() for k in top if explanation.weights[k] > 0)
    assert total >= 18
    assert hits / total >= 0.8, (hits, total)


def test_predict_explain_writes_overlay_and_record(bundle, phantoms, tmp_path):
    image, second = sorted((phantoms / "covid19").glob("*.png"))[:2]
    result = cli(
        "cxr-run",
        "predict",
        "--model",
        str(bundle),
        str(image),
        str(second),
        "--explain",
        "--samples",
        "200",
        "--explain-dir",
        str(tmp_path / "ov"),
        "--seed",
        "3",
    )
    record = json.loads(result.stdout.splitlines()[0])
    assert len(result.stdout.splitlines()) == 2
    opening = re.search(  # the closing line says when the first result came and what opening cost
        r"first result ([\d.]+) s after start \(classifier open ([\d.]+) s, explainer ([\d.]+) s",
        result.stderr,
    )
    first, classifier, explainer = map(float, opening.groups())
    assert 0 <= classifier <= first and explainer > 0
    explanation = record["explanation"]
    assert (
        explanation["seed"] == 3 and explanation["samples"] == 200 and explanation["label"] == record["label"]
    )
    assert {"segmentation_s", "model_s", "fit_s"} <= set(explanation["timing"])
    assert len(explanation["weights"]) >= 10
    import cv2

    picture = cv2.imread(explanation["overlay"])
    assert picture is not None and picture.shape[0] >= 400
    red = (picture[:, :, 2].astype(int) - picture[:, :, 0]) > 60
    assert red.any()


def test_opening_explainer_waits_and_passes_failures_on():
    from cxr.runtime.predict import OpeningExplainer

    class Closable:
        closed = False

        def close(self):
            self.closed = True

    def slow_open():
        time.sleep(0.05)
        return Closable()

    opening = OpeningExplainer(slow_open)
    ready = opening.get()
    opening.close()
    assert (
        ready.closed and opening.open_s is not None and 0.05 <= opening.open_s < 5
    )  # the open it waited for

    def broken():
        raise CxrError("explain.onnx: cannot load")

    failing = OpeningExplainer(broken)
    with pytest.raises(CxrError, match="cannot load"):
        failing.get()
    failing.close()  # nothing opened, nothing to close, no second error
    assert failing.open_s is None


def test_opening_explainer_is_replaced_when_it_does_not_match_the_classifier():
    from cxr.runtime.predict import OpeningExplainer

    class Opened:
        def __init__(self, name, precision="fp32"):
            self.name, self.precision, self.closed = name, precision, False

        def close(self):
            self.closed = True

    first = Opened("openvino")
    kept = OpeningExplainer(lambda: first)
    kept.match("openvino", "fp32", lambda: Opened("never"))
    assert kept.get() is first and not first.closed
    kept.close()

    def after(seconds, opened):
        def open_():
            time.sleep(seconds)
            return opened

        return open_

    other = Opened("onnxruntime")
    swapped = OpeningExplainer(after(0.03, other))
    swapped.match("openvino", "fp32", after(0.05, Opened("openvino")))
    got = swapped.get()
    assert other.closed and (got.name, got.precision) == ("openvino", "fp32")
    assert swapped.open_s >= 0.08  # the wrong explainer's open and the right one's: what the run waited
    swapped.close()
    assert got.closed

    def broken():
        raise CxrError("explain.engine: cannot load")

    retried = OpeningExplainer(broken)
    retried.match("onnxruntime", "fp16", lambda: Opened("onnxruntime", "fp16"))
    assert retried.get().precision == "fp16"
    retried.close()


def test_host_warms_up_beside_the_device_and_errors_pass_through(monkeypatch):
    import threading

    import cxr.runtime.explain as explain

    host_running, seen = threading.Event(), {}

    def host_warm_up():
        seen["thread"] = threading.current_thread().name
        host_running.set()

    monkeypatch.setattr(explain, "warm_host", host_warm_up)
    # the device open waits for the host warm-up: it can only finish if both run at once
    assert explain.warm_host_beside(lambda: host_running.wait(timeout=10)) is True
    assert seen["thread"].startswith("warm-host")

    def failing_open():
        raise CxrError("explain.onnx: cannot load")

    with pytest.raises(CxrError, match="cannot load"):
        explain.warm_host_beside(failing_open)


def test_a_short_job_opens_the_explainer_with_the_quick_search(bundle):
    from cxr.runtime.backends.onnxruntime import EXPLAINER_CUDA, QUICK_OPEN_IMAGES, explainer_cuda
    from cxr.runtime.backends.select import open_explainer
    from cxr.runtime.bundle import Bundle

    quick = explainer_cuda(1)
    assert quick.search == "HEURISTIC" and quick.cuda_graph and quick == explainer_cuda(QUICK_OPEN_IMAGES)
    for images in (QUICK_OPEN_IMAGES + 1, None):
        assert explainer_cuda(images) == EXPLAINER_CUDA and EXPLAINER_CUDA.search == "EXHAUSTIVE"
    opened = Bundle.open(bundle)
    with open_explainer(opened, "onnxruntime", "fp16", images=3)[0] as short:
        assert short.cuda.search == "HEURISTIC"
    with open_explainer(opened, "onnxruntime", "fp16")[0] as long_lived:
        assert long_lived.cuda.search == "EXHAUSTIVE"


def test_quickshift_segmenter_and_bad_segmenter(bundle, phantoms):
    image = _image(phantoms)
    assert segment(image, "quickshift").max() >= 1
    from tests.conftest import one_line_error

    result = cli(
        "cxr-run",
        "predict",
        "--model",
        str(bundle),
        "x.png",
        "--explain",
        "--segmenter",
        "watershed",
        check=2,
    )
    assert "--segmenter" in one_line_error(result)


def test_adaptive_lime_stops_when_settled_and_is_reproducible(sessions, phantoms):
    _, explainer = sessions
    image = _image(phantoms)
    config = ExplainConfig(samples=1000, seed=3, adaptive=True)
    first = explain_image(image, explainer, config)
    again = explain_image(image, explainer, config)
    assert first.weights == again.weights and first.samples == again.samples  # same seed, same map
    assert config.min_samples <= first.samples <= 1000
    assert first.stopped.startswith("settled at") or first.stopped.startswith("cap of 1000")
    assert config.paired  # auto draws paired rows unless told otherwise
    fixed = explain_image(image, explainer, ExplainConfig(samples=first.samples, seed=3, paired=True))
    assert fixed.weights == first.weights  # auto's rows are a prefix of the same seeded draw
    plain = explain_image(image, explainer, ExplainConfig(samples=1000, seed=3, adaptive=True, paired=False))
    fixed_plain = explain_image(image, explainer, ExplainConfig(samples=plain.samples, seed=3))
    assert fixed_plain.weights == plain.weights and not ExplainConfig(samples=200).paired


def test_paired_rows_are_complements_and_estimate_the_same_map_on_fewer_samples():
    from cxr.runtime.explain import lime_fit, sample_rows
    from cxr.runtime.settle import resample

    rows = sample_rows(np.random.default_rng(0), 9, 12, paired=True)
    assert rows.shape == (9, 12) and rows[0].all() and not rows[1].any()
    assert (rows[2:8:2] + rows[3:9:2] == 1).all()  # each drawn row followed by its complement
    plain = sample_rows(np.random.default_rng(0), 9, 12)
    assert (plain[1:] == np.random.default_rng(0).integers(0, 2, (9, 12), dtype=np.uint8)[1:]).all()
    pick = resample(np.random.default_rng(1), 10, paired=True)
    assert len(pick) == 10 and (pick[0::2] % 2 == 0).all() and (pick[1::2] == pick[0::2] + 1).all()
    assert len(resample(np.random.default_rng(1), 11, paired=True)) in (11, 12)

    # a target with main effects and two-segment interactions: LIME's weights from 200 paired rows are
    # nearer the many-sample map than from 200 of lime's rows (same distribution of rows, less error)
    segments, rng = 30, np.random.default_rng(7)
    main = rng.normal(0, 0.05, segments)
    pairs = rng.choice(segments, (60, 2))
    strength = rng.normal(0, 0.05, 60)

    def model(on: np.ndarray) -> np.ndarray:
        y = on @ main + (on[:, pairs[:, 0]] * on[:, pairs[:, 1]]) @ strength
        return np.stack([y, -y], axis=1)

    many = sample_rows(np.random.default_rng(99), 20000, segments)
    truth = lime_fit(many, model(many), 0, 0)[0]

    def error(paired: bool, seed: int) -> float:
        rows = sample_rows(np.random.default_rng(seed), 200, segments, paired)
        weights = lime_fit(rows, model(rows), 0, 0)[0]
        return float(np.mean([abs(weights[k] - truth[k]) for k in truth]))

    plain_error = np.mean([error(False, seed) for seed in range(8)])
    paired_error = np.mean([error(True, seed) for seed in range(8)])
    assert paired_error < 0.7 * plain_error


def test_fidelity_benchmark_reports_overlap_and_savings(bundle, phantoms, tmp_path):
    images = sorted((phantoms / "covid19").glob("*.png"))[:2]
    result = cli(
        "cxr-bench",
        "lime",
        "--model",
        str(bundle),
        *map(str, images),
        "--fidelity",
        "--precision",
        "int8",
        "--samples",
        "400",
        "--repeatability",
        "1",
        "--out",
        str(tmp_path),
    )
    data = json.loads((tmp_path / "lime_fidelity.json").read_text())
    repeat = data["reference_repeat"]  # the first image's 400-sample map drawn again at seed 1
    assert (
        repeat["images"] == 1 and 0 <= repeat["mean_top5_overlap"] <= 1 and -1 <= repeat["mean_spearman"] <= 1
    )
    assert repeat["mean_top5_overlap"] == data["per_image"][0]["reference_repeat"]["top5_overlap"]
    assert repeat["mean_spearman"] == data["per_image"][0]["reference_repeat"]["spearman"]
    assert "reference_repeat" not in data["per_image"][1] and "against itself at seed + 1" in result.stdout
    assert data["images"] == 2 and data["mean_top5_overlap"] >= 0.6 and data["ort_cpu_fixed_seconds"] > 0
    assert data["precision"] == "int8" and " int8 on cpu" in data["runs_on"]
    assert " fp32 on cpu" in data["reference_runs_on"]
    assert data["same_label"] == np.mean([row["same_label"] for row in data["per_image"]])
    for row in data["per_image"]:
        assert len(row["curves"]["fixed"]) == 11 and row["samples_auto"] <= 400
    assert "top-5 overlap" in result.stdout and (tmp_path / "lime_fidelity.png").stat().st_size > 1000
    error = one_line_error(
        cli("cxr-bench", "lime", "--model", str(bundle), "--fidelity", "--precision", "fp32,int8", check=2)
    )
    assert error == "error: --fidelity takes one --precision, got 'fp32,int8'"
    sampler = cli("cxr-bench", "lime", "--model", str(bundle), "--fidelity", "--sampler", "odd", check=2)
    assert "--sampler must be one of paired, plain" in one_line_error(sampler)


def test_fidelity_run_resumes_after_an_interruption(bundle, phantoms, tmp_path, monkeypatch):
    import cxr.bench.lime_fidelity as fidelity

    images = sorted((phantoms / "normal").glob("*.png"))[:2]
    real_explain, calls = fidelity.explain_image, []

    def explain_then_stop(image, backend, config, label=None):
        calls.append(config.adaptive)
        if len(calls) > 2:  # the second image's reference map: the run is cut off here
            raise KeyboardInterrupt
        return real_explain(image, backend, config, label=label)

    monkeypatch.setattr(fidelity, "explain_image", explain_then_stop)
    with pytest.raises(KeyboardInterrupt):
        fidelity.run_fidelity(bundle, tmp_path, images, 200, 0, "onnxruntime", baseline_images=1)
    partial = json.loads((tmp_path / fidelity.PARTIAL).read_text())
    assert [row["image"] for row in partial["per_image"]] == [str(images[0])]
    assert not (tmp_path / "lime_fidelity.json").exists()

    monkeypatch.setattr(fidelity, "explain_image", real_explain)
    summary = fidelity.run_fidelity(bundle, tmp_path, images, 200, 0, "onnxruntime", baseline_images=1)
    assert summary["images"] == 2 and summary["images_resumed"] == 1
    assert summary["per_image"][0]["seconds_fixed"] == partial["per_image"][0]["seconds_fixed"]
    assert not summary["per_image"][1].get("resumed") and not (tmp_path / fidelity.PARTIAL).exists()

    # another stopping rule: only --samples auto is measured again, the fp32 maps are reused
    calls.clear()

    def count_explains(image, backend, config, label=None):
        calls.append(config.adaptive)
        return real_explain(image, backend, config, label=label)

    monkeypatch.setattr(fidelity, "explain_image", count_explains)
    strict = fidelity.run_fidelity(
        bundle, tmp_path, images, 200, 0, "onnxruntime", baseline_images=1, rule={"min_agreement": 0.95}
    )
    assert strict["images_resumed"] == 0 and strict["references_reused"] == 2
    assert strict["rule"]["sampler"] == "paired" and strict["rule"]["min_agreement"] == 0.95
    assert strict["rule"]["min_agreement"] == 0.95 and summary["rule"]["min_agreement"] == 0.0
    assert calls == [True, True, False]  # two auto maps, then the ORT CPU baseline's one fixed map
    for before, after in zip(summary["per_image"], strict["per_image"]):
        assert after["reference_weights"] == before["reference_weights"]
        assert after["samples_auto"] >= before["samples_auto"]  # one more condition to meet

    other_seed = fidelity.run_fidelity(bundle, tmp_path, images[:1], 200, 1, "onnxruntime", baseline_images=1)
    assert other_seed["images_resumed"] == 0 and other_seed["references_reused"] == 0


def test_bootstrap_agreement_tells_settled_top_segments_from_noise():
    from cxr.runtime.explain import sample_rows, top_segments
    from cxr.runtime.settle import Settling, bootstrap_stability

    rng = np.random.default_rng(0)
    rows = sample_rows(rng, 400, 30)
    effect = np.zeros(30)
    effect[:5] = [0.5, -0.4, 0.3, 0.25, -0.2]  # five segments that matter, the rest nothing
    clear = rows @ effect + rng.normal(0, 0.01, 400)
    noise = rng.normal(0, 1, 400)
    ranked = list(range(8))
    spread, agreement = bootstrap_stability(rows, clear, ranked, ranked[:5], seed=0)
    assert agreement == 1.0 and spread < 0.15
    noisy_top = top_segments(dict(enumerate(np.linalg.lstsq(rows, noise, rcond=None)[0])), 8)
    _, noisy_agreement = bootstrap_stability(rows, noise, noisy_top, noisy_top[:5], seed=0)
    assert noisy_agreement < 0.7

    # as a stopping condition: the same fits settle without it and not with it on noise
    weights = dict(enumerate(np.linalg.lstsq(rows, noise, rcond=None)[0]))
    probs = np.stack([noise, noise], axis=1)
    lenient, strict = (
        Settling(top_k=8, seed=0, spread_bound=100.0, stable_fits=3),
        Settling(top_k=8, seed=0, spread_bound=100.0, stable_fits=3, min_agreement=0.9),
    )
    assert [lenient.check(weights, rows, probs, 0) for _ in range(3)] == [False, False, True]
    assert [strict.check(weights, rows, probs, 0) for _ in range(3)] == [False, False, False]
    assert strict.agreement == pytest.approx(noisy_agreement)
    clear_probs = np.stack([clear, clear], axis=1)
    settled = Settling(top_k=8, seed=0, stable_fits=3, min_agreement=0.9)
    clear_weights = dict(enumerate(effect + 1e-3 * np.arange(30)))
    assert [settled.check(clear_weights, rows, clear_probs, 0) for _ in range(3)] == [False, False, True]
    assert "bootstrap top-5 agreement 1.00 >= 0.9" in settled.reason(400)
