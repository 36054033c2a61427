"""Multi-view models (test-time augmentation inside the model: mirrors and feature-map regions)
and the logistic head, on tiny images (TensorFlow is imported)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cleanmessy.errors import UserError
from cleanmessy.inputs import RowStore
from cleanmessy.layers import (
    MultiView,
    RegionPool,
    ViewStack,
    region_weights,
    view_boxes,
)
from cleanmessy.models import build_model, photos_per_step
from cleanmessy.params import parse_params
from cleanmessy.serving.explain import gradcam_function
from cleanmessy.training import fit_logistic

NO_AUGMENT = {"flip": "none", "rotation": 0}


def multi_view_params(regions=((0.8, 2),), flip=True, normalize=True, size=0, **train):
    return parse_params({"train": {"arch": "mobilenet", "weights": "none", "augment": NO_AUGMENT, "head": "logistic",
                                   "views": {"regions": [list(r) for r in regions], "flip": flip,
                                             "normalize": normalize, "size": size}, **train}}).train


def test_view_boxes_whole_photo_first_then_grids_corner_to_corner():
    boxes = view_boxes([(0.8, 2), (0.5, 1)])
    assert boxes[0] == [0.0, 0.0, 1.0, 1.0]
    np.testing.assert_allclose(boxes[1:5], [[0, 0, 0.8, 0.8], [0, 0.2, 0.8, 1], [0.2, 0, 1, 0.8], [0.2, 0.2, 1, 1]])
    np.testing.assert_allclose(boxes[5], [0.25, 0.25, 0.75, 0.75])  # a 1x1 grid is the centre crop


def test_multi_view_puts_the_photos_first_and_their_mirrors_after():
    images = np.random.default_rng(0).integers(0, 255, (3, 20, 20, 3)).astype("float32")
    layer = MultiView(size=20, flip=True)
    views = np.asarray(layer(images))
    assert layer.n_passes == 2 and views.shape == (6, 20, 20, 3)
    np.testing.assert_allclose(views[:3], images, atol=1e-4)  # at its own size: unchanged
    np.testing.assert_allclose(views[3:], images[:, :, ::-1], atol=1e-4)
    assert np.asarray(MultiView(size=10)(images)).shape == (3, 10, 10, 3)


def test_region_pool_averages_each_boxs_cells():
    """Box 0 (the whole map) is global average pooling; a 2x2 grid of halves of a 4x4 map takes
    its four quadrants; a box always covers at least one cell."""
    maps = np.arange(2 * 4 * 4 * 3, dtype="float32").reshape(2, 4, 4, 3)
    pooled = np.asarray(RegionPool(view_boxes([(0.5, 2)]))(maps))
    assert pooled.shape == (2, 5, 3)
    np.testing.assert_allclose(pooled[:, 0], maps.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(pooled[:, 1], maps[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(pooled[:, 4], maps[:, 2:, 2:].mean(axis=(1, 2)), rtol=1e-6)
    tiny = region_weights([[0.4, 0.4, 0.45, 0.45]], 4, 4)
    assert tiny.sum() == pytest.approx(1.0) and np.count_nonzero(tiny) == 1


def test_view_stack_groups_each_photos_views():
    # pass 0 (photos 0, 1), then pass 1 (their mirrors); 2 regions each
    rows = np.array([[[0.0], [1.0]], [[10.0], [11.0]], [[100.0], [101.0]], [[110.0], [111.0]]])
    stacked = np.asarray(ViewStack(2)(rows))[..., 0]
    np.testing.assert_array_equal(stacked, [[0, 1, 100, 101], [10, 11, 110, 111]])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_head_equals_scikit_learns_pipeline(n_classes):
    """The standardisation is folded into one Dense kernel: softmax(x @ kernel + bias) gives the
    probabilities of StandardScaler + LogisticRegression, for binary and multi-class labels."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 6)) * [1, 2, 3, 0.5, 5, 1] + [0, 1, 2, 3, 4, 5]
    x[:, 3] = 7.0  # a constant feature (a dead unit) must not divide by zero
    y = np.digitize(x[:, 0] + x[:, 2] / 3, np.quantile(x[:, 0] + x[:, 2] / 3, np.linspace(0, 1, n_classes + 1)[1:-1]))
    kernel, bias = fit_logistic(in_store(x), y, n_classes, c=0.1, budget_bytes=1 << 20)
    logits = x @ kernel + bias
    ours = np.exp(logits - logits.max(1, keepdims=True))
    ours /= ours.sum(1, keepdims=True)
    theirs = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_multi_view_model_saves_loads_and_explains_the_whole_photo(tmp_path):
    """The custom layers survive a save/load round trip; each photo has 2 x 5 normalised views;
    Grad-CAM returns one map per photo; a forward step holds at most PASSES_PER_STEP passes."""
    import keras

    model = build_model(2, 40, multi_view_params(size=32), seed=0)
    assert model.get_layer("views").n_passes == 2
    assert photos_per_step(model, 512) == 128
    images = np.random.default_rng(2).integers(0, 255, (3, 40, 40, 3)).astype("uint8")
    assert keras.Model(model.inputs, model.get_layer("view_features").output)(images).shape[:2] == (3, 10)
    assert isinstance(model.get_layer("view_normalize"), keras.layers.UnitNormalization)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    probs, cam = gradcam_function(loaded, 40)(images, np.int32(1))
    assert probs.shape == (3, 2) and cam.shape[0] == 3


