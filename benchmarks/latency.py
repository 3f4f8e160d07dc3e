"""``cxr-bench latency``: per-image latency (p50/p95/p99 at batch 1) and throughput per batch size.

Every backend and precision available here, plus PyTorch eager as the baseline, in one process and run.
Host preprocessing (decode + resize + crop) is measured separately from model time. On a CPU box the
result also says how much of the host's fp32 matrix rate each backend uses (``compute_bound``): a backend near
100 % leaves no room for another fp32 runtime to be much faster here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from cxr.bench.compute_bound import compute_bound, share_of_rate
from cxr.bench.environment import environment, slug
from cxr.bench.torch_reference import torch_runner
from cxr.runtime.bundle import Bundle, engine_name, onnx_name
from cxr.runtime.errors import CxrError

log = logging.getLogger(__name__)

Runner = Callable[[np.ndarray], np.ndarray]
EXHAUSTIVE = "onnxruntime-exhaustive"  # ONNX Runtime CUDA with cuDNN's exhaustive search (not what ships)
INTERLEAVE_ROUNDS = 5  # turns of interleaved batch-1 timing per backend
SETTLE_S = 0.3  # idle before each turn: another runtime's threads spin for a while after its last run


def _timed_runs(run: Runner, batch: np.ndarray, seconds: float, min_runs: int = 5) -> list[float]:
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < min_runs:
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return times


def b1_stats(times_s: list[float]) -> dict[str, Any]:
    """p50/p95/p99 in milliseconds and the number of runs."""
    single = np.array(times_s) * 1000
    return {
        "p50": float(np.percentile(single, 50)),
        "p95": float(np.percentile(single, 95)),
        "p99": float(np.percentile(single, 99)),
        "runs": len(single),
    }


def interleaved_b1(
    runs: dict[str, Runner],
    size: int,
    warmup_s: float,
    duration_s: float,
    rounds: int = INTERLEAVE_ROUNDS,
    settle_s: float = SETTLE_S,
) -> dict[str, dict[str, Any]]:
    """Batch-1 latency of every runner measured in turns: ``rounds`` rounds, each giving every runner
    ``duration_s / rounds`` of timed runs, so a host whose speed drifts during the run (shared or throttled
    cores) moves all backends alike and their ratios hold. Each turn starts with ``settle_s`` idle and one
    untimed run: ONNX Runtime's and OpenVINO's threads keep spinning after their last run, and measured right
    after them another backend ran up to 1.7x slower than alone."""
    one = np.random.default_rng(0).integers(0, 256, (1, 1, size, size), dtype=np.uint8)
    for run in runs.values():
        _timed_runs(run, one, warmup_s, 2)
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            time.sleep(settle_s)
            run(one)
            times[key] += _timed_runs(run, one, duration_s / rounds, 1)
    return {key: b1_stats(t) for key, t in times.items()}


def measure(
    run: Runner,
    size: int,
    batch_sizes: list[int],
    warmup_s: float,
    duration_s: float,
    b1: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Batch-1 latency (unless ``b1`` was measured already, interleaved) and throughput per batch size."""
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, 1, size, size), dtype=np.uint8)
    if b1 is None:
        _timed_runs(run, one, warmup_s, 2)
        b1 = b1_stats(_timed_runs(run, one, duration_s))
    result: dict[str, Any] = {"b1_ms": b1, "throughput_img_s": {}}
    for batch_size in batch_sizes:
        batch = rng.integers(0, 256, (batch_size, 1, size, size), dtype=np.uint8)
        _timed_runs(run, batch, min(warmup_s, 0.5), 1)
        times = _timed_runs(run, batch, duration_s / max(1, len(batch_sizes)), 2)
        result["throughput_img_s"][str(batch_size)] = batch_size / float(np.median(times))
    return result


def runners(bundle: Bundle, wanted: list[str] | None) -> list[tuple[str, str, Callable[[], Any]]]:
    """(name, precision, opener) for PyTorch (eager fp32; on CUDA also eager and compiled fp16 channels-last),
    each ORT graph and each engine present here."""
    from cxr.runtime.backends.onnxruntime import gpu_providers
    from cxr.runtime.backends.select import runnable_here

    found = []
    run = Path(bundle.card.provenance.get("source_run", ""))
    try:
        import torch

        if (run / "model.pt").is_file():
            found.append(("pytorch", "fp32", lambda: (torch_runner(run), lambda: None)))
            if torch.cuda.is_available():
                found.append(("pytorch", "fp16", lambda: (torch_runner(run, half=True), lambda: None)))
                found.append(
                    (
                        "torch-compile",
                        "fp16",
                        lambda: (torch_runner(run, half=True, compiled=True), lambda: None),
                    )
                )
    except ImportError:
        pass
    on_cuda = bool(gpu_providers())  # ORT on CUDA: the shipped heuristic search, and exhaustive beside it
    for backend, precision in runnable_here(bundle):
        found.append((backend, precision, lambda b=backend, p=precision: _runner(bundle, b, p)))
        if backend == "onnxruntime" and on_cuda:
            found.append((EXHAUSTIVE, precision, lambda p=precision: _ort_runner(bundle, p, exhaustive=True)))
    if wanted:
        found = [f for f in found if f[0] in wanted or f"{f[0]}-{f[1]}" in wanted]
    return found


