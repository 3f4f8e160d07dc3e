"""INT8 chosen by measurement: the calibration method, the layers kept in float, and whether int8 is faster
here.

Every decision is taken on images the calibration did not see (``check`` feeds), against the fp32 graph:
1. each calibration method is calibrated once (its ranges cached) and scored by top-1 agreement;
2. a per-layer sensitivity sweep ranks tensors by their local quantisation noise (activations and weights:
   ONNX Runtime's ``qdq_loss_debug``, SQNR before vs after each tensor's own Q/DQ pair), then keeps the worst
   1, 2, 4, ... tensors in float (their producer and consumer nodes excluded) until the agreement target
   is met, re-quantised from the cached ranges, so no second calibration;
3. b1 latency of fp32 vs int8 on this CPU, so the command can say in one line when int8 does not pay here.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.cpu_features import cpu_int8_features
from cxr.runtime.safe_io import atomic_write

METHODS = ("minmax", "percentile", "entropy", "nncf")
EXCLUDE_STEPS = (1, 2, 4, 8, 16, 32)
logger = logging.getLogger(__name__)
FASTER_RATIO = 0.7  # int8 b1 p50 must be at most this share of fp32 to be called worth having


@dataclass(kw_only=True)
class Trial:
    """One quantised graph: how it was made and how well it agrees with fp32 on the check images."""

    method: str
    reduce_range: bool
    excluded: list[str]
    agreement: float
    max_abs_dprob: float


@dataclass(kw_only=True)
class TuneResult:
    method: str
    reduce_range: bool
    excluded: list[str]
    agreement: float
    trials: list[Trial] = field(default_factory=list)
    sensitivity: list[tuple[str, float]] = field(default_factory=list)


def predict(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Probabilities of one graph over all feeds (ORT CPU, so every trial is judged the same way)."""
    from cxr.runtime.backends.onnxruntime import CPU_EP, OrtBackend

    with OrtBackend(path, "int8", providers=[CPU_EP]) as backend:
        return np.concatenate([backend.run_chunked(feed["image"]) for feed in feeds])


