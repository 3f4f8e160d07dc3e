"""Known answers: every graph's and engine's outputs on fixed probe inputs, recorded in the card when the file
is written and reproduced at every open, so a broken model never answers.

The probes are raw "films" made by closed-form integer arithmetic (no random stream, no transcendental
function whose last bit could change between numpy builds): a chest-like phantom, a diagonal gradient and a
ring pattern, of different sizes and aspect ratios, shrunk or enlarged by the runtime's own host
preprocessing with the card's ``preprocessing``. So a change of the graph (NaN weights, another model's
file), of the backend (a wrong engine, a miscompiling kernel) or of the preprocessing between the stage that
recorded the answers and this one changes the answers.

Per file (``model.onnx``, ``explain.fp16.onnx``, ``model.fp16.engine`` ...) the card keeps the probe-set
version, the outputs (rounded), the sha256 of the preprocessed probe pixels and their per-film mean and
standard deviation. The tolerance on the outputs is the formats table's, per precision and device
(``cxr.runtime.formats.KnownAnswerRule``).

Why max |dprob|, plus the pixels themselves (measured on this project's 2-core Xeon): ONNX Runtime and
OpenVINO on the CPU differ on these probes by at most 2.4e-7 (fp32), 3.2e-4 (fp16) and 0 (int8). The trained
test model's answers move by 0.018 for a one-grey-level shift of the pixels and by 0.87 for another resize
filter: far outside any tolerance. But an untrained dpn92_se (random weights, 224 px) answers near-uniformly
(0.248 to 0.254) and moves by only 2e-5 (fp32), 1.2e-4 (fp16: inside the two backends' own 1e-4 spread) and
0 (int8: its quantised output saturates). A sharper comparison of the outputs would not help: centred
log-probabilities (logits) scale the backends' spread and a real change alike (5 to 6 times, test model),
and class ranking adds nothing to max |dprob| (with every probability within the tolerance, classes more
than twice it apart cannot swap). So the probe pixels are compared themselves, which holds whatever the
model's sensitivity: equal sha256, or each film's mean and spread within ``PIXEL_TOLERANCE``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from cxr.runtime.backends.base import PROBE_SEGMENTS, ExplainerProbe, grid_segments
from cxr.runtime.backends.registry import runs_engine
from cxr.runtime.errors import BundleRefused, CxrError
from cxr.runtime.formats import get_format

if TYPE_CHECKING:
    from cxr.runtime.backends.base import Backend, ExplainerBackend
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.card import Card

log = logging.getLogger(__name__)

PROBE_SET = 1  # bump when the films, the explainer rows or what is recorded change
PROBE_ROWS = 4  # the explainer probe's on/off rows (explainer_probe)
DECIMALS = 7  # outputs are recorded to 1e-7: well under the tightest tolerance (fp32 on a CPU)
# The probe pixels' per-film mean and standard deviation must match export's within this many grey levels.
# A one-level shift moves every film's mean by 1.0; area -> linear shrinking moves the ring film's spread by
# 4.9 (224 px) to 20 (64 px) levels, cubic -> linear enlarging the gradient's by 0.9 (224 px); a few pixels
# rounded the other way by another OpenCV build move neither by 0.01.
PIXEL_TOLERANCE = 0.25


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:height, 0:width].astype(np.int64)


def _inside(yy: np.ndarray, xx: np.ndarray, cy: int, cx: int, ry: int, rx: int) -> np.ndarray:
    """Pixels inside the ellipse, in exact integer arithmetic."""
    return ((yy - cy) ** 2) * rx * rx + ((xx - cx) ** 2) * ry * ry <= (rx * ry) ** 2


def chest_film(height: int = 320, width: int = 256) -> np.ndarray:
    """A portrait chest-like phantom: dark background, a bright body ellipse shaded from top to bottom, two
    darker lung fields crossed by thin rib bands, a brighter spine and a small bright corner marker."""
    yy, xx = _grid(height, width)
    film = np.full((height, width), 24, dtype=np.int64)
    body = _inside(yy, xx, height * 11 // 20, width // 2, height * 9 // 20, width * 21 // 50)
    film[body] = 140 + (40 * yy[body]) // height
    for side in (-1, 1):
        lung = _inside(yy, xx, height // 2, width // 2 + side * width * 9 // 50, height * 7 // 25, width // 8)
        film[lung] = 60 + (((xx[lung] - width // 2) ** 2) * 40) // (width * width // 4)
        film[lung & (yy % 14 < 3)] += 45  # ribs: detail a few pixels wide, which the resize filter shapes
    film[body & (np.abs(xx - width // 2) < width // 25)] = 200  # spine
    film[height // 16 : height // 16 + height // 20, width // 16 : width // 16 + width // 20] = 235
    return film.astype(np.uint8)


def gradient_film(height: int = 200, width: int = 360) -> np.ndarray:
    """A landscape diagonal gradient from grey level 16 to 200 under thin vertical bars 36 levels brighter:
    enlarged, not shrunk, at sizes over 200, so the enlarging filter is probed too."""
    yy, xx = _grid(height, width)
    ramp = 16 + (184 * (xx * (height - 1) + yy * (width - 1))) // (2 * (height - 1) * (width - 1))
    return (ramp + 36 * ((xx // 3) % 2)).astype(np.uint8)


def ring_film(height: int = 288, width: int = 288) -> np.ndarray:
    """Concentric rings that get finer towards the edge, on a checkerboard: what the resize filter does to
    fine detail shows here."""
    yy, xx = _grid(height, width)
    rings = (((yy - height // 2) ** 2 + (xx - width // 2) ** 2) // 97) % 2
    checker = ((yy // 24 + xx // 24) % 2) * 40
    return (48 + 120 * rings + checker).astype(np.uint8)


@functools.cache
def films() -> tuple[np.ndarray, ...]:
    """The raw films, made once per process (~9 ms) and read-only: every probe starts from the same pixels."""
    made = (chest_film(), gradient_film(), ring_film())
    for film in made:
        film.setflags(write=False)
    return made


def _preprocessed(films: tuple[np.ndarray, ...], card: Card) -> np.ndarray:
    """N x 1 x S x S uint8: the films through the runtime's host preprocessing with the card's settings."""
    from cxr.runtime import preprocess  # looked up at call time: what the runtime runs now is what is probed

    size, pre = card.input.size, card.preprocessing
    return np.stack([preprocess.preprocess(film, size, pre) for film in films])[:, None]


def classifier_probe(card: Card) -> np.ndarray:
    """The classifier's probe batch: every film, preprocessed."""
    return _preprocessed(films(), card)


