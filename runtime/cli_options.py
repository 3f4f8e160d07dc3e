"""Options several CLIs share, declared once (Typer ``Annotated`` types): bundle trust, pixel limit,
batching."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from cxr.runtime.backends.registry import backend_help
from cxr.runtime.preprocess import DEFAULT_MAX_PIXELS
from typing_extensions import Annotated

DEFAULT_MAX_BATCH = 64
DEFAULT_QUEUE_DELAY_US = 2000

ExpectDigest = Annotated[
    Optional[str],
    typer.Option(
        "--expect-digest",
        help="Refuse the bundle unless its digest (printed by cxr-export and info) is this sha256:...",
    ),
]
TrustedKey = Annotated[
    Optional[Path],
    typer.Option(
        "--trusted-key",
        help="Refuse the bundle unless card.json is signed by this Ed25519 public key (cxr-export sign).",
    ),
]
AllowUnvalidated = Annotated[
    bool,
    typer.Option(
        "--allow-unvalidated",
        help="Use an fp16/int8 graph or engine that failed or never ran 'cxr-export parity'.",
    ),
]
MaxPixels = Annotated[
    int,
    typer.Option(
        help="Refuse images with more pixels than this, checked from the header (decompression bombs)."
    ),
]
MaxBatch = Annotated[int, typer.Option(help="Largest batch Triton's dynamic batcher forms (max_batch_size).")]
QueueDelayUs = Annotated[
    int, typer.Option(help="Dynamic batching: longest wait for more requests before a batch runs.")
]
Instances = Annotated[int, typer.Option(help="Model instances per device (each its own backend session).")]
# The choices and auto's order come from the backend registry: a new backend appears here by registering.
BackendName = Annotated[str, typer.Option("--backend", help=backend_help())]
PRECISION_HELP = (
    "fp32 (default), fp16, int8, bf16 (OpenVINO, on CPUs with AVX512-BF16 or AMX-BF16) or auto: the fastest "
    "this machine runs whose parity passed (on a CPU of this kind for int8)."
)

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_QUEUE_DELAY_US",
    "AllowUnvalidated",
    "BackendName",
    "PRECISION_HELP",
    "ExpectDigest",
    "Instances",
    "MaxBatch",
    "MaxPixels",
    "QueueDelayUs",
    "TrustedKey",
]
