"""The PyTorch model a bundle came from, as a callable on uint8 batches: the baseline every benchmark compares
to.

fp32 eager anywhere; on CUDA also fp16 channels-last (eager or ``torch.compile``), the fastest plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from cxr.runtime.bundle import Bundle
from cxr.runtime.errors import CxrError


def source_run(bundle: Bundle) -> Path:
    run = Path(bundle.card.provenance.get("source_run", ""))
    if not (run / "model.pt").is_file():
        raise CxrError(f"needs the PyTorch run the bundle came from (card says {run or 'nothing'})")
    return run


def torch_forward(run: Path, half: bool = False, compiled: bool = False):
    """``forward(pixels float/uint8 tensor on the device) -> probabilities float32`` and its device.

    Half precision casts after the adapter (which keeps its fp32 normalisation), as the fp16 graph does.
    """
    import cxr.train.models  # noqa: F401  (registers the DPN-SE family with timm)
    import torch
    from cxr.train.run import load_run

    _, model = load_run(run)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if half and device.type != "cuda":
        raise CxrError("PyTorch fp16 is measured on CUDA only")
    dtype = torch.float16 if half else torch.float32
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    adapter = model.adapter.to(device).eval()
    net = model.net.to(device=device, dtype=dtype, memory_format=layout).eval()
    if compiled:
        net = torch.compile(net)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        x = adapter(pixels).to(dtype).contiguous(memory_format=layout)
        return torch.softmax(net(x).float(), dim=1)

    return forward, device


def torch_runner(run: Path, half: bool = False, compiled: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """numpy uint8 N x 1 x S x S -> numpy probabilities, copies to and from the device included."""
    import torch

    forward, device = torch_forward(run, half, compiled)

    def infer(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return forward(torch.from_numpy(batch).to(device)).cpu().numpy()

    return infer
