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
class KnownAnswerRule:
    """How far an open's outputs on the known-answer probes (``cxr.runtime.known_answers``) may be from the
    card's, as max |dprob|, by where the file runs. ``cpu`` and ``cuda``: an ONNX graph, whose answers ONNX
    Runtime computed on the CPU at export; ``engine``: a TensorRT plan, whose answers TensorRT computed
    right after the build, on a GPU of the same compute capability (the sidecar checks that)."""

    cpu: float  # ONNX Runtime or OpenVINO on a CPU
    cuda: float  # ONNX Runtime's CUDA EP: TF32 for fp32 (~1e-3 |dprob| on a correct graph), real fp16 kernels
    engine: float  # the same plan again (fixed kernels; allowed a little for nondeterministic reductions)

    def tolerance(self, engine: bool, device: str) -> float:
        """The tolerance for a file run as an engine (``engine``) or as an ONNX graph on ``device``."""
        if engine:
            return self.engine
        return self.cuda if device == "cuda" else self.cpu


@dataclass(frozen=True, kw_only=True)
class Format:
    precision: str
    made_by: str  # the command that writes its ONNX graphs
    parity: ParityRule
    known_answers: KnownAnswerRule
    triton_trt_mode: (
        str  # precision_mode of Triton's TensorRT accelerator for the ONNX graph ("": not served)
    )
    note: str
    graphs_of: str | None = None  # a compute mode that runs another precision's graphs (bf16: the fp32 ones)
    # its LIME maps keep the fp32 map's top 5 (>= 90 %); if not, --precision auto with --explain skips it
    faithful_maps: bool = True
    engines: bool = True  # whether TensorRT engines are built for it

    @property
    def backends(self) -> tuple[str, ...]:
        """The runtime backends that run it, in auto's order (TensorRT: from an engine built of its graph):
        the backend registry's answer, not a list kept here."""
        from cxr.runtime.backends.registry import for_precision

        return for_precision(self.precision)

    def onnx_name(self, graph: str = "model") -> str:
        stored = self.graphs_of or self.precision
        return f"{check_graph(graph)}.onnx" if stored == "fp32" else f"{check_graph(graph)}.{stored}.onnx"

    def engine_name(self, graph: str = "model") -> str:
        return f"{check_graph(graph)}.{self.precision}.engine"


# The fp32 rule holds on CPU and on CUDA alike because parity runs CUDA fp32 with TF32 off (TF32 rounds
# matmul/conv inputs to 10 mantissa bits: ~1e-3 |dprob| on a correct graph, measured on an H100).
#
# Known-answer tolerances (max |dprob| on the probes of cxr.runtime.known_answers), chosen by measuring ONNX
# Runtime CPU against OpenVINO CPU (2-core Xeon with AVX512-VNNI and AMX, ORT 1.32, OpenVINO 2026.4) on the
# test bundle and on a random-weight dpn92_se at 224 px, with margin for other CPUs:
# - fp32: 2.4e-7 and 3e-8 apart -> 1e-5 (parity's worst ORT CPU vs PyTorch on 300 dpn92_se films: 4.8e-7);
# - fp16: 3.2e-4 and 9.7e-5 apart -> 5e-3: a CPU that computes more of the graph in fp16 or in fp32 is at
#   most the fp16-vs-fp32 gap away (1.4e-3 and 6e-5 here); another model's graph is still refused (the test
#   model's int8 graph under the fp16 name differs by 0.047);
# - int8: identical (the same VNNI integer arithmetic) -> 2e-2, for CPUs or EPs that round requantisation
#   otherwise; still refuses the fp16/fp32 graphs under the int8 name (0.046) and OpenVINO's miscompiled
#   parallel int8 streams (0.37 to 0.98 off).
# CUDA (ORT's CUDA EP against the CPU answers): fp32 runs TF32 outside parity (~1e-3 |dprob|, H100) -> 5e-3;
# fp16 kernels -> 2e-2 (what tests/test_gpu.py allows an fp16 engine against fp32); int8 -> 5e-2. Engines
# against their own answers at build (same plan, same compute capability): 1e-4, 2e-3, 1e-2. The GPU numbers
# are reasoned, not yet measured on these probes.
# bf16 (OpenVINO on AMX/AVX512-BF16) runs the fp32 graph and is held to the fp32 graph's recorded answers: 8
# mantissa bits against fp16's 11. On the Xeon with AMX the probes moved by 7.9e-4 (trained dpn92_se
# classifier), 2.2e-3 (its explainer) and 2.7e-3 (dpn_se_tiny at 128 px) -> 1e-2; another model's graph is
# still refused (0.047 for the test model's int8 graph, as above).
BF16_KNOWN_ANSWERS = 1e-2
FORMATS: dict[str, Format] = {
    f.precision: f
    for f in (
        Format(
            precision="fp32",
            made_by="cxr-export onnx",
            parity=ParityRule(min_agreement=1.0, max_abs_dprob=1e-4),
            known_answers=KnownAnswerRule(cpu=1e-5, cuda=5e-3, engine=1e-4),
            triton_trt_mode="FP32",
            note="the validated graph, checked against PyTorch at export",
        ),
        Format(
            precision="fp16",
            made_by="cxr-export fp16",
            parity=ParityRule(min_agreement=0.995, alpha=0.05),
            known_answers=KnownAnswerRule(cpu=5e-3, cuda=2e-2, engine=2e-3),
            triton_trt_mode="FP16",
            note="fp16 weights and activations, overflowing nodes kept in fp32",
        ),
        Format(
            precision="int8",
            made_by="cxr-export int8",
            parity=ParityRule(min_agreement=0.98, alpha=0.05),
            known_answers=KnownAnswerRule(cpu=2e-2, cuda=5e-2, engine=1e-2),
            triton_trt_mode="INT8",
            note="explicit Q/DQ, calibration and float-kept layers chosen on held-out images",
            # --samples auto at int8 kept 88.5 % (AVX2 EPYC, 40 films) and 89.0 % (Xeon with AMX, 20 films) of
            # the fp32 1000-sample map's top 5; at 1000 samples 85 %: int8's own error is the size of the
            # probability's movement under LIME's perturbations where the model is sure
            faithful_maps=False,
        ),
        Format(
            precision="bf16",
            made_by="cxr-export onnx",
            parity=ParityRule(min_agreement=0.995, alpha=0.05),
            known_answers=KnownAnswerRule(
                cpu=BF16_KNOWN_ANSWERS, cuda=BF16_KNOWN_ANSWERS, engine=BF16_KNOWN_ANSWERS
            ),
            triton_trt_mode="",
            note="the fp32 graphs computed in bf16 by OpenVINO, on CPUs with AVX512-BF16 or AMX-BF16 only",
            graphs_of="fp32",
            engines=False,
        ),
    )
}
PRECISIONS = tuple(FORMATS)
# The precisions every backend may run; bf16 is OpenVINO's CPU compute mode, so only OpenVINO registers it.
COMMON_PRECISIONS = tuple(p for p, f in FORMATS.items() if f.graphs_of is None)


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
        engines = f"`{f.engine_name('model')}`, `{f.engine_name('explain')}`" if f.engines else "none"
        rows.append(
            f"| {f.precision} | `{f.onnx_name('model')}`, `{f.onnx_name('explain')}` | {engines} | "
            f"`{f.made_by}` | {', '.join(f.backends)} | {f.parity.describe()} | "
            f"{f.triton_trt_mode or 'not served'} |"
        )
    return "\n".join(rows)
