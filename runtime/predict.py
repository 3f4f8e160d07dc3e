"""Predict (and optionally explain) a stream of inputs in batches, one record per input, errors per input.

With explanations each record is yielded as soon as its map is done (not after its whole batch), and the
explainer may still be opening on a background thread while the first batch is read and classified: the
first answer comes as early as the slower of the two allows.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.backends.base import Backend, ExplainerBackend
from cxr.runtime.bundle import Bundle
from cxr.runtime.errors import CxrError, CxrUsageError, one_line
from cxr.runtime.explain import ExplainConfig, explain_image, explanation_record
from cxr.runtime.overlay import save_overlay
from cxr.runtime.preprocess import DEFAULT_MAX_PIXELS, load_image, preprocess
from tqdm import tqdm


@dataclass(frozen=True)
class PredictOptions:
    batch_size: int = 16
    top_k: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    explain: ExplainConfig | None = None
    explain_dir: Path | None = None
    strict: bool = False  # a warning (not a radiograph? colour? tiny?) fails the input instead


class OpeningExplainer:
    """An explainer opened (and warmed up: its cuDNN search) on a background thread, beside the classifier;
    ``get()`` waits for it.

    ``open_s`` is how long opening took, once it is done; ``close()`` waits for the opening and closes it.
    """

    def __init__(self, opener: Callable[[], ExplainerBackend]) -> None:
        self.open_s: float | None = None
        self._started = time.perf_counter()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="open-explainer")
        self._future = self._pool.submit(self._open, opener)

    def _open(self, opener: Callable[[], ExplainerBackend]) -> ExplainerBackend:
        explainer = opener()
        self.open_s = time.perf_counter() - self._started
        return explainer

    def match(self, name: str, precision: str, reopen: Callable[[], ExplainerBackend]) -> None:
        """Once the classifier is open: keep the explainer if it runs on the same backend and precision, else
        (``auto`` resolved otherwise, or opening failed) close it and open the matching one, still off the
        main thread."""
        first = self._future

        def matching() -> ExplainerBackend:
            try:
                explainer = first.result()
            except Exception:
                return self._open(reopen)
            if (explainer.name, explainer.precision) == (name, precision):
                return explainer
            explainer.close()
            return self._open(reopen)

        self._future = self._pool.submit(matching)

    def get(self) -> ExplainerBackend:
        return self._future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._future.exception() is None:
            self._future.result().close()


def _record(path: Path, backend: Backend, error: str | None = None) -> dict[str, Any]:
    return {
        "path": str(path),
        "label": None,
        "probs": None,
        "backend": backend.name,
        "precision": backend.precision,
        "error": error,
        "warnings": [],
    }


def _overlay_name(path: Path, index: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:80]
    return f"{index:05d}_{stem}.png"


def predict_stream(
    paths: list[Path],
    bundle: Bundle,
    backend: Backend,
    options: PredictOptions,
    explainer: ExplainerBackend | OpeningExplainer | None = None,
    known_errors: dict[Path, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yields records in input order; memory holds one batch of images at a time. ``known_errors``: inputs
    that failed before reading (a broken link, an unreadable folder) and the reason each gets in its
    record."""
    known_errors = known_errors or {}
    classes, size = bundle.card.classes, bundle.card.input.size
    if options.batch_size < 1:
        raise CxrUsageError("--batch-size must be at least 1")
    batch_size = min(options.batch_size, backend.limits.max_batch)
    get_explainer = explainer.get if isinstance(explainer, OpeningExplainer) else lambda: explainer
    bar = tqdm(
        total=len(paths), unit="img", desc="explain" if explainer else "predict", disable=len(paths) < 2
    )
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        records, images = [], []
        for path in chunk:
            record = _record(path, backend)
            try:
                if path in known_errors:
                    raise CxrError(known_errors[path])
                decoded = load_image(path, options.max_pixels)
                record["warnings"] = list(decoded.warnings)
                if decoded.warnings and options.strict:
                    raise CxrError(f"{path}: {'; '.join(decoded.warnings)} (--strict)")
                images.append(preprocess(decoded.gray, size, bundle.card.preprocessing))
            except CxrError as exc:
                record["error"] = one_line(exc)
                images.append(None)
            records.append(record)
        good = [i for i, im in enumerate(images) if im is not None]
        try:
            probs = backend.run(np.stack([images[i] for i in good])[:, None]) if good else []
        except CxrError as exc:  # a failed backend call (e.g. server down) fails this batch's files only
            for i in good:
                records[i]["error"] = str(exc)
            probs, good = [], []
        rows = dict(zip(good, probs))
        for i, record in enumerate(records):
            labelled = i in rows and _label(record, rows[i], classes, options.top_k)
            if labelled and explainer is not None and options.explain is not None:
                ready = get_explainer()  # outside the try: an explainer that cannot open stops the run
                try:
                    label = int(np.argmax(rows[i]))
                    record["explanation"] = _explain(
                        images[i], chunk[i], start + i, bundle, ready, options, label
                    )
                except CxrError as exc:
                    record["error"] = f"explanation failed: {exc}"
            bar.update(1)
            yield record
    bar.close()


def _label(record: dict[str, Any], row: np.ndarray, classes: list[str], top_k: int) -> bool:
    """Fill the record's label and probabilities from one output row; False (and an error) if not finite."""
    if not np.all(np.isfinite(row)):
        record["error"] = (
            f"{record['path']}: the model returned non-finite probabilities "
            "(damaged or tampered weights?); no label given"
        )
        return False
    record["label"] = classes[int(np.argmax(row))]
    record["probs"] = {c: round(float(p), 6) for c, p in zip(classes, row)}
    if top_k:
        order = np.argsort(-row)[:top_k]
        record["top_k"] = [[classes[j], round(float(row[j]), 6)] for j in order]
    return True


def _explain(
    image: np.ndarray,
    path: Path,
    index: int,
    bundle: Bundle,
    explainer: ExplainerBackend,
    options: PredictOptions,
    label: int,
) -> dict[str, Any]:
    """The map of ``label``, the class the record reports (not the explainer graph's own top class)."""
    config = options.explain
    explanation = explain_image(image, explainer, config, label=label)
    overlay = None
    if options.explain_dir is not None:
        started = time.perf_counter()
        target = options.explain_dir / _overlay_name(path, index)
        class_name = bundle.card.classes[explanation.label]
        overlay = str(save_overlay(target, image, explanation, class_name, config.num_features))
        explanation.timing["overlay_s"] = time.perf_counter() - started
    return explanation_record(explanation, bundle.card.classes, config, overlay)
