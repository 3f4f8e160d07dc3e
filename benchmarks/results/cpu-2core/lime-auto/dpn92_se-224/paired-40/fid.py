import logging
import sys
from pathlib import Path

from cxr.bench.lime_fidelity import run_fidelity

logging.basicConfig(level=logging.INFO, format="%(message)s")
paths = [Path(p) for p in Path(sys.argv[1]).read_text().split()]
run_fidelity(
    Path("/tmp/s11/bundleD"),
    Path(sys.argv[2]),
    paths,
    1000,
    0,
    "auto",
    baseline_images=int(sys.argv[5]),
    precision=sys.argv[3],
    rule={"min_agreement": float(sys.argv[4]), "paired": sys.argv[6] == "paired"},
)
