"""A page of overlays for passed and flagged inputs: what a clinician sees when the gate says "not like the
training films" (the overlay says it in words), beside chest films it passed.

    python research/ood/overlay_page.py BUNDLE OOD_RESULTS_FOLDER VALIDATION_FILM... --out page.png

OOD_RESULTS_FOLDER is a ``cxr-bench ood --out`` folder (its ood_images/ are explained too).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
from cxr.runtime.explain import ExplainConfig
from cxr.runtime.predict_job import PredictJob, run_predict

KINDS = ("photo", "document", "ct_mr_us", "other_anatomy", "rotated_chest")
TILE = 360


def explained(bundle: Path, inputs: list[Path], scratch: Path) -> list[dict]:
    job = PredictJob(
        inputs=[str(p) for p in inputs],
        model=bundle,
        out=scratch / "records.jsonl",
        explain=ExplainConfig(samples=1000, adaptive=True),
        explain_dir=scratch / "maps",
    )
    run_predict(job)
    return [json.loads(line) for line in (scratch / "records.jsonl").read_text().splitlines()]


def tile(record: dict) -> np.ndarray:
    overlay = cv2.imread(record["explanation"]["overlay"])
    picture = cv2.resize(overlay, (TILE * overlay.shape[1] // overlay.shape[0], TILE))
    verdict = "passed" if record["in_distribution"] else "FLAGGED"
    path = Path(record["path"])
    caption = f"{path.parent.name}/{path.name[:22]}  ood {record['ood_score']:.1f} {verdict}"
    band = np.full((28, picture.shape[1], 3), 255, np.uint8)
    cv2.putText(band, caption, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([band, picture])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("ood", type=Path)
    parser.add_argument("films", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    strangers = [sorted((args.ood / "ood_images" / kind).glob("*.png"))[0] for kind in KINDS]
    with tempfile.TemporaryDirectory() as scratch:
        records = explained(args.bundle, list(args.films) + strangers, Path(scratch))
        tiles = [tile(r) for r in records if r.get("explanation")]
        width = max(t.shape[1] for t in tiles)
        tiles = [np.hstack([t, np.full((t.shape[0], width - t.shape[1], 3), 255, np.uint8)]) for t in tiles]
        rows = [
            np.hstack(tiles[i : i + 3] + [np.full_like(tiles[0], 255)] * (3 - len(tiles[i : i + 3])))
            for i in range(0, len(tiles), 3)
        ]
        cv2.imwrite(str(args.out), np.vstack(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
