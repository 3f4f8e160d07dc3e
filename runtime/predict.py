"""Predict (and optionally explain) a stream of inputs in batches, one record per input, errors per input.

With explanations each record is yielded as soon as its map is done (not after its whole batch), and the
explainer may still be opening on a background thread while the first batch is read and classified: the
first answer comes as early as the slower of the two allows.
"""

from __future__ import annotations

import hashlib
import logging
import os
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
from cxr.runtime.ood import Gate
from cxr.runtime.output import record_path
from cxr.runtime.overlay import save_overlay
from cxr.runtime.preprocess import DEFAULT_MAX_PIXELS
from cxr.runtime.reading import Prepared, fault_line, prepare, prepared_in_order

__all__ = ["Prepared", "fault_line", "prepare"]  # reading's, used here and by serve
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PredictOptions:
    batch_size: int = 16
    top_k: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    explain: ExplainConfig | None = None
    explain_dir: Path | None = None
    strict: bool = False  # a warning (not a radiograph? colour? tiny?) fails the input instead
    bundle_digest: str = ""  # written into every record: what a resume matches
    protected: frozenset[tuple[int, int]] = frozenset()  # (device, inode) of inputs no overlay may replace
    gate: Gate | None = None  # the bundle's out-of-distribution gate (None: a bundle without one)
    workers: int = 1  # threads reading inputs ahead of the backend (cxr.runtime.reading)


@dataclass(kw_only=True)
class StageTimes:
    """Seconds spent in each stage of a run: reading (summed over the reading threads, which overlap the
    backend), and on this thread classifying (starting a batch and waiting for its answers), explaining and
    writing."""

    decode_s: float = 0.0
    preprocess_s: float = 0.0
    infer_s: float = 0.0
    explain_s: float = 0.0
    write_s: float = 0.0
    images: int = 0

    def per_image_ms(self) -> dict[str, float]:
        count = max(1, self.images)
        stages = ("decode_s", "preprocess_s", "infer_s", "explain_s", "write_s")
        return {name.removesuffix("_s"): round(1000 * getattr(self, name) / count, 3) for name in stages}


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


def _record(path: Path, backend: Backend, digest: str) -> dict[str, Any]:
    return {
        "path": record_path(path),
        "label": None,
        "probs": None,
        "backend": backend.name,
        "precision": backend.precision,
        "error": None,
        "warnings": [],
        "ood_score": None,
        "in_distribution": None,
        "bundle_digest": digest,
    }


def overlay_name(path: Path, options: PredictOptions) -> str:
    """``STEM_HASH.png``: the hash names this input (its absolute path), the bundle and the explanation's
    settings, so a later run, a resume or another input of the same name never takes over a record's map."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", record_path(path.stem))[:80]
    key = os.fsencode(os.path.abspath(path)) + repr((options.bundle_digest, options.explain)).encode()
    return f"{stem}_{hashlib.sha256(key).hexdigest()[:12]}.png"


Answer = tuple[np.ndarray, np.ndarray | None]  # one image's probabilities and gate features


def classify_outputs(backend: Backend, images: list[np.ndarray], paths: list[Path]) -> list[Answer | str]:
    """Probabilities and features (or the error) of each image: one backend call for the batch; when it
    fails, each image alone, so one image that breaks a call costs only its own record."""
    return Classifying(backend, images, paths).answers()


class Classifying:
    """A batch started on the backend (``Backend.start_outputs``): ``answers()`` waits for it, a fault of
    the batch (starting or running) retried image by image; ``drop()`` only waits, so the backend is never
    closed under a running batch."""

    def __init__(self, backend: Backend, images: list[np.ndarray], paths: list[Path]) -> None:
        self.backend, self.images, self.paths = backend, images, paths
        self._wait: Callable[[], tuple[np.ndarray, np.ndarray | None]] | None = None
        self._fault: Exception | None = None
        if images:
            try:
                self._wait = backend.start_outputs(np.stack(images)[:, None])
            except Exception as exc:
                self._fault = exc

    def _take(self) -> Callable[[], tuple[np.ndarray, np.ndarray | None]] | None:
        wait, self._wait = self._wait, None  # a started batch is waited for once
        return wait

    def answers(self) -> list[Answer | str]:
        wait = self._take()
        if wait is not None:
            try:
                probs, features = wait()
                return [(row, None if features is None else features[i]) for i, row in enumerate(probs)]
            except Exception as exc:
                self._fault = exc
        if self._fault is None:
            return []
        return _one_by_one(self.backend, self.images, self.paths, self._fault)

    def drop(self) -> None:
        wait = self._take()
        if wait is not None:
            try:
                wait()
            except Exception:  # noqa: S110  (its records are not written: the run is ending)
                pass


def _one_by_one(
    backend: Backend, images: list[np.ndarray], paths: list[Path], fault: Exception
) -> list[Answer | str]:
    """After a batch's ``fault``: each image alone, so one image that breaks a call costs only its record."""
    if len(images) == 1:
        return [_backend_fault(fault, paths[0])]
    log.debug("a batch of %d failed (%s); retrying image by image", len(images), one_line(fault, 200))
    results: list[Answer | str] = []
    for image, path in zip(images, paths):
        try:
            probs, features = backend.run_outputs(image[None, None])
            results.append((probs[0], None if features is None else features[0]))
        except Exception as exc:
            results.append(_backend_fault(exc, path))
    return results


