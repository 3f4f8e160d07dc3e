"""``python -m research.gpu.explain_variants BUNDLE OUT IMAGE...``: the explainer's GPU settings, measured
side by side.

Batch size and convolution layout (NCHW / NHWC) of the ONNX Runtime CUDA explainer, per precision, on the same
images in one process: the evidence behind the defaults in ``runtime/backends/onnxruntime.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.backends.onnxruntime import CudaOptions, OrtExplainer
from cxr.runtime.bundle import Bundle
from cxr.runtime.explain import ExplainConfig, explain_image, warm_host
from cxr.runtime.preprocess import load_and_preprocess

log = logging.getLogger(__name__)

VARIANTS = [
    ("fp16", 128, False),
    ("fp16", 128, True),
    ("fp16", 256, False),
    ("fp16", 256, True),
    ("fp32", 256, False),
    ("fp32", 256, True),
]


def timed_explanations(
    explainer: OrtExplainer, images: list[np.ndarray], config: ExplainConfig = ExplainConfig()
) -> list[float]:
    """Seconds per explanation (1000 samples by default), image by image (the first one included)."""
    times = []
    for image in images:
        start = time.perf_counter()
        explain_image(image, explainer, config)
        times.append(time.perf_counter() - start)
    return times


def measure(
    bundle: Bundle, precision: str, batch: int, nhwc: bool, images: list[np.ndarray]
) -> dict[str, Any]:
    started = time.perf_counter()
    with OrtExplainer(
        bundle.onnx_path("explain", precision),
        precision,
        max_batch=batch,
        cuda=CudaOptions(nhwc=nhwc, cuda_graph=True),
    ) as explainer:
        explainer.warm_up(bundle.card.input.size)
        open_s = time.perf_counter() - started
        times = timed_explanations(explainer, images)
        return {
            "precision": precision,
            "batch": batch,
            "nhwc": explainer.cuda.nhwc,
            "asked_nhwc": nhwc,
            "cuda_graph": explainer.cuda_graph,
            "device": explainer.device,
            "open_s": open_s,
            "first_s": times[0],
            "steady_s_per_image": float(np.mean(times[1:] or times)),
        }


def bundle_out_images(doc: str, argv: list[str] | None) -> tuple[Path, Path, list[Path]]:
    """BUNDLE OUT IMAGE...: the arguments of the GPU scripts that time a bundle on a few images."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args(argv)
    return args.bundle, args.out, args.images


def main(argv: list[str] | None = None) -> None:
    bundle_dir, out, paths = bundle_out_images(__doc__, argv)
    bundle = Bundle.open(bundle_dir)
    images = [
        load_and_preprocess(Path(p), bundle.card.input.size, pre=bundle.card.preprocessing) for p in paths
    ]
    warm_host()
    rows = [measure(bundle, *variant, images) for variant in VARIANTS]
    for r in rows:
        log.info(
            f"{r['precision']} batch {r['batch']:>3} {'NHWC' if r['nhwc'] else 'NCHW'} graph "
            f"{r['cuda_graph']!s:<5} "
            f"open {r['open_s']:.2f} s  first {r['first_s']:.3f} s  steady {r['steady_s_per_image']:.3f} "
            "s/img"
        )
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "explain_variants.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
