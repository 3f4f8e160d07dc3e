"""LIME against the explainer graph: segments once, only on/off rows per batch, lime's own ridge fit.

Same as ``lime``'s ``LimeImageExplainer.explain_instance`` (row 0 = the unperturbed image, cosine
distance, kernel sqrt(exp(-d^2 / 0.25^2)), ``LimeBase`` with feature selection 'auto' over all segments),
but the perturbed images are composed inside the graph and the rows come from a seeded numpy Generator,
so the same image + seed + backend give identical weights.

Paired rows (``--samples auto``'s default): each random row is followed by its complement. Every row is
still uniform over on/off, so the fit estimates the same map as lime's rows; but within a pair the model's
even-order interactions between segments (two segments that matter only together) take the same value, so
they no longer leak into the segment weights: the map settles on fewer samples. Measured on 12 unseen chest
X-rays against the fp32 1000-sample map (``benchmarks/results/cpu-2core/lime-auto/dpn92_se-224/paired``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from cxr.runtime.backends.base import ExplainerBackend
from cxr.runtime.errors import CxrUsageError
from cxr.runtime.segment import segment, segment_means
from cxr.runtime.settle import MIN_AGREEMENT, SPREAD_BOUND, STABLE_FITS, Settling

T = TypeVar("T")

KERNEL_WIDTH = 0.25
SAMPLERS = ("paired", "plain")  # --sampler
ALL_FEATURES = 100000  # lime's default num_features: every segment gets a weight


@dataclass(frozen=True, kw_only=True)
class ExplainConfig:
    samples: int = 1000  # fixed budget; with adaptive=True the most samples drawn (--max-samples)
    segmenter: str = "slic"
    num_features: int = 8  # segments painted in the overlay
    seed: int = 0
    n_segments: int = 50
    adaptive: bool = False  # --samples auto: stop when the map is settled (runtime/settle.py)
    paired: bool | None = None  # each row followed by its complement; None: paired exactly when adaptive
    min_samples: int = 150  # first check
    round_size: int = 50  # samples between checks (two equal fits: the earliest stop is at 200)
    # the stopping rule's bounds (runtime/settle.py; tuned with research.lime.settle_sweep)
    spread_bound: float = SPREAD_BOUND
    stable_fits: int = STABLE_FITS
    min_agreement: float = MIN_AGREEMENT

    def __post_init__(self) -> None:
        if self.paired is None:  # a fixed budget keeps lime's (the paper's) rows
            object.__setattr__(self, "paired", self.adaptive)
        if self.samples < 10:
            raise CxrUsageError(f"--samples must be at least 10, got {self.samples}")
        if self.adaptive and self.samples < self.min_samples:
            raise CxrUsageError(f"--max-samples must be at least {self.min_samples}, got {self.samples}")
        if self.spread_bound <= 0 or self.stable_fits < 2 or not 0 <= self.min_agreement <= 1:
            raise CxrUsageError(
                f"the stopping rule needs a spread bound above 0, at least 2 equal fits and an agreement "
                f"in [0, 1], got {self.spread_bound}, {self.stable_fits} and {self.min_agreement}"
            )
        if self.num_features < 1:
            raise CxrUsageError(f"--num-features must be at least 1, got {self.num_features}")


@dataclass(kw_only=True)
class Explanation:
    label: int
    weights: dict[int, float]
    intercept: float
    score: float
    segments: np.ndarray
    probs: np.ndarray  # probabilities of the unperturbed image (row 0)
    timing: dict[str, float]
    bytes_sent: int
    samples: int = 0  # samples the fit used
    stopped: str = ""  # why sampling stopped
    # the explainer graph's own top class of row 0: another precision may rank a near tie the other way
    explainer_top: int = -1


def sample_rows(rng: np.random.Generator, samples: int, segments: int, paired: bool = False) -> np.ndarray:
    """``samples`` on/off rows, row 0 the whole image. ``paired``: rows 2i and 2i + 1 are complements (row 1
    is the all-off image), so any even prefix holds whole pairs."""
    if not paired:
        rows = rng.integers(0, 2, (samples, segments), dtype=np.uint8)
        rows[0] = 1
        return rows
    drawn = rng.integers(0, 2, ((samples + 1) // 2, segments), dtype=np.uint8)
    drawn[0] = 1
    return np.stack([drawn, 1 - drawn], axis=1).reshape(-1, segments)[:samples]


def lime_fit(
    rows: np.ndarray, probs: np.ndarray, label: int, seed: int
) -> tuple[dict[int, float], float, float]:
    """lime's weighted ridge on (rows, probs): returns segment weights, intercept and the fit's R^2."""
    from lime.lime_base import LimeBase
    from sklearn.metrics import pairwise_distances
    from sklearn.utils import check_random_state

    distances = pairwise_distances(rows, rows[0:1], metric="cosine").ravel()
    base = LimeBase(
        lambda d: np.sqrt(np.exp(-(d**2) / KERNEL_WIDTH**2)),
        verbose=False,
        random_state=check_random_state(seed),
    )
    intercept, pairs, score, _ = base.explain_instance_with_data(
        rows.astype(np.float64),
        probs.astype(np.float64),
        distances,
        label,
        ALL_FEATURES,
        feature_selection="auto",
    )
    return {int(k): float(v) for k, v in pairs}, float(intercept), float(score)


def warm_host(seed: int = 0) -> None:
    """Run segmentation and lime's fit once on a toy problem, so their imports and first-call costs (about 1
    s) are paid when the explainer opens, not by the first patient's image."""
    rng = np.random.default_rng(seed)
    toy = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    segment(toy, "slic", 8, seed)
    rows = sample_rows(rng, 20, 8)
    lime_fit(rows, rng.random((20, 2)), 0, seed)


