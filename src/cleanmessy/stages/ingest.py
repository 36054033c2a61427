"""ingest: a source of labelled room photos -> data/images/, data/manifest.csv, data/ingest_report.json.

Sources: a folder whose sub-folders are the class names (at any depth; train/val/test folders
above them are kept as `original_split`), a .zip of such a folder, an http(s) URL of such a zip
(checked against `ingest.sha256`), or a sample recipe folder (`data/sample`, the embedded default).
Every file is validated; bad ones are reported with a reason and left out. The source is only read.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import unicodedata
import urllib.error
import urllib.request
import zipfile
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import overload

import numpy as np
import pandas as pd

from cleanmessy import sample
from cleanmessy.console import progress
from cleanmessy.errors import UserError
from cleanmessy.images import FORMAT_SUFFIX, ImageError, open_rgb
from cleanmessy.parallel import ordered_map, usable_cpus
from cleanmessy.params import IngestParams, Params
from cleanmessy.project import FEEDBACK_NOT_A_ROOM, Paths, scratch_dir

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MANIFEST_COLUMNS = ["path", "label", "sha256", "width", "height", "format", "original_split", "source_path"]

Reader = Callable[[], bytes]

# Limits on what a source may make ingest read into memory (a file is read whole to hash and
# decode it). A room photo is a few MB; deflate squeezes photos by a few percent, bombs 1000x.
MAX_FILE_BYTES = 100 * 2**20
MAX_ZIP_RATIO = 100
MAX_DOWNLOAD_BYTES = 20 * 2**30
DOWNLOAD_SECONDS = 3600
DOWNLOAD_CHUNK = 2**20  # the download's progress bar counts MiB, one per chunk
SKIPPED_FOLDERS = ("__MACOSX",)  # macOS archive metadata, in zips and in unpacked folders alike
MANIFEST_CHUNK = 10_000  # manifest rows made into a frame and written at a time


class Refused(Exception):
    """A source entry that is reported with a reason and never read (unsafe name, link, bomb)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# Slots: one of these per file (100k at scale), each 96 bytes without a __dict__ instead of 144.
@dataclass(frozen=True, slots=True)
class Accepted:
    source_path: str
    label: str
    original_split: str
    sha256: str
    width: int
    height: int
    format: str


@dataclass(frozen=True, slots=True)
class Rejected:
    source_path: str
    label: str
    reason: str
    detail: str


# ---------------------------------------------------------------- pure core


def unsafe_name(name: str) -> str | None:
    """Why an entry name (a path inside a zip or folder source) could point outside its class
    folder, or None when it is a plain relative path. Such entries are rejected, never written."""
    if "\\" in name:
        return "backslash in the name"
    if name.startswith("/"):
        return "absolute path"
    if re.match(r"^[A-Za-z]:", name):
        return "drive letter"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "empty, '.' or '..' part in the path"
    return None


def locate(rel: PurePosixPath) -> tuple[str, str] | None:
    """`(label, original_split)` of a file from its path inside the source, or None when the file
    is not inside a class folder (e.g. a README at the top). The label is the parent folder's name;
    the split is the nearest folder above it called train/val/valid/validation/test."""
    if len(rel.parts) < 2 or rel.parts[-2].lower() in SPLIT_NAMES:
        return None  # at the top, or loose in a split folder (train/labels.csv): not in a class
    split = next((SPLIT_NAMES[p.lower()] for p in reversed(rel.parts[:-2]) if p.lower() in SPLIT_NAMES), "")
    return rel.parts[-2], split


def check_file(rel: str, label: str, split: str, data: bytes, params: IngestParams) -> Accepted | Rejected:
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


def check_classes(counts: Mapping[str, int], rejected: list[Rejected], empty_folders: list[str] = ()) -> None:
    """At least two classes, no class left without a usable image, no two class folders whose
    names differ only in case or Unicode normalisation (`Clean/` beside `clean/`, or an NFC `café/`
    beside an NFD one, would silently make three classes).
    `counts`: the images kept per class (classes with none left out)."""
    seen = sorted({r.label for r in rejected if r.label} | set(counts))
    by_folded: dict[str, list[str]] = {}
    for label in seen:  # compared as a reader sees them: Unicode-normalised (é = e + ´), case-folded
        by_folded.setdefault(unicodedata.normalize("NFC", label).casefold(), []).append(label)
    clash = next((names for names in by_folded.values() if len(names) > 1), None)
    if clash:
        how = "only in case" if len({unicodedata.normalize("NFC", n) for n in clash}) == len(clash) else \
            "only in how their letters are encoded (Unicode NFC and NFD: they look the same)"
        raise UserError(f"class folders {' and '.join(ascii(n) for n in clash)} differ {how}; "
                        "merge them into one folder")
    for label in seen:
        close = difflib.get_close_matches(label, [x for x in seen if x != label], n=1, cutoff=0.8)
        if close and label < close[0]:
            log.warning("class folders '%s' and '%s' have similar names: are they one class?", label, close[0])
    empty = [label for label in seen if counts.get(label, 0) == 0]
    if empty:
        n_bad = sum(r.label == empty[0] for r in rejected)
        raise UserError(f"class '{empty[0]}' has no usable image ({n_bad} rejected; see the reasons above)")
    if len(counts) < 2:
        found = f"only '{next(iter(counts))}'" if counts else "none"
        empty_note = f" ({', '.join(f'{e}/' for e in empty_folders)} empty)" if empty_folders else ""
        raise UserError(
            f"a source needs at least 2 class folders holding images, found {found}{empty_note}; "
            "lay it out as <source>/<class>/<image> (e.g. clean/ and messy/)"
        )


