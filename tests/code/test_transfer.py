"""Transfer-learning models and their training phases, on tiny images (TensorFlow is imported)."""

from __future__ import annotations

import numpy as np
import pytest

from cleanmessy.models import backbone_layers, build_model, unfreeze_top
from cleanmessy.params import AugmentParams, TrainParams
from cleanmessy.serving.explain import gradcam_function, last_conv_layer
from cleanmessy.training import train_model

from conftest import SHARED, labelled_photos

NO_AUGMENT = AugmentParams(flip="none", rotation=0.0)
WEIGHTS = SHARED / "keras-weights"


def tiny(**changes) -> TrainParams:
    return TrainParams(**{"arch": "mobilenet", "alpha": 0.25, "weights": "none", "epochs": 2, "batch_size": 4,
                          "patience": 2, "augment": NO_AUGMENT, **changes})


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """12 tiny labelled images on disk (bright = messy) and train/val frames pointing at them."""
    root = tmp_path_factory.mktemp("root")
    frame = labelled_photos(root, 12, 40)
    return root, frame.iloc[:8], frame.iloc[8:]


def test_backbone_is_frozen_and_preprocessing_is_inside():
    """Only the head trains at first; the model takes uint8 and scales it to [-1, 1] itself."""
    model = build_model(2, 64, tiny(), seed=0)
    assert model.inputs[0].dtype == "uint8"
    assert model.get_layer("preprocess").scale == pytest.approx(1 / 127.5)
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    assert trainable == {"probabilities"}
    assert len(backbone_layers(model)) > 50


def test_unfreeze_top_keeps_batch_norm_frozen():
    model = build_model(2, 64, tiny(), seed=0)
    count = unfreeze_top(model, 10)
    top = backbone_layers(model)[-10:]
    assert count == sum(1 for layer in top if "bn" not in layer.name)
    assert all(not layer.trainable for layer in top if "bn" in layer.name)
    assert len(model.trainable_weights) > 2


def test_grad_cam_reaches_the_last_backbone_convolution():
    """The backbone is built on the model's tensors, so Grad-CAM can read its last feature maps."""
    model = build_model(2, 64, tiny(), seed=0)
    assert last_conv_layer(model).name == "conv_pw_13_relu"
    probs, cam = gradcam_function(model, 64)(np.zeros((2, 64, 64, 3), np.uint8), np.int32(1))
    assert probs.shape == (2, 2) and cam.shape[0] == 2 and float(np.max(cam)) <= 1.0


def test_head_phase_uses_cached_features_and_fine_tune_follows(frames):
    """No augmentation: a head phase on cached features, then a fine-tune phase on images; the
    epochs number on across phases, and `on_epoch` gets each epoch's row of the history."""
    root, train, val = frames
    model = build_model(2, 32, tiny(fine_tune_layers=5, fine_tune_epochs=2), seed=0)
    reported: list[tuple[int, dict]] = []
    history = train_model(model, train, val, root, ["clean", "messy"], 32,
                          tiny(fine_tune_layers=5, fine_tune_epochs=2), seed=0,
                          on_epoch=lambda metrics, step: reported.append((step, metrics)))
    assert list(history["phase"].unique()) == ["head", "fine_tune"]
    assert list(history["epoch"]) == list(range(1, len(history) + 1))
    assert [step for step, _ in reported] == list(history["epoch"])
    for (_, metrics), (_, row) in zip(reported, history.iterrows()):
        assert metrics["val_loss"] == pytest.approx(row["val_loss"])
        assert set(metrics) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}


def test_backbone_is_what_lies_between_views_and_pool():
    """Fine-tuning unfreezes backbone layers only: the layers between `views` and `pool`, never a
    head layer (dropout, probabilities) or the augmentation before the views."""
    params = tiny(dropout=0.3, augment=AugmentParams(flip="horizontal", rotation=0.05))
    model = build_model(2, 32, params, seed=0)
    names = {layer.name for layer in backbone_layers(model)}
    assert not names & {"image", "preprocess", "flip", "rotation", "views", "pool", "view_features", "view_mean",
                        "dropout", "probabilities"}
    assert "conv1" in names and "conv_pw_13_relu" in names


def test_augmenting_trains_the_whole_model(frames):
    """With augmentation the images go through the model every epoch (no feature cache)."""
    root, train, val = frames
    params = tiny(augment=AugmentParams(flip="horizontal", rotation=0.05))
    model = build_model(2, 32, params, seed=0)
    history = train_model(model, train, val, root, ["clean", "messy"], 32, params, seed=0)
    assert list(history["phase"].unique()) == ["train"]


@pytest.mark.skipif(not WEIGHTS.is_dir(), reason=f"no local ImageNet weights at {WEIGHTS}")
@pytest.mark.parametrize(("arch", "alpha", "file", "layer"), [
    ("mobilenet", 0.25, "mobilenet_2_5_224_tf_no_top.h5", "conv1"),
    ("mobilenet_v2", 0.35, "mobilenet_v2_0.35_224_no_top_tm.h5", "Conv1"),
])
def test_imagenet_weights_load_from_the_env_folder(monkeypatch, tmp_path, arch, alpha, file, layer):
    """With CLEANMESSY_KERAS_WEIGHTS set, the backbone holds the file's tensors (not random ones)."""
    import h5py

    monkeypatch.setenv("CLEANMESSY_KERAS_WEIGHTS", str(WEIGHTS))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    model = build_model(2, 224, tiny(arch=arch, alpha=alpha, weights="imagenet"), seed=0)
    with h5py.File(WEIGHTS / file) as h5:
        group = h5[layer] if layer in h5 else h5["model_weights"][layer]
        stored = [group[name][()] for name in group.attrs["weight_names"]]
    np.testing.assert_array_equal(model.get_layer(layer).get_weights()[0], stored[0])


def test_logistic_head_fits_once_on_every_view(frames):
    """The logistic head needs no epochs: one history row, and the model predicts what scikit-learn's
    StandardScaler + LogisticRegression, fitted on every view of every training photo (whole
    feature map, a 2x2 grid of regions, mirrors), predicts from each val photo's mean view."""
    import keras
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cleanmessy.inputs import decode_batches
    from cleanmessy.params import ViewParams
    from cleanmessy.training import cached_features

    root, train, val = frames
    classes = ["clean", "messy"]
    params = tiny(head="logistic", views=ViewParams(regions=[[0.8, 2]], flip=True))
    model = build_model(2, 32, params, seed=0)
    history = train_model(model, train, val, root, classes, 32, params, seed=0)
    assert list(history["phase"]) == ["head"] and len(history) == 1
    def photos(frame):
        return decode_batches([str(root / p) for p in frame["path"]], 32, 4)

    views = {name: cached_features(model, photos(frame), len(frame), 1 << 30, root).read_range(0, 10 * len(frame))
             .reshape(len(frame), 10, -1).astype("float64") for name, frame in (("train", train), ("val", val))}
    assert views["train"].shape[1] == 10
    labels = np.repeat(train["label"].map({"clean": 0, "messy": 1}).to_numpy(), 10)
    sklearn = make_pipeline(StandardScaler(), LogisticRegression(C=params.head_c, max_iter=5000))
    sklearn.fit(views["train"].reshape(-1, views["train"].shape[-1]), labels)
    images = np.concatenate(list(photos(val)))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(images)),
                               sklearn.predict_proba(views["val"].mean(axis=1)), atol=1e-4)
