"""One int8 candidate made by NNCF (OpenVINO's post-training quantiser) instead of ONNX Runtime's.

NNCF gathers activation ranges over every calibration image with running reducers (no histogram of every
sample, so all of ``--samples`` count, not a first few) and applies fast bias correction: each quantised
layer's bias is shifted so its mean output matches the float layer's. On dpn92_se at 224 it changed 3 of 162
unseen images' predictions where ORT's best percentile graph changed 13 (``results/cpu-2core/int8/run3-*``).
The output is the same explicit Q/DQ ONNX (signed symmetric activations, per-channel symmetric weights) that
ONNX Runtime, OpenVINO and TensorRT run; ``cxr-export int8`` scores it beside the ORT candidates, best wins.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.errors import CxrError
from cxr.runtime.optional import require
from cxr.runtime.safe_io import atomic_output


def quantize_nncf(
    src: Path,
    dst: Path,
    feeds: list[dict[str, np.ndarray]],  # classifier feeds: {"image": a batch}
    exclude: list[str],
    reduce_range: bool,
    float_ops: tuple[str, ...] = (),
) -> None:
    """Quantise ``src`` to ``dst`` over all ``feeds``; ``exclude`` nodes and every node of ``float_ops`` stay
    float; ``reduce_range`` halves every weight's range (NNCF's overflow fix for CPUs without VNNI), else only
    the first layer's."""
    nncf = require("nncf", "int8 calibration with NNCF")
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    logging.getLogger("nncf").setLevel(logging.WARNING)
    model = onnx.load(str(src))
    ignored = [n.name for n in model.graph.node if n.op_type in float_ops and n.name] + list(exclude)
    singles = [{"image": image[None]} for feed in feeds for image in feed["image"]]  # per-image statistics
    try:
        quantized = nncf.quantize(
            model,
            nncf.Dataset(singles),
            preset=nncf.QuantizationPreset.PERFORMANCE,  # symmetric activations: what TensorRT accepts
            subset_size=len(singles),
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
            advanced_parameters=AdvancedQuantizationParameters(
                overflow_fix=OverflowFix.ENABLE if reduce_range else OverflowFix.FIRST_LAYER
            ),
        )
    except (RuntimeError, ValueError) as exc:
        raise CxrError(
            f"{src}: NNCF could not quantise it ({len(singles)} images): {str(exc).splitlines()[0][:160]}"
        ) from None
    with atomic_output(dst) as output:
        onnx.save(signed_activations(quantized), str(output))


def signed_activations(model: Any) -> Any:
    """Make every Q/DQ pair signed int8, the only kind TensorRT's explicit quantisation takes.

    NNCF gives non-negative activations (after a ReLU) uint8 with zero point 0. The same range [0, 255 s] as
    signed int8 with zero point 0 needs the scale 255/127 s: one bit of resolution less on those tensors, as
    any symmetric int8 engine has. (NNCF's own ``signedness_to_force`` is refused by its hardware configs.)
    """
    import onnx
    from onnx import numpy_helper

    init = {tensor.name: tensor for tensor in model.graph.initializer}
    pairs = [
        node
        for node in model.graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2
    ]
    unsigned = {n.input[2] for n in pairs if numpy_helper.to_array(init[n.input[2]]).dtype == np.uint8}
    scales = {n.input[1] for n in pairs if n.input[2] in unsigned}
    if scales & {n.input[1] for n in pairs if n.input[2] not in unsigned}:
        raise CxrError(
            "NNCF graph shares a scale between signed and unsigned Q/DQ pairs: cannot make it signed"
        )
    for name in unsigned:
        zero = numpy_helper.to_array(init[name])
        if zero.any():
            raise CxrError(f"NNCF graph: zero point {name} is not 0 (asymmetric): cannot make it signed")
        init[name].CopyFrom(numpy_helper.from_array(np.zeros(zero.shape, np.int8), name))
    for name in scales:
        scale = numpy_helper.to_array(init[name])
        init[name].CopyFrom(numpy_helper.from_array((scale * (255.0 / 127.0)).astype(scale.dtype), name))
    quantized = {n.output[0] for n in pairs if n.op_type == "QuantizeLinear" and n.input[2] in unsigned}
    for info in model.graph.value_info:  # the recorded type of each changed Q output
        if info.name in quantized:
            info.type.tensor_type.elem_type = onnx.TensorProto.INT8
    return model
