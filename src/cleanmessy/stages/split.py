"""split: data/manifest.csv -> data/splits/{train,val,test}.csv, stratified by label.

Deterministic: rows are ordered by content hash before the seeded shuffle, so the same manifest
and seed give byte-identical files. Images with identical content form one group and always land
in the same split, so a test image is never also a training image.

Memory does not grow with the manifest beyond a few bytes a row: the stage reads the columns the
assignment needs in chunks, as numpy byte strings and codes, assigns groups with vectorised numpy,
and writes each split's CSV by streaming the manifest again, a chunk at a time. That holds when
each split's rows, in manifest order, are already in the files' order (label, then path), as in
every manifest ingest writes; any other manifest is split from one frame, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd

from cleanmessy.errors import UserError
from cleanmessy.params import Params, SplitParams
from cleanmessy.project import Paths

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = range(3)  # split codes: indices into SPLITS
NOT_A_SPLIT, MISSING = -1, -2  # codes of an original_split that is no split name, or NaN
CHUNK_ROWS = 20_000  # manifest rows read at a time


def _counts(n: int, fraction: float) -> int:
    """Rows for a split of `fraction`: at least one when the fraction asks for any and the class
    has three or more groups, so a tiny data set still gets a val and a test image per class."""
    k = int(round(n * fraction))
    return max(k, 1) if fraction > 0 and n >= 3 else k


def _carve(n: int, n_val: int, n_test: int) -> np.ndarray:
    """Split codes for `n` shuffled groups: the first `n_test` test, next `n_val` val, the rest train."""
    codes = np.full(n, TRAIN, dtype=np.int8)
    codes[:n_test + n_val] = VAL
    codes[:n_test] = TEST
    return codes


def _first_original(rows: np.ndarray, groups: np.ndarray, inverse: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Per group (`groups`, sorted), the original-split code of its first row (in manifest order)
    that has one, as pandas' groupby().first() picks it, NOT_A_SPLIT for none."""
    present = rows[original[rows] != MISSING]
    found, first = np.unique(inverse[present], return_index=True)
    out = np.full(len(groups), NOT_A_SPLIT, dtype=np.int8)
    out[np.searchsorted(groups, found)] = original[present[first]]
    return out


def split_codes(labels: np.ndarray, n_labels: int, inverse: np.ndarray, original: np.ndarray | None,
                params: SplitParams, seed: int) -> np.ndarray:
    """The split code of each row. `labels`: each row's class as its rank among the sorted class
    names; `inverse`: each row's content group as its rank among the sorted hashes; `original`:
    each row's original_split code (needed with keep_source_split). Classes are handled in order,
    each drawing one permutation of its groups from one seeded generator; a group under two
    classes takes the last one's split."""
    rng = np.random.default_rng(seed)
    group_split = np.full(int(inverse.max(initial=-1)) + 1, TRAIN, dtype=np.int8)
    for label in range(n_labels):
        rows = np.flatnonzero(labels == label)
        groups = np.unique(inverse[rows])  # sorted by hash
        n = len(groups)
        n_val, n_test = _counts(n, params.val_fraction), _counts(n, params.test_fraction)
        if not params.keep_source_split:
            group_split[groups[rng.permutation(n)]] = _carve(n, n_val, n_test)
            continue
        fixed = _first_original(rows, groups, inverse, original)
        group_split[groups[fixed >= 0]] = fixed[fixed >= 0]
        # Carve a split the source lacks (e.g. Kaggle's layout has no test folder) from its train.
        missing_val = 0 if (fixed == VAL).any() else n_val
        missing_test = 0 if (fixed == TEST).any() else n_test
        free = fixed < 0
        pool = np.concatenate([groups[free], groups[fixed == TRAIN]])
        is_free = np.arange(len(pool)) < free.sum()
        shuffle = rng.permutation(len(pool))
        pool, is_free = pool[shuffle], is_free[shuffle]
        carved = _carve(len(pool), missing_val, missing_test)
        moved = (carved != TRAIN) | is_free
        group_split[pool[moved]] = carved[moved]
    return group_split[inverse]


