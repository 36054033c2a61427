"""ingest: sources (folder, zip, URL, sample), validation, dedup, class checks and the stored output."""

import hashlib
import io
import json
import tempfile
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cleanmessy.errors import UserError
from cleanmessy.params import IngestParams, Params
from cleanmessy.project import Paths
from cleanmessy.stages import ingest
from cleanmessy.stages.ingest import (
    Accepted,
    Rejected,
    check_classes,
    deduplicate,
    locate,
    run_ingest,
    source_files,
)

IMAGES_REL = "data/images"


# ---------------------------------------------------------------- helpers


def png_bytes(seed: int, size=(40, 40), mode="RGB") -> bytes:
    """A PNG of random pixels: a different seed gives different content."""
    w, h = size
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def make_source(folder: Path, files: dict[str, bytes | str]) -> Path:
    """Write `{relative path: content}` under `folder`."""
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    return folder


def two_classes(n: int = 2, seed: int = 0) -> dict[str, bytes]:
    """n distinct good PNGs in clean/ and n in messy/."""
    return {
        **{f"clean/{i}.png": png_bytes(seed + i) for i in range(n)},
        **{f"messy/{i}.png": png_bytes(seed + 1000 + i) for i in range(n)},
    }


def ingest_path(source: Path | str, tmp_path: Path, params: IngestParams = IngestParams(), sha256: str = ""):
    """source_files + run_ingest as the stage does, into tmp_path/out/images."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    kind, files, empty = source_files(str(source), sha256, tmp_path, work, tmp_path / "out" / "images")
    result = run_ingest(files, params, tmp_path / "out" / "images", IMAGES_REL, empty)
    return kind, result


def hash_tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def zip_folder(folder: Path, zip_path: Path, top: str | None = "top") -> Path:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                zf.write(p, f"{top}/{rel}" if top else rel)
    return zip_path


def rejection_reasons(report: dict) -> dict[str, str]:
    return {r["source_path"]: r["reason"] for r in report["rejections"]}


# ---------------------------------------------------------------- locate / deduplicate / check_classes


@pytest.mark.parametrize("rel, expected", [
    ("README.md", None),
    ("clean/0.png", ("clean", "")),
    ("images/train/clean/0.png", ("clean", "train")),
    ("images/valid/messy/0.png", ("messy", "val")),
    ("Validation/messy/x.jpg", ("messy", "val")),
    ("test/extra/clean/0.png", ("clean", "test")),
    ("train/a/val/clean/0.png", ("clean", "val")),
])
def test_locate(rel, expected):
    """locate reads the label from the parent folder and the nearest split folder above it."""
    assert locate(PurePosixPath(rel)) == expected


def acc(path: str, label: str, sha: str) -> Accepted:
    return Accepted(path, label, "", sha, 40, 40, "PNG")


def test_deduplicate_keeps_first_by_source_path():
    """Copies under one label: the first by source path is kept, the others are 'duplicate'."""
    kept, rejected = deduplicate([acc("clean/b.png", "clean", "h1"), acc("clean/a.png", "clean", "h1"),
                                  acc("clean/c.png", "clean", "h2")])
    assert sorted(a.source_path for a in kept) == ["clean/a.png", "clean/c.png"]
    assert [(r.source_path, r.reason) for r in rejected] == [("clean/b.png", "duplicate")]


def test_deduplicate_conflicting_labels_drops_all_copies():
    """Identical content under two labels: every copy is rejected as 'conflicting_labels'."""
    kept, rejected = deduplicate([acc("clean/a.png", "clean", "h"), acc("messy/a.png", "messy", "h"),
                                  acc("messy/z.png", "messy", "h")])
    assert kept == []
    assert sorted((r.source_path, r.reason) for r in rejected) == [
        ("clean/a.png", "conflicting_labels"), ("messy/a.png", "conflicting_labels"),
        ("messy/z.png", "conflicting_labels")]


def test_check_classes_needs_two():
    """One class is not enough."""
    with pytest.raises(UserError, match="at least 2 class"):
        check_classes({"clean": 1}, [])


def test_check_classes_names_empty_class():
    """A class seen only among rejections is named in the error."""
    bad = [Rejected("junk/x.png", "junk", "not_an_image", "")]
    with pytest.raises(UserError, match="class 'junk' has no usable image"):
        check_classes({"clean": 1, "messy": 1}, bad)


# ---------------------------------------------------------------- folder sources


def test_flat_folder_manifest(tmp_path):
    """A <class>/<image> folder gives one manifest row per image with the documented columns."""
    src = make_source(tmp_path / "src", two_classes(3))
    kind, result = ingest_path(src, tmp_path)
    m = result.manifest
    assert kind == "folder"
    assert list(m.columns) == ingest.MANIFEST_COLUMNS
    assert len(m) == 6
    assert m["label"].value_counts().to_dict() == {"clean": 3, "messy": 3}
    assert set(m["original_split"]) == {""}
    assert (m["width"] == 40).all() and (m["height"] == 40).all() and (m["format"] == "PNG").all()
    assert result.report["accepted"] == 6 and result.report["rejected"] == 0
    assert result.report["classes"] == {"clean": 3, "messy": 3}


def test_kaggle_nested_layout(tmp_path):
    """images/train/<class>/ and images/val/<class>/ give labels and original_split train/val."""
    src = make_source(tmp_path / "src", {
        "images/train/clean/0.png": png_bytes(1),
        "images/train/messy/0.png": png_bytes(2),
        "images/val/clean/0.png": png_bytes(3),
        "images/val/messy/0.png": png_bytes(4),
    })
    _, result = ingest_path(src, tmp_path)
    got = {r.source_path: (r.label, r.original_split) for r in result.manifest.itertuples()}
    assert got == {
        "images/train/clean/0.png": ("clean", "train"),
        "images/train/messy/0.png": ("messy", "train"),
        "images/val/clean/0.png": ("clean", "val"),
        "images/val/messy/0.png": ("messy", "val"),
    }
    assert result.report["original_splits"] == {"train": 2, "val": 2}


def test_same_name_in_both_classes_both_kept(tmp_path):
    """clean/0.png and messy/0.png (different content) are both kept and stored apart."""
    src = make_source(tmp_path / "src", {"clean/0.png": png_bytes(1), "messy/0.png": png_bytes(2)})
    _, result = ingest_path(src, tmp_path)
    m = result.manifest
    assert sorted(m["source_path"]) == ["clean/0.png", "messy/0.png"]
    assert m["path"].nunique() == 2


def truncated_png() -> bytes:
    data = png_bytes(7, size=(64, 64))
    return data[: len(data) // 2]


def sixteen_bit_png() -> bytes:
    buf = io.BytesIO()
    Image.new("I;16", (40, 40)).save(buf, format="PNG")
    return buf.getvalue()


BAD_FILES = {
    "not_an_image": lambda: b"just some text, not pixels\n",
    "truncated": truncated_png,
    "empty": lambda: b"",
    "unsupported_mode": sixteen_bit_png,
    "too_small": lambda: png_bytes(8, size=(20, 20)),
}


@pytest.mark.parametrize("reason", sorted(BAD_FILES))
def test_bad_file_is_rejected_with_reason(tmp_path, reason):
    """Each kind of bad file is reported with its reason and left out of the manifest."""
    src = make_source(tmp_path / "src", {**two_classes(2), "clean/bad.png": BAD_FILES[reason]()})
    _, result = ingest_path(src, tmp_path)
    assert rejection_reasons(result.report) == {"clean/bad.png": reason}
    assert "clean/bad.png" not in set(result.manifest["source_path"])
    assert len(result.manifest) == 4
    assert result.report["files"] == 5 and result.report["rejected"] == 1


def test_duplicate_under_same_label(tmp_path):
    """Identical content twice in one class: one copy kept, the other rejected 'duplicate'."""
    same = png_bytes(5)
    src = make_source(tmp_path / "src", {**two_classes(1), "clean/a.png": same, "clean/b.png": same})
    _, result = ingest_path(src, tmp_path)
    assert rejection_reasons(result.report) == {"clean/b.png": "duplicate"}
    m = result.manifest
    assert "clean/a.png" in set(m["source_path"]) and "clean/b.png" not in set(m["source_path"])
    assert m["sha256"].is_unique


def test_same_content_under_two_labels(tmp_path):
    """Identical content in clean/ and messy/: both copies rejected 'conflicting_labels'."""
    same = png_bytes(5)
    src = make_source(tmp_path / "src", {**two_classes(1), "clean/x.png": same, "messy/x.png": same})
    _, result = ingest_path(src, tmp_path)
    assert rejection_reasons(result.report) == {"clean/x.png": "conflicting_labels",
                                                "messy/x.png": "conflicting_labels"}
    assert hashlib.sha256(same).hexdigest() not in set(result.manifest["sha256"])


def test_readme_at_root_is_skipped(tmp_path):
    """A file at the source root is listed as skipped, not rejected, and is not a class."""
    src = make_source(tmp_path / "src", {**two_classes(1), "README.md": "# my rooms\n"})
    _, result = ingest_path(src, tmp_path)
    assert result.report["skipped_outside_class_folders"] == ["README.md"]
    assert result.report["rejections"] == []
    assert result.report["classes"] == {"clean": 1, "messy": 1}


def test_hidden_files_ignored(tmp_path):
    """Dot files and dot folders (e.g. .DS_Store) are neither rejected nor skipped."""
    src = make_source(tmp_path / "src", {**two_classes(1), "clean/.DS_Store": "junk", ".git/x/y": "z"})
    _, result = ingest_path(src, tmp_path)
    assert result.report["rejections"] == [] and result.report["skipped_outside_class_folders"] == []
    assert result.report["files"] == 2


def test_single_class_is_an_error(tmp_path):
    """A source with only one class folder is a UserError."""
    src = make_source(tmp_path / "src", {"clean/0.png": png_bytes(1), "clean/1.png": png_bytes(2)})
    with pytest.raises(UserError, match="at least 2 class folders"):
        ingest_path(src, tmp_path)


def test_class_with_only_bad_files_is_named(tmp_path):
    """A class whose every file is rejected makes ingest fail, naming that class."""
    src = make_source(tmp_path / "src", {
        "clean/0.png": png_bytes(1), "clean/1.png": png_bytes(2),
        "messy/0.png": b"", "messy/1.png": b"text",
    })
    with pytest.raises(UserError, match="class 'messy' has no usable image"):
        ingest_path(src, tmp_path)


def test_loose_file_in_split_folder_is_not_a_class(tmp_path):
    """A notes file inside train/ does not turn 'train' into a class."""
    src = make_source(tmp_path / "src", {
        "train/clean/0.png": png_bytes(1), "train/messy/0.png": png_bytes(2),
        "train/labels.csv": "file,label\n",
    })
    _, result = ingest_path(src, tmp_path)
    assert result.report["classes"] == {"clean": 1, "messy": 1}


def test_source_folder_unchanged(tmp_path):
    """Ingest only reads the source: every file is byte-for-byte the same afterwards."""
    src = make_source(tmp_path / "src", {**two_classes(2), "clean/bad.png": b"", "README.md": "x",
                                         "messy/dup.png": png_bytes(1000)})
    before = hash_tree(src)
    ingest_path(src, tmp_path)
    assert hash_tree(src) == before


def test_stored_files_match_manifest(tmp_path):
    """Each manifest path exists under images_dir and hashes to its sha256; nothing else is stored."""
    src = make_source(tmp_path / "src", {**two_classes(2), "clean/bad.png": b"x"})
    _, result = ingest_path(src, tmp_path)
    images_dir = tmp_path / "out" / "images"
    stored = {}
    for row in result.manifest.itertuples():
        assert row.path.startswith(IMAGES_REL + f"/{row.label}/")
        stored[row.path[len(IMAGES_REL) + 1:]] = row.sha256
    assert hash_tree(images_dir) == stored


def test_rerun_replaces_old_images(tmp_path):
    """A stale file in images_dir from an earlier run is removed."""
    stale = tmp_path / "out" / "images" / "clean" / "old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(png_bytes(99))
    src = make_source(tmp_path / "src", two_classes(1))
    ingest_path(src, tmp_path)
    assert not stale.exists()


def test_source_inside_images_dir_survives(tmp_path):
    """Ingesting the images folder itself does not destroy it."""
    images = make_source(tmp_path / "out" / "images", two_classes(1))
    before = hash_tree(images)
    try:
        ingest_path(images, tmp_path)
    except UserError:
        pass  # refusing the overlap is an acceptable fix
    assert hash_tree(images) == before


def test_sample_recipe_source(tmp_path):
    """A folder with sample.yaml is rendered as the synthetic data set."""
    src = make_source(tmp_path / "sample", {"sample.yaml": "per_class: 2\nsize: 64\nseed: 0\n"})
    kind, result = ingest_path(src, tmp_path)
    assert kind == "sample"
    assert result.report["classes"] == {"clean": 2, "messy": 2}


def test_relative_source_resolved_from_root(tmp_path):
    """A relative ingest.source is resolved against the project root."""
    make_source(tmp_path / "data" / "mine", two_classes(1))
    kind, result = ingest_path("data/mine", tmp_path)
    assert kind == "folder" and len(result.manifest) == 2


# ---------------------------------------------------------------- zip sources


def test_zip_with_top_folder_matches_folder(tmp_path):
    """A .zip of the folder (single top folder) gives the same images, labels and splits."""
    src = make_source(tmp_path / "src", {
        **{f"train/{k}": v for k, v in two_classes(2).items()},
        "val/clean/0.png": png_bytes(50), "val/messy/0.png": png_bytes(51),
        "train/clean/bad.png": b"",
    })
    _, from_folder = ingest_path(src, tmp_path)
    archive = zip_folder(src, tmp_path / "src.zip", top="rooms")
    kind, from_zip = ingest_path(archive, tmp_path)
    assert kind == "zip"
    cols = ["sha256", "label", "original_split", "path", "source_path"]
    assert from_zip.manifest[cols].equals(from_folder.manifest[cols])
    assert rejection_reasons(from_zip.report) == {"train/clean/bad.png": "empty"}


def test_zip_without_top_folder(tmp_path):
    """A zip whose root holds the class folders works too."""
    src = make_source(tmp_path / "src", two_classes(2))
    archive = zip_folder(src, tmp_path / "flat.zip", top=None)
    _, result = ingest_path(archive, tmp_path)
    assert result.report["classes"] == {"clean": 2, "messy": 2}


def test_zip_ignores_macosx_metadata(tmp_path):
    """__MACOSX/ entries that Finder adds to zips are ignored."""
    src = make_source(tmp_path / "src", two_classes(1))
    archive = zip_folder(src, tmp_path / "mac.zip", top="rooms")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("__MACOSX/rooms/clean/._0.png", b"\x00\x05\x16\x07junk")
    _, result = ingest_path(archive, tmp_path)
    assert result.report["rejections"] == [] and result.report["files"] == 2


def test_zip_with_top_folder_and_readme(tmp_path):
    """A zip of a folder with a README at its top ingests like the folder does."""
    src = make_source(tmp_path / "src", {**two_classes(2), "README.md": "about these rooms\n"})
    _, from_folder = ingest_path(src, tmp_path)
    archive = zip_folder(src, tmp_path / "src.zip", top="rooms")
    _, from_zip = ingest_path(archive, tmp_path)
    assert set(from_zip.manifest["sha256"]) == set(from_folder.manifest["sha256"])


def test_not_a_zip_file(tmp_path):
    """A file that is neither a folder nor a zip is a UserError."""
    path = tmp_path / "data.tar"
    path.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="neither a folder nor a readable .zip"):
        ingest_path(path, tmp_path)


def test_missing_source(tmp_path):
    """A source path that does not exist is a UserError naming it."""
    with pytest.raises(UserError, match="does not exist"):
        source_files(str(tmp_path / "nowhere"), "", tmp_path, tmp_path)


def test_url_without_sha256(tmp_path):
    """A URL source without ingest.sha256 is refused before any download."""
    with pytest.raises(UserError, match=r"ingest\.sha256"):
        source_files("https://example.invalid/rooms.zip", "", tmp_path, tmp_path)


# ---------------------------------------------------------------- URL sources (real local HTTP server)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """(folder, base URL) of a real HTTP server on 127.0.0.1 serving that folder."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    served = tmp_path / "served"
    served.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_url_with_right_sha256(tmp_path, http_root):
    """A zip downloaded over HTTP with the right sha256 ingests like the folder."""
    served, base = http_root
    src = make_source(tmp_path / "src", two_classes(2))
    archive = zip_folder(src, served / "rooms.zip", top="rooms")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    kind, result = ingest_path(f"{base}/rooms.zip", tmp_path, sha256=digest.upper())
    assert kind == "url"
    _, from_folder = ingest_path(src, tmp_path)
    assert set(result.manifest["sha256"]) == set(from_folder.manifest["sha256"])


