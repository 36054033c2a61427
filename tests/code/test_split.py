"""split: stratified, seeded, duplicate-aware assignment of manifest rows to train/val/test."""

import hashlib

import pandas as pd
import pytest

from cleanmessy.errors import UserError
from cleanmessy.params import SplitParams
from cleanmessy.stages.split import assign_splits, check_splits

COLUMNS = ["path", "label", "sha256", "width", "height", "format", "original_split", "source_path"]
DEFAULT = SplitParams(val_fraction=0.1, test_fraction=0.1)


def row(label: str, key: str, original_split: str = "", copy: int = 0) -> dict:
    sha = hashlib.sha256(f"{label}/{key}".encode()).hexdigest()
    name = f"{sha[:16]}_{copy}.png"
    source = f"{original_split + '/' if original_split else ''}{label}/{key}_{copy}.png"
    return {"path": f"data/images/{label}/{name}", "label": label, "sha256": sha, "width": 64,
            "height": 64, "format": "PNG", "original_split": original_split, "source_path": source}


def manifest(per_class: dict[str, int], original_split: str = "") -> pd.DataFrame:
    rows = [row(label, str(i), original_split) for label, n in per_class.items() for i in range(n)]
    return pd.DataFrame(rows, columns=COLUMNS)


def counts(frame: pd.DataFrame) -> dict[tuple[str, str], int]:
    return frame.groupby(["label", "split"]).size().to_dict()


def test_stratified_counts():
    """0.8/0.1/0.1 on 50+50 rows gives 40/5/5 in each class."""
    out = assign_splits(manifest({"clean": 50, "messy": 50}), DEFAULT, seed=42)
    assert counts(out) == {(label, s): n for label in ("clean", "messy")
                           for s, n in (("train", 40), ("val", 5), ("test", 5))}


def test_output_keeps_rows_and_columns():
    """Every input row comes back once with its columns plus `split`."""
    m = manifest({"clean": 20, "messy": 20})
    out = assign_splits(m, DEFAULT, seed=0)
    assert list(out.columns) == COLUMNS + ["split"]
    assert sorted(out["path"]) == sorted(m["path"])
    assert out["split"].notna().all()


def test_same_seed_is_identical():
    """The same manifest and seed give an identical frame."""
    m = manifest({"clean": 50, "messy": 50})
    assert assign_splits(m, DEFAULT, seed=7).equals(assign_splits(m, DEFAULT, seed=7))


def test_row_order_does_not_matter():
    """Shuffling the manifest's rows does not change the result."""
    m = manifest({"clean": 50, "messy": 50})
    shuffled = m.sample(frac=1, random_state=3).reset_index(drop=True)
    assert assign_splits(shuffled, DEFAULT, seed=7).equals(assign_splits(m, DEFAULT, seed=7))


def test_different_seed_changes_assignment():
    """Another seed puts different images in the held-out splits."""
    m = manifest({"clean": 50, "messy": 50})
    a = assign_splits(m, DEFAULT, seed=1).set_index("path")["split"]
    b = assign_splits(m, DEFAULT, seed=2).set_index("path")["split"]
    assert not a.sort_index().equals(b.sort_index())


def test_identical_content_shares_a_split():
    """Rows with the same sha256 always land in the same split; fractions count content groups."""
    rows = [row(label, str(i), copy=c) for label in ("clean", "messy") for i in range(30)
            for c in range(1 + i % 3)]
    m = pd.DataFrame(rows, columns=COLUMNS)
    for seed in range(5):
        out = assign_splits(m, DEFAULT, seed=seed)
        assert (out.groupby("sha256")["split"].nunique() == 1).all()
        groups = out.drop_duplicates("sha256").groupby(["label", "split"]).size().to_dict()
        assert groups[("clean", "test")] == 3 and groups[("messy", "val")] == 3


def test_tiny_class_still_gets_val_and_test():
    """With 3 images per class, each split gets one image of each class."""
    out = assign_splits(manifest({"clean": 3, "messy": 3}), DEFAULT, seed=0)
    assert set(counts(out).values()) == {1}
    assert len(counts(out)) == 6


def kaggle_manifest() -> pd.DataFrame:
    """train 40 + val 10 per class, no test folder."""
    rows = [row(label, f"{s}{i}", s) for label in ("clean", "messy")
            for s, n in (("train", 40), ("val", 10)) for i in range(n)]
    return pd.DataFrame(rows, columns=COLUMNS)


