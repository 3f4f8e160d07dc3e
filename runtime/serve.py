"""``cxr-run serve``: the cxr runtime as a model inside NVIDIA Triton Inference Server (via PyTriton).

Three models are bound (NAME defaults to ``cxr``):
- ``NAME``: uint8 pixels [N, 1, S, S], preprocessed by the client as in CLIENTS.md -> ``probs`` [N, C] and,
  where the graph emits them, ``features`` [N, D] (what the bundle's out-of-distribution gate scores).
- ``NAME_encoded``: encoded PNG/JPEG/DICOM bytes [N, 1] (and an optional BOOL ``strict`` [N, 1]: a warning
  fails that image, as ``cxr-run predict --strict``), read server-side by the same code as ``cxr-run
  predict`` -> ``probs`` [N, C] (NaN for a bad image), ``error`` [N, 1] (empty when fine), ``warnings``
  [N, 1] (a JSON list per image, as local records carry) and ``ood_score`` [N, 1] (the gate's score; NaN
  without a gate), so one bad image never fails the others.
- ``NAME_card``: the bundle card as JSON plus the serving backend, so clients can check they talk to
  the model they validated.
Triton does the rest: dynamic batching, queue limits, health, ready and metrics. Its HTTP port is reached
only through ``cxr.runtime.serve_guard``, which checks every request against ``served_models``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.backends.base import Backend
from cxr.runtime.backends.select import check_validated
from cxr.runtime.bundle import Bundle
from cxr.runtime.card import public_dict, sha256_file
from cxr.runtime.errors import CxrError, CxrUsageError, one_line
from cxr.runtime.ood import bundle_gate
from cxr.runtime.optional import require
from cxr.runtime.predict import Answer, Prepared, classify_outputs, gate_records, label_record, prepare
from cxr.runtime.preprocess import DEFAULT_MAX_PIXELS
from cxr.runtime.serve_guard import GuardedFront
from cxr.runtime.serve_requests import ModelSpec, TensorSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    # Triton's gRPC parses requests itself (the guarded front covers HTTP only): loopback unless named
    grpc_host: str = "127.0.0.1"
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
        "features": backend.features_width,  # NAME also returns the gate's features (a client scores them)
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
        log.warning(
            f"warning: {sys.executable} has no shared libpython; Triton's Python stub will use the system's "
            f"libpython{sys.version_info.major}.{sys.version_info.minor}. If models fail to load, make the "
            f"venv from the system Python (e.g. /usr/bin/python3.{sys.version_info.minor} -m venv .venv)"
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
        self.gate = bundle_gate(bundle, self.backend.precision)

    def pixels(self, image: np.ndarray) -> dict[str, np.ndarray]:
        probs, features = self.backend.run_outputs_chunked(np.ascontiguousarray(image, dtype=np.uint8))
        reply = {"probs": probs.astype(np.float32)}
        if self.backend.features_width:
            reply["features"] = features.astype(np.float32)
        return reply

    def encoded(self, requests: list) -> list[dict[str, np.ndarray]]:
        """Every image of the requests Triton batched: read and prepared as local predict does (its warnings;
        with ``strict`` set, a warning fails the image), then classified together. A bad image costs only its
        own row: NaN probabilities and its error."""
        card = self.bundle.card
        groups = [
            [
                prepare(bytes(item), "request image", card, self.options.max_pixels, bool(flag))
                for item, flag in zip(request["data"].reshape(-1), _strict_flags(request))
            ]
            for request in requests
        ]
        good = [p.image for group in groups for p in group if p.image is not None]
        step = self.backend.limits.max_batch
        answers = iter(
            [
                a
                for i in range(0, len(good), step)
                for a in classify_outputs(self.backend, good[i : i + step], _names(step))
            ]
        )
        flags = [list(_strict_flags(request)) for request in requests]
        return [self._encoded_reply(group, answers, strict) for group, strict in zip(groups, flags)]

    def _encoded_reply(
        self, group: list[Prepared], answers: Iterator[Answer | str], strict: list[bool]
    ) -> dict[str, np.ndarray]:
        """One request's reply: each image read as a local record is (label, warnings, the gate's score)."""
        classes = self.bundle.card.classes
        probs = np.full((len(group), len(classes)), np.nan, dtype=np.float32)
        scores = np.full((len(group), 1), np.nan, dtype=np.float32)
        errors = np.array([[b""] for _ in group], dtype=object)
        warnings = np.array([[b"[]"] for _ in group], dtype=object)
        for i, prepared in enumerate(group):
            record = {
                "path": "request image",
                "label": None,
                "probs": None,
                "ood_score": None,
                "in_distribution": None,
                "error": prepared.error,
                "warnings": list(prepared.warnings),
            }
            answer = next(answers) if prepared.image is not None else None
            if isinstance(answer, str):
                record["error"] = answer
            elif answer is not None and label_record(record, answer[0], classes):
                gate_records(self.gate, [record], {0: answer}, {0: prepared.stats}, bool(strict[i]))
            if record["label"] is not None:
                probs[i] = answer[0]
            if record["ood_score"] is not None:
                scores[i, 0] = record["ood_score"]
            errors[i, 0] = (record["error"] or "").encode()
            warnings[i, 0] = json.dumps(record["warnings"]).encode()
        return {"probs": probs, "error": errors, "warnings": warnings, "ood_score": scores}

    def card(self, query: np.ndarray) -> dict[str, np.ndarray]:
        reply = json.dumps(card_reply(self.bundle, self.backend, self.options.max_batch)).encode()
        return {"card": np.array([[reply]] * len(query), dtype=object)}

    def close(self) -> None:
        self.backend.close()


def _strict_flags(request: Any) -> np.ndarray:
    """The optional ``strict`` input of an encoded request, one flag per image (absent: all off)."""
    count = request["data"].shape[0]
    flags = request.data.get("strict")
    return np.zeros(count, dtype=bool) if flags is None else flags.reshape(count, -1)[:, 0]


def _names(count: int) -> list[Path]:
    return [Path("request image")] * count


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


CARD_MAX_BATCH = 8
DTYPES = {"UINT8": np.uint8, "BOOL": np.bool_, "BYTES": np.bytes_, "FP32": np.float32}


def served_models(
    name: str, size: int, classes: int, max_batch: int, features_width: int | None = None
) -> tuple[ModelSpec, ...]:
    """The three bound models, once: Triton is told these and the HTTP front checks requests against them."""
    probs = TensorSpec("probs", "FP32", (classes,))
    image = TensorSpec("image", "UINT8", (1, size, size))
    data, strict = TensorSpec("data", "BYTES", (1,)), TensorSpec("strict", "BOOL", (1,), optional=True)
    notes = (
        TensorSpec("error", "BYTES", (1,)),
        TensorSpec("warnings", "BYTES", (1,)),
        TensorSpec("ood_score", "FP32", (1,)),
    )
    card = (TensorSpec("query", "BYTES", (1,)), TensorSpec("card", "BYTES", (1,)))
    features = (TensorSpec("features", "FP32", (features_width,)),) if features_width else ()
    return (
        ModelSpec(name, (image,), (probs, *features), max_batch),
        ModelSpec(f"{name}_encoded", (data, strict), (probs, *notes), max_batch),
        ModelSpec(f"{name}_card", card[:1], card[1:], CARD_MAX_BATCH),
    )


def _tensors(specs: tuple[TensorSpec, ...]) -> list:
    from pytriton.model_config import Tensor

    return [Tensor(name=t.name, dtype=DTYPES[t.datatype], shape=t.dims, optional=t.optional) for t in specs]


def _bind_models(
    triton, instances: list[ModelInstance], options: ServeOptions, models: tuple[ModelSpec, ...]
) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy

    policy = QueuePolicy(max_queue_size=options.max_queue) if options.max_queue else None
    batcher = DynamicBatcher(
        max_queue_delay_microseconds=options.max_queue_delay_us, default_queue_policy=policy
    )
    pixels, _, card = models
    functions = (
        [_batched(i.pixels) for i in instances],
        [i.encoded for i in instances],  # takes the request list: strict is optional per request
        _batched(instances[0].card),
    )
    for spec, infer_func in zip(models, functions):
        config = ModelConfig(
            max_batch_size=spec.max_batch, batcher=batcher if spec is not card else DynamicBatcher()
        )
        triton.bind(
            model_name=spec.name,
            infer_func=infer_func,
            inputs=_tensors(spec.inputs),
            outputs=_tensors(spec.outputs),
            config=config,
            strict=spec is pixels,
        )


def serve(bundle: Bundle, options: ServeOptions, on_ready: Callable[[str], None] | None = None) -> None:
    """Start Triton, bind the models, block until SIGINT/SIGTERM; every instance is closed on the way out."""
    _import_pytriton()
    _check_options(options)
    prepare_stub_environment()
    instances = _open_instances(bundle, options)
    try:
        features = instances[0].backend.features_width
        card = bundle.card
        models = served_models(options.name, card.input.size, len(card.classes), options.max_batch, features)
        _run_triton(instances, options, models, on_ready)
    finally:
        for instance in instances:
            instance.close()


def _check_options(options: ServeOptions) -> None:
    """Batching limits and ports, before anything starts: a busy port would make Triton exit later."""
    if (
        options.max_batch < 1
        or options.instances < 1
        or options.max_queue < 0
        or options.max_queue_delay_us < 0
    ):
        raise CxrUsageError(
            "--max-batch and --instances must be at least 1; --max-queue and --max-queue-delay-us 0 or more"
        )
    check_ports_free(options.host, {"http-port": options.http_port, "metrics-port": options.metrics_port})
    check_ports_free(options.grpc_host, {"grpc-port": options.grpc_port})
    if options.grpc_port in (options.http_port, options.metrics_port):
        raise CxrError(f"the HTTP, gRPC and metrics ports must differ, got {options.grpc_port} twice")


def _open_instances(bundle: Bundle, options: ServeOptions) -> list[ModelInstance]:
    """One backend per model instance; an unvalidated graph is refused (or, when allowed, warned about)."""
    first = ModelInstance(bundle, options)
    # every instance runs what the first chose (--backend auto or --precision auto decide once)
    same = replace(options, backend=first.backend.name, precision=first.backend.precision)
    instances = [first] + [ModelInstance(bundle, same) for _ in range(options.instances - 1)]
    try:
        caution = check_validated(bundle, instances[0].backend, options.allow_unvalidated)
    except CxrError:
        for instance in instances:
            instance.close()
        raise
    if caution:
        log.warning(f"warning: {caution}")
    return instances


def _triton_configs(options: ServeOptions, inner_port: int) -> tuple[Any, Any]:
    """Triton's own config (its HTTP on loopback only, behind the guarded front) and its security config."""
    from pytriton.triton import TritonConfig, TritonSecurityConfig

    triton_config = TritonConfig(
        http_address="127.0.0.1",
        http_port=inner_port,
        grpc_address=options.grpc_host,
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
    return triton_config, security


def _run_triton(
    instances: list[ModelInstance],
    options: ServeOptions,
    models: tuple[ModelSpec, ...],
    on_ready: Callable[[str], None] | None,
) -> None:
    """Serve until stopped, restarting Triton (up to STARTS times) when PyTriton loses its load-time race."""
    from pytriton.exceptions import PyTritonError
    from tritonclient.utils import InferenceServerException

    inner_port = free_loopback_port()  # Triton's own HTTP, reached only through the guarded front
    configs = _triton_configs(options, inner_port)
    for attempt in range(1, STARTS + 1):
        try:
            _serve_once(instances, options, models, configs, inner_port, on_ready)
            return
        except (PyTritonError, InferenceServerException) as exc:
            reason = one_line(exc, 300)
            if "load failed" not in reason or attempt == STARTS:
                raise CxrError(f"Triton failed: {reason} (log: {triton_log_file(options)})") from None
            log.warning(
                f"warning: a model failed to load ({reason[:120]}...); restarting Triton, "
                f"try {attempt + 1} of {STARTS}"
            )


def _serve_once(
    instances: list[ModelInstance],
    options: ServeOptions,
    models: tuple[ModelSpec, ...],
    configs: tuple[Any, Any],
    inner_port: int,
    on_ready: Callable[[str], None] | None,
) -> None:
    """One Triton start: bind, run, open the guarded front, block until Ctrl+C/SIGTERM (or Triton's death)."""
    from pytriton.triton import Triton

    triton_config, security = configs
    with Triton(config=triton_config, security_config=security) as triton:
        _bind_models(triton, instances, options, models)
        triton.run()
        STOP_REQUESTED["value"] = False
        signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl+C: Triton, proxies, shared memory
        signal.signal(signal.SIGINT, _interrupt)
        with GuardedFront(options.host, options.http_port, inner_port, models):
            if on_ready is not None:
                first = instances[0].backend
                on_ready(f"{first.name} {first.precision} ({instances[0].reason})")
            triton.serve()  # returns on Ctrl+C/SIGTERM, and also when tritonserver dies
    if not STOP_REQUESTED["value"]:
        raise CxrError(f"tritonserver stopped by itself (crashed?); see {triton_log_file(options)}")