@pytest.mark.parametrize(("changes", "words"), [
    ({"views": {"regions": [[1.5, 2]]}}, "train.views.regions[0]"),
    ({"views": {"regions": [[0.8]]}}, "train.views.regions[0]"),
    ({"views": {"regions": [[0.8, 1.5]]}}, "train.views.regions[0]"),
    ({"views": {"size": 8}}, "train.views.size"),
    ({"head_c": 0}, "train.head_c"),
    ({"augment": {"flip": "horizontal", "rotation": 0}}, "train.augment.flip none"),
    ({"arch": "seed_cnn"}, "not seed_cnn"),
])
def test_bad_view_and_head_params_name_the_key(changes, words):
    train = {"arch": "mobilenet", "augment": NO_AUGMENT, "head": "logistic", **changes}
    with pytest.raises(UserError) as excinfo:
        parse_params({"train": train})
    assert words in str(excinfo.value)


def in_store(x: np.ndarray, budget_bytes: int = 1 << 30, scratch=None) -> RowStore:
    store = RowStore(len(x), x.shape[1:], "float32", budget_bytes, scratch)
    store.append(x)
    return store


def softmax(logits: np.ndarray) -> np.ndarray:
    out = np.exp(logits - logits.max(1, keepdims=True))
    return out / out.sum(1, keepdims=True)


def test_logistic_head_over_the_memory_budget_trains_by_sgd_to_nearly_the_same_model(tmp_path):
    """Features that do not fit train.memory_mb spill to a scratch file (nothing left in the
    folder) and the logistic head trains by SGD on chunks: the same objective, so nearly the same
    probabilities as the exact solver on the same rows, even though the rows come one class after
    the other (chunks of consecutive rows would each hold one class). Closing frees the file."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(6000, 8)) * [1, 2, 3, 0.5, 5, 1, 1, 1] + [0, 1, 2, 3, 4, 5, 6, 7]).astype("float32")
    y = (x[:, 0] + x[:, 2] / 3 + rng.normal(scale=0.5, size=len(x)) > 0.7).astype(int)
    by_label = np.argsort(y, kind="stable")  # as features are cached: in split order, one class after the other
    x, y = x[by_label], y[by_label]
    exact = fit_logistic(in_store(x), y, 2, c=0.1, budget_bytes=1 << 30)
    spilled = in_store(x, budget_bytes=1000, scratch=tmp_path)
    assert not spilled.in_memory and list(tmp_path.iterdir()) == []
    by_sgd = fit_logistic(spilled, y, 2, c=0.1, budget_bytes=1000)
    p_exact, p_sgd = softmax(x @ exact[0] + exact[1]), softmax(x @ by_sgd[0] + by_sgd[1])
    assert np.mean(p_exact.argmax(1) == p_sgd.argmax(1)) > 0.98
    assert np.abs(p_exact - p_sgd).max() < 0.1
    descriptor = spilled._file.fileno()
    spilled.close()
    with pytest.raises(OSError):
        os.fstat(descriptor)
