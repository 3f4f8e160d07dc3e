"""Reading inputs for the network: one input's decode and preprocessing (``prepare``), and a pool of threads
that keeps a bounded number of inputs ready ahead of the backend (``prepared_in_order``).

Decoding a multi-megapixel film costs as much as classifying it on a CPU; on the same thread it halved
throughput on big films. The pool overlaps it with the backend's calls (OpenCV, Pillow, ONNX Runtime and
OpenVINO release the GIL), keeps at most ``ahead`` inputs in memory whatever the folder's size, and hands
them over in input order. Whatever goes wrong reading one input is that input's ``error``, never raised.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cxr.runtime.card import Card
from cxr.runtime.errors import CxrError, one_line
from cxr.runtime.ood import image_stats
from cxr.runtime.output import record_path
from cxr.runtime.preprocess import decode, load_image, preprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """One input made ready for the network: its image, or the one line that says why it cannot be."""

    image: np.ndarray | None
    warnings: tuple[str, ...] = ()
    error: str | None = None
    stats: np.ndarray | None = None  # the decoded film's statistics (the gate's image part)
    decode_s: float = 0.0  # reading and decoding the file
    preprocess_s: float = 0.0  # the card's steps (crop, CLAHE, resize, border) and the gate's statistics


def fault_line(path: Path | str, exc: BaseException, step: str) -> str:
    """One input's fault as its record's one line, cause first. Our own errors already read so; any other
    exception (a decoder's, a bug's) is named by its type, and its traceback goes to the debug log."""
    if isinstance(exc, CxrError):
        return one_line(exc)
    log.debug("%s: %s failed", record_path(path), step, exc_info=exc)
    return f"{record_path(path)}: {step} failed: {type(exc).__name__}: {one_line(exc, 200)}"


def prepare(source: Path | bytes, name: str, card: Card, max_pixels: int, strict: bool = False) -> Prepared:
    """Decode and preprocess a file (a path) or a request's encoded bytes with the card's steps. Whatever goes
    wrong is this input's fault only: it comes back as ``error``, never raised. ``strict``: a warning (not a
    radiograph? colour? tiny?) fails the input."""
    notes: tuple[str, ...] = ()
    started = time.perf_counter()
    decoded_at = started
    try:
        window = card.preprocessing.dicom_window
        if isinstance(source, bytes):
            decoded = decode(source, name, max_pixels=max_pixels, dicom_window=window)
        else:
            decoded = load_image(source, max_pixels, dicom_window=window)
        decoded_at = time.perf_counter()
        notes = decoded.warnings
        if notes and strict:
            raise CxrError(f"{name}: {'; '.join(notes)} (--strict)")
        image = preprocess(decoded.gray, card.input.size, card.preprocessing)
        stats = image_stats(decoded.gray, decoded.colour)
        done = time.perf_counter()
        return Prepared(
            image=image,
            warnings=notes,
            stats=stats,
            decode_s=decoded_at - started,
            preprocess_s=done - decoded_at,
        )
    except Exception as exc:
        return Prepared(
            image=None, warnings=notes, error=fault_line(name, exc, "reading"), decode_s=decoded_at - started
        )


def default_workers() -> int:
    """Reading threads: one per usable core (the backend's own threads use the cores between its calls),
    at least 1, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


def prepared_in_order(
    paths: list[Path],
    card: Card,
    max_pixels: int,
    strict: bool = False,
    known_errors: dict[Path, str] | None = None,
    workers: int = 1,
    ahead: int = 32,
) -> Iterator[Prepared]:
    """Every input prepared, in input order: by ``workers`` threads with at most ``ahead`` in flight, or on
    this thread when ``workers`` is 1. ``known_errors``: inputs that failed before reading."""
    known_errors = known_errors or {}

    def one(path: Path) -> Prepared:
        if path in known_errors:
            return Prepared(image=None, error=known_errors[path])
        return prepare(path, record_path(path), card, max_pixels, strict)

    if workers <= 1:
        yield from (one(path) for path in paths)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="read")
    pending: deque[Future] = deque()
    remaining = iter(paths)
    try:
        for path in remaining:
            pending.append(pool.submit(one, path))
            if len(pending) >= max(ahead, workers):
                break
        while pending:
            result = pending.popleft().result()
            following = next(remaining, None)
            if following is not None:
                pending.append(pool.submit(one, following))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an interrupt waits for the reads under way only