def stored_name(a: Accepted) -> str:
    """Where an accepted image is kept under data/images/: by label and content hash, since source
    names repeat across classes (clean/0.png, messy/0.png)."""
    return f"{a.label}/{a.sha256[:16]}{FORMAT_SUFFIX.get(a.format, '.img')}"


def manifest_frame(kept: list[Accepted], images_rel: str) -> pd.DataFrame:
    """One row per kept image, by label and hash. Built column by column: a dict per row would
    briefly cost ~500 bytes per image. The stage builds it MANIFEST_CHUNK rows at a time."""
    rows = sorted(kept, key=lambda a: (a.label, a.sha256))
    columns = {c: [getattr(a, c) for a in rows] for c in MANIFEST_COLUMNS if c != "path"}
    columns["path"] = [f"{images_rel}/{stored_name(a)}" for a in rows]
    return pd.DataFrame(columns, columns=MANIFEST_COLUMNS)


class _Codes:
    """Small numbers for values that repeat across files (class, format, original split)."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self._index: dict[str, int] = {}

    def code(self, value: str) -> int:
        if (code := self._index.get(value)) is None:
            code = self._index[value] = len(self.values)
            self.values.append(value)
        return code

    def ranks(self) -> np.ndarray:
        """Each code's place among the values in sorted order."""
        ranks = np.empty(len(self.values), dtype=np.int64)
        ranks[sorted(range(len(self.values)), key=self.values.__getitem__)] = np.arange(len(self.values))
        return ranks


class AcceptedTable:
    """The accepted files, in the order they were checked, one fixed-size record each in flat
    arrays: the 32-byte digest, the size, codes for class, format and original split. A record
    object per file, with its hash as hex, cost ~400 bytes (40 MB at 100k photos); this costs
    ~60, the source path included (a reference to the str the source listing holds)."""

    def __init__(self) -> None:
        self.digests = bytearray()
        self.widths, self.heights = array("q"), array("q")
        self.labels, self.formats, self.splits = array("i"), array("i"), array("i")
        self.source_paths: list[str] = []
        self.label_codes, self.format_codes, self.split_codes = _Codes(), _Codes(), _Codes()

    def __len__(self) -> int:
        return len(self.source_paths)

    def add(self, a: Accepted) -> None:
        self.digests += bytes.fromhex(a.sha256)
        self.widths.append(a.width)
        self.heights.append(a.height)
        self.labels.append(self.label_codes.code(a.label))
        self.formats.append(self.format_codes.code(a.format))
        self.splits.append(self.split_codes.code(a.original_split))
        self.source_paths.append(a.source_path)

    def record(self, i: int) -> Accepted:
        """File `i` as the record check_file made."""
        return Accepted(self.source_paths[i], self.label_codes.values[self.labels[i]],
                        self.split_codes.values[self.splits[i]], self.digests[32 * i:32 * i + 32].hex(),
                        self.widths[i], self.heights[i], self.format_codes.values[self.formats[i]])

    def digest_array(self) -> np.ndarray:
        """The digests as one 32-byte string per file (a copy: the table may still grow)."""
        return np.frombuffer(bytes(self.digests), dtype="S32")

    def counts(self, rows: np.ndarray, codes: array, names: _Codes) -> dict[str, int]:
        """How many of `rows` have each value of a coded column, for the values that occur."""
        n = np.bincount(np.asarray(codes, dtype=np.int64)[rows], minlength=len(names.values))
        return {names.values[c]: int(n[c]) for c in np.flatnonzero(n)}


