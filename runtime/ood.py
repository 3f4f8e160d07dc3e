"""Is this a chest film? An out-of-distribution score fitted on the training films, computed with numpy.

The exported classifier emits ``features`` beside ``probs``: the spatial mean of every stage's output and
the logits (``cxr.train.ood_features``). The gate is a sum of parts, each a distance from the training films
scaled so that the validation films' median is 0 and their interquartile range 1:

- ``mahalanobis:<layer>``: class-conditional Mahalanobis distance on one layer's pooled features (Lee et al.
  2018; on a chest classifier's layers, Calli et al. 2019 "FRODO"), in the layer's top principal components
  with one shared, shrunk (Ledoit-Wolf) covariance, plus the squared distance outside those components;
- ``energy``: minus the log-sum-exp of the logits (Liu et al. 2020);
- ``image``: a Gaussian on cheap statistics of the decoded image (intensity histogram, contrast, edges,
  left-right symmetry, shape, colour), which needs no network.

Which parts are used is chosen by measurement (``cxr-bench ood``); the threshold is the validation films'
``keep`` quantile of the score (95 %: one real film in 20 is flagged). Everything the runtime needs is one
``ood.npz`` in the bundle (hashed like every file), read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import cv2
import numpy as np
from cxr.runtime.errors import CxrError, one_line

GATE_FILE = "ood.npz"
GATE_VERSION = 1
STATS_SIDE = 64
STATS_NAMES = tuple(
    [f"hist{i}" for i in range(16)]
    + ["mean", "std", "dark", "bright", "edges", "symmetry", "top_bottom", "border", "aspect", "colour"]
)
MAX_COMPONENTS = 64
RESIDUAL_FLOOR = 1e-6  # of a standardised film's squared norm (one per feature): below it, no residual term
DEFAULT_KEEP = 0.95
ALL_LAYERS = "mahalanobis:all"  # one Mahalanobis part per block of pooled features (every stage and final)
DEFAULT_PARTS = (ALL_LAYERS, "image")  # chosen by measurement: see README, "Is this a chest film?"


def image_stats(gray: np.ndarray, colour: bool = False) -> np.ndarray:
    """Cheap statistics of a decoded film (any size, uint8): what a chest radiograph's picture looks like
    before any network sees it. Photographs, pages and other anatomy differ in several of them."""
    height, width = gray.shape[:2]
    step = max(1, min(height, width) // (4 * STATS_SIDE))  # a 3000 px film is thinned first: 0.1 ms, not 5
    thinned = gray[::step, ::step]
    small = cv2.resize(thinned, (STATS_SIDE, STATS_SIDE), interpolation=cv2.INTER_AREA)
    small = small.astype(np.float32) / 255
    hist = np.bincount(np.minimum((small * 16).astype(np.int64).ravel(), 15), minlength=16) / small.size
    dx, dy = np.diff(small, axis=1), np.diff(small, axis=0)
    edges = float(np.mean(np.abs(dx))) + float(np.mean(np.abs(dy)))
    mirrored = small[:, ::-1]
    symmetry = float(np.corrcoef(small.ravel(), mirrored.ravel())[0, 1]) if small.std() > 0 else 1.0
    half = STATS_SIDE // 2
    top_bottom = float(small[:half].mean() - small[half:].mean())
    band = max(1, STATS_SIDE // 16)
    border = np.concatenate(
        [small[:band].ravel(), small[-band:].ravel(), small[:, :band].ravel(), small[:, -band:].ravel()]
    )
    values = [
        *hist,
        small.mean(),
        small.std(),
        float(np.mean(small < 0.1)),
        float(np.mean(small > 0.9)),
        edges,
        symmetry,
        top_bottom,
        float(border.mean() - small.mean()),
        float(np.log(width / height)),
        float(colour),
    ]
    return np.asarray(values, dtype=np.float64)


@dataclass(frozen=True, kw_only=True)
class GaussianPart:
    """A distance from the training films in one block of features: PCA to ``components``, class means,
    a shared shrunk covariance (``precision``), plus the squared norm of what the components leave out."""

    name: str
    start: int  # the block's slice of the feature vector ("image": of the image statistics)
    stop: int
    mean: np.ndarray
    scale: np.ndarray  # per-feature standard deviation (statistics of unlike units are standardised)
    components: np.ndarray  # k x d
    class_means: np.ndarray  # classes x k
    precision: np.ndarray  # k x k
    residual_scale: float  # median squared residual of the training films (0: no residual term)
    center: float = 0.0
    spread: float = 1.0

    def raw(self, values: np.ndarray) -> np.ndarray:
        x = (values[:, self.start : self.stop] - self.mean) / self.scale
        z = x @ self.components.T
        distances = []
        for centre in self.class_means:
            d = z - centre
            distances.append(np.sum((d @ self.precision) * d, axis=1))  # BLAS: einsum's 3-operand form is not
        score = np.min(np.stack(distances, axis=1), axis=1)
        if self.residual_scale > 0:
            residual = np.sum((x - z @ self.components) ** 2, axis=1)
            score = score + residual / self.residual_scale
        return score

    def score(self, values: np.ndarray) -> np.ndarray:
        return (self.raw(values) - self.center) / self.spread


@dataclass(frozen=True, kw_only=True)
class EnergyPart:
    """Minus the log-sum-exp of the logits (the last ``classes`` features): low for films the network
    knows."""

    start: int
    stop: int
    center: float = 0.0
    spread: float = 1.0
    name: str = "energy"

    def raw(self, values: np.ndarray) -> np.ndarray:
        logits = values[:, self.start : self.stop].astype(np.float64)
        peak = logits.max(axis=1, keepdims=True)
        return -(peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1)))

    def score(self, values: np.ndarray) -> np.ndarray:
        return (self.raw(values) - self.center) / self.spread


@dataclass(frozen=True, kw_only=True)
class Gate:
    """The bundle's out-of-distribution gate: parts on the network's features, an optional part on image
    statistics, and the threshold above which an input is not like the training films."""

    parts: tuple[GaussianPart | EnergyPart, ...]
    image: GaussianPart | None = None
    threshold: float = 0.0
    keep: float = DEFAULT_KEEP
    validation_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    feature_layout: tuple[tuple[str, int, int], ...] = ()  # (name, start, stop) of every feature block
    # each validation film's score per part (columns: part_names), so a gate on fewer parts can be thresholded
    # (a reduced precision reads only the parts its features keep: cxr.runtime.ood_precision); empty in gates
    # fitted before it
    part_scores: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    @property
    def part_names(self) -> list[str]:
        return [p.name for p in self.parts] + (["image"] if self.image is not None else [])

    @property
    def method(self) -> str:
        return " + ".join(self.part_names)

    def scores(self, features: np.ndarray | None, stats: np.ndarray | None) -> np.ndarray:
        """The score of each input (higher = less like the training films)."""
        return self.part_scores_of(features, stats).sum(axis=1)

    def part_scores_of(self, features: np.ndarray | None, stats: np.ndarray | None) -> np.ndarray:
        """Each input's score per part (columns: ``part_names``); ``scores`` is their sum."""
        columns = []
        if self.parts:
            if features is None:
                raise CxrError("the out-of-distribution gate needs the graph's features output")
            values = np.asarray(features, np.float64)
            columns += [part.score(values) for part in self.parts]
        if self.image is not None:
            if stats is None:
                raise CxrError("the out-of-distribution gate needs each image's statistics")
            columns.append(self.image.score(np.atleast_2d(np.asarray(stats, np.float64))))
        return np.stack(columns, axis=1)

    def with_keep(self, keep: float) -> Gate:
        """The same gate with the threshold that lets ``keep`` of the validation films pass."""
        return _replace(self, keep=keep, threshold=threshold_for(self.validation_scores, keep))

    def only(self, names: list[str]) -> Gate:
        """The gate on the named parts alone, thresholded anew on the validation films at the same keep
        rate."""
        columns = self.part_names
        unknown = [name for name in names if name not in columns]
        if unknown or not names:
            raise CxrError(
                f"the gate has no part {unknown[0] if unknown else '(none named)'!r} (its parts: {columns})"
            )
        if self.part_scores.shape != (len(self.validation_scores), len(columns)):
            raise CxrError("the gate keeps no per-part validation scores (fitted before them): refit it")
        kept = [i for i, name in enumerate(columns) if name in names]
        part_scores = self.part_scores[:, kept]
        return _replace(
            self,
            parts=tuple(p for p in self.parts if p.name in names),
            image=self.image if "image" in names else None,
            part_scores=part_scores,
            validation_scores=part_scores.sum(axis=1),
        ).with_keep(self.keep)

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "validation_scores": self.validation_scores,
            "part_scores": self.part_scores,
        }
        meta = {
            "version": GATE_VERSION,
            "threshold": self.threshold,
            "keep": self.keep,
            "method": self.method,
            "feature_layout": [list(block) for block in self.feature_layout],
            "parts": [_part_meta(part, arrays, f"part{i}") for i, part in enumerate(self.parts)],
            "image": _part_meta(self.image, arrays, "image") if self.image is not None else None,
        }
        arrays["meta"] = np.array(json.dumps(meta))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, name: str = GATE_FILE) -> Gate:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as stored:
                arrays = {key: stored[key] for key in stored.files}
            meta = json.loads(str(arrays.pop("meta")))
            if meta.get("version") != GATE_VERSION:
                raise ValueError(f"gate version {meta.get('version')!r}, this runtime reads {GATE_VERSION}")
            parts = tuple(_part_from(item, arrays) for item in meta["parts"])
            image = _part_from(meta["image"], arrays) if meta.get("image") else None
            return cls(
                parts=parts,
                image=image,
                threshold=float(meta["threshold"]),
                keep=float(meta["keep"]),
                validation_scores=arrays["validation_scores"],
                feature_layout=tuple((str(n), int(a), int(b)) for n, a, b in meta["feature_layout"]),
                part_scores=arrays.get("part_scores", np.zeros((0, 0))),
            )
        except Exception as exc:  # bytes from a bundle: whatever numpy or zipfile raise means "unreadable"
            cause = one_line(exc, 120)
            raise CxrError(f"{name}: not a readable out-of-distribution gate ({cause})") from None


