"""How should OpenVINO run the classifier's batches beside predict's reading threads? (issue 35.1)

One process, one compiled graph per setting, interleaved over ``--rounds``: img/s of the classifier on the
folder's preprocessed films at batch 8, alone and with predict's reading threads decoding the same films
beside it (``prepared_in_order``, 2 threads, 16 films ahead, as predict reads), for
- one 2-thread stream (latency mode, what the classifier ran before),
- 2 streams, the batch in 2 parts (one per stream), collected before the next batch starts,
- 2 streams, the batch in 4 parts (a free stream takes the next part),
- 2 streams, 4 parts, the next batch started before this one is collected (what predict does now).

    python -m research.pipeline.ov_classifier_streams BUNDLE FOLDER OUT.json --images 480 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from cxr.bench.environment import environment
from cxr.runtime.backends.openvino import _Compiled
from cxr.runtime.bundle import Bundle
from cxr.runtime.inputs import expand_inputs
from cxr.runtime.preprocess import DEFAULT_MAX_PIXELS
from cxr.runtime.reading import prepared_in_order

BATCH = 8
Start = Callable[[np.ndarray], Callable[[], object]]


def settings(graph: _Compiled, name: str) -> dict[str, tuple[Start, bool]]:
    """Setting -> (start a batch, keep one batch in flight)."""

    def latency(batch: np.ndarray) -> Callable[[], object]:
        outputs = graph.run_outputs({name: batch})
        return lambda: outputs

    def split(parts: int) -> Start:
        return lambda batch: graph.start_split({name: batch}, name, 2, parts)

    return {
        "1 stream x 2 threads": (latency, False),
        "2 streams, 2 parts": (split(2), False),
        "2 streams, 4 parts": (split(4), False),
        "2 streams, 4 parts, next batch started first": (split(4), True),
    }


def batches(paths: list[Path], bundle: Bundle, images: list[np.ndarray] | None) -> Iterator[np.ndarray]:
    """Batches of preprocessed films: from memory, or read as predict reads them (2 threads ahead)."""
    if images is not None:
        for i in range(0, len(images) - BATCH + 1, BATCH):
            yield np.stack(images[i : i + BATCH])[:, None]
        return
    reading = prepared_in_order(paths, bundle.card, DEFAULT_MAX_PIXELS, workers=2, ahead=2 * BATCH)
    for _ in range(len(paths) // BATCH):
        yield np.stack([next(reading).image for _ in range(BATCH)])[:, None]


def images_per_s(start: Start, ahead: bool, source: Iterator[np.ndarray]) -> float:
    started, count, pending = time.perf_counter(), 0, []
    for batch in source:
        pending.append(start(batch))
        count += len(batch)
        while len(pending) > int(ahead):
            pending.pop(0)()
    for wait in pending:
        wait()
    return count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("folder", help="Films (the mixed sizes of cxr4-train make the point).")
    parser.add_argument("out", type=Path, help="JSON results.")
    parser.add_argument("--precision", default="int8", help="The bundle's graph to run (int8, fp32, bf16).")
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    bundle = Bundle.open(args.bundle)
    paths = [p for p in expand_inputs([args.folder])][: args.images]
    prepared = [p.image for p in prepared_in_order(paths, bundle.card, DEFAULT_MAX_PIXELS, workers=2)]
    if any(image is None for image in prepared):
        raise SystemExit("every film must read: pick a folder without failing inputs")
    path = bundle.onnx_path("model", "fp32" if args.precision == "bf16" else args.precision)
    graph = _Compiled(path, None, args.precision)
    name = graph.model.inputs[0].get_any_name()
    chosen = settings(graph, name)
    for start, _ in chosen.values():  # compile every shape before timing
        start(np.stack(prepared[:BATCH])[:, None])()
    results: dict[str, dict[str, list[float]]] = {key: {"alone": [], "reading": []} for key in chosen}
    for number in range(args.rounds):
        for key, (start, ahead) in chosen.items():
            alone = images_per_s(start, ahead, batches(paths, bundle, prepared))
            reading = images_per_s(start, ahead, batches(paths, bundle, None))
            results[key]["alone"].append(alone)
            results[key]["reading"].append(reading)
            print(
                f"round {number + 1} {key}: alone {alone:.1f}, reading beside {reading:.1f} img/s", flush=True
            )
    facts = environment()
    report = {
        "cpu": f"{facts['cpu']} ({facts['cpu_vector']}; {facts['cpu_int8']})",
        "graph": path.name,
        "precision": args.precision,
        "images": len(paths),
        "batch": BATCH,
        "settings": {
            key: {
                **values,
                "median_alone": float(np.median(values["alone"])),
                "median_reading": float(np.median(values["reading"])),
                "median_ratio": float(np.median(np.array(values["reading"]) / np.array(values["alone"]))),
            }
            for key, values in results.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for key, values in report["settings"].items():
        alone, reading, ratio = values["median_alone"], values["median_reading"], values["median_ratio"]
        print(f"{key}: alone {alone:.1f}, reading beside {reading:.1f} img/s, ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