def test_url_with_wrong_sha256(tmp_path, http_root):
    """A download whose sha256 does not match is a UserError."""
    served, base = http_root
    zip_folder(make_source(tmp_path / "src", two_classes(1)), served / "rooms.zip")
    with pytest.raises(UserError, match="has sha256"):
        ingest_path(f"{base}/rooms.zip", tmp_path, sha256="0" * 64)


def test_url_not_found(tmp_path, http_root):
    """An HTTP 404 is a UserError, not a traceback."""
    _, base = http_root
    with pytest.raises(UserError, match="could not download"):
        ingest_path(f"{base}/missing.zip", tmp_path, sha256="0" * 64)


@pytest.mark.parametrize("has_dvc", [True, False], ids=["dvc-project", "plain-folder"])
def test_url_download_stays_inside_the_project_and_is_removed(tmp_path, http_root, monkeypatch, has_dvc):
    """The stage downloads into a temporary folder under .dvc/tmp (DVC's git-ignored scratch
    folder; the project root when there is no .dvc/), never the system's temp folder, and that
    folder is gone afterwards, also when the download fails its check."""
    served, base = http_root
    archive = zip_folder(make_source(tmp_path / "src", two_classes(2)), served / "rooms.zip")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    root = tmp_path / "project"
    (root / ".dvc" if has_dvc else root).mkdir(parents=True)
    scratch = root / ".dvc" / "tmp" if has_dvc else root
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    dests = []
    real_download = ingest.download

    def spy(url: str, sha256: str, dest: Path) -> None:
        dests.append(dest)
        real_download(url, sha256, dest)
    monkeypatch.setattr(ingest, "download", spy)

    def leftovers() -> list[str]:
        return [p.name for p in scratch.iterdir() if p.name.startswith("ingest-")]

    ingest.main(Paths(root), Params(ingest=IngestParams(source=f"{base}/rooms.zip", sha256=digest)))
    assert dests[0].parent.parent == scratch and dests[0].parent.name.startswith("ingest-")
    assert json.loads((root / "data" / "ingest_report.json").read_text())["source_kind"] == "url"
    assert leftovers() == []
    with pytest.raises(UserError, match="has sha256"):
        ingest.main(Paths(root), Params(ingest=IngestParams(source=f"{base}/rooms.zip", sha256="0" * 64)))
    assert dests[1].parent.parent == scratch and leftovers() == []
    assert list(system_tmp.iterdir()) == []


