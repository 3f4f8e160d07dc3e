"""Shortcut suppression: the body is found, markers leave the picture, and training and runtime agree."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
from cxr.runtime.card import Preprocessing, graph_metadata, metadata_mismatch, read_card
from cxr.runtime.preprocess import load_and_preprocess, preprocess, preprocess_with_mask, read_image
from cxr.runtime.suppress import body_mask, thorax_box, view_steps

ON = Preprocessing(thorax_crop=True, clahe=True, border_mask=0.05)


def _film(height: int = 300, width: int = 400) -> np.ndarray:
    """A dark frame, a bright body ellipse left of centre, and a bright 'R' marker block in the top-right
    corner."""
    film = np.full((height, width), 15, np.uint8)
    cv2.ellipse(film, (150, 160), (110, 130), 0, 0, 360, 170, -1)
    cv2.ellipse(film, (110, 150), (35, 80), 0, 0, 360, 60, -1)  # a dark lung inside the body
    film[10:40, 350:385] = 250
    return film


def test_body_is_found_and_the_corner_marker_is_left_out():
    film = _film()
    mask = body_mask(film)
    assert mask is not None and mask[160, 150] and mask[150, 110]  # the lung is inside the hull
    assert not mask[25, 365] and not mask[5, 5]
    top, bottom, left, right = thorax_box(film)
    assert left < 45 and right < 300 and top < 35 and bottom > 285  # body plus margin, the marker outside
    assert not (top <= 25 < bottom and left <= 365 < right)


def test_a_film_with_no_body_is_kept_whole():
    assert thorax_box(np.full((200, 200), 90, np.uint8)) is None
    flat = np.full((200, 200), 90, np.uint8)
    assert np.array_equal(preprocess(flat, 64, Preprocessing(thorax_crop=True)), preprocess(flat, 64))


def test_border_band_blanks_only_the_edges():
    view = np.full((64, 64), 200, np.uint8)
    masked = view_steps(view, ON)
    assert (masked[:3] == 0).all() and (masked[:, -3:] == 0).all() and (masked[3:-3, 3:-3] == 200).all()
    assert view_steps(view, Preprocessing()) is view


def test_mask_follows_the_image_geometry():
    film = _film()
    body = np.zeros(film.shape, bool)
    body[film > 100] = True
    view, mask = preprocess_with_mask(film, body, 96, Preprocessing(thorax_crop=True))
    assert mask.shape == view.shape == (96, 96)
    assert np.mean(view[mask] > 100) > 0.9  # bright body pixels land where the mask says


def test_training_and_runtime_make_the_same_pixels(phantoms):
    from cxr.train.augment import evaluation_view
    from cxr.train.data import load_images, scan_image_folder

    _, samples = scan_image_folder(phantoms)
    samples = samples[:6]
    loaded = load_images(samples, 64, pre=ON)
    for sample, image in zip(loaded.samples, loaded.images):
        assert np.array_equal(evaluation_view(image, 64, ON), load_and_preprocess(sample.path, 64, pre=ON))
    plain = load_and_preprocess(samples[0].path, 64)
    assert not np.array_equal(plain, load_and_preprocess(samples[0].path, 64, pre=ON))


def test_card_records_suppression_and_old_graphs_still_match(bundle):
    card = read_card(bundle)
    assert card.preprocessing.thorax_crop and card.preprocessing.clahe  # the recipe's defaults were trained
    old_card = card.replace(
        preprocessing=Preprocessing(mean=card.preprocessing.mean, std=card.preprocessing.std)
    )
    old_graph = graph_metadata(old_card)
    legacy = {
        k: v
        for k, v in json.loads(old_graph["cxr.preprocessing"]).items()
        if k not in ("thorax_crop", "clahe", "border_mask")
    }
    old_graph["cxr.preprocessing"] = json.dumps(legacy)  # a graph exported before these keys existed
    assert metadata_mismatch(old_card, old_graph) is None
    assert "preprocessing" in metadata_mismatch(card, old_graph)  # a card turning a step on is not that graph


@pytest.mark.parametrize("field", ["thorax_crop", "clahe"])
def test_each_step_can_be_switched_off(field, phantoms):
    path = sorted(phantoms.rglob("*.png"))[0]
    gray = read_image(path)
    off = dataclasses.replace(ON, **{field: False})
    assert not np.array_equal(preprocess(gray, 64, ON), preprocess(gray, 64, off))
