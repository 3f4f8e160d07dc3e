"""``python -m research.gpu.cold_start BUNDLE OUT IMAGE [VARIANTS] [ROUNDS]`` (repository root): the first
explanation in a fresh process, per explainer precision and batch.

What a user waits for before the first map: interpreter start, imports, CUDA and cuDNN loading, the session,
the warm-up (cuDNN's exhaustive search runs once per shape, and costs more at a larger batch) and one
explanation. A larger batch is faster afterwards, so the batch trades the first image against the rest. Each
variant runs in its own process, the order alternates between rounds, and a second explanation in the same
process gives the steady time. VARIANTS: ``fp16:256:heuristic,fp16:256,fp16:128,fp32:256``
(precision:batch[:cuDNN search, default exhaustive]). The host warms up beside the device, as in ``predict``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from cxr.runtime.errors import CxrUsageError

DEFAULT_VARIANTS = "fp16:256:heuristic,fp16:256,fp16:128,fp32:256"
MARK = "cold-start-result "
REPO = Path(__file__).resolve().parents[2]  # the child runs as ``-m research.gpu.cold_start`` from here


def child(
    bundle_dir: str,
    image_path: str,
    precision: str,
    batch: int,
    samples: int,
    launched: float,
    search: str = "exhaustive",
) -> dict[str, Any]:
    """Runs inside the fresh process: open, warm up and explain the image twice. ``launched``: the parent's
    wall clock when it started this process."""
    started = time.perf_counter()
    from cxr.runtime.backends.onnxruntime import EXPLAINER_CUDA, OrtExplainer
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.explain import ExplainConfig, warm_host_beside
    from cxr.runtime.preprocess import load_and_preprocess

    from research.gpu.explain_variants import timed_explanations

    bundle = Bundle.open(Path(bundle_dir))
    image = load_and_preprocess(Path(image_path), bundle.card.input.size, pre=bundle.card.preprocessing)
    loaded = time.perf_counter()
    path = bundle.onnx_path("explain", precision)
    cuda = replace(EXPLAINER_CUDA, search=search.upper())

    def open_and_warm() -> OrtExplainer:
        opened = OrtExplainer(
            path, precision, data=bundle.verified_bytes(path.name), max_batch=batch, cuda=cuda
        )
        opened.warm_up(bundle.card.input.size)
        return opened

    with warm_host_beside(open_and_warm) as explainer:
        opened, opened_wall = time.perf_counter(), time.time()
        first, steady = timed_explanations(explainer, [image, image], ExplainConfig(samples=samples))
        return {
            "device": explainer.device,
            "first_image_s": opened_wall + first - launched,
            "imports_and_load_s": loaded - started,  # runtime imports, bundle digest check, image decode
            "open_s": opened - loaded,
            "first_explanation_s": first,
            "steady_s": steady,
        }


def run_variant(
    bundle: Path, image: Path, precision: str, batch: int, samples: int, search: str = "exhaustive"
) -> dict[str, Any]:
    """One fresh process; ``first_image_s`` is from its launch to the first map."""
    arguments = [str(bundle), str(image), precision, str(batch), str(samples), repr(time.time()), search]
    done = subprocess.run(
        [sys.executable, "-m", "research.gpu.cold_start", "--child", *arguments],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        error = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"precision": precision, "batch": batch, "search": search, "error": error}
    return {"precision": precision, "batch": batch, "search": search, **json.loads(lines[-1][len(MARK) :])}


def parse_variant(text: str) -> tuple[str, str, int, str]:
    """``fp16:256`` or ``fp16:256:heuristic`` -> (key, precision, batch, search)."""
    parts = text.strip().split(":")
    search = parts[2].lower() if len(parts) == 3 else "exhaustive"
    if len(parts) not in (2, 3) or not parts[1].isdigit() or search not in ("exhaustive", "heuristic"):
        raise CxrUsageError(f"variant {text!r}: write precision:batch[:exhaustive|heuristic], e.g. fp16:256")
    return text.strip(), parts[0], int(parts[1]), search


def cold_start(
    bundle: Path, image: Path, variants: str = DEFAULT_VARIANTS, rounds: int = 2, samples: int = 1000
) -> dict[str, Any]:
    """Every variant ``rounds`` times, in forward then reverse order; medians per variant."""
    parsed = [parse_variant(v) for v in variants.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key, *_ in parsed}
    for index in range(rounds):
        for key, precision, batch, search in parsed if index % 2 == 0 else parsed[::-1]:
            runs[key].append(run_variant(bundle, image, precision, batch, samples, search))
    summary = {}
    for key, results in runs.items():
        good = [r for r in results if "error" not in r]
        summary[key] = {
            "runs": results,
            **{
                f"median_{field}": float(np.median([r[field] for r in good])) if good else None
                for field in ("first_image_s", "open_s", "steady_s")
            },
        }
    return {"image": str(image), "samples": samples, "rounds": rounds, "variants": summary}


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["--child"]:  # the fresh process run_variant starts
        bundle, image, precision, batch, samples, launched, search = arguments[1:]
        result = child(bundle, image, precision, int(batch), int(samples), float(launched), search)
        print(MARK + json.dumps(result))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("image", type=Path)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="precision:batch[:search],...")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(arguments)
    try:
        result = cold_start(args.bundle, args.image, args.variants, args.rounds)
    except CxrUsageError as exc:
        parser.error(str(exc))
    print(format_cold_start(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cold_start.json").write_text(json.dumps(result, indent=2) + "\n")


def format_cold_start(result: dict[str, Any]) -> str:
    lines = []
    for key, value in result["variants"].items():
        if value["median_first_image_s"] is None:
            lines.append(f"{key:>18}: failed: {value['runs'][0].get('error')}")
            continue
        lines.append(
            f"{key:>18}: first image {value['median_first_image_s']:.2f} s after launch (open "
            f"{value['median_open_s']:.2f} s), then {value['median_steady_s']:.3f} s per image"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
