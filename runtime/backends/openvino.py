"""OpenVINO backend (CPU): the bundle's ONNX graphs compiled by OpenVINO, for bedside machines without an
NVIDIA GPU. For dpn92_se on a 2-core AVX2 EPYC its fp32 runs at ONNX Runtime's speed (both near the host's
fp32 matrix rate: ``cxr-bench latency`` shows the share), and its int8 at about 0.7x ONNX Runtime's fp32,
where ONNX Runtime's own int8 is slower than its fp32.

``openvino`` is imported here only, when a graph is opened (``pip install 'cxr-edge[openvino]'``). Graphs are
read from their verified bytes and compiled for fixed shapes, one compiled model per shape, kept: the
classifier per power-of-two batch bucket, the explainer for its one padded LIME batch.

Batches are split over parallel OpenVINO streams (throughput mode). The explainer's:
on the 2-core EPYC, a dpn92_se explanation with 2 streams took 0.86x the time of one 2-thread stream, same
weights, interleaved in one process (``research/lime/ov_streams.py``,
``benchmarks/results/cpu-2core/lime-auto/dpn92_se-224``). The classifier's, when each stream gets at
least ``MIN_STREAM_ROWS`` images: on the 2-core Xeon with AMX, int8 dpn92_se at batch 8 ran 67-69 img/s on 2
streams (the batch in 4 parts) against 54-60 on one 2-thread stream, and beside predict's reading threads
62-64 img/s with the next batch started before the last is collected against 53-55 (interleaved, one
process: ``research/pipeline/ov_classifier_streams.py``,
``benchmarks/results/cpu-2core-amx/issue35/pipeline-ahead/``). One image, a bedside request, keeps latency
mode.

Parallel streams must give one stream's numbers. On the 2-core AVX2 EPYC (no VNNI, OpenVINO 2026.4), an int8
explainer compiled for 2 streams came out wrong in 1 to 2 process starts of 6-8, more often under load:
every row off by up to 0.37 (dpn92_se) or 0.98 (the test model) in probability against ONNX Runtime, for the
whole life of that compile, while one stream matched ONNX Runtime every time; fp32 never did this. So the
int8 explainer runs one stream. Every other split compile, the classifier's int8 included, runs one probe
batch both ways when it is made and is kept only if the streams give one stream's answers
(``STREAMS_AGREE``), else that batch size runs one stream; the provider string (explainer) or the run's
backend line (classifier) says which. (On the Xeon with AMX the two agree bit for bit at every precision.)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.backends.base import (
    FEATURES,
    IMAGE,
    PROBE_SEGMENTS,
    Backend,
    BatchLimits,
    ExplainerBackend,
    Z,
    bucket,
    grid_segments,
    image_feeds,
    pad_rows,
    z_columns,
)
from cxr.runtime.backends.registry import ONNX, BackendSpec, register
from cxr.runtime.cpu_features import bf16_refusal
from cxr.runtime.errors import CxrError, one_line
from cxr.runtime.formats import COMMON_PRECISIONS
from cxr.runtime.onnx_meta import onnx_metadata
from cxr.runtime.optional import require

DEVICE = "CPU"
EXPLAIN_BATCH = 32
EXPLAIN_STREAMS_MAX = 4
# OpenVINO computes in bf16 by default where the CPU has AVX512_BF16/AMX (f16 on some ARM): the graph that was
# validated as fp32 would then run at lower precision under an fp32 label. So every compile names its compute
# precision: f32, except for the bf16 format (the fp32 graph in bf16, held to its own parity result), which is
# refused on CPUs without the instructions and checked on the compiled model.
COMPUTE = {"bf16": "bf16"}  # precision -> INFERENCE_PRECISION_HINT; every other precision computes f32
# a classifier call's probabilities, and the gate's features where the graph has them
Outputs = tuple[np.ndarray, np.ndarray | None]
STREAMS_AGREE = 1e-4  # largest probability difference allowed between parallel streams and one stream
MIN_STREAM_ROWS = 4  # a classifier batch is split over streams only when each stream gets this many images
# A parallel compile that disagrees with one stream is compiled anew up to this many times in all: each
# compile is right or wrong for its whole life, and under load about half of int8's were wrong (2-core Xeon)
STREAM_COMPILES = 3
JOBS_PER_STREAM = 2  # ... in twice as many parts as streams (2 images a request ran as fast as 4: Xeon, int8)


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def import_openvino() -> Any:
    return require("openvino", "the OpenVINO backend")


def parallel_streams(rows: int, cores: int | None = None, min_rows: int = 1) -> int:
    """Streams for a batch of ``rows``: the largest power of two within the usable cores, at most
    EXPLAIN_STREAMS_MAX (each stream keeps a few threads), giving each stream at least ``min_rows`` rows, and
    dividing ``rows``."""
    if cores is None:  # the cores this process may use (no affinity call on macOS or Windows)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    streams = 1 << (max(1, min(cores, EXPLAIN_STREAMS_MAX, rows // min_rows)).bit_length() - 1)
    while rows % streams:
        streams //= 2
    return streams


def explain_streams(cores: int | None = None, batch: int = EXPLAIN_BATCH) -> int:
    """Parallel streams for LIME batches (``parallel_streams`` of the fixed batch)."""
    return parallel_streams(batch, cores)


class _Compiled:
    """One graph read once; compiled (and kept) for each input-shape set it is asked to run."""

    def __init__(self, path: Path, data: bytes | None, precision: str) -> None:
        refusal = bf16_refusal() if precision == "bf16" else None
        if refusal:
            raise CxrError(f"{path.name}: {refusal}")
        self.compute = COMPUTE.get(precision, "f32")
        # what the provider string says: an int8 graph's quantised layers run in int8, the rest in f32
        self.computes = "int8 + f32" if precision == "int8" else self.compute
        self.ov = import_openvino()
        self.core = self.ov.Core()
        data = path.read_bytes() if data is None else data
        try:
            self.model = self.core.read_model(data)
        except Exception as exc:
            raise CxrError(f"{path}: OpenVINO cannot read it: {one_line(exc, 200)}") from None
        self.metadata = onnx_metadata(data)
        self.output_names = {name for output in self.model.outputs for name in output.get_names()}
        # which output is the gate's features (None: a graph exported before them)
        self._features_at = next(
            (i for i, output in enumerate(self.model.outputs) if FEATURES in output.get_names()), None
        )
        self.path = path
        self._requests: dict[tuple, Any] = {}  # shapes -> the latency-mode compile's request
        # (streams, parts, shapes) -> a throughput-mode compile and its idle request sets, one request a part
        self._parallel: dict[tuple, tuple[Any, list[list[Any]]]] = {}

    def _compile(self, shapes: dict[str, tuple[int, ...]], config: dict[str, str]) -> Any:
        model = self.model.clone()
        model.reshape({name: list(shape) for name, shape in shapes.items()})
        try:
            compiled = self.core.compile_model(
                model, DEVICE, {"INFERENCE_PRECISION_HINT": self.compute, **config}
            )
        except Exception as exc:
            raise CxrError(
                f"{self.path}: OpenVINO cannot compile it for {shapes}: {one_line(exc, 160)}"
            ) from None
        computes = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # an openvino.Type
        if computes != self.compute:
            raise CxrError(f"{self.path.name}: OpenVINO computes {computes} where {self.compute} was asked")
        return compiled

    @staticmethod
    def _latency_key(shapes: dict[str, tuple[int, ...]]) -> tuple:
        return tuple(sorted(shapes.items()))

    def request(self, shapes: dict[str, tuple[int, ...]]) -> Any:
        key = self._latency_key(shapes)
        if key not in self._requests:
            self._requests[key] = self._compile(
                shapes, {"PERFORMANCE_HINT": "LATENCY"}
            ).create_infer_request()
        return self._requests[key]

    def forget(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Drop the latency-mode compile for ``shapes`` (its memory), if there is one."""
        self._requests.pop(self._latency_key(shapes), None)

    def forget_parallel(self, shapes: dict[str, tuple[int, ...]], streams: int, jobs: int) -> None:
        """Drop the parallel compile for ``shapes`` (a part's), if there is one."""
        self._parallel.pop((streams, jobs, *sorted(shapes.items())), None)

    def _request_set(self, shapes: dict[str, tuple[int, ...]], streams: int, jobs: int) -> tuple[tuple, list]:
        """An idle set of ``jobs`` requests of the throughput-mode compile with ``streams`` streams for
        ``shapes`` (compiled once; a new set when every set is busy with a batch still running)."""
        key = (streams, jobs, *sorted(shapes.items()))
        if key not in self._parallel:
            config = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(streams)}
            self._parallel[key] = (self._compile(shapes, config), [])
        compiled, idle = self._parallel[key]
        return key, idle.pop() if idle else [compiled.create_infer_request() for _ in range(jobs)]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_outputs(feeds)[0]

    def run_outputs(self, feeds: dict[str, np.ndarray]) -> Outputs:
        """The first output and, where the graph has it, the features output (copies: the request reuses
        its buffers)."""
        request = self.request({name: value.shape for name, value in feeds.items()})
        request.infer(feeds)
        return self._outputs_of(request)

    def _outputs_of(self, request: Any) -> Outputs:
        first = np.array(request.get_output_tensor(0).data, dtype=np.float32)
        if self._features_at is None:
            return first, None
        return first, np.array(request.get_output_tensor(self._features_at).data, dtype=np.float32)

    def run_split(self, feeds: dict[str, np.ndarray], split: str, streams: int) -> np.ndarray:
        return self.run_split_outputs(feeds, split, streams)[0]

    def run_split_outputs(
        self, feeds: dict[str, np.ndarray], split: str, streams: int, jobs: int | None = None
    ) -> Outputs:
        """``start_split`` and wait for it."""
        return self.start_split(feeds, split, streams, jobs)()

    def start_split(
        self, feeds: dict[str, np.ndarray], split: str, streams: int, jobs: int | None = None
    ) -> Callable[[], Outputs]:
        """Start ``feeds[split]`` cut into ``jobs`` (default ``streams``) equal parts on ``streams`` parallel
        streams; the returned call waits and gives the outputs in row order. More parts than streams
        balance the streams: one that a reading thread slowed takes fewer parts, instead of the other's core
        idling at the end of the batch; and a batch started before the last is collected keeps both busy
        across batches."""
        jobs = jobs or streams
        if jobs == 1:
            outputs = self.run_outputs(feeds)
            return lambda: outputs
        parts = np.split(feeds[split], jobs)
        key, requests = self._request_set(
            {**{n: v.shape for n, v in feeds.items()}, split: parts[0].shape}, streams, jobs
        )
        # no completion callback: a Python callback needs the GIL, which a reading thread may hold for a
        # switch interval (5 ms) while the stream waits
        for request, part in zip(requests, parts):
            request.start_async({**feeds, split: part})

        def outputs() -> Outputs:
            try:
                for request in requests:
                    request.wait()
                done = [self._outputs_of(request) for request in requests]
            finally:
                if key in self._parallel:
                    self._parallel[key][1].append(requests)
            features = [f for _, f in done]
            joined = None if any(f is None for f in features) else np.concatenate(features)
            return np.concatenate([p for p, _ in done]), joined

        return outputs