def explainer_probe(card: Card) -> ExplainerProbe:
    """The explainer's probe: the chest film preprocessed, its fill (lime's segment means), a map of band
    segments and fixed on/off rows (all on: the classifier's answer; all off: the fill; alternate bands; the
    top half)."""
    from cxr.runtime.segment import segment_means

    image = _preprocessed(films()[:1], card)[0, 0]
    segments = grid_segments(card.input.size, PROBE_SEGMENTS)
    columns = np.arange(PROBE_SEGMENTS)
    z = np.stack([columns >= 0, columns < 0, columns % 2 == 0, columns < PROBE_SEGMENTS // 2]).astype(
        np.uint8
    )
    return ExplainerProbe(image, segment_means(image, segments), segments, z)


def pixel_facts(images: list[np.ndarray]) -> dict[str, Any]:
    """sha256 of the probe pixels (identical preprocessing) and each image's mean and spread (how far off)."""
    digest = hashlib.sha256()
    for array in images:
        digest.update(np.ascontiguousarray(array).tobytes())
    floats = [np.asarray(image, dtype=np.float64) for image in images]
    return {
        "pixels_sha256": digest.hexdigest(),
        "pixels_mean": [round(float(f.mean()), 3) for f in floats],
        "pixels_std": [round(float(f.std()), 3) for f in floats],
    }


def run_classifier(backend: Backend, card: Card) -> tuple[np.ndarray, dict[str, Any]]:
    """The classifier's outputs on the probes, one film per call (a bedside request's shape, so this is its
    warm-up too), and the probe pixels' facts."""
    batch = classifier_probe(card)
    probs = np.concatenate([backend.run(batch[i : i + 1]) for i in range(len(batch))])
    return probs, pixel_facts(list(batch[:, 0]))


def run_explainer(explainer: ExplainerBackend, card: Card) -> tuple[np.ndarray, dict[str, Any]]:
    """The explainer's outputs on its probe: its warm-up (full padded batches at the fixed shape) as well."""
    probe = explainer_probe(card)
    probs = explainer.warm_up(card.input.size, probe=probe)
    return probs, pixel_facts([probe.image, probe.fill])


def make_entry(probs: np.ndarray, facts: dict[str, Any], computed_by: str) -> dict[str, Any]:
    """What the card records for one file."""
    if not np.all(np.isfinite(probs)):
        raise CxrError(f"{computed_by} gave non-finite outputs on the known-answer probes; nothing recorded")
    return {
        "probe_set": PROBE_SET,
        "probs": [[round(float(v), DECIMALS) for v in row] for row in probs],
        **facts,
        "computed_by": computed_by,
    }


def check_classifier(backend: Backend, bundle: Bundle, name: str) -> None:
    """Run the probes on a freshly opened classifier and refuse it unless it gives the card's answers for
    ``name`` (a bundle without them: only finite outputs of the right shape, and one warning)."""
    probs, facts = run_classifier(backend, bundle.card)
    judge(backend, bundle, name, probs, facts)


def check_explainer(explainer: ExplainerBackend, bundle: Bundle, name: str) -> None:
    """``check_classifier`` for an explainer; the probe is its warm-up, so the check costs no extra call."""
    probs, facts = run_explainer(explainer, bundle.card)
    judge(explainer, bundle, name, probs, facts)


def judge(
    opened: Backend | ExplainerBackend, bundle: Bundle, name: str, probs: np.ndarray, facts: dict[str, Any]
) -> None:
    """Refuse, in one line naming backend, precision, file and the largest difference, outputs that are not
    the card's answers for ``name`` within the formats table's tolerance."""
    what = f"{opened.name} {opened.precision} {name}" + (" on cuda" if opened.device == "cuda" else "")
    classes = len(bundle.card.classes)
    entry = bundle.card.known_answers.get(name)
    if entry is None:
        warn_unrecorded(bundle)
        if probs.ndim != 2 or probs.shape[1] != classes or not np.all(np.isfinite(probs)):
            raise CxrError(f"{what}: the probes gave {_shape(probs)}, expected finite rows of {classes}")
        return
    expected = recorded_probs(entry, name, len(probs), classes)
    check_pixels(entry, facts, name)
    if probs.shape != expected.shape:
        raise CxrError(f"{what}: the probes gave {_shape(probs)}, the card recorded {_shape(expected)}")
    tolerance = get_format(opened.precision).known_answers.tolerance(runs_engine(opened), opened.device)
    if not np.all(np.isfinite(probs)):
        raise CxrError(
            f"{what}: known answers differ: NaN or Inf where finite outputs were recorded; the graph or the "
            "backend is broken; refused"
        )
    worst = float(np.abs(probs - expected).max())
    if worst > tolerance:
        raise CxrError(
            f"{what}: known answers differ by {worst:.2g} (tolerance {tolerance:g}): the graph or the "
            "backend changed since export; refused"
        )


def _shape(probs: np.ndarray) -> str:
    finite = "finite" if np.all(np.isfinite(probs)) else "non-finite"
    return f"{' x '.join(str(n) for n in probs.shape)} {finite} values"


def recorded_probs(entry: Any, name: str, rows: int, classes: int) -> np.ndarray:
    """The card's answers for ``name`` as an array; an entry this runtime cannot read refuses the bundle."""
    if not isinstance(entry, dict):
        raise BundleRefused(f"card.json known_answers[{name!r}] is not an object; refused")
    version = entry.get("probe_set")
    if type(version) is not int or version != PROBE_SET:
        raise BundleRefused(
            f"card.json known_answers[{name!r}] used probe set {str(version)[:20]}, this cxr-edge knows "
            f"{PROBE_SET}: use a cxr-edge of that probe set or re-export the bundle; refused"
        )
    try:
        probs = np.array(entry.get("probs"), dtype=np.float64)
    except (TypeError, ValueError):
        probs = np.zeros(0)
    if probs.ndim != 2 or probs.shape != (rows, classes) or not np.all(np.isfinite(probs)):
        raise BundleRefused(
            f"card.json known_answers[{name!r}] holds no {rows} x {classes} finite answers; refused"
        )
    return probs


def check_pixels(entry: dict, facts: dict[str, Any], name: str) -> None:
    """The probe pixels are made by this host's preprocessing: other pixels than at export mean the runtime
    preprocesses differently from the stage that recorded the answers (train/serve skew), whatever the
    backend, so the bundle is refused (a few pixels rounded otherwise by another OpenCV build pass)."""
    if entry.get("pixels_sha256") == facts["pixels_sha256"]:
        return
    for key in ("pixels_mean", "pixels_std"):
        try:
            recorded = np.array(entry.get(key), dtype=np.float64)
            off = float(np.abs(recorded - np.array(facts[key])).max())
        except (TypeError, ValueError):
            raise BundleRefused(f"card.json known_answers[{name!r}] has no readable {key}; refused") from None
        if not off <= PIXEL_TOLERANCE:
            what = "mean" if key == "pixels_mean" else "spread"
            raise BundleRefused(
                f"{name}: the known-answer probe pixels' {what} is {off:.3g} grey levels off export's "
                f"(tolerance {PIXEL_TOLERANCE}): this runtime preprocesses images differently from the stage "
                "that exported the graph; refused"
            )


_warned: set[str] = set()


def warn_unrecorded(bundle: Bundle) -> None:
    """One warning per bundle per process: files without known answers are only checked for finite outputs."""
    key = str(bundle.folder.resolve())
    if key in _warned:
        return
    _warned.add(key)
    missing = [n for n in bundle.card.files if _answerable(n) and n not in bundle.card.known_answers]
    if bundle.card.known_answers:
        log.warning(
            "no known answers for %s in this bundle (written before they existed): re-export to add them",
            ", ".join(missing),
        )
    else:
        log.warning("no known answers in this bundle (exported before they existed): re-export to add them")


def _answerable(name: str) -> bool:
    return name.endswith(".onnx") or name.endswith(".engine")
