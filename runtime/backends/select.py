"""``--backend auto``: a matching TensorRT engine -> ONNX Runtime GPU providers -> ONNX Runtime CPU."""

from __future__ import annotations

from pathlib import Path

from cxr.runtime.backends.base import Backend, ExplainerBackend
from cxr.runtime.bundle import Bundle, check_precision, engine_name
from cxr.runtime.errors import CxrError

BACKENDS = ("auto", "tensorrt", "onnxruntime")


def _engine_path(bundle: Bundle, graph: str, precision: str) -> Path | None:
    name = engine_name(graph, precision)
    return bundle.verified(name) if bundle.has(name) else None


def choose(bundle: Bundle, backend: str, precision: str, graph: str = "model") -> tuple[str, str]:
    """Which backend to use and why (the reason is shown to the user)."""
    from cxr.runtime.backends.onnxruntime import gpu_providers
    from cxr.runtime.backends.tensorrt import tensorrt_available

    check_precision(precision)
    if backend not in BACKENDS:
        raise CxrError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    engine = _engine_path(bundle, graph, precision)
    if backend == "tensorrt":
        if not tensorrt_available():
            raise CxrError("--backend tensorrt: TensorRT/cuda-python not installed (pip install 'cxr-edge[trt]')")
        if engine is None:
            raise CxrError(f"--backend tensorrt: no {engine_name(graph, precision)} in {bundle.folder} "
                           f"(build it on this machine: 'cxr-export build-engine {bundle.folder} --precision {precision}')")
        return "tensorrt", f"engine {engine.name}"
    if backend == "auto" and engine is not None and tensorrt_available():
        return "tensorrt", f"matching engine {engine.name}"
    gpu = gpu_providers()
    where = f"GPU providers {', '.join(gpu)}" if gpu else "CPU"
    return "onnxruntime", f"ONNX Runtime on {where}"


def open_classifier(bundle: Bundle, backend: str = "auto", precision: str = "fp32") -> tuple[Backend, str]:
    kind, reason = choose(bundle, backend, precision, "model")
    if kind == "tensorrt":
        from cxr.runtime.backends.tensorrt import TrtBackend

        return TrtBackend(_engine_path(bundle, "model", precision), precision), reason
    from cxr.runtime.backends.onnxruntime import OrtBackend

    return OrtBackend(bundle.onnx_path("model", precision), precision), reason


def open_explainer(bundle: Bundle, backend: str = "auto", precision: str = "fp32") -> tuple[ExplainerBackend, str]:
    kind, reason = choose(bundle, backend, precision, "explain")
    if kind == "tensorrt":
        from cxr.runtime.backends.tensorrt import TrtExplainer

        return TrtExplainer(_engine_path(bundle, "explain", precision), precision), reason
    from cxr.runtime.backends.onnxruntime import OrtExplainer

    return OrtExplainer(bundle.onnx_path("explain", precision), precision), reason
