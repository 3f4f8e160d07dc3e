"""``cxr-export parity``: does each deployed backend still give the validated PyTorch model's answers?

Per backend: max / mean / p99 |dprob| against PyTorch, top-1 agreement, accuracy and per-class
precision / recall / F1 with their deltas (COVID-19 recall called out), judged by per-precision rules.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cxr.export.stage import bundle_stage
from cxr.runtime.backends import registry
from cxr.runtime.backends.select import describe, open_classifier, runnable_here
from cxr.runtime.bundle import Bundle
from cxr.runtime.card import record_files
from cxr.runtime.cpu_features import cpu_bf16_features, cpu_int8_features
from cxr.runtime.errors import CxrError, CxrUsageError
from cxr.runtime.formats import FORMATS, ParityRule
from cxr.runtime.metrics import classification_report
from cxr.runtime.ood import GATE_FILE, Gate, bundle_gate
from cxr.runtime.ood_precision import gate_decisions
from cxr.runtime.safe_io import atomic_write
from cxr.train.augment import evaluation_view
from cxr.train.data import load_images, scan_image_folder
from cxr.train.fit import predict_probs
from cxr.train.ood_features import FeatureClassifier, extract
from cxr.train.run import load_run

log = logging.getLogger(__name__)

DEFAULT_RULES = {precision: fmt.parity for precision, fmt in FORMATS.items()}


def parity_rules(
    fp32_max_dprob: float, fp16_agreement: float, int8_agreement: float, alpha: float
) -> dict[str, ParityRule]:
    """The rules ``cxr-export parity`` judges by, from its options (their defaults are ``DEFAULT_RULES``)."""
    if not 0 < alpha < 1:
        raise CxrUsageError(f"--alpha must be between 0 and 1, got {alpha}")
    return {
        "fp32": ParityRule(1.0, max_abs_dprob=fp32_max_dprob),
        "fp16": ParityRule(fp16_agreement, alpha=alpha),
        "int8": ParityRule(int8_agreement, alpha=alpha),
        "bf16": ParityRule(fp16_agreement, alpha=alpha),  # a 16-bit float: fp16's rule
    }


def flip_rate_p(flips: int, n: int, allowed_rate: float) -> float:
    """P(at least ``flips`` changed predictions among ``n``) if the true flip rate were ``allowed_rate``."""
    from scipy.stats import binomtest

    if flips == 0 or allowed_rate >= 1:
        return 1.0
    if allowed_rate <= 0:
        return 0.0
    return float(binomtest(flips, n, allowed_rate, alternative="greater").pvalue)


def mcnemar_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar p-value: images right before and wrong now (lost) against the reverse
    (gained)."""
    from scipy.stats import binomtest

    if lost + gained == 0:
        return 1.0
    return float(binomtest(lost, lost + gained, 0.5).pvalue)


