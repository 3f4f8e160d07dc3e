import csv
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cxr.runtime.metrics import classification_report
from cxr.train.augment import PaperAugment, evaluation_view
from cxr.train.data import load_images, scan_image_folder, split_samples
from cxr.train.synth import read_lesion_masks

from tests.conftest import cli, one_line_error


def test_augment_output_size_determinism_and_variety():
    image = np.random.default_rng(0).integers(0, 256, (64, 90), dtype=np.uint8)
    augment = PaperAugment(64)
    a = augment(image, np.random.default_rng(7))
    b = augment(image, np.random.default_rng(7))
    c = augment(image, np.random.default_rng(8))
    assert a.shape == (64, 64) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_no_augment_path_is_the_runtime_centre_crop():
    image = np.arange(64 * 80, dtype=np.uint32).reshape(64, 80).astype(np.uint8)
    view = evaluation_view(image, 64)
    assert np.array_equal(view, image[:, 8:72])


def test_phantoms_layout_masks_not_mistaken_for_data(phantoms):
    classes, samples = scan_image_folder(phantoms)
    assert classes == ("covid19", "normal", "pneumonia_bacterial", "pneumonia_viral")
    assert len(samples) == 4 * 48
    assert all(s.path.suffix == ".png" for s in samples)
    masks = read_lesion_masks(phantoms)
    assert set(masks) == {s.rel for s in samples}
    assert not any(masks[s.rel].any() for s in samples if s.label == classes.index("normal"))
    assert all(masks[s.rel].any() for s in samples if s.label != classes.index("normal"))


def test_split_keeps_patients_on_one_side_and_is_stratified(phantoms):
    _, samples = scan_image_folder(phantoms)
    train, val = split_samples(samples, 0.25, seed=3)
    assert not {s.group for s in train} & {s.group for s in val}
    assert len(train) + len(val) == len(samples)
    counts = np.bincount([s.label for s in val], minlength=4)
    assert counts.min() >= 8 and counts.max() <= 16
    assert [s.rel for s in split_samples(samples, 0.25, seed=3)[1]] == [s.rel for s in val]


def test_split_without_manifest_is_stratified(tmp_path):
    from cxr.train.synth import write_phantoms

    write_phantoms(tmp_path, 10, 32)
    (tmp_path / "manifest.csv").unlink()
    _, samples = scan_image_folder(tmp_path)
    assert all(s.group == s.rel for s in samples)
    _, val = split_samples(samples, 0.2, 0)
    assert np.bincount([s.label for s in val]).tolist() == [2, 2, 2, 2]


def test_metrics_match_hand_computed_values():
    classes = ("covid19", "normal", "pneumonia_bacterial", "pneumonia_viral")
    y_true = [0, 0, 0, 1, 1, 2, 2, 3]
    y_pred = [0, 0, 1, 1, 1, 2, 3, 3]
    report = classification_report(y_true, y_pred, classes)
    assert report["accuracy"] == pytest.approx(6 / 8)
    assert report["per_class"]["covid19"] == {
        "precision": 1.0,
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(0.8),
        "support": 3,
    }
    assert report["per_class"]["normal"]["precision"] == pytest.approx(2 / 3)
    assert report["per_class"]["pneumonia_viral"]["f1"] == pytest.approx(2 / 3)
    assert report["covid_vs_rest"] == {
        "precision": 1.0,
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(0.8),
    }
    assert report["confusion"][0] == [2, 1, 0, 0]
    assert report["macro_f1"] == pytest.approx(np.mean([0.8, 0.8, 2 / 3, 2 / 3]))


