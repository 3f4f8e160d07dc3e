"""``cxr-bench ood``: how well the bundle's out-of-distribution gate tells chest films from everything else.

In-distribution: the run's validation films (its split.json over DATA). Out of distribution: the kinds of
``cxr.bench.ood_sets`` (photographs, documents, textures, CT/MR/US frames, other anatomy, rotated chest
films), all as bare PNGs. Per kind: AUROC of the score against the validation films and the share the
shipped gate flags; the share of validation films flagged, also on a held-out half (the threshold chosen
on the other half); the gate's cost per image beside the classifier's. With ``--compare``, candidate gates
are fitted on the run's training films and measured the same way: the table that chooses the method.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.bundle import Bundle
from cxr.runtime.errors import CxrError
from cxr.runtime.ood import Gate, bundle_gate, fit_gate, image_stats
from cxr.runtime.predict import prepare
from cxr.runtime.preprocess import DEFAULT_MAX_PIXELS
from tqdm import tqdm

log = logging.getLogger(__name__)

CANDIDATES = {  # name -> gate parts ("msp": the maximum softmax probability, no fitting)
    "msp": (),
    "energy": ("energy",),
    "image statistics": ("image",),
    "mahalanobis final": ("mahalanobis:final",),
    "mahalanobis all layers": ("mahalanobis:all",),
    "mahalanobis final + image": ("mahalanobis:final", "image"),
    "mahalanobis all + image": ("mahalanobis:all", "image"),
    "mahalanobis all + energy + image": ("mahalanobis:all", "energy", "image"),
}


@dataclass(kw_only=True)
class Encoded:
    """Probabilities, features and image statistics of a list of images (unreadable ones left out)."""

    paths: list[Path] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    stats: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0  # the classifier's time

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.stack(self.probs), np.stack(self.features), np.stack(self.stats)


def encode(paths: list[Path], bundle: Bundle, backend: Any, desc: str, batch: int = 16) -> Encoded:
    """Every readable image through the runtime's own reading and the bundle's classifier."""
    out = Encoded()
    quiet = not log.isEnabledFor(logging.INFO)
    for start in tqdm(range(0, len(paths), batch), desc=desc, unit="batch", disable=quiet or len(paths) < 2):
        chunk = [
            (p, prepare(p, str(p), bundle.card, DEFAULT_MAX_PIXELS)) for p in paths[start : start + batch]
        ]
        chunk = [(p, item) for p, item in chunk if item.image is not None]
        if not chunk:
            continue
        started = time.perf_counter()
        probs, features = backend.run_outputs(np.stack([item.image for _, item in chunk])[:, None])
        out.seconds += time.perf_counter() - started
        if features is None:
            raise CxrError(f"{bundle.folder}: its classifier emits no features (exported before gates)")
        for (path, item), p, f in zip(chunk, probs, features):
            out.paths.append(path)
            out.probs.append(p)
            out.features.append(f)
            out.stats.append(item.stats)
    return out


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` telling ``outside`` (positive) from ``inside``."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(labels, np.r_[inside, outside]))


def held_out_flagged(scores: np.ndarray, keep: float, seed: int = 0) -> float:
    """The share of validation films flagged when the threshold is chosen on the other half (both ways)."""
    order = np.random.default_rng(seed).permutation(len(scores))
    halves = np.array_split(order, 2)
    shares = []
    for chosen, measured in ((halves[0], halves[1]), (halves[1], halves[0])):
        threshold = float(np.quantile(scores[chosen], keep))
        shares.append(float(np.mean(scores[measured] > threshold)))
    return float(np.mean(shares))


def kind_table(
    score: Any, threshold: float, val: Encoded, kinds: dict[str, Encoded], keep: float
) -> dict[str, Any]:
    """Per kind: n, AUROC and share flagged; the validation films' share flagged, in and out of sample."""
    inside = score(val)
    rows = {
        "validation films": {
            "n": len(inside),
            "flagged": float(np.mean(inside > threshold)),
            "flagged_held_out": held_out_flagged(inside, keep),
        }
    }
    everything = []
    for kind, encoded in kinds.items():
        if not encoded.paths:
            continue
        outside = score(encoded)
        everything.append(outside)
        rows[kind] = {
            "n": len(outside),
            "auroc": auroc(inside, outside),
            "flagged": float(np.mean(outside > threshold)),
        }
    if everything:
        joined = np.concatenate(everything)
        rows["all non-chest"] = {
            "n": len(joined),
            "auroc": auroc(inside, joined),
            "flagged": float(np.mean(joined > threshold)),
        }
    return rows


def gate_scorer(gate: Gate) -> Any:
    return lambda encoded: gate.scores(np.stack(encoded.features), np.stack(encoded.stats))


def compare_methods(
    train: Encoded, train_labels: np.ndarray, val: Encoded, kinds: dict[str, Encoded], gate: Gate, keep: float
) -> dict[str, Any]:
    """Every candidate fitted on the training films and thresholded on the validation films, measured
    alike."""
    _, train_features, train_stats = train.arrays()
    _, val_features, val_stats = val.arrays()
    table = {}
    for name, parts in CANDIDATES.items():
        if not parts:

            def score(encoded: Encoded) -> np.ndarray:
                return -np.max(np.stack(encoded.probs), axis=1)

            threshold = float(np.quantile(score(val), keep))
        else:
            fitted = fit_gate(
                train_features=train_features,
                train_stats=train_stats,
                train_labels=train_labels,
                val_features=val_features,
                val_stats=val_stats,
                feature_layout=gate.feature_layout,
                parts=parts,
                keep=keep,
            )
            score, threshold = gate_scorer(fitted), fitted.threshold
        table[name] = kind_table(score, threshold, val, kinds, keep)
    return table