def test_url_download_shows_a_progress_bar_in_mib(tmp_path, http_root, monkeypatch):
    """The download is a bar counting MiB of the announced size, one step per MiB streamed to disk."""
    served, base = http_root
    body = bytes(3 * 2**20 + 1)
    (served / "big.zip").write_bytes(body)
    bars, steps = [], []

    def fake_progress(iterable, total, desc, unit="photo"):
        bars.append((desc, total, unit))
        for item in iterable:
            steps.append(len(item))
            yield item
    monkeypatch.setattr(ingest, "progress", fake_progress)
    ingest.download(f"{base}/big.zip", hashlib.sha256(body).hexdigest(), tmp_path / "big.zip")
    assert bars == [("ingest: downloading", 4, "MiB")]
    assert steps == [2**20] * 3 + [1]
    assert (tmp_path / "big.zip").read_bytes() == body


# ---------------------------------------------------------------- hostile sources (issue 10)


def reasons(result) -> dict[str, str]:
    return {r["source_path"]: r["reason"] for r in result.report["rejections"]}


def files_under(folder: Path) -> set[str]:
    return {p.as_posix() for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize("name", ["/evil.png", "/abs/x.png", "clean/../../evil.png", "../messy/x.png",
                                  "C:/clean/x.png", "clean\\x.png", "clean//x.png", "./clean/x.png"])
def test_unsafe_zip_entry_names_are_rejected_and_never_written(tmp_path, name):
    """A zip entry whose name is absolute, climbs out, has a drive letter, a backslash or an empty
    part is reported as unsafe_path; it never becomes a class and nothing is written outside."""
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for rel, data in two_classes(2).items():
            z.writestr(rel, data)
        z.writestr(name, png_bytes(99))
    _, result = ingest_path(archive, tmp_path)
    assert reasons(result)[name] == "unsafe_path"
    assert result.report["classes"] == {"clean": 2, "messy": 2}
    written = files_under(tmp_path / "out")
    assert all(p.startswith((tmp_path / "out" / "images").as_posix()) for p in written)
    assert not Path("/evil.png").exists()


def test_zip_bomb_is_rejected_from_its_header_without_inflating(tmp_path):
    """A 1 GiB entry of zeros compresses to ~1 MB: rejected as zip_bomb by its declared ratio,
    before any inflation (the test would take gigabytes and many seconds otherwise)."""
    import time

    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for rel, data in two_classes(2).items():
            z.writestr(rel, data)
        with z.open("messy/bomb.png", "w", force_zip64=True) as member:
            block = bytes(1 << 20)
            for _ in range(1024):
                member.write(block)
    assert archive.stat().st_size < 5 * 2**20
    started = time.perf_counter()
    _, result = ingest_path(archive, tmp_path)
    assert reasons(result)["messy/bomb.png"] in ("zip_bomb", "file_too_large")
    assert time.perf_counter() - started < 10
    assert result.report["classes"] == {"clean": 2, "messy": 2}


def test_zip_entry_over_the_file_limit_is_refused_unread(tmp_path, monkeypatch):
    """An entry over the per-file limit is reported as file_too_large; the others are ingested."""
    monkeypatch.setattr(ingest, "MAX_FILE_BYTES", 20_000)  # the 40x40 photos are ~5 KB, the 200x200 one ~120 KB
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for rel, data in two_classes(2).items():
            z.writestr(rel, data)
        z.writestr("messy/huge.png", png_bytes(7, size=(200, 200)))
    _, result = ingest_path(archive, tmp_path)
    assert reasons(result)["messy/huge.png"] == "file_too_large"
    assert result.report["classes"] == {"clean": 2, "messy": 2}


def test_symlinks_in_a_folder_source_are_reported_not_followed(tmp_path):
    """Links to a file outside the source, to /etc/passwd and to a folder outside are each
    reported as `symlink` and never read."""
    src = make_source(tmp_path / "src", two_classes(2))
    outside = tmp_path / "outside"
    make_source(outside, {"photo.png": png_bytes(500), "sub/other.png": png_bytes(501)})
    (src / "clean" / "stolen.png").symlink_to(outside / "photo.png")
    (src / "messy" / "passwd.png").symlink_to("/etc/passwd")
    (src / "clean" / "linked-folder").symlink_to(outside / "sub")
    _, result = ingest_path(src, tmp_path)
    got = reasons(result)
    for name in ("clean/stolen.png", "messy/passwd.png", "clean/linked-folder"):
        assert got[name] == "symlink", (name, got)
    assert result.report["classes"] == {"clean": 2, "messy": 2}


def test_broken_link_in_a_folder_source_is_refused_as_dvc_refuses_it(tmp_path):
    """DVC cannot hash a source holding a link to nothing, so ingest refuses it too (one rule):
    one line naming the link, and nothing written."""
    src = make_source(tmp_path / "src", two_classes(2))
    (src / "messy" / "dangling.png").symlink_to(tmp_path / "nothing-here.png")
    with pytest.raises(UserError, match=r"messy/dangling.png is a broken link .*nothing-here.png.*remove the link"):
        ingest_path(src, tmp_path)


def test_macosx_folder_in_a_folder_source_is_skipped(tmp_path):
    """__MACOSX/ (from unpacking a Mac zip) is skipped in folders as in zips: its copy of a photo
    is not ingested, and the genuine photo is not reported as its duplicate."""
    files = two_classes(2)
    src = make_source(tmp_path / "src", {**files, "__MACOSX/clean/0.png": files["clean/0.png"]})
    _, result = ingest_path(src, tmp_path)
    assert result.report["rejected"] == 0 and result.report["classes"] == {"clean": 2, "messy": 2}


def test_class_folders_differing_only_in_case_are_refused(tmp_path):
    src = make_source(tmp_path / "src", {**two_classes(2), "Clean/9.png": png_bytes(77)})
    with pytest.raises(UserError, match="class folders 'Clean' and 'clean' differ only in case"):
        ingest_path(src, tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    """An empty messy/ is named in the error; an empty third folder is reported, not silent."""
    src = make_source(tmp_path / "src", {f"clean/{i}.png": png_bytes(i) for i in range(2)})
    (src / "messy").mkdir()
    with pytest.raises(UserError, match=r"found only 'clean' \(messy/ empty\)"):
        ingest_path(src, tmp_path)
    (src / "messy" / "0.png").write_bytes(png_bytes(300))
    (src / "other").mkdir()
    _, result = ingest_path(src, tmp_path)
    assert result.report["empty_folders"] == ["other"]


def test_manifest_records_the_upright_size_of_an_exif_rotated_photo(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (80, 40), "white").save(buf, format="JPEG", exif=exif.tobytes())
    src = make_source(tmp_path / "src", {**two_classes(2), "clean/rotated.jpg": buf.getvalue()})
    _, result = ingest_path(src, tmp_path)
    row = result.manifest[result.manifest["source_path"] == "clean/rotated.jpg"].iloc[0]
    assert (row["width"], row["height"]) == (40, 80)


def test_png_text_bomb_is_rejected_and_the_rest_ingested(tmp_path):
    """A valid PNG whose zTXt chunk inflates past PIL's limit is that file's reason; ingest goes
    on and writes its report."""
    import struct
    import zlib

    png = png_bytes(1)
    body = b"Comment\x00\x00" + zlib.compress(b"A" * 2_000_000, 9)
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body) & 0xFFFFFFFF)
    src = make_source(tmp_path / "src", {**two_classes(2), "messy/text-bomb.png": png[:33] + chunk + png[33:]})
    _, result = ingest_path(src, tmp_path)
    assert reasons(result)["messy/text-bomb.png"] in ("corrupt", "truncated")


