"""``cxr-bench pipeline``: end-to-end images per second of ``predict`` on a folder against the backend alone
at the same batch, in one run, with the time per stage.

The backend alone runs the folder's preprocessed images (read once beforehand) in batches, one batch kept in
flight where the backend can run ahead, as predict does. ``predict`` runs the library's whole job
(``run_predict``: find, read and preprocess in the reading threads, classify, score the gate, write JSON
lines) with each ``--workers`` value asked for, over the same images, measured from the first input read to
the last record written (opening the backend, and compiling the batch shape, are timed apart, as the
backend alone's are). ``--rounds`` repeats the predict runs with the backend alone measured between them.
Stage times are per image: decoding and preprocessing summed over the reading threads (they overlap the
backend), classifying (starting a batch and waiting for it) and writing on the main thread. Target on a
2-core CPU: end-to-end at least 0.9 of the backend alone.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.bundle import Bundle
from cxr.runtime.errors import CxrError
from cxr.runtime.inputs import expand_inputs

log = logging.getLogger(__name__)


def read_images(bundle: Bundle, paths: list[Path]) -> list[np.ndarray]:
    """The folder's films preprocessed once, for the backend-alone runs."""
    from cxr.runtime.preprocess import DEFAULT_MAX_PIXELS
    from cxr.runtime.reading import prepared_in_order

    images = [p.image for p in prepared_in_order(paths, bundle.card, DEFAULT_MAX_PIXELS, workers=2)]
    images = [im for im in images if im is not None]
    if not images:
        raise CxrError("none of the images could be read")
    return images


def backend_alone(
    bundle: Bundle, backend_name: str, precision: str, images: list[np.ndarray], batch: int
) -> dict:
    """The backend's img/s on the folder's images, preprocessed beforehand (what predict cannot beat)."""
    from cxr.runtime.backends.select import open_classifier

    backend, reason = open_classifier(bundle, backend_name, precision)
    with backend:
        step = min(batch, backend.limits.max_batch)
        batches = [np.stack(images[i : i + step])[:, None] for i in range(0, len(images), step)]
        ready = backend.ready_for(step)  # as predict's open does
        backend.run_outputs(batches[0])  # warm
        started = time.perf_counter()
        pending = []  # one batch kept in flight where the backend can, as predict does
        for pixels in batches:
            pending.append(backend.start_outputs(pixels))
            while len(pending) > int(backend.runs_ahead):
                pending.pop(0)()
        for wait in pending:
            wait()
        seconds = time.perf_counter() - started
    return {
        "backend": reason + (f"; {ready}" if ready else ""),
        "images": len(images),
        "seconds": seconds,
        "images_per_s": len(images) / seconds,
    }


def end_to_end(
    bundle_dir: Path, inputs: list[str], backend: str, precision: str, batch: int, workers: int
) -> dict:
    """``run_predict`` over the folder, records to a temporary JSON lines file."""
    from cxr.runtime.predict_job import PredictJob, run_predict

    with tempfile.TemporaryDirectory() as scratch:
        job = PredictJob(
            inputs=inputs,
            model=bundle_dir,
            backend=backend,
            precision=precision,
            batch_size=batch,
            out=Path(scratch) / "records.jsonl",
            workers=workers,
        )
        summary = run_predict(job)
    if summary.stop_line():
        raise CxrError(summary.stop_line())
    return {
        "backend": summary.backend,
        "workers": workers,
        "images": summary.stages.images,
        "seconds": summary.run_s,
        "images_per_s": summary.images_per_s,
        "open_s": summary.classifier_open_s,
        "stage_ms_per_image": summary.stages.per_image_ms(),
        "failed": summary.failed,
    }


def markdown(report: dict[str, Any]) -> str:
    alone = report["backend_alone"]
    runs = ", ".join(f"{r:.1f}" for r in alone["runs_images_per_s"])
    lines = [
        f"# predict end to end vs the backend alone ({report['cpu']})",
        "",
        f"{report['images']} images from {report['inputs']}; {alone['backend']}, batch {report['batch']}.",
        f"Backend alone before, between and after the predict rounds: {runs} img/s; each predict run is",
        "compared with the mean of the backend-alone runs just before and just after its round.",
        "",
        "| run | img/s | vs backend | decode ms/img | preprocess ms/img | infer ms/img | write ms/img |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["end_to_end"]:
        stages = row["stage_ms_per_image"]
        lines.append(
            f"| predict, {row['workers']} reading thread(s), round {row['round'] + 1} | "
            f"{row['images_per_s']:.1f} | {row['vs_backend']:.2f} | {stages['decode']:.1f} | "
            f"{stages['preprocess']:.1f} | {stages['infer']:.1f} | {stages['write']:.2f} |"
        )
    lines += ["", "| reading threads | rounds | median vs backend | range |", "|---|---|---|---|"]
    for row in report["summary"]:
        lines.append(
            f"| {row['workers']} | {row['rounds']} | {row['median_vs_backend']:.2f} | "
            f"{row['min_vs_backend']:.2f}-{row['max_vs_backend']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def run_pipeline(
    bundle_dir: Path,
    inputs: list[str],
    out: Path,
    backend: str = "auto",
    precision: str = "fp32",
    batch: int = 16,
    workers: tuple[int, ...] = (1, 2),
    limit: int | None = None,
    rounds: int = 1,
) -> dict[str, Any]:
    """The backend alone, then ``rounds`` times: predict with each reading-thread count and the backend alone
    again. A shared host's speed drifts (the same backend ran 41 and 50 img/s an hour apart here), so each
    predict run is compared with the backend-alone runs just before and after its round, and the summary is
    the median over rounds. Writes pipeline.json and .md."""
    from cxr.bench.environment import environment

    paths = [p for p in expand_inputs(inputs)][:limit]
    if not paths:
        raise CxrError(f"no images in {', '.join(inputs)}")
    if rounds < 1:
        raise CxrError("--rounds must be at least 1")
    chosen = [str(p) for p in paths]
    bundle = Bundle.open(bundle_dir)
    facts = environment()
    images = read_images(bundle, paths)
    alone = [backend_alone(bundle, backend, precision, images, batch)]
    rows = []
    for number in range(rounds):
        done = [end_to_end(bundle_dir, chosen, backend, precision, batch, w) for w in workers]
        alone.append(backend_alone(bundle, backend, precision, images, batch))
        around = (alone[-2]["images_per_s"] + alone[-1]["images_per_s"]) / 2
        rows += [{**row, "round": number, "vs_backend": row["images_per_s"] / around} for row in done]
    speeds = [run["images_per_s"] for run in alone]
    summary = []
    for count in workers:
        ratios = [row["vs_backend"] for row in rows if row["workers"] == count]
        summary.append(
            {
                "workers": count,
                "rounds": len(ratios),
                "median_vs_backend": float(np.median(ratios)),
                "min_vs_backend": min(ratios),
                "max_vs_backend": max(ratios),
            }
        )
    report: dict[str, Any] = {
        "cpu": f"{facts['cpu']} ({facts['cpu_vector']}; {facts['cpu_int8']})",
        "inputs": ", ".join(inputs),
        "images": len(paths),
        "batch": batch,
        "backend_alone": {**alone[0], "images_per_s": sum(speeds) / len(speeds), "runs_images_per_s": speeds},
        "end_to_end": rows,
        "summary": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "pipeline.md").write_text(markdown(report))
    return report
