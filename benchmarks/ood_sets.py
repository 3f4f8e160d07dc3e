"""Images that are not chest films, assembled from what ships with installed packages, as bare PNGs.

Kinds (each a folder of PNGs, no headers: the gate judges pixels only):
- ``photo``: scikit-image and matplotlib photographs (people, animals, objects, the sky, a fundus photo);
- ``document``: pages of text, logos, charts, binary shapes;
- ``texture``: brick, grass, gravel, microscopy;
- ``ct_mr_us``: pydicom's own CT, MR, ultrasound and dose frames, rendered by the runtime's reader;
- ``other_anatomy``: radiograph-like phantoms of a limb, a hand, a skull and a pelvis (bone in soft tissue);
- ``rotated_chest``: the in-distribution films turned 90 or 180 degrees (a film loaded the wrong way).
Each source also gives a few crops and turns, so a kind holds tens of images. Deterministic for a seed.
"""

from __future__ import annotations

import gzip
import hashlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np

KINDS = ("photo", "document", "texture", "ct_mr_us", "other_anatomy")
EXTRA_KINDS = ("rotated_chest",)


def _gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        low, high = float(image.min()), float(image.max())
        image = ((image - low) * (255.0 / max(high - low, 1e-9))).astype(np.uint8)
    return image  # colour stays colour: the runtime converts it (and its gate counts colour)


def _skimage(names: tuple[str, ...]) -> Iterator[tuple[str, np.ndarray]]:
    import skimage.data as data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            image = getattr(data, name)()
            yield name, _gray(image[0] if isinstance(image, tuple) else image)


def _matplotlib(names: tuple[str, ...]) -> Iterator[tuple[str, np.ndarray]]:
    import matplotlib.cbook as cbook

    for name in names:
        raw = Path(cbook.get_sample_data(name, asfileobj=False)).read_bytes()
        if name.endswith(".gz"):  # s1045.ima: a 256 x 256 big-endian uint16 MR slice
            image = np.frombuffer(gzip.decompress(raw), dtype=">u2").reshape(256, 256).astype(np.float32)
            yield name, _gray(image)
        elif name.endswith(".npz"):
            with np.load(__import__("io").BytesIO(raw)) as arrays:
                yield name, _gray(arrays[arrays.files[0]].astype(np.float32))
        else:
            decoded = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
            yield name, _gray(decoded)


def _pydicom_frames() -> Iterator[tuple[str, np.ndarray]]:
    """pydicom's local test files whose modality is not a radiograph, read by the runtime's own reader."""
    import pydicom
    from cxr.runtime.errors import CxrError
    from cxr.runtime.preprocess import read_image

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    for path in sorted(folder.glob("*.dcm")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                modality = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).get("Modality", ""))
            if modality in ("CR", "DX") or not modality:
                continue
            yield f"{modality}_{path.stem}", read_image(path)
        except (CxrError, Exception):  # test files include broken ones on purpose
            continue


