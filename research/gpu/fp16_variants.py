"""``python -m research.gpu.fp16_variants BUNDLE OUT IMAGE...``: shipped fp16 graphs against the earlier
export.

Earlier exports kept every SE gate's spatial mean as an fp32 ReduceMean, with a Cast pair around it; the
shipped ones pool it in fp16 (``export/fp16.py``). Both are measured in one process on the same GPU: the
classifier's b64 throughput, and the CUDA explainer's open (session creation, then the warm-up that pays
cuDNN's search and captures the CUDA graph) and steady seconds per 1000-sample explanation.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from cxr.bench.latency import measure as classifier_latency
from cxr.export.fp16 import convert_fp16, probe_feeds
from cxr.runtime.backends.onnxruntime import OrtBackend, OrtExplainer
from cxr.runtime.bundle import Bundle
from cxr.runtime.explain import warm_host
from cxr.runtime.preprocess import load_and_preprocess

from research.gpu.explain_variants import bundle_out_images, timed_explanations

log = logging.getLogger(__name__)


def earlier_graphs(bundle: Bundle, out: Path) -> dict[str, Path]:
    """The fp16 graphs as exports before the pooling rewrite made them, written under ``out`` (a scratch
    folder)."""
    image_feeds, explain_feeds = probe_feeds(bundle.card.input.size)
    paths = {}
    for graph, feeds in (("model", image_feeds), ("explain", explain_feeds)):
        paths[graph] = out / f"{graph}.fp16-reducemean.onnx"
        convert_fp16(bundle.verified(f"{graph}.onnx"), paths[graph], feeds, pool_spatial_means=False)
    return paths


def explainer_timing(path: Path, size: int, images: list[np.ndarray]) -> dict[str, Any]:
    started = time.perf_counter()
    with OrtExplainer(path, "fp16") as explainer:
        session_s = time.perf_counter() - started
        explainer.warm_up(size)
        warm_up_s = time.perf_counter() - started - session_s
        times = timed_explanations(explainer, images)
        return {
            "device": explainer.device,
            "batch": explainer.limits.max_batch,
            "cuda_graph": explainer.cuda_graph,
            "session_s": session_s,
            "warm_up_s": warm_up_s,
            "first_s": times[0],
            "steady_s_per_image": float(np.mean(times[1:] or times)),
        }


def compare(bundle: Bundle, scratch: Path, images: list[np.ndarray]) -> dict[str, Any]:
    size = bundle.card.input.size
    graphs = {
        "pooled_fp16": {g: bundle.onnx_path(g, "fp16") for g in ("model", "explain")},
        "reducemean_fp32": earlier_graphs(bundle, scratch),
    }
    results = {}
    for name, paths in graphs.items():
        with OrtBackend(paths["model"], "fp16", max_batch=64) as classifier:
            latency = classifier_latency(classifier.run, size, [64], warmup_s=1.0, duration_s=3.0)
        results[name] = {
            "classifier_b64_img_s": latency["throughput_img_s"]["64"],
            "classifier_b1_p50_ms": latency["b1_ms"]["p50"],
            "explainer": explainer_timing(paths["explain"], size, images),
        }
    return results


def main(argv: list[str] | None = None) -> None:
    bundle_dir, out, paths = bundle_out_images(__doc__, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bundle = Bundle.open(bundle_dir)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = bundle.card.input.size
    images = [load_and_preprocess(Path(p), size, pre=bundle.card.preprocessing) for p in paths]
    warm_host()
    with tempfile.TemporaryDirectory() as scratch:
        results = compare(bundle, Path(scratch), images)
    for name, r in results.items():
        e = r["explainer"]
        log.info(
            f"{name:<16} classifier b64 {r['classifier_b64_img_s']:>7.1f} img/s, "
            f"b1 {r['classifier_b1_p50_ms']:.2f} ms | explainer session {e['session_s']:.2f} s, "
            f"warm-up {e['warm_up_s']:.2f} s, first {e['first_s']:.3f} s, "
            f"steady {e['steady_s_per_image']:.3f} s/img on {e['device']}"
        )
    (out_dir / "fp16_variants.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
