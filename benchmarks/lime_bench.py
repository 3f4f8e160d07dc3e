"""``cxr-bench lime``: our in-graph explainer per precision, against peers on the same images and segments.

Peers: ``stock`` (lime's ``LimeImageExplainer``, batches of 10 float RGB images, on the same backend) and
``captum`` (Captum's ``Lime`` on the PyTorch model the bundle came from: fp16 channels-last on a GPU, 128
perturbations per call). Ours is timed as ``predict --explain`` runs it: the explainer is opened (and warmed
up) once, then each image is explained; "first image" counts the open, "steady" the images after it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from cxr.bench.environment import environment
from cxr.runtime.backends.base import Backend, ExplainerBackend
from cxr.runtime.backends.select import describe, open_classifier, open_explainer
from cxr.runtime.bundle import Bundle
from cxr.runtime.errors import CxrError, CxrUsageError
from cxr.runtime.explain import KERNEL_WIDTH, ExplainConfig, explain_image
from cxr.runtime.segment import segment, segment_means

log = logging.getLogger(__name__)

PEERS = ("stock", "captum")
CAPTUM_PER_CALL = 128


def stock_lime(
    image: np.ndarray, segments: np.ndarray, backend: Backend, samples: int, seed: int
) -> dict[str, Any]:
    """lime's LimeImageExplainer.explain_instance with its defaults (batches of 10, float RGB to
    classifier_fn)."""
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
        image.astype(np.float64),
        classifier_fn,
        top_labels=1,
        hide_color=None,
        num_samples=samples,
        segmentation_fn=lambda _: segments,
        random_seed=seed,
    )
    total = time.perf_counter() - start
    return {
        "total_s": total,
        "backend_s": spent["backend_s"],
        "host_overhead_s": total - spent["backend_s"],
        "bytes_from_lime": spent["bytes_from_lime"],
        "bytes_to_backend": spent["bytes_to_backend"],
        "label": int(explanation.top_labels[0]),
        "backend": describe(backend),
    }


def ours(
    image: np.ndarray, explainer: ExplainerBackend, samples: int, seed: int, segmenter: str
) -> dict[str, Any]:
    config = ExplainConfig(samples=samples, seed=seed, segmenter=segmenter)
    start = time.perf_counter()
    explanation = explain_image(image, explainer, config)
    total = time.perf_counter() - start
    return {
        "total_s": total,
        "backend_s": explanation.timing["model_s"],
        "host_overhead_s": total - explanation.timing["model_s"],
        "bytes_to_backend": explanation.bytes_sent,
        "timing": explanation.timing,
        "label": explanation.label,
        "segments": int(explanation.segments.max()) + 1,
    }


def ours_over_images(
    bundle: Bundle,
    backend: str,
    precision: str,
    images: list[np.ndarray],
    samples: int,
    seed: int,
    segmenter: str,
    sweep: list[int],
) -> dict[str, Any]:
    """Open (with warm-up) once, explain every image; the open is charged to the first image."""
    started = time.perf_counter()
    explainer, reason = open_explainer(bundle, backend, precision)
    open_s = time.perf_counter() - started
    with explainer:
        runs = [ours(image, explainer, samples, seed, segmenter) for image in images]
        warm = ours(
            images[0], explainer, samples, seed, segmenter
        )  # the first image again, imports and search paid
        by_samples = {str(n): ours(images[0], explainer, n, seed, segmenter)["total_s"] for n in sweep}
    per_image = [r["total_s"] for r in runs]
    steady = per_image[1:] or [warm["total_s"]]
    return {
        "backend": reason.split(";")[0],
        "batch": explainer.limits.max_batch,
        "open_s": open_s,
        "cuda_graph": bool(getattr(explainer, "cuda_graph", False)),
        "first_image_s": open_s + per_image[0],
        "per_image_s": per_image,
        "steady_s_per_image": float(np.mean(steady)),
        "first": runs[0],
        "first_warm": warm,
        "mean_timing": {
            k: float(np.mean([r["timing"][k] for r in runs[1:] or runs])) for k in runs[0]["timing"]
        },
        "seconds_by_samples": by_samples,
    }


def captum_lime(
    bundle: Bundle, images: list[np.ndarray], samples: int, seed: int, segmenter: str
) -> dict[str, Any]:
    """Captum's ``Lime`` on the source PyTorch model, same segments, fill, kernel and samples (GPU: fp16
    channels-last)."""
    try:
        import torch
        from captum._utils.models.linear_model import SkLearnRidge
        from captum.attr import Lime
    except ImportError as exc:
        raise CxrError(
            f"--peer captum needs torch and captum ({exc.name} missing): pip install captum"
        ) from None
    from cxr.bench.torch_reference import source_run, torch_forward

    cuda = torch.cuda.is_available()
    forward, device = torch_forward(source_run(bundle), half=cuda)

    def similarity(
        original, perturbed, interpretable, **_: Any
    ) -> torch.Tensor:  # lime's kernel on cosine distance
        a, b = interpretable.float().flatten(), torch.ones_like(interpretable.float().flatten())
        distance = 1 - torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
        return torch.sqrt(torch.exp(-(distance**2) / KERNEL_WIDTH**2))

    lime = Lime(forward, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=similarity)
    per_image = []
    for index, image in enumerate([images[0], *images]):  # the first call warms up cuDNN and is not counted
        segments = segment(image, segmenter, seed=seed)
        fill = segment_means(image, segments)
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            pixels = torch.from_numpy(image)[None, None].to(device=device, dtype=torch.float32)
            label = int(forward(pixels).argmax())
            lime.attribute(
                pixels,
                target=label,
                baselines=torch.from_numpy(fill)[None, None].to(device, torch.float32),
                feature_mask=torch.from_numpy(segments.astype(np.int64))[None, None].to(device),
                n_samples=samples,
                perturbations_per_eval=CAPTUM_PER_CALL,
            )
        if cuda:
            torch.cuda.synchronize()
        if index:
            per_image.append(time.perf_counter() - start)
    return {
        "device": str(device),
        "dtype": "fp16" if cuda else "fp32",
        "per_call": CAPTUM_PER_CALL,
        "per_image_s": per_image,
        "steady_s_per_image": float(np.mean(per_image)),
    }


def load_images(bundle: Bundle, paths: list[Path], seed: int) -> list[np.ndarray]:
    from cxr.runtime.preprocess import load_and_preprocess

    size = bundle.card.input.size
    if paths:
        return [load_and_preprocess(path, size, pre=bundle.card.preprocessing) for path in paths]
    from cxr.train.synth import make_phantom

    return [make_phantom(np.random.default_rng(seed), size, "pneumonia_bacterial")[0]]


def run_lime_bench(
    bundle_dir: Path,
    out: Path,
    image_paths: list[Path],
    samples: int,
    seed: int,
    segmenter: str,
    sample_sweep: list[int],
    precisions: tuple[str, ...] = ("fp32",),
    backend: str = "auto",
    peers: tuple[str, ...] = ("stock",),
) -> dict[str, Any]:
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise CxrUsageError(f"--peer: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    bundle = Bundle.open(bundle_dir)
    images = load_images(bundle, image_paths, seed)
    results: dict[str, Any] = {
        "environment": environment(),
        "arch": bundle.card.arch,
        "input_size": bundle.card.input.size,
        "samples": samples,
        "images": len(images),
        "segmenter": segmenter,
        "image": [str(p) for p in image_paths] or "generated phantom",
        "ours": {
            p: ours_over_images(bundle, backend, p, images, samples, seed, segmenter, sample_sweep)
            for p in precisions
        },
    }
    first = results["ours"][precisions[0]]
    if "stock" in peers:
        segments = segment(images[0], segmenter, seed=seed)
        classifier, _ = open_classifier(bundle, backend, precisions[0])
        with classifier:
            stock = stock_lime(images[0], segments, classifier, samples, seed)
        mine = first["first_warm"]
        results["stock_lime"] = stock
        results["host_overhead_speedup"] = stock["host_overhead_s"] / mine["host_overhead_s"]
        results["total_speedup"] = stock["total_s"] / mine["total_s"]
        results["bytes_ratio_from_lime"] = stock["bytes_from_lime"] / mine["bytes_to_backend"]
        results["bytes_ratio_to_backend"] = stock["bytes_to_backend"] / mine["bytes_to_backend"]
    if "captum" in peers:
        results["captum"] = captum_lime(bundle, images, samples, seed, segmenter)
        results["speedup_vs_captum"] = {
            p: results["captum"]["steady_s_per_image"] / r["steady_s_per_image"]
            for p, r in results["ours"].items()
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "lime.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_lime(results, out / "lime.png")
    log.info(f"wrote {out / 'lime.json'} and {out / 'lime.png'}")
    return results


def format_lime(r: dict[str, Any]) -> str:
    lines = [
        f"LIME, {r['arch']} @ {r['input_size']}, {r['samples']} samples, {r['images']} image(s), "
        f"{r['segmenter']}",
        f"{'':<22}{'first image s':>14}{'steady s/img':>14}  runs on",
    ]
    for precision, o in r["ours"].items():
        lines.append(
            f"{'ours ' + precision:<22}{o['first_image_s']:>14.3f}{o['steady_s_per_image']:>14.3f}  "
            f"{o['backend']}, batch {o['batch']}"
        )
    if "captum" in r:
        c = r["captum"]
        lines.append(
            f"{'captum Lime':<22}{'':>14}{c['steady_s_per_image']:>14.3f}  PyTorch {c['dtype']} on "
            f"{c['device']}, "
            f"{c['per_call']} per call"
        )
        lines.append(
            "ours vs captum: " + ", ".join(f"{p} {s:.1f}x faster" for p, s in r["speedup_vs_captum"].items())
        )
    if "stock_lime" in r:
        s, o = r["stock_lime"], next(iter(r["ours"].values()))["first_warm"]
        lines.append(
            f"stock lime, one image: total {s['total_s']:.3f} s (host {s['host_overhead_s']:.3f} s) vs ours "
            f"{o['total_s']:.3f} s (host {o['host_overhead_s']:.3f} s): host overhead "
            f"{r['host_overhead_speedup']:.1f}x lower, {r['bytes_ratio_from_lime']:.0f}x fewer bytes"
        )
    first = next(iter(r["ours"].values()))
    lines.append(
        "ours, seconds per explanation by samples: "
        + ", ".join(f"{k}: {v:.2f}" for k, v in first["seconds_by_samples"].items())
    )
    return "\n".join(lines)


def plot_lime(r: dict[str, Any], path: Path) -> None:
    """Seconds per explanation, split into model calls and host work, for ours and each peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, model, host = [], [], []
    for precision, o in r["ours"].items():
        names.append(f"ours {precision}")
        model.append(o["mean_timing"]["model_s"])
        host.append(o["steady_s_per_image"] - o["mean_timing"]["model_s"])
    if "captum" in r:
        names.append(f"captum {r['captum']['dtype']}")
        model.append(r["captum"]["steady_s_per_image"])
        host.append(0.0)
    if "stock_lime" in r:
        names.append("stock lime")
        model.append(r["stock_lime"]["backend_s"])
        host.append(r["stock_lime"]["host_overhead_s"])
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.6))
    ax.barh(names, model, label="model calls (captum: all)")
    ax.barh(names, host, left=model, label="host work")
    ax.set_xlabel("seconds per explanation")
    ax.set_title(
        f"LIME, {r['samples']} samples, {r['arch']} @ {r['input_size']} "
        f"({r['environment'].get('gpu') or r['environment'].get('cpu', '')})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
