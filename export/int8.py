"""``cxr-export int8``: explicit Q/DQ graphs calibrated on real images (ONNX Runtime static quantization).

Symmetric int8 activations and per-channel symmetric weights, the form TensorRT's explicit
quantization accepts; the same file runs in ONNX Runtime on CPU.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
from cxr.runtime.card import Card, Preprocessing
from cxr.runtime.errors import CxrError, CxrUsageError
from cxr.runtime.ood import GATE_FILE
from cxr.runtime.reading import Prepared
from cxr.runtime.safe_io import atomic_output
from tqdm import tqdm

T = TypeVar("T")


class FeedReader:
    """onnxruntime.quantization CalibrationDataReader over a list of feeds, read one range at a time.

    With ``CalibStridedMinMax`` ORT asks for one batch per ``collect_data`` call, so the activations of every
    tensor are held for one batch only (then folded into running ranges / histograms): memory no longer grows
    with the number of calibration images.
    """

    def __init__(self, feeds: list[dict[str, np.ndarray]], desc: str = "calibrating") -> None:
        self.feeds = feeds
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)
        quiet = not logging.getLogger(__name__).isEnabledFor(logging.INFO)
        self.bar = tqdm(total=len(feeds), desc=desc, unit="batch", disable=len(feeds) < 2 or quiet)

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


def quantize_int8(
    src: Path,
    dst: Path,
    feeds: list[dict[str, np.ndarray]],
    method: str = "minmax",
    exclude: list[str] | None = None,
    cache: Path | None = None,
    reduce_range: bool = False,
) -> dict[str, object]:
    """One explicit Q/DQ graph. ``cache`` keeps the calibrated ranges, so re-quantising with other ``exclude``
    nodes (the sensitivity sweep) does not calibrate again. Histogram methods need same-shape activations."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if not feeds:
        raise CxrError("int8: no calibration inputs")
    if method == "nncf":
        from cxr.export.int8_nncf import quantize_nncf

        quantize_nncf(src, dst, feeds, list(exclude or []), reduce_range, FLOAT_OPS)  # reads src once
        return {**graph_notes(method, reduce_range, list(exclude or [])), "calibration_batches": len(feeds)}
    if method != "minmax":  # histograms: the first HISTOGRAM_IMAGES images only
        counts = np.cumsum([len(next(iter(feed.values()))) for feed in feeds])
        feeds = feeds[: max(1, int(np.searchsorted(counts, HISTOGRAM_IMAGES, "right")))]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        float_nodes = nodes_of_types(prepared, FLOAT_OPS)
        cached = cache is not None and cache.is_file()
        reader = FeedReader(feeds, f"calibrating {src.stem} ({method})")
        with atomic_output(dst) as output, quiet_root_logger():
            quantize_static(
                str(prepared),
                str(output),
                None if cached else reader,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=reduce_range,
                calibrate_method=methods[method],
                nodes_to_exclude=[*float_nodes, *(exclude or [])],
                calibration_cache_path=cache,
                extra_options={
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    "CalibStridedMinMax": 1,
                    "CalibPercentile": 99.999,
                },
            )
        reader.bar.close()
    return {**graph_notes(method, reduce_range, list(exclude or [])), "calibration_batches": len(feeds)}


def graph_notes(method: str, reduce_range: bool, kept_in_float: list[str]) -> dict[str, Any]:
    """How one int8 graph was made, as the card records it."""
    return {
        "format": "QDQ",
        "activations": "int8 symmetric",
        "weights": weights_note(reduce_range),
        "calibration": method,
        "kept_in_float": kept_in_float,
        "float_ops": list(FLOAT_OPS),
        "peak_rss_mb": peak_rss_mb(),
    }


def nodes_of_types(path: Path, op_types: tuple[str, ...]) -> list[str]:
    import onnx

    return [node.name for node in onnx.load(str(path)).graph.node if node.op_type in op_types and node.name]


# A standalone BatchNorm (DPN pre-activation BN after a concat cannot fold into a conv) has no int8 kernel in
# ORT or TensorRT: quantising its scale and bias adds error and no speed. The sensitivity sweep on dpn92_se
# found these biases the noisiest tensors of the whole graph (9-11 dB SQNR).
FLOAT_OPS = ("BatchNormalization",)


def weights_note(reduce_range: bool) -> str:
    return "int8 per-channel symmetric" + (
        ", 7-bit range (no u8 x s8 overflow on CPUs without VNNI)" * reduce_range
    )


HISTOGRAM_IMAGES = 16  # ORT re-sorts each batch into its growing histograms: 2.7 s -> 74 s per dpn92_se batch


@dataclass
class Int8Report:
    """What 'cxr-export int8' wrote and measured, for the card and the one-line summary."""

    written: list[str]
    notes: dict[str, Any]
    verdict: str  # whether int8 pays on this CPU, one line


