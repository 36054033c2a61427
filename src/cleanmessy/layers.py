"""Custom layers for multi-view models: each photo (and, with `flip`, its mirror image) goes
through the backbone once; square regions of the backbone's last feature map are pooled as extra
views, and the head averages the views' features. Built into the model, so training, evaluation and
serving all see the same views (test-time augmentation nobody can forget).

A region of the feature map stands in for a crop of the photo at no extra backbone pass: on the
192 real photos, 20 pooled regions of 2 passes scored higher than 28 crops through the backbone
(README, "Results", bench/views_probe.py).

Loading a saved model needs them: `inference.load_model_file` (which the registered model uses too)
pass CUSTOM_OBJECTS explicitly."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf


def view_boxes(regions: list[tuple[float, int]]) -> list[list[float]]:
    """Normalised `[y1, x1, y2, x2]` boxes: the whole image first, then for each `(side, grid)`
    a grid x grid of square boxes of that side fraction, evenly spaced from corner to corner (one
    box: the centre)."""
    boxes = [[0.0, 0.0, 1.0, 1.0]]
    for side, grid in regions:
        starts = [(1 - side) / 2] if grid == 1 else [i * (1 - side) / (grid - 1) for i in range(grid)]
        boxes += [[top, left, top + side, left + side] for top in starts for left in starts]
    return boxes


def _cells(start: float, stop: float, n: int) -> range:
    """The cells of an n-cell axis that a normalised [start, stop) covers (at least one)."""
    first = min(math.floor(start * n + 0.5), n - 1)
    return range(first, max(math.floor(stop * n + 0.5), first + 1))


def region_weights(boxes: list[list[float]], height: int, width: int) -> np.ndarray:
    """(regions, height * width): row r averages the feature-map cells that box r covers."""
    weights = np.zeros((len(boxes), height, width), np.float32)
    for r, (y1, x1, y2, x2) in enumerate(boxes):
        rows, cols = _cells(y1, y2, height), _cells(x1, x2, width)
        weights[r, rows.start:rows.stop, cols.start:cols.stop] = 1.0 / (len(rows) * len(cols))
    return weights.reshape(len(boxes), -1)


@keras.saving.register_keras_serializable(package="cleanmessy")
class MultiView(keras.layers.Layer):
    """(batch, h, w, c) -> (passes * batch, size, size, c), pass-major: the first `batch` rows are
    the photos resized to `size` (so Grad-CAM can take the map of the whole photo), then, with
    `flip`, their mirror images."""

    def __init__(self, size: int, flip: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size, self.flip = int(size), bool(flip)

    @property
    def n_passes(self) -> int:
        """Backbone passes per photo."""
        return 2 if self.flip else 1

    def call(self, images):
        views = tf.cast(images, tf.float32)
        if tuple(images.shape[1:3]) != (self.size, self.size):
            views = tf.image.resize(views, (self.size, self.size))
        if self.flip:
            views = tf.concat([views, tf.reverse(views, axis=[2])], axis=0)
        return views

    def compute_output_shape(self, input_shape):
        return (None, self.size, self.size, input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "size": self.size, "flip": self.flip}


@keras.saving.register_keras_serializable(package="cleanmessy")
class RegionPool(keras.layers.Layer):
    """(n, h, w, c) feature maps -> (n, regions, c): the average over each box's cells (box 0, the
    whole map, is global average pooling). One matrix product, so gradients reach every cell."""

    def __init__(self, boxes: list[list[float]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.boxes = [list(map(float, b)) for b in boxes]

    def call(self, maps):
        height, width, channels = maps.shape[1:]
        weights = tf.constant(region_weights(self.boxes, height, width), maps.dtype)
        cells = tf.reshape(maps, (-1, height * width, channels))
        return tf.einsum("rk,nkc->nrc", weights, cells)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], len(self.boxes), input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "boxes": self.boxes}


@keras.saving.register_keras_serializable(package="cleanmessy")
class ViewStack(keras.layers.Layer):
    """(passes * batch, regions, d), pass-major -> (batch, passes * regions, d): each photo's view
    features, one row per view (pass 0's regions first, so row 0 is the whole photo)."""

    def __init__(self, n_passes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_passes = int(n_passes)

    def call(self, features):
        regions, depth = features.shape[1], features.shape[2]
        stacked = tf.reshape(features, (self.n_passes, -1, regions, depth))
        return tf.reshape(tf.transpose(stacked, (1, 0, 2, 3)), (-1, self.n_passes * regions, depth))

    def compute_output_shape(self, input_shape):
        return (None, self.n_passes * input_shape[1], input_shape[2])

    def get_config(self) -> dict:
        return {**super().get_config(), "n_passes": self.n_passes}


# The names the layers are saved under (`register_keras_serializable`'s package>class), for loaders.
CUSTOM_OBJECTS = {f"cleanmessy>{layer.__name__}": layer for layer in (MultiView, RegionPool, ViewStack)}
