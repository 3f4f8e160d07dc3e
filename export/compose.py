"""An explainer graph built from a classifier graph: LIME's image composition in front of it, as ONNX nodes.

``explain.int8.onnx`` is the chosen ``model.int8.onnx`` behind this composer, so its row 0 (the unperturbed
image) gives exactly the int8 classifier's answer, and the int8 network the explainer runs is the one whose
calibration was chosen and checked on held-out images, not a second, separately calibrated copy.

The composer is ``cxr.export.graphs.Explainer`` as ONNX nodes, in float like it (``keep = z[segments]``,
``fill + keep * (image - fill)``): TensorRT runs no arithmetic on uint8. It feeds the classifier's first
node, the Cast of its uint8 image to float, which then casts float to float.
"""

from __future__ import annotations

from pathlib import Path

from cxr.runtime.backends.base import EXPLAINER_INPUTS, EXPLAINER_OUTPUTS
from cxr.runtime.errors import CxrError
from cxr.runtime.safe_io import atomic_output

NET_PREFIX = "net/"


def composer(size: int, opset: int, ir_version: int) -> "onnx.ModelProto":  # noqa: F821
    """(image, fill: 1x1xHxW uint8, segments: HxW int32, z: BxS uint8) -> pixels: Bx1xHxW float."""
    import onnx
    from onnx import TensorProto, helper

    image, fill, segments, z = EXPLAINER_INPUTS
    to_float = TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", [z], ["z_float"], to=to_float),
        helper.make_node("Cast", [image], ["image_float"], to=to_float),
        helper.make_node("Cast", [fill], ["fill_float"], to=to_float),
        helper.make_node("Reshape", [segments, "flat"], ["segments_flat"]),
        helper.make_node("Gather", ["z_float", "segments_flat"], ["keep_flat"], axis=1),
        helper.make_node("Reshape", ["keep_flat", "batch_image"], ["keep"]),
        helper.make_node("Sub", ["image_float", "fill_float"], ["difference"]),
        helper.make_node("Mul", ["keep", "difference"], ["kept"]),
        helper.make_node("Add", ["fill_float", "kept"], ["pixels"]),
    ]
    constants = [
        helper.make_tensor("flat", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("batch_image", TensorProto.INT64, [4], [-1, 1, size, size]),
    ]
    picture = [1, 1, size, size]
    inputs = [
        helper.make_tensor_value_info(image, TensorProto.UINT8, picture),
        helper.make_tensor_value_info(fill, TensorProto.UINT8, picture),
        helper.make_tensor_value_info(segments, TensorProto.INT32, [size, size]),
        helper.make_tensor_value_info(z, TensorProto.UINT8, ["batch", "segments"]),
    ]
    pixels = helper.make_tensor_value_info("pixels", to_float, ["batch", 1, size, size])
    graph = helper.make_graph(nodes, "lime_composer", inputs, [pixels], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def explainer_from_classifier(classifier: Path, out: Path, size: int) -> None:
    """Write ``out``: the composer joined to ``classifier`` (its single image input, which must feed Cast
    nodes only), with the classifier's metadata (classes, input, preprocessing), so the runtime checks it
    like any explainer graph."""
    import onnx

    net = onnx.load(str(classifier))
    opset = next(o.version for o in net.opset_import if o.domain in ("", "ai.onnx"))
    (net_input,), net_output = net.graph.input, net.graph.output[0]
    del net.graph.output[1:]  # the explainer returns probabilities only (the gate's features stay unused)
    first = [node for node in net.graph.node if net_input.name in node.input]
    if not first or any(node.op_type != "Cast" for node in first):
        raise CxrError(
            f"{classifier}: its input {net_input.name!r} must feed only Cast nodes (the exported classifier "
            f"casts its uint8 image first), found {sorted({node.op_type for node in first})}"
        )
    metadata = list(net.metadata_props)
    net = onnx.compose.add_prefix(net, NET_PREFIX)
    joined = onnx.compose.merge_models(
        composer(size, opset, net.ir_version),
        net,
        io_map=[("pixels", NET_PREFIX + net_input.name)],
    )
    final = NET_PREFIX + net_output.name
    for node in joined.graph.node:
        node.output[:] = [EXPLAINER_OUTPUTS[0] if name == final else name for name in node.output]
    joined.graph.output[0].name = EXPLAINER_OUTPUTS[0]
    del joined.metadata_props[:]
    joined.metadata_props.extend(metadata)
    onnx.checker.check_model(joined)
    with atomic_output(out) as output:
        onnx.save(joined, str(output))
