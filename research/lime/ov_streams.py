"""``python -m research.lime.ov_streams BUNDLE IMAGE [SAMPLES] [REPEATS]``: the OpenVINO explainer with one
stream against parallel streams, interleaved in one process on one real image.

The host's speed drifts by ±20 % over minutes, so the two settings alternate and the medians are compared: the
evidence behind ``explain_streams`` in ``runtime/backends/openvino.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from cxr.runtime.backends.openvino import OvExplainer, explain_streams
from cxr.runtime.bundle import Bundle
from cxr.runtime.explain import ExplainConfig, explain_image
from cxr.runtime.preprocess import load_and_preprocess


def compare_streams(bundle_dir: Path, image_path: Path, samples: int = 320, repeats: int = 3) -> dict:
    """Seconds per fixed-budget explanation with 1 and with ``explain_streams()`` streams, and their ratio."""
    bundle = Bundle.open(bundle_dir)
    size = bundle.card.input.size
    image = load_and_preprocess(image_path, size)
    config = ExplainConfig(samples=samples, seed=0)
    path = bundle.onnx_path("explain", "fp32")
    settings = sorted({1, explain_streams()})
    explainers = {}
    for streams in settings:
        explainers[streams] = OvExplainer(path, "fp32", bundle.verified_bytes(path.name))
        explainers[streams].streams = streams
        explainers[streams].warm_up(size)
    seconds: dict[int, list[float]] = {streams: [] for streams in settings}
    weights = {}
    for _ in range(repeats):
        for streams, explainer in explainers.items():
            started = time.perf_counter()
            weights[streams] = explain_image(image, explainer, config).weights
            seconds[streams].append(time.perf_counter() - started)
    for explainer in explainers.values():
        explainer.close()
    medians = {streams: float(np.median(times)) for streams, times in seconds.items()}
    return {
        "bundle": str(bundle_dir),
        "image": str(image_path),
        "samples": samples,
        "seconds": seconds,
        "median_s": medians,
        "ratio": medians[settings[-1]] / medians[1],
        "same_weights": len({json.dumps(w, sort_keys=True) for w in weights.values()}) == 1,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("image", type=Path)
    parser.add_argument("samples", nargs="?", type=int, default=320)
    parser.add_argument("repeats", nargs="?", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(compare_streams(args.bundle, args.image, args.samples, args.repeats), indent=2))


if __name__ == "__main__":
    main()