def gate_cost(gate: Gate, val: Encoded, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per image: the classifier (as measured while encoding) and the gate (statistics of the
    decoded film plus the score), best of ``repeats``."""
    from cxr.runtime.preprocess import read_image

    films = [read_image(p) for p in val.paths[:32]]
    features, stats = np.stack(val.features[:32]), np.stack(val.stats[:32])
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for film in films:
            image_stats(film)
        gate.scores(features, stats)
        best = min(best, (time.perf_counter() - started) / len(films))
    classifier = val.seconds / max(1, len(val.paths))
    return {"classifier_ms": 1000 * classifier, "gate_ms": 1000 * best, "gate_share": best / classifier}


def markdown(report: dict[str, Any]) -> str:
    """The report's tables as markdown: the shipped gate per kind, then the comparison."""
    lines = [
        f"# Out-of-distribution gate: {report['gate']['method']}",
        "",
        f"Bundle `{report['bundle']}` at {report.get('precision', 'fp32')}, {report['cpu']}; "
        f"threshold {report['gate']['threshold']:.3g} "
        f"(keeps {report['gate']['keep']:.0%} of the validation films in sample).",
        "",
        "| kind | n | AUROC | flagged |",
        "|---|---|---|---|",
    ]
    for kind, row in report["shipped"].items():
        auc = f"{row['auroc']:.3f}" if "auroc" in row else "-"
        extra = f" (held-out half: {row['flagged_held_out']:.1%})" if "flagged_held_out" in row else ""
        lines.append(f"| {kind} | {row['n']} | {auc} | {row['flagged']:.1%}{extra} |")
    cost = report["cost"]
    lines += [
        "",
        f"Cost per image: classifier {cost['classifier_ms']:.1f} ms, gate {cost['gate_ms']:.2f} ms "
        f"({cost['gate_share']:.1%} of the classifier).",
        "",
    ]
    if report.get("comparison"):
        kinds = [k for k in next(iter(report["comparison"].values())) if k != "validation films"]
        lines += [
            "## Candidates (fitted on the training films, thresholded on the validation films)",
            "",
            "| method | chest flagged (held out) | "
            + " | ".join(f"{k} AUROC / flagged" for k in kinds)
            + " |",
            "|---" * (len(kinds) + 2) + "|",
        ]
        for name, rows in report["comparison"].items():
            cells = [f"{rows[k]['auroc']:.3f} / {rows[k]['flagged']:.0%}" for k in kinds]
            lines.append(
                f"| {name} | {rows['validation films']['flagged_held_out']:.1%} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


def run_ood(
    bundle_dir: Path,
    run: Path,
    data: Path,
    out: Path,
    compare: bool = False,
    seed: int = 0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """The whole benchmark; writes ``ood.json`` and ``ood.md`` into ``out`` and returns the report."""
    from cxr.bench.environment import environment
    from cxr.bench.ood_sets import write_ood_sets, write_rotated
    from cxr.runtime.backends.select import open_classifier
    from cxr.train.data import scan_image_folder
    from cxr.train.run import read_split

    bundle = Bundle.open(bundle_dir)
    gate = bundle_gate(bundle, precision)
    if gate is None:
        raise CxrError(f"{bundle_dir}: no out-of-distribution gate to measure at {precision}")
    split = read_split(run)
    if split is None:
        raise CxrError(f"{run}: no split.json (the run's validation films are the in-distribution set)")
    _, samples = scan_image_folder(data, bundle.card.classes)
    by_name = {s.rel: s for s in samples}
    val_paths = [by_name[n].path for n in split["val"] if n in by_name]
    out.mkdir(parents=True, exist_ok=True)
    sets = write_ood_sets(out / "ood_images", seed)
    sets["rotated_chest"] = write_rotated(val_paths[:60], out / "ood_images", seed)
    backend, reason = open_classifier(bundle, "auto", precision)
    with backend:
        val = encode(val_paths, bundle, backend, "validation films")
        kinds = {kind: encode(paths, bundle, backend, kind) for kind, paths in sets.items()}
        report: dict[str, Any] = {
            "bundle": str(bundle_dir),
            "backend": reason,
            "cpu": f"{environment()['cpu']} ({environment()['cpu_vector']})",
            "gate": {**bundle.card.ood, "method": gate.method, "threshold": gate.threshold},
            "precision": precision,
            "shipped": kind_table(gate_scorer(gate), gate.threshold, val, kinds, gate.keep),
            "cost": gate_cost(gate, val),
        }
        if compare:
            train_samples = [by_name[n] for n in split["train"] if n in by_name]
            train = encode([s.path for s in train_samples], bundle, backend, "training films")
            label_of = {s.path: s.label for s in train_samples}
            labels = np.array([label_of[path] for path in train.paths])
            report["comparison"] = compare_methods(train, labels, val, kinds, gate, gate.keep)
    (out / "ood.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "ood.md").write_text(markdown(report))
    return report
