"""The heat map overlay (serving/explain.py): what the app shows beside the label."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cleanmessy.serving.explain import OVERLAY_MAX_SIDE, overlay


def test_a_small_photos_overlay_has_its_size_and_blends_the_jet_colours():
    photo = Image.new("RGB", (40, 30), (200, 100, 50))
    cam = np.zeros((4, 4))
    cam[0, 0] = 1.0
    out = overlay(photo, cam)
    assert out.size == (40, 30) and out.mode == "RGB"
    pixels = np.asarray(out).astype(int)
    # jet(0) is dark blue: a zero heat keeps 55 % of the photo and adds 45 % of (0, 0, 0.5)
    assert np.abs(pixels[-1, -1] - np.array([200 * 0.55, 100 * 0.55, 50 * 0.55 + 255 * 0.45 * 0.5])).max() <= 1.5
    assert not np.array_equal(pixels[0, 0], pixels[-1, -1])  # the hot corner differs


def test_the_overlay_of_a_large_photo_is_bounded_and_keeps_its_shape():
    """A 40 MP photo's overlay at full size took over a gigabyte; the app shows it in a 320 px
    panel. Larger photos are blended at most OVERLAY_MAX_SIDE px on a side, aspect kept."""
    cam = np.random.default_rng(0).random((7, 7))
    assert overlay(Image.new("RGB", (8000, 5000)), cam).size == (OVERLAY_MAX_SIDE, 640)
    assert overlay(Image.new("RGB", (3000, 4000)), cam).size == (768, OVERLAY_MAX_SIDE)
    assert overlay(Image.new("RGB", (OVERLAY_MAX_SIDE, 10)), cam).size == (OVERLAY_MAX_SIDE, 10)
