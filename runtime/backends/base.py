"""The backend interface: probabilities for a uint8 batch, and LIME batches for one image at a time.

Accelerators tune their kernels per input shape (cuDNN's algorithm search, TensorRT profiles, CUDA
graphs), so the helpers here keep shapes fixed: a short batch is padded and the result sliced.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# The graphs' tensor names: the runtime binds them, the exporter (cxr.export.graphs) writes them.
IMAGE, FILL, SEGMENTS, Z, PROBS, FEATURES = "image", "fill", "segments", "z", "probs", "features"
# features: what the out-of-distribution gate reads (cxr.runtime.ood); graphs exported before it lack them
CLASSIFIER_INPUTS, CLASSIFIER_OUTPUTS = (IMAGE,), (PROBS, FEATURES)
EXPLAINER_INPUTS, EXPLAINER_OUTPUTS = (IMAGE, FILL, SEGMENTS, Z), (PROBS,)
Z_COLUMNS = 64  # explainer rows are padded to a multiple of this many segment columns (~50 SLIC segments fit)


@dataclass(frozen=True)
class BatchLimits:
    min_batch: int = 1
    max_batch: int = 64


def pad_rows(batch: np.ndarray, rows: int) -> np.ndarray:
    """Append copies of the last row until ``batch`` has ``rows`` rows (their results are sliced off)."""
    if len(batch) >= rows:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], rows - len(batch), axis=0)])


def bucket(count: int, limits: BatchLimits) -> int:
    """The fixed batch size a call of ``count`` images runs at: the next power of two within the limits.

    A handful of shapes (1, 2, 4, ... max) means a handful of algorithm searches, paid once each.
    """
    if count >= limits.max_batch:
        return count
    return min(limits.max_batch, max(limits.min_batch, 1 << (count - 1).bit_length()))


def z_columns(segments: int) -> int:
    """Width of the padded on/off rows: 64 for up to 64 segments, else the next multiple of 64."""
    return max(Z_COLUMNS, -(-segments // Z_COLUMNS) * Z_COLUMNS)


def pad_z(z: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """On/off rows as a fixed ``rows x columns`` uint8 block. Extra columns name no segment, so they change
    nothing; extra rows (all off) are computed and sliced away."""
    if z.shape[1] > columns or len(z) > rows:
        raise ValueError(f"z of shape {z.shape} does not fit {rows} x {columns}")
    block = np.zeros((rows, columns), dtype=np.uint8)
    block[: len(z), : z.shape[1]] = z
    return block


PROBE_SEGMENTS = 16


def grid_segments(size: int, count: int = PROBE_SEGMENTS) -> np.ndarray:
    """A size x size segment map of ``count`` equal horizontal bands (0..count-1): the segments of the
    warm-up and probe batches, which need a valid map but no real image."""
    return (np.arange(size * size, dtype=np.int64).reshape(size, size) * count // (size * size)).astype(
        np.int32
    )


@dataclass(frozen=True)
class ExplainerProbe:
    """One explainer call at open (``ExplainerBackend.warm_up``): image and fill (H x W uint8), the segment
    map (H x W integers) and on/off rows ``z`` (rows x segments uint8). ``cxr.runtime.known_answers`` makes
    the one whose answers the card records."""

    image: np.ndarray
    fill: np.ndarray
    segments: np.ndarray
    z: np.ndarray


def image_feeds(image: np.ndarray, fill: np.ndarray, segments: np.ndarray) -> dict[str, np.ndarray]:
    """The per-image explainer inputs as every explainer graph takes them: 1x1xHxW uint8 twice, HxW int32."""
    size = image.shape[-2:]
    return {
        IMAGE: np.ascontiguousarray(image.reshape(1, 1, *size), dtype=np.uint8),
        FILL: np.ascontiguousarray(fill.reshape(1, 1, *size), dtype=np.uint8),
        SEGMENTS: np.ascontiguousarray(segments, dtype=np.int32),
    }


CONTRACT_FIELDS = ("name", "precision", "device", "provider", "metadata", "limits")


class _SealedAfterInit(ABCMeta):
    """Seals a backend when its ``__init__`` returns: what it said it is (name, precision, limits ...) stays
    so."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        instance = super().__call__(*args, **kwargs)
        object.__setattr__(instance, "_sealed", True)
        return instance


