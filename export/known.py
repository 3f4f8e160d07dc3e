"""Record the known answers of the graphs and engines a stage just wrote (``cxr.runtime.known_answers``).

Every stage that writes a bundle file calls ``record_known_answers`` before it writes the card: an ONNX
graph's weights must be finite and its answers are computed by ONNX Runtime on the CPU, from the very bytes
written; an engine's by TensorRT itself, right after its build, on the GPU it was built for. The entry of a
file written anew replaces its predecessor's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cxr.runtime.card import Card
from cxr.runtime.errors import CxrError
from cxr.runtime.formats import FORMATS, GRAPHS
from cxr.runtime.known_answers import PROBE_ROWS, make_entry, run_classifier, run_explainer
from cxr.runtime.onnx_weights import check_weights

log = logging.getLogger(__name__)


def file_kind(name: str) -> tuple[str, str, bool]:
    """(graph, precision, is an engine) of a bundle file name, from the formats table."""
    for precision, fmt in FORMATS.items():
        for graph in GRAPHS:
            if name == fmt.onnx_name(graph):
                return graph, precision, False
            if name == fmt.engine_name(graph):
                return graph, precision, True
    raise CxrError(f"{name}: not a graph or engine name of the formats table (no known answers for it)")


def _open(path: Path, data: bytes, graph: str, precision: str, engine: bool) -> Any:
    """The file opened as the runtime would, but on ONNX Runtime's CPU EP for a graph (the reference every
    backend is compared with) with an explainer batch of just the probe rows (the cheapest fixed shape)."""
    if engine:
        from cxr.runtime.backends.tensorrt import TrtBackend, TrtExplainer

        return (TrtBackend if graph == "model" else TrtExplainer)(path, precision, data)
    from cxr.runtime.backends.onnxruntime import CPU_EP, OrtBackend, OrtExplainer

    if graph == "model":
        return OrtBackend(path, precision, [CPU_EP], data=data)
    return OrtExplainer(path, precision, [CPU_EP], max_batch=PROBE_ROWS, data=data)


def _computed_by(opened: Any) -> str:
    """What computed the answers, as the card says it: 'onnxruntime 1.32.0 CPUExecutionProvider'."""
    if opened.name == "onnxruntime":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} {opened.provider}"
    return f"{opened.provider} on {opened.engine.facts.get('gpu_name', 'a GPU')}"


def known_answers_of(folder: Path, card: Card, name: str) -> dict[str, Any]:
    """One file's entry: its weights checked finite (ONNX), then its outputs on the probes."""
    graph, precision, engine = file_kind(name)
    path = Path(folder) / name
    data = path.read_bytes()
    if not engine:
        check_weights(data, path)
    with _open(path, data, graph, precision, engine) as opened:
        probs, facts = (run_classifier if graph == "model" else run_explainer)(opened, card)
        computed_by = _computed_by(opened)
    return make_entry(probs, facts, computed_by)


def record_known_answers(folder: Path, card: Card, names: list[str]) -> Card:
    """``card`` with the known answers of ``names`` (files just written in ``folder``) replacing any earlier
    entries of those files."""
    answers = dict(card.known_answers)
    for name in names:
        answers[name] = known_answers_of(folder, card, name)
        log.info("%s: known answers recorded (%s)", name, answers[name]["computed_by"])
    return card.replace(known_answers=answers)
