"""``cxr-export int8``: explicit Q/DQ graphs calibrated on real images (ONNX Runtime static quantization).

Symmetric int8 activations and per-channel symmetric weights, the form TensorRT's explicit
quantization accepts; the same file runs in ONNX Runtime on CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from cxr.runtime.errors import CxrError
from cxr.runtime.safe_io import atomic_output
from cxr.runtime.segment import segment, segment_means


class FeedReader:
    """onnxruntime.quantization CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def classifier_feeds(images: list[np.ndarray], batch: int = 8) -> list[dict[str, np.ndarray]]:
    stacked = np.stack(images)[:, None]
    return [{"image": stacked[i : i + batch]} for i in range(0, len(stacked), batch)]


def explainer_feeds(images: list[np.ndarray], seed: int = 0, rows: int = 8) -> list[dict[str, np.ndarray]]:
    """Realistic explainer inputs: each image's SLIC map, its segment-mean fill, and random on/off rows."""
    rng = np.random.default_rng(seed)
    feeds = []
    for image in images:
        segments = segment(image)
        z = rng.integers(0, 2, (rows, int(segments.max()) + 1), dtype=np.uint8)
        z[0] = 1
        feeds.append({"image": image[None, None], "fill": segment_means(image, segments)[None, None],
                      "segments": segments, "z": z})
    return feeds


def quantize_int8(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], percentile: bool = True) -> dict[str, object]:
    """Percentile calibration needs same-shape activations; the explainer (varying segment count) uses min/max."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not feeds:
        raise CxrError("int8: no calibration inputs")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        with atomic_output(dst) as output:
            quantize_static(
                str(prepared), str(output), FeedReader(feeds), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                calibrate_method=CalibrationMethod.Percentile if percentile else CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
    return {"format": "QDQ", "activations": "int8 symmetric", "weights": "int8 per-channel symmetric",
            "calibration": "percentile 99.999" if percentile else "min-max", "calibration_batches": len(feeds)}