def deduplicate_table(table: AcceptedTable) -> tuple[np.ndarray, list[Rejected], set[str]]:
    """`deduplicate` for a table: the rows kept (ascending), the rejected copies, and the stored
    names (see stored_name) of the contents left with no copy kept. Only the files whose content
    occurs more than once (few, in any real source) become records and go through `deduplicate`;
    every other file is kept as it is."""
    digests = table.digest_array()
    by_digest = np.argsort(digests, kind="stable")
    same = digests[by_digest][1:] == digests[by_digest][:-1]
    repeated = np.zeros(len(digests), dtype=bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    copies = np.sort(by_digest[repeated])  # input order, as deduplicate saw every file
    keep = np.ones(len(digests), dtype=bool)
    keep[copies] = False
    records = [table.record(i) for i in copies]
    row_of = {id(a): i for a, i in zip(records, copies, strict=True)}
    kept, rejected = deduplicate(records)
    keep[[row_of[id(a)] for a in kept]] = True
    conflicts = {stored_name(a) for a in records} - {stored_name(a) for a in kept}
    return np.flatnonzero(keep), rejected, conflicts


def manifest_order(table: AcceptedTable, rows: np.ndarray) -> np.ndarray:
    """`rows` in the manifest's order: by label, then hash (a digest sorts as its hex does)."""
    labels = table.label_codes.ranks()[np.asarray(table.labels, dtype=np.int64)[rows]]
    return rows[np.lexsort((table.digest_array()[rows], labels))]


# ---------------------------------------------------------------- sources (I/O edge)


def _skipped(parts: Iterable[str]) -> bool:
    return any(part.startswith(".") or part in SKIPPED_FOLDERS for part in parts)


def _refuse(reason: str, detail: str) -> Reader:
    def read() -> bytes:
        raise Refused(reason, detail)
    return read


def _file_reader(path: str) -> Reader:
    """Read one file of a folder source. It keeps the path as a str: a Path object costs ~400
    bytes more, per file, for as long as ingest runs."""
    def read() -> bytes:
        size = os.stat(path).st_size
        if size > MAX_FILE_BYTES:
            raise Refused("file_too_large", f"{size:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit for one photo")
        with open(path, "rb") as f:
            return f.read()
    return read


class FolderFiles(Sequence[tuple[str, Reader]]):
    """The `(name, reader)` pairs of a folder source, each made when it is asked for: the listing
    holds one str per file (a refused link holds its pair). A pair with its reader held for
    every file cost ~400 bytes a file, for as long as ingest ran."""

    def __init__(self, folder: str, entries: list[str | tuple[str, Reader]]) -> None:
        self._folder = folder
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, i: int) -> tuple[str, Reader]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[str, Reader]]: ...

    def __getitem__(self, i: int | slice) -> tuple[str, Reader] | list[tuple[str, Reader]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        entry = self._entries[i]
        return entry if isinstance(entry, tuple) else (entry, _file_reader(os.path.join(self._folder, entry)))


def special_file_message(path: Path) -> str:
    """The one line for an entry of a folder source that is neither a file, a folder nor a link: a
    named pipe, a device or a socket, which DVC would wait on forever while hashing the source."""
    import stat

    mode = path.lstat().st_mode
    kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "a special file")
    return (f"{path} is {kind}, not a photo: a source may hold only files, folders and links (DVC would wait on it "
            "forever while hashing the source); remove it")


def walk_folder(folder: Path) -> tuple[FolderFiles, list[str]]:
    """The files of a folder source, and its folders that hold no file (for the report). Links
    are never followed, in or out of the source: each one is a file refused with reason
    `symlink` (a link could read /etc/passwd or a photo outside the source). A broken link stops
    ingest, as it stops DVC, which hashes the source before ingest runs and cannot hash a link to
    nothing: both refuse the same source, with one line naming the link. A named pipe, a device or
    a socket stops ingest too (`special_file_message`): DVC would hang on it."""
    files: list[str | tuple[str, Reader]] = []
    empty: list[str] = []
    for here, dirs, names in os.walk(folder, followlinks=False):
        rel_here = Path(here).relative_to(folder)
        dirs[:] = sorted(d for d in dirs if not _skipped([d]))
        for name in sorted(names) + [d for d in dirs if (Path(here) / d).is_symlink()]:
            if _skipped([name]):
                continue
            path = Path(here) / name
            rel = (rel_here / name).as_posix()
            if path.is_symlink() and not path.exists():
                raise UserError(f"{path} is a broken link (to {os.readlink(path)}); DVC cannot hash a source "
                                "that holds one: remove the link or restore what it points to")
            if path.is_symlink():
                files.append((rel, _refuse("symlink", f"a link to {os.readlink(path)}; links are not followed")))
            elif path.is_file():
                files.append(rel)
            else:
                raise UserError(special_file_message(path))
        if rel_here.parts and not names and not dirs:
            empty.append(rel_here.as_posix())
    return FolderFiles(os.fspath(folder), files), empty


