"""Data tests on the real labelled room photos (../shared/datasets/clean-messy): they skip with the
reason shown where the folder is absent (a user's clone)."""

from __future__ import annotations

import hashlib

from conftest import REAL_PHOTOS, requires_real_photos
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
    kind, files = source_files(str(REAL_PHOTOS), "", tmp_path, tmp_path / "work", tmp_path / "images")
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
    _, files = source_files(str(REAL_PHOTOS), "", tmp_path, tmp_path / "work", tmp_path / "images")
    manifest = run_ingest(files, IngestParams(), tmp_path / "images", "data/images").manifest
    frame = assign_splits(manifest, SplitParams(), seed=42)
    check_splits(frame)
    counts = frame.groupby(["split", "label"]).size().to_dict()
    assert counts == {("test", "clean"): 10, ("test", "messy"): 10, ("train", "clean"): 76,
                      ("train", "messy"): 76, ("val", "clean"): 10, ("val", "messy"): 10}
