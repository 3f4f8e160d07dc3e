"""``--backend auto``: every registered backend (``cxr.runtime.backends.registry``) in its rank's order, today
TensorRT engine -> ONNX Runtime CUDA -> OpenVINO -> ONNX Runtime CPU, each chosen only after it ran.

Every candidate must reproduce the card's known answers (its outputs on fixed probe films, recorded when the
file was written) before it is used; what was tried and why it was skipped is one line (the reason shown to
the user), never an error block. A backend named explicitly gets no fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cxr.runtime.backends import registry
from cxr.runtime.backends.base import Backend, ExplainerBackend
from cxr.runtime.backends.registry import AUTO, ENGINE, BackendSpec, OpenFile, Place
from cxr.runtime.bundle import Bundle, check_precision
from cxr.runtime.card import Card, metadata_mismatch, parity_state
from cxr.runtime.cpu_features import NO_INT8_DOT, saturating_int8_cpu
from cxr.runtime.errors import BundleRefused, CxrError, one_line
from cxr.runtime.formats import FORMATS
from cxr.runtime.known_answers import check_classifier, check_explainer
from cxr.runtime.optional import install_hint

Opened = TypeVar("Opened", Backend, ExplainerBackend)
Candidate = tuple[str, Callable[[], Opened]]


def describe(backend: Backend | ExplainerBackend) -> str:
    """'onnxruntime fp16 on cuda (CUDAExecutionProvider)': what the user is told runs their images."""
    where = f" on {backend.device}" + (f" ({backend.provider})" if backend.provider else "")
    return f"{backend.name} {backend.precision}{where}"


def _source(bundle: Bundle, spec: BackendSpec, graph: str, precision: str) -> Path | None:
    """The bundle file ``spec`` runs; None for a missing engine (built on the target, so often absent). A
    missing ONNX graph is the bundle's fault: ``onnx_path`` says which command makes it."""
    if spec.runs != ENGINE:
        return bundle.onnx_path(graph, precision)  # checks it is there and listed
    name = spec.file_name(graph, precision)
    return bundle.folder / name if bundle.has(name) else None


def _opener(
    bundle: Bundle, spec: BackendSpec, place: Place, graph: str, path: Path, file: dict
) -> Callable[[], Opened]:
    """Opens ``spec`` at ``place`` on ``path``, reading its verified bytes when (and each time) it opens."""

    def open_() -> Opened:
        providers = place.providers() if place.providers is not None else None
        opened = spec.open(
            graph, OpenFile(path=path, data=bundle.verified_bytes(path.name), providers=providers, **file)
        )
        if place.device is not None and opened.device != place.device:
            opened.close()  # e.g. an ONNX Runtime session asked for CUDA that came up on the CPU only
            raise CxrError(f"{place.label} came up on the {opened.device} (see the warning above)")
        return opened

    return open_


def _named(bundle: Bundle, spec: BackendSpec, precision: str, graph: str, file: dict) -> list[Candidate]:
    """``--backend NAME``: that backend alone, or one line saying why it cannot run here."""
    why = _cannot_run(spec, precision)
    if why:
        raise CxrError(f"--backend {spec.name}: {why}")
    path = _source(bundle, spec, graph, precision)
    if path is None:
        raise CxrError(
            f"--backend {spec.name}: no {spec.file_name(graph, precision)} in the bundle; build it on this "
            f"machine: 'cxr-export build-engine {bundle.folder} --precision {precision}'"
        )
    if not spec.available():
        hint = install_hint(spec.requires)
        raise CxrError(f"--backend {spec.name}: {spec.title} is not installed ({hint})")
    return [(spec.name, _opener(bundle, spec, Place(label=spec.name, rank=0), graph, path, file))]


def _cannot_run(spec: BackendSpec, precision: str) -> str | None:
    """Why ``spec`` never runs ``precision`` on this host (not one of its precisions, or refused here)."""
    if precision not in spec.precisions:
        others = ", ".join(registry.for_precision(precision)) or "no backend"
        return f"{spec.name} does not run {precision} ({precision} runs on {others})"
    return spec.refuses(precision)


