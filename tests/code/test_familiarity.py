"""familiarity.py on numbers (no model): the k-nearest-neighbour score, its leave-one-out
calibration, the flag, the saved file; and the registered model's familiarity columns and request
log lines with a stand-in forward pass (the trained detector's figures: tests/pipeline)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_pyfunc import StandIn

from cleanmessy import familiarity, requestlog


def features(rng: np.random.Generator, n: int, centre: float, d: int = 16) -> np.ndarray:
    """Positive stats (means then deviations) around `centre`, embedded."""
    return familiarity.embed(np.abs(rng.normal(centre, 0.2, (n, 2 * d))) + 0.05)


def test_photos_like_the_training_photos_are_flagged_at_about_alpha():
    rng = np.random.default_rng(0)
    detector = familiarity.fit(features(rng, 600, 1.0))
    same = detector.familiarity(detector.scores(features(rng, 2000, 1.0)))
    rate = detector.unfamiliar(same).mean()
    assert 0.02 <= rate <= 0.09, rate  # alpha = 5 %, calibrated on photos the detector left out
    assert ((same > 0) & (same <= 1)).all()


def test_the_flag_and_the_threshold_agree_and_other_photos_are_flagged():
    rng = np.random.default_rng(1)
    detector = familiarity.fit(features(rng, 300, 1.0))
    queries = np.concatenate([features(rng, 200, 1.0), familiarity.embed(rng.uniform(0, 3, (200, 32)) ** 3)])
    scores = detector.scores(queries)
    flags = detector.unfamiliar(detector.familiarity(scores))
    np.testing.assert_array_equal(flags, scores > detector.threshold)
    assert flags[200:].mean() > 0.9 and flags[:200].mean() < 0.12


def test_auroc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 5, 40).astype(float), rng.integers(2, 8, 30).astype(float)
    assert familiarity.auroc(a, b) == pytest.approx(roc_auc_score(np.r_[np.zeros(40), np.ones(30)], np.r_[a, b]))
    assert familiarity.auroc(a, []) is None


def test_saved_detector_scores_as_fitted_and_the_bank_is_bounded(tmp_path):
    rng = np.random.default_rng(3)
    detector = familiarity.fit(features(rng, 50, 1.0), max_bank=30)
    assert detector.bank.shape == (30, 32) and detector.components.shape == (32, familiarity.PROJECTION_DIMS)
    detector.save(tmp_path / "f.npz")
    loaded = familiarity.Familiarity.load(tmp_path / "f.npz")
    queries = features(rng, 20, 1.1)
    np.testing.assert_allclose(loaded.scores(queries), detector.scores(queries), atol=1e-6)
    assert loaded.threshold == detector.threshold and loaded.project(queries).shape == (20, 16)
    with pytest.raises(ValueError, match="at least 2 training photos"):
        familiarity.fit(features(rng, 1, 1.0))


@pytest.fixture
def detecting(classifier_factory):
    """The stand-in classifier with a detector fitted on mid-grey photos' features."""
    model = classifier_factory()
    rng = np.random.default_rng(4)
    greys = np.stack([np.clip(rng.normal(128, 8, (8, 8, 3)), 0, 255).astype(np.uint8) for _ in range(100)])
    _, stats = StandIn().with_features(greys)
    model.familiarity = familiarity.fit(familiarity.embed(stats))
    return model


@pytest.fixture
def classifier_factory():
    from cleanmessy import pyfunc

    def make():
        model = pyfunc.PhotoClassifier()
        model.class_names, model.image_size, model.min_side, model.max_pixels = ["clean", "messy"], 8, 16, 10_000
        model.predictor = StandIn()
        return model

    return make


def noisy_grey(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    pixels = np.clip(rng.normal(128, 8, (8, 8, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).resize((32, 32)).save(buffer, "PNG")
    return buffer.getvalue()


def red() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (250, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_registered_model_flags_a_photo_unlike_its_training_photos(detecting):
    rows = [red(), noisy_grey(9), b"not an image"]
    out = detecting.predict(None, pd.DataFrame({"image": rows}))
    assert list(out["unfamiliar"]) == [True, False, None]
    assert out["familiarity"][0] < 0.05 < out["familiarity"][1] and out["familiarity"][2] is None
    json.loads(out.to_json(orient="records"))  # nulls, not NaN


def test_a_server_logs_one_line_per_photo_and_never_the_photo(detecting, tmp_path):
    detecting.request_log = requestlog.RequestLog(tmp_path / "served" / "requests.jsonl")
    detecting.served_as = "clean-vs-messy/7"
    photos = [red(), noisy_grey(9), b"not an image"]
    detecting.predict(None, pd.DataFrame({"image": photos}))
    records, bad = requestlog.read(tmp_path / "served" / "requests.jsonl")
    assert bad == 0 and len(records) == 3
    first = records[0]
    assert set(first) == {"time", "source", "model", "sha256", "label", "probabilities", "familiarity", "unfamiliar",
                          "projection", "error"}
    assert first["model"] == "clean-vs-messy/7" and first["source"] == "rest" and first["unfamiliar"] is True
    assert first["label"] in ("clean", "messy") and set(first["probabilities"]) == {"clean", "messy"}
    assert len(first["projection"]) == 6  # the stand-in's features have 6 dimensions, fewer than PROJECTION_DIMS
    assert records[2]["error"] == "not_an_image" and records[2]["projection"] is None
    import hashlib

    assert [r["sha256"] for r in records] == [hashlib.sha256(p).hexdigest() for p in photos]
    text = (tmp_path / "served" / "requests.jsonl").read_bytes()
    assert b"PNG" not in text and len(text) < 3 * 1000


def test_the_request_log_is_bounded_by_rotation(tmp_path):
    log = requestlog.RequestLog(tmp_path / "requests.jsonl", max_bytes=1000)
    for i in range(100):
        log.append([{"i": i, "pad": "x" * 50}])
    current, older = tmp_path / "requests.jsonl", tmp_path / "requests.1.jsonl"
    assert current.stat().st_size <= 1000 and older.stat().st_size <= 1000
    records, _ = requestlog.read(current)
    assert [r["i"] for r in records] == list(range(records[0]["i"], 100))  # oldest first, none lost in between


def test_an_unwritable_log_is_a_warning_and_the_answer_still_goes_out(detecting, tmp_path, caplog):
    (tmp_path / "file").write_text("")
    detecting.request_log = requestlog.RequestLog(tmp_path / "file" / "requests.jsonl")  # its folder is a file
    out = detecting.predict(None, pd.DataFrame({"image": [noisy_grey(1)]}))
    assert out["label"][0] in ("clean", "messy")
    assert "request log" in caplog.text and "not written" in caplog.text
