"""Model architectures. Every model takes raw uint8 RGB at `base.image_size` and does its own
rescaling and augmentation, so the saved model is all a server needs: no preprocessing to copy."""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import keras
from keras import layers

from cleanmessy.layers import MultiView, RegionPool, ViewStack, view_boxes
from cleanmessy.params import AugmentParams, TrainParams

# The layers that training, serving and the benchmarks look up by name: the model's contract.
VIEWS = "views"  # MultiView: the photo (and its mirror) at the backbone's input size
POOL = "pool"  # RegionPool: the first layer after the backbone
VIEW_FEATURES = "view_features"  # ViewStack: (photos, views, features), what the head's training caches
DROPOUT = "dropout"  # optional, before the classifier
PROBABILITIES = "probabilities"  # the softmax classifier


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
        x = layers.Dropout(p.dropout, seed=seed, name=DROPOUT)(x)
    outputs = layers.Dense(n_classes, activation="softmax", name=PROBABILITIES)(x)
    return keras.Model(inputs, outputs, name="seed_cnn")


def _backbone_class(arch: str):
    from keras.applications import MobileNet, MobileNetV2

    return {"mobilenet": MobileNet, "mobilenet_v2": MobileNetV2}[arch]


def transfer(n_classes: int, image_size: int, p: TrainParams, seed: int) -> keras.Model:
    """An ImageNet backbone (MobileNet v1 or v2, width `train.alpha`) under a new softmax head.

    The backbone's own preprocessing (x / 127.5 - 1) is a layer of the model, and the backbone is
    built on the model's tensors (not nested), so every layer, the last convolution included, is
    reachable for Grad-CAM. `backbone_layers` lists its layers. Between preprocessing and backbone,
    `views` resizes each photo to `train.views.size` (and adds its mirror with `flip`); after the
    backbone, `pool` averages the whole feature map and each of `train.views.regions`,
    `view_normalize` (with `normalize`) scales each view's features to unit length,
    `view_features` stacks each photo's views and `view_mean` averages them for the head.
    """
    from cleanmessy.weights import find_local, missing_message

    view_size = p.views.size or image_size
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(inputs)  # mobilenet's preprocess_input
    for layer in augmentation(p.augment, seed):
        x = layer(x)
    multi_view = MultiView(view_size, p.views.flip, name=VIEWS)
    x = multi_view(x)
    weights = None
    if p.weights == "imagenet":
        local = find_local(p.arch, p.alpha, view_size)
        weights = str(local) if local else "imagenet"
    try:
        backbone = _backbone_class(p.arch)(input_tensor=x, input_shape=(view_size, view_size, 3),
                                             include_top=False, alpha=p.alpha, weights=weights)
    except Exception as exc:  # Keras raises plain Exception when a download fails
        if weights == "imagenet" and ("URL" in str(exc) or isinstance(exc, OSError)):
            from cleanmessy.errors import UserError

            raise UserError(missing_message(p.arch, p.alpha, view_size, exc)) from None
        raise
    pooled = RegionPool(view_boxes(p.views.region_grids()), name=POOL)(backbone.output)
    if p.views.normalize:
        pooled = layers.UnitNormalization(name="view_normalize")(pooled)
    per_view = ViewStack(multi_view.n_passes, name=VIEW_FEATURES)(pooled)
    head = layers.GlobalAveragePooling1D(name="view_mean")(per_view)
    if p.dropout > 0:
        head = layers.Dropout(p.dropout, seed=seed, name=DROPOUT)(head)
    outputs = layers.Dense(n_classes, activation="softmax", name=PROBABILITIES)(head)
    model = keras.Model(inputs, outputs, name=f"{p.arch}_{p.alpha:g}")
    for layer in backbone_layers(model):
        layer.trainable = False
    return model


def backbone_layers(model: keras.Model) -> list[layers.Layer]:
    """The backbone's layers: those strictly between `views` (its input) and `pool` (the first
    layer on its output), in Keras's topological order. Defined by the model's structure, so a
    layer added before `views` or after `pool` never becomes part of what fine-tuning unfreezes."""
    names = [layer.name for layer in model.layers]
    return model.layers[names.index(VIEWS) + 1:names.index(POOL)]