def _zip_reader(archive: zipfile.ZipFile, info: zipfile.ZipInfo, lock: threading.Lock) -> Reader:
    """Read one member with its size checked first (declared size and compression ratio) and its
    inflated bytes capped, so a bomb costs a header read, not gigabytes of memory. `lock` is
    held while the member is open: see _walk_zip."""
    def read() -> bytes:
        if info.file_size > MAX_FILE_BYTES:
            raise Refused("file_too_large", f"inflates to {info.file_size:,} bytes, over the "
                                            f"{MAX_FILE_BYTES:,}-byte limit for one photo")
        if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO:
            raise Refused("zip_bomb", f"{info.compress_size:,} bytes inflate to {info.file_size:,} "
                                      f"({info.file_size / info.compress_size:.0f}x; photos barely compress)")
        try:
            with lock, archive.open(info) as member:
                data = member.read(MAX_FILE_BYTES + 1)  # zipfile stops at the declared size
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
            raise Refused("unreadable_entry", f"cannot read it from the archive ({exc})") from None
        if len(data) > MAX_FILE_BYTES:
            raise Refused("file_too_large", f"inflates past the {MAX_FILE_BYTES:,}-byte limit for one photo")
        return data
    return read


def _walk_zip(archive: zipfile.ZipFile) -> Iterator[tuple[str, Reader]]:
    # Members are read in memory, never extracted. Their names are checked in run_ingest.
    # They are read one at a time (ZipFile counts its open members without a lock, and inflating
    # a photo is quick next to decoding it); the decoding runs in parallel.
    # An archive may hold two entries of one name (zip allows it; unzip keeps the last): the first
    # is read, every later one is refused as `duplicate_name`, so no two manifest rows share one
    # source_path.
    lock = threading.Lock()
    seen: set[str] = set()
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        if info.is_dir() or (not unsafe_name(info.filename) and _skipped(info.filename.split("/"))):
            continue  # (an unsafe name such as ../x is reported, not skipped as "hidden")
        if info.filename in seen:
            yield info.filename, _refuse("duplicate_name", "the archive holds another entry of this name, which is "
                                                           "the one ingested")
            continue
        seen.add(info.filename)
        yield info.filename, _zip_reader(archive, info, lock)


def _strip_common_root(files: list[tuple[str, Reader]]) -> list[tuple[str, Reader]]:
    """A zip of `images/` holds `images/clean/...`: the single top folder is not a class."""
    safe = [name.split("/") for name, _ in files if not unsafe_name(name)]
    tops = {parts[0] for parts in safe}
    if len(tops) == 1 and all(len(p) > 1 for p in safe) and any(len(p) > 2 for p in safe):
        top = f"{next(iter(tops))}/"
        return [(name.removeprefix(top) if not unsafe_name(name) else name, read) for name, read in files]
    return files


def _sample_reader(label: str, index: int, recipe: sample.Recipe) -> Reader:
    """One sample picture as PNG bytes, rendered when it is read, so the sample, like any
    source, is never in memory whole."""
    def read() -> bytes:
        buf = io.BytesIO()
        sample.render(label, index, recipe.size, recipe.seed).save(buf, format="PNG")
        return buf.getvalue()
    return read


def _sample_files(folder: Path) -> Iterator[tuple[str, Reader]]:
    """The pictures of a recipe, under the names and in the order sample.generate gives them."""
    recipe = sample.read_recipe(folder)
    for rel, label, index in sample.pictures(recipe):
        yield rel, _sample_reader(label, index, recipe)


def _chunks(response: io.BufferedIOBase) -> Iterator[bytes]:
    """The body in DOWNLOAD_CHUNK pieces (an HTTP response's read(n) returns n bytes until the
    last piece), streamed to disk: a download never sits in memory."""
    while chunk := response.read(DOWNLOAD_CHUNK):
        yield chunk


