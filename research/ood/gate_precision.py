"""How far does each precision and backend move each part of the out-of-distribution gate's score, and how
many real films does the gate flag there: the whole gate (what every precision read before the int8 check)
and the gate the runtime reads at that precision (``cxr.runtime.ood_precision``)?

    python -m research.ood.gate_precision BUNDLE FOLDER_OF_FILMS --out gate_precision.json

Reference: ONNX Runtime fp32 on the same films. A part moving by more than ``GATE_DRIFT`` (validation
interquartile ranges, 95th percentile of films) turns the precision's rounding into distance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from cxr.bench.environment import environment
from cxr.runtime.backends.select import open_classifier, runnable_here
from cxr.runtime.bundle import Bundle
from cxr.runtime.errors import CxrError
from cxr.runtime.ood import bundle_gate
from cxr.runtime.ood_precision import score_drift
from cxr.runtime.reading import prepare


def films_of(bundle: Bundle, folder: Path, count: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Images and image statistics of up to ``count`` films of ``folder`` spread over its sorted files."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
    step = max(1, len(files) // count)
    prepared = [prepare(path, path.name, bundle.card, 10**8) for path in files[::step][:count]]
    prepared = [p for p in prepared if p.image is not None]
    return (
        np.stack([p.image for p in prepared])[:, None],
        np.stack([p.stats for p in prepared]),
        len(prepared),
    )


def measure(bundle_dir: Path, folder: Path, count: int) -> dict:
    bundle = Bundle.open(bundle_dir)
    whole = bundle_gate(bundle)
    if whole is None:
        raise CxrError(f"{bundle_dir}: no out-of-distribution gate")
    images, stats, n = films_of(bundle, folder, count)
    reference_backend, _ = open_classifier(bundle, "onnxruntime", "fp32")
    with reference_backend:
        reference = reference_backend.run_outputs_chunked(images)[1]
    rows = []
    for backend_name, precision in runnable_here(bundle):
        try:
            backend, _ = open_classifier(bundle, backend_name, precision)
        except CxrError as exc:
            rows.append({"backend": backend_name, "precision": precision, "skipped": str(exc)[:160]})
            continue
        with backend:
            features = backend.run_outputs_chunked(images)[1]
        read = bundle_gate(bundle, precision)
        rows.append(
            {
                "backend": backend_name,
                "precision": precision,
                "drift_p95": {k: round(v, 3) for k, v in score_drift(whole, reference, features).items()},
                "flagged_whole_gate": round(
                    float(np.mean(whole.scores(features, stats) > whole.threshold)), 4
                ),
                "gate_read": read.method if read is not None else None,
                "flagged_gate_read": (
                    round(float(np.mean(read.scores(features, stats) > read.threshold)), 4) if read else None
                ),
            }
        )
    env = environment()
    return {
        "bundle": str(bundle_dir),
        "arch": bundle.card.arch,
        "size": bundle.card.input.size,
        "films": n,
        "folder": str(folder),
        "cpu": f"{env['cpu']} ({env['cpu_vector']})",
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("films", type=Path, help="A folder of real films (any layout).")
    parser.add_argument(
        "--count", type=int, default=240, help="Films to measure on (spread over the folder)."
    )
    parser.add_argument("--out", type=Path, default=None, help="Write the result as JSON here too.")
    args = parser.parse_args(argv)
    result = measure(args.bundle, args.films, args.count)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