def original_codes(values: np.ndarray | pd.Series) -> np.ndarray:
    """original_split values as codes: a split's index in SPLITS, NOT_A_SPLIT, or MISSING for NaN."""
    values = pd.Series(values, copy=False)
    codes = np.full(len(values), NOT_A_SPLIT, dtype=np.int8)
    codes[values.isna().to_numpy()] = MISSING
    for code, name in enumerate(SPLITS):
        codes[(values == name).to_numpy()] = code
    return codes


def _check_source_split(params: SplitParams, any_original: bool) -> None:
    """keep_source_split needs a source with train/val/test folders (`any_original`: some row has one)."""
    if params.keep_source_split and not any_original:
        raise UserError("split.keep_source_split is true, but the source has no train/val/test folders; "
                        "set it to false to split at random")


def assign_splits(manifest: pd.DataFrame, params: SplitParams, seed: int) -> pd.DataFrame:
    """The manifest with a `split` column (train/val/test), sorted by split, label and path."""
    _check_source_split(params, manifest["original_split"].fillna("").astype(bool).any())
    labels, names = pd.factorize(manifest["label"], sort=True)
    inverse, _ = pd.factorize(manifest["sha256"], sort=True)
    original = original_codes(manifest["original_split"]) if params.keep_source_split else None
    codes = split_codes(labels, len(names), inverse, original, params, seed)
    out = manifest.copy()
    out["split"] = pd.Series(np.array(SPLITS, dtype=object)[codes], index=out.index, dtype="str")
    return out.sort_values(["split", "label", "path"], kind="stable").reset_index(drop=True)


def _check(label_names: list, labels: np.ndarray, codes: np.ndarray) -> None:
    """check_splits on codes: `labels` are ranks in `label_names` (sorted)."""
    has_train = np.bincount(labels[codes == TRAIN], minlength=len(label_names)) > 0
    for label, ok in zip(label_names, has_train, strict=True):
        if not ok:
            raise UserError(f"class '{label}' has no training image; lower split.val_fraction/test_fraction "
                            "or add images")
    for code in (VAL, TEST):
        if not (codes == code).any():
            raise UserError(f"the {SPLITS[code]} split is empty: raise split.{SPLITS[code]}_fraction or add images")


def check_splits(split_frame: pd.DataFrame) -> None:
    """Every class needs a training image, and the test split must not be empty."""
    labels, names = pd.factorize(split_frame["label"], sort=True)
    codes = np.full(len(split_frame), -1, dtype=np.int8)
    for code, name in enumerate(SPLITS):
        codes[(split_frame["split"] == name).to_numpy()] = code
    _check(list(names), labels, codes)


# ---------------------------------------------------------------- stage (streaming)


def _chunks(manifest: Path, **read_csv) -> Iterator[pd.DataFrame]:
    """The manifest CHUNK_ROWS rows at a time, read as the whole file would be (no NaN: every
    field is kept as written)."""
    with pd.read_csv(manifest, keep_default_na=False, chunksize=CHUNK_ROWS, **read_csv) as reader:
        yield from reader


def _utf8(column: pd.Series) -> np.ndarray:
    """A text column as fixed-width UTF-8 byte strings: ~1 byte a character instead of a Python
    str each, and they sort as the strs do (UTF-8 keeps code point order)."""
    return np.char.encode(column.to_numpy(dtype=str), "utf-8")


