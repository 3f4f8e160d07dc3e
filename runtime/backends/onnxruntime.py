"""ONNX Runtime backend: providers TensorRT EP -> CUDA EP -> CPU EP, whichever this install has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cxr.runtime.backends.base import Backend, BatchLimits, ExplainerBackend
from cxr.runtime.errors import CxrError

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def available_providers() -> list[str]:
    import onnxruntime as ort

    present = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in present]


def gpu_providers() -> list[str]:
    return [p for p in available_providers() if p != "CPUExecutionProvider"]


def open_session(path: Path, providers: list[str] | None = None, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=providers or available_providers())
    except Exception as exc:
        raise CxrError(f"{path}: ONNX Runtime cannot load it: {str(exc).splitlines()[0][:200]}") from None


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: Path, precision: str, providers: list[str] | None = None, max_batch: int = 32) -> None:
        self.session = open_session(path, providers)
        self.precision = precision
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        self.limits = BatchLimits(1, max_batch)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.uint8)})[0]


class OrtExplainer(ExplainerBackend):
    """Binds image, fill and segments once per image (IOBinding); each batch binds only ``z``."""

    name = "onnxruntime"

    def __init__(self, path: Path, precision: str, providers: list[str] | None = None, max_batch: int = 64) -> None:
        self.session = open_session(path, providers)
        self.precision = precision
        self.providers = self.session.get_providers()
        self.limits = BatchLimits(1, max_batch)
        self.bytes_sent = 0
        self._binding = None

    def set_image(self, image: np.ndarray, fill: np.ndarray, segments: np.ndarray) -> None:
        import onnxruntime as ort

        feeds = {
            "image": np.ascontiguousarray(image.reshape(1, 1, *image.shape[-2:]), dtype=np.uint8),
            "fill": np.ascontiguousarray(fill.reshape(1, 1, *fill.shape[-2:]), dtype=np.uint8),
            "segments": np.ascontiguousarray(segments, dtype=np.int32),
        }
        self._binding = self.session.io_binding()
        self._values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
        for name, value in self._values.items():
            self._binding.bind_ortvalue_input(name, value)
        self.bytes_sent += sum(v.nbytes for v in feeds.values())

    def run(self, z: np.ndarray) -> np.ndarray:
        if self._binding is None:
            raise RuntimeError("set_image() must come before run()")
        z = np.ascontiguousarray(z, dtype=np.uint8)
        self._binding.bind_cpu_input("z", z)
        self._binding.bind_output("probs")  # unallocated: the batch size may change between calls
        self.bytes_sent += z.nbytes
        self.session.run_with_iobinding(self._binding)
        return self._binding.copy_outputs_to_cpu()[0]