class _Contract(metaclass=_SealedAfterInit):
    """What every classifier and explainer backend tells its users, fixed once it is open; a context
    manager."""

    name: str = ""
    precision: str = ""
    device: str = "cpu"  # where it runs: cpu, cuda, server (shown in reports)
    provider: str = ""  # what runs it there, e.g. CUDAExecutionProvider, TensorRT 10.13
    metadata: dict[
        str, str
    ] = {}  # the graph's cxr.* metadata (classes, input, preprocessing), where it has one
    limits: BatchLimits = BatchLimits()

    def __setattr__(self, key: str, value: Any) -> None:
        if key in CONTRACT_FIELDS and getattr(self, "_sealed", False):
            raise AttributeError(f"{type(self).__name__}.{key} is fixed once the backend is open")
        super().__setattr__(key, value)

    def close(self) -> None:  # noqa: B027  (optional hook)
        pass

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_uint8(value: Any, what: str, ndim: int) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != ndim:
        got = (
            f"{value.dtype} with {value.ndim} dims" if isinstance(value, np.ndarray) else type(value).__name__
        )
        raise ValueError(f"{what} must be a uint8 array with {ndim} dims, got {got}")
    return value


class Backend(_Contract):
    """Classifier: ``run(N x 1 x S x S uint8) -> N x classes float32``, N within ``limits``; checked here once
    for every backend, which implements ``_run``."""

    runs_ahead: bool = False  # start_outputs returns while the batch runs: predict keeps one in flight

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_outputs(batch)[0]

    def run_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and, where the graph emits them, the out-of-distribution gate's features (else
        None), from one call."""
        self._check_batch(batch)
        return self._run_outputs(batch)

    def start_outputs(self, batch: np.ndarray) -> Callable[[], tuple[np.ndarray, np.ndarray | None]]:
        """``run_outputs`` started: the returned call waits for and gives its outputs (and raises its
        fault). A backend that can run a batch while the host reads the next (OpenVINO's parallel streams)
        returns at once; the others have run it before returning."""
        self._check_batch(batch)
        return self._start_outputs(batch)

    def _start_outputs(self, batch: np.ndarray) -> Callable[[], tuple[np.ndarray, np.ndarray | None]]:
        outputs = self._run_outputs(batch)
        return lambda: outputs

    def _check_batch(self, batch: np.ndarray) -> None:
        _check_uint8(batch, "a classifier batch", 4)
        if batch.shape[1] != 1 or batch.shape[2] != batch.shape[3]:
            raise ValueError(f"a classifier batch is N x 1 x S x S, got {batch.shape}")
        if not 1 <= len(batch) <= self.limits.max_batch:
            raise ValueError(f"{len(batch)} images exceed this backend's batch of 1..{self.limits.max_batch}")

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray: ...

    def _run_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Backends whose graphs emit features override this (and ``_run`` returns its first item)."""
        return self._run(batch), None

    def run_chunked(self, batch: np.ndarray) -> np.ndarray:
        """Split a batch to fit the backend's limits."""
        return self.run_outputs_chunked(batch)[0]

    def run_outputs_chunked(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``run_outputs`` on a batch of any size, split to fit the backend's limits."""
        step = self.limits.max_batch
        parts = [self.run_outputs(batch[i : i + step]) for i in range(0, len(batch), step)]
        features = [f for _, f in parts]
        joined = None if any(f is None for f in features) else np.concatenate(features)
        return np.concatenate([p for p, _ in parts]), joined

    @property
    def features_width(self) -> int | None:
        """How many gate features the graph emits per image (None: a graph exported before them)."""
        return None

    def ready_for(self, batch: int) -> str:
        """Make calls of ``batch`` images ready before the first input, so a job's open pays for what its
        first batch would (OpenVINO compiles each batch shape); returns what the run's backend line should
        add ('' for nothing)."""
        return ""


class ExplainerBackend(_Contract):
    """LIME: ``set_image`` sends image, fill and segment map once; ``run(z)`` sends only on/off rows.

    ``run`` takes at most ``limits.max_batch`` rows and always executes that fixed batch (padded). Inputs are
    checked here for every backend, which implements ``_set_image`` and ``_run`` and owes, checked here too:
    - ``_set_image`` sets ``columns``, the width of the padded on/off rows for this image (at least
      ``segment_count``, which is set before it is called; ``z_columns`` gives the usual width);
    - both add to ``bytes_sent`` every byte they send to the device, never reset it (``fixed_block`` counts
      the rows), so a report can say what an explanation moved;
    - ``_run`` returns one row of class probabilities per row of ``z``.
    """

    bytes_sent: int = 0
    columns: int = 0  # width of the padded on/off rows for the current image (0: set_image not called yet)
    segment_count: int = 0

    def set_image(self, image: np.ndarray, fill: np.ndarray, segments: np.ndarray) -> None:
        self._check_inputs(image, fill, segments)
        self.segment_count = int(segments.max()) + 1
        self.columns, sent = 0, self.bytes_sent
        self._set_image(image, fill, segments)
        if self.columns < self.segment_count:
            raise TypeError(
                f"{type(self).__name__}._set_image must set columns, the width of its on/off rows (at least "
                f"the image's {self.segment_count} segments; z_columns() gives it), got {self.columns}"
            )
        self._check_bytes(sent, "_set_image")

    def _check_bytes(self, before: int, step: str) -> None:
        if not isinstance(self.bytes_sent, (int, np.integer)) or self.bytes_sent < before:
            raise TypeError(
                f"{type(self).__name__}.{step} must add what it sends to bytes_sent, never reset it "
                f"({before} before, {self.bytes_sent!r} after)"
            )

    @staticmethod
    def _check_inputs(image: np.ndarray, fill: np.ndarray, segments: np.ndarray) -> None:
        _check_uint8(image, "the image", 2)
        _check_uint8(fill, "the fill image", 2)
        if fill.shape != image.shape or getattr(segments, "shape", None) != image.shape:
            raise ValueError(
                f"image, fill and segments must share one H x W, got {image.shape}, {fill.shape}, "
                f"{getattr(segments, 'shape', None)}"
            )
        if not np.issubdtype(segments.dtype, np.integer) or segments.min() < 0:
            raise ValueError("segments must be non-negative integer labels")

    def run(self, z: np.ndarray) -> np.ndarray:
        _check_uint8(z, "on/off rows z", 2)
        if not self.columns:
            raise RuntimeError("set_image() must come before run()")
        if not 1 <= len(z) <= self.limits.max_batch or z.shape[1] > self.columns:
            raise ValueError(f"z of shape {z.shape} does not fit 1..{self.limits.max_batch} x {self.columns}")
        sent = self.bytes_sent
        probs = self._run(z)
        if getattr(probs, "ndim", 0) != 2 or len(probs) != len(z):
            raise TypeError(
                f"{type(self).__name__}._run must return one row of probabilities per row of z ({len(z)}), "
                f"got shape {getattr(probs, 'shape', None)}"
            )
        self._check_bytes(sent, "_run")
        return probs

    @abstractmethod
    def _set_image(self, image: np.ndarray, fill: np.ndarray, segments: np.ndarray) -> None: ...

    @abstractmethod
    def _run(self, z: np.ndarray) -> np.ndarray: ...

    def fixed_block(self, z: np.ndarray) -> np.ndarray:
        """``z`` as the one fixed ``max_batch x columns`` block every call runs (counted in
        ``bytes_sent``)."""
        block = pad_z(np.asarray(z, dtype=np.uint8), self.limits.max_batch, self.columns)
        self.bytes_sent += block.nbytes
        return block

    def warm_up(self, size: int, runs: int = 1, probe: ExplainerProbe | None = None) -> np.ndarray:
        """Full padded batches, so per-shape tuning happens at open, not on the first patient; returns the
        last run's probabilities. ``probe``: what to run (the known-answer probe, whose answers the caller
        judges); without one, a blank image, whose outputs must be finite."""
        judged = probe is not None
        if probe is None:
            blank = np.zeros((size, size), dtype=np.uint8)
            ones = np.ones((1, PROBE_SEGMENTS), dtype=np.uint8)
            probe = ExplainerProbe(blank, blank, grid_segments(size), ones)
        self.set_image(probe.image, probe.fill, probe.segments)
        step = self.limits.max_batch
        for _ in range(runs):
            probs = np.concatenate([self.run(probe.z[i : i + step]) for i in range(0, len(probe.z), step)])
        if not judged and not np.all(np.isfinite(probs)):
            raise RuntimeError("the explainer returned non-finite probabilities on a blank image")
        self.bytes_sent = 0
        return probs
