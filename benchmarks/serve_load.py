"""Load test on loopback: N concurrent clients against ``cxr-run serve``, compared with local predict.

Every request is one preprocessed image, as a bedside device sends it, over HTTP through the guarded front
(or gRPC, straight to Triton). One server is driven at each client count in turn (8, 32, 64 by default).
Reported per count: throughput, latency percentiles, failed requests, the batch sizes Triton's dynamic
batcher formed (from its statistics extension), and whether every reply equals local predict for the same
image; for the whole run, the server's peak memory (its process tree, sampled). Bounded by a request count
and a time per client count.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cxr.bench.environment import environment
from cxr.runtime.backends.select import open_classifier
from cxr.runtime.bundle import Bundle
from cxr.runtime.errors import CxrError
from cxr.runtime.inputs import expand_inputs
from cxr.runtime.preprocess import load_and_preprocess
from cxr.runtime.serve_process import MemorySampler, ServerProcess
from tqdm import tqdm

log = logging.getLogger(__name__)

MATCH_ATOL = 1e-5  # batch composition may change float summation order, nothing more


PROTOCOLS = ("http", "grpc")


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    clients: tuple[int, ...] = (8, 32, 64)  # one load level per count, in this order, on one server
    max_requests: int = 2000
    max_seconds: float = 120.0
    max_batch: int = 64
    max_queue_delay_us: int = 2000
    instances: int = 1
    precision: str = "fp32"
    local_batch: int = 16
    protocol: str = "http"  # http: through the guarded front, as users reach it; grpc: Triton directly


def load_pixels(data: list[str], size: int) -> tuple[list[str], np.ndarray]:
    names, images = [], []
    for path in tqdm(expand_inputs(data), desc="preprocessing", unit="img"):
        try:
            images.append(load_and_preprocess(path, size))
            names.append(str(path))
        except CxrError:
            continue
    if not images:
        raise CxrError(f"no readable images in {', '.join(data)}")
    return names, np.stack(images)[:, None]


def local_predict(
    bundle: Bundle, pixels: np.ndarray, options: LoadOptions
) -> tuple[np.ndarray, dict[str, Any]]:
    """Local predict on the same backend choice as the server, batched as ``cxr-run predict`` batches."""
    backend, reason = open_classifier(bundle, "auto", options.precision)
    with backend:
        backend.run(pixels[:1])  # warm-up
        started = time.perf_counter()
        probs = np.concatenate(
            [
                backend.run_chunked(pixels[i : i + options.local_batch])
                for i in range(0, len(pixels), options.local_batch)
            ]
        )
        seconds = time.perf_counter() - started
        singles = []
        for image in pixels[: min(len(pixels), 100)]:
            t0 = time.perf_counter()
            backend.run(image[None])
            singles.append((time.perf_counter() - t0) * 1e3)
    return probs, {
        "backend": f"{backend.name} {options.precision} ({reason})",
        "images_per_s": len(pixels) / seconds,
        "batch": options.local_batch,
        "b1_p50_ms": float(np.percentile(singles, 50)),
        "b1_p99_ms": float(np.percentile(singles, 99)),
    }


def batch_counts(address: str, model: str) -> dict[int, int]:
    """Executions per batch size so far, from Triton's statistics extension."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    try:
        stats = client.get_inference_statistics(model, as_json=True)
    finally:
        client.close()
    counts: dict[int, int] = {}
    for entry in stats.get("model_stats", []):
        for row in entry.get("batch_stats", []):
            counts[int(row["batch_size"])] = counts.get(int(row["batch_size"]), 0) + int(
                row["compute_infer"]["count"]
            )
    return counts


def settled_counts(address: str, model: str, images: int, timeout_s: float = 5.0) -> dict[int, int]:
    """Batch counts once they account for ``images`` images: Triton records an execution after its reply
    leaves."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = batch_counts(address, model)
        if sum(size * count for size, count in counts.items()) >= images or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def _client(protocol: str, address: str) -> tuple[Any, Any]:
    if protocol == "grpc":
        import tritonclient.grpc as module

        return module, module.InferenceServerClient(address)
    import tritonclient.http as module

    return module, module.InferenceServerClient(address, connection_timeout=60, network_timeout=60)


def drive(address: str, pixels: np.ndarray, clients: int, options: LoadOptions) -> dict[str, Any]:
    """N threads, one client each, one image per request, until the request or time budget ends."""
    lock, issued = threading.Lock(), [0]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    replies: dict[int, np.ndarray] = {}
    errors: list[str] = []
    deadline = time.monotonic() + options.max_seconds
    bar = tqdm(total=options.max_requests, desc=f"{clients} clients", unit="req")

    def client_loop(worker: int) -> None:
        module, client = _client(options.protocol, address)
        extra = {"client_timeout": 60} if options.protocol == "grpc" else {}
        try:
            while time.monotonic() < deadline:
                with lock:
                    if issued[0] >= options.max_requests:
                        return
                    index = issued[0]
                    issued[0] += 1
                image = pixels[index % len(pixels)][None]
                request = module.InferInput("image", list(image.shape), "UINT8")
                request.set_data_from_numpy(image)
                t0 = time.perf_counter()
                try:
                    probs = client.infer("cxr", [request], **extra).as_numpy("probs")
                except Exception as exc:  # recorded and counted, the run goes on
                    with lock:
                        errors.append(str(exc)[:200])
                    continue
                latencies[worker].append((time.perf_counter() - t0) * 1e3)
                with lock:
                    replies[index] = probs[0]
                    bar.update(1)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(w,), daemon=True) for w in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    bar.close()
    flat = np.array([ms for per in latencies for ms in per]) if replies else np.zeros(1)
    return {
        "clients": clients,
        "requests": len(replies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "seconds": seconds,
        "requests_per_s": len(replies) / seconds,
        "latency_ms": {f"p{p}": float(np.percentile(flat, p)) for p in (50, 95, 99)},
        "replies": replies,
    }


def _level(load: dict[str, Any], before: dict[int, int], after: dict[int, int], local: np.ndarray) -> dict:
    """One client count's figures: the batches formed during it, and its replies against local predict."""
    formed = {size: after.get(size, 0) - before.get(size, 0) for size in sorted(after)}
    formed = {size: count for size, count in formed.items() if count}
    replies = load.pop("replies")
    dprobs = [float(np.max(np.abs(probs - local[i % len(local)]))) for i, probs in replies.items()]
    mismatched = sum(d > MATCH_ATOL for d in dprobs)
    executions = sum(formed.values())
    return {
        **load,
        "batch_sizes_formed": formed,
        "executions": executions,
        "mean_batch": (sum(s * c for s, c in formed.items()) / executions) if executions else 0.0,
        "max_abs_dprob_vs_local": max(dprobs, default=float("nan")),
        "mismatched_replies": mismatched,
        "all_equal_local": mismatched == 0 and load["errors"] == 0,
    }


