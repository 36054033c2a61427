"""The input pipeline: a split CSV -> batches of (uint8 image, label index).

Decoding goes through `images.load_for_model`, the same function predict and the app use, on a
thread per CPU. Memory is bounded by settings, not by the number of photos: training decodes each
image once into a `RowStore` (in memory up to `train.memory_mb`, else a scratch file), shuffles
indices, not images, and single passes stream through `decode_batches`."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from cleanmessy.console import progress
from cleanmessy.errors import UserError
from cleanmessy.images import ImageError, load_for_model
from cleanmessy.parallel import ordered_map, usable_cpus
from cleanmessy.project import scratch_dir

_UNREADABLE = "unreadable image"
DEFAULT_MEMORY_MB = 512  # train.memory_mb's default: decoded images and features held in memory up to this


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


def unreadable(path: str, exc: Exception) -> UserError:
    return UserError(f"{_UNREADABLE} {path}: {exc}; rerun `dvc repro --force ingest` to rebuild data/images "
                     "from the source")


def _decode(path: str, image_size: int) -> np.ndarray:
    try:
        return load_for_model(Path(path), image_size)
    except (ImageError, OSError) as exc:
        raise unreadable(path, exc) from None


def decode_batches(files: Sequence[str], image_size: int, batch_size: int,
                   desc: str = "decoding") -> Iterator[np.ndarray]:
    """`files` decoded by `load_for_model` (the one decode path), in order, `batch_size` at a time,
    on a thread per usable CPU; only a few images are in flight beyond the batch being filled."""
    images = ordered_map(partial(_decode, image_size=image_size), files, usable_cpus(), "decode")
    batch: list[np.ndarray] = []
    for image in progress(images, len(files), desc):
        batch.append(image)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


class RowStore:
    """A fixed number of equal rows (decoded images, feature vectors), written once in order and then
    read by index: in memory while they fit `budget_bytes`, else in an unlinked scratch file read
    with pread, so the process holds only the rows a batch asks for (the OS page cache keeps the
    file's hot part, outside the process's memory)."""

    def __init__(self, n_rows: int, row_shape: tuple[int, ...], dtype: str, budget_bytes: int, scratch: Path) -> None:
        self.n_rows, self.row_shape, self.dtype, self.scratch = n_rows, row_shape, np.dtype(dtype), scratch
        self.row_bytes = int(np.prod(row_shape)) * self.dtype.itemsize
        self.written = 0
        self.in_memory = self.nbytes <= budget_bytes
        if self.in_memory:
            self._array = np.empty((n_rows, *row_shape), self.dtype)
        else:
            try:
                self._file = tempfile.TemporaryFile(dir=scratch)
            except OSError as exc:
                raise UserError(f"cannot create a scratch file in {scratch} for {self.nbytes / 1e6:,.0f} MB of "
                                f"cached data ({exc}); raise train.memory_mb or free the folder") from None

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_bytes

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, self.dtype)
        if self.in_memory:
            self._array[self.written:self.written + len(rows)] = rows
        else:
            data, offset = memoryview(rows.tobytes()), self.written * self.row_bytes
            try:
                while data:  # pwrite may write less than asked (a full disk reports only then)
                    done = os.pwrite(self._file.fileno(), data, offset)
                    data, offset = data[done:], offset + done
            except OSError as exc:
                raise UserError(f"cannot write the cache of decoded data in {self.scratch} ({exc}); free disk "
                                "space there or raise train.memory_mb") from None
        self.written += len(rows)

    def close(self) -> None:
        """Give the memory or the scratch file back. tf.data keeps a dataset's Python functions
        for the life of the process, so a store is not freed when its dataset goes away."""
        if self.in_memory:
            self._array = np.empty((0, *self.row_shape), self.dtype)
        else:
            self._file.close()

    def read(self, indices: np.ndarray) -> np.ndarray:
        """The rows at `indices`, in that order."""
        if self.in_memory:
            return self._array[indices]
        out = np.empty((len(indices), *self.row_shape), self.dtype)
        fd = self._file.fileno()
        for i, index in enumerate(indices):
            out[i] = np.frombuffer(os.pread(fd, self.row_bytes, int(index) * self.row_bytes), self.dtype
                                   ).reshape(self.row_shape)
        return out

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 in one read."""
        if self.in_memory:
            return self._array[start:stop]
        raw = os.pread(self._file.fileno(), (stop - start) * self.row_bytes, start * self.row_bytes)
        return np.frombuffer(raw, self.dtype).reshape(stop - start, *self.row_shape)


def store_dataset(store: RowStore, labels: np.ndarray, batch_size: int, shuffle_seed: int | None = None,
                  repeat: bool = False):  # -> tf.data.Dataset
    """Batches of (rows, labels) from `store`. Only indices are shuffled (8 bytes a row, the whole
    split at once): the same permutation tf.data would draw over the rows themselves."""
    import tensorflow as tf

    rows = tf.data.Dataset.range(store.n_rows)
    if shuffle_seed is not None:
        rows = rows.shuffle(store.n_rows, seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        rows = rows.repeat()
    labels = tf.constant(labels)
    tf_dtype = tf.as_dtype(store.dtype)

    def lookup(indices):
        batch = tf.numpy_function(store.read, [indices], tf_dtype, stateful=False)
        return tf.ensure_shape(batch, (None, *store.row_shape)), tf.gather(labels, indices)

    return rows.batch(batch_size).map(lookup, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def make_dataset(frame: pd.DataFrame, root: Path, class_names: list[str], image_size: int, batch_size: int,
                 shuffle_seed: int | None = None, memory_mb: int = DEFAULT_MEMORY_MB, repeat: bool = False,
                 cleanup: contextlib.ExitStack | None = None):
    """For training (several passes): decode every image once, in parallel, into a RowStore (in
    memory up to `memory_mb`, else a scratch file), then batches of (uint8 image, label index),
    shuffled when a seed is given. The store is closed with `cleanup` (else at exit). Single
    passes (prediction, features) use `decode_batches`."""
    labels = label_indices(frame, class_names)
    store = RowStore(len(frame), (image_size, image_size, 3), "uint8", memory_mb << 20, scratch_dir(root))
    if cleanup is not None:
        cleanup.callback(store.close)
    for batch in decode_batches([str(root / p) for p in frame["path"]], image_size, 256, "decoding images"):
        store.append(batch)
    return store_dataset(store, labels, batch_size, shuffle_seed, repeat)
