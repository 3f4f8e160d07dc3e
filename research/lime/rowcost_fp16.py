"""Per-row LIME cost, interleaved in one process: OV fp32, OV fp16, ORT fp32; and fp16-fp32 difference."""

import json
import sys
import time
from pathlib import Path

import numpy as np
from cxr.bench.lime_bench import load_images
from cxr.runtime.backends.select import open_explainer
from cxr.runtime.bundle import Bundle
from cxr.runtime.explain import ExplainConfig
from cxr.runtime.segment import segment, segment_means

from research.lime.settle_sweep import read_tape, tape_name

bundle = Bundle.open(Path(sys.argv[1]))
image_path = Path(sys.argv[2])
tapes = Path(sys.argv[3])
n = int(sys.argv[4])
repeats = int(sys.argv[5])
image = load_images(bundle, [image_path], 0)[0]
tape = read_tape(tapes / tape_name(str(image_path)))
rows = tape["rows"][:n]
cfg = ExplainConfig()
segments = segment(image, cfg.segmenter, cfg.n_segments, cfg.seed)
opened = {
    "ov_fp32": open_explainer(bundle, "openvino", "fp32")[0],
    "ov_fp16": open_explainer(bundle, "openvino", "fp16")[0],
    "ort_fp32": open_explainer(bundle, "onnxruntime", "fp32")[0],
}
for k, e in opened.items():
    print(k, e.provider, flush=True)
times = {k: [] for k in opened}
out = {}
for r in range(repeats):
    for k, e in opened.items():
        e.set_image(image, segment_means(image, segments), segments)
        step = e.limits.max_batch
        t = time.perf_counter()
        out[k] = np.concatenate([e.run(rows[i : i + step]) for i in range(0, len(rows), step)])
        times[k].append((time.perf_counter() - t) / len(rows))
        print(r, k, round(times[k][-1] * 1000, 1), "ms/row", flush=True)
label = int(tape["label"])
res = {
    "ms_per_row_median": {k: round(1000 * float(np.median(v)), 1) for k, v in times.items()},
    "all": times,
    "fp16_minus_fp32_std": float(np.std(out["ov_fp16"][:, label] - out["ov_fp32"][:, label])),
    "fp16_minus_fp32_max": float(np.abs(out["ov_fp16"] - out["ov_fp32"]).max()),
    "ort_minus_ov_fp32_max": float(np.abs(out["ort_fp32"] - out["ov_fp32"]).max()),
    "signal_std": float(np.std(out["ov_fp32"][:, label])),
    "rows": n,
    "image": str(image_path),
}
print(json.dumps(res, indent=1))
Path(sys.argv[6]).write_text(json.dumps(res, indent=1))
