"""``cxr-run serve``: the cxr runtime as a model inside NVIDIA Triton Inference Server (via PyTriton).

Three models are bound (NAME defaults to ``cxr``):
- ``NAME``: uint8 pixels [N, 1, S, S], preprocessed by the client as in CLIENTS.md -> ``probs`` [N, C].
- ``NAME_encoded``: encoded PNG/JPEG/DICOM bytes [N, 1], decoded server-side with the same reader as
  ``cxr-run predict`` -> ``probs`` [N, C] (NaN for a bad image) and ``error`` [N, 1] (empty when fine),
  so one bad image never fails the other requests batched with it.
- ``NAME_card``: the bundle card as JSON plus the serving backend, so clients can check they talk to
  the model they validated.
Triton does the rest: dynamic batching, queue limits, dtype/shape checks, health, ready and metrics.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cxr.runtime.backends.base import Backend
from cxr.runtime.backends.select import check_validated
from cxr.runtime.bundle import Bundle
from cxr.runtime.card import public_dict, sha256_file
from cxr.runtime.errors import CxrError, CxrUsageError, one_line
from cxr.runtime.optional import require
from cxr.runtime.preprocess import DEFAULT_MAX_PIXELS, decode_image, preprocess
from cxr.runtime.serve_guard import GuardedFront, GuardLimits


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 64
    max_queue_delay_us: int = 2000
    max_queue: int = 0  # 0: unbounded; otherwise requests beyond it are rejected at once
    instances: int = 1
    backend: str = "auto"
    precision: str = "fp32"
    max_pixels: int = DEFAULT_MAX_PIXELS
    name: str = "cxr"
    log_file: Path | None = None  # Triton's own log; None: a file in the temp folder
    allow_unvalidated: bool = False  # serve an fp16/int8 graph or engine that failed or never ran parity


def card_reply(bundle: Bundle, backend: Backend, max_batch: int) -> dict:
    return {
        "card": public_dict(bundle.card),
        "card_sha256": sha256_file(bundle.folder / "card.json"),
        "backend": backend.name,
        "precision": backend.precision,
        "max_batch": max_batch,
    }


def python_library_dir() -> str | None:
    """This interpreter's libpython folder, when it has a shared libpython.

    Triton's Python-backend stub links ``libpython3.X.so``; without help the loader finds the system's
    copy, and a venv from another 3.X build (pyenv, conda, uv) then fails to load the model
    (``RLock has no attribute _recursion_count``). Putting our own LIBDIR first makes them match.
    """
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    return libdir if libdir and soname and (Path(libdir) / soname).is_file() else None


def prepare_stub_environment() -> None:
    libdir = python_library_dir()
    if libdir is None:
        print(
            f"warning: {sys.executable} has no shared libpython; Triton's Python stub will use the system's "
            f"libpython{sys.version_info.major}.{sys.version_info.minor}. If models fail to load, make the "
            "venv "
            f"from the system Python (e.g. /usr/bin/python3.{sys.version_info.minor} -m venv .venv)",
            file=sys.stderr,
        )
        return
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def _import_pytriton():
    require("pytriton", "serving")


class ModelInstance:
    """One Triton model instance: its own backend session, shared by the three bound models."""

    def __init__(self, bundle: Bundle, options: ServeOptions) -> None:
        from cxr.runtime.backends.select import open_classifier

        self.bundle, self.options = bundle, options
        self.backend, self.reason = open_classifier(bundle, options.backend, options.precision)
        self.size = bundle.card.input.size

    def pixels(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "probs": self.backend.run_chunked(np.ascontiguousarray(image, dtype=np.uint8)).astype(np.float32)
        }

    def encoded(self, data: np.ndarray) -> dict[str, np.ndarray]:
        count = len(data)
        probs = np.full((count, len(self.bundle.card.classes)), np.nan, dtype=np.float32)
        errors = np.array([[b""] for _ in range(count)], dtype=object)
        images, good = [], []
        for i, item in enumerate(data.reshape(count, -1)[:, 0]):
            try:
                gray = decode_image(bytes(item), "request image", max_pixels=self.options.max_pixels)
                images.append(preprocess(gray, self.size, self.bundle.card.preprocessing))
                good.append(i)
            except CxrError as exc:
                errors[i, 0] = str(exc).encode()
        if good:
            probs[good] = self.backend.run_chunked(np.stack(images)[:, None])
        return {"probs": probs, "error": errors}

    def card(self, query: np.ndarray) -> dict[str, np.ndarray]:
        reply = json.dumps(card_reply(self.bundle, self.backend, self.options.max_batch)).encode()
        return {"card": np.array([[reply]] * len(query), dtype=object)}

    def close(self) -> None:
        self.backend.close()


def _batched(method: Callable) -> Callable:
    from pytriton.decorators import batch

    return batch(lambda **inputs: method(**inputs))


def triton_log_file(options: ServeOptions) -> Path:
    return options.log_file or Path(tempfile.gettempdir()) / f"cxr-triton-{options.http_port}.log"


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """A busy port would make Triton exit while PyTriton waits for it: say so before starting."""
    for what, port in ports.items():
        if not 0 < port < 65536:
            raise CxrUsageError(f"--{what} must be 1..65535, got {port}")
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is free
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise CxrError(
                    f"--{what} {port} on {host}: {exc.strerror or exc} (another server running?)"
                ) from None
    if len(set(ports.values())) != len(ports):
        raise CxrError(f"the HTTP, gRPC and metrics ports must differ, got {sorted(ports.values())}")


STOP_REQUESTED = {
    "value": False
}  # set by Ctrl+C / SIGTERM: a serve() that returns without it means Triton died


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _interrupt(*_: object) -> None:
    STOP_REQUESTED["value"] = True
    raise KeyboardInterrupt


STARTS = 3  # PyTriton 0.7 can lose a race between model instances at load time on a busy machine


def _bind_models(
    triton, instances: list[ModelInstance], options: ServeOptions, size: int, classes: int
) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor

    policy = QueuePolicy(max_queue_size=options.max_queue) if options.max_queue else None
    batcher = DynamicBatcher(
        max_queue_delay_microseconds=options.max_queue_delay_us, default_queue_policy=policy
    )
    config = ModelConfig(max_batch_size=options.max_batch, batcher=batcher)
    probs = Tensor(name="probs", dtype=np.float32, shape=(classes,))
    triton.bind(
        model_name=options.name,
        infer_func=[_batched(i.pixels) for i in instances],
        inputs=[Tensor(name="image", dtype=np.uint8, shape=(1, size, size))],
        outputs=[probs],
        config=config,
        strict=True,
    )
    triton.bind(
        model_name=f"{options.name}_encoded",
        infer_func=[_batched(i.encoded) for i in instances],
        inputs=[Tensor(name="data", dtype=np.bytes_, shape=(1,))],
        outputs=[probs, Tensor(name="error", dtype=np.bytes_, shape=(1,))],
        config=config,
    )
    triton.bind(
        model_name=f"{options.name}_card",
        infer_func=_batched(instances[0].card),
        inputs=[Tensor(name="query", dtype=np.bytes_, shape=(1,))],
        outputs=[Tensor(name="card", dtype=np.bytes_, shape=(1,))],
        config=ModelConfig(max_batch_size=8),
    )


def serve(bundle: Bundle, options: ServeOptions, on_ready: Callable[[str], None] | None = None) -> None:
    """Start Triton, bind the models, block until SIGINT/SIGTERM; every instance is closed on the way out."""
    _import_pytriton()
    if (
        options.max_batch < 1
        or options.instances < 1
        or options.max_queue < 0
        or options.max_queue_delay_us < 0
    ):
        raise CxrUsageError(
            "--max-batch and --instances must be at least 1; --max-queue and --max-queue-delay-us 0 or more"
        )
    check_ports_free(
        options.host,
        {
            "http-port": options.http_port,
            "grpc-port": options.grpc_port,
            "metrics-port": options.metrics_port,
        },
    )
    prepare_stub_environment()
    from pytriton.exceptions import PyTritonError
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
    from tritonclient.utils import InferenceServerException

    instances = [ModelInstance(bundle, options) for _ in range(options.instances)]
    try:
        caution = check_validated(bundle, instances[0].backend, options.allow_unvalidated)
    except CxrError:
        for instance in instances:
            instance.close()
        raise
    if caution:
        print(f"warning: {caution}", file=sys.stderr, flush=True)
    inner_port = free_loopback_port()  # Triton's own HTTP, reached only through the guarded front
    size = bundle.card.input.size
    limits = GuardLimits(
        max_request_bytes=max(64 << 20, 8 * options.max_batch * size * size),
        max_elements=options.max_batch * size * size,
    )
    triton_config = TritonConfig(
        http_address="127.0.0.1",
        http_port=inner_port,
        grpc_address=options.host,
        grpc_port=options.grpc_port,
        metrics_address=options.host,
        metrics_port=options.metrics_port,
        exit_on_error=True,
        log_file=triton_log_file(options),
    )
    # PyTriton guards admin endpoints with a per-run token; statistics (per-model counts and the batch sizes
    # formed, as public as /metrics) stay readable so load tests and dashboards can see batching.
    security = TritonSecurityConfig(
        restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"]
    )
    try:
        for attempt in range(1, STARTS + 1):
            try:
                with Triton(config=triton_config, security_config=security) as triton:
                    _bind_models(triton, instances, options, bundle.card.input.size, len(bundle.card.classes))
                    triton.run()
                    STOP_REQUESTED["value"] = False
                    signal.signal(
                        signal.SIGTERM, _interrupt
                    )  # stop as on Ctrl+C: Triton, proxies, shared memory
                    signal.signal(signal.SIGINT, _interrupt)
                    with GuardedFront(options.host, options.http_port, inner_port, limits):
                        if on_ready is not None:
                            on_ready(
                                f"{instances[0].backend.name} {options.precision} ({instances[0].reason})"
                            )
                        triton.serve()  # returns on Ctrl+C/SIGTERM, and also when tritonserver dies
                if not STOP_REQUESTED["value"]:
                    raise CxrError(
                        f"tritonserver stopped by itself (crashed?); see {triton_log_file(options)}"
                    )
                return
            except (PyTritonError, InferenceServerException) as exc:
                reason = one_line(exc, 300)
                if "load failed" not in reason or attempt == STARTS:
                    raise CxrError(f"Triton failed: {reason} (log: {triton_log_file(options)})") from None
                print(
                    f"warning: a model failed to load ({reason[:120]}...); restarting Triton, "
                    f"try {attempt + 1} of {STARTS}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for instance in instances:
            instance.close()