def _anatomy(kind: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A radiograph-like phantom of another body part: soft tissue, bones brighter, noise, blur."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.full((height, width), 15.0, np.float32)

    def rod(y0: float, x0: float, y1: float, x1: float, radius: float, value: float) -> None:
        cv2.line(image, (int(x0), int(y0)), (int(x1), int(y1)), value, int(radius))

    if kind == "limb":
        image[:, int(0.3 * width) : int(0.7 * width)] = 110
        rod(0, 0.45 * width, height, 0.47 * width, 0.12 * width, 210)
        rod(0, 0.57 * width, height, 0.55 * width, 0.07 * width, 200)
    elif kind == "hand":
        cv2.ellipse(image, (width // 2, int(0.75 * height)), (width // 4, height // 5), 0, 0, 360, 110, -1)
        for finger in range(5):
            x = (0.25 + 0.125 * finger) * width
            rod(
                0.6 * height,
                x,
                (0.15 + 0.05 * abs(finger - 2)) * height,
                x + rng.uniform(-8, 8),
                0.05 * width,
                200,
            )
    elif kind == "skull":
        cv2.ellipse(
            image, (width // 2, height // 2), (int(0.4 * width), int(0.45 * height)), 0, 0, 360, 200, -1
        )
        cv2.ellipse(
            image, (width // 2, height // 2), (int(0.36 * width), int(0.41 * height)), 0, 0, 360, 90, -1
        )
    else:  # pelvis
        image[int(0.1 * height) :, :] = 100
        for side in (-1, 1):
            centre = (int(width / 2 + side * 0.22 * width), int(0.4 * height))
            cv2.ellipse(image, centre, (int(0.18 * width), int(0.25 * height)), side * 20, 0, 360, 190, -1)
            cv2.circle(
                image, (int(width / 2 + side * 0.3 * width), int(0.75 * height)), int(0.07 * width), 210, -1
            )
        rod(0.25 * height, width / 2, 0.6 * height, width / 2, 0.08 * width, 200)
    image += 12 * np.sin(xx / 7.0 + rng.uniform(0, 6)) * np.cos(yy / 11.0)
    image = cv2.GaussianBlur(image, (0, 0), 2.0) + rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _variants(image: np.ndarray, rng: np.random.Generator, count: int) -> Iterator[np.ndarray]:
    """The image, then random crops (60-90 % of each side) and quarter turns of it."""
    yield image
    height, width = image.shape[:2]
    for _ in range(count - 1):
        h, w = int(height * rng.uniform(0.6, 0.9)), int(width * rng.uniform(0.6, 0.9))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        yield np.ascontiguousarray(np.rot90(image[top : top + h, left : left + w], int(rng.integers(0, 4))))


SOURCES: dict[str, Callable[[], Iterator[tuple[str, np.ndarray]]]] = {
    "photo": lambda: _chain(
        _skimage(
            (
                "astronaut",
                "cat",
                "coffee",
                "rocket",
                "stereo_motorcycle",
                "hubble_deep_field",
                "camera",
                "clock",
                "coins",
                "moon",
                "retina",
            )
        ),
        _matplotlib(("grace_hopper.jpg",)),
    ),
    "document": lambda: _chain(
        _skimage(("page", "text", "logo", "colorwheel", "checkerboard", "binary_blobs", "horse")),
        _matplotlib(("logo2.png", "Minduka_Present_Blue_Pack.png")),
    ),
    "texture": lambda: _chain(
        _skimage(("brick", "grass", "gravel", "cell", "immunohistochemistry", "microaneurysms")),
        _matplotlib(("jacksboro_fault_dem.npz", "topobathy.npz")),
    ),
    "ct_mr_us": lambda: _chain(_pydicom_frames(), _matplotlib(("s1045.ima.gz",))),
}


def _chain(*parts: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    for part in parts:
        yield from part


def write_ood_sets(root: Path, seed: int = 0, variants: int = 3, anatomy: int = 24) -> dict[str, list[Path]]:
    """Write every kind's PNGs under ``root/<kind>/``; returns the paths per kind."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for kind, source in SOURCES.items():
        folder = Path(root) / kind
        folder.mkdir(parents=True, exist_ok=True)
        written[kind], seen = [], set()
        for name, image in source():
            digest = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
            if digest in seen:  # pydicom ships one MR slice in eight encodings: count it once
                continue
            seen.add(digest)
            for index, variant in enumerate(_variants(image, rng, variants)):
                path = folder / f"{Path(name).stem}_{index}.png"
                cv2.imwrite(
                    str(path), variant if variant.ndim == 2 else cv2.cvtColor(variant, cv2.COLOR_RGB2BGR)
                )
                written[kind].append(path)
    folder = Path(root) / "other_anatomy"
    folder.mkdir(parents=True, exist_ok=True)
    written["other_anatomy"] = []
    for index in range(anatomy):
        part = ("limb", "hand", "skull", "pelvis")[index % 4]
        height, width = int(rng.integers(700, 1100)), int(rng.integers(500, 900))
        path = folder / f"{part}_{index:03d}.png"
        cv2.imwrite(str(path), _anatomy(part, rng, height, width))
        written["other_anatomy"].append(path)
    return written


def write_rotated(films: list[Path], root: Path, seed: int = 0) -> list[Path]:
    """In-distribution films turned by 90, 180 or 270 degrees (a film loaded the wrong way round)."""
    from cxr.runtime.preprocess import read_image

    rng = np.random.default_rng(seed)
    folder = Path(root) / "rotated_chest"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, film in enumerate(films):
        path = folder / f"rotated_{index:04d}.png"
        cv2.imwrite(str(path), np.ascontiguousarray(np.rot90(read_image(film), int(rng.integers(1, 4)))))
        paths.append(path)
    return paths