def _auto(bundle: Bundle, precision: str, graph: str, file: dict) -> tuple[list[Candidate], list[str]]:
    """Every registered backend's places in auto's order, and why the others were not even tried."""
    ranked: list[tuple[int, Candidate]] = []
    skipped: list[str] = []
    for spec in sorted(registry.backends(), key=lambda s: s.rank):
        if precision not in spec.precisions:
            continue
        refused = spec.refuses(precision)
        path = None if refused else _source(bundle, spec, graph, precision)  # hashes the file: once
        if refused:
            skipped.append(f"{spec.name}: {refused}")
        elif path is None:
            skipped.append(f"{spec.name}: no {spec.file_name(graph, precision)} in the bundle")
        elif not spec.available():
            skipped.append(f"{spec.name}: {spec.title} not installed ({install_hint(spec.requires)})")
        else:
            ranked += [
                (place.rank, (place.label, _opener(bundle, spec, place, graph, path, file)))
                for place in spec.auto_places
                if place.when()
            ]
    return [candidate for _, candidate in sorted(ranked, key=lambda item: item[0])], skipped


def _candidates(
    bundle: Bundle, backend: str, precision: str, graph: str, maps: bool = False, **file: object
) -> tuple[list[Candidate], list[str]]:
    """(label, opener) pairs to try in order, and the reasons others were not even tried. ``file``: the
    options ``OpenFile`` carries to the backend (tf32, images); ``maps``: the job explains (``--precision
    auto`` then skips precisions whose maps are not faithful)."""
    if precision == AUTO:
        return _fastest_validated(bundle, backend, graph, file, maps)
    check_precision(precision)
    file = {**file, "precision": precision}
    if backend == AUTO:
        return _auto(bundle, precision, graph, file)
    return _named(bundle, registry.get(backend), precision, graph, file), []


def _fastest_validated(
    bundle: Bundle, backend: str, graph: str, file: dict, maps: bool = False
) -> tuple[list[Candidate], list[str]]:
    """``--precision auto``: at each place of ``backend`` (every backend for auto) in auto's order, its
    precisions fastest first (``BackendSpec.fastest_first``), each only where the bundle has the file, this
    host can run it and its parity passed here (int8: on a CPU of this kind); for a job that explains
    (``maps``), only precisions whose maps are faithful (``Format.faithful_maps``). The first that opens
    wins."""
    specs = registry.backends() if backend == AUTO else [registry.get(backend)]
    places = sorted(
        ((place, spec) for spec in specs for place in spec.auto_places), key=lambda ps: ps[0].rank
    )
    ranked: list[Candidate] = []
    skipped: list[str] = []
    sources: dict[tuple[str, str], Path | None] = {}  # each file hashed once, whatever the places sharing it
    for place, spec in places:
        if not (spec.available() and place.when()):
            continue
        for precision in spec.speed_order(place):
            why = spec.refuses(precision) or _not_validated_here(bundle, spec, precision, place.device)
            if why is None and maps and not FORMATS[precision].faithful_maps:
                why = "its LIME maps keep under 90 % of the fp32 map's top 5"
            if why is None:
                key = (spec.name, precision)
                if key not in sources:
                    sources[key] = _source(bundle, spec, graph, precision)
                path = sources[key]
                why = None if path is not None else f"no {spec.file_name(graph, precision)}"
            if why:
                skipped.append(f"{place.label} {precision}: {why}")
                continue
            opener = _opener(bundle, spec, place, graph, path, {**file, "precision": precision})
            ranked.append((f"{place.label} {precision}", opener))
    if not ranked:
        raise CxrError(
            f"--precision auto: nothing validated runs here ({'; '.join(skipped) or 'no backend'})"
        )
    return ranked, skipped


