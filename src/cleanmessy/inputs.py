"""The tf.data input pipeline: a split CSV -> batches of (uint8 image, label index).

Decoding goes through `images.load_for_model`, the same function predict and the app use."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cleanmessy.errors import UserError
from cleanmessy.images import ImageError, load_for_model

_UNREADABLE = "unreadable image"


@dataclass(frozen=True)
class ModelSpec:
    """What the trained model tells apart and takes in, as train hands it to evaluate and plot
    (pipeline/run.json). No MLflow run id: a DVC output must be the same for the same inputs, or
    every fresh `dvc repro` would change dvc.lock."""

    class_names: list[str]
    image_size: int

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path} not found: run `cleanmessy train` (or `dvc repro`) first") from None
        return cls(raw["class_names"], raw["image_size"])


@contextlib.contextmanager
def image_read_errors() -> Iterator[None]:
    """Turn an unreadable image met inside tf.data (where TensorFlow wraps the Python error in
    an OpError with a long trace) into a UserError naming the file."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as exc:
        found = re.search(rf"{_UNREADABLE} (.*?)(?:\n|$)", exc.message)
        if not found:
            raise
        raise UserError(f"{_UNREADABLE} {found.group(1)}; rerun `dvc repro --force ingest` to rebuild "
                        "data/images from the source") from None


def read_split(csv: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(csv, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"{csv} not found: run `cleanmessy split` (or `dvc repro`) first") from None


def label_indices(frame: pd.DataFrame, class_names: list[str]) -> np.ndarray:
    unknown = sorted(set(frame["label"]) - set(class_names))
    if unknown:
        raise UserError(f"label {unknown[0]!r} is not one of the model's classes {class_names}")
    return frame["label"].map({c: i for i, c in enumerate(class_names)}).to_numpy(np.int32)


def make_dataset(frame: pd.DataFrame, root: Path, class_names: list[str], image_size: int,
                 batch_size: int, shuffle_seed: int | None = None):  # -> tf.data.Dataset
    """Decode, resize, cache, (shuffle,) batch, prefetch. Decoded images are cached in memory, so
    epochs after the first read no file."""
    import tensorflow as tf  # here, not at the top: plot reads splits too and needs no TensorFlow

    files = [str(root / p) for p in frame["path"]]
    labels = label_indices(frame, class_names)

    def load(path: bytes) -> np.ndarray:
        try:
            return load_for_model(Path(path.decode()), image_size)
        except (ImageError, OSError) as exc:
            raise ValueError(f"{_UNREADABLE} {path.decode()}: {exc}") from None

    def decode(path, label):
        image = tf.numpy_function(load, [path], tf.uint8, stateful=False)
        return tf.ensure_shape(image, (image_size, image_size, 3)), label

    ds = tf.data.Dataset.from_tensor_slices((files, labels))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
