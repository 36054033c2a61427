"""models: the Keras network takes raw uint8 RGB, rescales and augments itself, and is seeded.
Tiny sizes (32 px, few filters) keep TensorFlow quick."""

import dataclasses

import keras
import numpy as np
import pytest

from cleanmessy.models import build_model
from cleanmessy.params import AugmentParams, TrainParams

SIZE = 32
SMALL = TrainParams(filters=[4, 8], dense_units=8)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def layer_names(model: keras.Model) -> list[str]:
    return [layer.name for layer in model.layers]


def test_input_is_raw_uint8_rgb():
    """The model's input is uint8 (None, 32, 32, 3): callers pass pixels, not floats."""
    model = build_model(2, SIZE, SMALL, seed=0)
    (inp,) = model.inputs
    assert inp.dtype == "uint8"
    assert tuple(inp.shape) == (None, SIZE, SIZE, 3)


def test_output_is_a_probability_per_class():
    """Output shape (None, n_classes), non-negative rows summing to 1."""
    model = build_model(2, SIZE, SMALL, seed=0)
    assert tuple(model.outputs[0].shape) == (None, 2)
    probs = model.predict(images(4), verbose=0)
    assert probs.shape == (4, 2)
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_three_classes():
    """n_classes sets the width of the softmax."""
    model = build_model(3, SIZE, SMALL, seed=0)
    assert model.predict(images(2), verbose=0).shape == (2, 3)


def test_default_layers_present():
    """Default TrainParams give rescale, flip, rotation, two conv/pool blocks, dense, softmax."""
    model = build_model(2, SIZE, TrainParams(), seed=0)
    names = layer_names(model)
    expected = ["rescale", "flip", "rotation", "conv0", "pool0", "conv1", "pool1", "flatten", "dense",
                "probabilities"]
    assert [n for n in names if n in expected] == expected  # all present, in this order
    assert "dropout" not in names  # default dropout is 0
    assert model.get_layer("conv0").filters == 32
    assert model.get_layer("conv1").filters == 64
    assert model.get_layer("dense").units == 64
    assert model.get_layer("probabilities").activation.__name__ == "softmax"
    assert model.get_layer("flip").mode == "horizontal"


def test_rescale_maps_pixels_to_unit_range():
    """The rescale layer turns 0..255 into 0..1, so the network sees the same scale as trained."""
    model = build_model(2, SIZE, SMALL, seed=0)
    rescale = keras.Model(model.inputs[0], model.get_layer("rescale").output)
    out = keras.ops.convert_to_numpy(rescale(np.full((1, SIZE, SIZE, 3), 255, dtype=np.uint8)))
    np.testing.assert_allclose(out, 1.0, rtol=1e-6)


def test_no_augmentation_layers_when_disabled():
    """flip "none" and rotation 0 leave out both augmentation layers."""
    p = dataclasses.replace(SMALL, augment=AugmentParams(flip="none", rotation=0.0))
    names = layer_names(build_model(2, SIZE, p, seed=0))
    assert "flip" not in names
    assert "rotation" not in names
    assert "rescale" in names and "conv0" in names


def test_flip_only():
    """A flip without rotation adds the flip layer only."""
    p = dataclasses.replace(SMALL, augment=AugmentParams(flip="vertical", rotation=0.0))
    model = build_model(2, SIZE, p, seed=0)
    assert "rotation" not in layer_names(model)
    assert model.get_layer("flip").mode == "vertical"


def test_dropout_adds_a_layer():
    """dropout > 0 inserts a Dropout layer between dense and the softmax."""
    model = build_model(2, SIZE, dataclasses.replace(SMALL, dropout=0.3), seed=0)
    names = layer_names(model)
    assert "dropout" in names
    assert names.index("dense") < names.index("dropout") < names.index("probabilities")
    assert model.get_layer("dropout").rate == pytest.approx(0.3)


def test_one_filter_gives_one_conv_block():
    """filters [8] builds exactly one Conv2D+MaxPool block."""
    model = build_model(2, SIZE, dataclasses.replace(SMALL, filters=[8]), seed=0)
    names = layer_names(model)
    assert [n for n in names if n.startswith(("conv", "pool"))] == ["conv0", "pool0"]
    assert model.get_layer("conv0").filters == 8


def test_compiled_with_adam_and_sparse_crossentropy():
    """The model is compiled with Adam at train.learning_rate and accuracy as a metric."""
    model = build_model(2, SIZE, dataclasses.replace(SMALL, learning_rate=0.005), seed=0)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(0.005)
    assert model.loss == "sparse_categorical_crossentropy"


def test_inference_is_deterministic():
    """Augmentation and dropout are off at inference: the same batch predicts identically twice."""
    model = build_model(2, SIZE, dataclasses.replace(SMALL, dropout=0.5), seed=0)
    batch = images(6)
    first = model.predict(batch, verbose=0)
    second = model.predict(batch, verbose=0)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(model(batch, training=False), first)


def test_same_seed_same_initial_weights():
    """Two builds with the same seed start from identical weights; another seed differs."""
    a = build_model(2, SIZE, SMALL, seed=3).get_weights()
    b = build_model(2, SIZE, SMALL, seed=3).get_weights()
    c = build_model(2, SIZE, SMALL, seed=4).get_weights()
    assert len(a) == len(b) > 0
    for wa, wb in zip(a, b):
        np.testing.assert_array_equal(wa, wb)
    assert any(not np.array_equal(wa, wc) for wa, wc in zip(a, c))


def test_one_epoch_of_training_changes_weights():
    """fit for one epoch on 8 uint8 images runs and moves the weights; the loss is finite."""
    model = build_model(2, SIZE, SMALL, seed=0)
    before = model.get_weights()
    labels = np.array([0, 1] * 4)
    history = model.fit(images(8), labels, epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert 0.0 <= history.history["accuracy"][0] <= 1.0
    after = model.get_weights()
    assert any(not np.array_equal(w0, w1) for w0, w1 in zip(before, after))


def test_saved_model_reloads_with_identical_predictions(tmp_path):
    """Saved as .keras and loaded back, the model (augmentation layers too) predicts identically."""
    model = build_model(2, SIZE, dataclasses.replace(SMALL, dropout=0.2), seed=0)
    model.fit(images(8), np.array([0, 1] * 4), epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    batch = images(5, seed=1)
    np.testing.assert_array_equal(loaded.predict(batch, verbose=0), model.predict(batch, verbose=0))
    assert loaded.inputs[0].dtype == "uint8"
    assert layer_names(loaded) == layer_names(model)


def test_saved_model_is_byte_identical_across_processes(tmp_path):
    """The same weights give the same model.keras in two fresh processes, as two `dvc repro` runs
    are (no save time, no memory addresses inside), so dvc.lock does not change when a fresh clone
    retrains the same model."""
    import hashlib
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from cleanmessy.models import build_model, save_model; "
            "from cleanmessy.params import TrainParams; "
            "save_model(build_model(2, 32, TrainParams(), 1), Path(sys.argv[1]))")
    for name in ("first.keras", "second.keras"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True, capture_output=True)
    digests = {hashlib.md5((tmp_path / n).read_bytes()).hexdigest() for n in ("first.keras", "second.keras")}
    assert len(digests) == 1
