"""``cxr-run``: bedside predictions and LIME explanations from a model bundle (no PyTorch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from cxr.runtime.cli_util import new_app, run_app

app = new_app("Run a cxr-edge model bundle on chest X-rays (PNG, JPEG, DICOM): predictions and LIME maps.")

EXIT_OK, EXIT_FATAL, EXIT_SOME_FAILED = 0, 1, 2


@app.command()
def predict(
    inputs: List[str] = typer.Argument(..., help="Image files, folders (searched recursively) or globs."),
    model: Path = typer.Option(..., "--model", help="Model bundle folder (from 'cxr-export onnx')."),
    backend: str = typer.Option("auto", help="auto (engine -> ORT GPU -> ORT CPU), tensorrt or onnxruntime."),
    precision: str = typer.Option("fp32", help="fp32, fp16 or int8: which graph / engine."),
    batch_size: int = typer.Option(16, help="Images per backend call (capped by the engine profile)."),
    out: Optional[Path] = typer.Option(None, "--out", help="FILE.jsonl or FILE.csv (default: JSON lines on stdout)."),
    top_k: int = typer.Option(0, help="Also list the K most probable classes."),
    max_pixels: int = typer.Option(64_000_000, help="Refuse images larger than this (decompression bombs)."),
    explain: bool = typer.Option(False, "--explain", help="Add a LIME explanation and an overlay PNG per image."),
    explain_dir: Optional[Path] = typer.Option(None, help="Where overlay PNGs go (default: explanations/ beside --out, or ./explanations)."),
    samples: int = typer.Option(1000, help="LIME samples per image."),
    segmenter: str = typer.Option("slic", help="slic (default) or quickshift (the paper's)."),
    num_features: int = typer.Option(8, help="Segments painted in the overlay."),
    seed: int = typer.Option(0, help="LIME seed: same image + seed + backend -> same weights."),
) -> int:
    """One JSON record per input: path, label, probs, backend, precision, error (+ explanation). Exit 2 if some failed."""
    from cxr.runtime.backends.select import open_classifier, open_explainer
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.errors import CxrError
    from cxr.runtime.explain import ExplainConfig
    from cxr.runtime.inputs import expand_inputs
    from cxr.runtime.output import RecordWriter
    from cxr.runtime.predict import PredictOptions, predict_stream
    from cxr.runtime.segment import SEGMENTERS

    if segmenter not in SEGMENTERS:
        raise CxrError(f"--segmenter must be one of {', '.join(SEGMENTERS)}, got {segmenter!r}")
    if top_k < 0:
        raise CxrError("--top-k must be 0 or more")
    bundle = Bundle.open(model)
    explain_config = ExplainConfig(samples, segmenter, num_features, seed) if explain else None
    if explain and explain_dir is None:
        explain_dir = (out.parent if out else Path(".")) / "explanations"
    paths = expand_inputs(inputs)
    classifier, reason = open_classifier(bundle, backend, precision)
    failed = 0
    with classifier:
        print(f"backend: {classifier.name} {precision} ({reason})", file=sys.stderr)
        explainer = open_explainer(bundle, classifier.name, precision)[0] if explain else None
        try:
            options = PredictOptions(batch_size, top_k, max_pixels, explain_config, explain_dir)
            with RecordWriter(out, bundle.card.classes) as writer:
                for record in predict_stream(paths, bundle, classifier, options, explainer):
                    failed += record["error"] is not None
                    writer.write(record)
        finally:
            if explainer is not None:
                explainer.close()
    summary = f"{len(paths) - failed} of {len(paths)} inputs predicted"
    print(summary + (f"; {failed} failed (see their 'error')" if failed else "") + (f"; wrote {out}" if out else ""),
          file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


@app.command()
def info(model: Path = typer.Option(..., "--model", help="Model bundle folder.")) -> None:
    """The card, file hashes (checked), and which backends and precisions can run here."""
    from cxr.runtime.backends.onnxruntime import available_providers
    from cxr.runtime.backends.tensorrt import tensorrt_available
    from cxr.runtime.bundle import PRECISIONS, Bundle, engine_name, onnx_name
    from cxr.runtime.card import sha256_file

    bundle = Bundle.open(model)
    card = bundle.card.to_dict()
    files = card.pop("files")
    print(json.dumps(card, indent=2))
    print("\nfiles:")
    for name, digest in files.items():
        path = bundle.folder / name
        state = "missing" if not path.is_file() else ("ok" if sha256_file(path) == digest else "SHA MISMATCH")
        print(f"  {name:<28} {digest[:16]}  {state}")
    print("\ncan run here:")
    providers = ", ".join(available_providers())
    for precision in PRECISIONS:
        ways = []
        if bundle.has(onnx_name("model", precision)):
            ways.append(f"onnxruntime ({providers})")
        if bundle.has(engine_name("model", precision)):
            ways.append("tensorrt" if tensorrt_available() else "tensorrt engine present, TensorRT not installed")
        print(f"  {precision}: {'; '.join(ways) if ways else 'no graph (create it with cxr-export)'}")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
