"""A small stand-in for TensorRT's and cuda-python's classes, for unit tests of our own engine logic only.

It records every call, so tests can check limits, checked setters, fallback and cleanup order. It proves
nothing about TensorRT itself (tests/test_gpu.py does, where TensorRT exists).
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np


class FakeCudart:
    def __init__(self, fail_malloc_after: int | None = None) -> None:
        self.calls: list[str] = []
        self.live: dict[int, object] = {}
        self.fail_malloc_after = fail_malloc_after
        self.cudaError_t = SimpleNamespace(cudaSuccess=0)
        self.cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def _buffer(self, nbytes: int) -> int:
        buffer = ctypes.create_string_buffer(nbytes)
        self.live[ctypes.addressof(buffer)] = buffer
        return ctypes.addressof(buffer)

    def cudaStreamCreate(self):
        self.calls.append("stream")
        return 0, 7

    def cudaMallocHost(self, nbytes):
        self.calls.append("malloc_host")
        return 0, self._buffer(nbytes)

    def cudaMalloc(self, nbytes):
        if self.fail_malloc_after is not None and self.calls.count("malloc") >= self.fail_malloc_after:
            return 2, None  # cudaErrorMemoryAllocation
        self.calls.append("malloc")
        return 0, self._buffer(nbytes)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        self.calls.append("sync")
        return (0,)

    def cudaFree(self, ptr):
        self.calls.append("free")
        self.live.pop(ptr)
        return (0,)

    def cudaFreeHost(self, ptr):
        self.calls.append("free_host")
        self.live.pop(int(ptr))
        return (0,)

    def cudaStreamDestroy(self, stream):
        self.calls.append("stream_destroy")
        return (0,)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorMemoryAllocation"


class FakeContext:
    """Computes from the bound buffers: probs = [k, 1 - k], k = kept segments / 1000 (or mean pixel / 255)."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.shape_log: list[tuple[str, tuple[int, ...]]] = []

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.profiles[name]
        if self.engine.refuse_shapes or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
            return False
        self.shapes[name] = tuple(shape)
        self.shape_log.append((name, tuple(shape)))
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def get_tensor_shape(self, name):
        if name in self.engine.profiles:
            return self.shapes[name]
        first = self.shapes[self.engine.batch_input]
        return (first[0], 2)

    def execute_async_v3(self, stream):
        batch_input = self.engine.batch_input
        shape = self.shapes[batch_input]
        rows = np.frombuffer(
            (ctypes.c_uint8 * int(np.prod(shape))).from_address(self.addresses[batch_input]), dtype=np.uint8
        ).reshape(shape[0], -1)
        if batch_input == "image":
            kept = rows.mean(axis=1, dtype=np.float32) / 255.0
        else:  # the number of segments kept: padding columns (all 0) change nothing
            kept = rows.sum(axis=1, dtype=np.float32) / 1000.0
        kept = kept * self.engine.scale
        out = np.stack([kept, 1 - kept], axis=1).astype(np.float32)
        ctypes.memmove(self.addresses["probs"], out.ctypes.data, out.nbytes)
        return True


class FakeEngine:
    """``scale`` multiplies the first probability: another value stands for another (wrong) engine."""

    def __init__(
        self,
        profiles: dict[str, tuple[tuple[int, ...], ...]],
        refuse_shapes: bool = False,
        scale: float = 1.0,
    ) -> None:
        self.profiles = profiles
        self.scale = scale
        self.names = [*profiles, "probs"]
        self.batch_input = "z" if "z" in profiles else "image"
        self.refuse_shapes = refuse_shapes
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return "input" if name in self.profiles else "output"

    def get_tensor_profile_shape(self, name, profile):
        return self.profiles[name]

    def get_tensor_dtype(self, name):
        return {"segments": np.int32, "probs": np.float32}.get(name, np.uint8)

    def create_execution_context(self):
        return FakeContext(self)


class _Logger:
    WARNING = 2

    def __init__(self, level: int) -> None:
        self.level = level


def fake_trt(engine: FakeEngine | dict[bytes, FakeEngine], version: str = "10.13.0") -> SimpleNamespace:
    """A module-like object with the parts of ``tensorrt`` that runtime/backends/tensorrt.py uses. ``engine``:
    what every plan deserialises to, or the engine of each plan's bytes."""
    plans = engine if isinstance(engine, dict) else None
    return SimpleNamespace(
        __version__=version,
        Logger=_Logger,
        Runtime=lambda logger: SimpleNamespace(
            deserialize_cuda_engine=lambda data: plans[bytes(data)] if plans is not None else engine
        ),
        TensorIOMode=SimpleNamespace(INPUT="input"),
        nptype=lambda dtype: dtype,
    )


def explainer_profiles(
    size: int = 8, batch: int = 64, segments: int = 256
) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The explainer profile as cxr-export build-engine writes it: image/fill/segments fixed, z dynamic."""
    fixed = ((1, 1, size, size),) * 3
    return {
        "image": fixed,
        "fill": fixed,
        "segments": ((size, size),) * 3,
        "z": ((1, 1), (batch, 64), (batch, segments)),
    }
