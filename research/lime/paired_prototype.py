"""fp32 top-5 overlap vs N for plain and paired (z, 1-z) rows, seed 1, against the taped seed-0 1000 map."""

import json
import sys
import time
from pathlib import Path

import numpy as np
from cxr.bench.lime_bench import load_images
from cxr.bench.lime_fidelity import compare_weights
from cxr.runtime.backends.select import open_explainer
from cxr.runtime.bundle import Bundle
from cxr.runtime.explain import ExplainConfig, lime_fit, sample_rows
from cxr.runtime.segment import segment, segment_means

from research.lime.settle_sweep import read_tape, tape_name, tape_reference

bundle = Bundle.open(Path(sys.argv[1]))
paths = [Path(p) for p in Path(sys.argv[2]).read_text().split()]
tapes = Path(sys.argv[3])
total = int(sys.argv[4])
out = Path(sys.argv[5])
seed = int(sys.argv[6])
cfg = ExplainConfig()


def paired_rows(rng, n, d):
    z = rng.integers(0, 2, ((n - 2) // 2, d), dtype=np.uint8)
    rows = np.empty((n, d), np.uint8)
    rows[0] = 1
    rows[1] = 0
    rows[2::2] = z
    rows[3::2] = 1 - z
    return rows


explainer = open_explainer(bundle, "openvino", "fp32")[0]
print(explainer.provider, flush=True)
result = json.loads(out.read_text()) if out.exists() else {}
for path, image in zip(paths, load_images(bundle, paths, 0)):
    if str(path) in result:
        continue
    tape = read_tape(tapes / tape_name(str(path)))
    label = int(tape["label"])
    ref = tape_reference(tape)
    segments = segment(image, cfg.segmenter, cfg.n_segments, cfg.seed)
    d = int(segments.max()) + 1
    explainer.set_image(image, segment_means(image, segments), segments)
    per = {}
    for name, rows in (
        ("plain", sample_rows(np.random.default_rng(seed), total, d)),
        ("paired", paired_rows(np.random.default_rng(seed), total, d)),
    ):
        t = time.perf_counter()
        probs = np.concatenate([explainer.run(rows[i : i + 32]) for i in range(0, total, 32)])
        secs = time.perf_counter() - t
        per[name] = {"ms_per_row": 1000 * secs / total}
        for n in range(100, total + 1, 50):
            c = compare_weights(ref, lime_fit(rows[:n], probs[:n], label, 0)[0])
            per[name][str(n)] = [c["top5_overlap"], c["spearman"]]
        np.savez_compressed(
            out.parent / f"{name}-{tape_name(str(path))}", rows=rows, probs=probs, label=label
        )
    result[str(path)] = per
    print(
        path.name,
        json.dumps({k: {n: v[n] for n in ("200", "300", str(total))} for k, v in per.items()}),
        flush=True,
    )
    out.write_text(json.dumps(result, indent=1))
for name in ("plain", "paired"):
    print(
        name,
        {
            n: round(float(np.mean([r[name][n][0] for r in result.values()])), 3)
            for n in map(str, range(100, total + 1, 50))
        },
    )
