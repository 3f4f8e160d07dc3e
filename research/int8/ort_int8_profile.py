"""Why does ONNX Runtime's CPU run the Q/DQ int8 graph slower than the fp32 one? (issue 35.4)

For each graph: the operators of the graph ONNX Runtime actually runs (its optimised graph, saved), and the
time per operator kind at batch 1 from ORT's own profiler. Usage:

    python -m research.int8.ort_int8_profile BUNDLE OUT.json
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def optimised_ops(path: Path, work: Path) -> dict[str, int]:
    """Operator counts of the graph ORT runs after its (full) graph optimisations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(work / f"{path.stem}.opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return dict(collections.Counter(node.op_type for node in graph.node).most_common())


def profile(path: Path, work: Path, runs: int = 20) -> tuple[float, dict[str, float]]:
    """b1 median ms, and ms per run spent in each operator kind (ORT's profiler)."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(work / path.stem)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    size = session.get_inputs()[0].shape[-1]
    image = np.random.default_rng(0).integers(0, 256, (1, 1, size, size), dtype=np.uint8)
    for _ in range(3):
        session.run(None, {name: image})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: image})
        times.append((time.perf_counter() - start) * 1e3)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_kind: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_kind[event["args"]["op_name"]] += event["dur"] / 1e3 / (runs + 3)
    top = dict(sorted(((k, round(v, 2)) for k, v in per_kind.items()), key=lambda kv: -kv[1])[:12])
    return float(np.median(times)), top


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the bundle folder (model.onnx and model.int8.onnx)")
    parser.add_argument("out", type=Path, help="the JSON report")
    parsed = parser.parse_args(argv)
    bundle, out = parsed.bundle, parsed.out
    report = {"onnxruntime": ort.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("model.onnx", "model.int8.onnx"):
            p50, kinds = profile(bundle / name, Path(tmp))
            report[name] = {
                "b1_p50_ms": round(p50, 1),
                "ms_per_op_kind": kinds,
                "ops_after_ort_optimisation": optimised_ops(bundle / name, Path(tmp)),
            }
            print(name, report[name]["b1_p50_ms"], "ms", kinds)
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