def class_shifts(
    labels: np.ndarray, reference: np.ndarray, other: np.ndarray, classes: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """Per true class: n, predictions changed, right->wrong (lost), wrong->right (gained), McNemar p."""
    shifts = {}
    for index, name in enumerate(classes):
        rows = labels == index
        was, now = reference[rows] == index, other[rows] == index
        lost, gained = int(np.sum(was & ~now)), int(np.sum(~was & now))
        shifts[name] = {
            "n": int(rows.sum()),
            "flips": int(np.sum(reference[rows] != other[rows])),
            "lost": lost,
            "gained": gained,
            "mcnemar_p": round(mcnemar_p(lost, gained), 6),
        }
    return shifts


def metric_deltas(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """Differences in points (x100) of accuracy, macro-F1, COVID-vs-rest and every per-class metric."""
    deltas = {
        "accuracy": other["accuracy"] - reference["accuracy"],
        "macro_f1": other["macro_f1"] - reference["macro_f1"],
    }
    for name, values in reference["per_class"].items():
        for key in ("precision", "recall", "f1"):
            deltas[f"{name}.{key}"] = other["per_class"][name][key] - values[key]
    for key, value in reference.get("covid_vs_rest", {}).items():
        deltas[f"covid_vs_rest.{key}"] = other["covid_vs_rest"][key] - value
    return {k: round(100 * v, 3) for k, v in deltas.items()}


def compare(
    reference_probs: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...],
    reference_report: dict[str, Any],
    rule: ParityRule,
) -> dict[str, Any]:
    diff = np.abs(probs.astype(np.float64) - reference_probs.astype(np.float64))
    report = classification_report(labels, probs.argmax(1), classes)
    deltas = metric_deltas(reference_report, report)
    ref_top, top = reference_probs.argmax(1), probs.argmax(1)
    flips = int(np.sum(ref_top != top))
    result = {
        "n": len(labels),
        "flips": flips,
        "max_abs_dprob": float(diff.max()),
        "mean_abs_dprob": float(diff.mean()),
        "p99_abs_dprob": float(np.quantile(diff, 0.99)),
        "top1_agreement": float(np.mean(top == ref_top)),
        "flip_rate_p": round(flip_rate_p(flips, len(labels), 1 - rule.min_agreement), 6),
        "classes": class_shifts(labels, ref_top, top, classes),
        "metrics": report,
        "deltas_pt": deltas,
        "covid_recall_delta_pt": deltas.get("covid_vs_rest.recall"),
        "rule": asdict(rule),
    }
    failures = []
    if rule.alpha is None and result["top1_agreement"] < rule.min_agreement:
        failures.append(f"top-1 agreement {result['top1_agreement']:.2%} < {rule.min_agreement:.2%}")
    if rule.max_abs_dprob is not None and result["max_abs_dprob"] > rule.max_abs_dprob:
        failures.append(f"max |dprob| {result['max_abs_dprob']:.2e} > {rule.max_abs_dprob:.0e}")
    if rule.alpha is not None:
        if result["flip_rate_p"] < rule.alpha:
            failures.append(
                f"{flips} of {len(labels)} predictions changed: significantly more than "
                f"{1 - rule.min_agreement:.1%} (binomial p={result['flip_rate_p']:.3g})"
            )
        for name, shift in result["classes"].items():
            if shift["mcnemar_p"] < rule.alpha:
                failures.append(
                    f"{name} recall shifted ({shift['lost']} lost, {shift['gained']} gained of "
                    f"{shift['n']}; McNemar p={shift['mcnemar_p']:.3g})"
                )
    result["passed"] = not failures
    result["failures"] = failures
    return result


def _targets(bundle: Bundle, wanted: list[str]) -> list[tuple[str, str, str]]:
    """(label, backend, precision) for every requested backend this bundle and machine can run: 'onnx',
    'fp16', 'int8' are ONNX Runtime on that graph, and a registered backend's parity prefix ('engine' for
    TensorRT, 'openvino') is that backend on each of its files (``registry.parity_choices``)."""
    choices = registry.parity_choices()
    unknown = [item for item in wanted if item not in choices]
    if unknown:
        raise CxrUsageError(f"--backends: unknown {unknown[0]!r}; choose from {', '.join(choices)}")
    targets = []
    for backend, precision in runnable_here(bundle):
        label = registry.get(backend).parity_label(precision)
        if label in wanted or label.split("-")[0] in wanted:
            targets.append((label, backend, precision))
    order = {item: index for index, item in enumerate(wanted)}
    return sorted(targets, key=lambda t: order.get(t[0], order.get(t[0].split("-")[0], 0)))


REPORT_NAME = "parity.json"


def run_parity(
    bundle_dir: Path,
    data: Path,
    backends: list[str],
    rules: dict[str, ParityRule],
    report_path: Path | None = None,
    run: Path | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    with bundle_stage(bundle_dir, "parity") as work:
        opened = Bundle.open(work)
        return _run_parity(opened, Path(bundle_dir), data, backends, rules, report_path, run, batch_size)


@dataclass(frozen=True, kw_only=True)
class _Reference:
    """The labelled images as every backend sees them, and the PyTorch model's answers on them."""

    pixels: np.ndarray  # N x 1 x S x S uint8, the card's preprocessing applied
    labels: np.ndarray
    classes: tuple[str, ...]
    probs: np.ndarray
    report: dict[str, Any]
    features: np.ndarray | None = None  # the PyTorch model's gate features (a bundle with a gate)
    stats: np.ndarray | None = None  # each film's image statistics (the gate's image part)


def _run_parity(
    bundle: Bundle,
    bundle_dir: Path,
    data: Path,
    backends: list[str],
    rules: dict[str, ParityRule],
    report_path: Path | None,
    run: Path | None,
    batch_size: int,
) -> dict[str, Any]:
    """Parity of the (staged) bundle: its card and its report (``parity.json``, listed in the card) are
    written in the staged folder; a report named elsewhere goes there."""
    reference = _reference(bundle, data, run, batch_size)
    targets = _targets(bundle, backends)
    if not targets:
        raise CxrError(f"none of --backends {','.join(backends)} can run here for {bundle_dir}")
    results: dict[str, Any] = {
        "data": str(data),
        "n": len(reference.pixels),
        "pytorch": reference.report,
        "backends": {
            label: _measure(bundle, backend, precision, reference, rules[precision])
            for label, backend, precision in targets
        },
    }
    results["passed"] = all(r["passed"] for r in results["backends"].values())
    _record(bundle, bundle_dir, results, report_path)
    return results


def _reference(bundle: Bundle, data: Path, run: Path | None, batch_size: int) -> _Reference:
    """The source run's PyTorch answers on ``data``, read through the bundle's own preprocessing."""
    source_run = Path(run or bundle.card.provenance.get("source_run", ""))
    if not str(source_run) or not (source_run / "model.pt").is_file():
        raise CxrError(
            "parity needs the PyTorch run the bundle came from; pass --run (card says "
            f"{source_run or 'nothing'})"
        )
    card, model = load_run(source_run)
    classes, samples = scan_image_folder(data, bundle.card.classes)
    loaded = load_images(samples, card.input.size, "loading", pre=bundle.card.preprocessing)
    if not loaded.images:
        raise CxrError(f"{data}: no readable images")
    pixels = np.stack(
        [evaluation_view(im, card.input.size, bundle.card.preprocessing) for im in loaded.images]
    )[:, None]
    views, cpu = list(pixels[:, 0]), torch.device("cpu")
    if bundle.has(GATE_FILE):  # one pass for both: the same forward, the stages' outputs caught on the way
        probs, features = extract(FeatureClassifier(model.adapter, model.net), views, cpu, batch_size)
    else:
        probs, features = predict_probs(model.net, model.adapter, views, cpu, batch_size), None
    report = classification_report(loaded.labels, probs.argmax(1), classes)
    return _Reference(
        pixels=pixels,
        labels=loaded.labels,
        classes=classes,
        probs=probs,
        report=report,
        features=features,
        stats=loaded.stats,
    )


def _measure(
    bundle: Bundle, backend_name: str, precision: str, reference: _Reference, rule: ParityRule
) -> dict[str, Any]:
    """One backend's answers on the reference images, compared and judged (TF32 off on CUDA)."""
    backend, _ = open_classifier(bundle, backend_name, precision, tf32=False)
    with backend:
        probs, features = backend.run_outputs_chunked(reference.pixels)
        runs_on = describe(backend)
    result = compare(reference.probs, probs, reference.labels, reference.classes, reference.report, rule)
    result.update(device=backend.device, runs_on=runs_on)
    _judge_gate(result, bundle_gate(bundle, precision), reference, features, rule)
    if backend.device == "cpu":  # int8 kernels, and so int8 answers, depend on the CPU's instructions
        result["cpu_int8"] = cpu_int8_features()
    if precision == "bf16":
        result["cpu_bf16"] = cpu_bf16_features()
    return result


GATE_DISAGREEMENT = 0.02  # the share of films on which the deployed gate may decide otherwise than PyTorch's


def _judge_gate(
    result: dict[str, Any],
    gate: Gate | None,
    reference: _Reference,
    features: np.ndarray | None,
    rule: ParityRule,
) -> None:
    """The out-of-distribution gate the runtime reads at this precision, on the backend's features against
    the PyTorch model's: a failure when it decides otherwise on significantly more than GATE_DISAGREEMENT
    of the films (binomial test at the rule's alpha, 0.05 for fp32)."""
    if gate is None or features is None or reference.features is None:
        return
    decided = gate_decisions(gate, reference.features, features, reference.stats)
    result["gate"] = decided
    alpha = rule.alpha if rule.alpha is not None else 0.05
    p = flip_rate_p(decided["disagree"], decided["n"], GATE_DISAGREEMENT)
    if p < alpha:
        result["failures"].append(
            f"the out-of-distribution gate decided otherwise on {decided['disagree']} of {decided['n']} "
            f"films (significantly more than {GATE_DISAGREEMENT:.0%}, binomial p={p:.3g}; "
            f"it reads {gate.method})"
        )
        result["passed"] = False


SUMMARY_KEYS = ("passed", "n", "flips", "top1_agreement", "max_abs_dprob", "covid_recall_delta_pt", "runs_on")


def _record(bundle: Bundle, bundle_dir: Path, results: dict[str, Any], report_path: Path | None) -> None:
    """The report (in the bundle, listed in its card, unless named elsewhere) and each backend's summary in
    the card, beside the results of backends not run now."""
    inside = report_path is None or Path(report_path).absolute() == (bundle_dir / REPORT_NAME).absolute()
    written = bundle.folder / REPORT_NAME if inside else Path(report_path)
    atomic_write(written, json.dumps(results, indent=2) + "\n")
    summary = {
        label: {
            **{k: r[k] for k in (*SUMMARY_KEYS, "cpu_int8", "cpu_bf16") if k in r},
            **({"gate_agreement": r["gate"]["agreement"]} if "gate" in r else {}),
        }
        for label, r in results["backends"].items()
    }
    earlier = bundle.card.parity.get("backends", {})  # results of backends not run now are kept
    parity = {"data": results["data"], "n": results["n"], "backends": {**earlier, **summary}}
    card = bundle.card.replace(parity=parity)
    record_files(bundle.folder, card, [REPORT_NAME] if inside else [])


def report_location(bundle_dir: Path, report_path: Path | None) -> Path:
    """Where ``run_parity`` leaves its report: ``report_path``, else the bundle's parity.json."""
    return Path(report_path) if report_path is not None else Path(bundle_dir) / REPORT_NAME


def _gate_cell(result: dict[str, Any]) -> str:
    """How often the deployed gate decided as PyTorch's ('-': no gate at this precision)."""
    return f"{result['gate']['agreement']:.1%}" if "gate" in result else "-"


def format_parity(results: dict[str, Any]) -> str:
    lines = [
        f"parity vs PyTorch on {results['n']} images (PyTorch accuracy {results['pytorch']['accuracy']:.3f})",
        f"{'backend':<12}{'agree':>8}{'flips':>7}{'max|dp|':>10}{'mean|dp|':>10}{'acc':>7}{'dacc pt':>9}"
        f"{'dCOVIDrec':>10}{'gate':>7}  result",
    ]
    for label, r in results["backends"].items():
        covid = r["covid_recall_delta_pt"]
        lines.append(
            f"{label:<12}{r['top1_agreement']:>8.2%}{r['flips']:>7}{r['max_abs_dprob']:>10.2e}{r['mean_abs_dprob']:>10.2e}"
            f"{r['metrics']['accuracy']:>7.3f}{r['deltas_pt']['accuracy']:>+9.2f}"
            f"{'' if covid is None else f'{covid:+.2f}':>10}"
            f"{_gate_cell(r):>7}  "
            f"{'PASS' if r['passed'] else 'FAIL: ' + '; '.join(r['failures'])}"
            f"  [{r['runs_on']}]"
        )
    return "\n".join(lines)