_said_no_gate: set[str] = set()


def bundle_gate(bundle: object, precision: str | None = None) -> Gate | None:
    """The bundle's gate, read from its verified bytes; None (said once per bundle) when it has none. With a
    ``precision`` whose features move (int8), the gate on the parts that precision was checked to keep, or
    None (said once) when it was never checked (``cxr.runtime.ood_precision``)."""
    import logging

    if not bundle.has(GATE_FILE):
        folder = str(bundle.folder)
        if folder not in _said_no_gate:
            _said_no_gate.add(folder)
            logging.getLogger(__name__).warning(
                f"warning: {folder} has no out-of-distribution gate (exported before gates, or from a run "
                "without one): records carry no ood_score; 'cxr-train gate RUN DATA' fits one, then export"
            )
        return None
    gate = Gate.from_bytes(bundle.verified_bytes(GATE_FILE), f"{bundle.folder}/{GATE_FILE}")
    if precision is None:
        return gate
    from cxr.runtime.ood_precision import gate_for_precision

    return gate_for_precision(gate, bundle, precision)


def _replace(gate: Gate, **changes: object) -> Gate:
    import dataclasses

    return dataclasses.replace(gate, **changes)


def threshold_for(validation_scores: np.ndarray, keep: float) -> float:
    if not 0.5 <= keep < 1:
        raise CxrError(f"the share of real films the gate keeps must be in [0.5, 1), got {keep}")
    if len(validation_scores) == 0:
        raise CxrError("the gate has no validation scores to choose a threshold from")
    return float(np.quantile(validation_scores, keep))


