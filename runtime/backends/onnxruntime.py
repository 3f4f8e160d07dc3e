"""ONNX Runtime backend: TensorRT EP -> CUDA EP -> CPU EP, each asked for only where it can run.

Fast on a GPU because shapes stay fixed (cuDNN's algorithm search runs once per shape): the classifier pads
to a few batch buckets, the explainer always runs one padded batch with device-resident inputs bound once
per image, preallocated outputs and, where ORT allows it, a CUDA graph. A warm-up at open pays the search.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.backends.base import (
    EXPLAINER_INPUTS,
    FEATURES,
    PROBS,
    Backend,
    BatchLimits,
    ExplainerBackend,
    ExplainerProbe,
    Z,
    bucket,
    image_feeds,
    pad_rows,
    z_columns,
)
from cxr.runtime.backends.registry import ONNX, BackendSpec, Place, register
from cxr.runtime.errors import CxrError, one_line

log = logging.getLogger(__name__)

TRT_EP, CUDA_EP, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
PREFERRED_PROVIDERS = (TRT_EP, CUDA_EP, CPU_EP)
NVINFER_LIBRARIES = ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so")
GPU_EXPLAIN_BATCH, CPU_EXPLAIN_BATCH = 256, 32  # H200 fp16: 0.338 s per explanation at 256, 0.354 s at 128
CUDA_FIX = (
    "the CUDA EP could not start (cuDNN/cuBLAS/CUDA runtime not found); running on the CPU. Fix: "
    "pip install 'onnxruntime-gpu[cuda,cudnn]', or put the nvidia-*/lib folders on LD_LIBRARY_PATH"
)


@functools.cache
def tensorrt_ep_loads() -> bool:
    """onnxruntime-gpu lists its TensorRT EP even where TensorRT is absent; it can only run where libnvinfer
    loads."""
    for name in NVINFER_LIBRARIES:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def available_providers() -> list[str]:
    """The providers this install can actually use, best first (the TensorRT EP only where libnvinfer
    loads)."""
    import onnxruntime as ort

    present = set(ort.get_available_providers())
    if TRT_EP in present and not tensorrt_ep_loads():
        present.discard(TRT_EP)
    return [p for p in PREFERRED_PROVIDERS if p in present]


def gpu_providers() -> list[str]:
    return [p for p in available_providers() if p != CPU_EP]


@dataclass(frozen=True)
class CudaOptions:
    """How the CUDA EP runs a graph.

    search: cuDNN's algorithm search, paid again for every new input shape. EXHAUSTIVE times every algorithm
    (on an H100 about 3 s per shape for dpn92_se, 2 to 4 s at open for the explainer's one fixed shape) and
    pays back over the 4 batches of every explanation; HEURISTIC costs 0.3 to 0.8 s per shape and runs the
    classifier's b64 batch within ~10 % (27 vs 25 ms), so the classifier, which sees several batch sizes and
    a few calls, uses it (CLASSIFIER_CUDA). tf32: TF32 tensor cores for fp32 (off for parity: ~1e-3 |dprob|
    otherwise). cuda_graph: replay one captured graph. nhwc: ORT's channels-last convolutions, off: on an
    H200 the dpn92_se explainer ran 0.412 s (fp16) and 0.498 s (fp32) per explanation with it, 0.338 s and
    0.425 s without (explain_variants.json).
    """

    tf32: bool = True
    nhwc: bool = False
    cuda_graph: bool = False
    search: str = "EXHAUSTIVE"

    def provider_options(self) -> dict[str, str]:
        options = {
            "cudnn_conv_algo_search": self.search,
            "use_tf32": str(int(self.tf32)),
            "prefer_nhwc": str(int(self.nhwc)),
        }
        if self.cuda_graph:
            options["enable_cuda_graph"] = "1"
        return options


CLASSIFIER_CUDA = CudaOptions(search="HEURISTIC")
EXPLAINER_CUDA = CudaOptions(cuda_graph=True)
# H100, dpn92_se explainer at batch 256, fresh processes (session 8, benchmarks/results/h100/session8): the
# heuristic search opens in 2.7 s instead of 6.0 s (fp16) and 3.5 s instead of 5.4 s (fp32), and explains in
# 0.38-0.40 s instead of 0.34 s (fp16) and 0.49 s instead of 0.50 s (fp32). A job of up to ~60 images is done
# sooner with it, and its first map comes ~3 s earlier; longer jobs and serve keep the exhaustive search.
QUICK_OPEN_IMAGES = 64


def explainer_cuda(images: int | None) -> CudaOptions:
    """The explainer's CUDA options for a job of ``images`` (None: unknown or long-lived, as in serve)."""
    if images is not None and images <= QUICK_OPEN_IMAGES:
        return replace(EXPLAINER_CUDA, search="HEURISTIC")
    return EXPLAINER_CUDA


def _create(
    path: Path, providers: list[str], threads: int, cuda: CudaOptions, data: bytes | None = None
) -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(
        4
    )  # cuDNN's "no execution plan" lines while it searches: noise, not errors
    options = ort.SessionOptions()
    options.log_severity_level = 4  # ORT's multi-line EP errors; what matters is reported in one line below
    if threads:
        options.intra_op_num_threads = threads
    chosen = [(p, cuda.provider_options() if p == CUDA_EP else {}) for p in providers]
    # enable_fallback=0: no silent retry on the CPU behind an "EP Error" block; failures are ours to handle
    return ort.InferenceSession(
        str(path) if data is None else data, options, providers=chosen, enable_fallback=0
    )


def open_session(
    path: Path,
    providers: list[str] | None = None,
    threads: int = 0,
    cuda: CudaOptions = CudaOptions(),
    data: bytes | None = None,
) -> tuple[Any, CudaOptions]:
    """An InferenceSession on the best usable providers, and the CUDA options it really got. If the CUDA EP
    refuses NHWC or a CUDA graph for this graph, it is opened again without them; a CUDA EP that cannot start
    at all is one warning line. ``data``: the graph's verified bytes (then ``path`` only names it); a graph
    that needs external data files cannot load from bytes, which is how such graphs are refused."""
    wanted = providers or available_providers()
    try:
        session = _create(path, wanted, threads, cuda, data)
    except Exception as exc:
        plain = replace(cuda, nhwc=False, cuda_graph=False)
        if CUDA_EP not in wanted or cuda == plain:
            external = (
                " (graphs with external data files are refused)" if "external" in str(exc).lower() else ""
            )
            raise CxrError(f"{path}: ONNX Runtime cannot load it{external}: {one_line(exc, 200)}") from None
        log.info("%s: CUDA EP refused %s (%s); opening it without", path.name, cuda, one_line(exc))
        return open_session(path, wanted, threads, plain, data)
    if CUDA_EP in wanted and CUDA_EP not in session.get_providers():
        log.warning("%s: %s", path.name, CUDA_FIX)
    return session, cuda


def session_device(session: Any) -> tuple[str, str]:
    """(device, provider) that runs the session: the first provider ORT kept."""
    provider = session.get_providers()[0]
    return ("cpu" if provider == CPU_EP else "cuda"), provider


class OrtBackend(Backend):
    """Classifier. On a GPU a short batch is padded to a power-of-two bucket, so only a few shapes are
    searched."""

    name = "onnxruntime"

    def __init__(
        self,
        path: Path,
        precision: str,
        providers: list[str] | None = None,
        max_batch: int = 64,
        cuda: CudaOptions = CLASSIFIER_CUDA,
        data: bytes | None = None,
    ) -> None:
        self.session, self.cuda = open_session(path, providers, cuda=cuda, data=data)
        self.precision = precision
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.providers = self.session.get_providers()
        self.device, self.provider = session_device(self.session)
        self.input_name = self.session.get_inputs()[0].name
        outputs = {output.name: output for output in self.session.get_outputs()}
        self.output_names = [next(iter(outputs))] + [FEATURES] * (FEATURES in outputs)
        shape = outputs[FEATURES].shape if FEATURES in outputs else None
        self._features_width = int(shape[-1]) if shape and isinstance(shape[-1], int) else None
        self.limits = BatchLimits(1, max_batch)

    @property
    def features_width(self) -> int | None:
        return self._features_width

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._run_outputs(batch)[0]

    def _run_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        count = len(batch)
        if self.device != "cpu":
            batch = pad_rows(batch, bucket(count, self.limits))
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        return outputs[0][:count], outputs[1][:count] if len(outputs) > 1 else None


class OrtExplainer(ExplainerBackend):
    """LIME batches at one fixed shape: ``batch x 64k`` rows, image/fill/segments bound on the device once per
    image.

    Inputs and the output are OrtValues on the session's device, updated in place, so the bindings (and a
    CUDA graph, where ORT could capture one) stay valid from batch to batch.
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: Path,
        precision: str,
        providers: list[str] | None = None,
        max_batch: int | None = None,
        cuda: CudaOptions = EXPLAINER_CUDA,
        data: bytes | None = None,
    ) -> None:
        self.path = path
        self.data = data
        self.precision = precision
        self.session, self.cuda = open_session(path, providers, cuda=cuda, data=data)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.providers = self.session.get_providers()
        self.device, self.provider = session_device(self.session)
        self.cuda_graph = self.cuda.cuda_graph and self.device == "cuda"
        batch = max_batch or (GPU_EXPLAIN_BATCH if self.device != "cpu" else CPU_EXPLAIN_BATCH)
        self.limits = BatchLimits(1, batch)
        self.bytes_sent = 0
        self._values: dict[str, Any] = {}
        self._binding: Any = None

    def _value(self, name: str, array: np.ndarray) -> Any:
        """Copy ``array`` into the named device buffer, (re)allocating and binding it only when its shape
        changes."""
        import onnxruntime as ort

        value = self._values.get(name)
        if value is not None and tuple(value.shape()) == array.shape:
            value.update_inplace(array)
            return value
        if (
            value is not None and self.cuda_graph
        ):  # a captured graph replays fixed addresses: drop it, keep going
            self._drop_graph(f"input {name} changed shape {tuple(value.shape())} -> {array.shape}")
        device = "cuda" if self.device == "cuda" else "cpu"
        value = ort.OrtValue.ortvalue_from_numpy(
            array.copy(), device, 0
        )  # on CPU it wraps (never alias callers)
        self._values[name] = value
        self._binding = None
        return value

    def _bind(self) -> None:
        """Bind every input and a preallocated output; redone only when a buffer was reallocated."""
        import onnxruntime as ort

        if self._binding is not None:
            return
        batch = self.limits.max_batch
        classes = self.session.get_outputs()[0].shape[-1]
        if not isinstance(classes, int):
            raise CxrError(f"{self.path}: the explainer's output width is not fixed")
        device = "cuda" if self.device == "cuda" else "cpu"
        self._values[PROBS] = ort.OrtValue.ortvalue_from_shape_and_type(
            (batch, classes), np.float32, device, 0
        )
        binding = self.session.io_binding()
        for name in EXPLAINER_INPUTS:
            binding.bind_ortvalue_input(name, self._values[name])
        binding.bind_ortvalue_output(PROBS, self._values[PROBS])
        self._binding = binding

    def _set_image(self, image: np.ndarray, fill: np.ndarray, segments: np.ndarray) -> None:
        feeds = image_feeds(image, fill, segments)
        for name, array in feeds.items():
            self._value(name, array)
        self.columns = z_columns(int(segments.max()) + 1)
        self.bytes_sent += sum(v.nbytes for v in feeds.values())

    def _run(self, z: np.ndarray) -> np.ndarray:
        self._value(Z, self.fixed_block(z))
        self._bind()
        self.session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()
        return self._values[PROBS].numpy()[: len(z)].copy()  # on CPU numpy() is a view of the reused buffer

    def _drop_graph(self, why: str) -> None:
        """Reopen the session without a CUDA graph (its buffers are rebound on the next run)."""
        log.info("%s: CUDA graph off (%s)", self.path.name, why)
        self.session, self.cuda = open_session(
            self.path, self.providers, cuda=replace(self.cuda, cuda_graph=False), data=self.data
        )
        self.cuda_graph = False
        self._values = {k: v for k, v in self._values.items() if k != PROBS}
        self._binding = None

    def warm_up(self, size: int, runs: int = 1, probe: ExplainerProbe | None = None) -> np.ndarray:
        if self.cuda_graph:
            try:  # ORT captures the graph on a run after the first
                return super().warm_up(size, max(runs, 2), probe)
            except Exception as exc:  # capture refused at run time: same session without a graph
                self._drop_graph(one_line(exc))
        return super().warm_up(size, runs, probe)


register(
    BackendSpec(
        name="onnxruntime",
        title="ONNX Runtime",
        runs=ONNX,
        device="cuda or cpu",
        rank=20,
        classifier=OrtBackend,
        explainer=OrtExplainer,
        requires="onnxruntime",
        places=(  # auto: CUDA (where a GPU provider loads) before OpenVINO, the CPU after it
            Place(
                label="onnxruntime-cuda",
                rank=20,
                device="cuda",
                when=lambda: bool(gpu_providers()),
                providers=lambda: gpu_providers() + [CPU_EP],
                fastest_first=("fp16", "fp32"),
            ),
            # its CPU fp16 and int8 ran 1.09x and 1.46x its fp32's time (Xeon with AMX): auto keeps fp32
            Place(label="onnxruntime", rank=40, providers=lambda: [CPU_EP], fastest_first=("fp32",)),
        ),
        open_classifier=lambda f: OrtBackend(
            f.path, f.precision, f.providers, cuda=replace(CLASSIFIER_CUDA, tf32=f.tf32), data=f.data
        ),
        open_explainer=lambda f: OrtExplainer(
            f.path, f.precision, f.providers, data=f.data, cuda=explainer_cuda(f.images)
        ),
    )
)