def test_fit_writes_the_run_and_learns_the_phantoms(trained_run):
    for name in ("model.pt", "card.json", "metrics.json", "confusion.png", "curves.png", "split.json"):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] >= 0.85
    card = json.loads((trained_run / "card.json").read_text())
    assert card["arch"] == "dpn_se_tiny" and card["input"]["size"] == 64
    state = torch.load(trained_run / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_evaluate_uses_validation_split_and_reports_shortcut_baseline(trained_run, phantoms, tmp_path):
    import cv2

    out = tmp_path / "eval.json"
    result = cli(  # -q hides progress, never the result the command exists for
        "cxr-train",
        "-q",
        "evaluate",
        str(trained_run),
        str(phantoms),
        "--out",
        str(out),
        "--lime-audit",
        "3",
        "--lime-samples",
        "100",
    )
    report = json.loads(out.read_text())
    split = json.loads((trained_run / "split.json").read_text())
    assert report["scope"].startswith("validation split")
    assert report["model"]["n"] == len(split["val"])
    model, base, intervals = report["model"], report["shortcut_baseline"], report["intervals"]
    low, high = intervals["accuracy"]
    assert low <= model["accuracy"] <= high and high - low > 0
    gain = intervals["gain_over_baseline"]
    assert gain["points"] == round(100 * (model["accuracy"] - base["accuracy"]), 2)
    assert gain["interval_points"][0] <= gain["points"] <= gain["interval_points"][1]
    assert f"{gain['points']:+.1f} accuracy points" in result.stdout
    assert report["lime_audit"]["images"] == 3 and len(report["lime_audit"]["per_image"]) == 3
    assert report["preprocessing"]["thorax_crop"] is True
    assert report["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # --device auto
    page = cv2.imread(str(out.with_suffix(".png")))
    assert page is not None and page.shape[:2] == (850, 1100)
    assert "covid19 vs rest" in result.stdout
    parts = base["accuracy_by_features"]
    assert set(parts) == {"file size and shape", "intensity statistics", "8x8 thumbnail"}
    assert all(0 <= value <= 1 for value in parts.values())
    assert "the baseline from one kind of statistic alone: file size and shape" in result.stdout


def test_baseline_parts_find_a_class_that_only_the_file_size_gives_away():
    from cxr.train.data import LoadedImages
    from cxr.train.shortcut import shortcut_baseline

    def films(n: int, seed: int) -> LoadedImages:
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % 2
        images = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(n)]  # pixels: pure noise
        shapes = [(256, 300 if label else 380) for label in labels]  # the class is the file's width
        return LoadedImages(images=images, labels=labels, original_shapes=shapes, samples=[], skipped=[])

    report, predicted = shortcut_baseline(films(80, 0), films(40, 1), ("a", "b"))
    parts = report["accuracy_by_features"]
    assert list(parts) == ["file size and shape", "intensity statistics", "8x8 thumbnail"]
    assert parts["file size and shape"] == 1.0 and report["accuracy"] == 1.0
    assert parts["8x8 thumbnail"] < 0.8 and parts["intensity statistics"] < 0.8
    assert predicted.tolist() == (np.arange(40) % 2).tolist()


def test_max_minutes_stops_after_the_epoch_that_spends_it_and_writes_the_run(phantoms, tmp_path):
    out = fit_tiny(phantoms, tmp_path / "budget", epochs=5, max_minutes=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and metrics["best_epoch"] == 1
    assert metrics["stopped_early_after"] == 1 and metrics["stop_reason"] == "time budget"
    assert (out / "model.pt").is_file() and (out / "card.json").is_file()
    assert json.loads((out / "card.json").read_text())["training"]["max_minutes"] == 1e-4


def test_a_time_budget_paces_the_schedule_so_the_cut_run_still_anneals(phantoms, tmp_path):
    # 500 epochs cannot fit in 6 s: the schedule follows the clock and the last epoch ends at its floor
    # (lr / 25 / 1e4); cut by the epoch count alone it would still be warming up
    out = fit_tiny(phantoms, tmp_path / "paced", epochs=500, max_minutes=0.1, lr=1e-3)
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) < 500 and history[-1]["paced_by_budget"]
    assert history[-1]["lr"] < 1e-6


def test_the_budget_moves_the_schedule_on_only_when_the_clock_is_ahead():
    from cxr.train.schedule import one_cycle, paced_by_budget, step_within_budget

    def schedule():
        optimizer = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())
        made = one_cycle(optimizer, 1e-3, 100, 0.15)
        optimizer.step()  # no gradients: a no-op, so PyTorch does not warn of scheduler steps before it
        return made

    reference, paced = schedule(), schedule()
    step_within_budget(paced, 0.019)  # the clock less than a step ahead: an ordinary step
    assert paced.last_epoch == 1 and not paced_by_budget(paced, steps_taken=1)
    for _ in range(50):
        reference.step()
    step_within_budget(paced, 0.5)  # half the budget spent at step 2: straight to step 50
    assert paced.last_epoch == 50 and paced.get_last_lr() == pytest.approx(reference.get_last_lr())
    assert paced_by_budget(paced, steps_taken=2)
    step_within_budget(paced, 0.1)  # the clock behind: an ordinary step
    assert paced.last_epoch == 51
    for _ in range(3):  # past the budget: stays at the end (one-cycle raises past its last step)
        step_within_budget(paced, 1.7)
    for _ in range(50):
        reference.step()
    assert paced.last_epoch == 100 and paced.get_last_lr() == pytest.approx(reference.get_last_lr())
    assert paced.get_last_lr()[0] < 1e-3 / 1000


