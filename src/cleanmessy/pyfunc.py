"""The registered model: an MLflow pyfunc (`PhotoClassifier`) that takes photo bytes and answers a
label, one probability per class, how familiar the photo is to the model (`familiarity`,
`unfamiliar`: familiarity.py) and an error per row. evaluate logs it as *models from code*
(registered_model.py, no pickles) with the Keras model, the familiarity detector and the model card
as artifacts and this package as its code, so `mlflow models serve`, the Docker image, the app,
`cleanmessy predict` and evaluate's comparison with production all load a version the same way
(`load_photo_classifier`) and decode photos with the same `images.open_rgb`.

A row that cannot be classified (not an image, truncated, too small, too large, a pixel bomb)
gets its one-line reason in `error`; the other rows are answered. A request is bounded: at most
`MAX_ROWS` photos and `MAX_PHOTO_BYTES` a photo.

A server that sets `request_log` (the app; the REST server through CLEANMESSY_REQUEST_LOG, which
`cleanmessy api` sets) gets a JSON line per photo it classified (requestlog.py)."""

from __future__ import annotations

import hashlib
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from cleanmessy import requestlog
from cleanmessy.errors import UserError
from cleanmessy.images import DEFAULT_MAX_PIXELS, ImageError, open_rgb, to_model_input

INPUT_COLUMN = "image"
MAX_ROWS = 64  # photos a request
MAX_PHOTO_BYTES = 15 * 1024 * 1024  # a room photo (a 12-48 MP phone JPEG): the app's and the REST API's limit
KERAS_ARTIFACT, CARD_ARTIFACT, FAMILIARITY_ARTIFACT = "keras_model", "model_card", "familiarity"
FAMILIARITY, UNFAMILIAR = "familiarity", "unfamiliar"

log = logging.getLogger(__name__)


def output_columns(class_names: list[str]) -> list[str]:
    return ["label", *class_names, FAMILIARITY, UNFAMILIAR, "error"]


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

    familiarity = None  # familiarity.Familiarity, loaded with the version (None: registered before it)
    request_log: requestlog.RequestLog | None = None  # where a server logs what it classified
    served_as = ""  # "name/version" in the request log
    log_source = "rest"  # which server, in the request log

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from cleanmessy.familiarity import Familiarity
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
        detector = context.artifacts.get(FAMILIARITY_ARTIFACT)  # versions registered before it have none
        self.familiarity = Familiarity.load(Path(detector)) if detector else None
        self.request_log = requestlog.RequestLog.from_environment()
        self.served_as = os.environ.get(requestlog.ENV_MODEL, "")

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
        """A row per photo: `label`, one probability column per class, `familiarity` and
        `unfamiliar`, `error` ("" when classified)."""
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            # MlflowException: the scoring server answers 400 with this line (any other exception: a trace)
            raise MlflowException.invalid_parameter_value(f"the request needs a column `{INPUT_COLUMN}` of photo "
                                                          "bytes (base64 in dataframe_split or dataframe_records)")
        photos = list(model_input[INPUT_COLUMN])
        if photos and all(_is_base64_photo(p) for p in photos):  # sent as `inputs` or `instances`
            raise MlflowException.invalid_parameter_value(
                f"the `{INPUT_COLUMN}` column holds base64 text, not photo bytes: the server decodes base64 only "
                "in dataframe_split or dataframe_records, not in inputs or instances")
        out, projections = self.classify(photos)
        if self.request_log is not None:
            self.log_requests(photos, out, projections)
        return out

    def classify(self, photos: list) -> tuple[pd.DataFrame, np.ndarray]:
        """The answer for each photo (as `predict`) and its features on the familiarity detector's
        principal axes (n, p), NaN for a row not classified (or a version without a detector)."""
        n = len(photos)
        out = pd.DataFrame({"label": [""] * n, **{c: [np.nan] * n for c in self.class_names},
                            FAMILIARITY: [np.nan] * n, UNFAMILIAR: [None] * n, "error": [""] * n})
        dims = self.familiarity.components.shape[1] if self.familiarity is not None else 0
        projections = np.full((n, dims), np.nan, np.float32)
        if n > MAX_ROWS:
            out["error"] = f"too_many_photos: a request takes at most {MAX_ROWS} photos, this one has {n}"
            photos = []
        arrays, rows = [], []
        for i, data in enumerate(photos):
            try:
                arrays.append(self.decode(data))
                rows.append(i)
            except ImageError as exc:
                out.loc[i, "error"] = f"{exc.reason}: {exc}"
        if arrays:
            probs, stats = self.predictor.with_features(np.stack(arrays))
            for i, p in zip(rows, probs):
                out.loc[i, "label"] = self.class_names[int(p.argmax())]
                out.loc[i, self.class_names] = p.astype(np.float64)
            if self.familiarity is not None:
                from cleanmessy.familiarity import embed

                features = embed(stats)
                scores = self.familiarity.familiarity(self.familiarity.scores(features))
                out.loc[rows, FAMILIARITY] = scores
                out[UNFAMILIAR] = out[UNFAMILIAR].astype(object)
                for i, flag in zip(rows, self.familiarity.unfamiliar(scores)):
                    out.at[i, UNFAMILIAR] = bool(flag)
                projections[rows] = self.familiarity.project(features)
        for c in self.class_names:  # a row not classified has none: null in JSON (NaN is not JSON)
            out[c] = out[c].astype(object).where(out["error"] == "", None)
        out[FAMILIARITY] = out[FAMILIARITY].astype(object).where(out[FAMILIARITY].notna(), None)
        return out[output_columns(self.class_names)], projections

    def log_requests(self, photos: list, out: pd.DataFrame, projections: np.ndarray) -> None:
        """A JSON line per photo in the request log (requestlog.py): never the photo, its sha256.
        A log that cannot be written (a full disk) is a warning; the answer still goes out."""
        now, records = requestlog.now(), []
        for i, row in enumerate(out.to_dict("records")):
            data = _as_bytes(photos[i]) if i < len(photos) else None
            classified = row["error"] == ""
            measured = classified and self.familiarity is not None
            records.append({
                "time": now, "source": self.log_source, "model": self.served_as,
                "sha256": hashlib.sha256(data).hexdigest() if data is not None else "",
                "label": row["label"],
                "probabilities": {c: round(float(row[c]), 6) for c in self.class_names} if classified else None,
                FAMILIARITY: round(float(row[FAMILIARITY]), 6) if measured else None,
                UNFAMILIAR: bool(row[UNFAMILIAR]) if measured else None,
                "projection": ([round(float(v), 4) for v in projections[i]]
                               if classified and projections.shape[1] else None),
                "error": row["error"].split(":", 1)[0]})
        try:
            self.request_log.append(records)
        except OSError as exc:
            log.warning("request log %s not written: %s", self.request_log.path, exc.strerror or exc)


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