def test_url_download_is_capped(tmp_path, http_root, monkeypatch):
    """A download past the size cap stops with a one-line error, not a full disk."""
    served, base = http_root
    (served / "big.zip").write_bytes(bytes(3 << 20))
    monkeypatch.setattr(ingest, "MAX_DOWNLOAD_BYTES", 1 << 20)
    with pytest.raises(UserError, match="passed 1,048,576 bytes; stopped"):
        ingest_path(f"{base}/big.zip", tmp_path, sha256="0" * 64)


# ---------------------------------------------------------------- hardening, second round (issue 21)


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_a_named_pipe_or_socket_in_a_folder_source_is_refused_in_one_line(tmp_path, kind):
    """DVC waits forever on a named pipe while it hashes a source; ingest (and `cleanmessy check`,
    which `make run` runs before `dvc repro`) refuses it, naming it, before anything is written."""
    import os
    import socket

    src = make_source(tmp_path / "src", two_classes(2))
    special = src / "clean" / "p.png"
    if kind == "fifo":
        os.mkfifo(special)
    else:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(special))
    expected = "a named pipe" if kind == "fifo" else "a socket"
    with pytest.raises(UserError, match=f"p.png is {expected}, not a photo") as error:
        ingest_path(src, tmp_path)
    assert "\n" not in str(error.value) and not (tmp_path / "out" / "images").exists()