class KeyColumns:
    """What the assignment and the files' order need of each manifest row, compactly: class and
    content group as ranks, original split as a code, path as UTF-8 bytes. `streamable` is false
    when a chunk read a class name as a number, where pandas' whole-file inference is the rule."""

    def __init__(self, manifest: Path) -> None:
        labels, sha256, paths, original = [], [], [], []
        self.streamable, self.any_original = True, False
        for chunk in _chunks(manifest, usecols=["path", "label", "sha256", "original_split"]):
            self.streamable &= pd.api.types.is_string_dtype(chunk["label"])
            self.any_original |= bool(chunk["original_split"].astype(bool).any())
            labels.append(_utf8(chunk["label"]))
            sha256.append(_utf8(chunk["sha256"]))
            paths.append(_utf8(chunk["path"]))
            original.append(original_codes(chunk["original_split"]))
        label_bytes, self.labels = np.unique(_join(labels, "S"), return_inverse=True)
        self.label_names = [b.decode() for b in label_bytes]
        self.inverse = np.unique(_join(sha256, "S"), return_inverse=True)[1]
        self.paths = _join(paths, "S")
        self.original = _join(original, np.int8)

    def in_file_order(self, codes: np.ndarray) -> bool:
        """Whether each split's rows, in manifest order, are sorted by label, then path (so the
        split files can be written as the manifest is read)."""
        for code in range(len(SPLITS)):
            rows = np.flatnonzero(codes == code)
            label, path = self.labels[rows], self.paths[rows]
            later = (label[1:] > label[:-1]) | ((label[1:] == label[:-1]) & (path[1:] >= path[:-1]))
            if not later.all():
                return False
        return True


def _join(parts: list[np.ndarray], dtype: object) -> np.ndarray:
    return np.concatenate(parts) if parts else np.array([], dtype=dtype)


def _log(name: str, counts: dict) -> None:
    log.info("split: %-5s %4d images %s", name, sum(counts.values()), counts)


def write_streamed(manifest: Path, codes: np.ndarray, paths: Paths) -> None:
    """Each split's rows, with their `split` column, to its CSV, as the manifest is read again a
    chunk at a time: byte for byte what writing each part of the whole frame gives."""
    names = np.array(SPLITS, dtype=object)
    with ExitStack() as stack:
        files = [stack.enter_context(open(paths.split_csv(name), "w", encoding="utf-8", newline=""))
                 for name in SPLITS]
        start = 0
        for n, chunk in enumerate(_chunks(manifest)):
            chunk_codes = codes[start:start + len(chunk)]
            start += len(chunk)
            chunk["split"] = names[chunk_codes]
            for code, out in enumerate(files):
                chunk[chunk_codes == code].to_csv(out, header=n == 0, index=False)


def write_from_frame(manifest: Path, params: Params, paths: Paths) -> None:
    """The split files from one frame of the whole manifest (a manifest ingest did not write)."""
    frame = assign_splits(pd.read_csv(manifest, keep_default_na=False), params.split, params.base.seed)
    check_splits(frame)
    paths.splits.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        part = frame[frame["split"] == name]
        part.to_csv(paths.split_csv(name), index=False)
        _log(name, {k: int(v) for k, v in part["label"].value_counts().sort_index().items()})


def main(paths: Paths, params: Params) -> None:
    if not paths.manifest.exists():
        raise UserError(f"{paths.manifest} not found: run `cleanmessy ingest` (or `dvc repro`) first")
    p = params.split
    keys = KeyColumns(paths.manifest)
    if not keys.streamable:
        write_from_frame(paths.manifest, params, paths)
        return
    _check_source_split(p, keys.any_original)
    codes = split_codes(keys.labels, len(keys.label_names), keys.inverse, keys.original, p, params.base.seed)
    _check(keys.label_names, keys.labels, codes)
    if not keys.in_file_order(codes):
        write_from_frame(paths.manifest, params, paths)
        return
    paths.splits.mkdir(parents=True, exist_ok=True)
    write_streamed(paths.manifest, codes, paths)
    for code, name in enumerate(SPLITS):
        n = np.bincount(keys.labels[codes == code], minlength=len(keys.label_names))
        _log(name, {keys.label_names[i]: int(n[i]) for i in np.flatnonzero(n)})