def test_ema_saves_the_averaged_weights_it_validated_and_records_the_raw_ones(phantoms, tmp_path):
    from cxr.train.evaluate import evaluate

    out = fit_tiny(phantoms, tmp_path / "ema", epochs=3, ema=1.0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert all({"val_macro_f1_raw", "val_accuracy_raw", "val_loss_raw"} <= set(h) for h in metrics["history"])
    raw_and_average = [(h["val_loss"], h["val_loss_raw"]) for h in metrics["history"]]
    assert all(a != b for a, b in raw_and_average)  # two different sets of weights were validated
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["ema"] == 1.0
    # model.pt holds the weights whose scores the run reports: evaluate reproduces the best epoch's confusion
    again = evaluate(out, phantoms, tmp_path / "eval.json")
    assert again["model"]["confusion"] == metrics["val"]["confusion"]
    best = metrics["history"][metrics["best_epoch"] - 1]
    assert saved_weights_val_loss(out, phantoms) == pytest.approx(best["val_loss"], rel=1e-4)


def saved_weights_val_loss(run: Path, data: Path) -> float:
    """The validation loss of the weights in model.pt, computed as fit computes it: it tells the weight
    average from the live weights where both give the same confusion matrix."""
    from cxr.train.augment import evaluation_view
    from cxr.train.data import load_images, scan_image_folder
    from cxr.train.fit import predict_probs
    from cxr.train.run import load_run, read_split

    card, model = load_run(run)
    _, samples = scan_image_folder(data, card.classes)
    val = set(read_split(run)["val"])
    loaded = load_images([s for s in samples if s.rel in val], card.input.size, "val", pre=card.preprocessing)
    views = [evaluation_view(im, card.input.size, card.preprocessing) for im in loaded.images]
    probs = predict_probs(model.net, model.adapter, views, torch.device("cpu"), 16)
    return float(-np.log(probs[np.arange(len(probs)), loaded.labels] + 1e-12).mean())


def test_ema_average_moves_towards_the_live_weights_at_the_chosen_horizon():
    from cxr.train.fit import weight_average

    net = torch.nn.Linear(2, 1)
    assert weight_average(net, 0.0, 10) is None
    ema = weight_average(net, 2.0, 10)  # ~20 steps: decay 0.95 once warmed up
    assert ema.decay == pytest.approx(0.95)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, step=10_000)
    assert torch.allclose(ema.module.weight, start + 0.05)


def test_bad_max_minutes_and_evaluate_device_are_one_line_errors(trained_run, phantoms, tmp_path):
    result = fit_cli(phantoms, tmp_path / "r", "--max-minutes", "-1", check=2)
    assert "--max-minutes must be 0" in one_line_error(result)
    result = fit_cli(phantoms, tmp_path / "r", "--ema", "-0.5", check=2)
    assert "--weight-decay and --ema must be 0 (off) or more" in one_line_error(result)
    result = cli("cxr-train", "evaluate", str(trained_run), str(phantoms), "--device", "tpu", check=2)
    assert "--device must be cpu, cuda or auto" in one_line_error(result)
    assert not (trained_run / "evaluation.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch")
def test_evaluate_on_the_gpu_gives_the_cpu_answers(trained_run, phantoms, tmp_path):
    from cxr.train.evaluate import evaluate

    on_cpu = evaluate(trained_run, phantoms, tmp_path / "cpu.json", lime_audit_images=2, device="cpu")
    on_gpu = evaluate(trained_run, phantoms, tmp_path / "gpu.json", lime_audit_images=2, device="cuda")
    assert on_gpu["device"].startswith("cuda") and on_cpu["device"] == "cpu"
    assert on_gpu["model"]["confusion"] == on_cpu["model"]["confusion"]
    shares = np.array(on_gpu["lime_audit"]["per_image"]) - np.array(on_cpu["lime_audit"]["per_image"])
    assert np.abs(shares).max() < 0.02


