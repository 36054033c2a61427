"""ingest: a source of labelled room photos -> data/images/, data/manifest.csv, data/ingest_report.json.

Sources: a folder whose sub-folders are the class names (at any depth; train/val/test folders
above them are kept as `original_split`), a .zip of such a folder, an http(s) URL of such a zip
(checked against `ingest.sha256`), or a sample recipe folder (`data/sample`, the embedded default).
Every file is validated; bad ones are reported with a reason and left out. The source is only read.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from cleanmessy import sample
from cleanmessy.errors import UserError
from cleanmessy.images import ImageError, open_rgb
from cleanmessy.params import IngestParams, Params
from cleanmessy.project import Paths

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MANIFEST_COLUMNS = ["path", "label", "sha256", "width", "height", "format", "original_split", "source_path"]
FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}

Reader = Callable[[], bytes]


@dataclass(frozen=True)
class Accepted:
    source_path: str
    label: str
    original_split: str
    sha256: str
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class Rejected:
    source_path: str
    label: str
    reason: str
    detail: str


# ---------------------------------------------------------------- pure core


def locate(rel: PurePosixPath) -> tuple[str, str] | None:
    """`(label, original_split)` of a file from its path inside the source, or None when the file
    is not inside a class folder (e.g. a README at the top). The label is the parent folder's name;
    the split is the nearest folder above it called train/val/valid/validation/test."""
    if len(rel.parts) < 2 or rel.parts[-2].lower() in SPLIT_NAMES:
        return None  # at the top, or loose in a split folder (train/labels.csv): not in a class
    split = next((SPLIT_NAMES[p.lower()] for p in reversed(rel.parts[:-2]) if p.lower() in SPLIT_NAMES), "")
    return rel.parts[-2], split


def inspect(rel: str, label: str, split: str, data: bytes, params: IngestParams) -> Accepted | Rejected:
    """Decode one file fully and decide whether it goes in."""
    try:
        _, info = open_rgb(data, min_side=params.min_side, max_pixels=params.max_pixels)
    except ImageError as exc:
        return Rejected(rel, label, exc.reason, str(exc))
    return Accepted(rel, label, split, hashlib.sha256(data).hexdigest(), info.width, info.height, info.format)


def deduplicate(accepted: list[Accepted]) -> tuple[list[Accepted], list[Rejected]]:
    """Keep the first file (by source path) of each content; identical content under two different
    labels is a labelling conflict, and all its copies are left out."""
    by_hash: dict[str, list[Accepted]] = {}
    for a in sorted(accepted, key=lambda a: a.source_path):
        by_hash.setdefault(a.sha256, []).append(a)
    kept: list[Accepted] = []
    rejected: list[Rejected] = []
    for copies in by_hash.values():
        labels = sorted({c.label for c in copies})
        if len(labels) > 1:
            for c in copies:
                rejected.append(Rejected(c.source_path, c.label, "conflicting_labels",
                                         f"same content is labelled {' and '.join(labels)}"))
            continue
        kept.append(copies[0])
        for c in copies[1:]:
            rejected.append(Rejected(c.source_path, c.label, "duplicate",
                                     f"same content as {copies[0].source_path}"))
    return kept, rejected


def check_classes(kept: list[Accepted], rejected: list[Rejected]) -> None:
    """At least two classes, and no class left without a usable image."""
    seen = sorted({r.label for r in rejected} | {a.label for a in kept})
    counts = Counter(a.label for a in kept)
    empty = [label for label in seen if counts[label] == 0]
    if empty:
        n_bad = sum(r.label == empty[0] for r in rejected)
        raise UserError(f"class '{empty[0]}' has no usable image ({n_bad} rejected; see the reasons above)")
    if len(counts) < 2:
        found = f"only '{next(iter(counts))}'" if counts else "none"
        raise UserError(
            f"a source needs at least 2 class folders holding images, found {found}; "
            "lay it out as <source>/<class>/<image> (e.g. clean/ and messy/)"
        )


def stored_name(a: Accepted) -> str:
    """Where an accepted image is kept under data/images/: by label and content hash, since source
    names repeat across classes (clean/0.png, messy/0.png)."""
    return f"{a.label}/{a.sha256[:16]}{FORMAT_SUFFIX.get(a.format, '.img')}"


def manifest_frame(kept: list[Accepted], images_rel: str) -> pd.DataFrame:
    rows = [
        {**asdict(a), "path": f"{images_rel}/{stored_name(a)}"}
        for a in sorted(kept, key=lambda a: (a.label, a.sha256))
    ]
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


# ---------------------------------------------------------------- sources (I/O edge)


def _walk_folder(folder: Path) -> Iterator[tuple[PurePosixPath, Reader]]:
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        yield PurePosixPath(rel.as_posix()), path.read_bytes


def _walk_zip(archive: zipfile.ZipFile) -> Iterator[tuple[PurePosixPath, Reader]]:
    # Members are read in memory, never extracted: no path in the archive can write anywhere.
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        rel = PurePosixPath(info.filename)
        if info.is_dir() or any(p.startswith((".", "__MACOSX")) for p in rel.parts):
            continue
        yield rel, (lambda name=info.filename: archive.read(name))


def _strip_common_root(files: list[tuple[PurePosixPath, Reader]]) -> list[tuple[PurePosixPath, Reader]]:
    """A zip of `images/` holds `images/clean/...`: the single top folder is not a class."""
    tops = {rel.parts[0] for rel, _ in files}
    if len(tops) == 1 and all(len(rel.parts) > 1 for rel, _ in files) and any(len(rel.parts) > 2 for rel, _ in files):
        return [(PurePosixPath(*rel.parts[1:]), read) for rel, read in files]
    return files


def _sample_files(folder: Path) -> Iterator[tuple[PurePosixPath, Reader]]:
    recipe = sample.read_recipe(folder)
    for rel, _label, img in sample.generate(recipe):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
        yield PurePosixPath(rel), (lambda data=data: data)


def download(url: str, sha256: str, dest: Path) -> None:
    """Fetch `url` to `dest`, checking its sha256; a mismatch or network failure is a UserError."""
    if not sha256:
        raise UserError(f"ingest.source is a URL ({url}); set ingest.sha256 to the zip's sha256 so the "
                        "download can be checked")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, dest.open("wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(f"could not download {url}: {exc}") from None
    if digest.hexdigest() != sha256.lower():
        raise UserError(f"download of {url} has sha256 {digest.hexdigest()}, but ingest.sha256 is {sha256}")


def source_files(source: str, sha256: str, root: Path, workdir: Path,
                 images_dir: Path | None = None) -> tuple[str, list[tuple[PurePosixPath, Reader]]]:
    """`(kind, files)` for an `ingest.source` value; relative paths are relative to the project root.
    A source that overlaps `images_dir` (ingest's output, replaced on every run) is refused."""
    if source.startswith(("http://", "https://")):
        archive_path = workdir / "source.zip"
        log.info("downloading %s", source)
        download(source, sha256, archive_path)
        kind, path = "url", archive_path
    else:
        path = (root / source).resolve() if not Path(source).is_absolute() else Path(source)
        if not path.exists():
            raise UserError(f"ingest.source {source!r} does not exist (resolved to {path})")
        if images_dir is not None:
            out = images_dir.resolve()
            if path == out or out in path.parents or path in out.parents:
                raise UserError(f"ingest.source {source!r} overlaps ingest's output folder {images_dir}, "
                                "which every run replaces; point it at the original photos")
        if path.is_dir():
            if sample.is_recipe(path):
                return "sample", list(_sample_files(path))
            return "folder", list(_walk_folder(path))
        kind = "zip"
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise UserError(f"ingest.source {source!r} is neither a folder nor a readable .zip") from None
    return kind, _strip_common_root(list(_walk_zip(archive)))


# ---------------------------------------------------------------- stage


@dataclass
class IngestResult:
    manifest: pd.DataFrame
    report: dict


def run_ingest(files: Iterable[tuple[PurePosixPath, Reader]], params: IngestParams,
               images_dir: Path, images_rel: str) -> IngestResult:
    """Validate `files`, copy the accepted ones into `images_dir`, and describe what happened."""
    files = list(files)
    accepted: list[Accepted] = []
    rejected: list[Rejected] = []
    skipped: list[str] = []
    readers: dict[str, Reader] = {}
    step = max(1, len(files) // 10)
    for n, (rel, read) in enumerate(files, 1):
        where = locate(rel)
        if where is None:
            skipped.append(str(rel))
        else:
            outcome = inspect(str(rel), *where, read(), params)
            (accepted if isinstance(outcome, Accepted) else rejected).append(outcome)
            readers[str(rel)] = read
        if n % step == 0 or n == len(files):
            log.info("ingest: checked %d/%d files (%d rejected)", n, len(files), len(rejected))
    kept, dupes = deduplicate(accepted)
    rejected += dupes
    for r in rejected:
        log.warning("left out %s: %s (%s)", r.source_path, r.reason, r.detail)
    check_classes(kept, rejected)

    if images_dir.exists():
        shutil.rmtree(images_dir)
    for a in kept:
        target = images_dir / stored_name(a)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(readers[a.source_path]())
    manifest = manifest_frame(kept, images_rel)
    report = {
        "files": len(files),
        "accepted": len(kept),
        "rejected": len(rejected),
        "classes": dict(sorted(Counter(a.label for a in kept).items())),
        "original_splits": dict(sorted(Counter(a.original_split or "none" for a in kept).items())),
        "rejections": [asdict(r) for r in sorted(rejected, key=lambda r: r.source_path)],
        "skipped_outside_class_folders": skipped,
    }
    return IngestResult(manifest, report)


def main(paths: Paths, params: Params) -> None:
    p = params.ingest
    with tempfile.TemporaryDirectory() as tmp:
        kind, files = source_files(p.source, p.sha256, paths.root, Path(tmp), paths.images)
        log.info("ingest: %d files from %s source %s", len(files), kind, p.source)
        result = run_ingest(files, p, paths.images, paths.images.relative_to(paths.root).as_posix())
    paths.manifest.parent.mkdir(parents=True, exist_ok=True)
    result.manifest.to_csv(paths.manifest, index=False)
    report = {"source": p.source, "source_kind": kind, **result.report}
    paths.ingest_report.write_text(json.dumps(report, indent=2) + "\n")
    log.info("ingest: %d images in %s, %d left out (see %s)", report["accepted"],
             dict(report["classes"]), report["rejected"], paths.ingest_report.name)
