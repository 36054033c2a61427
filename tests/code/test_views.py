"""Multi-view models (test-time augmentation inside the model) and the logistic head, on tiny
images (TensorFlow is imported)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cleanmessy.errors import UserError
from cleanmessy.layers import MultiView, ViewStack, view_boxes
from cleanmessy.models import build_model, photos_per_step
from cleanmessy.params import parse_params
from cleanmessy.serving.explain import gradcam_function
from cleanmessy.stages.train import fit_logistic

NO_AUGMENT = {"flip": "none", "rotation": 0}


def multi_view_params(crops=((0.8, 2),), flip=True, size=0, **train):
    return parse_params({"train": {"arch": "mobilenet", "weights": "none", "augment": NO_AUGMENT, "head": "logistic",
                                   "views": {"crops": [list(c) for c in crops], "flip": flip, "size": size},
                                   **train}}).train


def test_view_boxes_whole_photo_first_then_grids_corner_to_corner():
    boxes = view_boxes([(0.8, 2), (0.5, 1)])
    assert boxes[0] == [0.0, 0.0, 1.0, 1.0]
    np.testing.assert_allclose(boxes[1:5], [[0, 0, 0.8, 0.8], [0, 0.2, 0.8, 1], [0.2, 0, 1, 0.8], [0.2, 0.2, 1, 1]])
    np.testing.assert_allclose(boxes[5], [0.25, 0.25, 0.75, 0.75])  # a 1x1 grid is the centre crop


def test_multi_view_is_view_major_with_the_whole_photo_first_and_mirrors_last():
    images = np.random.default_rng(0).integers(0, 255, (3, 20, 20, 3)).astype("float32")
    layer = MultiView(view_boxes([(0.5, 1)]), size=20, flip=True)
    views = np.asarray(layer(images))
    assert layer.n_views == 4 and views.shape == (12, 20, 20, 3)
    np.testing.assert_allclose(views[:3], images, atol=1e-4)  # whole photo at its own size: unchanged
    np.testing.assert_allclose(views[6:9], images[:, :, ::-1], atol=1e-4)  # then the mirrors
    centre = np.asarray(MultiView([[0.25, 0.25, 0.75, 0.75]], size=10)(images))
    assert np.abs(centre - images[:, 5:15, 5:15]).mean() < 20  # the centre half (resampled)


def test_view_stack_groups_each_photos_views():
    rows = np.array([[0.0], [1.0], [10.0], [11.0]])  # view 0 of photos 0, 1; then view 1 of photos 0, 1
    np.testing.assert_array_equal(np.asarray(ViewStack(2)(rows))[..., 0], [[0, 10], [1, 11]])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_head_equals_scikit_learns_pipeline(n_classes):
    """The standardisation is folded into one Dense kernel: softmax(x @ kernel + bias) gives the
    probabilities of StandardScaler + LogisticRegression, for binary and multi-class labels."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 6)) * [1, 2, 3, 0.5, 5, 1] + [0, 1, 2, 3, 4, 5]
    x[:, 3] = 7.0  # a constant feature (a dead unit) must not divide by zero
    y = np.digitize(x[:, 0] + x[:, 2] / 3, np.quantile(x[:, 0] + x[:, 2] / 3, np.linspace(0, 1, n_classes + 1)[1:-1]))
    kernel, bias = fit_logistic(x, y, n_classes, c=0.1)
    logits = x @ kernel + bias
    ours = np.exp(logits - logits.max(1, keepdims=True))
    ours /= ours.sum(1, keepdims=True)
    theirs = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_multi_view_model_saves_loads_and_explains_the_whole_photo(tmp_path):
    """The custom layers survive a save/load round trip; Grad-CAM returns one map per photo; a
    forward step holds at most VIEWS_PER_STEP views."""
    import keras

    model = build_model(2, 40, multi_view_params(size=32), seed=0)
    assert model.get_layer("views").n_views == 10
    assert photos_per_step(model, 32) == 25
    images = np.random.default_rng(2).integers(0, 255, (3, 40, 40, 3)).astype("uint8")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    probs, cam = gradcam_function(loaded, 40)(images, np.int32(1))
    assert probs.shape == (3, 2) and cam.shape[0] == 3


@pytest.mark.parametrize(("changes", "words"), [
    ({"views": {"crops": [[1.5, 2]]}}, "train.views.crops[0]"),
    ({"views": {"crops": [[0.8]]}}, "train.views.crops[0]"),
    ({"views": {"crops": [[0.8, 1.5]]}}, "train.views.crops[0]"),
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
