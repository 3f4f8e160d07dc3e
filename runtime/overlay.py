"""The explanation picture: red segments support the class, blue argue against it, with a colour bar."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from cxr.runtime.explain import Explanation, top_segments
from cxr.runtime.safe_io import atomic_write

DISPLAY_SIZE = 448
BAR_WIDTH = 90


def _colour(weight: float) -> tuple[float, float, float]:
    """BGR tint: red for support, blue against, stronger with |weight|."""
    return (0.0, 0.0, 255.0) if weight > 0 else (255.0, 0.0, 0.0)


def render_overlay(
    image: np.ndarray, explanation: Explanation, class_name: str, num_features: int, note: str | None = None
) -> np.ndarray:
    scale = DISPLAY_SIZE / image.shape[0]
    base = cv2.cvtColor(
        cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2BGR
    )
    segments = cv2.resize(
        explanation.segments, (base.shape[1], base.shape[0]), interpolation=cv2.INTER_NEAREST
    )
    shown = top_segments(explanation.weights, num_features)
    peak = max((abs(explanation.weights[k]) for k in shown), default=1.0) or 1.0
    out = base.astype(np.float32)
    for seg in shown:
        weight = explanation.weights[seg]
        mask = segments == seg
        alpha = 0.25 + 0.4 * abs(weight) / peak
        out[mask] = (1 - alpha) * out[mask] + alpha * np.array(_colour(weight), dtype=np.float32)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, _colour(weight), 1)
    out = np.clip(out, 0, 255).astype(np.uint8)
    prob = float(explanation.probs[explanation.label])
    cv2.putText(
        out,
        f"{class_name}  p={prob:.2f}",
        (8, 22),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.6,
        (0, 255, 255),
        1,
        cv2.LINE_AA,
    )
    if note:  # a warning the reader must not miss (an input unlike the training films), on a dark band
        height = out.shape[0]
        out[height - 30 :] = (out[height - 30 :] * 0.3).astype(np.uint8)
        cv2.putText(out, note, (8, height - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 255), 1, cv2.LINE_AA)
    return np.hstack([out, colour_bar(base.shape[0], peak)])


def colour_bar(height: int, peak: float) -> np.ndarray:
    """Blue (against) at the bottom through grey to red (supports) at the top, labelled with the weight
    range."""
    bar = np.full((height, BAR_WIDTH, 3), 255, dtype=np.uint8)
    top, bottom = 30, height - 30
    for y in range(top, bottom):
        t = 1 - 2 * (y - top) / (bottom - top)  # +1 at the top, -1 at the bottom
        bar[y, 10:30] = np.clip((128 * (1 - t), 128 * (1 - abs(t)), 128 * (1 + t)), 0, 255)  # BGR
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(bar, f"+{peak:.2g}", (34, top + 10), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(bar, "0", (34, (top + bottom) // 2 + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(bar, f"-{peak:.2g}", (34, bottom), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(bar, "supports", (4, top - 10), font, 0.4, (0, 0, 200), 1, cv2.LINE_AA)
    cv2.putText(bar, "against", (4, bottom + 20), font, 0.4, (200, 0, 0), 1, cv2.LINE_AA)
    return bar


def save_overlay(
    path: Path,
    image: np.ndarray,
    explanation: Explanation,
    class_name: str,
    num_features: int,
    note: str | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = render_overlay(image, explanation, class_name, num_features, note)
    ok, encoded = cv2.imencode(".png", picture)
    if not ok:
        raise RuntimeError(f"could not encode the overlay for {path}")
    atomic_write(path, encoded.tobytes())
    return path