def warm_host_beside(open_device: Callable[[], T]) -> T:
    """``open_device()`` (an explainer's open and device warm-up) with ``warm_host`` on a second thread: they
    overlap (ONNX Runtime and OpenVINO release the GIL while they build and search), so the host's ~1 s of
    imports is not added to the first image's wait."""
    with ThreadPoolExecutor(1, thread_name_prefix="warm-host") as pool:
        host = pool.submit(warm_host)
        opened = open_device()
        host.result()
    return opened


def explain_image(
    image: np.ndarray,
    backend: ExplainerBackend,
    config: ExplainConfig,
    rows: np.ndarray | None = None,
    segments: np.ndarray | None = None,
    label: int | None = None,
) -> Explanation:
    """Explain one preprocessed uint8 image (``rows``/``segments`` may be given, for tests).

    ``label``: the class to explain, normally the classifier's answer, so the map never shows another class
    than the record when the explainer graph (another precision or calibration) ranks a near tie the other
    way. Default: the explainer's own top class of the unperturbed image."""
    started = time.perf_counter()
    if segments is None:
        segments = segment(image, config.segmenter, config.n_segments, config.seed)
    fill = segment_means(image, segments)
    segmented = time.perf_counter()
    if rows is None:
        rows = sample_rows(
            np.random.default_rng(config.seed), config.samples, int(segments.max()) + 1, bool(config.paired)
        )
    sampled = time.perf_counter()
    bytes_before = backend.bytes_sent
    backend.set_image(image, fill, segments)
    run = _model_rows(backend, rows, config, label)
    rows, probs = rows[: run.done_rows], run.probs
    modelled = time.perf_counter()
    top = int(np.argmax(probs[0]))
    label = top if label is None else label
    weights, intercept, score = lime_fit(rows, probs, label, config.seed)
    done = time.perf_counter()
    timing = {
        "segmentation_s": segmented - started,
        "sampling_s": sampled - segmented,
        "model_s": run.model_s,
        "settle_checks_s": run.check_s,
        "model_loop_s": modelled - sampled,
        "fit_s": done - modelled,
        "total_s": done - started,
    }
    return Explanation(
        label=label,
        weights=weights,
        intercept=intercept,
        score=score,
        segments=segments,
        probs=probs[0],
        timing=timing,
        bytes_sent=backend.bytes_sent - bytes_before,
        samples=len(rows),
        stopped=run.stopped,
        explainer_top=top,
    )


@dataclass(frozen=True, kw_only=True)
class _ModelRun:
    probs: np.ndarray  # one row of class probabilities per row run
    done_rows: int
    stopped: str  # why sampling stopped
    model_s: float  # seconds inside the backend
    check_s: float  # seconds in the stopping rule's refits


def _settling(config: ExplainConfig) -> Settling | None:
    """The stopping rule's state for ``--samples auto``; None for a fixed budget."""
    if not config.adaptive:
        return None
    return Settling(
        top_k=config.num_features,
        seed=config.seed,
        spread_bound=config.spread_bound,
        stable_fits=config.stable_fits,
        min_agreement=config.min_agreement,
        paired=bool(config.paired),
    )


def _model_rows(
    backend: ExplainerBackend, rows: np.ndarray, config: ExplainConfig, label: int | None
) -> _ModelRun:
    """Run ``rows`` through the explainer one fixed batch at a time; with ``--samples auto``, refit every
    ``round_size`` rows (from ``min_samples``) and stop once the map is settled."""
    step, settling = backend.limits.max_batch, _settling(config)
    next_check, stopped = config.min_samples, f"fixed budget of {len(rows)} samples"
    model_seconds, check_seconds, outputs, done_rows = 0.0, 0.0, [], 0
    while done_rows < len(rows):
        call = time.perf_counter()
        outputs.append(backend.run(rows[done_rows : done_rows + step]))
        model_seconds += time.perf_counter() - call
        done_rows += len(outputs[-1])
        if settling is None or done_rows < min(next_check, len(rows)):
            continue
        checked = time.perf_counter()
        probs = np.concatenate(outputs)
        explained = int(np.argmax(probs[0])) if label is None else label
        fitted = lime_fit(rows[:done_rows], probs, explained, config.seed)[0]
        settled = settling.check(fitted, rows[:done_rows], probs, explained)
        check_seconds += time.perf_counter() - checked
        if settled:
            stopped = settling.reason(done_rows)
            break
        next_check += config.round_size
        stopped = f"cap of {len(rows)} samples reached before the map settled"
    return _ModelRun(
        probs=np.concatenate(outputs),
        done_rows=done_rows,
        stopped=stopped,
        model_s=model_seconds,
        check_s=check_seconds,
    )


def top_segments(weights: dict[int, float], count: int) -> list[int]:
    return sorted(weights, key=lambda k: -abs(weights[k]))[:count]


def explanation_record(
    explanation: Explanation, classes: tuple[str, ...], config: ExplainConfig, overlay: str | None
) -> dict[str, Any]:
    record = {
        "label": classes[explanation.label],
        "weights": {str(k): round(v, 6) for k, v in sorted(explanation.weights.items())},
        "overlay": overlay,
        "seed": config.seed,
        "samples": explanation.samples,
        "max_samples" if config.adaptive else "budget": config.samples,
        "stopped": explanation.stopped,
        "segmenter": config.segmenter,
        "sampler": "paired" if config.paired else "plain",
        "score": round(explanation.score, 4),
        "timing": {k: round(v, 4) for k, v in explanation.timing.items()},
    }
    if explanation.explainer_top not in (-1, explanation.label):
        record["note"] = (
            f"the explainer graph ranks {classes[explanation.explainer_top]} first on this image; the map "
            f"explains {classes[explanation.label]}, the classifier's answer"
        )
    return record