def _not_validated_here(bundle: Bundle, spec: BackendSpec, precision: str, device: str | None) -> str | None:
    """Why ``precision`` on ``spec`` is not one ``--precision auto`` may pick, or None."""
    if not bundle.has(spec.file_name("model", precision)):
        return f"no {spec.file_name('model', precision)}"
    state = parity_state(bundle.card, precision, spec.runs == ENGINE)
    if state != "passed":
        return f"parity {state}"
    return int8_precision_risk(bundle.card, precision, device or spec.device)


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
    raise CxrError(f"no backend can run it here ({'; '.join(skipped) or 'none registered'})")


def check_meaning(backend: Backend | ExplainerBackend, card: Card) -> None:
    """The card's classes, input and preprocessing must be the ones the graph was exported with: an edited
    card (classes reordered or renamed) would pass every hash check and mislabel every image."""
    mismatch = metadata_mismatch(card, backend.metadata)
    if mismatch:
        raise BundleRefused(f"refused: {mismatch} (card.json was edited after export)")


def check_validated(bundle: Bundle, backend: Backend, allow_unvalidated: bool) -> str | None:
    """Refuse a graph or engine that failed parity or never ran it, unless allowed; returns the warning to
    show when allowed. (The fp32 ONNX graph counts as validated: export compares it with PyTorch.)"""
    if registry.find(backend.name) is None:
        return None  # not a bundle file run here (a server answers for its own)
    engine = registry.runs_engine(backend)
    state = parity_state(bundle.card, backend.precision, engine)
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
    return int8_precision_risk(card, backend.precision, backend.device, flags)


def int8_precision_risk(card: Card, precision: str, device: str, flags: set[str] | None = None) -> str | None:
    """``int8_cpu_risk`` before anything is opened: for ``precision`` run on ``device``."""
    if precision != "int8" or device != "cpu" or not saturating_int8_cpu(flags):
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
    return registry.get(opened.name).file_name(graph, opened.precision)


def open_classifier(
    bundle: Bundle, backend: str = AUTO, precision: str = "fp32", tf32: bool = True, maps: bool = False
) -> tuple[Backend, str]:
    """The first backend that reproduces the card's known answers (``cxr.runtime.known_answers``), and the
    line that says what runs and what was skipped.

    ``tf32=False`` keeps ONNX Runtime's CUDA fp32 at full fp32 precision (parity runs); ``maps``: the job
    explains its labels (``--precision auto`` then keeps to precisions with faithful maps).
    """
    candidates, skipped = _candidates(bundle, backend, precision, "model", maps=maps, tf32=tf32)

    def probe(opened: Backend) -> None:
        check_meaning(opened, bundle.card)
        check_classifier(opened, bundle, file_name(opened, "model"))

    return _first_that_runs(candidates, skipped, probe)


def open_explainer(
    bundle: Bundle, backend: str = AUTO, precision: str = "fp32", images: int | None = None
) -> tuple[ExplainerBackend, str]:
    """The LIME explainer, warmed up (its fixed batch shape searched once) before the first image on the
    known-answer probe, whose answers must be the card's; the host side warms up beside it. ``images``: how
    many the job will explain, when known (a short job opens with a quicker cuDNN search on CUDA:
    ``explainer_cuda``)."""
    from cxr.runtime.explain import warm_host_beside

    candidates, skipped = _candidates(bundle, backend, precision, "explain", maps=True, images=images)

    def probe(opened: ExplainerBackend) -> None:
        check_meaning(opened, bundle.card)
        check_explainer(opened, bundle, file_name(opened, "explain"))

    return warm_host_beside(lambda: _first_that_runs(candidates, skipped, probe))


def runnable_here(bundle: Bundle, graph: str = "model") -> list[tuple[str, str]]:
    """(backend, precision) for every file of ``graph`` in the bundle whose backend is installed here, by
    precision, then by backend name: each registered backend on each file of the kind it runs. (Installed,
    not probed: ``open_*`` probes.)"""
    return [
        (spec.name, precision)
        for precision in FORMATS
        for spec in registry.backends()
        if precision in spec.precisions
        and bundle.has(spec.file_name(graph, precision))
        and spec.available()
        and spec.refuses(precision) is None
    ]