class OvBackend(Backend):
    """Classifier; a short batch runs at a power-of-two bucket, each bucket compiled once; a bucket with at
    least ``MIN_STREAM_ROWS`` images a stream runs on parallel streams once they gave one stream's answers."""

    name = "openvino"
    device = "cpu"
    runs_ahead = True

    def __init__(self, path: Path, precision: str, data: bytes | None = None, max_batch: int = 64) -> None:
        self.graph = _Compiled(path, data, precision)
        self.precision = precision
        self.provider = f"OpenVINO {self.graph.ov.__version__.split('-')[0]} {DEVICE} {self.graph.computes}"
        self.metadata = self.graph.metadata
        self.input_name = self.graph.model.inputs[0].get_any_name()
        self.limits = BatchLimits(1, max_batch)
        self._streams: dict[int, tuple[int, int, str]] = {}  # rows -> (streams, parts, why one stream)

    @property
    def features_width(self) -> int | None:
        if FEATURES not in self.graph.output_names:
            return None
        shape = self.graph.model.output(FEATURES).get_partial_shape()
        return int(shape[-1].get_length()) if shape[-1].is_static else None

    def ready_for(self, batch: int) -> str:
        """Compile (and check) what batches of ``batch`` images run on, before the first input."""
        rows = bucket(min(batch, self.limits.max_batch), self.limits)
        self._run_outputs(np.zeros((rows, 1, *self._image_shape()), dtype=np.uint8))
        streams, _, why = self._streams[rows]
        plural = "s" * (streams > 1)
        return f"batches of {rows} on {streams} stream{plural}{why}"

    def _image_shape(self) -> tuple[int, int]:
        shape = self.graph.model.inputs[0].get_partial_shape()
        if not (shape[-1].is_static and shape[-2].is_static):
            raise CxrError(f"{self.graph.path}: the classifier's image input has no fixed size ({shape})")
        return int(shape[-2].get_length()), int(shape[-1].get_length())

    def streams_for(self, rows: int) -> tuple[int, int]:
        """(streams, parts) for a call of ``rows`` images, decided the first time by a probe batch both
        ways."""
        if rows not in self._streams:
            streams = parallel_streams(rows, min_rows=MIN_STREAM_ROWS)
            parts = streams * JOBS_PER_STREAM
            jobs = parts if streams > 1 and rows % parts == 0 else streams
            differ = None
            for _ in range(STREAM_COMPILES if streams > 1 else 0):
                differ = self._streams_differ(rows, streams, jobs)
                if differ is None:
                    break
                job_shape = (rows // jobs, 1, *self._image_shape())
                self.graph.forget_parallel({self.input_name: job_shape}, streams, jobs)  # compile anew
            self._streams[rows] = (streams, jobs, "") if differ is None else (1, 1, f" ({differ})")
        return self._streams[rows][:2]

    def _streams_differ(self, rows: int, streams: int, jobs: int, seed: int = 0) -> str | None:
        """A seeded random batch of ``rows`` on the parallel streams and, one image at a time, on the one
        stream the open's known answers ran on: None if no probability or feature differs by more than
        STREAMS_AGREE (features relative to their largest value), else what differed."""
        rng = np.random.default_rng(seed)
        pixels = rng.integers(0, 256, (rows, 1, *self._image_shape()), dtype=np.uint8)
        parallel = self.graph.run_split_outputs({self.input_name: pixels}, self.input_name, streams, jobs)
        singles = [self.graph.run_outputs({self.input_name: image[None]}) for image in pixels]
        probs = np.abs(parallel[0] - np.concatenate([p for p, _ in singles])).max()
        features = 0.0
        if parallel[1] is not None:
            single_features = np.concatenate([f for _, f in singles])
            scale = max(1.0, float(np.abs(single_features).max()))
            features = float(np.abs(parallel[1] - single_features).max()) / scale
        if probs <= STREAMS_AGREE and features <= STREAMS_AGREE:
            return None
        return (
            f"{streams} parallel streams disagreed with one stream on a probe batch in {STREAM_COMPILES} "
            f"compiles, the last by max |dprob| {probs:.2g}, features {features:.2g} of their largest"
        )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._run_outputs(batch)[0]

    def _run_outputs(self, batch: np.ndarray) -> Outputs:
        return self._start_outputs(batch)()

    def _start_outputs(self, batch: np.ndarray) -> Callable[[], Outputs]:
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        count = len(batch)
        padded = pad_rows(batch, bucket(count, self.limits))
        streams, jobs = self.streams_for(len(padded))
        wait = self.graph.start_split({self.input_name: padded}, self.input_name, streams, jobs)

        def outputs() -> Outputs:
            probs, features = wait()
            return probs[:count], None if features is None else features[:count]

        return outputs


class OvExplainer(ExplainerBackend):
    """LIME batches at one fixed shape (``batch x 64k`` on/off rows), split over ``streams`` parallel streams;
    image, fill and segments kept per image."""

    name = "openvino"
    device = "cpu"

    def __init__(
        self, path: Path, precision: str, data: bytes | None = None, max_batch: int = EXPLAIN_BATCH
    ) -> None:
        self.graph = _Compiled(path, data, precision)
        self.precision = precision
        self.metadata = self.graph.metadata
        self.limits = BatchLimits(1, max_batch)
        self.bytes_sent = 0
        self._feeds: dict[str, np.ndarray] = {}
        self.streams, why = explain_streams(batch=max_batch), ""
        if precision == "int8" and self.streams > 1:
            self.streams, why = 1, " (int8: parallel int8 streams gave wrong rows on an AVX2 CPU)"
        elif self.streams > 1 and not self.streams_agree(self.image_size()):
            self.streams, why = 1, " (parallel streams disagreed with one stream on a probe batch)"
        version = self.graph.ov.__version__.split("-")[0]
        plural = "s" * (self.streams > 1)
        self.provider = (
            f"OpenVINO {version} {DEVICE} {self.graph.computes}, {self.streams} stream{plural}{why}"
        )

    def image_size(self) -> int:
        """The side of the explainer graph's fixed 1 x 1 x S x S image input."""
        shape = self.graph.model.input(IMAGE).get_partial_shape()
        if not shape.is_static:
            raise CxrError(f"{self.graph.path}: the explainer's image input has no fixed size ({shape})")
        return int(shape[-1].get_length())

    def _set_image(self, image: np.ndarray, fill: np.ndarray, segments: np.ndarray) -> None:
        self._feeds = image_feeds(image, fill, segments)
        self.columns = z_columns(int(segments.max()) + 1)
        self.bytes_sent += sum(v.nbytes for v in self._feeds.values())

    def _run(self, z: np.ndarray) -> np.ndarray:
        return self.graph.run_split({**self._feeds, Z: self.fixed_block(z)}, Z, self.streams)[: len(z)]

    def streams_agree(self, size: int, seed: int = 0) -> bool:
        """One probe batch (a seeded random image, 16 segments, random rows) on the parallel streams and on
        one stream: True if no probability differs by more than STREAMS_AGREE. The one-stream compile is
        kept only when it is needed (they disagree)."""
        rng = np.random.default_rng(seed)
        image = rng.integers(0, 256, (size, size), dtype=np.uint8)
        self.set_image(image, np.full_like(image, 128), grid_segments(size))
        rows = rng.integers(0, 2, (self.limits.max_batch, PROBE_SEGMENTS), dtype=np.uint8)
        block = self.fixed_block(rows)
        feeds = {**self._feeds, Z: block}
        parallel = self.graph.run_split(feeds, Z, self.streams)
        single = self.graph.run(feeds)
        self.bytes_sent = 0
        agree = bool(np.abs(parallel - single).max() <= STREAMS_AGREE)
        if agree and self.streams > 1:
            self.graph.forget({name: value.shape for name, value in feeds.items()})
        return agree


register(
    BackendSpec(
        name="openvino",
        title="OpenVINO",
        runs=ONNX,
        device="cpu",
        rank=30,
        classifier=OvBackend,
        explainer=OvExplainer,
        available=lambda: openvino_available(),
        requires="openvino",
        parity_prefix="openvino",
        precisions=(*COMMON_PRECISIONS, "bf16"),
        # Xeon with AMX, dpn92_se b1: int8 20 ms, bf16 ~21 ms, fp32 = fp16 67 ms (fp16 computes in f32)
        fastest_first=("int8", "bf16", "fp32"),
        refuses=lambda precision: bf16_refusal() if precision == "bf16" else None,
    )
)
