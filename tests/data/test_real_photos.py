"""Data tests on the real labelled room photos (../shared/datasets/clean-messy): they skip with the
reason shown where the folder is absent (a user's clone)."""

from __future__ import annotations

import hashlib

import pytest
from conftest import REAL_PHOTOS, REPO, requires_real_photos

from cleanmessy.params import IngestParams, SplitParams
from cleanmessy.stages.ingest import run_ingest, source_files
from cleanmessy.stages.split import assign_splits, check_splits

pytestmark = requires_real_photos


def _manifest_hashes() -> dict[str, str]:
    lines = (REAL_PHOTOS / "MANIFEST.sha256").read_text().splitlines()
    return {path: digest for digest, path in (line.split(maxsplit=1) for line in lines)}


def test_real_photos_ingest_completely_and_untouched(tmp_path):
    """All 192 photos pass validation, labelled by folder, with the published hashes; the source
    is byte-identical afterwards (checked against its MANIFEST.sha256)."""
    (tmp_path / "work").mkdir()
    kind, files, _ = source_files(str(REAL_PHOTOS), "", tmp_path, tmp_path / "work", tmp_path / "images")
    result = run_ingest(files, IngestParams(), tmp_path / "images", "data/images")
    assert kind == "folder"
    assert result.report["classes"] == {"clean": 96, "messy": 96}
    assert result.report["rejected"] == 0
    assert set(result.report["skipped_outside_class_folders"]) == {"MANIFEST.sha256", "SOURCE.md"}
    published = _manifest_hashes()
    manifest = result.manifest
    assert dict(zip(manifest["source_path"], manifest["sha256"])) == published
    assert set(manifest["original_split"]) == {"train"}
    assert (manifest[["width", "height"]] == 299).all().all()
    for rel, digest in published.items():
        assert hashlib.sha256((REAL_PHOTOS / rel).read_bytes()).hexdigest() == digest


def test_real_photos_split_is_stratified(tmp_path):
    """The default split of the real photos is stratified and keeps every class in every split."""
    (tmp_path / "work").mkdir()
    _, files, _ = source_files(str(REAL_PHOTOS), "", tmp_path, tmp_path / "work", tmp_path / "images")
    manifest = run_ingest(files, IngestParams(), tmp_path / "images", "data/images").manifest
    frame = assign_splits(manifest, SplitParams(), seed=42)
    check_splits(frame)
    counts = frame.groupby(["split", "label"]).size().to_dict()
    assert counts == {("test", "clean"): 10, ("test", "messy"): 10, ("train", "clean"): 76,
                      ("train", "messy"): 76, ("val", "clean"): 10, ("val", "messy"): 10}


WEIGHTS = REAL_PHOTOS.parents[1] / "keras-weights"


@pytest.mark.slow  # trains MobileNetV2 on 152 photos at 224 px
@pytest.mark.skipif(not (WEIGHTS / "mobilenet_v2_0.35_224_no_top_tm.h5").is_file(), reason=f"no weights in {WEIGHTS}")
def test_best_configuration_learns_the_real_photos(tmp_path, monkeypatch):
    """Model behaviour: the real-photo configuration (MobileNetV2 0.35, logistic head, 20 views)
    trained on the default split's 152 training photos gets at least 18 of the 20 held-out test
    photos right. Chance is 10; the seed CNN gets 11."""
    import numpy as np

    from cleanmessy.inference import Predictor
    from cleanmessy.inputs import label_indices
    from cleanmessy.models import build_model
    from cleanmessy.params import load_changes
    from cleanmessy.training import train_model

    monkeypatch.setenv("CLEANMESSY_KERAS_WEIGHTS", str(WEIGHTS))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "work").mkdir()
    _, files, _ = source_files(str(REAL_PHOTOS), "", tmp_path, tmp_path / "work", tmp_path / "images")
    manifest = run_ingest(files, IngestParams(), tmp_path / "images", "images").manifest
    frame = assign_splits(manifest, SplitParams(), seed=42)
    _, params = load_changes(REPO / "experiments" / "real-photos.yaml", REPO / "params.yaml")
    p, size, classes = params.train, params.base.image_size, ["clean", "messy"]
    model = build_model(2, size, p, params.base.seed)
    parts = {name: frame[frame["split"] == name] for name in ("train", "val", "test")}
    train_model(model, parts["train"], parts["val"], tmp_path, classes, size, p, params.base.seed)
    probs = Predictor(model, size, 32).predict_split(parts["test"], tmp_path)
    correct = int(np.sum(probs.argmax(1) == label_indices(parts["test"], classes)))
    assert correct >= 18, f"{correct}/20 test photos right"