def gate_records(
    gate: Gate | None,
    records: list[dict[str, Any]],
    answers: dict[int, Answer],
    stats: dict[int, Any],
    strict: bool,
) -> None:
    """Each labelled record's ``ood_score`` and ``in_distribution``; an input unlike the training films gets
    a warning, or with ``strict`` an error instead of its label. A bundle without a gate leaves them None."""
    if gate is None or not answers:
        return
    order = sorted(answers)
    features = [answers[i][1] for i in order]
    if gate.parts and any(f is None for f in features):
        _say_once(
            "the backend returns no features (a graph exported before gates?): records carry no ood_score"
        )
        return
    scores = gate.scores(
        None if any(f is None for f in features) else np.stack(features), np.stack([stats[i] for i in order])
    )
    for i, score in zip(order, scores):
        record = records[i]
        record["ood_score"] = round(float(score), 4)
        record["in_distribution"] = bool(score <= gate.threshold)
        if record["in_distribution"]:
            continue
        note = ood_note(float(score), gate.threshold)
        if strict:
            record.update(label=None, probs=None, error=f"{record['path']}: {note} (--strict)")
            record.pop("top_k", None)
        else:
            record["warnings"].append(note)


_said: set[str] = set()


def _say_once(text: str) -> None:
    if text not in _said:
        _said.add(text)
        log.warning(f"warning: {text}")


def ood_note(score: float, threshold: float) -> str:
    return (
        f"not like the training films (out-of-distribution score {score:.2f} above the gate's "
        f"{threshold:.2f}): is this a chest film?"
    )


def _backend_fault(exc: Exception, path: Path) -> str:
    if isinstance(exc, CxrError):  # e.g. a server that is down: its one line already says it all
        return one_line(exc)
    return fault_line(path, exc, "classifying")


@dataclass(kw_only=True)
class _Batch:
    """One batch from its start on the backend to its records."""

    paths: list[Path]
    prepared: list[Prepared]
    records: list[dict[str, Any]]
    classifying: Classifying


def predict_stream(
    paths: list[Path],
    bundle: Bundle,
    backend: Backend,
    options: PredictOptions,
    explainer: ExplainerBackend | OpeningExplainer | None = None,
    known_errors: dict[Path, str] | None = None,
    times: StageTimes | None = None,
) -> Iterator[dict[str, Any]]:
    """Yields records in input order; memory holds two batches of images at most. ``known_errors``: inputs
    that failed before reading (a broken link, an unreadable folder) and the reason each gets in its
    record. Any fault of one input (reading, classifying, explaining, writing its overlay) is that input's
    record; only an explainer that cannot open ends the stream (a fault of the run, not of an input).

    On a backend that ``runs_ahead`` (OpenVINO's parallel streams) a job without explanations starts each
    batch before it collects the one before: the backend's cores never wait for the host between batches
    (dpn92_se int8 at batch 8 beside the reading threads, 2-core Xeon: 62-64 img/s against 59-61 collected
    batch by batch; ``research/pipeline/ov_classifier_streams.py``)."""
    if options.batch_size < 1:
        raise CxrUsageError("--batch-size must be at least 1")
    batch_size = min(options.batch_size, backend.limits.max_batch)
    times = times if times is not None else StageTimes()
    ahead = max(2 * batch_size, options.workers)
    reading = prepared_in_order(
        paths, bundle.card, options.max_pixels, options.strict, known_errors, options.workers, ahead
    )
    bar = tqdm(
        total=len(paths),
        unit="img",
        desc="explain" if explainer else "predict",
        disable=len(paths) < 2 or not log.isEnabledFor(logging.INFO),
    )
    overlap = backend.runs_ahead and not (explainer is not None and options.explain)
    in_flight: _Batch | None = None
    try:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            previous, in_flight = in_flight, _start_batch(chunk, reading, backend, options, times)
            if previous is not None:
                yield from _finish_batch(previous, bundle, options, explainer, times, bar)
            if not overlap:
                current, in_flight = in_flight, None
                yield from _finish_batch(current, bundle, options, explainer, times, bar)
        if in_flight is not None:
            last, in_flight = in_flight, None
            yield from _finish_batch(last, bundle, options, explainer, times, bar)
    finally:
        if in_flight is not None:
            in_flight.classifying.drop()
        bar.close()
        reading.close()