def _runner(bundle: Bundle, backend: str, precision: str) -> tuple[Runner, Callable[[], None]]:
    """A registered backend's classifier: through this benchmark's own runner where it has one (up to 1024
    images in one call), else opened as predict opens it (a backend registered after this file)."""
    makers = {"onnxruntime": _ort_runner, "openvino": _ov_runner, "tensorrt": _trt_runner}
    if backend in makers:
        return makers[backend](bundle, precision)
    from cxr.runtime.backends.select import open_classifier

    opened, _ = open_classifier(bundle, backend, precision)
    return opened.run_chunked, opened.close


def _ort_runner(
    bundle: Bundle, precision: str, exhaustive: bool = False
) -> tuple[Runner, Callable[[], None]]:
    """The classifier as the runtime opens it (cuDNN's heuristic search on CUDA), or with exhaustive
    search."""
    from cxr.runtime.backends.onnxruntime import CLASSIFIER_CUDA, OrtBackend

    cuda = replace(CLASSIFIER_CUDA, search="EXHAUSTIVE") if exhaustive else CLASSIFIER_CUDA
    backend = OrtBackend(bundle.onnx_path("model", precision), precision, max_batch=1024, cuda=cuda)
    return backend.run, backend.close


def _ov_runner(bundle: Bundle, precision: str) -> tuple[Runner, Callable[[], None]]:
    from cxr.runtime.backends.openvino import OvBackend

    path = bundle.onnx_path("model", precision)
    backend = OvBackend(path, precision, bundle.verified_bytes(path.name), max_batch=1024)
    return backend.run, backend.close


def _trt_runner(bundle: Bundle, precision: str) -> tuple[Runner, Callable[[], None]]:
    from cxr.runtime.backends.tensorrt import TrtBackend

    backend = TrtBackend(bundle.verified(engine_name("model", precision)), precision)
    return backend.run, backend.close


def preprocessing_ms(size: int, images: list[Path] | None = None, count: int = 20, pre: Any = None) -> float:
    """Host decode + the card's steps (suppression, resize, crop) per image, on real files when given, else on
    generated PNGs."""
    import tempfile

    import cv2
    from cxr.runtime.preprocess import load_and_preprocess

    with tempfile.TemporaryDirectory() as tmp:
        if not images:
            rng = np.random.default_rng(0)
            images = []
            for i in range(count):
                path = Path(tmp) / f"{i}.png"
                cv2.imwrite(str(path), rng.integers(0, 256, (1024, 1024), dtype=np.uint8))
                images.append(path)
        start = time.perf_counter()
        for path in images[:count]:
            load_and_preprocess(path, size, pre=pre)
        return (time.perf_counter() - start) / len(images[:count]) * 1000


def measure_interleaved(
    targets: list[tuple[str, str, Callable[[], Any]]],
    size: int,
    batch_sizes: list[int],
    warmup_s: float,
    duration_s: float,
) -> dict[str, dict[str, Any]]:
    """Open every target, time batch 1 in turns (``interleaved_b1``), then each throughput; close all."""
    opened: dict[str, tuple[Runner, Callable[[], None]]] = {}
    try:
        for name, precision, opener in targets:
            opened[f"{name}-{precision}"] = opener()
        b1 = interleaved_b1({key: run for key, (run, _) in opened.items()}, size, warmup_s, duration_s)
        return {
            key: measure(run, size, batch_sizes, warmup_s, duration_s, b1=b1[key])
            for key, (run, _) in opened.items()
        }
    finally:
        for _, close in opened.values():
            close()