def test_keep_source_split_carves_test_from_train():
    """keep_source_split keeps val as given and carves a test split from the source's train."""
    m = kaggle_manifest()
    out = assign_splits(m, SplitParams(0.1, 0.1, keep_source_split=True), seed=0)
    assert (out.loc[out["original_split"] == "val", "split"] == "val").all()
    assert set(out.loc[out["original_split"] == "train", "split"]) == {"train", "test"}
    assert counts(out) == {(label, s): n for label in ("clean", "messy")
                           for s, n in (("train", 35), ("val", 10), ("test", 5))}


def test_keep_source_split_carves_val_when_missing():
    """A source with train and test folders keeps its test set and takes val from train."""
    rows = [row(label, f"{s}{i}", s) for label in ("clean", "messy")
            for s, n in (("train", 40), ("test", 8)) for i in range(n)]
    out = assign_splits(pd.DataFrame(rows, columns=COLUMNS), SplitParams(0.1, 0.1, True), seed=0)
    assert (out.loc[out["original_split"] == "test", "split"] == "test").all()
    assert counts(out)[("clean", "val")] == 5 and counts(out)[("clean", "test")] == 8
    assert set(out.loc[out["split"] == "val", "original_split"]) == {"train"}


def test_keep_source_split_is_deterministic():
    """keep_source_split with the same seed gives an identical frame."""
    p = SplitParams(0.1, 0.1, keep_source_split=True)
    assert assign_splits(kaggle_manifest(), p, 5).equals(assign_splits(kaggle_manifest(), p, 5))


def test_keep_source_split_without_source_splits():
    """keep_source_split on a source with no train/val/test folders is a UserError."""
    with pytest.raises(UserError, match="keep_source_split"):
        assign_splits(manifest({"clean": 10, "messy": 10}), SplitParams(keep_source_split=True), seed=0)


def test_check_splits_accepts_normal_split():
    """A split with train, val and test images in every class passes."""
    check_splits(assign_splits(manifest({"clean": 20, "messy": 20}), DEFAULT, seed=0))


def test_check_splits_empty_test():
    """2 images per class with test_fraction 0 leaves test empty: UserError naming it."""
    out = assign_splits(manifest({"clean": 2, "messy": 2}), SplitParams(0.5, 0.0), seed=0)
    assert (out["split"] == "val").sum() == 2
    with pytest.raises(UserError, match="test split is empty"):
        check_splits(out)


def test_check_splits_class_without_training_image():
    """A class with no train row is a UserError naming the class."""
    out = assign_splits(manifest({"clean": 10, "messy": 10}), DEFAULT, seed=0)
    out.loc[(out["label"] == "messy") & (out["split"] == "train"), "split"] = "val"
    with pytest.raises(UserError, match="class 'messy' has no training image"):
        check_splits(out)


# ---------------------------------------------------------------- the compact, streaming stage


def reference_assign(manifest: pd.DataFrame, params: SplitParams, seed: int) -> pd.DataFrame:
    """assign_splits as it was written before it went to numpy codes: dicts of hashes."""
    import numpy as np

    def carve(groups, n_val, n_test):
        return {g: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, g in enumerate(groups)}

    def k(n, fraction):
        return max(int(round(n * fraction)), 1) if fraction > 0 and n >= 3 else int(round(n * fraction))

    rng = np.random.default_rng(seed)
    group_split: dict[str, str] = {}
    for label in sorted(manifest["label"].unique()):
        rows = manifest[manifest["label"] == label]
        groups = sorted(rows["sha256"].unique())
        n_val, n_test = k(len(groups), params.val_fraction), k(len(groups), params.test_fraction)
        if params.keep_source_split:
            original = rows.groupby("sha256")["original_split"].first().fillna("")
            fixed = {g: s for g, s in original.items() if s in ("train", "val", "test")}
            group_split.update(fixed)
            free = [g for g in groups if g not in fixed]
            pool = free + [g for g in groups if fixed.get(g) == "train"]
            pool = [pool[i] for i in rng.permutation(len(pool))]
            carved = carve(pool, 0 if "val" in fixed.values() else n_val, 0 if "test" in fixed.values() else n_test)
            group_split.update({g: s for g, s in carved.items() if s != "train" or g in free})
        else:
            group_split.update(carve([groups[i] for i in rng.permutation(len(groups))], n_val, n_test))
    out = manifest.copy()
    out["split"] = out["sha256"].map(group_split)
    return out.sort_values(["split", "label", "path"], kind="stable").reset_index(drop=True)


