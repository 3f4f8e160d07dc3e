"""``cxr-export onnx``: a training run -> model bundle with fp32 ``model.onnx`` and ``explain.onnx``.

Each graph is accepted only after ``onnx.checker`` (full check) and an ONNX Runtime session that agrees
with PyTorch on a few inputs; its weights must be finite and its known answers go into the card
(``cxr.export.known``). The card travels inside each graph's ``metadata_props`` too.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from cxr.export.graphs import (
    CLASSIFIER_INPUTS,
    CLASSIFIER_OUTPUTS,
    EXPLAINER_INPUTS,
    EXPLAINER_OUTPUTS,
    Explainer,
    example_inputs,
)
from cxr.export.known import record_known_answers
from cxr.export.stage import bundle_stage
from cxr.runtime.bundle import onnx_name
from cxr.runtime.card import Card, graph_metadata, write_card
from cxr.runtime.errors import CxrError, CxrUsageError
from cxr.runtime.safe_io import atomic_output, atomic_write
from cxr.train.ood_features import FeatureClassifier
from cxr.train.run import load_run

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
EXPORT_ATOL = 1e-4
FEATURES_RTOL = 1e-4  # the gate's features, relative to their largest magnitude


def card_metadata(card: Card) -> dict[str, str]:
    return graph_metadata(card)


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        prop = existing.get(key) or model.metadata_props.add()
        prop.key, prop.value = key, value


def read_metadata(path: Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _torch_export(
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    opset: int,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    dynamic: dict[str, dict[int, str]],
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic,
        )


def check_graph(
    path: Path, module: torch.nn.Module, feeds: list[dict[str, torch.Tensor]], atol: float
) -> float:
    """Full ONNX check plus ORT-vs-PyTorch agreement; returns the max |difference| seen."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CxrError(
            f"{path.name}: ONNX checker rejected the exported graph: {str(exc).splitlines()[0]}"
        ) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, worst_features = 0.0, 0.0
    with torch.no_grad():
        for feed in feeds:
            expected = module(*feed.values())
            expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
            got = session.run(None, {k: v.numpy() for k, v in feed.items()})
            worst = max(worst, float(np.max(np.abs(expected[0] - got[0]))))
            for want, have in zip(expected[1:], got[1:]):  # features: relative to their scale
                scale = max(1.0, float(np.max(np.abs(want))))
                worst_features = max(worst_features, float(np.max(np.abs(want - have))) / scale)
    if worst > atol or worst_features > FEATURES_RTOL:
        raise CxrError(
            f"{path.name}: ONNX Runtime disagrees with PyTorch (max |dprob| {worst:.2e}, tolerance "
            f"{atol:.0e}; features {worst_features:.2e} of their scale, tolerance {FEATURES_RTOL:.0e})"
        )
    return worst


def export_onnx(run: Path, out: Path, opset: int = DEFAULT_OPSET, ood_keep: float | None = None) -> Card:
    """A new bundle in the folder ``out``: ``model.onnx``, ``explain.onnx`` and ``card.json``, built beside
    it and swapped in whole (``cxr.export.stage``): a bundle there is replaced, nothing of it is kept."""
    card, model = load_run(run)
    if not 13 <= opset <= 21:
        raise CxrUsageError(f"--opset must be between 13 and 21, got {opset}")
    out = Path(out)
    if out.resolve() == Path(run).resolve():
        raise CxrUsageError("--out must be a new folder, not the run folder")
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with bundle_stage(out, "onnx", fresh=True) as work:
        card, worst = _write_bundle(run, work, card, model, opset, ood_keep)
    classifier, explainer = onnx_name("model", "fp32"), onnx_name("explain", "fp32")
    log.info(
        f"wrote {out / classifier} and {out / explainer} (ORT vs PyTorch max |dprob| {worst:.1e}); "
        f"card: {out / 'card.json'}"
    )
    return card


def _write_bundle(
    run: Path, out: Path, card: Card, model: torch.nn.Module, opset: int, ood_keep: float | None
) -> tuple[Card, float]:
    """The graphs, their checks, the training records and the card, written into the (empty) folder ``out``;
    returns the card and the largest ORT-vs-PyTorch difference."""
    size = card.input.size
    metadata = card_metadata(card)
    gen = torch.Generator().manual_seed(0)
    image_feeds = [
        {"image": torch.randint(0, 256, (b, 1, size, size), dtype=torch.uint8, generator=gen)} for b in (1, 3)
    ]
    classifier_path = out / onnx_name("model", "fp32")
    classifier = FeatureClassifier(model.adapter, model.net).eval()  # probs, and the gate's features
    _torch_export(
        classifier,
        image_feeds[0],
        classifier_path,
        opset,
        CLASSIFIER_INPUTS,
        CLASSIFIER_OUTPUTS,
        {"image": {0: "batch"}, "probs": {0: "batch"}, "features": {0: "batch"}},
    )
    explainer = Explainer(model).eval()
    explain_path = out / onnx_name("explain", "fp32")
    _torch_export(
        explainer,
        example_inputs(size),
        explain_path,
        opset,
        EXPLAINER_INPUTS,
        EXPLAINER_OUTPUTS,
        {"z": {0: "batch", 1: "segments"}, "probs": {0: "batch"}},
    )
    for path in (classifier_path, explain_path):
        graph = onnx.load(str(path))
        set_metadata(graph, metadata)
        with atomic_output(path) as tmp:
            onnx.save(graph, str(tmp))
    diff_classifier = check_graph(classifier_path, classifier, image_feeds, EXPORT_ATOL)
    diff_explainer = check_graph(explain_path, explainer, [example_inputs(size, 24, 5)], EXPORT_ATOL)
    for extra in ("metrics.json", "confusion.png", "curves.png"):
        if (Path(run) / extra).is_file():
            shutil.copyfile(Path(run) / extra, out / f"training_{extra}")
    provenance = dict(card.provenance)
    provenance.update(
        exported=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        source_run=str(Path(run).resolve()),
        opset=opset,
        torch=torch.__version__,
        onnx=onnx.__version__,
        export_check={classifier_path.name: diff_classifier, explain_path.name: diff_explainer},
    )
    card = card.replace(provenance=provenance, known_answers={})  # a new bundle: the run's card has none
    card = copy_gate(Path(run), out, card, ood_keep)
    card = write_card(out, record_known_answers(out, card, [classifier_path.name, explain_path.name]))
    return card, max(diff_classifier, diff_explainer)


def copy_gate(run: Path, out: Path, card: Card, keep: float | None) -> Card:
    """The run's out-of-distribution gate into the bundle (re-thresholded when ``keep`` is given); a run
    trained before gates gives a bundle without one (the runtime says so once)."""
    from cxr.runtime.ood import GATE_FILE, Gate
    from cxr.train.gate import gate_section

    source = run / GATE_FILE
    if not source.is_file():
        log.warning(
            f"{run}: no {GATE_FILE}: the bundle gets no out-of-distribution gate (fit one with "
            f"'cxr-train gate {run} DATA', then export again)"
        )
        return card.replace(ood={})
    gate = Gate.from_bytes(source.read_bytes(), str(source))
    if keep is not None:
        gate = gate.with_keep(keep)
    atomic_write(out / GATE_FILE, gate.to_bytes())
    seconds = card.ood.get("fit_seconds", 0.0)
    return card.replace(ood=gate_section(gate, len(gate.validation_scores), seconds))
