"""Where the ImageNet weights come from: the env folder, Keras's cache, or a clear error."""

from __future__ import annotations

import pytest

from cleanmessy import weights
from cleanmessy.errors import UserError


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """An empty Keras cache and no weights folder, for every test."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv(weights.ENV, raising=False)
    return tmp_path / "keras" / "models"


def test_candidate_names_follow_keras_naming():
    """Keras's own file names first; the 224 px file serves other sizes; the v2 reconstruction last."""
    assert weights.candidate_names("mobilenet", 0.25, 224) == ["mobilenet_2_5_224_tf_no_top.h5"]
    assert weights.candidate_names("mobilenet", 0.25, 160) == ["mobilenet_2_5_160_tf_no_top.h5",
                                                               "mobilenet_2_5_224_tf_no_top.h5"]
    assert weights.candidate_names("mobilenet_v2", 0.35, 288) == [
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5", "mobilenet_v2_0.35_224_no_top_tm.h5"]


def test_env_folder_wins_over_cache(tmp_path, monkeypatch, isolated_cache):
    folder = tmp_path / "weights"
    folder.mkdir()
    isolated_cache.mkdir(parents=True)
    (isolated_cache / "mobilenet_2_5_224_tf_no_top.h5").write_bytes(b"cache")
    assert weights.find_local("mobilenet", 0.25, 224) == isolated_cache / "mobilenet_2_5_224_tf_no_top.h5"
    (folder / "mobilenet_2_5_224_tf_no_top.h5").write_bytes(b"env")
    monkeypatch.setenv(weights.ENV, str(folder))
    assert weights.find_local("mobilenet", 0.25, 224) == folder / "mobilenet_2_5_224_tf_no_top.h5"


def test_nothing_local_is_none():
    assert weights.find_local("mobilenet_v2", 0.35, 224) is None


def test_unknown_alpha_names_the_choices():
    with pytest.raises(UserError, match="0.25, 0.5, 0.75, 1.0"):
        weights.check_alpha("mobilenet", 0.35)
    weights.check_alpha("mobilenet_v2", 0.35)
    weights.check_alpha("seed_cnn", 0.123)  # no backbone, nothing to check


def test_offline_without_weights_is_a_clear_error(monkeypatch):
    """No local file and no network (a proxy that refuses): a UserError naming the file, where
    to put it and the env var, instead of a traceback or a hang."""
    from cleanmessy.models import build_model
    from cleanmessy.params import TrainParams

    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(UserError) as error:
        build_model(2, 224, TrainParams(arch="mobilenet", alpha=0.25), seed=0)
    message = str(error.value)
    assert "mobilenet_2_5_224_tf_no_top.h5" in message and weights.ENV in message
    assert str(weights.keras_cache()) in message