def test_same_seed_same_result_on_cpu(phantoms, tmp_path):
    runs = []
    for name in ("a", "b"):
        fit_tiny(phantoms, tmp_path / name, seed=5)
        runs.append(torch.load(tmp_path / name / "model.pt", weights_only=True))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_split_seed_keeps_the_validation_split_while_seed_changes_the_training(phantoms, tmp_path):
    for name, seed, split_seed in (("a", 0, None), ("b", 1, 0), ("c", 1, None)):
        fit_tiny(phantoms, tmp_path / name, seed=seed, split_seed=split_seed)
    splits = {name: json.loads((tmp_path / name / "split.json").read_text())["val"] for name in "abc"}
    assert splits["a"] == splits["b"] and splits["c"] != splits["a"]
    weights = [torch.load(tmp_path / name / "model.pt", weights_only=True) for name in "ab"]
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert json.loads((tmp_path / "b" / "card.json").read_text())["training"]["split_seed"] == 0


def fit_tiny(data: Path, out: Path, **options) -> Path:
    """A small, fast ``cxr-train fit`` (dpn_se_tiny at 48 px, batch 32, 1 epoch unless given)."""
    from cxr.train.fit import FitConfig, fit

    settings = {"arch": "dpn_se_tiny", "epochs": 1, "image_size": 48, "batch_size": 32, **options}
    fit(FitConfig(data=data, out=out, **settings))
    return out


def fit_cli(data: Path, out: Path, *options: str, check: int):
    """``cxr-train fit DATA --out OUT OPTIONS``, expected to exit with ``check``."""
    return cli("cxr-train", "fit", str(data), "--out", str(out), *options, check=check)


def test_init_fine_tunes_from_an_earlier_run(trained_run, phantoms, tmp_path):
    from cxr.train.fit import FitConfig, fit

    start = torch.load(trained_run / "model.pt", weights_only=True)
    out = tmp_path / "tuned"
    fit(
        FitConfig(
            data=phantoms, out=out, arch="dpn_se_tiny", epochs=1, image_size=64, lr=1e-7, init=trained_run
        )
    )
    tuned = torch.load(out / "model.pt", weights_only=True)
    weights = [k for k, v in start.items() if v.is_floating_point() and "running" not in k]
    assert all(torch.allclose(start[k], tuned[k], atol=1e-4) for k in weights)
    assert json.loads((out / "metrics.json").read_text())["val"]["accuracy"] >= 0.85
    assert json.loads((out / "card.json").read_text())["training"]["init"] == str(trained_run)


def test_init_overlap_counts_validation_images_the_earlier_run_trained_on(trained_run, phantoms, tmp_path):
    from cxr.train.run import init_overlap

    split = json.loads((trained_run / "split.json").read_text())
    assert init_overlap(trained_run, phantoms, split["val"]) == 0
    assert init_overlap(trained_run, phantoms, split["val"] + split["train"][:3]) == 3
    assert init_overlap(trained_run, tmp_path, split["train"]) == 0  # other data: nothing shared


def test_init_mismatch_and_conflicts_are_one_line_errors(trained_run, phantoms, tmp_path):
    from cxr.runtime.errors import CxrError, CxrUsageError
    from cxr.train.config import FitConfig

    with pytest.raises(CxrUsageError, match="give one"):
        FitConfig(data=phantoms, out=tmp_path / "a", init=trained_run, pretrained=True)
    with pytest.raises(CxrError, match="not a run folder"):
        FitConfig(data=phantoms, out=tmp_path / "a", init=phantoms)
    result = fit_cli(phantoms, tmp_path / "r", "--arch", "resnet18", "--init", str(trained_run), check=1)
    assert "they must match" in one_line_error(result)
    assert not (tmp_path / "r" / "model.pt").exists()


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    from cxr.train.synth import write_phantoms

    write_phantoms(tmp_path, 3, 32)
    (tmp_path / "normal" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "covid19" / "empty.jpg").write_bytes(b"")
    _, samples = scan_image_folder(tmp_path)
    loaded = load_images(samples, 32)
    assert len(loaded.images) == 12 and len(loaded.skipped) == 2


@pytest.mark.parametrize(
    "setup,message",
    [
        ("missing", "does not exist"),
        ("empty", "no class sub-folders"),
        ("empty_class", "class folder has no images"),
    ],
)
def test_bad_data_folders_are_one_line_errors(tmp_path, setup, message):
    data = tmp_path / "data"
    if setup != "missing":
        data.mkdir()
    if setup == "empty_class":
        (data / "a").mkdir()
        (data / "b").mkdir()
        (data / "a" / "x.png").write_bytes(b"")
    result = cli(
        "cxr-train", "fit", str(data), "--out", str(tmp_path / "run"), "--arch", "dpn_se_tiny", check=1
    )
    assert message in one_line_error(result)


