"""``cxr-bench lime``: stock ``lime`` vs our explainer graph, same backend (ORT CPU), segmentation, samples.

Host overhead = total - time inside backend calls: what bounds LIME on a GPU, where the model is fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from cxr.bench.environment import environment
from cxr.runtime.backends.onnxruntime import OrtBackend, OrtExplainer
from cxr.runtime.bundle import Bundle
from cxr.runtime.explain import ExplainConfig, explain_image
from cxr.runtime.segment import segment


def stock_lime(image: np.ndarray, segments: np.ndarray, backend: OrtBackend, samples: int, seed: int) -> dict[str, Any]:
    """lime's LimeImageExplainer.explain_instance with its defaults (batches of 10, float RGB to classifier_fn)."""
    from lime.lime_image import LimeImageExplainer

    spent = {"backend_s": 0.0, "bytes_from_lime": 0, "bytes_to_backend": 0}

    def classifier_fn(images: np.ndarray) -> np.ndarray:
        spent["bytes_from_lime"] += images.nbytes
        pixels = np.round(images[:, :, :, 0]).astype(np.uint8)[:, None]
        spent["bytes_to_backend"] += pixels.nbytes
        start = time.perf_counter()
        probs = backend.run(pixels)
        spent["backend_s"] += time.perf_counter() - start
        return probs

    explainer = LimeImageExplainer(random_state=seed)
    start = time.perf_counter()
    explanation = explainer.explain_instance(
        image.astype(np.float64), classifier_fn, top_labels=1, hide_color=None, num_samples=samples,
        segmentation_fn=lambda _: segments, random_seed=seed,
    )
    total = time.perf_counter() - start
    label = explanation.top_labels[0]
    return {"total_s": total, "backend_s": spent["backend_s"], "host_overhead_s": total - spent["backend_s"],
            "bytes_from_lime": spent["bytes_from_lime"], "bytes_to_backend": spent["bytes_to_backend"],
            "label": int(label), "weights": dict(explanation.local_exp[label])}


def ours(image: np.ndarray, explainer: OrtExplainer, samples: int, seed: int, segmenter: str) -> dict[str, Any]:
    config = ExplainConfig(samples=samples, seed=seed, segmenter=segmenter)
    start = time.perf_counter()
    explanation = explain_image(image, explainer, config)
    total = time.perf_counter() - start
    return {"total_s": total, "backend_s": explanation.timing["model_s"],
            "host_overhead_s": total - explanation.timing["model_s"], "bytes_to_backend": explanation.bytes_sent,
            "timing": explanation.timing, "label": explanation.label, "segments": int(explanation.segments.max()) + 1}


def run_lime_bench(bundle_dir: Path, out: Path, image_path: Path | None, samples: int, seed: int,
                   segmenter: str, sample_sweep: list[int]) -> dict[str, Any]:
    from cxr.runtime.preprocess import load_and_preprocess

    bundle = Bundle.open(bundle_dir)
    size = bundle.card.input.size
    if image_path is not None:
        image = load_and_preprocess(image_path, size)
    else:
        from cxr.train.synth import make_phantom

        image = make_phantom(np.random.default_rng(seed), size, "pneumonia_bacterial")[0]
    segments = segment(image, segmenter, seed=seed)
    with OrtBackend(bundle.onnx_path("model", "fp32"), "fp32") as classifier, \
            OrtExplainer(bundle.onnx_path("explain", "fp32"), "fp32") as explainer:
        ours(image, explainer, 20, seed, segmenter)  # warm-up both sessions
        classifier.run(image[None, None])
        stock = stock_lime(image, segments, classifier, samples, seed)
        mine = ours(image, explainer, samples, seed, segmenter)
        sweep = {str(n): ours(image, explainer, n, seed, segmenter)["total_s"] for n in sample_sweep}
    results = {
        "environment": environment(), "arch": bundle.card.arch, "input_size": size, "samples": samples,
        "image": str(image_path) if image_path else "generated phantom", "stock_lime": stock, "ours": mine,
        "host_overhead_speedup": stock["host_overhead_s"] / mine["host_overhead_s"],
        "total_speedup": stock["total_s"] / mine["total_s"],
        "bytes_ratio_from_lime": stock["bytes_from_lime"] / mine["bytes_to_backend"],
        "bytes_ratio_to_backend": stock["bytes_to_backend"] / mine["bytes_to_backend"],
        "ours_seconds_by_samples": sweep,
    }
    results["stock_lime"].pop("weights")
    out.mkdir(parents=True, exist_ok=True)
    (out / "lime.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_split(results, out / "lime.png")
    print(format_lime(results))
    print(f"wrote {out / 'lime.json'} and {out / 'lime.png'}")
    return results


def format_lime(r: dict[str, Any]) -> str:
    s, o = r["stock_lime"], r["ours"]
    return "\n".join([
        f"LIME, {r['arch']} @ {r['input_size']}, {r['samples']} samples, ORT CPU, same segmentation",
        f"{'':<12}{'total s':>10}{'backend s':>11}{'host s':>10}{'MB to backend':>15}",
        f"{'stock lime':<12}{s['total_s']:>10.3f}{s['backend_s']:>11.3f}{s['host_overhead_s']:>10.3f}"
        f"{s['bytes_to_backend'] / 1e6:>15.2f}  (lime hands classifier_fn {s['bytes_from_lime'] / 1e6:.0f} MB float64 RGB)",
        f"{'ours':<12}{o['total_s']:>10.3f}{o['backend_s']:>11.3f}{o['host_overhead_s']:>10.3f}{o['bytes_to_backend'] / 1e6:>15.3f}",
        f"host overhead speedup {r['host_overhead_speedup']:.1f}x, total speedup {r['total_speedup']:.2f}x, "
        f"bytes {r['bytes_ratio_from_lime']:.0f}x fewer than lime hands out ({r['bytes_ratio_to_backend']:.0f}x fewer reaching the backend)",
        "ours, seconds per explanation by samples: " + ", ".join(f"{k}: {v:.2f}" for k, v in r["ours_seconds_by_samples"].items()),
    ])


def plot_split(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["stock lime", "ours"]
    backend = [r["stock_lime"]["backend_s"], r["ours"]["backend_s"]]
    host = [r["stock_lime"]["host_overhead_s"], r["ours"]["host_overhead_s"]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh(names, backend, label="inside backend calls")
    ax.barh(names, host, left=backend, label="host overhead")
    ax.set_xlabel("seconds per explanation")
    ax.set_title(f"LIME time split ({r['samples']} samples): host overhead {r['host_overhead_speedup']:.0f}x lower")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
