"""``python -m research.lime.paired_fidelity BUNDLE IMAGES_TXT OUT PRECISION AGREEMENT BASELINE_IMAGES
SAMPLER``: ``cxr-bench lime --fidelity`` with the two settings its CLI does not expose, as session 11 ran it
for ``benchmarks/results/cpu-2core/lime-auto/dpn92_se-224/paired-40/`` (images listed one per line in
IMAGES_TXT; BASELINE_IMAGES: how many images also time ONNX Runtime's fixed budget)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cxr.bench.lime_fidelity import format_fidelity, run_fidelity


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("images", type=Path, help="a text file naming one image per line")
    parser.add_argument("out", type=Path)
    parser.add_argument("precision")
    parser.add_argument("agreement", type=float, help="--settle-agreement (0: off)")
    parser.add_argument("baseline_images", type=int)
    parser.add_argument("sampler", choices=("paired", "plain"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = run_fidelity(
        args.bundle,
        args.out,
        [Path(p) for p in args.images.read_text().split()],
        1000,
        0,
        "auto",
        baseline_images=args.baseline_images,
        precision=args.precision,
        rule={"min_agreement": args.agreement, "paired": args.sampler == "paired"},
    )
    print(format_fidelity(summary))


if __name__ == "__main__":
    main()
