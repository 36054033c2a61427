"""The model card and the Wilson interval it reports."""

from __future__ import annotations

import pytest

from cleanmessy.card import data_family, data_warning, describe_data, render_card, wilson_interval


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (29, 30, 0.8333, 0.9941),   # the "97 %" that is really somewhere in 83-99 %
    (15, 20, 0.5313, 0.8881),
    (50, 100, 0.4038, 0.5962),
])
def test_wilson_interval_known_values(k, n, low, high):
    """Matches published Wilson score intervals (z = 1.96)."""
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_edges():
    """All right or all wrong still gives a proper interval inside [0, 1]; n = 0 says nothing."""
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and 0.8 < lo < 0.85
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.15 < hi < 0.2
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_card_states_data_params_interval_recall_and_limits():
    test = {"n": 30, "loss": 0.2, "accuracy": 29 / 30, "accuracy_ci95_low": 0.8333, "accuracy_ci95_high": 0.9941,
            "roc_auc": 0.99, "macro_f1": 0.966,
            "per_class": {"clean": {"precision": 1.0, "recall": 0.9333, "f1": 0.9655, "support": 15},
                          "messy": {"precision": 0.9375, "recall": 1.0, "f1": 0.9677, "support": 15}}}
    data = {**describe_data({"source": "../photos", "source_kind": "folder", "classes": {"clean": 96, "messy": 96}}),
            "source": "../photos", "split_sizes": {"train": 152, "val": 20, "test": 20}, "manifest_sha256": "ab" * 32}
    card = render_card("clean-vs-messy", data, {"train.arch": "mobilenet_v2", "train.alpha": 0.35}, test)
    assert "Trained on photos from the folder ../photos." in card
    assert "# Model card: clean-vs-messy" in card
    assert "`../photos`" in card and "clean: 96" in card and "ab" * 32 in card
    assert "| `train.arch` | `mobilenet_v2` |" in card
    assert "(29/30)" in card and "[0.833, 0.994]" in card
    assert "| clean | 1.000 | 0.933 |" in card
    assert "staged vs lived-in" in card and "synthetic" not in card


def sample_model() -> tuple[dict, dict]:
    """The test results and data description of a model trained on the embedded sample."""
    test = {"n": 60, "loss": 0.02, "accuracy": 1.0, "accuracy_ci95_low": 0.94, "accuracy_ci95_high": 1.0,
            "roc_auc": 1.0, "macro_f1": 1.0,
            "per_class": {c: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 30} for c in ("clean", "messy")}}
    report = {"source": "data/sample", "source_kind": "sample", "classes": {"clean": 300, "messy": 300}}
    data = {**describe_data(report), "source": "data/sample", "split_sizes": {"train": 480, "val": 60, "test": 60},
            "manifest_sha256": "cd" * 32}
    return test, data


def test_card_of_a_sample_model_says_it_never_saw_a_photo():
    """A model trained on the embedded sample says so, and its limits are about that data."""
    test, data = sample_model()
    card = render_card("clean-vs-messy", data, {"train.arch": "seed_cnn"}, test)
    assert ("Trained on the embedded synthetic sample: cartoon rooms drawn by the project's generator, "
            "not photos.") in card
    assert "not meaningful" in card and "staged vs lived-in" not in card


def test_card_reports_how_often_the_familiarity_flag_fires():
    test, data = sample_model()
    familiarity = {"auroc": 0.9944, "flag_rate_in": 0.05, "flag_rate_out": 58 / 60, "flagged_in": 3, "n_in": 60,
                   "flagged_out": 58, "n_out": 60, "familiarity_k": 5, "familiarity_alpha": 0.05,
                   "by_kind": {"noise": {"n": 12, "flag_rate": 1.0}, "text": {"n": 12, "flag_rate": 11 / 12}}}
    card = render_card("clean-vs-messy", data, {"train.arch": "seed_cnn"}, test, familiarity)
    assert "## Familiarity" in card and "5th-nearest training photo" in card and "Below 5 %" in card
    assert "Test split flagged: **5.0 %** (3/60)" in card
    assert "**96.7 %**" in card and "(58/60: noise 100 %, text 92 %)" in card and "**0.994**" in card
    assert card.index("## Familiarity") < card.index("## Known limits")
    assert "## Familiarity" not in render_card("clean-vs-messy", data, {"train.arch": "seed_cnn"}, test)


def test_describe_data_counts_and_kinds():
    assert describe_data({"source": "x.zip", "source_kind": "zip", "classes": {"clean": 3, "messy": 4}}) == {
        "kind": "zip", "family": "zip:x.zip", "description": "photos from the archive x.zip", "n_images": 7,
        "classes": {"clean": 3, "messy": 4}}
    assert describe_data({"source": "https://h/x.zip", "source_kind": "url", "classes": {"a": 1}})["description"] == \
        "photos downloaded from https://h/x.zip"


def test_data_family_is_the_kind_and_source():
    """One family for the embedded sample; for photos, the kind and the source as written,
    normalised (`./photos/` is `photos`)."""
    assert data_family("sample", "data/sample") == "sample"
    assert data_family("folder", "../shared/datasets/clean-messy/") == "folder:../shared/datasets/clean-messy"
    assert data_family("folder", "../other") != data_family("folder", "../shared/datasets/clean-messy")
    assert data_family("folder", "./photos/") == data_family("folder", "photos") == "folder:photos"
    assert data_family("url", "https://h/x.zip") == "url:https://h/x.zip"


def test_data_warning_only_for_the_sample():
    """The warning `cleanmessy predict` prints and the app shows: for sample-trained models only."""
    assert "not meaningful" in data_warning({"kind": "sample"})
    assert data_warning({"kind": "folder"}) == data_warning(None) == ""


def test_wilson_bounds_carry_no_float_noise():
    """29/30's upper bound printed as 0.9999999999999999 before rounding."""
    for k, n in ((29, 30), (60, 60), (0, 20), (59, 60)):
        low, high = wilson_interval(k, n)
        assert low == round(low, 6) and high == round(high, 6) and 0 <= low <= high <= 1
