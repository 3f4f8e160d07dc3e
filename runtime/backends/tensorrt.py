"""TensorRT engine backend (TensorRT 10.x and 11.x) with cuda-python buffers.

``tensorrt`` and ``cuda`` are imported here only, when an engine is opened. Pinned host and device
buffers are sized from the optimisation profile's max shapes; one stream; async copies around
``execute_async_v3``; everything is freed by ``close()`` (context manager), not in ``__del__``.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.backends.base import (
    FEATURES,
    PROBS,
    Backend,
    BatchLimits,
    ExplainerBackend,
    Z,
    bucket,
    image_feeds,
    pad_rows,
    z_columns,
)
from cxr.runtime.backends.registry import ENGINE, BackendSpec, register
from cxr.runtime.card import ENGINE_LABEL
from cxr.runtime.engine_sidecar import check_sidecar, read_sidecar
from cxr.runtime.errors import CxrError
from cxr.runtime.optional import require


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("cuda") is not None


def import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        return require("cuda.cudart", "the TensorRT backend")  # older cuda-python
    return cudart


def import_tensorrt() -> Any:
    return require("tensorrt", "the TensorRT backend")


def cuda_call(result: Any) -> Any:
    """Unwrap cuda-python's ``(err, *values)`` tuples; raise with the error's name."""
    cudart = import_cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != int(cudart.cudaError_t.cudaSuccess):
        name = cudart.cudaGetErrorName(err)[1]
        raise RuntimeError(f"CUDA call failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def device_facts() -> dict[str, str]:
    """GPU name and compute capability of device 0, as the sidecar records them."""
    cudart = import_cudart()
    props = cuda_call(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu_name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def check_call(ok: bool, what: str) -> None:
    """TensorRT's setters answer False instead of raising; a False here would run on stale shapes or
    addresses."""
    if not ok:
        raise CxrError(f"TensorRT refused {what}")


class TrtEngine:
    """A deserialised plan with its buffers; ``infer`` copies only the inputs it is given.

    Everything allocated is released by ``close()`` (also when ``__init__`` fails halfway), after the stream
    has finished with it.
    """

    def __init__(self, plan: Path, data: bytes | None = None) -> None:
        self.buffers: dict[str, tuple[int, int, np.ndarray]] = {}  # name -> (device ptr, nbytes, host view)
        self._host_ptrs: list[Any] = []
        self.stream: Any = None
        self.context: Any = None
        self.engine: Any = None
        self.cudart = import_cudart()
        try:
            self._open(plan, plan.read_bytes() if data is None else data)
        except BaseException:
            self.close()
            raise

    def _open(self, plan: Path, data: bytes) -> None:
        trt = import_tensorrt()
        cudart = self.cudart
        facts = read_sidecar(plan)
        check_sidecar(plan, facts, trt.__version__, device_facts()["compute_capability"], data)
        self.facts = facts
        self.trt = trt
        self.version = trt.__version__
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)  # the very bytes whose hash was checked
        if self.engine is None:
            raise CxrError(
                f"{plan}: TensorRT could not deserialise the plan; rebuild it with 'cxr-export build-engine'"
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CxrError(f"{plan}: TensorRT could not create an execution context (GPU memory?)")
        self.stream = cuda_call(cudart.cudaStreamCreate())
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.profiles: dict[str, tuple[tuple[int, ...], ...]] = {}  # input name -> (min, opt, max) shapes
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)
            if is_input:
                self.profiles[name] = tuple(
                    tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(name, 0)
                )
                self.set_shape(name, self.profiles[name][2])
        for name in self.inputs + self.outputs:
            shape = (
                self.profiles[name][2]
                if name in self.profiles
                else tuple(self.context.get_tensor_shape(name))
            )
            self._allocate(name, shape, np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))))

    def batch_limits(self, name: str) -> BatchLimits:
        """The batch range of one input's optimisation profile."""
        low, _, high = self.profiles[name]
        return BatchLimits(low[0], high[0])

    def set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        check_call(self.context.set_input_shape(name, tuple(shape)), f"input shape {tuple(shape)} for {name}")

    def _allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        nbytes = max(1, int(np.prod(shape))) * dtype.itemsize
        host_ptr = cuda_call(self.cudart.cudaMallocHost(nbytes))
        self._host_ptrs.append(host_ptr)
        device_ptr = cuda_call(self.cudart.cudaMalloc(nbytes))
        raw = (ctypes.c_byte * nbytes).from_address(int(host_ptr))
        host = np.frombuffer(raw, dtype=dtype)
        self.buffers[name] = (int(device_ptr), nbytes, host)
        check_call(self.context.set_tensor_address(name, int(device_ptr)), f"the device address of {name}")

    def copy_input(self, name: str, array: np.ndarray) -> int:
        """Stage one input in pinned memory and start its copy to the device; returns bytes sent."""
        device, capacity, host = self.buffers[name]
        array = np.ascontiguousarray(array, dtype=host.dtype)
        if array.nbytes > capacity:
            raise CxrError(
                f"input {name} of shape {array.shape} exceeds the engine profile max {self.profiles[name][2]}"
            )
        self.set_shape(name, array.shape)
        host[: array.size] = array.ravel()
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_call(self.cudart.cudaMemcpyAsync(device, host.ctypes.data, array.nbytes, kind, self.stream))
        return array.nbytes

    def execute(self) -> dict[str, np.ndarray]:
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        results = {}
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.outputs:
            device, _, host = self.buffers[name]
            shape = tuple(self.context.get_tensor_shape(name))
            count = int(np.prod(shape))
            cuda_call(
                self.cudart.cudaMemcpyAsync(
                    host.ctypes.data, device, count * host.itemsize, kind, self.stream
                )
            )
            results[name] = (host, shape, count)
        cuda_call(self.cudart.cudaStreamSynchronize(self.stream))
        return {name: host[:count].reshape(shape).copy() for name, (host, shape, count) in results.items()}

    def close(self) -> None:
        """Wait for the stream, then free every buffer; safe to call twice and after a failed ``__init__``."""
        if self.stream is not None:
            self.cudart.cudaStreamSynchronize(self.stream)
        for device, _, _ in self.buffers.values():
            self.cudart.cudaFree(device)
        for host_ptr in self._host_ptrs:
            self.cudart.cudaFreeHost(host_ptr)
        self.buffers.clear()
        self._host_ptrs = []
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = None
        self.engine = None


