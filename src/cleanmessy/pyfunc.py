"""The registered model: an MLflow pyfunc (`PhotoClassifier`) that takes photo bytes and answers a
label, one probability per class and an error per row. evaluate logs it as *models from code*
(registered_model.py, no pickles) with the Keras model and the model card as artifacts and this
package as its code, so `mlflow models serve`, the Docker image, the app, `cleanmessy predict` and
evaluate's comparison with production all load a version the same way (`load_photo_classifier`)
and decode photos with the same `images.open_rgb`.

A row that cannot be classified (not an image, truncated, too small, too large, a pixel bomb)
gets its one-line reason in `error`; the other rows are answered. A request is bounded: at most
`MAX_ROWS` photos and `MAX_PHOTO_BYTES` a photo."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from cleanmessy.errors import UserError
from cleanmessy.images import DEFAULT_MAX_PIXELS, ImageError, open_rgb, to_model_input

INPUT_COLUMN = "image"
MAX_ROWS = 64  # photos a request
MAX_PHOTO_BYTES = 25 * 1024 * 1024  # as the app's upload limit
KERAS_ARTIFACT, CARD_ARTIFACT = "keras_model", "model_card"


def output_columns(class_names: list[str]) -> list[str]:
    return ["label", *class_names, "error"]


def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return None


_PHOTO_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


def _is_base64_photo(value: Any) -> bool:
    """True for a photo's base64 text where its bytes belong: the scoring server decodes base64
    only in the dataframe forms, and passes `inputs` and `instances` through as text."""
    import base64
    import binascii

    text = value.encode() if isinstance(value, str) else _as_bytes(value)
    try:
        return bool(text) and base64.b64decode(text[:24], validate=True).startswith(_PHOTO_SIGNATURES)
    except (binascii.Error, ValueError):
        return False


class PhotoClassifier(mlflow.pyfunc.PythonModel):
    """Photo bytes in (column `image`), `label`, a probability per class and `error` out."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from cleanmessy.inference import Predictor, load_model_file

        config = context.model_config or {}
        self.class_names = [str(c) for c in config["class_names"]]
        self.image_size = int(config["image_size"])
        self.min_side = int(config.get("min_side", 1))
        self.max_pixels = int(config.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.keras_model = load_model_file(Path(context.artifacts[KERAS_ARTIFACT]))
        self.predictor = Predictor(self.keras_model, self.image_size)
        card = context.artifacts.get(CARD_ARTIFACT)
        self.model_card = Path(card).read_text() if card else ""

    def decode(self, data: Any) -> np.ndarray:
        """One photo's bytes as the model's uint8 input, or ImageError with ingest's reason code."""
        photo = _as_bytes(data)
        if photo is None:
            raise ImageError("not_an_image", f"expected the photo's bytes (base64 in JSON), got {type(data).__name__}")
        if len(photo) > MAX_PHOTO_BYTES:
            raise ImageError("too_large", f"more than {MAX_PHOTO_BYTES:,} bytes, the most a photo may have")
        image, _ = open_rgb(photo, min_side=self.min_side, max_pixels=self.max_pixels)
        return to_model_input(image, self.image_size)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """A row per photo: `label`, one probability column per class, `error` ("" when classified)."""
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            # MlflowException: the scoring server answers 400 with this line (any other exception: a trace)
            raise MlflowException.invalid_parameter_value(f"the request needs a column `{INPUT_COLUMN}` of photo "
                                                          "bytes (base64 in dataframe_split or dataframe_records)")
        photos = list(model_input[INPUT_COLUMN])
        if photos and all(_is_base64_photo(p) for p in photos):  # sent as `inputs` or `instances`
            raise MlflowException.invalid_parameter_value(
                f"the `{INPUT_COLUMN}` column holds base64 text, not photo bytes: the server decodes base64 only "
                "in dataframe_split or dataframe_records, not in inputs or instances")
        out = pd.DataFrame({"label": [""] * len(photos), **{c: [np.nan] * len(photos) for c in self.class_names},
                            "error": [""] * len(photos)})
        if len(photos) > MAX_ROWS:
            out["error"] = f"too_many_photos: a request takes at most {MAX_ROWS} photos, this one has {len(photos)}"
            photos = []
        arrays, rows = [], []
        for i, data in enumerate(photos):
            try:
                arrays.append(self.decode(data))
                rows.append(i)
            except ImageError as exc:
                out.loc[i, "error"] = f"{exc.reason}: {exc}"
        if arrays:
            probs = self.predictor(np.stack(arrays))
            for i, p in zip(rows, probs):
                out.loc[i, "label"] = self.class_names[int(p.argmax())]
                out.loc[i, self.class_names] = p.astype(np.float64)
        for c in self.class_names:  # a row not classified has no probabilities: null in JSON (NaN is not JSON)
            out[c] = out[c].astype(object).where(out["error"] == "", None)
        return out[output_columns(self.class_names)]


class RegisteredBeforePhotoBytes(UserError):
    """A version registered before models took photo bytes: a plain Keras model no server loads."""


def check_photo_classifier(flavors: dict[str, Any], name: str) -> None:
    """A one-line UserError unless an MLmodel's `flavors` are a PhotoClassifier's pyfunc (models from
    code, or a pickled PythonModel): a version registered before models took photo bytes is a plain
    Keras model, which evaluate registers again."""
    loader = flavors.get("python_function", {}).get("loader_module")
    if loader not in ("mlflow.pyfunc.loaders.code_model", "mlflow.pyfunc.model"):
        raise RegisteredBeforePhotoBytes(f"{name} was registered before models took photo bytes (it is a "
                                         f"{loader or 'non-pyfunc'} "
                        "model); register it again with `dvc repro --force --single-item evaluate`")


def load_photo_classifier(local: Path, name: str) -> PhotoClassifier:
    """A registered version, downloaded to `local`, loaded as the PhotoClassifier it was logged as;
    `name` says which in the one-line UserError when it cannot be (a version registered before
    models took photo bytes is a plain Keras model: evaluate registers it again)."""
    import contextlib
    import io

    from mlflow.models import Model

    try:
        check_photo_classifier(Model.load(str(local)).flavors, name)
    except (MlflowException, OSError) as exc:
        raise UserError(f"cannot load {name}: {exc}") from None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints progress bars
            model = mlflow.pyfunc.load_model(str(local)).unwrap_python_model()
    except (MlflowException, OSError, TypeError, ValueError, UserError) as exc:
        raise UserError(f"cannot load {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(model, PhotoClassifier):
        raise UserError(f"{name} is not a Clean vs Messy photo classifier ({type(model).__name__})")
    return model


def pip_requirements() -> list[str]:
    """The serving requirements (what the package imports on the serving path), pinned to what
    trained the model (inferring them costs ~10 s)."""
    reqs = []
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "mlflow", "pillow", "numpy", "pandas", "pyyaml", "tqdm"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def log_photo_classifier(keras_file: Path, card: str, config: dict[str, Any], example: bytes,
                         model_metadata: dict[str, Any]) -> Any:
    """Log the registered model to the active run (name "model"): PhotoClassifier as *models from
    code* (registered_model.py), the package as its code, the Keras file and the model card as
    artifacts, `config` (class names, image size, min_side, max_pixels) as its model config, a
    signature of photo bytes in and label, probabilities and error out, `example` (one photo's
    bytes) as its input example, pinned requirements and `model_metadata` in its MLmodel; returns the
    ModelInfo."""
    import tempfile

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    package = Path(__file__).parent
    outputs = [ColSpec(DataType.string, "label"), *(ColSpec(DataType.double, c) for c in config["class_names"]),
               ColSpec(DataType.string, "error")]
    signature = ModelSignature(inputs=Schema([ColSpec(DataType.binary, INPUT_COLUMN)]),
                               outputs=Schema(outputs))
    with tempfile.TemporaryDirectory(prefix="cleanmessy-card-") as folder:
        card_file = Path(folder) / "model_card.md"
        card_file.write_text(card)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(package / "registered_model.py"),
            artifacts={KERAS_ARTIFACT: str(keras_file), CARD_ARTIFACT: str(card_file)},
            code_paths=[str(package)],
            model_config=config,
            signature=signature,
            input_example=pd.DataFrame({INPUT_COLUMN: [example]}),
            pip_requirements=pip_requirements(),
            metadata=model_metadata,
        )
