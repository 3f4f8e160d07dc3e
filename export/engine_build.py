"""``cxr-export build-engine``: a strongly typed TensorRT plan from the bundle's ONNX graph (TRT 10.x and
11.x).

The configuration (which ONNX file, profile shapes, network flags, sidecar facts) is plain Python and
tested without TensorRT; ``build_plan`` is the only place that imports ``tensorrt``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.export.known import record_known_answers
from cxr.runtime.bundle import Bundle, check_precision, engine_name, onnx_name
from cxr.runtime.card import file_parity_label, forget_parity, record_files, sha256_file
from cxr.runtime.engine_sidecar import write_sidecar
from cxr.runtime.errors import CxrError
from cxr.runtime.onnx_weights import check_weights
from cxr.runtime.safe_io import atomic_write

log = logging.getLogger(__name__)

MAX_SEGMENTS = 256  # LIME explainer profile: up to this many superpixels


@dataclass(frozen=True)
class Profile:
    min_batch: int = 1
    opt_batch: int = 64
    max_batch: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise CxrError(
                f"profile needs 1 <= min <= opt <= max, got min {self.min_batch}, opt {self.opt_batch}, max "
                f"{self.max_batch}"
            )


Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def profile_shapes(graph: str, size: int, profile: Profile, max_segments: int = MAX_SEGMENTS) -> Shapes:
    """min/opt/max shape of every dynamic input of the classifier (``model``) or explainer (``explain``)."""
    if graph == "model":
        return {
            "image": tuple(
                (b, 1, size, size) for b in (profile.min_batch, profile.opt_batch, profile.max_batch)
            )
        }
    if graph == "explain":
        fixed_image = ((1, 1, size, size),) * 3
        return {
            "image": fixed_image,
            "fill": fixed_image,
            "segments": ((size, size),) * 3,
            "z": (
                (profile.min_batch, 1),
                (profile.opt_batch, min(64, max_segments)),
                (profile.max_batch, max_segments),
            ),
        }
    raise CxrError(f"unknown graph {graph!r}")


def trt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise CxrError(f"cannot read the TensorRT version {version!r}") from None


def network_flags(version: str, strongly_typed_flag: int | None) -> int:
    """TRT 11: strong typing is always on (no flag). TRT 10: ask for a strongly typed network explicitly."""
    major = trt_major(version)
    if major < 10:
        raise CxrError(f"TensorRT {version} is too old; cxr-edge needs TensorRT 10.x or 11.x")
    if major >= 11:
        return 0
    if strongly_typed_flag is None:
        raise CxrError(f"TensorRT {version} has no STRONGLY_TYPED network flag")
    return 1 << int(strongly_typed_flag)


def sidecar_facts(
    graph: str,
    precision: str,
    source: Path,
    shapes: Shapes,
    trt_version: str,
    device: dict[str, str],
    seconds: float,
) -> dict[str, Any]:
    return {
        "graph": graph,
        "precision": precision,
        "trt_version": trt_version,
        "gpu_name": device.get("gpu_name"),
        "compute_capability": device.get("compute_capability"),
        "profile": {
            name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for name, s in shapes.items()
        },
        "source_onnx": source.name,
        "source_onnx_sha256": sha256_file(source),
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_plan(
    onnx_path: Path, shapes: Shapes, workspace_gb: float, timing_cache: Path | None
) -> tuple[bytes, str]:
    """Parse and build with TensorRT; every parser error is reported. Returns (plan bytes, TRT version)."""
    from cxr.runtime.backends.tensorrt import import_tensorrt

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(network_flags(trt.__version__, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CxrError(f"{onnx_path.name}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise CxrError(f"{onnx_path.name}: TensorRT failed to build an engine (see the log above)")
    if timing_cache:
        atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan), trt.__version__


def build_engines(
    bundle_dir: Path,
    precision: str = "fp16",
    profile: Profile = Profile(),
    timing_cache: Path | None = None,
    workspace_gb: float = 4.0,
    graphs: tuple[str, ...] = ("model", "explain"),
) -> list[dict[str, Any]]:
    """Build one plan per graph (classifier and explainer) and record them in the card, with the known answers
    TensorRT gives right after the build."""
    from cxr.export.stage import bundle_stage
    from cxr.runtime.backends.tensorrt import import_tensorrt

    check_precision(precision)
    import_tensorrt()  # fail early, in one line, where TensorRT is missing
    with bundle_stage(bundle_dir, f"build-engine {precision}") as work:
        return _build_into(Bundle.open(work), precision, profile, timing_cache, workspace_gb, graphs)


def _build_into(
    bundle: Bundle,
    precision: str,
    profile: Profile,
    timing_cache: Path | None,
    workspace_gb: float,
    graphs: tuple[str, ...],
) -> list[dict[str, Any]]:
    """The engines of the (staged) bundle, written and recorded in its card."""
    from cxr.runtime.backends.tensorrt import device_facts

    bundle_dir = bundle.folder
    written, results = [], []
    for graph in graphs:
        name = onnx_name(graph, precision)
        if not bundle.has(name):
            if graph == "model":
                raise CxrError(
                    f"{bundle_dir}: no {name}; create it first with 'cxr-export {precision} {bundle_dir}'"
                )
            continue
        source = bundle.verified(name)
        check_weights(source.read_bytes(), source)  # TensorRT would build finite nonsense from NaN weights
        shapes = profile_shapes(graph, bundle.card.input.size, profile)
        started = time.perf_counter()
        plan, version = build_plan(source, shapes, workspace_gb, timing_cache)
        target = bundle.folder / engine_name(graph, precision)
        atomic_write(target, bytes(plan))
        facts = write_sidecar(
            target,
            sidecar_facts(
                graph, precision, source, shapes, version, device_facts(), time.perf_counter() - started
            ),
        )
        written += [target.name, f"{target.name}.json"]
        results.append(facts)
        log.info(f"built {target} ({len(plan) / 1e6:.1f} MB, TensorRT {version}, {facts['gpu_name']})")
    engines = [name for name in written if name.endswith(".engine")]
    card = record_known_answers(bundle.folder, bundle.card, engines)  # TensorRT's own answers, on this GPU
    record_files(bundle.folder, forget_parity(card, [file_parity_label(precision, engine=True)]), written)
    return results
