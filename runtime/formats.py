"""The one table of formats: what each precision means for every stage (torch-free, read by all of them).

For each precision: the bundle's graph and engine file names, the command that writes the graphs, the backends
that run them, the parity rule its graphs and engines are held to, and how a Triton repository serves it.
``cxr-export``, ``cxr-run``, ``cxr-bench``, parity and the Triton exporter read this table instead of
re-declaring any of it; the README's table is ``markdown_table()``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from cxr.runtime.errors import CxrUsageError

GRAPHS = ("model", "explain")  # classifier, LIME explainer


@dataclass(frozen=True)
class ParityRule:
    """fp32: every prediction the same and |dprob| tiny. fp16/int8: judged by exact tests that know n, so one
    flip among 150 images is not a failure and a real shift is: the flip rate must not be significantly above
    ``1 - min_agreement`` (one-sided binomial test), and no class's recall may shift (McNemar's exact test on
    the paired right/wrong outcomes), each at significance ``alpha``."""

    min_agreement: float
    max_abs_dprob: float | None = None
    alpha: float | None = None  # None: min_agreement is a hard floor (fp32)

    def describe(self) -> str:
        if self.alpha is None:
            return f"agreement {self.min_agreement:.0%}, max abs dprob <= {self.max_abs_dprob:g}"
        return (
            f"flip rate not above {1 - self.min_agreement:.1%} (binomial) and no class shift (McNemar), "
            f"alpha {self.alpha:g}"
        )


@dataclass(frozen=True)
class Format:
    precision: str
    made_by: str  # the command that writes its ONNX graphs
    backends: tuple[str, ...]  # runtime backends that run it (TensorRT: from an engine built of its graph)
    parity: ParityRule
    triton_trt_mode: str  # precision_mode of Triton's TensorRT accelerator for the ONNX graph
    note: str

    def onnx_name(self, graph: str = "model") -> str:
        return (
            f"{check_graph(graph)}.onnx"
            if self.precision == "fp32"
            else f"{check_graph(graph)}.{self.precision}.onnx"
        )

    def engine_name(self, graph: str = "model") -> str:
        return f"{check_graph(graph)}.{self.precision}.engine"


# The fp32 rule holds on CPU and on CUDA alike because parity runs CUDA fp32 with TF32 off (TF32 rounds
# matmul/conv inputs to 10 mantissa bits: ~1e-3 |dprob| on a correct graph, measured on an H100).
FORMATS: dict[str, Format] = {
    f.precision: f
    for f in (
        Format(
            "fp32",
            "cxr-export onnx",
            ("tensorrt", "onnxruntime", "openvino"),
            ParityRule(min_agreement=1.0, max_abs_dprob=1e-4),
            "FP32",
            "the validated graph, checked against PyTorch at export",
        ),
        Format(
            "fp16",
            "cxr-export fp16",
            ("tensorrt", "onnxruntime", "openvino"),
            ParityRule(min_agreement=0.995, alpha=0.05),
            "FP16",
            "fp16 weights and activations, overflowing nodes kept in fp32",
        ),
        Format(
            "int8",
            "cxr-export int8",
            ("tensorrt", "onnxruntime", "openvino"),
            ParityRule(min_agreement=0.98, alpha=0.05),
            "INT8",
            "explicit Q/DQ, calibration and float-kept layers chosen on held-out images",
        ),
    )
}
PRECISIONS = tuple(FORMATS)


def check_graph(graph: str) -> str:
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    return graph


def get_format(precision: str) -> Format:
    """The format of ``precision``, or a one-line usage error that suggests the nearest name."""
    if precision in FORMATS:
        return FORMATS[precision]
    near = difflib.get_close_matches(str(precision).lower(), PRECISIONS, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise CxrUsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}{hint}")


def markdown_table() -> str:
    """The table the README shows (a test keeps the two identical)."""
    rows = [
        "| precision | graphs | engines | made by | runs on | parity rule | Triton TensorRT mode |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in FORMATS.values():
        rows.append(
            f"| {f.precision} | `{f.onnx_name('model')}`, `{f.onnx_name('explain')}` | "
            f"`{f.engine_name('model')}`, `{f.engine_name('explain')}` | `{f.made_by}` | "
            f"{', '.join(f.backends)} | {f.parity.describe()} | {f.triton_trt_mode} |"
        )
    return "\n".join(rows)
