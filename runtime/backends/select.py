"""``--backend auto``: TensorRT engine -> ONNX Runtime CUDA -> OpenVINO -> ONNX Runtime CPU, each chosen only
after it ran.

Every candidate must reproduce the card's known answers (its outputs on fixed probe films, recorded when the
file was written) before it is used; what was tried and why it was skipped is one line (the reason shown to
the user), never an error block. A backend named explicitly gets no fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from cxr.runtime.backends.base import Backend, ExplainerBackend
from cxr.runtime.bundle import Bundle, check_precision, engine_name, onnx_name
from cxr.runtime.card import Card, metadata_mismatch, parity_state
from cxr.runtime.cpu_features import NO_INT8_DOT, saturating_int8_cpu
from cxr.runtime.errors import BundleRefused, CxrError, CxrUsageError, one_line
from cxr.runtime.formats import FORMATS
from cxr.runtime.known_answers import check_classifier, check_explainer
from cxr.runtime.optional import install_hint

BACKENDS = ("auto", "tensorrt", "onnxruntime", "openvino")
Opened = TypeVar("Opened", Backend, ExplainerBackend)


def _engine_path(bundle: Bundle, graph: str, precision: str) -> Path | None:
    name = engine_name(graph, precision)
    return bundle.folder / name if bundle.has(name) else None


def describe(backend: Backend | ExplainerBackend) -> str:
    """'onnxruntime fp16 on cuda (CUDAExecutionProvider)': what the user is told runs their images."""
    where = f" on {backend.device}" + (f" ({backend.provider})" if backend.provider else "")
    return f"{backend.name} {backend.precision}{where}"


@dataclass(frozen=True)
class Openers:
    """How to open each backend kind for one graph: (path, verified bytes[, ORT providers]) -> backend."""

    tensorrt: Callable[[Path, bytes], Opened]
    onnxruntime: Callable[[Path, bytes, list[str] | None], Opened]
    openvino: Callable[[Path, bytes], Opened]


def _candidates(
    bundle: Bundle, backend: str, precision: str, graph: str, open_: Openers
) -> tuple[list[tuple[str, Callable[[], Opened]]], list[str]]:
    """(name, opener) pairs to try in order, and the reasons others were not even tried.

    auto: TensorRT engine -> ONNX Runtime CUDA -> OpenVINO (CPU) -> ONNX Runtime CPU."""
    from cxr.runtime.backends.onnxruntime import CPU_EP, gpu_providers
    from cxr.runtime.backends.openvino import openvino_available
    from cxr.runtime.backends.tensorrt import tensorrt_available

    check_precision(precision)
    if backend not in BACKENDS:
        raise CxrUsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    skipped: list[str] = []
    found: list[tuple[str, Callable[[], Opened]]] = []
    if backend in ("auto", "tensorrt"):
        engine = _engine_path(bundle, graph, precision)
        if engine is None:
            skipped.append(f"tensorrt: no {engine_name(graph, precision)} in the bundle")
        elif not tensorrt_available():
            skipped.append(f"tensorrt: TensorRT/cuda-python not installed ({install_hint('tensorrt')})")
        else:
            found.append(("tensorrt", lambda: open_.tensorrt(engine, bundle.verified_bytes(engine.name))))
        if backend == "tensorrt" and not found:
            hint = (
                f"; build it on this machine: 'cxr-export build-engine {bundle.folder} --precision "
                f"{precision}'"
                if engine is None
                else ""
            )
            raise CxrError(f"--backend {skipped[0]}{hint}")
    if backend == "tensorrt":
        return found, skipped
    path = bundle.onnx_path(
        graph, precision
    )  # checks it is there and listed; loaded below from verified bytes
    data = lambda: bundle.verified_bytes(path.name)  # noqa: E731  (read when, and each time, a candidate opens)
    if backend == "onnxruntime":
        found.append(("onnxruntime", lambda: open_.onnxruntime(path, data(), None)))
        return found, skipped
    if backend == "auto" and gpu_providers():
        found.append(
            ("onnxruntime-cuda", lambda: _on_gpu(open_.onnxruntime(path, data(), gpu_providers() + [CPU_EP])))
        )
    if openvino_available():
        found.append(("openvino", lambda: open_.openvino(path, data())))
    elif backend == "openvino":
        raise CxrError(f"--backend openvino: OpenVINO is not installed ({install_hint('openvino')})")
    else:
        skipped.append(f"openvino: not installed ({install_hint('openvino')})")
    if backend == "auto":
        found.append(("onnxruntime", lambda: open_.onnxruntime(path, data(), [CPU_EP])))
    return found, skipped


def _on_gpu(opened: Opened) -> Opened:
    """An ONNX Runtime session asked for CUDA that came up on the CPU only is not the CUDA candidate."""
    if opened.device != "cuda":
        opened.close()
        raise CxrError("the CUDA EP could not start (see the warning above)")
    return opened


def _first_that_runs(
    candidates: list[tuple[str, Callable[[], Opened]]], skipped: list[str], probe: Callable[[Opened], None]
) -> tuple[Opened, str]:
    """Open and probe each candidate in turn; the first that answers wins. A single candidate's failure is
    fatal."""
    for index, (name, opener) in enumerate(candidates):
        opened = None
        try:
            opened = opener()
            probe(opened)
        except Exception as exc:  # any failure of a candidate means: try the next one
            if opened is not None:
                opened.close()
            if isinstance(exc, BundleRefused) or (isinstance(exc, CxrError) and len(candidates) == 1):
                raise  # a bad bundle is refused as such, not "tried" on every backend
            skipped.append(f"{name}: {one_line(exc, 200)}")
            if index == len(candidates) - 1:
                raise CxrError(f"no backend could run this bundle ({'; '.join(skipped)})") from None
            continue
        reason = describe(opened) + (f"; skipped {'; '.join(skipped)}" if skipped else "")
        return opened, reason
    raise CxrError("no backend to try")


def check_meaning(backend: Backend | ExplainerBackend, card: Card) -> None:
    """The card's classes, input and preprocessing must be the ones the graph was exported with: an edited
    card (classes reordered or renamed) would pass every hash check and mislabel every image."""
    mismatch = metadata_mismatch(card, backend.metadata)
    if mismatch:
        raise BundleRefused(f"refused: {mismatch} (card.json was edited after export)")


def check_validated(bundle: Bundle, backend: Backend, allow_unvalidated: bool) -> str | None:
    """Refuse a graph or engine that failed parity or never ran it, unless allowed; returns the warning to
    show when allowed. (The fp32 ONNX graph counts as validated: export compares it with PyTorch.)"""
    engine = backend.name == "tensorrt"
    state = parity_state(bundle.card, backend.precision, engine)
    if backend.name not in ("tensorrt", "onnxruntime", "openvino"):
        return None
    what = f"the {backend.precision} {'engine' if engine else 'graph'}"
    if state == "passed":
        risk = int8_cpu_risk(bundle.card, backend)
        if risk is None:
            return None
        line = f"{what} {risk} (run 'cxr-export parity {bundle.folder} DATA' on this CPU)"
    else:
        line = (
            f"{what} {'FAILED parity' if state == 'failed' else 'has never run parity'} against the PyTorch "
            "model "
            f"(run 'cxr-export parity {bundle.folder} DATA')"
        )
    if not allow_unvalidated:
        raise CxrError(f"{line}; refused (--allow-unvalidated to use it anyway)")
    return f"{line}; used anyway (--allow-unvalidated)"


def int8_cpu_risk(card: Card, backend: Backend, flags: set[str] | None = None) -> str | None:
    """Why an int8 graph's passed parity does not hold on this CPU, or None: its weights use the full int8
    range, its parity ran on a CPU with VNNI/AMX (or on one not recorded), and this x86 CPU has neither, so
    its int8 sums can saturate (``cxr.runtime.cpu_features``)."""
    if backend.precision != "int8" or backend.device != "cpu" or not saturating_int8_cpu(flags):
        return None
    weights = str(card.provenance.get("int8", {}).get("model", {}).get("weights", ""))
    if "7-bit" in weights:
        return None
    checked_on = card.parity.get("backends", {}).get("int8", {}).get("cpu_int8", "a CPU not recorded")
    if checked_on == NO_INT8_DOT:
        return None
    return (
        f"passed parity on {checked_on}, but this CPU has {NO_INT8_DOT}, where its full-range int8 weights "
        "can saturate"
    )


def file_name(opened: Backend | ExplainerBackend, graph: str) -> str:
    """The bundle file ``opened`` runs: its engine for TensorRT, else its ONNX graph."""
    if opened.name == "tensorrt":
        return engine_name(graph, opened.precision)
    return onnx_name(graph, opened.precision)


def open_classifier(
    bundle: Bundle, backend: str = "auto", precision: str = "fp32", tf32: bool = True
) -> tuple[Backend, str]:
    """The first backend that reproduces the card's known answers (``cxr.runtime.known_answers``), and the
    line that says what runs and what was skipped.

    ``tf32=False`` keeps ONNX Runtime's CUDA fp32 at full fp32 precision (parity runs).
    """
    from cxr.runtime.backends.onnxruntime import CLASSIFIER_CUDA, OrtBackend
    from cxr.runtime.backends.openvino import OvBackend
    from cxr.runtime.backends.tensorrt import TrtBackend

    openers = Openers(
        tensorrt=lambda plan, data: TrtBackend(plan, precision, data),
        onnxruntime=lambda path, data, providers: OrtBackend(
            path, precision, providers, cuda=replace(CLASSIFIER_CUDA, tf32=tf32), data=data
        ),
        openvino=lambda path, data: OvBackend(path, precision, data),
    )
    candidates, skipped = _candidates(bundle, backend, precision, "model", openers)

    def probe(opened: Backend) -> None:
        check_meaning(opened, bundle.card)
        check_classifier(opened, bundle, file_name(opened, "model"))

    return _first_that_runs(candidates, skipped, probe)


def open_explainer(
    bundle: Bundle, backend: str = "auto", precision: str = "fp32", images: int | None = None
) -> tuple[ExplainerBackend, str]:
    """The LIME explainer, warmed up (its fixed batch shape searched once) before the first image on the
    known-answer probe, whose answers must be the card's; the host side warms up beside it. ``images``: how
    many the job will explain, when known (a short job opens with a quicker cuDNN search on CUDA:
    ``explainer_cuda``)."""
    from cxr.runtime.backends.onnxruntime import OrtExplainer, explainer_cuda
    from cxr.runtime.backends.openvino import OvExplainer
    from cxr.runtime.backends.tensorrt import TrtExplainer
    from cxr.runtime.explain import warm_host_beside

    cuda = explainer_cuda(images)
    openers = Openers(
        tensorrt=lambda plan, data: TrtExplainer(plan, precision, data),
        onnxruntime=lambda path, data, providers: OrtExplainer(
            path, precision, providers, data=data, cuda=cuda
        ),
        openvino=lambda path, data: OvExplainer(path, precision, data),
    )
    candidates, skipped = _candidates(bundle, backend, precision, "explain", openers)

    def probe(opened: ExplainerBackend) -> None:
        check_meaning(opened, bundle.card)
        check_explainer(opened, bundle, file_name(opened, "explain"))

    return warm_host_beside(lambda: _first_that_runs(candidates, skipped, probe))


def runnable_here(bundle: Bundle, graph: str = "model") -> list[tuple[str, str]]:
    """(backend, precision) for every file of ``graph`` in the bundle whose runtime is installed here: ONNX
    Runtime and OpenVINO for each ONNX graph, TensorRT for each engine. (Installed, not probed: ``open_*``
    probes.)"""
    from cxr.runtime.backends.openvino import openvino_available
    from cxr.runtime.backends.tensorrt import tensorrt_available

    found = []
    for precision, fmt in FORMATS.items():
        if bundle.has(fmt.onnx_name(graph)):
            found.append(("onnxruntime", precision))
            if openvino_available():
                found.append(("openvino", precision))
        if bundle.has(fmt.engine_name(graph)) and tensorrt_available():
            found.append(("tensorrt", precision))
    return found
