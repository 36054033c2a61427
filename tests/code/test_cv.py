"""Cross-validation plan and summary (the cv command's pure core)."""

from __future__ import annotations

import pandas as pd
import pytest

from cleanmessy.crossval import fold_plan, summarize
from cleanmessy.errors import UserError


def manifest(n_per_class: int) -> pd.DataFrame:
    rows = [{"path": f"{label}/{i}.png", "label": label, "sha256": f"{label}{i}"}
            for label in ("clean", "messy") for i in range(n_per_class)]
    return pd.DataFrame(rows)


def test_each_repeat_tests_every_image_once_stratified():
    """k folds x r repeats; in each repeat every image is tested exactly once, folds are balanced,
    and the early-stopping val part never overlaps train or test."""
    frame = manifest(20)
    plan = list(fold_plan(frame, folds=5, repeats=2, val_fraction=0.1, seed=0))
    assert len(plan) == 10
    for repeat in (0, 1):
        tested = [path for r, _, _, _, test in plan if r == repeat for path in test["path"]]
        assert sorted(tested) == sorted(frame["path"])
    for _, _, fit, val, test in plan:
        assert test["label"].value_counts().to_dict() == {"clean": 4, "messy": 4}
        assert not set(val["path"]) & set(test["path"]) and not set(val["path"]) & set(fit["path"])
        assert set(val["label"]) == {"clean", "messy"}


def test_plan_is_deterministic_and_repeats_differ():
    frame = manifest(10)
    first = [list(test["path"]) for *_, test in fold_plan(frame, 2, 2, 0.1, seed=3)]
    again = [list(test["path"]) for *_, test in fold_plan(frame, 2, 2, 0.1, seed=3)]
    assert first == again and first[0] != first[2]


def test_too_few_images_for_the_folds():
    with pytest.raises(UserError, match="cv.folds is 5"):
        list(fold_plan(manifest(3), 5, 1, 0.1, seed=0))


def test_summary_mean_spread_and_interval():
    summary = summarize([0.9, 1.0, 0.95, 0.95], n_images=100)
    assert summary["accuracy_mean"] == pytest.approx(0.95)
    assert summary["accuracy_std"] == pytest.approx(0.0408, abs=1e-4)
    assert summary["accuracy_ci95_low"] < 0.95 < summary["accuracy_ci95_high"]
    assert summary["folds_run"] == 4