class TrtBackend(Backend):
    """Classifier engine; a short batch runs at a power-of-two bucket inside the profile."""

    name = "tensorrt"
    device = "cuda"

    def __init__(self, plan: Path, precision: str, data: bytes | None = None) -> None:
        self.engine = TrtEngine(plan, data)
        self.precision = precision
        self.provider = f"TensorRT {self.engine.version}"
        self.input_name = self.engine.inputs[0]
        self.limits = self.engine.batch_limits(self.input_name)

    @property
    def features_width(self) -> int | None:
        if FEATURES not in self.engine.outputs:
            return None
        return int(self.engine.engine.get_tensor_shape(FEATURES)[-1])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._run_outputs(batch)[0]

    def _run_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        count = len(batch)
        self.engine.copy_input(self.input_name, pad_rows(batch, bucket(count, self.limits)))
        outputs = self.engine.execute()
        probs = outputs[PROBS if PROBS in outputs else self.engine.outputs[0]][:count].astype(np.float32)
        features = outputs.get(FEATURES)
        return probs, None if features is None else features[:count].astype(np.float32)

    def close(self) -> None:
        self.engine.close()


class TrtExplainer(ExplainerBackend):
    """Explainer engine. Its batch comes from the ``z`` profile (``image`` is fixed at 1); every call runs the
    profile's max batch with ``z`` padded to a fixed width, so TensorRT sees one shape."""

    name = "tensorrt"
    device = "cuda"

    def __init__(self, plan: Path, precision: str, data: bytes | None = None) -> None:
        self.engine = TrtEngine(plan, data)
        self.precision = precision
        self.provider = f"TensorRT {self.engine.version}"
        self.limits = self.engine.batch_limits(Z)
        self.max_segments = self.engine.profiles[Z][2][1]
        self.min_segments = self.engine.profiles[Z][0][1]
        self.bytes_sent = 0

    def _set_image(self, image: np.ndarray, fill: np.ndarray, segments: np.ndarray) -> None:
        count = int(segments.max()) + 1
        if count > self.max_segments:
            raise CxrError(f"{count} segments exceed the engine profile's {self.max_segments}")
        self.columns = max(self.min_segments, min(z_columns(count), self.max_segments))
        for name, array in image_feeds(image, fill, segments).items():
            self.bytes_sent += self.engine.copy_input(name, array)

    def _run(self, z: np.ndarray) -> np.ndarray:
        self.engine.copy_input(Z, self.fixed_block(z))
        return self.engine.execute()[PROBS][: len(z)].astype(np.float32)

    def close(self) -> None:
        self.engine.close()


register(
    BackendSpec(
        name="tensorrt",
        title="TensorRT/cuda-python",
        runs=ENGINE,
        device="cuda",
        rank=10,
        classifier=TrtBackend,
        explainer=TrtExplainer,
        available=lambda: tensorrt_available(),  # looked up when called: tests stand a fake TensorRT in
        requires="tensorrt",
        parity_prefix=ENGINE_LABEL,
        fastest_first=("int8", "fp16", "fp32"),
    )
)
