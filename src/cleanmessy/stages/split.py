"""split: data/manifest.csv -> data/splits/{train,val,test}.csv, stratified by label.

Deterministic: rows are ordered by content hash before the seeded shuffle, so the same manifest
and seed give byte-identical files. Images with identical content form one group and always land
in the same split, so a test image is never also a training image.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from cleanmessy.errors import UserError
from cleanmessy.params import Params, SplitParams
from cleanmessy.project import Paths

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _carve(groups: list[str], n_val: int, n_test: int) -> dict[str, str]:
    """First `n_test` groups to test, next `n_val` to val, the rest to train."""
    out = {}
    for i, g in enumerate(groups):
        out[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def _counts(n: int, fraction: float) -> int:
    """Rows for a split of `fraction`: at least one when the fraction asks for any and the class
    has three or more groups, so a tiny data set still gets a val and a test image per class."""
    k = int(round(n * fraction))
    return max(k, 1) if fraction > 0 and n >= 3 else k


def assign_splits(manifest: pd.DataFrame, params: SplitParams, seed: int) -> pd.DataFrame:
    """The manifest with a `split` column (train/val/test)."""
    if params.keep_source_split and not manifest["original_split"].fillna("").astype(bool).any():
        raise UserError("split.keep_source_split is true, but the source has no train/val/test folders; "
                        "set it to false to split at random")
    rng = np.random.default_rng(seed)
    group_split: dict[str, str] = {}
    for label in sorted(manifest["label"].unique()):
        rows = manifest[manifest["label"] == label]
        groups = sorted(rows["sha256"].unique())
        n = len(groups)
        n_val, n_test = _counts(n, params.val_fraction), _counts(n, params.test_fraction)
        if params.keep_source_split:
            original = rows.groupby("sha256")["original_split"].first().fillna("")
            fixed = {g: s for g, s in original.items() if s in SPLITS}
            group_split.update(fixed)
            free = [g for g in groups if g not in fixed]
            # Carve a split the source lacks (e.g. Kaggle's layout has no test folder) from its train.
            missing_val = 0 if "val" in fixed.values() else n_val
            missing_test = 0 if "test" in fixed.values() else n_test
            pool = free + [g for g in groups if fixed.get(g) == "train"]
            pool = [pool[i] for i in rng.permutation(len(pool))]
            carved = _carve(pool, missing_val, missing_test)
            group_split.update({g: s for g, s in carved.items() if s != "train" or g in free})
        else:
            order = [groups[i] for i in rng.permutation(n)]
            group_split.update(_carve(order, n_val, n_test))
    out = manifest.copy()
    out["split"] = out["sha256"].map(group_split)
    return out.sort_values(["split", "label", "path"], kind="stable").reset_index(drop=True)


def check_splits(split_frame: pd.DataFrame) -> None:
    """Every class needs a training image, and the test split must not be empty."""
    for label, rows in split_frame.groupby("label"):
        if not (rows["split"] == "train").any():
            raise UserError(f"class '{label}' has no training image; lower split.val_fraction/test_fraction "
                            "or add images")
    for name in ("val", "test"):
        if not (split_frame["split"] == name).any():
            raise UserError(f"the {name} split is empty: raise split.{name}_fraction or add images")


def main(paths: Paths, params: Params) -> None:
    try:
        manifest = pd.read_csv(paths.manifest, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"{paths.manifest} not found: run `cleanmessy ingest` (or `dvc repro`) first") from None
    frame = assign_splits(manifest, params.split, params.base.seed)
    check_splits(frame)
    paths.splits.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        part = frame[frame["split"] == name]
        part.to_csv(paths.split_csv(name), index=False)
        log.info("split: %-5s %4d images %s", name, len(part), part["label"].value_counts().sort_index().to_dict())
