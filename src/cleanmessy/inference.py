"""Loading a trained Keras model file and running it, for evaluate, cv, the registered model
(pyfunc.PhotoClassifier) and so every server: one loader (custom layers passed explicitly, one
error mapping) and one `Predictor` (the compiled forward pass, in steps sized once for the model)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from cleanmessy import interrupts
from cleanmessy.errors import UserError
from cleanmessy.inputs import decode_batches
from cleanmessy.layers import CUSTOM_OBJECTS
from cleanmessy.models import PASSES_PER_STEP, feature_map, photos_per_step

# What Keras raises on a file that is not a loadable model: OSError (missing, not a zip),
# ValueError (a bad config), TypeError (a layer refusing its config).
LOAD_ERRORS = (OSError, TypeError, ValueError)


# Keras warns `Skipping variable loading for optimizer 'adam', because it has 6 variables whereas the
# saved optimizer has 2` when a saved model's optimizer never trained it (a transfer model whose head
# trained apart, on cached features). Loaded models only predict here, so that warning (and only it)
# is dropped, for the whole process: models also load in the app's follower thread, and
# warnings.catch_warnings is not thread-safe.
warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer", category=UserWarning)


def load_model_file(path: Path) -> keras.Model:
    """The pipeline's model file (pipeline/model.keras)."""
    try:
        return keras.saving.load_model(path, custom_objects=CUSTOM_OBJECTS)
    except LOAD_ERRORS as exc:
        raise UserError(f"cannot load {path}: {exc}; run `cleanmessy train` (or `dvc repro`)") from None


class Predictor:
    """Class probabilities from a model that takes uint8 RGB at `image_size`: one compiled
    forward pass, run in steps of at most `max_photos` photos (fewer for multi-view models, so a
    step holds at most PASSES_PER_STEP backbone passes' activations)."""

    def __init__(self, model: keras.Model, image_size: int, max_photos: int = PASSES_PER_STEP) -> None:
        import tensorflow as tf

        self.model, self.image_size = model, image_size
        self.step = photos_per_step(model, max_photos)
        self._forward = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)],
        )

        self._with_features = None  # traced on first use (evaluate, the servers): probabilities + feature stats

    def _features_function(self):
        """A forward pass that also returns, per photo, the mean and the standard deviation of each
        channel of the model's last convolutional feature map (models.feature_map): what
        `familiarity.embed` takes."""
        if self._with_features is None:
            import tensorflow as tf

            both = keras.Model(self.model.inputs, [self.model.outputs[0], feature_map(self.model)])

            def forward(x):
                probs, maps = both(x, training=False)
                maps = maps[:tf.shape(x)[0]]  # multi-view models: the photos' own pass comes first
                return probs, tf.concat([tf.reduce_mean(maps, axis=[1, 2]), tf.math.reduce_std(maps, axis=[1, 2])], 1)

            self._with_features = tf.function(forward, input_signature=[
                tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.uint8)])
        return self._with_features

    def with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(probabilities, feature statistics)` for a uint8 batch, in the same steps as `__call__`."""
        forward = self._features_function()
        probs, stats = [], []
        with interrupts.deferred():
            for i in range(0, len(batch), self.step):
                interrupts.raise_pending()
                p, f = forward(batch[i:i + self.step])
                probs.append(p.numpy())
                stats.append(f.numpy())
        return self._join(probs, stats)

    def split_with_features(self, frame: pd.DataFrame, root: Path) -> tuple[np.ndarray, np.ndarray]:
        """`(probabilities, feature statistics)` for every image of a split frame, streamed as
        `predict_split`."""
        forward = self._features_function()
        files, probs, stats = [str(root / p) for p in frame["path"]], [], []
        with interrupts.deferred():
            for images in decode_batches(files, self.image_size, self.step):
                interrupts.raise_pending()
                p, f = forward(images)
                probs.append(p.numpy())
                stats.append(f.numpy())
        return self._join(probs, stats)

    def _join(self, probs: list, stats: list) -> tuple[np.ndarray, np.ndarray]:
        if not probs:
            width = int(feature_map(self.model).shape[-1]) * 2
            return np.zeros((0, self.model.output_shape[-1]), np.float32), np.zeros((0, width), np.float32)
        return np.concatenate(probs), np.concatenate(stats)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a uint8 batch (n, size, size, 3)."""
        if not len(batch):
            return np.zeros((0, self.model.output_shape[-1]), np.float32)
        probs = []
        with interrupts.deferred():
            for i in range(0, len(batch), self.step):
                interrupts.raise_pending()
                probs.append(self._forward(batch[i:i + self.step]).numpy())
        return np.concatenate(probs)

    def predict_split(self, frame: pd.DataFrame, root: Path) -> np.ndarray:
        """Probabilities for every image of a split frame (paths relative to `root`), decoded as
        in training and streamed (memory does not grow with the split); an unreadable image is a
        one-line UserError."""
        files, probs = [str(root / p) for p in frame["path"]], []
        with interrupts.deferred():
            for images in decode_batches(files, self.image_size, self.step):
                interrupts.raise_pending()
                probs.append(self._forward(images).numpy())
        return np.concatenate(probs) if probs else np.zeros((0, self.model.output_shape[-1]), np.float32)

    def photos_per_second(self, batch: np.ndarray, rounds: int = 3) -> float:
        """Throughput of the forward pass alone (no decoding) on `batch`, best of `rounds`, after
        a first pass that traces and warms up."""
        self(batch)
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            self(batch)
            best = min(best, time.perf_counter() - started)
        return len(batch) / best
