"""Which int8 form runs fastest in OpenVINO on this CPU: b1 latency interleaved, plus a per-exec-type profile.

Forms: NNCF on the ONNX graph with unsigned activations (NNCF's own) or signed (what cxr-export ships, for
TensorRT), each with the first layer's or every layer's overflow fix; and NNCF on OpenVINO's own IR.
Usage (repository root): python -m research.int8.ov_int8 BUNDLE/model.onnx OUT_DIR [ROUNDS]
(calibration: 48 images of ../shared cxr4-dev)
"""

import glob
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import nncf
import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
from cxr.export.int8_nncf import signed_activations
from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

FIXES = {"first": OverflowFix.FIRST_LAYER, "enable": OverflowFix.ENABLE}
HINTS = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES"}


def feeds(name: str, shape: list[int]) -> list[dict[str, np.ndarray]]:
    paths = sorted(glob.glob("/work/shared/data/cxr4-dev/*/*"))[::10][:48]
    return [
        {name: cv2.resize(cv2.imread(p, cv2.IMREAD_GRAYSCALE), (224, 224)).reshape(shape).astype(np.uint8)}
        for p in paths
    ]


def quantize(model: object, calib: list[dict[str, np.ndarray]], fix: OverflowFix) -> object:
    return nncf.quantize(
        model,
        nncf.Dataset(calib),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        subset_size=len(calib),
        advanced_parameters=AdvancedQuantizationParameters(overflow_fix=fix),
    )


def profile(request: ov.InferRequest) -> dict[str, list[float]]:
    """Milliseconds and node count per (node type, kernel), the 12 largest."""
    ms: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for info in request.get_profiling_info():
        if info.status == ov.ProfilingInfo.Status.EXECUTED:
            key = f"{info.node_type}:{info.exec_type}"
            ms[key] += info.real_time.total_seconds() * 1e3
            count[key] += 1
    return {k: [round(v, 2), count[k]] for k, v in sorted(ms.items(), key=lambda kv: -kv[1])[:12]}


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 15
    out.mkdir(exist_ok=True)
    graph_input = onnx.load(str(src)).graph.input[0]
    name, shape = graph_input.name, [1, 1, 224, 224]
    calib = feeds(name, shape)
    variants = {"fp32": str(src)}
    for fix_name, fix in FIXES.items():
        quantized = quantize(onnx.load(str(src)), calib, fix)
        for form, model in (("u8", quantized), ("s8", signed_activations(quantized))):
            path = out / f"onnx_{form}_{fix_name}.onnx"
            onnx.save(model, str(path))
            variants[f"onnx_{form}_{fix_name}"] = str(path)
        path = out / f"ir_{fix_name}.xml"
        ov.save_model(quantize(ov.convert_model(str(src)), calib, fix), str(path), compress_to_fp16=False)
        variants[f"ir_{fix_name}"] = str(path)
    core = ov.Core()
    x = calib[0][name]
    requests = {}
    for key, path in variants.items():
        model = core.read_model(path)
        model.reshape({name: shape})
        requests[key] = core.compile_model(model, "CPU", HINTS).create_infer_request()
    session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    runs = {key: (lambda r=r: r.infer({name: x})) for key, r in requests.items()}
    runs["ort_fp32"] = lambda: session.run(None, {name: x})
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for key, run in runs.items():
            started = time.perf_counter()
            run()
            times[key].append((time.perf_counter() - started) * 1e3)
    ort_p50 = float(np.median(times["ort_fp32"]))
    result = {
        k: {"p50_ms": round(float(np.median(t)), 1), "vs_ort": round(float(np.median(t)) / ort_p50, 3)}
        for k, t in times.items()
    }
    reference = np.array(requests["fp32"].infer({name: x})[0])
    for key, request in requests.items():
        result[key]["max_abs_vs_fp32"] = float(
            np.abs(np.array(request.infer({name: x})[0]) - reference).max()
        )
        result[key]["profile_ms"] = profile(request)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