def awkward_manifest() -> pd.DataFrame:
    """Copies (one content under several paths, and under two labels), a source's own splits
    that disagree within a group, rows in no particular order."""
    rows = [row(label, str(i), split, copy=c) for label in ("clean", "messy", "tidy")
            for i in range(40) for split in [("", "train", "val", "test", "train")[i % 5]]
            for c in range(1 + (i % 7 == 0))]
    rows += [{**row("clean", "3"), "label": "messy", "path": "data/images/messy/x.png"},
             {**row("messy", "8", copy=1), "original_split": "test"}]
    return pd.DataFrame(rows, columns=COLUMNS).sample(frac=1, random_state=0).reset_index(drop=True)


@pytest.mark.parametrize("keep", [False, True])
def test_assign_splits_equals_the_dict_reference(keep):
    """The numpy assignment is the dict one, row for row, for many seeds and awkward manifests."""
    params = SplitParams(0.15, 0.2, keep_source_split=keep)
    small = manifest({"a": 1, "b": 2, "c": 3, "d": 30}, "train" if keep else "")
    for m in (awkward_manifest(), kaggle_manifest(), small):
        for seed in range(6):
            got, want = assign_splits(m, params, seed), reference_assign(m, params, seed)
            assert got.equals(want) and list(got.dtypes) == list(want.dtypes)


def run_stage(tmp_path, monkeypatch, frame: pd.DataFrame, params: SplitParams, chunk: int = 7) -> dict[str, bytes]:
    """split.main on `frame` written as the manifest, reading `chunk` rows at a time."""
    from cleanmessy.params import BaseParams, Params
    from cleanmessy.project import Paths
    from cleanmessy.stages import split

    monkeypatch.setattr(split, "CHUNK_ROWS", chunk)
    paths = Paths(tmp_path / "p")
    paths.manifest.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(paths.manifest, index=False)
    split.main(paths, Params(base=BaseParams(seed=3), split=params))
    return {name: paths.split_csv(name).read_bytes() for name in ("train", "val", "test")}


def reference_files(tmp_path, frame: pd.DataFrame, params: SplitParams) -> dict[str, bytes]:
    """The split files as the stage wrote them from one frame with the dict reference."""
    path = tmp_path / "ref.csv"
    frame.to_csv(path, index=False)
    out = reference_assign(pd.read_csv(path, keep_default_na=False), params, 3)
    return {name: out[out["split"] == name].to_csv(index=False).encode() for name in ("train", "val", "test")}


def ingest_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows as ingest writes them: by label, then hash."""
    return frame.sort_values(["label", "sha256"], kind="stable").reset_index(drop=True)


@pytest.mark.parametrize("case", ["ingest-order", "kaggle-kept", "shuffled", "numeric-labels"])
def test_stage_files_are_byte_identical_to_the_reference(tmp_path, monkeypatch, case):
    """Streamed (a manifest in ingest's order) or from one frame (any other), the split files are
    byte for byte those of the whole-frame reference."""
    params = SplitParams(0.1, 0.1, keep_source_split=case == "kaggle-kept")
    frame = {"ingest-order": lambda: ingest_order(awkward_manifest()),
             "kaggle-kept": lambda: ingest_order(kaggle_manifest()),
             "shuffled": awkward_manifest,
             "numeric-labels": lambda: ingest_order(manifest({"9": 20, "10": 20, "007": 20}))}[case]()
    assert run_stage(tmp_path, monkeypatch, frame, params) == reference_files(tmp_path, frame, params)


def test_stage_streams_an_ingest_manifest(tmp_path, monkeypatch):
    """A manifest as ingest writes it (one row per content and class) is never read into one frame."""
    from cleanmessy.stages import split

    def no_frame(*args, **kwargs):
        raise AssertionError("read as one frame")
    monkeypatch.setattr(split, "write_from_frame", no_frame)
    frame = ingest_order(manifest({"clean": 30, "messy": 25, "tidy": 3}))
    assert run_stage(tmp_path, monkeypatch, frame, DEFAULT) == reference_files(tmp_path, frame, DEFAULT)


def test_stage_errors_before_writing(tmp_path, monkeypatch):
    """keep_source_split without source splits, or a split left empty: an error, no split files."""
    with pytest.raises(UserError, match="keep_source_split"):
        run_stage(tmp_path, monkeypatch, ingest_order(manifest({"clean": 10, "messy": 10})),
                  SplitParams(keep_source_split=True))
    with pytest.raises(UserError, match="the test split is empty"):
        run_stage(tmp_path, monkeypatch, ingest_order(manifest({"clean": 2, "messy": 2})), SplitParams(0.5, 0.0))
    assert not (tmp_path / "p" / "data" / "splits").exists()
