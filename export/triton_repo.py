"""A Triton Inference Server model repository from a bundle: the TensorRT plan or the ONNX classifier.

``config.pbtxt`` is built as Triton's own ``ModelConfig`` protobuf (from tritonclient) and written in
text format; input/output names, dtypes and dims are read from the ONNX graph the model came from
(a strongly typed plan keeps the graph's I/O types), and ``max_batch_size`` must fit the engine
profile. ``validate_repository`` checks a repository (ours or hand-edited) against its graph.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.bundle import Bundle, check_precision, engine_name, onnx_name
from cxr.runtime.card import Card
from cxr.runtime.engine_sidecar import read_sidecar, sidecar_path
from cxr.runtime.errors import CxrError, CxrUsageError
from cxr.runtime.formats import FORMATS as FORMATS_TABLE
from cxr.runtime.formats import get_format
from cxr.runtime.optional import require

FORMATS = ("auto", "tensorrt", "onnx")
KINDS = ("gpu", "cpu")
PLATFORMS = {"tensorrt": "tensorrt_plan", "onnx": "onnxruntime_onnx"}
MODEL_FILES = {"tensorrt": "model.plan", "onnx": "model.onnx"}
LABELS_FILE = "labels.txt"
CLIENT_NOTE = "CLIENTS.md"
MARKER = ".cxr-edge-model"  # proves a model folder was written here, so it may be replaced


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; ``dims`` excludes the batch axis (-1 = dynamic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int, ...]
    batched: bool


@dataclass(frozen=True, kw_only=True)
class RepoOptions:
    precision: str = "fp16"
    max_batch: int = 64
    format: str = "auto"
    kind: str = "gpu"
    instances: int = 1
    max_queue_delay_us: int = 2000
    trt_accelerator: bool = False
    name: str = "cxr"
    force: bool = False  # replace an existing folder of that name that cxr-export did not write


def _model_config_pb2():
    return require("tritonclient.grpc.model_config_pb2", "Triton export", extra="export")


def _text_format():
    from google.protobuf import text_format

    return text_format


def graph_io(onnx_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph; the first axis is the batch when it is symbolic."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        batched = bool(dims) and dims[0] == -1
        return TensorSpec(
            value.name,
            np.dtype(tensor_dtype_to_np_dtype(tensor.elem_type)),
            tuple(dims[1:] if batched else dims),
            batched,
        )

    inputs = [spec(v) for v in graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in graph.output]


def triton_type(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    name = np_to_triton_dtype(dtype)
    if name is None:
        raise CxrError(f"dtype {dtype} has no Triton equivalent")
    return f"TYPE_{name}"


def choose_format(bundle: Bundle, options: RepoOptions) -> str:
    if options.format not in FORMATS:
        raise CxrUsageError(f"--format must be one of {', '.join(FORMATS)}, got {options.format!r}")
    has_plan = bundle.has(engine_name("model", options.precision))
    if options.format == "tensorrt" and not has_plan:
        raise CxrError(
            f"--format tensorrt: no {engine_name('model', options.precision)} in {bundle.folder} "
            f"(build it on the serving GPU: 'cxr-export build-engine {bundle.folder} --precision "
            f"{options.precision}')"
        )
    if options.format == "auto":
        return "tensorrt" if has_plan else "onnx"
    return options.format


def _check_options(options: RepoOptions, fmt: str) -> None:
    if not get_format(check_precision(options.precision)).triton_trt_mode:
        served = ", ".join(p for p, f in FORMATS_TABLE.items() if f.triton_trt_mode)
        raise CxrUsageError(f"--precision {options.precision}: a Triton repository serves {served}")
    if options.kind not in KINDS:
        raise CxrUsageError(f"--kind must be one of {', '.join(KINDS)}, got {options.kind!r}")
    if options.max_batch < 1 or options.instances < 1 or options.max_queue_delay_us < 0:
        raise CxrUsageError("--max-batch and --instances must be at least 1, --max-queue-delay-us at least 0")
    if fmt == "tensorrt" and options.kind == "cpu":
        raise CxrError("a TensorRT plan runs only on a GPU: use --kind gpu or --format onnx")
    if options.trt_accelerator and (fmt != "onnx" or options.kind != "gpu"):
        raise CxrUsageError("--trt-accelerator applies to the ONNX graph on a GPU (--format onnx --kind gpu)")
    if not options.name.replace("_", "").replace("-", "").isalnum():
        raise CxrUsageError(f"--name must be letters, digits, '-' or '_', got {options.name!r}")


def profile_max_batch(facts: dict) -> tuple[int, int]:
    """(min, max) batch of the plan's profile for its ``image`` input."""
    try:
        shape = facts["profile"]["image"]
        return int(shape["min"][0]), int(shape["max"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        raise CxrError(
            "the engine sidecar has no profile for 'image'; rebuild with 'cxr-export build-engine'"
        ) from None


def build_config(options: RepoOptions, fmt: str, inputs: list[TensorSpec], outputs: list[TensorSpec]):
    """Triton's ModelConfig: I/O from the graph, dynamic batching, instance group, optional TRT
    accelerator."""
    mc = _model_config_pb2()
    config = mc.ModelConfig(name=options.name, platform=PLATFORMS[fmt], max_batch_size=options.max_batch)
    for spec in inputs:
        config.input.add(
            name=spec.name, data_type=mc.DataType.Value(triton_type(spec.dtype)), dims=list(spec.dims)
        )
    for spec in outputs:
        config.output.add(
            name=spec.name,
            data_type=mc.DataType.Value(triton_type(spec.dtype)),
            dims=list(spec.dims),
            label_filename=LABELS_FILE if spec.name == "probs" else "",
        )
    preferred = sorted({b for b in (4, 8, 16, 32, options.max_batch) if b <= options.max_batch})
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    kind = mc.ModelInstanceGroup.Kind.Value("KIND_GPU" if options.kind == "gpu" else "KIND_CPU")
    config.instance_group.add(count=options.instances, kind=kind)
    if options.trt_accelerator:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt"
        )
        accelerator.parameters["precision_mode"] = get_format(options.precision).triton_trt_mode
        accelerator.parameters["max_workspace_size_bytes"] = str(1 << 30)
    return config


def client_note(
    card: Card, options: RepoOptions, fmt: str, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> str:
    size = card.input.size
    io = "\n".join(
        f"- input `{s.name}`: {triton_type(s.dtype)} [batch, {', '.join(map(str, s.dims))}]" for s in inputs
    )
    io += "\n" + "\n".join(
        f"- output `{s.name}`: {triton_type(s.dtype)} [batch, {', '.join(map(str, s.dims))}]" for s in outputs
    )
    interpolation = card.preprocessing.interpolation
    return f"""# {options.name}: cxr-edge {card.arch} ({fmt}, {options.precision})

Classes, in output order: {", ".join(card.classes)} (also `{LABELS_FILE}`).

{io}

## Preprocessing the client must do
The graph takes **uint8 grayscale pixels** and normalises them itself (x/255, ImageNet mean/std, grayscale
repeated to 3 channels). Before sending, each image is:
1. decoded to grayscale (DICOM: modality LUT/VOI window applied, MONOCHROME1 inverted), scaled to uint8;
{suppression_steps(card)}2. resized so its **short side is {size}** ({interpolation} interpolation);
3. **centre-cropped to {size} x {size}**, sent as [1, {size}, {size}]{border_step(card)}.

`cxr-run predict --server URL --model BUNDLE` does exactly this with the same reader as local predict
(`cxr/runtime/preprocess.py`, `cxr/runtime/suppress.py`). Any other client: reproduce every step or results
will drift from the validated model.
"""


def suppression_steps(card: Card) -> str:
    """The card's whole-film shortcut-suppression steps, as lines of the client note (empty when off)."""
    steps = []
    if card.preprocessing.thorax_crop:
        steps.append(
            "   then **cropped to the body**: Otsu threshold, largest bright component, the box of its "
            "convex "
            "hull plus 4 % margins (`thorax_box`);"
        )
    if card.preprocessing.clahe:
        steps.append("   then **CLAHE** (clip limit 2, 8 x 8 tiles);")
    return "".join(line + "\n" for line in steps)


def border_step(card: Card) -> str:
    band = card.preprocessing.border_mask
    return f", with a band of {band:.0%} of the side set to 0 at every edge" if band > 0 else ""


def export_repository(bundle: Bundle, out: Path, options: RepoOptions) -> Path:
    """Write REPO/NAME/{config.pbtxt, 1/model.*, labels.txt, card.json, CLIENTS.md}; returns the model
    folder."""
    fmt = choose_format(bundle, options)
    _check_options(options, fmt)
    if fmt == "tensorrt":
        plan, plan_bytes, source = _checked_plan(bundle, options)
    else:
        plan, plan_bytes, source = None, b"", bundle.onnx_path("model", options.precision)
    inputs, outputs = graph_io(source)
    config = build_config(options, fmt, inputs, outputs)
    model_dir, staging = out / options.name, out / f".{options.name}.partial"
    _fresh_staging(model_dir, staging, options.force)
    if plan is not None:
        # the bytes that were checked, not the path again
        (staging / "1" / MODEL_FILES[fmt]).write_bytes(plan_bytes)
        shutil.copyfile(sidecar_path(plan), staging / "engine.json")
    else:
        shutil.copyfile(source, staging / "1" / MODEL_FILES[fmt])
    (staging / "config.pbtxt").write_text(_text_format().MessageToString(config))
    (staging / LABELS_FILE).write_text("\n".join(bundle.card.classes) + "\n")
    (staging / "card.json").write_text(json.dumps(bundle.card.to_dict(), indent=2) + "\n")
    (staging / CLIENT_NOTE).write_text(client_note(bundle.card, options, fmt, inputs, outputs))
    (staging / MARKER).write_text("written by cxr-export triton; replaced by the next export of this name\n")
    problems = validate_repository(out, staging.name, expected_name=options.name)
    if problems:
        shutil.rmtree(staging)
        raise CxrError(f"{model_dir}: generated repository does not validate: {'; '.join(problems)}")
    if model_dir.is_symlink() or model_dir.is_file():  # replaced only once the new one is complete and valid
        model_dir.unlink()
    elif model_dir.exists():
        shutil.rmtree(model_dir)
    staging.rename(model_dir)
    return model_dir


def _checked_plan(bundle: Bundle, options: RepoOptions) -> tuple[Path, bytes, Path]:
    """The engine (path and verified bytes) whose sidecar hash matches and whose profile holds
    1..max_batch, and the ONNX graph it was built from."""
    plan = bundle.folder / engine_name("model", options.precision)
    plan_bytes = bundle.verified_bytes(plan.name)
    facts = read_sidecar(plan)
    if hashlib.sha256(plan_bytes).hexdigest() != facts.get("plan_sha256"):
        raise CxrError(
            f"{plan}: sha256 does not match its sidecar {sidecar_path(plan).name}; rebuild the engine"
        )
    low, high = profile_max_batch(facts)
    if options.max_batch > high or low > 1:
        raise CxrUsageError(
            f"--max-batch {options.max_batch}: the engine profile covers batches {low}..{high}; "
            f"Triton needs 1..max_batch inside it (use --max-batch {high} or rebuild the engine)"
        )
    return (
        plan,
        plan_bytes,
        bundle.verified(facts.get("source_onnx") or onnx_name("model", options.precision)),
    )


def _fresh_staging(model_dir: Path, staging: Path, force: bool) -> None:
    """An empty staging folder (with its version folder 1/) beside a model folder we may replace."""
    if (model_dir.exists() or model_dir.is_symlink()) and not force and not (model_dir / MARKER).is_file():
        raise CxrError(
            f"{model_dir}: exists and is not a model folder written by cxr-export (no {MARKER}); "
            "choose another --name or --out, or pass --force to replace it"
        )
    if staging.is_symlink():
        staging.unlink()
    elif staging.exists():
        shutil.rmtree(staging)
    (staging / "1").mkdir(parents=True)


def read_config(model_dir: Path):
    """Parse config.pbtxt into Triton's ModelConfig; a one-line error when it is not valid text format."""
    mc = _model_config_pb2()
    path = model_dir / "config.pbtxt"
    if not path.is_file():
        raise CxrError(f"{model_dir}: no config.pbtxt")
    try:
        return _text_format().Parse(path.read_text(), mc.ModelConfig())
    except _text_format().ParseError as exc:
        raise CxrError(f"{path}: not a valid Triton model config ({exc})") from None


def plan_io(plan: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """I/O of a TensorRT plan, read by TensorRT itself (only where TensorRT is installed)."""
    from cxr.runtime.backends.tensorrt import import_tensorrt

    trt = import_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise CxrError(f"{plan}: TensorRT could not deserialize this plan (other TensorRT version or GPU?)")
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dims = tuple(engine.get_tensor_shape(name))
        spec = TensorSpec(
            name, np.dtype(trt.nptype(engine.get_tensor_dtype(name))), tuple(dims[1:]), dims[0] == -1
        )
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
    return inputs, outputs


def _compare(kind: str, declared, graph: list[TensorSpec], problems: list[str]) -> None:
    mc = _model_config_pb2()
    by_name = {spec.name: spec for spec in graph}
    names = [t.name for t in declared]
    if sorted(names) != sorted(by_name):
        problems.append(f"{kind} names {names} differ from the graph's {sorted(by_name)}")
    for tensor in declared:
        spec = by_name.get(tensor.name)
        if spec is None:
            continue
        declared_type = mc.DataType.Name(tensor.data_type)
        if declared_type != triton_type(spec.dtype):
            problems.append(
                f"{kind} {tensor.name}: {declared_type} but the graph has {triton_type(spec.dtype)}"
            )
        dims = tuple(tensor.dims)
        fits = len(dims) == len(spec.dims) and all(g == -1 or g == d for d, g in zip(dims, spec.dims))
        if not fits:
            problems.append(
                f"{kind} {tensor.name}: dims {list(dims)} but the graph has {list(spec.dims)} (batch "
                "excluded)"
            )


def _model_file(model_dir: Path, platform: str) -> Path | None:
    name = {v: MODEL_FILES[k] for k, v in PLATFORMS.items()}.get(platform)
    versions = sorted(
        (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    if name is None or not versions:
        return None
    path = versions[-1] / name
    return path if path.is_file() else None


def validate_repository(repo: Path, name: str, expected_name: str | None = None) -> list[str]:
    """Problems that would make Triton refuse the model or serve wrong answers (empty list: valid)."""
    model_dir = repo / name
    if not model_dir.is_dir():
        return [f"{repo}: no model folder {name!r}"]
    try:
        config = read_config(model_dir)
    except CxrError as exc:
        return [str(exc)]
    problems: list[str] = []
    expected_name = expected_name or name
    if config.name and config.name != expected_name:
        problems.append(f"config name {config.name!r} differs from its folder {expected_name!r}")
    model_file = _model_file(model_dir, config.platform)
    if model_file is None:
        return problems + [
            f"no {MODEL_FILES.get('tensorrt' if config.platform == 'tensorrt_plan' else 'onnx')} "
            f"in a numeric version folder for platform {config.platform!r}"
        ]
    io = _model_io(model_dir, config, model_file, problems)
    if io is None:
        return problems  # names/dtypes of a plan can only be read by TensorRT
    inputs, outputs = io
    _compare("input", config.input, inputs, problems)
    _compare("output", config.output, outputs, problems)
    if config.max_batch_size > 0 and not all(s.batched for s in inputs + outputs):
        problems.append("max_batch_size > 0 but the graph has a fixed first axis")
    too_big = [b for b in config.dynamic_batching.preferred_batch_size if b > config.max_batch_size]
    if too_big:
        problems.append(f"preferred_batch_size {too_big} above max_batch_size {config.max_batch_size}")
    return problems + _label_problems(model_dir, config)


def _model_io(
    model_dir: Path, config: Any, model_file: Path, problems: list[str]
) -> tuple[list, list] | None:
    """The model file's inputs and outputs (an engine's profile checked against max_batch_size on the way);
    None for a plan where TensorRT is not installed to read it."""
    if config.platform == "onnxruntime_onnx":
        return graph_io(model_file)
    sidecar = model_dir / "engine.json"
    facts = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if facts:
        low, high = profile_max_batch(facts)
        if config.max_batch_size > high or low > 1:
            problems.append(
                f"max_batch_size {config.max_batch_size} outside the engine profile {low}..{high}"
            )
    from cxr.runtime.backends.tensorrt import tensorrt_available

    return plan_io(model_file) if tensorrt_available() else None


def _label_problems(model_dir: Path, config: Any) -> list[str]:
    """Each labelled output's labels file must name one class per output column."""
    problems = []
    for tensor in config.output:
        if not tensor.label_filename:
            continue
        labels = model_dir / tensor.label_filename
        count = len(labels.read_text().split()) if labels.is_file() else 0
        if count != (tensor.dims[-1] if tensor.dims else 0):
            problems.append(f"{tensor.label_filename}: {count} labels for {list(tensor.dims)} outputs")
    return problems