GAUSSIAN_ARRAYS = ("mean", "scale", "components", "class_means", "precision")


def _part_meta(part: GaussianPart | EnergyPart, arrays: dict[str, np.ndarray], key: str) -> dict:
    meta = {
        "kind": "energy" if isinstance(part, EnergyPart) else "gaussian",
        "name": part.name,
        "start": part.start,
        "stop": part.stop,
        "center": part.center,
        "spread": part.spread,
    }
    if isinstance(part, GaussianPart):
        meta["residual_scale"] = part.residual_scale
        for array in GAUSSIAN_ARRAYS:
            arrays[f"{key}.{array}"] = getattr(part, array)
        meta["key"] = key
    return meta


def _part_from(meta: dict, arrays: dict[str, np.ndarray]) -> GaussianPart | EnergyPart:
    common = {k: meta[k] for k in ("name", "start", "stop", "center", "spread")}
    if meta["kind"] == "energy":
        return EnergyPart(**common)
    return GaussianPart(
        **common,
        residual_scale=float(meta["residual_scale"]),
        **{array: arrays[f"{meta['key']}.{array}"] for array in GAUSSIAN_ARRAYS},
    )


# -- fitting (numpy + scikit-learn's shrunk covariance; run at fit time and by the benchmark) --


def fit_gaussian(
    name: str, values: np.ndarray, labels: np.ndarray, start: int, stop: int, residual: bool = True
) -> GaussianPart:
    """A ``GaussianPart`` on columns ``start:stop`` of the training ``values``."""
    from sklearn.covariance import LedoitWolf

    x = values[:, start:stop].astype(np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    x = (x - mean) / scale
    classes = np.unique(labels)
    k = int(max(1, min(MAX_COMPONENTS, x.shape[1], len(x) - len(classes) - 1)))
    _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    components = vt[:k]
    z = x @ components.T
    class_means = np.stack([z[labels == c].mean(axis=0) for c in classes])
    centred = z - class_means[np.searchsorted(classes, labels)]
    precision = np.linalg.pinv(LedoitWolf().fit(centred).covariance_)
    residuals = np.sum((x - z @ components) ** 2, axis=1)
    residual_scale = float(np.median(residuals)) if residual and k < x.shape[1] else 0.0
    if residual_scale <= RESIDUAL_FLOOR * x.shape[1]:
        # the components span the training films (fewer films than components): what is left is rounding,
        # and dividing by it would turn fp16's or another backend's rounding into distance
        residual_scale = 0.0
    return GaussianPart(
        name=name,
        start=start,
        stop=stop,
        mean=mean,
        scale=scale,
        components=components,
        class_means=class_means,
        precision=precision,
        residual_scale=residual_scale,
    )


def calibrated(part: GaussianPart | EnergyPart, validation: np.ndarray) -> GaussianPart | EnergyPart:
    """The part scaled so the validation films' scores have median 0 and interquartile range 1 (parts of
    unlike units add up fairly)."""
    raw = part.raw(validation)
    low, mid, high = np.quantile(raw, [0.25, 0.5, 0.75])
    return _replace(part, center=float(mid), spread=float(max(high - low, 1e-9)))


def expand_parts(parts: tuple[str, ...], feature_layout: tuple[tuple[str, int, int], ...]) -> list[str]:
    """``mahalanobis:all`` is one Mahalanobis part per block of pooled features (all but the logits)."""
    expanded = []
    for spec in parts:
        if spec == ALL_LAYERS:
            expanded += [f"mahalanobis:{name}" for name, _, _ in feature_layout if name != "logits"]
        else:
            expanded.append(spec)
    return expanded


def fit_gate(
    *,
    train_features: np.ndarray | None,
    train_stats: np.ndarray | None,
    train_labels: np.ndarray,
    val_features: np.ndarray | None,
    val_stats: np.ndarray | None,
    feature_layout: tuple[tuple[str, int, int], ...],
    parts: tuple[str, ...],
    keep: float = DEFAULT_KEEP,
) -> Gate:
    """Fit the named parts (``mahalanobis:<layer>`` for a block of ``feature_layout``, ``energy``, ``image``)
    on the training films and set the threshold on the validation films."""
    blocks = {name: (start, stop) for name, start, stop in feature_layout}
    fitted: list[GaussianPart | EnergyPart] = []
    image = None
    for spec in expand_parts(parts, feature_layout):
        if spec == "image":
            stop = train_stats.shape[1]
            image = calibrated(fit_gaussian("image", train_stats, train_labels, 0, stop), val_stats)
        elif spec == "energy":
            start, stop = blocks["logits"]
            fitted.append(calibrated(EnergyPart(start=start, stop=stop), val_features))
        elif spec.startswith("mahalanobis:") and spec.split(":", 1)[1] in blocks:
            start, stop = blocks[spec.split(":", 1)[1]]
            part = fit_gaussian(spec, train_features, train_labels, start, stop)
            fitted.append(calibrated(part, val_features))
        else:
            raise CxrError(f"unknown gate part {spec!r} (known: image, energy, mahalanobis:<layer>)")
    gate = Gate(parts=tuple(fitted), image=image, feature_layout=feature_layout)
    part_scores = gate.part_scores_of(val_features, val_stats)
    return _replace(gate, validation_scores=part_scores.sum(axis=1), part_scores=part_scores).with_keep(keep)