def test_class_folders_differing_only_in_unicode_normalisation_are_refused(tmp_path):
    """`café/` written twice, once NFC (é) and once NFD (e + ´): one name to a reader, two to the
    file system. Not two classes that look alike: one line saying how they differ."""
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    src = make_source(tmp_path / "src",
                      {**two_classes(2), f"{nfc}/1.png": png_bytes(71), f"{nfd}/2.png": png_bytes(72)})
    with pytest.raises(UserError, match="differ only in how their letters are encoded"):
        ingest_path(src, tmp_path)


def test_two_zip_entries_of_one_name_ingest_the_first_and_report_the_other(tmp_path):
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        for name, data in two_classes(2).items():
            z.writestr(name, data)
        z.writestr("clean/0.png", png_bytes(99))
    _, result = ingest_path(archive, tmp_path)
    reasons = rejection_reasons(result.report)
    assert reasons == {"clean/0.png": "duplicate_name"}, reasons
    assert result.report["classes"] == {"clean": 2, "messy": 2}
    result.write_manifest(tmp_path / "manifest.csv")
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    assert manifest["source_path"].is_unique and len(manifest) == 4


def test_rejections_are_logged_a_few_then_summarised(tmp_path, caplog):
    """100 files that are not images: 20 lines, then one counting the rest by reason; the report
    lists every one."""
    bad = {f"clean/bad{i:03d}.png": b"not an image" for i in range(100)}
    src = make_source(tmp_path / "src", {**two_classes(2), **bad})
    with caplog.at_level("WARNING"):
        _, result = ingest_path(src, tmp_path)
    left_out = [r for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == ingest.REJECTIONS_SHOWN + 1
    assert left_out[-1].getMessage() == ("... and 80 more left out (not_an_image 80): every one is in "
                                         "ingest_report.json")
    assert result.report["rejected"] == 100


def test_a_full_disk_while_writing_the_manifest_leaves_the_previous_data_whole(tmp_path, monkeypatch):
    """Every output goes to a temporary name first: no space left for the manifest (after every
    image is written) is one line, and the previous images, manifest and report are untouched."""
    import errno

    root = tmp_path / "project"
    make_source(root / "photos", two_classes(2))
    params = Params(ingest=IngestParams(source="photos"))
    ingest.main(Paths(root), params)
    before = {**hash_tree(root / "data")}
    make_source(root / "photos", {"clean/new.png": png_bytes(500)})  # a new photo: a different output

    def full(self, path):
        Path(path).write_bytes(b"path,la")  # a part written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ingest.IngestResult, "write_manifest", full)
    with pytest.raises(UserError, match=r"^no space left on the device while ingesting .*nothing was") as error:
        ingest.main(Paths(root), params)
    assert "\n" not in str(error.value)
    assert hash_tree(root / "data") == before  # no partial file either
