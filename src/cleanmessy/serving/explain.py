"""Grad-CAM: which regions of a photo drove a class score (Selvaraju et al., 2017).

The heat map is the ReLU of the last convolutional feature maps, weighted by the mean gradient of
the class score over each map, scaled to [0, 1] and resized to the photo. A multi-view model's
convolution sees the photo and its mirror; the map shown is the photo's."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from matplotlib import colormaps
from PIL import Image


def last_conv_layer(model: keras.Model) -> keras.layers.Layer:
    """The last layer with a spatial (4-D) output before the classifier head."""
    for layer in reversed(model.layers):
        shape = getattr(layer, "output", None) is not None and layer.output.shape
        if shape and len(shape) == 4 and not isinstance(layer, keras.layers.InputLayer):
            return layer
    raise ValueError(f"model {model.name} has no convolutional layer to explain")


def gradcam_function(model: keras.Model, image_size: int):
    """A compiled `f(batch uint8, class_index) -> (probabilities, heat maps in [0, 1])`."""
    conv = last_conv_layer(model)
    grad_model = keras.Model(model.inputs, [conv.output, model.outputs[0]])

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8),
                                  tf.TensorSpec([], tf.int32)])
    def explain(images: tf.Tensor, class_index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            features, probs = grad_model(images, training=False)
            score = tf.gather(probs, class_index, axis=1)
        grads = tape.gradient(score, features)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
        cam = cam[: tf.shape(images)[0]]  # passes are stacked pass-major: the photos come first
        cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + 1e-8)
        return probs, cam

    return explain


OVERLAY_MAX_SIDE = 1024  # px: the app shows the heat map in a 320 px panel


def overlay(photo: Image.Image, cam: np.ndarray, alpha: float = 0.45,
            max_side: int = OVERLAY_MAX_SIDE) -> Image.Image:
    """The heat map (jet colours) blended over the photo, at the photo's size or, for a photo
    larger than `max_side`, scaled to fit it (aspect kept): a 40 MP photo's full-size overlay took
    over a gigabyte while the app shows it in a 320 px panel."""
    if max(photo.size) > max_side:
        scale = max_side / max(photo.size)
        photo = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))),
                             Image.Resampling.BILINEAR, reducing_gap=3.0)
    heat = Image.fromarray(np.uint8(np.clip(cam, 0, 1) * 255)).resize(photo.size, Image.Resampling.BILINEAR)
    coloured = _JET[np.asarray(heat)]  # float32 RGB in [0, 1], looked up per 8-bit level
    blended = (1 - alpha) * np.asarray(photo.convert("RGB"), dtype=np.float32) / 255.0 + alpha * coloured
    return Image.fromarray(np.uint8(np.clip(blended, 0, 1) * 255))


_JET = colormaps["jet"](np.arange(256) / 255.0)[:, :3].astype(np.float32)