def _start_batch(
    chunk: list[Path],
    reading: Iterator[Prepared],
    backend: Backend,
    options: PredictOptions,
    times: StageTimes,
) -> _Batch:
    """Read a batch (from the reading threads) and start it on the backend."""
    prepared = [next(reading) for _ in chunk]
    records = [_record(path, backend, options.bundle_digest) for path in chunk]
    for record, item in zip(records, prepared):
        record["warnings"], record["error"] = list(item.warnings), item.error
        times.decode_s += item.decode_s
        times.preprocess_s += item.preprocess_s
    good = [i for i, item in enumerate(prepared) if item.image is not None]
    started = time.perf_counter()
    classifying = Classifying(backend, [prepared[i].image for i in good], [chunk[i] for i in good])
    times.infer_s += time.perf_counter() - started
    return _Batch(paths=chunk, prepared=prepared, records=records, classifying=classifying)


def _finish_batch(
    batch: _Batch,
    bundle: Bundle,
    options: PredictOptions,
    explainer: ExplainerBackend | OpeningExplainer | None,
    times: StageTimes,
    bar: tqdm,
) -> Iterator[dict[str, Any]]:
    """Wait for a batch's answers, label, gate and explain its records, and yield them in order."""
    started = time.perf_counter()
    answers = batch.classifying.answers()
    times.infer_s += time.perf_counter() - started
    times.images += len(batch.paths)
    good = [i for i, item in enumerate(batch.prepared) if item.image is not None]
    records, classes = batch.records, bundle.card.classes
    rows: dict[int, Answer] = {}
    for i, answer in zip(good, answers):
        if isinstance(answer, str):
            records[i]["error"] = answer
        elif label_record(records[i], answer[0], classes, options.top_k):
            rows[i] = answer
    gate_records(options.gate, records, rows, {i: batch.prepared[i].stats for i in rows}, options.strict)
    get_explainer = explainer.get if isinstance(explainer, OpeningExplainer) else lambda: explainer
    for i, record in enumerate(records):
        if i in rows and record["label"] is not None and explainer is not None and options.explain:
            started = time.perf_counter()
            ready = get_explainer()  # outside the try: an explainer that cannot open stops the run
            image = batch.prepared[i].image
            label = int(np.argmax(rows[i][0]))
            _explain_into(record, image, batch.paths[i], bundle, ready, options, label)
            times.explain_s += time.perf_counter() - started
        bar.update(1)
        yield record


def _explain_into(
    record: dict[str, Any],
    image: np.ndarray,
    path: Path,
    bundle: Bundle,
    explainer: ExplainerBackend,
    options: PredictOptions,
    label: int,
) -> None:
    """The record's explanation, or its error: a map or an overlay that fails costs this input only. An input
    unlike the training films says so on its overlay."""
    note = None if record["in_distribution"] is not False else "NOT LIKE THE TRAINING FILMS"
    try:
        record["explanation"] = _explain(image, path, bundle, explainer, options, label, note)
    except Exception as exc:
        record["error"] = f"explanation failed: {fault_line(path, exc, 'explaining')}"


def label_record(record: dict[str, Any], row: np.ndarray, classes: tuple[str, ...], top_k: int = 0) -> bool:
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
    bundle: Bundle,
    explainer: ExplainerBackend,
    options: PredictOptions,
    label: int,
    note: str | None = None,
) -> dict[str, Any]:
    """The map of ``label``, the class the record reports (not the explainer graph's own top class);
    ``note`` is written on the overlay (an input unlike the training films says so in words)."""
    config = options.explain
    explanation = explain_image(image, explainer, config, label=label)
    overlay = None
    if options.explain_dir is not None:
        started = time.perf_counter()
        target = options.explain_dir / overlay_name(path, options)
        if _is_protected(target, options.protected):
            raise CxrError(f"{record_path(target)}: the overlay would replace an input; choose --explain-dir")
        class_name = bundle.card.classes[explanation.label]
        try:
            overlay = record_path(
                save_overlay(target, image, explanation, class_name, config.num_features, note)
            )
        except OSError as exc:
            raise CxrError(f"overlay {record_path(target)} not written ({exc.strerror or exc})") from None
        explanation.timing["overlay_s"] = time.perf_counter() - started
    return explanation_record(explanation, bundle.card.classes, config, overlay)


def _is_protected(target: Path, protected: frozenset[tuple[int, int]]) -> bool:
    try:
        info = os.stat(target)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) in protected
