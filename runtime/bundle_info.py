"""``cxr-run info`` as a library call: what a bundle holds, whether its files are intact, and what runs each
of its graphs on this machine (each opened and checked as predict would open it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cxr.runtime.bundle import GRAPHS, PRECISIONS, Bundle, onnx_name
from cxr.runtime.card import parity_state, sha256_file
from cxr.runtime.errors import CxrError, one_line


@dataclass(frozen=True, kw_only=True)
class FileState:
    name: str
    digest: str
    state: str  # ok, missing, SHA MISMATCH


@dataclass(frozen=True, kw_only=True)
class GraphState:
    precision: str
    graph: str
    present: bool
    runs: bool = False
    parity: str = "-"
    reason: str = ""  # what runs it and what was skipped, or why it cannot run


@dataclass(kw_only=True)
class BundleInfo:
    card: dict[str, Any]
    digest: str
    files: list[FileState] = field(default_factory=list)
    graphs: list[GraphState] = field(default_factory=list)

    @property
    def bad_files(self) -> list[FileState]:
        return [f for f in self.files if f.state != "ok"]

    @property
    def runnable(self) -> list[GraphState]:
        return [g for g in self.graphs if g.runs]

    def problem(self) -> str | None:
        """Why this bundle must not be used here (None when it may)."""
        if self.bad_files:
            count = len(self.bad_files)
            return f"{count} bundle file(s) missing or changed since export: do not use this bundle"
        if not any(g.runs and g.graph == "model" for g in self.graphs):
            return "no classifier graph of this bundle runs on this machine (see 'runs here')"
        return None


def bundle_info(bundle: Bundle) -> BundleInfo:
    """Check every listed file's hash, then open every graph with ``--backend auto`` as predict would (the
    open's own checks included)."""
    card = bundle.card.to_dict()
    files = card.pop("files")
    info = BundleInfo(card=card, digest=bundle.digest)
    for name, digest in files.items():  # names are plain file names: the card refuses anything else
        path = bundle.folder / name
        state = "missing" if not path.is_file() else ("ok" if sha256_file(path) == digest else "SHA MISMATCH")
        info.files.append(FileState(name=name, digest=digest, state=state))
    for precision in PRECISIONS:
        for graph in GRAPHS:
            info.graphs.append(_graph_state(bundle, precision, graph))
    return info


def _graph_state(bundle: Bundle, precision: str, graph: str) -> GraphState:
    from cxr.runtime.backends.registry import runs_engine
    from cxr.runtime.backends.select import int8_cpu_risk, open_classifier, open_explainer

    if not bundle.has(onnx_name(graph, precision)):
        return GraphState(precision=precision, graph=graph, present=False, reason="no graph")
    opener = open_classifier if graph == "model" else open_explainer
    try:
        opened, reason = opener(bundle, "auto", precision)
    except CxrError as exc:
        return GraphState(
            precision=precision, graph=graph, present=True, reason=f"cannot run: {one_line(exc)}"
        )
    with opened:
        state = parity_state(bundle.card, precision, runs_engine(opened))
        risk = int8_cpu_risk(bundle.card, opened) if state == "passed" else None
    if risk:
        state, reason = "not here", f"{reason}; {risk}"
    return GraphState(precision=precision, graph=graph, present=True, runs=True, parity=state, reason=reason)
