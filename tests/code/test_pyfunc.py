"""pyfunc.PhotoClassifier's rows, without a server or a trained model: a stand-in forward pass,
real photo bytes decoded by images.open_rgb (the registered model end to end, over real HTTP:
tests/serving/test_api.py)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException
from PIL import Image

from cleanmessy import pyfunc
from cleanmessy.errors import UserError


def png(side: int, value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def classifier() -> pyfunc.PhotoClassifier:
    """A PhotoClassifier as load_context leaves it, with a forward pass that says "messy" in
    proportion to brightness."""
    model = pyfunc.PhotoClassifier()
    model.class_names, model.image_size, model.min_side, model.max_pixels = ["clean", "messy"], 8, 16, 10_000

    model.predictor = StandIn()
    return model


class StandIn:
    """Inference.Predictor's `with_features`: "messy" in proportion to brightness; as features,
    each channel's mean and standard deviation over the photo."""

    def with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert batch.dtype == np.uint8 and batch.shape[1:] == (8, 8, 3)
        messy = batch.mean(axis=(1, 2, 3)) / 255.0
        stats = np.concatenate([batch.mean(axis=(1, 2)), batch.std(axis=(1, 2))], axis=1) + 1.0
        return np.stack([1 - messy, messy], axis=1).astype(np.float32), stats.astype(np.float32)


def test_every_row_is_answered_and_bad_rows_say_why(classifier):
    truncated = noise_png(64)[:3000]
    rows = [png(32, 200), b"not an image", truncated, png(8), png(200), png(32, 20), "text"]
    out = classifier.predict(None, pd.DataFrame({"image": rows}))
    assert list(out.columns) == ["label", "clean", "messy", "familiarity", "unfamiliar", "error"]
    assert len(out) == len(rows) and out["familiarity"].isna().all()  # no detector: not measured
    assert list(out["label"]) == ["messy", "", "", "", "", "clean", ""]
    assert out["messy"][0] == pytest.approx(200 / 255, abs=1e-6) and out["clean"][5] == pytest.approx(1 - 20 / 255)
    errors = list(out["error"])
    assert errors[0] == errors[5] == ""
    assert errors[1].startswith("not_an_image: ") and errors[2].startswith("truncated: ")
    assert errors[3].startswith("too_small: ") and errors[4].startswith("too_large: ")  # 40,000 px > 10,000
    assert errors[6] == "not_an_image: expected the photo's bytes (base64 in JSON), got str"
    assert all("\n" not in e for e in errors) and out.loc[1:4, ["clean", "messy"]].isna().all().all()


def test_requests_are_bounded(classifier, monkeypatch):
    """More rows than MAX_ROWS: every row refused in one line, nothing decoded; a photo over
    MAX_PHOTO_BYTES: refused before it is decoded."""
    out = classifier.predict(None, pd.DataFrame({"image": [png(32)] * (pyfunc.MAX_ROWS + 1)}))
    assert set(out["error"]) == {f"too_many_photos: a request takes at most {pyfunc.MAX_ROWS} photos, this one "
                                 f"has {pyfunc.MAX_ROWS + 1}"} and set(out["label"]) == {""}
    monkeypatch.setattr(pyfunc, "MAX_PHOTO_BYTES", 100)
    out = classifier.predict(None, pd.DataFrame({"image": [noise_png(32)]}))
    assert out["error"][0] == "too_large: more than 100 bytes, the most a photo may have"


def test_a_request_without_the_image_column_is_a_one_line_mlflow_error(classifier):
    """An MlflowException, which the scoring server answers as 400 with its message (any other
    exception would be answered with a stack trace)."""
    with pytest.raises(MlflowException, match="the request needs a column `image` of photo bytes"):
        classifier.predict(None, pd.DataFrame({"photo": [png(32)]}))


def test_a_version_registered_before_photo_bytes_says_to_register_again(tmp_path):
    """A plain Keras version (registered before this model) is refused in one line saying what to run."""
    (tmp_path / "MLmodel").write_text(yaml.safe_dump({"flavors": {
        "keras": {"keras_version": "3"}, "python_function": {"loader_module": "mlflow.keras"}}}))
    with pytest.raises(UserError) as caught:
        pyfunc.load_photo_classifier(tmp_path, "models:/clean-vs-messy/1")
    assert str(caught.value) == ("models:/clean-vs-messy/1 was registered before models took photo bytes (it is a "
                                 "mlflow.keras model); register it again with `dvc repro --force --single-item "
                                 "evaluate`")


def test_photos_sent_as_base64_text_are_a_malformed_request(classifier):
    """`inputs`/`instances` reach the model as the base64 text itself (the server decodes only the
    dataframe forms): a request of nothing else is refused in one line that names the fix; base64
    text among real photos is one bad row."""
    import base64

    text = base64.b64encode(png(32))
    for rows in ([text], [text.decode(), text]):
        with pytest.raises(MlflowException, match="decodes base64 only in dataframe_split or dataframe_records"):
            classifier.predict(None, pd.DataFrame({"image": rows}))
    out = classifier.predict(None, pd.DataFrame({"image": [png(32), text, b"aGVsbG8="]}))
    assert out["error"][0] == "" and out["error"][1].startswith("not_an_image: ")
    assert classifier.predict(None, pd.DataFrame({"image": [b"hello"]}))["error"][0].startswith("not_an_image: ")