def draw_images(
    folder: Path, size: int, count: int, seed: int, pre: Preprocessing | None = None
) -> list[np.ndarray]:
    """Up to ``count`` readable images from ``folder`` in a seeded random order (unreadable files skipped)."""
    from cxr.runtime.preprocess import load_and_preprocess

    def read(path: Path) -> np.ndarray | None:
        try:
            return load_and_preprocess(path, size, pre=pre)
        except CxrError:
            return None

    return _draw(folder, count, seed, read)


def draw_films(folder: Path, card: Card, count: int, seed: int) -> list[Prepared]:
    """``draw_images``'s films, read as predict reads them: each image with the statistics the gate reads."""
    from cxr.runtime.preprocess import DEFAULT_MAX_PIXELS
    from cxr.runtime.reading import prepare

    def read(path: Path) -> Prepared | None:
        film = prepare(path, str(path), card, DEFAULT_MAX_PIXELS)
        return film if film.image is not None else None

    return _draw(folder, count, seed, read)


def _draw(folder: Path, count: int, seed: int, read: Callable[[Path], T | None]) -> list[T]:
    from cxr.runtime.inputs import expand_inputs

    paths = expand_inputs([str(folder)])
    drawn: list[T] = []
    for index in np.random.default_rng(seed).permutation(len(paths)):
        item = read(paths[index])
        if item is None:
            continue
        drawn.append(item)
        if len(drawn) == count:
            break
    return drawn


def export_int8(
    bundle_dir: Path,
    calib: Path,
    samples: int = 64,
    check: int = 64,
    seed: int = 0,
    methods: tuple[str, ...] = ("minmax", "percentile", "nncf"),
    target: float = 0.98,
    log: Any = None,
    check_data: Path | None = None,
) -> Int8Report:
    """model.int8.onnx (method and float-kept layers chosen by measurement on held-out images) and
    explain.int8.onnx (that same int8 network behind the LIME composer, so the explainer's unperturbed row
    is the classifier's answer), recorded in the card with their known answers.

    The held-out images are ``check_data`` when given, else further images of ``calib``. Images the model
    trained on make agreement look better than it is (their predictions have wide margins), so a folder the
    model never saw, such as its validation split, chooses better.
    """
    from cxr.export.int8_tune import METHODS
    from cxr.export.stage import bundle_stage
    from cxr.runtime.bundle import Bundle

    log = log or logging.getLogger(__name__).info
    if samples < 1 or check < 0:
        raise CxrUsageError("--samples must be at least 1 and --check at least 0")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CxrUsageError(
            f"--calibration: {', '.join(unknown) or 'empty'} is not one of {', '.join(METHODS)} "
            "(it must name at least one)"
        )
    with bundle_stage(bundle_dir, "int8") as work:
        written, notes = _write_int8(
            Bundle.open(work), calib, samples, check, seed, methods, target, log, check_data
        )
    return Int8Report(written, notes, speed_verdict(notes["speed_cpu"]))


def _write_int8(
    opened: Any,
    calib: Path,
    samples: int,
    check: int,
    seed: int,
    methods: tuple[str, ...],
    target: float,
    log: Any,
    check_data: Path | None,
) -> tuple[list[str], dict[str, Any]]:
    """The int8 graphs of the (staged) bundle ``opened``, written and recorded in its card."""
    from cxr.export.compose import explainer_from_classifier
    from cxr.export.int8_tune import tune
    from cxr.export.known import record_known_answers
    from cxr.runtime.bundle import onnx_name
    from cxr.runtime.card import file_parity_label, forget_parity, record_files

    size = opened.card.input.size
    drawn = samples + (check if check_data is None else 0)
    films = draw_films(calib, opened.card, drawn, seed)
    if not films:
        raise CxrError(f"{calib}: no readable calibration images")
    calib_films, check_films = films[:samples], films[samples:]
    if check_data is not None and check:
        check_films = draw_films(check_data, opened.card, check, seed)
    images = [film.image for film in films]
    calib_images, check_images = [f.image for f in calib_films], [f.image for f in check_films]
    if check and len(check_images) < 8:
        source = (
            f"{check_data}: {len(check_images)} readable images"
            if check_data
            else f"{calib}: {len(images)} readable images for --samples plus the held-out ones"
        )
        raise CxrError(
            f"{source}; int8 needs at least 8 held-out images to choose the calibration by measurement "
            "(or --check 0 to skip choosing)"
        )
    src, dst = opened.verified(onnx_name("model", "fp32")), opened.folder / onnx_name("model", "int8")
    feeds = classifier_feeds(calib_images)
    if check_images:
        log(
            f"choosing int8 calibration on {len(check_images)} held-out images from "
            f"{check_data or calib} (target agreement {target:.0%})"
        )
        result = tune(src, dst, feeds, classifier_feeds(check_images), methods, target, log)
        model_notes = {
            **graph_notes(result.method, result.reduce_range, result.excluded),
            "held_out_images": len(check_images),
            "held_out_from": "check-data" if check_data else "calibration folder",
            "held_out_agreement": round(result.agreement, 4),
            "calibration_images": len(calib_images),
            "trials": [t.__dict__ for t in result.trials],
            "most_sensitive": result.sensitivity[:8],
        }
    else:
        model_notes = quantize_int8(src, dst, feeds, methods[0])
    written, notes = [dst.name], {"model": model_notes}
    if opened.has(onnx_name("explain", "fp32")):
        explainer_from_classifier(dst, opened.folder / onnx_name("explain", "int8"), size)
        notes["explain"] = {
            "graph": f"{dst.name} behind the in-graph LIME composer (cxr.export.compose)",
            "calibration": model_notes["calibration"],
        }
        written.append(onnx_name("explain", "int8"))
    from cxr.export.int8_tune import cpu_speed

    speed = cpu_speed(src, dst, np.ascontiguousarray(calib_images[0][None, None]))
    notes["speed_cpu"] = speed
    provenance = {**opened.card.provenance, "int8": {**notes, "images": len(calib_images)}}
    card = opened.card.replace(provenance=provenance)
    if opened.has(GATE_FILE):
        card = card.replace(ood=gate_at_int8(opened, src, dst, check_films or calib_films, log))
    card = record_known_answers(opened.folder, card, written)
    record_files(opened.folder, forget_parity(card, [file_parity_label("int8")]), written)
    return written, notes


