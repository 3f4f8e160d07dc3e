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
from tqdm import tqdm


class FeedReader:
    """onnxruntime.quantization CalibrationDataReader over a list of feeds, read one range at a time.

    With ``CalibStridedMinMax`` ORT asks for one batch per ``collect_data`` call, so the activations of every
    tensor are held for one batch only (then folded into running ranges / histograms): memory no longer grows
    with the number of calibration images.
    """

    def __init__(self, feeds: list[dict[str, np.ndarray]], desc: str = "calibrating") -> None:
        self.feeds = feeds
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)
        self.bar = tqdm(total=len(feeds), desc=desc, unit="batch", disable=len(feeds) < 2)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._feeds = iter(self.feeds[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._feeds, None)
        if feed is not None:
            self.bar.update(1)
        return feed


def classifier_feeds(images: list[np.ndarray], batch: int = 4) -> list[dict[str, np.ndarray]]:
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
        reader = FeedReader(feeds, f"calibrating {src.stem}")
        with atomic_output(dst) as output:
            quantize_static(
                str(prepared), str(output), reader, quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                calibrate_method=CalibrationMethod.Percentile if percentile else CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibStridedMinMax": 1},
            )
        reader.bar.close()
    return {"format": "QDQ", "activations": "int8 symmetric", "weights": "int8 per-channel symmetric",
            "calibration": "percentile 99.999" if percentile else "min-max", "calibration_batches": len(feeds),
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
