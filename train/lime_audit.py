"""Where does the model look? The share of positive LIME weight that falls outside the body, over N images.

Runs the runtime's own LIME (``cxr.runtime.explain``) against the PyTorch model of a run, through the same
in-graph composition the exported explainer uses (``cxr.export.graphs.Explainer``), so the audit of a run and
the maps a bundle draws come from one method. The body is ``cxr.runtime.suppress.body_mask`` on the whole
film, taken through the card's preprocessing geometry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from cxr.export.graphs import Explainer
from cxr.runtime.backends.base import BatchLimits, ExplainerBackend, z_columns
from cxr.runtime.card import Card
from cxr.runtime.errors import CxrError
from cxr.runtime.explain import ExplainConfig, explain_image
from cxr.runtime.preprocess import preprocess_with_mask, read_image
from cxr.runtime.suppress import body_mask
from cxr.train.models.adapter import Classifier
from tqdm import tqdm


class TorchExplainer(ExplainerBackend):
    """The explainer graph's PyTorch module behind the runtime's ExplainerBackend contract (fixed batch, on
    the model's device)."""

    name, precision, provider = "pytorch", "fp32", "torch eager"

    def __init__(self, model: Classifier, batch: int | None = None) -> None:
        self.module = Explainer(model).eval()
        self.device = next(model.parameters()).device
        self.limits = BatchLimits(max_batch=batch or (128 if self.device.type == "cuda" else 32))
        self.feeds: dict[str, torch.Tensor] = {}

    def _set_image(self, image: np.ndarray, fill: np.ndarray, segments: np.ndarray) -> None:
        self.columns = z_columns(int(segments.max()) + 1)
        feeds = {
            "image": np.ascontiguousarray(image[None, None]),
            "fill": np.ascontiguousarray(fill[None, None]),
            "segments": np.ascontiguousarray(segments, dtype=np.int32),
        }
        self.feeds = {name: torch.from_numpy(array).to(self.device) for name, array in feeds.items()}
        self.bytes_sent += sum(array.nbytes for array in feeds.values())

    def _run(self, z: np.ndarray) -> np.ndarray:
        block = self.fixed_block(z)
        with torch.no_grad():
            probs = self.module(**self.feeds, z=torch.from_numpy(block).to(self.device))
        return probs[: len(z)].float().cpu().numpy()


def outside_share(weights: dict[int, float], segments: np.ndarray, body: np.ndarray) -> float | None:
    """Positive weight times each segment's share of pixels outside the body, over all positive weight."""
    positive = {k: w for k, w in weights.items() if w > 0}
    total = sum(positive.values())
    if total <= 0:
        return None
    outside = sum(
        w * float(np.mean(~body[segments == k])) for k, w in positive.items() if (segments == k).any()
    )
    return outside / total


def lime_audit(
    model: Classifier,
    card: Card,
    paths: list[Path],
    samples: int = 300,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean share of positive LIME weight outside the body over ``paths`` (films with no body found are
    skipped), explained on the model's device (a GPU takes a larger batch)."""
    explainer = TorchExplainer(model)
    shares, skipped = [], 0
    config = ExplainConfig(samples=samples, seed=seed)
    for path in tqdm(paths, desc="LIME audit", unit="img", disable=len(paths) < 2):
        try:
            gray = read_image(path, dicom_window=card.preprocessing.dicom_window)
        except CxrError:
            skipped += 1
            continue
        body = body_mask(gray)
        if body is None:
            skipped += 1
            continue
        view, body_view = preprocess_with_mask(gray, body, card.input.size, card.preprocessing)
        explanation = explain_image(view, explainer, config)
        share = outside_share(explanation.weights, explanation.segments, body_view)
        if share is not None:
            shares.append(share)
    if not shares:
        raise CxrError("LIME audit: no image had a body region and a positive explanation")
    return {
        "images": len(shares),
        "skipped": skipped,
        "samples": samples,
        "positive_weight_outside_body": round(float(np.mean(shares)), 4),
        "per_image": [round(s, 4) for s in shares],
    }
