"""OpenVINO backend (CPU): the bundle's ONNX graphs compiled by OpenVINO, for bedside machines without an
NVIDIA GPU. For dpn92_se on a 2-core AVX2 EPYC its fp32 runs at ONNX Runtime's speed (both near the host's
fp32 matrix rate: ``cxr-bench latency`` shows the share), and its int8 at about 0.7x ONNX Runtime's fp32,
where ONNX Runtime's own int8 is slower than its fp32.

``openvino`` is imported here only, when a graph is opened (``pip install 'cxr-edge[openvino]'``). Graphs are
read from their verified bytes and compiled for fixed shapes, one compiled model per shape, kept: the
classifier per power-of-two batch bucket, the explainer for its one padded LIME batch.

The explainer's batch is split over parallel OpenVINO streams (throughput mode): on the 2-core EPYC, a
dpn92_se explanation with 2 streams took 0.86x the time of one 2-thread stream, same weights, interleaved in
one process (``research/lime/ov_streams.py``, ``benchmarks/results/cpu-2core/lime-auto/dpn92_se-224``).
The classifier keeps latency mode: one image at a time is what a bedside request needs.

Parallel streams must give one stream's numbers. On the 2-core AVX2 EPYC (no VNNI, OpenVINO 2026.4), an int8
explainer compiled for 2 streams came out wrong in 1 to 2 process starts of 6-8, more often under load:
every row off by up to 0.37 (dpn92_se) or 0.98 (the test model) in probability against ONNX Runtime, for the
whole life of that compile, while one stream matched ONNX Runtime every time; fp32 never did this. So int8
runs one stream, and for the other precisions the open runs one probe batch both ways and keeps the streams
only if they agree (``STREAMS_AGREE``), else it runs one stream; the provider string says which.
"""

from __future__ import annotations

import importlib.util
import os
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
STREAMS_AGREE = 1e-4  # largest probability difference allowed between parallel streams and one stream


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def import_openvino() -> Any:
    return require("openvino", "the OpenVINO backend")


def explain_streams(cores: int | None = None, batch: int = EXPLAIN_BATCH) -> int:
    """Parallel streams for LIME batches: the largest power of two within the usable cores, at most
    EXPLAIN_STREAMS_MAX (each stream keeps a few threads and several rows), and dividing ``batch``."""
    if cores is None:  # the cores this process may use (no affinity call on macOS or Windows)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    streams = 1 << (max(1, min(cores, EXPLAIN_STREAMS_MAX, batch)).bit_length() - 1)
    while batch % streams:
        streams //= 2
    return streams


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
        self.path = path
        self._requests: dict[tuple, Any] = {}

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

    def queue(self, shapes: dict[str, tuple[int, ...]], streams: int) -> Any:
        """An AsyncInferQueue of ``streams`` requests on a throughput-mode model with that many streams."""
        key = (streams, *sorted(shapes.items()))
        if key not in self._requests:
            config = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(streams)}
            self._requests[key] = self.ov.AsyncInferQueue(self._compile(shapes, config), streams)
        return self._requests[key]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_outputs(feeds)[0]

    def run_outputs(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """The first output and, where the graph has it, the features output (copies: the request reuses
        its buffers)."""
        request = self.request({name: value.shape for name, value in feeds.items()})
        results = request.infer(feeds)
        first = np.array(results[0], dtype=np.float32)
        if FEATURES not in self.output_names:
            return first, None
        features = next(value for port, value in results.items() if FEATURES in port.get_names())
        return first, np.array(features, dtype=np.float32)

    def run_split(self, feeds: dict[str, np.ndarray], split: str, streams: int) -> np.ndarray:
        """``feeds[split]`` cut into ``streams`` equal parts, run side by side; outputs in row order."""
        if streams == 1:
            return self.run(feeds)
        parts = np.split(feeds[split], streams)
        queue = self.queue({**{n: v.shape for n, v in feeds.items()}, split: parts[0].shape}, streams)
        outputs: list[np.ndarray | None] = [None] * streams

        def keep(request: Any, index: int) -> None:
            outputs[index] = np.array(request.get_output_tensor(0).data, dtype=np.float32)

        queue.set_callback(keep)
        for index, part in enumerate(parts):
            queue.start_async({**feeds, split: part}, index)
        queue.wait_all()
        if any(output is None for output in outputs):
            raise CxrError(f"{self.path}: an OpenVINO stream returned no output")
        return np.concatenate(outputs)


class OvBackend(Backend):
    """Classifier; a short batch runs at a power-of-two bucket, each bucket compiled once."""

    name = "openvino"
    device = "cpu"

    def __init__(self, path: Path, precision: str, data: bytes | None = None, max_batch: int = 64) -> None:
        self.graph = _Compiled(path, data, precision)
        self.precision = precision
        self.provider = f"OpenVINO {self.graph.ov.__version__.split('-')[0]} {DEVICE} {self.graph.computes}"
        self.metadata = self.graph.metadata
        self.input_name = self.graph.model.inputs[0].get_any_name()
        self.limits = BatchLimits(1, max_batch)

    @property
    def features_width(self) -> int | None:
        if FEATURES not in self.graph.output_names:
            return None
        shape = self.graph.model.output(FEATURES).get_partial_shape()
        return int(shape[-1].get_length()) if shape[-1].is_static else None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._run_outputs(batch)[0]

    def _run_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        count = len(batch)
        padded = pad_rows(batch, bucket(count, self.limits))
        probs, features = self.graph.run_outputs({self.input_name: padded})
        return probs[:count], None if features is None else features[:count]


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