def log_photo_classifier(keras_file: Path, familiarity_file: Path, card: str, config: dict[str, Any], example: bytes,
                         model_metadata: dict[str, Any]) -> Any:
    """Log the registered model to the active run (name "model"): PhotoClassifier as *models from
    code* (registered_model.py), the package as its code, the Keras file, the familiarity detector
    and the model card as artifacts, `config` (class names, image size, min_side, max_pixels) as its model config, a
    signature of photo bytes in and label, probabilities and error out, `example` (one photo's
    bytes) as its input example, pinned requirements and `model_metadata` in its MLmodel; returns the
    ModelInfo."""
    import tempfile

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    package = Path(__file__).parent
    outputs = [ColSpec(DataType.string, "label"), *(ColSpec(DataType.double, c) for c in config["class_names"]),
               ColSpec(DataType.double, FAMILIARITY, required=False),
               ColSpec(DataType.boolean, UNFAMILIAR, required=False), ColSpec(DataType.string, "error")]
    signature = ModelSignature(inputs=Schema([ColSpec(DataType.binary, INPUT_COLUMN)]),
                               outputs=Schema(outputs))
    with tempfile.TemporaryDirectory(prefix="cleanmessy-card-") as folder:
        card_file = Path(folder) / "model_card.md"
        card_file.write_text(card)
        # MLflow also logs the model config as run params; train logged `class_names` already, which
        # MLflow would warn about on every run ("Failed to log model config as params"): not news.
        config_log = logging.getLogger("mlflow.models.model")
        level = config_log.level
        config_log.setLevel(logging.ERROR)
        try:
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(package / "registered_model.py"),
                artifacts={KERAS_ARTIFACT: str(keras_file), FAMILIARITY_ARTIFACT: str(familiarity_file),
                           CARD_ARTIFACT: str(card_file)},
                code_paths=[str(package)],
                model_config=config,
                signature=signature,
                input_example=pd.DataFrame({INPUT_COLUMN: [example]}),
                pip_requirements=pip_requirements(),
                metadata=model_metadata,
            )
        finally:
            config_log.setLevel(level)
