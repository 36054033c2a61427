"""Custom layers for multi-view models: a photo seen as several crops (and their mirror images),
each through the backbone, with the views' features averaged. Built into the model, so training,
evaluation and serving all see the same views (test-time augmentation nobody can forget).

Import this module before loading a saved model that uses them (the `cleanmessy` loaders do)."""

from __future__ import annotations

import keras
import tensorflow as tf


def view_boxes(crops: list[tuple[float, int]]) -> list[list[float]]:
    """Normalised `[y1, x1, y2, x2]` boxes: the whole image first, then for each `(side, grid)`
    a grid x grid of square crops of that side fraction, evenly spaced from corner to corner (one
    crop: the centre)."""
    boxes = [[0.0, 0.0, 1.0, 1.0]]
    for side, grid in crops:
        starts = [(1 - side) / 2] if grid == 1 else [i * (1 - side) / (grid - 1) for i in range(grid)]
        boxes += [[top, left, top + side, left + side] for top in starts for left in starts]
    return boxes


@keras.saving.register_keras_serializable(package="cleanmessy")
class MultiView(keras.layers.Layer):
    """(batch, h, w, c) -> (views * batch, size, size, c), view-major: the first `batch` rows are
    the whole images (so Grad-CAM can take the map of the whole photo), then each crop, then, with
    `flip`, all of those mirrored left-right."""

    def __init__(self, boxes: list[list[float]], size: int, flip: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.boxes, self.size, self.flip = [list(map(float, b)) for b in boxes], int(size), bool(flip)

    @property
    def n_views(self) -> int:
        return len(self.boxes) * (2 if self.flip else 1)

    def call(self, images):
        batch = tf.shape(images)[0]
        boxes = tf.constant(self.boxes, tf.float32)
        # view-major: box i for every image, then box i + 1 ...
        all_boxes = tf.reshape(tf.repeat(boxes[:, None, :], batch, axis=1), (-1, 4))
        indices = tf.tile(tf.range(batch), [len(self.boxes)])
        views = tf.image.crop_and_resize(tf.cast(images, tf.float32), all_boxes, indices, (self.size, self.size))
        if self.flip:
            views = tf.concat([views, tf.reverse(views, axis=[2])], axis=0)
        return views

    def compute_output_shape(self, input_shape):
        return (None, self.size, self.size, input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "boxes": self.boxes, "size": self.size, "flip": self.flip}


@keras.saving.register_keras_serializable(package="cleanmessy")
class ViewStack(keras.layers.Layer):
    """(views * batch, d) view-major -> (batch, views, d): each photo's features, one row per view."""

    def __init__(self, n_views: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_views = int(n_views)

    def call(self, features):
        stacked = tf.reshape(features, (self.n_views, -1, tf.shape(features)[-1]))
        return tf.transpose(stacked, (1, 0, 2))

    def compute_output_shape(self, input_shape):
        return (None, self.n_views, input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "n_views": self.n_views}
