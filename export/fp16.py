"""``cxr-export fp16``: mixed-precision graphs for strongly typed FP16 engines (TensorRT 11 has no FP16 flag).

Inputs and outputs keep their types (uint8 in, fp32 out). Nodes whose fp32 activations on real-looking
inputs come near the fp16 range, and numerically touchy ops (softmax, reductions), stay in fp32. The SE
gates' spatial means become GlobalAveragePool first: pooling accumulates in fp32 inside cuDNN and TensorRT,
so it runs in fp16 without the two Casts (one over the whole activation map) that a ReduceMean kept in fp32
costs in every block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cxr.runtime.errors import CxrError
from cxr.runtime.safe_io import atomic_output

FP16_SAFE_MAX = 2.0**14  # a 4x margin under fp16's 65504
ALWAYS_FP32_OPS = [
    "Cast",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceL2",
    "Exp",
    "Log",
    "Pow",
    "Resize",
    "Range",
    "Gather",
]


def overflowing_nodes(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[str]:
    """Names of nodes any of whose float outputs exceed FP16_SAFE_MAX on the given inputs (fp32 run)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    producers: dict[str, str] = {}
    for node in probe.graph.node:
        for output in node.output:
            if output and output not in known:
                producers[output] = node.name
                probe.graph.output.add().name = output
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    flagged: set[str] = set()
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            if name in producers and np.issubdtype(np.asarray(value).dtype, np.floating):
                if np.asarray(value).size and float(np.max(np.abs(value))) > FP16_SAFE_MAX:
                    flagged.add(producers[name])
    return sorted(flagged)


def spatial_means_to_pooling(model: onnx.ModelProto) -> int:
    """Rewrite ``ReduceMean(x, axes=[2, 3], keepdims=1)`` on 4-D ``x`` as ``GlobalAveragePool(x)`` (the same
    numbers) in place; returns how many. Opset 18+ ReduceMean takes its axes as an input and is left alone."""
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*inferred.graph.value_info, *inferred.graph.input]
        if v.type.tensor_type.HasField("shape")
    }
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "ReduceMean" or len(node.input) != 1 or ranks.get(node.input[0]) != 4:
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes = sorted(a % 4 for a in attributes.get("axes", []))
        if axes == [2, 3] and attributes.get("keepdims", 1) == 1:
            node.op_type = "GlobalAveragePool"
            del node.attribute[:]
            rewritten += 1
    return rewritten


def convert_fp16(
    src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], pool_spatial_means: bool = True
) -> dict[str, object]:
    """Write the mixed-precision graph; returns what was kept in fp32 (recorded in the card).
    ``pool_spatial_means=False`` keeps the SE means as fp32 ReduceMean (the earlier export, for
    benchmarks)."""
    from onnxruntime.transformers import float16  # ORT's maintained copy of onnxconverter-common's converter
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    for node_index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{node_index}"
    pooled = spatial_means_to_pooling(model) if pool_spatial_means else 0
    kept = overflowing_nodes(model, feeds)
    try:
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=ALWAYS_FP32_OPS,
            node_block_list=kept,
            disable_shape_infer=False,
        )
    except Exception as exc:
        raise CxrError(f"{src.name}: fp16 conversion failed: {str(exc).splitlines()[0][:200]}") from None
    sorted_model = OnnxModel(converted)
    sorted_model.topological_sort()  # the converter appends its Cast nodes at the end of the graph
    with atomic_output(dst) as tmp:
        onnx.save(sorted_model.model, str(tmp))
    onnx.checker.check_model(str(dst), full_check=True)
    return {"fp32_ops": ALWAYS_FP32_OPS, "fp32_nodes_overflow": kept, "spatial_means_pooled": pooled}


def probe_feeds(size: int) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Inputs that find overflowing nodes: random and saturated images, and a random explainer batch."""
    from cxr.export.graphs import example_inputs

    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (4, 1, size, size), dtype=np.uint8),
        np.full((2, 1, size, size), 255, np.uint8),
    ]
    explain = [{k: v.numpy() for k, v in example_inputs(size, 32, 4).items()}]
    return [{"image": im} for im in images], explain


def export_fp16(bundle_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """model.fp16.onnx / explain.fp16.onnx for every fp32 graph in the bundle, recorded in the card with
    their known answers (the fp16 parity result is forgotten: a new graph has not passed yet). Returns (files
    written, notes per graph)."""
    from cxr.export.stage import bundle_stage
    from cxr.runtime.bundle import Bundle

    with bundle_stage(bundle_dir, "fp16") as work:
        return _write_fp16(Bundle.open(work))


def _write_fp16(opened: Any) -> tuple[list[str], dict[str, Any]]:
    """The fp16 graphs of the (staged) bundle ``opened``, written and recorded in its card."""
    from cxr.export.known import record_known_answers
    from cxr.runtime.bundle import onnx_name
    from cxr.runtime.card import file_parity_label, forget_parity, record_files

    image_feeds, explain_feeds = probe_feeds(opened.card.input.size)
    written, notes = [], {}
    for graph, feeds in (("model", image_feeds), ("explain", explain_feeds)):
        source, target = onnx_name(graph, "fp32"), onnx_name(graph, "fp16")
        if opened.has(source):
            notes[graph] = convert_fp16(opened.verified(source), opened.folder / target, feeds)
            written.append(target)
    card = opened.card.replace(provenance={**opened.card.provenance, "fp16": notes})
    card = record_known_answers(opened.folder, card, written)
    record_files(opened.folder, forget_parity(card, [file_parity_label("fp16")]), written)
    return written, notes