def gate_at_int8(opened: Any, fp32: Path, int8: Path, films: list[Prepared], log: Any) -> dict[str, Any]:
    """The card's ``ood`` section with what int8 does to the gate, measured on ``films`` through both graphs
    (``cxr.runtime.ood_precision``): the parts int8 keeps, how far each moved, how often it still decides
    alike."""
    from cxr.runtime.backends.onnxruntime import CPU_EP, OrtBackend
    from cxr.runtime.ood import Gate
    from cxr.runtime.ood_precision import precision_entry

    gate = Gate.from_bytes(opened.verified_bytes(GATE_FILE), GATE_FILE)
    batch = np.stack([film.image for film in films])[:, None]
    outputs = {}
    for path, precision in ((fp32, "fp32"), (int8, "int8")):
        with OrtBackend(path, precision, providers=[CPU_EP]) as backend:
            outputs[precision] = backend.run_outputs_chunked(batch)[1]
    if outputs["fp32"] is None or outputs["int8"] is None:
        entry: dict[str, Any] = {"parts": None, "why": "the graphs emit no features"}
    else:
        entry = precision_entry(gate, outputs["fp32"], outputs["int8"], np.stack([f.stats for f in films]))
    if entry["parts"]:
        left = [name for name in entry["drift_p95"] if name not in entry["parts"]]
        log(
            f"out-of-distribution gate with int8: reads {' + '.join(entry['parts'])}"
            + (f" ({', '.join(left)} moved too far under int8)" if left else "")
            + f"; decides as on fp32 features for {entry['agreement']:.0%} of {entry['films']} held-out films"
        )
    else:
        log(
            f"out-of-distribution gate with int8: none ({entry['why']}); int8 records will carry no ood_score"
        )
    precisions = {**(opened.card.ood.get("precisions") or {}), "int8": entry}
    return {**opened.card.ood, "precisions": precisions}


def speed_verdict(speed: dict[str, Any]) -> str:
    """One line on whether int8 pays on this CPU: per backend its b1 p50 against fp32 (it pays at <=
    FASTER_RATIO)."""
    from cxr.export.int8_tune import FASTER_RATIO

    rows = {name: row for name, row in speed.items() if isinstance(row, dict)}
    paying = [name for name, row in rows.items() if row["ratio"] <= FASTER_RATIO]
    numbers = "; ".join(
        f"{name} {row['int8_b1_p50_ms']} vs {row['fp32_b1_p50_ms']} ms ({row['ratio']}x)"
        for name, row in rows.items()
    )
    if paying:
        return f"int8 pays on this CPU with {', '.join(paying)}: b1 p50 int8 vs fp32 {numbers}"
    return (
        f"int8 does not pay on this CPU (b1 p50 int8 vs fp32: {numbers}; {speed['cpu_int8']}): "
        "serve fp32/fp16 here, or build a TensorRT int8 engine on the GPU"
    )


@contextmanager
def quiet_root_logger() -> Iterator[None]:
    """ORT's quantiser warns on the root logger for every standalone BatchNorm's per-channel axis: noise
    here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