def download(url: str, sha256: str, dest: Path) -> None:
    """Fetch `url` to `dest`, checking its sha256; a mismatch or network failure is a UserError."""
    if not sha256:
        raise UserError(f"ingest.source is a URL ({url}); set ingest.sha256 to the zip's sha256 so the "
                        "download can be checked")
    digest = hashlib.sha256()
    deadline, size = time.monotonic() + DOWNLOAD_SECONDS, 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, dest.open("wb") as out:
            length = response.headers.get("Content-Length", "")
            mib = -(-int(length) // DOWNLOAD_CHUNK) if length.isdigit() else None
            for chunk in progress(_chunks(response), mib, "ingest: downloading", unit="MiB"):
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise UserError(f"download of {url} passed {MAX_DOWNLOAD_BYTES:,} bytes; stopped")
                if time.monotonic() > deadline:
                    raise UserError(f"download of {url} took over {DOWNLOAD_SECONDS} s; stopped")
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(f"could not download {url}: {exc}") from None
    if digest.hexdigest() != sha256.lower():
        raise UserError(f"download of {url} has sha256 {digest.hexdigest()}, but ingest.sha256 is {sha256}")


def source_files(source: str, sha256: str, root: Path, workdir: Path,
                 images_dir: Path | None = None) -> tuple[str, Sequence[tuple[str, Reader]], list[str]]:
    """`(kind, files, empty folders)` for an `ingest.source` value; relative paths are relative to
    the project root. A source that overlaps `images_dir` (ingest's output, replaced on every
    run) is refused."""
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
                return "sample", list(_sample_files(path)), []
            return "folder", *walk_folder(path)
        kind = "zip"
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise UserError(f"ingest.source {source!r} is neither a folder nor a readable .zip") from None
    return kind, _strip_common_root(list(_walk_zip(archive))), []


# ---------------------------------------------------------------- feedback (the app's corrections)

REJECTIONS_SHOWN = 20  # rejected files logged one line each; the rest summarised by reason (all in the report)
FEEDBACK_SHOWN = 5  # feedback conflicts and rejections printed one line each; the rest are counted


def _check_feedback(entry: tuple[str, Reader], params: IngestParams) -> Accepted | Rejected:
    """One feedback photo (`<class>/<file>`), checked as a source file is; nothing is written."""
    name, read = entry
    label = name.split("/", 1)[0]
    try:
        data = read()
    except Refused as exc:
        return Rejected(name, label, exc.reason, str(exc))
    return check_file(name, label, "", data, params)


def _log_bounded(lines: list[str], what: str) -> None:
    for line in lines[:FEEDBACK_SHOWN]:
        log.warning("%s", line)
    if len(lines) > FEEDBACK_SHOWN:
        log.warning("ingest: ... and %d more feedback %s (see ingest_report.json)", len(lines) - FEEDBACK_SHOWN, what)


def _within_share(merged: list[Accepted], table: AcceptedTable, kept: np.ndarray, share: float,
                  folder_rel: str) -> tuple[list[Accepted], list[dict]]:
    """The feedback photos to merge, at most `share` x the class's source photos (the rows `kept`)
    for each class, in the order given (by path: label, then content hash), and those left out.
    Corrections, which anyone using the app can send, never outweigh the data: poisoning a class
    takes more than its share."""
    source = table.counts(kept, table.labels, table.label_codes) if len(kept) else {}
    taken: Counter[str] = Counter()
    within, over = [], []
    for a in merged:
        if taken[a.label] < math.floor(share * source.get(a.label, 0)):
            taken[a.label] += 1
            within.append(a)
        else:
            over.append({"path": f"{folder_rel}/{a.source_path}", "sha256": a.sha256, "label": a.label})
    return within, over


def merge_feedback(folder: Path, folder_rel: str, table: AcceptedTable, kept: np.ndarray, classes: Iterable[str],
                   params: IngestParams, staging: Path, workers: int) -> tuple[np.ndarray, dict | None]:
    """Add the photos of `folder`'s class folders (`<class>/<file>`, the classes of the ingested
    source; `not-a-room/` and other folders are not training data) to the ingested data: checked as
    source files are, written under `staging`, appended to `table` and to `kept` (returned). Left
    out, and reported: a photo whose content the data already has under the same label
    (`duplicates`), a content the data has under another label or that feedback gives two labels,
    `not-a-room` included (`conflicts`: never merged, whatever the majority), a file that is no
    usable image (`rejections`). The report is None when the folder holds no photo for a class and
    no other folder than `not-a-room/` (then the ingest report is what it is without feedback)."""
    classes = set(classes)
    listing, _ = walk_folder(folder)
    entries: list[tuple[str, Reader]] = []
    not_a_room: list[tuple[str, Reader]] = []
    ignored: set[str] = set()
    for i in range(len(listing)):
        name, read = listing[i]
        parts = name.split("/")
        if len(parts) == 2 and parts[0] in classes:
            entries.append((name, read))
        elif len(parts) == 2 and parts[0] == FEEDBACK_NOT_A_ROOM:
            not_a_room.append((name, read))
        elif len(parts) >= 2 and parts[0] != FEEDBACK_NOT_A_ROOM:
            ignored.add("/".join(parts[:-1]))
    if not entries and not ignored:
        return kept, None
    outcomes = list(ordered_map(partial(_check_feedback, params=params), entries, workers, "feedback"))
    good = [o for o in outcomes if isinstance(o, Accepted)]
    rejected = [o for o in outcomes if isinstance(o, Rejected)]
    # A photo also corrected to "not a room" contradicts its class: those are hashed (not decoded).
    not_a_room_paths: dict[str, list[str]] = {}
    for name, read in not_a_room:
        try:
            not_a_room_paths.setdefault(hashlib.sha256(read()).hexdigest(), []).append(f"{folder_rel}/{name}")
        except Refused:
            continue
    # The labels the ingested data (every checked source file) gives each feedback content.
    data_labels: dict[str, set[str]] = {}
    if good and len(table):
        wanted = np.array(sorted({bytes.fromhex(a.sha256) for a in good}), dtype="S32")
        for row in np.flatnonzero(np.isin(table.digest_array(), wanted)):
            record = table.record(int(row))
            data_labels.setdefault(record.sha256, set()).add(record.label)
    by_hash: dict[str, list[Accepted]] = {}
    for a in sorted(good, key=lambda a: a.source_path):
        by_hash.setdefault(a.sha256, []).append(a)
    merged: list[Accepted] = []
    duplicates: list[dict] = []
    conflicts: list[dict] = []
    for sha256, copies in by_hash.items():
        given = sorted({c.label for c in copies} | ({FEEDBACK_NOT_A_ROOM} if sha256 in not_a_room_paths else set()))
        known = sorted(data_labels.get(sha256, ()))
        paths = [f"{folder_rel}/{c.source_path}" for c in copies]
        if len(given) > 1 or (known and known != given):
            conflicts.append({"sha256": sha256, "feedback_labels": given, "data_labels": known,
                              "paths": sorted(paths + not_a_room_paths.get(sha256, []))})
            continue
        first = 0 if known else 1
        if not known:
            merged.append(copies[0])
        for c, path in zip(copies[first:], paths[first:], strict=True):
            duplicates.append({"path": path, "sha256": sha256, "label": c.label,
                               "same_as": "the source" if known else paths[0]})
    merged, over_share = _within_share(merged, table, kept, params.feedback_max_share, folder_rel)
    readers = dict(entries)
    new_rows = []
    for a in merged:
        _store(a, readers[a.source_path](), staging)
        table.add(Accepted(f"{folder_rel}/{a.source_path}", a.label, "", a.sha256, a.width, a.height, a.format))
        new_rows.append(len(table) - 1)
    counts = Counter(a.label for a in merged)
    report = {
        "folder": folder_rel,
        "photos": len(entries),
        "used": len(merged),
        "classes": dict(sorted(counts.items())),
        "duplicates": duplicates,
        "conflicts": conflicts,
        "over_share": over_share,
        "rejections": [{**asdict(r), "source_path": f"{folder_rel}/{r.source_path}"} for r in rejected],
        "ignored_folders": sorted(ignored),
    }
    _log_bounded([f"ingest: feedback {', '.join(c['paths'])} is labelled {' and '.join(c['feedback_labels'])}"
                  + (f", the data has it as {' and '.join(c['data_labels'])}" if c["data_labels"] else "")
                  + f" (sha256 {c['sha256'][:16]}): not merged" for c in conflicts], "conflicts")
    _log_bounded([f"ingest: feedback {folder_rel}/{r.source_path} left out: {r.reason} ({r.detail})"
                  for r in rejected], "rejections")
    if over_share:
        log.warning("ingest: %d feedback photos left out: past ingest.feedback_max_share (%g) of their class's "
                    "source photos (%s); see the report's over_share", len(over_share), params.feedback_max_share,
                    dict(sorted(Counter(o["label"] for o in over_share).items())))
    for name in sorted(ignored):
        log.warning("ingest: feedback folder %s/%s/ is not a class of this data: ignored", folder_rel, name)
    log.info("ingest: %d feedback photos merged (%s), %d duplicates, %d conflicts, %d rejected", len(merged),
             dict(report["classes"]), len(duplicates), len(conflicts), len(rejected))
    return np.concatenate([kept, np.array(new_rows, dtype=kept.dtype)]), report


# ---------------------------------------------------------------- stage


@dataclass
class IngestResult:
    """The report, and the kept files, from which the manifest is made in chunks (a frame of the
    whole manifest costs ~300 bytes an image)."""
    report: dict
    table: AcceptedTable
    rows: np.ndarray  # the table's rows in the manifest, in its order
    images_rel: str

    def manifest_chunks(self, size: int = MANIFEST_CHUNK) -> Iterator[pd.DataFrame]:
        for start in range(0, len(self.rows), size):
            yield manifest_frame([self.table.record(i) for i in self.rows[start:start + size]], self.images_rel)

    @property
    def manifest(self) -> pd.DataFrame:
        """The whole manifest as one frame (for tests and small sources; the stage streams it)."""
        return manifest_frame([self.table.record(i) for i in self.rows], self.images_rel)

    def write_manifest(self, path: Path) -> None:
        """The manifest's CSV, byte for byte what `manifest.to_csv(path, index=False)` writes."""
        with open(path, "w", encoding="utf-8", newline="") as out:
            for n, chunk in enumerate(self.manifest_chunks()):
                chunk.to_csv(out, header=n == 0, index=False)
            if not len(self.rows):
                self.manifest.to_csv(out, index=False)  # (the header alone)


def _outcome(entry: tuple[str, Reader], params: IngestParams, staging: Path) -> Accepted | Rejected | None:
    """What becomes of one source entry: Accepted (and written under `staging`), Rejected with a
    reason, or None when it lies outside every class folder (skipped, never read). Runs on a
    worker thread; the file's bytes are read once and dropped when it returns."""
    name, read = str(entry[0]), entry[1]
    if problem := unsafe_name(name):
        return Rejected(name, "", "unsafe_path", f"{problem}: never written, not a class")
    where = locate(PurePosixPath(name))
    if where is None:
        return None
    try:
        data = read()
    except Refused as exc:
        return Rejected(name, where[0], exc.reason, str(exc))
    outcome = check_file(name, *where, data, params)
    if isinstance(outcome, Accepted):
        _store(outcome, data, staging)
    return outcome


def _store(a: Accepted, data: bytes, folder: Path) -> None:
    """Write an accepted file under `folder` by its stored name. Copies of one content (in one
    class) share that name: the first writes it, the others find it there."""
    # A label is one plain part of a name unsafe_name passed; make sure anyway, by the string:
    # resolving the path on disk cost more than the write, per file, all of it holding the GIL.
    if a.label in ("", ".", "..") or "/" in a.label:
        raise RuntimeError(f"refusing to write class {a.label!r} outside {folder}")
    target = folder / stored_name(a)
    target.parent.mkdir(exist_ok=True)  # (exist_ok: another thread may make it first)
    try:
        with open(target, "xb") as out:
            out.write(data)
    except FileExistsError:
        pass


def _check_all(files: Sequence[tuple[str, Reader]], params: IngestParams, staging: Path,
               workers: int) -> tuple[AcceptedTable, list[Rejected], list[str]]:
    """Check every file on `workers` threads, writing the accepted ones under `staging`, and
    sort the outcomes, in input order, into accepted, rejected and skipped (outside a class)."""
    accepted = AcceptedTable()
    rejected: list[Rejected] = []
    skipped: list[str] = []
    started = time.monotonic()
    outcomes = ordered_map(partial(_outcome, params=params, staging=staging), files, workers, "ingest")
    with closing(outcomes):
        for (name, _), outcome in zip(files, progress(outcomes, len(files), "ingest: checking"), strict=True):
            if outcome is None:
                skipped.append(str(name))
            elif isinstance(outcome, Accepted):
                accepted.add(outcome)
            else:
                rejected.append(outcome)
    log.info("ingest: checked %d files in %.1f s on %d threads (%d rejected, %d outside class folders)",
             len(files), time.monotonic() - started, workers, len(rejected), len(skipped))
    return accepted, rejected, skipped


def run_ingest(files: Iterable[tuple[str | PurePosixPath, Reader]], params: IngestParams,
               images_dir: Path, images_rel: str, empty_folders: list[str] = (),
               workers: int | None = None, feedback: Path | None = None,
               feedback_rel: str = "data/feedback",
               prepare: Callable[[IngestResult], list[tuple[Path, Path]]] | None = None) -> IngestResult:
    """Validate `files`, copy the accepted ones into `images_dir`, and describe what happened.
    Files are checked and copied on `workers` threads (default: one per usable CPU); the result
    is the same whatever their number. What is kept per file is its name in the source's
    listing and a fixed-size record (see AcceptedTable), ~150 bytes: a `cleanmessy ingest` of 1k
    photos peaks at 0.13 GiB RSS, of 100k at 0.17 GiB (0.28 when records were objects).
    `feedback`: the app's corrections folder (`feedback_rel` in the project), merged after the
    source (merge_feedback): its photos count in "accepted" and "classes" (the images in the
    data; "files" and "rejected" are the source's), its own report is "feedback".
    `prepare(result)`: writes the stage's other outputs to temporary names and returns
    `(temporary, final)` pairs, renamed into place right after the images folder is swapped in."""
    if not isinstance(files, Sequence):
        files = list(files)
    # Each file is read once: an accepted one is written as soon as it is checked, into a hidden
    # folder beside images_dir that replaces it only if ingest succeeds. Its name is fixed so
    # that what a killed run left there is removed by the next.
    staging = images_dir.with_name(f".{images_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    written: list[tuple[Path, Path]] = []  # prepare's temporary files, until renamed into place
    try:
        accepted, rejected, skipped = _check_all(files, params, staging, workers or usable_cpus())
        kept, dupes, conflicts = deduplicate_table(accepted)
        rejected += dupes
        for r in rejected[:REJECTIONS_SHOWN]:
            log.warning("left out %s: %s (%s)", r.source_path, r.reason, r.detail)
        if len(rejected) > REJECTIONS_SHOWN:
            reasons = Counter(r.reason for r in rejected[REJECTIONS_SHOWN:])
            log.warning("... and %d more left out (%s): every one is in ingest_report.json",
                        len(rejected) - REJECTIONS_SHOWN, ", ".join(f"{r} {n}" for r, n in reasons.most_common()))
        for folder in empty_folders[:REJECTIONS_SHOWN]:
            log.warning("folder %s/ of the source holds no file: ignored", folder)
        if len(empty_folders) > REJECTIONS_SHOWN:
            log.warning("... and %d more empty folders (listed in ingest_report.json)",
                        len(empty_folders) - REJECTIONS_SHOWN)
        classes = accepted.counts(kept, accepted.labels, accepted.label_codes)
        check_classes(classes, rejected, empty_folders)
        for conflict in conflicts:
            (staging / conflict).unlink()  # content under two labels: every copy is left out
        feedback_report = None
        if feedback is not None and feedback.is_dir():
            kept, feedback_report = merge_feedback(feedback, feedback_rel, accepted, kept, classes, params, staging,
                                                   workers or usable_cpus())
            classes = accepted.counts(kept, accepted.labels, accepted.label_codes)
        original_splits: Counter[str] = Counter()
        for split, n in accepted.counts(kept, accepted.splits, accepted.split_codes).items():
            original_splits[split or "none"] += n
        report = {
            "files": len(files),
            "accepted": len(kept),
            "rejected": len(rejected),
            "classes": dict(sorted(classes.items())),
            "original_splits": dict(sorted(original_splits.items())),
            "rejections": [asdict(r) for r in sorted(rejected, key=lambda r: r.source_path)],
            "skipped_outside_class_folders": skipped,
            "empty_folders": list(empty_folders),
        }
        if feedback_report is not None:
            report["feedback"] = feedback_report
        result = IngestResult(report, accepted, manifest_order(accepted, kept), images_rel)
        # Every other output is written to its temporary name before anything is replaced: a full
        # disk (or any failure) up to here leaves the previous data whole.
        written = prepare(result) if prepare else []
        if images_dir.exists():
            shutil.rmtree(images_dir)
        staging.rename(images_dir)
        for partial_file, final in written:  # renames: they need no space
            os.replace(partial_file, final)
        written = []
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a failure (on success it is images_dir)
        for partial_file, _ in written:
            partial_file.unlink(missing_ok=True)
    return result


LOCK_NAME = ".ingest.lock"


def _temporary_outputs(paths: Paths) -> list[Path]:
    """Where ingest writes its outputs before swapping them in (run_ingest and main's `prepare`)."""
    return [out.with_name(f".{out.name}.partial") for out in (paths.images, paths.manifest, paths.ingest_report)]


@contextlib.contextmanager
def running(paths: Paths) -> Iterator[bool]:
    """An exclusive flock on data/.ingest.lock while ingest runs; yields whether it was free. The
    kernel releases it when the process ends, however it ends (SIGKILL too), so a lock that is free
    means that no ingest of this project is running."""
    import fcntl

    paths.images.parent.mkdir(parents=True, exist_ok=True)
    with open(paths.images.parent / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_leftovers(paths: Paths) -> list[str]:
    """What a killed ingest left (its temporary outputs, its scratch folders), removed unless an
    ingest is running; the names removed, relative to the project. Writes nothing when there are none."""

    def leftovers() -> list[Path]:
        found = [p for p in _temporary_outputs(paths) if p.exists() or p.is_symlink()]
        scratch = paths.root / ".dvc" / "tmp"
        if scratch.is_dir():
            found += sorted(p for p in scratch.glob("ingest-*") if p.is_dir() and not p.is_symlink())
        return found

    if not leftovers():
        return []
    with running(paths) as free:
        if not free:
            return []
        found = leftovers()
        for path in found:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return [p.relative_to(paths.root).as_posix() for p in found]


def main(paths: Paths, params: Params) -> None:
    with running(paths) as free:
        if not free:
            raise UserError(f"another ingest is running in this project (it holds "
                            f"{(paths.images.parent / LOCK_NAME).relative_to(paths.root)}); wait for it to finish")
        _main(paths, params)


def _main(paths: Paths, params: Params) -> None:
    p = params.ingest
    # Removed on the way out, also after an error; only a killed process leaves it behind.
    with tempfile.TemporaryDirectory(prefix="ingest-", dir=scratch_dir(paths.root)) as tmp:
        kind, files, empty = source_files(p.source, p.sha256, paths.root, Path(tmp), paths.images)
        log.info("ingest: %d files from %s source %s", len(files), kind, p.source)

        def prepare(result: IngestResult) -> list[tuple[Path, Path]]:
            """The manifest and the report, at temporary names beside them."""
            paths.manifest.parent.mkdir(parents=True, exist_ok=True)
            pending = [(temporary, final) for temporary, final in
                       zip(_temporary_outputs(paths)[1:], (paths.manifest, paths.ingest_report), strict=True)]
            try:
                result.write_manifest(pending[0][0])
                pending[1][0].write_text(json.dumps({"source": p.source, "source_kind": kind, **result.report},
                                                    indent=2) + "\n")
            except BaseException:
                for partial_file, _ in pending:
                    partial_file.unlink(missing_ok=True)
                raise
            return pending

        try:
            result = run_ingest(files, p, paths.images, paths.images.relative_to(paths.root).as_posix(), empty,
                                feedback=paths.feedback,
                                feedback_rel=paths.feedback.relative_to(paths.root).as_posix(), prepare=prepare)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise UserError(f"no space left on the device while ingesting ({exc.filename or paths.root}); nothing "
                            "was replaced: the previous data is whole. Free some space and run it again") from None
    report = {"source": p.source, "source_kind": kind, **result.report}
    log.info("ingest: %d images in %s, %d left out (see %s)", report["accepted"],
             dict(report["classes"]), report["rejected"], paths.ingest_report.name)
