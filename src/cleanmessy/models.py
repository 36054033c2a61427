"""Model architectures. Every model takes raw uint8 RGB at `base.image_size` and does its own
rescaling and augmentation, so the saved model is all a server needs: no preprocessing to copy."""

from __future__ import annotations

import keras
from keras import layers

from cleanmessy.params import AugmentParams, TrainParams


def augmentation(p: AugmentParams, seed: int) -> list[layers.Layer]:
    """Random flip + rotation, as in the seed notebook; active only while training."""
    out: list[layers.Layer] = []
    if p.flip != "none":
        out.append(layers.RandomFlip(p.flip, seed=seed, name="flip"))
    if p.rotation > 0:
        out.append(layers.RandomRotation(p.rotation, seed=seed, name="rotation"))
    return out


def seed_cnn(n_classes: int, image_size: int, p: TrainParams, seed: int) -> keras.Model:
    """The original notebook's network: Conv2D+MaxPool blocks, Flatten, Dense, softmax."""
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)
    for layer in augmentation(p.augment, seed):
        x = layer(x)
    for i, filters in enumerate(p.filters):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{i}")(x)
        x = layers.MaxPooling2D(name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(p.dense_units, activation="relu", name="dense")(x)
    if p.dropout > 0:
        x = layers.Dropout(p.dropout, seed=seed, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="seed_cnn")


ARCHITECTURES = {"seed_cnn": seed_cnn}


def build_model(n_classes: int, image_size: int, p: TrainParams, seed: int) -> keras.Model:
    """The architecture `train.arch` names, compiled with Adam and sparse cross-entropy."""
    keras.utils.set_random_seed(seed)
    model = ARCHITECTURES[p.arch](n_classes, image_size, p, seed)
    model.compile(
        optimizer=keras.optimizers.Adam(p.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