def test_bad_arch_and_size_are_one_line_errors(phantoms, tmp_path):
    result = fit_cli(phantoms, tmp_path / "r", "--arch", "resnet5O", check=1)
    assert "unknown --arch" in one_line_error(result)
    result = fit_cli(phantoms, tmp_path / "r", "--arch", "dpn_se_tiny", "--image-size", "20", check=2)
    assert "too small" in one_line_error(result)


def test_help_works_for_every_command():
    """Every tool lists all its commands, each command answers --help with its own summary, and loading the
    tools imports no optional backend or torch (--help works on a bedside machine without them)."""
    import typer.main
    from typer.testing import CliRunner

    apps = {
        "cxr-train": "cxr.train.cli",
        "cxr-export": "cxr.export.cli",
        "cxr-run": "cxr.runtime.cli",
        "cxr-bench": "cxr.bench.cli",
    }
    for tool, module in apps.items():
        listing = cli(tool, "--help").stdout
        assert "Usage" in listing
        app = importlib.import_module(module).app
        for name, command in typer.main.get_command(app).commands.items():
            assert name in listing, (tool, name)
            shown = CliRunner().invoke(app, [name, "--help"], prog_name=tool)
            first_words = " ".join(command.help.split()[:4])
            assert shown.exit_code == 0 and first_words in " ".join(shown.output.split()), (tool, name)
    code = "import sys, " + ", ".join(apps.values()) + "; print(sorted(set(sys.modules) & {HEAVY}))"
    heavy = {"torch", "tensorrt", "openvino", "pytriton", "captum", "nncf"}
    loaded = subprocess.run([sys.executable, "-c", code.replace("{HEAVY}", repr(heavy))], capture_output=True)
    assert loaded.stdout.decode().strip() == "[]", loaded.stderr.decode()[-2000:]


def test_real_dataset_layout_and_patient_ids(real_data):
    classes, samples = scan_image_folder(real_data)
    assert classes == ("covid19", "normal", "pneumonia_bacterial", "pneumonia_viral")
    assert len(samples) == 600
    with open(real_data / "manifest.csv") as handle:
        patients = {row["file"]: row["patient_id"] for row in csv.DictReader(handle)}
    assert all(s.group == patients[s.rel] for s in samples)
    train, val = split_samples(samples, 0.2, 0)
    assert not {s.group for s in train} & {s.group for s in val}


def _torchrun_fit(
    data: Path, out: Path, seed: int, epochs: int = 6, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """2 processes, gloo on CPU, exactly as the README's multi-GPU command but with --device cpu."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "cxr.train.cli",
        "fit",
        str(data),
        "--out",
        str(out),
        "--arch",
        "dpn_se_tiny",
        "--epochs",
        str(epochs),
        "--image-size",
        "48",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--seed",
        str(seed),
        "--device",
        "cpu",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_torchrun_two_processes_gloo_learns_and_is_reproducible(phantoms, tmp_path):
    first = _torchrun_fit(phantoms, tmp_path / "a", seed=3)
    _torchrun_fit(phantoms, tmp_path / "b", seed=3)
    card = json.loads((tmp_path / "a" / "card.json").read_text())
    assert card["training"]["world_size"] == 2
    # Rank 0 alone logs: one line per epoch, not one per process.
    assert sum(line.startswith("epoch 1:") for line in first.stdout.splitlines()) == 1
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] >= 0.7, metrics["history"]
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_with_weight_average_saves_what_rank_zero_validated(phantoms, tmp_path):
    """Under torchrun only rank 0 keeps the average: it validates it beside the live weights and saves it.
    The budget (not reached) makes every step share rank 0's clock."""
    out = tmp_path / "run"
    result = _torchrun_fit(phantoms, out, seed=3, epochs=3, extra=("--ema", "1", "--max-minutes", "10"))
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["world_size"] == 2 and card["training"]["ema"] == 1.0
    assert sum("raw weights: macro-F1" in line for line in result.stdout.splitlines()) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    best = metrics["history"][metrics["best_epoch"] - 1]
    # the average differs from the live weights, and model.pt holds the average
    assert best["val_loss"] != pytest.approx(best["val_loss_raw"])
    assert saved_weights_val_loss(out, phantoms) == pytest.approx(best["val_loss"], rel=1e-4)