def unfreeze_top(model: keras.Model, n_layers: int) -> int:
    """Make the top `n_layers` backbone layers trainable (batch-norm layers stay frozen, so their
    statistics keep their ImageNet values); returns how many layers now train."""
    top = backbone_layers(model)[-n_layers:] if n_layers else []
    count = 0
    for layer in top:
        if not isinstance(layer, layers.BatchNormalization):
            layer.trainable = True
            count += 1
    return count


def compile_model(model: keras.Model, learning_rate: float) -> keras.Model:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


PASSES_PER_STEP = 256  # a forward step holds this many backbone passes' activations at most (peak memory)


def photos_per_step(model: keras.Model, batch_size: int) -> int:
    """Photos per inference step: `batch_size`, or fewer where each photo takes several backbone
    passes (photo + mirror), so that one step holds at most PASSES_PER_STEP of them."""
    n_passes = model.get_layer(VIEWS).n_passes if has_layer(model, VIEWS) else 1
    return max(1, min(batch_size, PASSES_PER_STEP // n_passes))


FLATTEN = "flatten"  # seed_cnn: the last conv block's map goes in


def feature_map(model: keras.Model):
    """The model's last convolutional feature map, which `familiarity` summarises: the backbone's
    output (what `pool` takes) for transfer models, the last conv block's (what `flatten` takes)
    for seed_cnn. For multi-view models its first rows (of the batch's size) are the photos
    themselves (MultiView is pass-major)."""
    return model.get_layer(POOL if has_layer(model, POOL) else FLATTEN).input


def has_layer(model: keras.Model, name: str) -> bool:
    return any(layer.name == name for layer in model.layers)


def is_transfer(p: TrainParams) -> bool:
    return p.arch != "seed_cnn"


def trains_head_on_features(p: TrainParams) -> bool:
    """Whether phase 1 trains only the head, on cached backbone features: a transfer model with no
    augmentation (the frozen backbone then sees each photo once, not once per epoch)."""
    return is_transfer(p) and p.augment.flip == "none" and p.augment.rotation <= 0


def fine_tunes(p: TrainParams) -> bool:
    """Whether training has phase 2 (the top of the backbone trains too)."""
    return is_transfer(p) and p.fine_tune_layers > 0 and p.fine_tune_epochs > 0


ARCHITECTURES = {"seed_cnn": seed_cnn, "mobilenet": transfer, "mobilenet_v2": transfer}


def build_model(n_classes: int, image_size: int, p: TrainParams, seed: int) -> keras.Model:
    """The architecture `train.arch` names, compiled with Adam and sparse cross-entropy."""
    keras.utils.set_random_seed(seed)
    return compile_model(ARCHITECTURES[p.arch](n_classes, image_size, p, seed), p.learning_rate)


def _renumber_shared_objects(config: str) -> str:
    """Keras names objects shared between layers (e.g. one dtype policy) by their memory address;
    number them in order of appearance instead, keeping which ones are the same object."""
    numbers: dict[str, int] = {}

    def renumber(found: re.Match) -> str:
        return f'"shared_object_id": {numbers.setdefault(found.group(1), len(numbers) + 1)}'

    return re.sub(r'"shared_object_id": (\d+)', renumber, config)


def save_model(model: keras.Model, path: Path) -> None:
    """`model.save(path)`, byte-identical for identical weights. Keras stamps the time into the
    archive (metadata.json's date_saved, the zip entries' dates) and memory addresses into its
    config (shared_object_id), which would give the same model a
    new hash on every run: DVC would then see a changed output and dvc.lock would differ after
    every fresh `dvc repro`."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        saved = Path(tmp) / "model.keras"
        model.save(saved)
        stable = Path(tmp) / "stable.keras"
        with zipfile.ZipFile(saved) as src, zipfile.ZipFile(stable, "w") as out:
            for info in sorted(src.infolist(), key=lambda i: i.filename):
                data = src.read(info)
                if info.filename == "metadata.json":
                    meta = json.loads(data)
                    meta.pop("date_saved", None)
                    data = json.dumps(meta, sort_keys=True).encode()
                elif info.filename == "config.json":
                    data = _renumber_shared_objects(data.decode()).encode()
                entry = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
                entry.compress_type, entry.external_attr = info.compress_type, 0o644 << 16
                out.writestr(entry, data)
        os.replace(stable, path)
