"""Which Q/DQ form lets ONNX Runtime's CPU run int8 faster than fp32? (issue 35.4)

The same fp32 graph quantised by ONNX Runtime's own ``quantize_static`` (QDQ, per-channel s8 weights,
min-max on 16 calibration films) with u8 and with s8 activations, against the bundle's shipped int8 graph and
its fp32 graph: b1 median ms on ONNX Runtime's CPU EP and the operators of the graph ONNX Runtime actually
runs (its optimised graph). Accuracy is not the question here (16 films), only which form ONNX Runtime fuses.

    python -m research.int8.ort_qdq_forms BUNDLE CALIB_FOLDER OUT.json
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
from cxr.runtime.bundle import Bundle
from cxr.runtime.preprocess import load_and_preprocess
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)


class Films(CalibrationDataReader):
    def __init__(self, name: str, images: list[np.ndarray]) -> None:
        self.name, self.images = name, iter(images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self.images, None)
        return None if image is None else {self.name: image}


def measure(path: Path, image: np.ndarray, work: Path, s8_kernels: bool = False) -> dict:
    """b1 median ms and the most frequent operators after ONNX Runtime's graph optimisations; ``s8_kernels``:
    let it fuse s8-activation Q/DQ into its s8 x s8 kernels (``session.qdqisint8allowed``)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(work / f"{path.stem}.{int(s8_kernels)}.opt.onnx")
    if s8_kernels:
        options.add_session_config_entry("session.qdqisint8allowed", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: image}
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {"b1_p50_ms": round(float(np.median(times)) * 1e3, 1), "ops": dict(ops.most_common(10))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the bundle folder")
    parser.add_argument("calib", type=Path, help="a folder of calibration films")
    parser.add_argument("out", type=Path, help="the JSON report")
    parsed = parser.parse_args(argv)
    bundle, calib, out = Bundle.open(parsed.bundle), parsed.calib, parsed.out
    size = bundle.card.input.size
    paths = sorted(p for p in calib.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[::40][:16]
    images = [load_and_preprocess(p, size, pre=bundle.card.preprocessing)[None, None] for p in paths]
    src = bundle.folder / "model.onnx"
    name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    report = {"onnxruntime": ort.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for activations in (QuantType.QUInt8, QuantType.QInt8):
            graph = work / f"ort_qdq_{activations.name}.onnx"
            quantize_static(
                str(src),
                str(graph),
                Films(name, images),
                quant_format=QuantFormat.QDQ,
                activation_type=activations,
                weight_type=QuantType.QInt8,
                per_channel=True,
                calibrate_method=CalibrationMethod.MinMax,
            )
            report[f"ort quantize_static, {activations.name} activations"] = measure(graph, images[0], work)
            if activations == QuantType.QInt8:
                report["the same, s8 x s8 kernels allowed"] = measure(graph, images[0], work, s8_kernels=True)
        report["fp32 (model.onnx)"] = measure(src, images[0], work)
        shipped = bundle.folder / "model.int8.onnx"
        report["shipped int8 (model.int8.onnx)"] = measure(shipped, images[0], work)
        report["shipped int8, s8 x s8 kernels allowed"] = measure(shipped, images[0], work, s8_kernels=True)
    for what, result in report.items():
        print(what, result)
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
