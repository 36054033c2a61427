"""A registered model, loaded once for serving: the version's `pyfunc.PhotoClassifier` (the one
loading path: the REST server loads the same), its class names, input size, training data and
smallest accepted photo side, the compiled forward pass and Grad-CAM."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cleanmessy import interrupts, tracking
from cleanmessy.images import to_model_input
from cleanmessy.params import IngestParams
from cleanmessy.pyfunc import INPUT_COLUMN, PhotoClassifier
from cleanmessy.requestlog import RequestLog

log = logging.getLogger(__name__)

# Models registered before evaluate recorded `min_side` were trained on data ingested with the
# default ingest.min_side.
DEFAULT_MIN_SIDE = IngestParams().min_side


def explained_class(class_names: list[str]) -> int:
    """The class whose score the heat map explains: "messy" when the model has it, else the last."""
    return class_names.index("messy") if "messy" in class_names else len(class_names) - 1


@dataclass
class ServedModel:
    """Everything a server needs from the registry, loaded once at start-up."""

    version: tracking.RegisteredVersion
    class_names: list[str]
    image_size: int
    classifier: PhotoClassifier  # the registered model itself: photo bytes in, label and probabilities out
    model_card: str = ""
    # What evaluate recorded about the training data: {"kind", "family", "description", "n_images", "classes"};
    # None for versions registered before it did.
    training_data: dict | None = None
    min_side: int = DEFAULT_MIN_SIDE  # photos smaller than this on a side are refused, as ingest refused them
    test_images: int | None = None  # how many held-out images test_accuracy was measured on
    data_manifest_sha256: str = ""  # the ingested data's manifest hash its training run recorded

    @classmethod
    def load(cls, model_uri: str, request_log: RequestLog | None = None) -> ServedModel:
        """Resolve `model_uri` in the configured registry, download and load that exact version;
        with `request_log`, every photo it classifies is logged there as the app's."""
        from cleanmessy.pyfunc import load_photo_classifier

        version = tracking.resolve_version(model_uri)
        local, meta = tracking.download_version(version.uri)
        classifier = load_photo_classifier(local, version.uri)
        classifier.request_log, classifier.log_source = request_log, "app"
        classifier.served_as = f"{version.name}/{version.version}"
        training_data = _training_data(meta)
        if training_data and not training_data["family"]:  # registered before the metadata held it
            training_data["family"] = tracking.version_family(version.tags)
        served = cls(version, classifier.class_names, classifier.image_size, classifier, classifier.model_card,
                     training_data=training_data, min_side=classifier.min_side,
                     test_images=_positive_int(version.tags.get("test_images")),
                     data_manifest_sha256=tracking.run_tag(version.run_id, "data_manifest_sha256"))
        served._compile()
        return served

    def _compile(self) -> None:
        """Compile the forward pass and Grad-CAM once and run both, so no request pays for tracing."""
        from cleanmessy.serving.explain import gradcam_function

        self._predictor = self.classifier.predictor
        self._explain = gradcam_function(self.keras_model, self.image_size)
        self._explained_class = explained_class(self.class_names)
        warm = np.zeros((1, self.image_size, self.image_size, 3), np.uint8)
        with interrupts.deferred():
            self.predict(warm)
            self._explain(warm, np.int32(self._explained_class))
        log.info("loaded %s (%s), classes %s, %d px", self.version.uri, ",".join(self.version.aliases) or "no alias",
                 self.class_names, self.image_size)

    @property
    def keras_model(self):
        return self.classifier.keras_model

    @property
    def has_familiarity(self) -> bool:
        """Whether this version scores familiarity (versions registered before it do not)."""
        return self.classifier.familiarity is not None

    def classify(self, photos: list, log: bool = True) -> pd.DataFrame:
        """The registered model's answer for photos' bytes: `label`, a probability per class,
        `familiarity`, `unfamiliar` and `error` per row, exactly as the REST server gives it;
        logged when serving with a request log, unless `log` is False (a photo classified again
        to record a correction was logged when it was first classified)."""
        if not log:
            return self.classifier.classify(photos)[0]
        return self.classifier.predict(None, pd.DataFrame({INPUT_COLUMN: photos}))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a uint8 batch (n, size, size, 3), `photos_per_step` at a time."""
        return self._predictor(batch)

    @property
    def photos_per_step(self) -> int:
        """The most photos one forward step takes (fewer for multi-view models: bounded memory)."""
        return self._predictor.step

    def explain(self, photo) -> tuple[np.ndarray, np.ndarray]:
        """`(probabilities, heat map in [0, 1])` for one RGB PIL photo; the map explains "messy"."""
        x = to_model_input(photo, self.image_size)[None]
        probs, cam = self._explain(x, np.int32(self._explained_class))
        return probs.numpy()[0], cam.numpy()[0]

    def info(self) -> dict:
        """What the app shows and the `model_info` endpoint returns."""
        v = self.version
        return {"name": v.name, "version": v.version, "stages": v.aliases, "test_accuracy": v.test_accuracy,
                "test_images": self.test_images, "run_id": v.run_id, "uri": v.uri, "class_names": self.class_names,
                "image_size": self.image_size, "training_data": self.training_data, "min_side": self.min_side,
                "promotion": v.description.split("\n\n", 1)[0].strip("*"), "model_card": self.model_card}


def _positive_int(value) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _training_data(meta: dict) -> dict | None:
    """The MLmodel's `training_data`, or None when this version predates it (or it is malformed)."""
    data = meta.get("training_data")
    if not isinstance(data, dict) or not data.get("description"):
        return None
    classes = data.get("classes") if isinstance(data.get("classes"), dict) else {}
    return {"kind": str(data.get("kind", "")), "family": str(data.get("family", "")),
            "description": str(data["description"]),
            "n_images": _positive_int(data.get("n_images")),
            "classes": {str(c): int(n) for c, n in classes.items() if isinstance(n, int) and n >= 0}}