def score(path: Path, reference: np.ndarray, feeds: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """(top-1 agreement with the fp32 reference, max |Δprob|)."""
    probs = predict(path, feeds)
    return float(np.mean(probs.argmax(1) == reference.argmax(1))), float(np.abs(probs - reference).max())


def tensor_sensitivity(
    float_path: Path, qdq_path: Path, feeds: list[dict[str, np.ndarray]]
) -> list[tuple[str, float]]:
    """Quantised tensors (activations and weights), worst first, by the SQNR (dB) of their own Q/DQ pair."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        compute_weight_error,
        create_activation_matching,
        create_weight_matching,
        modify_model_output_intermediate_tensors,
    )

    with tempfile.TemporaryDirectory() as tmp:
        augmented = Path(tmp) / "augmented.onnx"
        modify_model_output_intermediate_tensors(str(qdq_path), str(augmented))
        activations = collect_activations(str(augmented), iter(feeds))
    # compute_activation_error() insists on float-model activations; the local error needs only pre/post Q/DQ
    sqnr = {
        name: float(compute_signal_to_quantization_noice_ratio(match["pre_qdq"], match["post_qdq"]))
        for name, match in create_activation_matching(activations).items()
    }
    del activations
    sqnr.update(
        {
            name: float(err)
            for name, err in compute_weight_error(
                create_weight_matching(str(float_path), str(qdq_path))
            ).items()
        }
    )
    return sorted(
        ((name, round(value, 2)) for name, value in sqnr.items() if np.isfinite(value)),
        key=lambda item: item[1],
    )


def nodes_touching(float_path: Path, tensors: list[str]) -> list[str]:
    """The nodes to exclude so these tensors stay float: ORT quantises a tensor for its producer and its
    consumers."""
    import onnx

    wanted = set(tensors)
    graph = onnx.load(str(float_path), load_external_data=False).graph
    return [
        node.name
        for node in graph.node
        if node.name and wanted.intersection(list(node.input) + list(node.output))
    ]


def tune(
    src: Path,
    dst: Path,
    calib: list[dict[str, np.ndarray]],
    check: list[dict[str, np.ndarray]],
    methods: tuple[str, ...],
    target: float,
    log: Any = logger.info,
) -> TuneResult:
    """Pick the calibration method, then the fewest float-kept nodes reaching ``target`` agreement; writes
    ``dst``.

    Each method is also tried with 7-bit weights (``reduce_range``, from the same cached ranges): x86 CPUs
    without VNNI multiply u8 x s8 pairs into saturating 16-bit sums, which full-range weights can overflow.

    Each graph is made by ``cxr.export.int8.quantize_int8``.
    """
    from cxr.export.int8 import quantize_int8 as quantize

    reference = predict(src, check)
    trials: list[Trial] = []
    with tempfile.TemporaryDirectory() as tmp:
        caches = {m: Path(tmp) / f"{m}.ranges.json" for m in methods}
        candidates = {}
        for method in methods:
            for reduce in (False, True):
                path = candidates[method, reduce] = Path(tmp) / f"{method}{'-7bit' if reduce else ''}.onnx"
                quantize(src, path, calib, method, [], caches[method], reduce)
                agreement, dprob = score(path, reference, check)
                trials.append(
                    Trial(
                        method=method,
                        reduce_range=reduce,
                        excluded=[],
                        agreement=agreement,
                        max_abs_dprob=dprob,
                    )
                )
                log(
                    f"  {method}{', 7-bit weights' if reduce else ''}: agreement {trials[-1].agreement:.3f} "
                    f"on {len(reference)} held-out images"
                )
        best = max(trials, key=lambda t: (t.agreement, -t.max_abs_dprob, not t.reduce_range))
        chosen = candidates[best.method, best.reduce_range]
        result = TuneResult(
            method=best.method,
            reduce_range=best.reduce_range,
            excluded=[],
            agreement=best.agreement,
            trials=trials,
        )
        ranked = ranking_graph(trials, candidates, best)
        if best.agreement < target and ranked is None:
            log("  no ONNX Runtime candidate to rank tensors by: nothing kept in float")
        elif best.agreement < target:
            # two images: every activation of the graph is held for each (dpn92_se at 224: ~0.6 GB an image)
            result.sensitivity = tensor_sensitivity(src, ranked, [{k: v[:2] for k, v in check[0].items()}])
            for count in EXCLUDE_STEPS[
                : int(np.searchsorted(EXCLUDE_STEPS, len(result.sensitivity), "right"))
            ]:
                excluded = nodes_touching(src, [name for name, _ in result.sensitivity[:count]])
                trial_path = Path(tmp) / f"exclude{count}.onnx"
                quantize(
                    src, trial_path, calib, best.method, excluded, caches[best.method], best.reduce_range
                )
                agreement, dprob = score(trial_path, reference, check)
                trial = Trial(
                    method=best.method,
                    reduce_range=best.reduce_range,
                    excluded=excluded,
                    agreement=agreement,
                    max_abs_dprob=dprob,
                )
                trials.append(trial)
                log(
                    f"  {best.method}, {count} most sensitive tensor(s) kept in float ({len(excluded)} "
                    "nodes): "
                    f"agreement {trial.agreement:.3f}"
                )
                if trial.agreement > result.agreement:
                    result.excluded, result.agreement, chosen = excluded, trial.agreement, trial_path
                if trial.agreement >= target:
                    break
        atomic_write(dst, chosen.read_bytes())
    return result


def ranking_graph(trials: list[Trial], candidates: dict[tuple[str, bool], Path], best: Trial) -> Path | None:
    """The graph whose Q/DQ pairs rank the tensors: the best one, or if NNCF made it (its Q/DQ names are
    not the ones ORT's debugger pairs up), the best ORT-made one. Float-model names index both."""
    if best.method != "nncf":
        return candidates[best.method, best.reduce_range]
    made_by_ort = [t for t in trials if t.method != "nncf"]
    if not made_by_ort:
        return None
    runner_up = max(made_by_ort, key=lambda t: (t.agreement, -t.max_abs_dprob))
    return candidates[runner_up.method, runner_up.reduce_range]


def b1_p50_ms(backend: Any, image: np.ndarray, runs: int = 15) -> float:
    """Median single-image latency of an open classifier backend after two warm-up runs."""
    with backend:
        for _ in range(2):
            backend.run(image)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            backend.run(image)
            times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 2)


def cpu_speed(fp32: Path, int8: Path, image: np.ndarray) -> dict[str, Any]:
    """fp32 vs int8 b1 p50 on each CPU backend installed here (ONNX Runtime; OpenVINO, which auto prefers)."""
    from cxr.runtime.backends.onnxruntime import CPU_EP, OrtBackend
    from cxr.runtime.backends.openvino import OvBackend, openvino_available

    openers = {"onnxruntime": lambda path, p: OrtBackend(path, p, providers=[CPU_EP])}
    if openvino_available():
        openers["openvino"] = lambda path, p: OvBackend(path, p)
    speed: dict[str, Any] = {"cpu_int8": cpu_int8_features()}
    for name, open_ in openers.items():
        row = {
            "fp32_b1_p50_ms": b1_p50_ms(open_(fp32, "fp32"), image),
            "int8_b1_p50_ms": b1_p50_ms(open_(int8, "int8"), image),
        }
        row["ratio"] = round(row["int8_b1_p50_ms"] / row["fp32_b1_p50_ms"], 2)
        speed[name] = row
    return speed