def _images(counts: dict[int, int]) -> int:
    return sum(size * count for size, count in counts.items())


def run_serve_load(bundle_dir: Path, data: list[str], out: Path, options: LoadOptions) -> dict[str, Any]:
    if options.protocol not in PROTOCOLS or not options.clients or min(options.clients) < 1:
        raise CxrError(f"--protocol must be one of {', '.join(PROTOCOLS)} and every client count at least 1")
    bundle = Bundle.open(bundle_dir)
    names, pixels = load_pixels(data, bundle.card.input.size)
    local_probs, local = local_predict(bundle, pixels, options)
    server_args = [
        "--max-batch",
        str(options.max_batch),
        "--max-queue-delay-us",
        str(options.max_queue_delay_us),
        "--instances",
        str(options.instances),
        "--precision",
        options.precision,
    ]
    levels = []
    with ServerProcess(bundle_dir, *server_args) as server, MemorySampler(server.process.pid) as memory:
        stats = f"127.0.0.1:{server.grpc_port}"
        address = server.http_url.removeprefix("http://") if options.protocol == "http" else stats
        warm = drive(
            address, pixels[:4], 2, LoadOptions(max_requests=8, max_seconds=30, protocol=options.protocol)
        )
        done = warm["requests"]
        for clients in options.clients:
            before = settled_counts(stats, "cxr", done)
            load = drive(address, pixels, clients, options)
            done = _images(before) + load["requests"]
            levels.append(_level(load, before, settled_counts(stats, "cxr", done), local_probs))
    results = {
        "environment": environment(),
        "bundle": str(bundle_dir),
        "arch": bundle.card.arch,
        "image_size": bundle.card.input.size,
        "images": len(names),
        "options": asdict(options),
        "local": local,
        "levels": levels,
        "server": levels[-1],
        "server_memory": memory.report(),
        "failed_requests": sum(level["errors"] for level in levels),
        "ratio_server_vs_local_throughput": levels[-1]["requests_per_s"] / local["images_per_s"],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_serve_load(results, out / "serve_load.png")
    log.info(f"wrote {out / 'serve_load.json'} and {out / 'serve_load.png'}")
    return results


def format_serve_load(r: dict[str, Any]) -> str:
    local, memory = r["local"], r["server_memory"]
    lines = [
        f"serve load: {r['arch']} @ {r['image_size']}, {r['images']} images, {r['options']['protocol']}"
        f"{' through the guarded front' if r['options']['protocol'] == 'http' else ' to Triton'}"
    ]
    for s in r["levels"]:
        formed = ", ".join(f"{size}x{count}" for size, count in s["batch_sizes_formed"].items())
        ms = "  ".join(f"{p} {value:.1f} ms" for p, value in s["latency_ms"].items())
        lines += [
            f"  {s['clients']:>3} clients: {s['requests_per_s']:.1f} req/s  {ms}  "
            f"({s['requests']} requests, {s['errors']} failed; equal local predict: {s['all_equal_local']}, "
            f"max |dprob| {s['max_abs_dprob_vs_local']:.1e})",
            f"       batches formed (size x count): {formed or 'none'}; mean {s['mean_batch']:.1f}",
        ]
    lines += [
        f"  local  : {local['images_per_s']:.1f} img/s at batch {local['batch']}  "
        f"b1 p50 {local['b1_p50_ms']:.1f} ms  p99 {local['b1_p99_ms']:.1f} ms  [{local['backend']}]",
        f"  ratio  : server/local throughput {r['ratio_server_vs_local_throughput']:.2f} "
        f"(at {r['server']['clients']} clients)",
        f"  server memory: peak {memory['tree_peak_pss_mb']:.0f} MB PSS over {memory['processes']} "
        "processes; "
        f"serving process (front + models) VmHWM {memory['serve_process_hwm_mb']:.0f} MB, largest child "
        f"{memory['largest_child_hwm_mb']:.0f} MB",
    ]
    return "\n".join(lines)


def plot_serve_load(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    formed = r["server"]["batch_sizes_formed"]
    left.bar([str(k) for k in formed], list(formed.values()), color="tab:blue")
    left.set(
        xlabel="batch size formed by Triton",
        ylabel="executions",
        title=f"dynamic batching ({r['server']['clients']} clients)",
    )
    names = [f"{level['clients']} clients" for level in r["levels"]] + ["local"]
    values = [level["requests_per_s"] for level in r["levels"]] + [r["local"]["images_per_s"]]
    right.bar(names, values, color=["tab:orange"] * len(r["levels"]) + ["tab:gray"])
    right.set(ylabel="images / s", title="throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