def run_latency(
    bundle_dir: Path,
    out: Path,
    backends: list[str] | None,
    batch_sizes: list[int],
    warmup_s: float,
    duration_s: float,
    images: list[Path] | None = None,
    interleave: bool = True,
) -> dict[str, Any]:
    """Every target's latency and throughput; the JSON and PNG written to ``out``. ``interleave``: batch-1
    latency in turns across backends (all open at once), else one backend at a time (one open at a time)."""
    bundle = Bundle.open(bundle_dir)
    size = bundle.card.input.size
    facts = environment()
    results: dict[str, Any] = {
        "environment": facts,
        "arch": bundle.card.arch,
        "input_size": size,
        "batch_sizes": batch_sizes,
        "preprocess_ms_per_image": preprocessing_ms(size, images, pre=bundle.card.preprocessing),
        "backends": {},
    }
    targets = runners(bundle, backends)
    if not targets:
        raise CxrError("no backend to measure (check --backends)")
    results["b1_order"] = "interleaved" if interleave else "one backend after another"
    if interleave:
        results["backends"] = measure_interleaved(targets, size, batch_sizes, warmup_s, duration_s)
    else:
        for name, precision, opener in targets:
            run, close = opener()
            try:
                results["backends"][f"{name}-{precision}"] = measure(
                    run, size, batch_sizes, warmup_s, duration_s
                )
            finally:
                close()
    for key, entry in results["backends"].items():
        log.info(f"  {key}: b1 p50 {entry['b1_ms']['p50']:.2f} ms")
    baseline = results["backends"].get("pytorch-fp32")
    if baseline:
        for entry in results["backends"].values():
            entry["speedup_vs_pytorch_b1_p50"] = baseline["b1_ms"]["p50"] / entry["b1_ms"]["p50"]
    fp32_graph = onnx_name("model", "fp32")
    if not facts.get("gpu") and bundle.has(fp32_graph):
        bound = compute_bound(bundle.verified_bytes(fp32_graph))
        if bound:
            results["compute"] = bound
            for entry in results["backends"].values():
                entry["share_of_host_fp32_rate"] = share_of_rate(bound, entry["b1_ms"]["p50"])
    out.mkdir(parents=True, exist_ok=True)
    name = f"latency_{bundle.card.arch}_{slug(facts)}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_latency(results, out / f"{name}.png")
    log.info(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")
    return results


def cpu_label(facts: dict[str, Any]) -> str:
    """The CPU's name with its vector and int8 instructions, where the results recorded them."""
    extra = [facts[key] for key in ("cpu_vector", "cpu_int8") if facts.get(key)]
    return f"{facts['cpu']} ({'; '.join(extra)})" if extra else facts["cpu"]


def format_latency(results: dict[str, Any]) -> str:
    sizes = results["batch_sizes"]
    bound = results.get("compute")
    head = f"{'backend':<20}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'x torch':>9}" + "".join(
        f"{'b' + str(b) + ' img/s':>12}" for b in sizes
    )
    head += f"{'% rate':>9}" if bound else ""
    lines = [
        f"{results['arch']} @ {results['input_size']} on "
        f"{results['environment'].get('gpu') or cpu_label(results['environment'])}"
        f" (host preprocessing {results['preprocess_ms_per_image']:.2f} ms/image, not included below)",
        head,
    ]
    for name, r in results["backends"].items():
        speed = r.get("speedup_vs_pytorch_b1_p50")
        lines.append(
            f"{name:<20}{r['b1_ms']['p50']:>9.2f}{r['b1_ms']['p95']:>9.2f}{r['b1_ms']['p99']:>9.2f}"
            f"{'' if speed is None else f'{speed:.2f}':>9}"
            + "".join(f"{r['throughput_img_s'][str(b)]:>12.1f}" for b in sizes)
            + (f"{r['share_of_host_fp32_rate']:>9.0%}" if bound else "")
        )
    if bound:
        lines.append(
            f"% rate: {bound['gflop_per_image']:.2f} GFLOP per image at b1 p50, against this host's fp32 "
            f"matrix rate ({bound['host_fp32_matmul_gflops']:.0f} GFLOP/s from numpy; at that rate fp32 "
            f"needs {bound['fp32_floor_ms']:.1f} ms per image). Above 100 %: int8 or fp16 arithmetic, fewer "
            "operations than the plain count (Winograd 3x3), or kernels faster than numpy's BLAS here."
        )
    return "\n".join(lines)


def plot_latency(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["backends"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(names))
    for offset, key in zip((-0.25, 0, 0.25), ("p50", "p95", "p99")):
        left.bar(x + offset, [results["backends"][n]["b1_ms"][key] for n in names], width=0.25, label=key)
    left.set_xticks(x, names, rotation=25, ha="right")
    left.set_ylabel("ms per image (batch 1)")
    left.legend()
    for name in names:
        series = results["backends"][name]["throughput_img_s"]
        right.plot([int(b) for b in series], list(series.values()), marker="o", label=name)
    right.set_xscale("log", base=2)
    right.set_xlabel("batch size")
    right.set_ylabel("images / s")
    right.legend(fontsize=8)
    fig.suptitle(f"{results['arch']} @ {results['input_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
