"""Bootstrap intervals and the LIME audit's arithmetic, on numbers small enough to check by hand."""

import json

import numpy as np
from cxr.train.intervals import bootstrap, exact_edge, per_class_prf
from cxr.train.lime_audit import outside_share

CLASSES = ("a", "b", "c")


def test_per_class_scores_match_scikit_learn():
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(0)
    truth, guess = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    guess[:5] = 0
    expected = np.stack(
        precision_recall_fscore_support(truth, guess, labels=[0, 1, 2], zero_division=0)[:3], 1
    )
    np.testing.assert_allclose(per_class_prf(truth, guess, 3), expected)


def test_a_perfect_model_gets_exact_intervals_not_certainty_and_the_gain_is_paired():
    truth = np.array([0, 1, 2] * 40)
    wrong_half = truth.copy()
    wrong_half[::2] = (wrong_half[::2] + 1) % 3
    result = bootstrap(truth, truth, wrong_half, CLASSES, rounds=200)
    # Clopper-Pearson for 120 of 120 right: [0.025 ** (1/120), 1]; per class 40 of 40
    assert result["accuracy"] == [round(0.025 ** (1 / 120), 4), 1.0] == [0.9697, 1.0]
    b = result["per_class"]["b"]
    assert b["recall"] == b["precision"] == b["f1"] == [round(0.025 ** (1 / 40), 4), 1.0]
    assert result["gain_over_baseline"]["points"] == 50.0
    low, high = result["gain_over_baseline"]["interval_points"]
    assert 35 < low < 50 < high < 65


def test_exact_edges_only_where_the_bootstrap_cannot_move():
    assert exact_edge(0, 24) == [0.0, round(1 - 0.025 ** (1 / 24), 4)] == [0.0, 0.1425]
    assert exact_edge(12, 24) is None and exact_edge(0, 0) is None
    truth = np.array([0, 1, 2] * 20)
    guess = truth.copy()
    guess[:6] = (guess[:6] + 1) % 3  # 54 of 60 right: the bootstrap's own interval
    result = bootstrap(truth, guess, None, CLASSES, rounds=200)
    low, high = result["accuracy"]
    assert low < 0.9 < high < 1.0


def test_a_model_no_better_than_its_baseline_has_an_interval_around_zero():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, 300)
    model, baseline = truth.copy(), truth.copy()
    model[rng.permutation(300)[:90]] += 1  # both right on 210 of 300 images, wrong on different ones
    baseline[rng.permutation(300)[:90]] += 2
    model, baseline = model % 3, baseline % 3
    result = bootstrap(truth, model, baseline, CLASSES, rounds=300, seed=2)
    low, high = result["gain_over_baseline"]["interval_points"]
    assert low < 0 < high
    assert bootstrap(truth, model, None, CLASSES, rounds=50) == bootstrap(
        truth, model, None, CLASSES, rounds=50
    )


def test_outside_share_weights_segments_by_their_outside_pixels():
    segments = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    body = np.array([[True, True, True, False], [True, True, True, False]])  # segment 1 is half outside
    assert outside_share({0: 1.0, 1: 1.0}, segments, body) == 0.25
    assert outside_share({0: 2.0, 1: -5.0}, segments, body) == 0.0
    assert outside_share({0: -1.0}, segments, body) is None


def test_ablation_table_has_one_row_per_report(tmp_path):
    from cxr.bench.ablation import run_ablation
    from cxr.runtime.metrics import classification_report

    classes = ("covid19", "normal", "pneumonia_bacterial", "pneumonia_viral")
    truth = np.array([0, 1, 2, 3] * 25)
    paths = []
    for name, flip, steps in (("on", 10, {"thorax_crop": True, "clahe": True}), ("off", 30, {})):
        model = truth.copy()
        model[:flip] = (model[:flip] + 1) % 4
        baseline = np.roll(truth, 1)
        report = {
            "run": str(tmp_path / name),
            "model": classification_report(truth, model, classes),
            "shortcut_baseline": classification_report(truth, baseline, classes),
            "intervals": bootstrap(truth, model, baseline, classes, rounds=100),
            "preprocessing": steps,
            "lime_audit": {"positive_weight_outside_body": 0.1 if steps else 0.3, "images": 40},
        }
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    (tmp_path / "on").mkdir()  # the "on" run's folder: 15 of 30 epochs, cut by a time budget
    (tmp_path / "on" / "card.json").write_text(json.dumps({"arch": "dpn92_se", "training": {"epochs": 30}}))
    history = [{"epoch": e} for e in range(1, 16)]
    (tmp_path / "on" / "metrics.json").write_text(
        json.dumps({"history": history, "stop_reason": "time budget"})
    )
    text = run_ablation(paths, tmp_path / "clinical.md")
    rows = [line for line in text.splitlines() if line.startswith("| on ") or line.startswith("| off ")]
    assert len(rows) == 2 and "thorax_crop, clahe" in rows[0] and "| none |" in rows[1]
    assert "| dpn92_se |" in rows[0] and "| 15 of 30 (time budget) |" in rows[0] and "| none | - |" in rows[1]
    assert "0.900" in rows[0] and "+90.0" in rows[0] and "10.0 % (40)" in rows[0] and "30.0 % (40)" in rows[1]
    assert json.loads((tmp_path / "clinical.json").read_text())[1]["accuracy"] == 0.7


def test_the_ablation_table_says_when_a_cut_run_still_annealed(tmp_path):
    from cxr.bench.ablation import epochs_trained

    for paced, expected in ((False, "15 of 30 (time budget)"), (True, "15 of 30 (time budget, annealed)")):
        history = [{"epoch": e, "paced_by_budget": paced} for e in range(1, 16)]
        metrics = {"history": history, "stop_reason": "time budget"}
        (tmp_path / "metrics.json").write_text(json.dumps(metrics))
        assert epochs_trained(tmp_path, 30) == expected
