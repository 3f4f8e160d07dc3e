"""Are OpenVINO's parallel-stream compiles of the int8 classifier right, and for how long? (issue 35.1)

Each trial compiles the bundle's graph afresh for 2 parallel streams (a batch of 8 in 4 parts, as the
classifier runs) and runs 8 fixed random batches 3 times each against one stream's answers (batch 1, latency
mode, what the open's known answers ran on). With ``--load N``, N busy processes load the cores while it
runs. Prints one line per compile: a dot per batch that matched (max |dprob| <= 1e-4), an x per batch that
did not. The answer decides how the classifier trusts a parallel compile (``OvBackend.streams_for``): probe
it once when it is made, compile anew if it is wrong.

    python -m research.pipeline.ov_stream_compiles BUNDLE OUT.json --compiles 12 --load 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from pathlib import Path

import numpy as np
from cxr.bench.environment import environment
from cxr.runtime.backends.openvino import STREAMS_AGREE, OvBackend
from cxr.runtime.bundle import Bundle

BATCHES, REPEATS = 8, 3


def busy() -> None:
    while True:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("out", type=Path, help="JSON results.")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--compiles", type=int, default=12)
    parser.add_argument("--load", type=int, default=0, help="Busy processes beside the trials.")
    args = parser.parse_args(argv)

    path = Bundle.open(args.bundle).onnx_path("model", "fp32" if args.precision == "bf16" else args.precision)
    size = Bundle.open(args.bundle).card.input.size
    data = np.random.default_rng(1).integers(0, 256, (BATCHES, 8, 1, size, size), dtype=np.uint8)
    loads = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.load)]
    for process in loads:
        process.start()
    compiles, reference = [], None
    try:
        for number in range(args.compiles):
            with OvBackend(path, args.precision) as backend:
                name, graph = backend.input_name, backend.graph
                if reference is None:
                    reference = [
                        np.concatenate([graph.run(f) for f in ({name: i[None]} for i in b)]) for b in data
                    ]
                diffs = [
                    float(
                        np.abs(graph.run_split_outputs({name: data[k]}, name, 2, 4)[0] - reference[k]).max()
                    )
                    for _ in range(REPEATS)
                    for k in range(BATCHES)
                ]
            marks = "".join("x" if d > STREAMS_AGREE else "." for d in diffs)
            compiles.append({"batches": marks, "max_abs_dprob": max(diffs)})
            print(f"compile {number + 1}: {marks} max |dprob| {max(diffs):.2g}", flush=True)
    finally:
        for process in loads:
            process.kill()
    wrong = [c for c in compiles if "x" in c["batches"]]
    switched = [c for c in compiles if "x" in c["batches"] and "." in c["batches"]]
    facts = environment()
    report = {
        "cpu": f"{facts['cpu']} ({facts['cpu_vector']}; {facts['cpu_int8']})",
        "graph": path.name,
        "load_processes": args.load,
        "compiles": compiles,
        "wrong_compiles": len(wrong),
        "compiles_right_and_wrong_in_turn": len(switched),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(wrong)} of {len(compiles)} compiles wrong; {len(switched)} changed between batches")


if __name__ == "__main__":
    main()
