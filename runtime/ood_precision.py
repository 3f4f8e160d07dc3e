"""The out-of-distribution gate on a reduced precision's features.

The gate's Mahalanobis parts are fitted on the fp32 model's pooled features, in their top principal
components with one shrunk covariance. The early stages' features lie near a low-dimensional subspace and
int8's quantisation noise spreads outside it: on the quick-start model (dpn_se_tiny at 96 px, ONNX Runtime and
OpenVINO int8 alike) the first stage's part moved by 62 validation interquartile ranges (95th percentile of
240 films) and every film was flagged, while fp16 moved no part by more than 0.13
(``research/ood/gate_precision.py``).

So ``cxr-export int8`` measures on its held-out films how far int8 moves each part's score, and records in
the card (``ood.precisions.int8``) the parts that stay within ``GATE_DRIFT``; an int8 backend reads the gate
on those parts (and the image statistics, which no precision changes), thresholded anew on the validation
films at the same keep rate. An int8 graph made before this check runs without a gate, and says so once.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from cxr.runtime.errors import CxrError, one_line
from cxr.runtime.ood import Gate

log = logging.getLogger(__name__)

GATE_DRIFT = 1.0  # the most a kept part's score may move (95th percentile of held-out films; validation IQRs)
MOVING_PRECISIONS = ("int8",)  # precisions whose features move the gate (fp16 and bf16 keep it: see above)

_said: set[tuple[str, str]] = set()


def score_drift(gate: Gate, reference: np.ndarray, features: np.ndarray) -> dict[str, float]:
    """Per network part: the 95th percentile over films of how far its score moves from ``reference``
    (the fp32 graph's features) to ``features`` (the reduced precision's, same films)."""
    reference, features = np.asarray(reference, np.float64), np.asarray(features, np.float64)
    return {
        part.name: float(np.percentile(np.abs(part.score(features) - part.score(reference)), 95))
        for part in gate.parts
    }


def precision_entry(
    gate: Gate, reference: np.ndarray, features: np.ndarray, stats: np.ndarray
) -> dict[str, Any]:
    """What the card records of the gate at a reduced precision: the parts it keeps (None: no gate), how far
    each part moved, and how often the kept gate decides as it does on the fp32 features of the same films."""
    drift = score_drift(gate, reference, features)
    entry: dict[str, Any] = {
        "films": len(reference),
        "limit": GATE_DRIFT,
        "drift_p95": {name: round(value, 3) for name, value in drift.items()},
    }
    kept = [name for name, value in drift.items() if value <= GATE_DRIFT]
    kept += ["image"] if gate.image is not None else []
    try:
        reduced = gate.only(kept)
    except CxrError as exc:
        return {**entry, "parts": None, "why": one_line(exc, 200)}
    decided = gate_decisions(reduced, reference, features, stats)
    return {
        **entry,
        "parts": kept,
        "threshold": round(reduced.threshold, 6),
        "agreement": decided["agreement"],
        "flagged": decided["flagged"],
        "flagged_fp32_whole_gate": round(float(np.mean(gate.scores(reference, stats) > gate.threshold)), 4),
    }


def gate_decisions(
    gate: Gate, reference: np.ndarray, features: np.ndarray, stats: np.ndarray
) -> dict[str, Any]:
    """How often ``gate`` decides alike on ``features`` and on the ``reference`` features of the same films
    (parity: the deployed graph's against the PyTorch model's)."""
    on_reference = gate.scores(reference, stats) > gate.threshold
    on_features = gate.scores(features, stats) > gate.threshold
    return {
        "n": len(on_reference),
        "reads": gate.method,
        "disagree": int(np.sum(on_reference != on_features)),
        "agreement": round(float(np.mean(on_reference == on_features)), 4),
        "flagged": round(float(np.mean(on_features)), 4),
        "flagged_reference": round(float(np.mean(on_reference)), 4),
    }


def gate_for_precision(gate: Gate, bundle: Any, precision: str) -> Gate | None:
    """``gate`` as a backend running ``precision`` must read it: whole for fp32, fp16 and bf16; for int8 on
    the parts its export check kept, or None (said once) when the graph was never checked."""
    if precision not in MOVING_PRECISIONS:
        return gate
    folder = str(bundle.folder)
    entry = (bundle.card.ood.get("precisions") or {}).get(precision) or {}
    parts = entry.get("parts") if isinstance(entry, dict) else None
    if isinstance(parts, list) and parts and all(isinstance(name, str) for name in parts):
        try:
            reduced = gate.only(parts)
        except CxrError as exc:
            why = one_line(exc, 200)
        else:
            _say_once(
                folder,
                precision,
                logging.INFO,
                f"out-of-distribution gate with {precision}: {reduced.method} (the parts {precision} moves "
                f"by more than {GATE_DRIFT:g} are left out; threshold {reduced.threshold:.3g})",
            )
            return reduced
    else:
        why = entry.get("why") if isinstance(entry, dict) and entry.get("why") else None
        why = why or f"model.{precision}.onnx was made before that check: run 'cxr-export {precision}' again"
    _say_once(
        folder,
        precision,
        logging.WARNING,
        f"warning: {folder}: the out-of-distribution gate was not checked against {precision}'s features "
        f"({why}); {precision} records carry no ood_score",
    )
    return None


def _say_once(folder: str, precision: str, level: int, line: str) -> None:
    if (folder, precision) not in _said:
        _said.add((folder, precision))
        log.log(level, line)
