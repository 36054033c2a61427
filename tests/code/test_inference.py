"""inference: one loader and one predictor for evaluate, cv, predict and the app."""

from __future__ import annotations

import numpy as np
import pytest

from cleanmessy.errors import UserError
from cleanmessy.inference import Predictor, load_model_file
from cleanmessy.models import build_model, save_model
from cleanmessy.params import AugmentParams, TrainParams, ViewParams

from conftest import labelled_photos

NO_AUGMENT = AugmentParams(flip="none", rotation=0.0)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """7 tiny photos on disk and a split frame pointing at them."""
    root = tmp_path_factory.mktemp("root")
    return root, labelled_photos(root, 7, 24, seed=1)


def test_predictor_matches_keras_predict_in_steps_of_any_size(split):
    """The compiled forward pass, in steps of 3 photos, gives Keras's own probabilities, for a
    batch and for a split read through the input pipeline."""
    root, frame = split
    model = build_model(2, 16, TrainParams(epochs=1, augment=NO_AUGMENT), seed=0)
    predictor = Predictor(model, 16, max_photos=3)
    assert predictor.step == 3
    batch = np.random.default_rng(0).integers(0, 255, (7, 16, 16, 3), dtype=np.uint8)
    assert predictor(batch) == pytest.approx(model.predict(batch, verbose=0), abs=1e-6)
    probs = predictor.predict_split(frame, root)
    assert probs.shape == (7, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert predictor(batch[:0]).shape == (0, 2)
    assert predictor.photos_per_second(batch) > 0


def test_multi_view_models_take_fewer_photos_per_step():
    """Photo + mirror is two backbone passes per photo: half as many photos per step."""
    p = TrainParams(arch="mobilenet", alpha=0.25, weights="none", augment=NO_AUGMENT, views=ViewParams(flip=True))
    assert Predictor(build_model(2, 32, p, seed=0), 32).step == 128


def test_loading_saved_model_round_trips_and_a_bad_file_is_one_line(tmp_path):
    model = build_model(2, 16, TrainParams(epochs=1, augment=NO_AUGMENT), seed=0)
    save_model(model, tmp_path / "model.keras")
    loaded = load_model_file(tmp_path / "model.keras")
    batch = np.zeros((2, 16, 16, 3), np.uint8)
    assert loaded.predict(batch, verbose=0) == pytest.approx(model.predict(batch, verbose=0))
    (tmp_path / "broken.keras").write_text("not a model")
    with pytest.raises(UserError, match=r"cannot load .*broken.keras.*run `cleanmessy train`"):
        load_model_file(tmp_path / "broken.keras")
