"""How close a backend runs to what this host can compute.

The graph's floating-point work per image (2 x the multiply-adds of its Conv, Gemm and MatMul nodes, from
ONNX shape inference at batch 1) against the host's measured fp32 matrix-multiply rate (numpy's BLAS on
all cores). A backend near 100 % of that rate cannot be beaten by much by another fp32 runtime on this
host; only less work (int8 kernels, a smaller input or model) goes faster.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MATMUL_SIDE = 1024


def _dims(value: Any) -> list[int]:
    """Shape of a value_info with unknown (batch) dimensions read as 1."""
    return [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]


def graph_gflop(model_bytes: bytes) -> float:
    """GFLOP (2 x multiply-adds) of one image through the graph's Conv, Gemm and MatMul nodes."""
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load_from_string(model_bytes))
    shapes = {v.name: _dims(v) for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    shapes.update({init.name: list(init.dims) for init in model.graph.initializer})
    flop = 0
    for node in model.graph.node:
        out, weight = shapes.get(node.output[0]), shapes.get(node.input[1]) if len(node.input) > 1 else None
        if out is None or weight is None:
            continue
        # Conv weight (C_out, C_in / groups, k...): each output value needs C_in/g * k MACs
        if node.op_type == "Conv":
            flop += 2 * int(np.prod(weight[1:])) * int(np.prod(out[1:]))
        elif node.op_type in ("Gemm", "MatMul"):  # inner dimension = the product's shared axis
            inner = weight[-1] if any(a.name == "transB" and a.i for a in node.attribute) else weight[-2]
            flop += 2 * inner * int(np.prod(out[1:]))
    return flop / 1e9


def host_fp32_gflops(repeats: int = 8) -> float:
    """Best fp32 matrix-multiply rate of numpy's BLAS here, in GFLOP/s (warm, all cores)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((MATMUL_SIDE, MATMUL_SIDE), dtype=np.float32) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * MATMUL_SIDE**3 / best / 1e9


def compute_bound(model_bytes: bytes) -> dict[str, float] | None:
    """The graph's GFLOP per image, the host's fp32 matmul rate and the fp32 floor they imply (None without
    the onnx package)."""
    try:
        gflop = graph_gflop(model_bytes)
    except ImportError:
        log.info("  (no onnx package: the compute bound is left out)")
        return None
    rate = host_fp32_gflops()
    return {"gflop_per_image": gflop, "host_fp32_matmul_gflops": rate, "fp32_floor_ms": 1000 * gflop / rate}


def share_of_rate(bound: dict[str, float], p50_ms: float) -> float:
    """The fp32 work per image done per second at this p50, as a share of the host's matmul rate. It can pass
    1.0: int8 and fp16 kernels do cheaper operations, Winograd 3x3 convolutions fewer, and on an AVX-512 EPYC
    OpenVINO and ONNX Runtime fp32 beat numpy's BLAS by 15-25 %."""
    return bound["gflop_per_image"] / (p50_ms / 1000) / bound["host_fp32_matmul_gflops"]
