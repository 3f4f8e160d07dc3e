"""The backends, discovered rather than listed: every module of ``cxr.runtime.backends`` registers what it
runs (``register``), and selection, parity, ``info`` and the CLIs' ``--backend`` read this registry.

A backend is one module, ``runtime/backends/<name>.py``: a ``Backend`` (classifier) and an
``ExplainerBackend`` subclass, then one ``register(BackendSpec(...))`` saying what it needs and offers: the
kind of bundle file it runs (ONNX graphs or TensorRT engines), its precisions, where it runs, a cheap
availability check (nothing heavy is imported, so ``--help`` works where the backend is not installed),
where ``--backend auto`` tries it, and how its classes open a file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cxr.runtime.backends.base import Backend, ExplainerBackend
from cxr.runtime.card import parity_label
from cxr.runtime.errors import CxrUsageError
from cxr.runtime.formats import COMMON_PRECISIONS, PRECISIONS, get_format

AUTO = "auto"
ONNX, ENGINE = "onnx", "engine"  # the kinds of bundle file a backend runs
CLASSIFIER, EXPLAINER = "model", "explain"  # the graphs, as the formats table names them
NOT_BACKENDS = frozenset({"base", "registry", "select"})  # modules of the package that register nothing


@dataclass(frozen=True, kw_only=True)
class OpenFile:
    """One bundle file to open, with the options some backends read (the others ignore them)."""

    path: Path
    data: bytes  # the file's verified bytes (``path`` only names it)
    precision: str
    providers: list[str] | None = None  # ONNX Runtime's execution providers (None: the best usable here)
    tf32: bool = True  # classifier on CUDA: TF32 for fp32 (off for parity)
    images: int | None = None  # explainer: how many images the job explains, when known


def _always() -> bool:
    return True


def _runs_every(precision: str) -> str | None:
    return None


@dataclass(frozen=True, kw_only=True)
class Place:
    """One way ``--backend auto`` tries a backend: its label (in the line saying what was skipped), its rank
    in auto's order (lower first), the device it must come up on (None: wherever it opens), the ONNX Runtime
    providers it asks for, and when it is tried at all."""

    label: str
    rank: int
    device: str | None = None
    providers: Callable[[], list[str]] | None = None
    when: Callable[[], bool] = _always
    fastest_first: tuple[str, ...] | None = None  # --precision auto's order here (None: the backend's)


@dataclass(frozen=True, kw_only=True)
class BackendSpec:
    """What a backend registers. ``available`` must be cheap and import nothing heavy (``--help`` and
    ``auto`` call it on machines without the backend); ``requires`` is the module whose install hint names
    the extra that brings it."""

    name: str  # --backend NAME; also each record's "backend"
    title: str  # how messages name it: "TensorRT/cuda-python", "OpenVINO"
    runs: str  # ONNX: the bundle's ONNX graphs; ENGINE: plans built from them on the target
    device: str  # where it runs, for people: "cpu", "cuda", "cuda or cpu"
    rank: int  # its place in auto's order (lower first); ``places`` may refine it
    classifier: type[Backend]
    explainer: type[ExplainerBackend]
    available: Callable[[], bool] = _always
    requires: str = ""
    precisions: tuple[str, ...] = COMMON_PRECISIONS
    # --precision auto: the precisions it may pick here, fastest first as measured (``cxr-bench latency``); a
    # precision slower than another that passed parity is left out
    fastest_first: tuple[str, ...] = ("fp32",)
    refuses: Callable[[str], str | None] = _runs_every  # why this host cannot run a precision, or None
    places: tuple[Place, ...] = ()  # default: one place, its name at its rank
    parity_prefix: str | None = None  # parity label PREFIX-precision; None: the ONNX graph's own label
    # how its classes open a file; default: classifier(path, precision, data=...), the same for explainer
    open_classifier: Callable[[OpenFile], Backend] | None = None
    open_explainer: Callable[[OpenFile], ExplainerBackend] | None = None

    @property
    def auto_places(self) -> tuple[Place, ...]:
        return self.places or (Place(label=self.name, rank=self.rank),)

    def speed_order(self, place: Place) -> tuple[str, ...]:
        """The precisions ``--precision auto`` tries at ``place``, fastest first."""
        return place.fastest_first or self.fastest_first

    def file_name(self, graph: str, precision: str) -> str:
        """The bundle file this backend runs for ``graph`` at ``precision``."""
        fmt = get_format(precision)
        return fmt.engine_name(graph) if self.runs == ENGINE else fmt.onnx_name(graph)

    def parity_label(self, precision: str) -> str:
        """Its label in the parity report: 'onnx', 'engine-fp16', 'openvino-int8' ..."""
        return parity_label(precision, self.parity_prefix)

    def open(self, graph: str, file: OpenFile) -> Backend | ExplainerBackend:
        """The classifier (graph 'model') or explainer (graph 'explain') on ``file``."""
        custom = self.open_classifier if graph == CLASSIFIER else self.open_explainer
        if custom is not None:
            return custom(file)
        cls = self.classifier if graph == CLASSIFIER else self.explainer
        return cls(file.path, file.precision, data=file.data)


_REGISTERED: dict[str, BackendSpec] = {}
_discovered = False


def register(spec: BackendSpec) -> BackendSpec:
    """Add a backend; its classes must say the same name, and the name must be new."""
    if spec.name == AUTO or spec.name in _REGISTERED:
        raise ValueError(f"backend name {spec.name!r} is taken")
    if spec.runs not in (ONNX, ENGINE):
        raise ValueError(f"{spec.name}: runs must be {ONNX!r} or {ENGINE!r}, got {spec.runs!r}")
    if not (issubclass(spec.classifier, Backend) and issubclass(spec.explainer, ExplainerBackend)):
        raise TypeError(f"{spec.name}: classifier must be a Backend and explainer an ExplainerBackend")
    for cls in (spec.classifier, spec.explainer):
        if cls.name != spec.name:
            raise ValueError(f"{cls.__name__}.name is {cls.name!r}, but it registers as {spec.name!r}")
    unknown = set(spec.precisions) - set(PRECISIONS)
    unknown |= {p for place in spec.auto_places for p in spec.speed_order(place)} - set(spec.precisions)
    if unknown:
        raise ValueError(f"{spec.name}: unknown precisions {sorted(unknown)}")
    _REGISTERED[spec.name] = spec
    return spec


def _discover() -> None:
    """Import every module of the backends package once; each registers its backend as it is imported."""
    global _discovered
    if _discovered:
        return
    import cxr.runtime.backends as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in NOT_BACKENDS and not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    _discovered = True


def backends() -> list[BackendSpec]:
    """Every registered backend, by name (the order listings and parity targets use)."""
    _discover()
    return [_REGISTERED[name] for name in sorted(_REGISTERED)]


def names() -> tuple[str, ...]:
    return tuple(spec.name for spec in backends())


def get(name: str) -> BackendSpec:
    """The backend called ``name``, or a one-line usage error listing the choices."""
    _discover()
    if name not in _REGISTERED:
        raise CxrUsageError(f"--backend must be one of {', '.join((AUTO, *names()))}, got {name!r}")
    return _REGISTERED[name]


def find(name: str) -> BackendSpec | None:
    """The backend called ``name``, or None (a remote server, a benchmark's own runner)."""
    _discover()
    return _REGISTERED.get(name)


def runs_engine(opened: Backend | ExplainerBackend) -> bool:
    """Does ``opened`` run a TensorRT-style engine (its own file kind, parity label and tolerance)?"""
    spec = find(opened.name)
    return spec is not None and spec.runs == ENGINE


def auto_order() -> list[Place]:
    """Every place ``--backend auto`` may try, in its order."""
    return sorted((place for spec in backends() for place in spec.auto_places), key=lambda p: p.rank)


def backend_help() -> str:
    """The ``--backend`` help every CLI shows, from the registry."""
    order = " -> ".join(place.label for place in auto_order())
    return f"{AUTO} (the first that runs of {order}), {', '.join(names()[:-1])} or {names()[-1]}."


def parity_choices() -> tuple[str, ...]:
    """What ``cxr-export parity --backends`` accepts: each ONNX graph's label ('onnx', 'fp16', 'int8') and the
    prefix of every other runner ('engine', 'openvino')."""
    graphs = tuple(parity_label(precision) for precision in PRECISIONS)
    prefixes = tuple(dict.fromkeys(s.parity_prefix for s in sorted(backends(), key=lambda s: s.rank)))
    return graphs + tuple(p for p in prefixes if p)


def for_precision(precision: str) -> tuple[str, ...]:
    """The backends that run ``precision``, in auto's order (the formats table's 'runs on')."""
    return tuple(s.name for s in sorted(backends(), key=lambda s: s.rank) if precision in s.precisions)
