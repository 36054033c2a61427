"""`cleanmessy monitor`'s core on synthetic numbers: the three checks, the Bonferroni rule, "not
enough data", reading request-log lines, the verdict line and the figure. Fast, no model."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from cleanmessy import monitor
from cleanmessy.monitor import (
    DRIFT,
    FEATURES,
    FLAG_RATE,
    LABEL_MIX,
    NO_DRIFT,
    NOT_ENOUGH,
    Recent,
    Reference,
    compare,
    features_check,
    flag_rate_check,
    label_mix_check,
    mmd_test,
    select_records,
)

TRAINING_COUNTS = {"clean": 120, "messy": 120}


def in_distribution(n: int, seed: int, dims: int = 8, alpha: float = 0.05, shift: float = 0.0,
                    messy_share: float = 0.5, familiarity_scale: float = 1.0) -> Recent:
    """n photos as a model sees photos like its training photos: uniform familiarity, the training
    label mix, standard normal features (optionally shifted, relabelled or less familiar)."""
    rng = np.random.default_rng(seed)
    familiarity = rng.uniform(0.0, 1.0, n) * familiarity_scale + 1e-9
    labels = np.where(rng.uniform(size=n) < messy_share, "messy", "clean").tolist()
    return Recent(labels=labels, familiarity=familiarity, unfamiliar=(familiarity < alpha).astype(float),
                  projections=rng.normal(size=(n, dims)) + shift)


def reference(seed: int = 100, m: int = 240, dims: int = 8, measured: float | None = None) -> Reference:
    return Reference(class_counts=dict(TRAINING_COUNTS), projections=np.random.default_rng(seed).normal(size=(m, dims)),
                     alpha=0.05, measured_flag_rate=measured)


def test_same_distribution_is_no_drift():
    report = compare(in_distribution(300, seed=1), reference())
    assert report.verdict == NO_DRIFT, report.reason
    assert all(c.ran for c in report.checks)
    assert report.threshold == pytest.approx(0.01 / 3)  # Bonferroni over the three checks
    assert report.line().startswith("monitor: no drift — 300 photos, ")
    assert len(report.line()) <= monitor.WIDTH


def test_false_alarms_are_rare_over_many_samples():
    """The whole rule on 30 independent same-distribution samples: at most one false alarm (the
    rule's family-wise rate is 1 %)."""
    verdicts = [compare(in_distribution(60, seed=s), reference(seed=1000 + s, m=60), permutations=200).verdict
                for s in range(30)]
    assert verdicts.count(DRIFT) <= 1, verdicts


def test_shifted_features_are_drift():
    report = compare(in_distribution(200, seed=2, shift=0.6), reference())
    assert report.verdict == DRIFT
    features = report.check(FEATURES)
    assert features.drift and features.p_value == pytest.approx(1 / (monitor.PERMUTATIONS + 1))
    assert not report.check(FLAG_RATE).drift and not report.check(LABEL_MIX).drift
    assert "features differ (MMD p ≤ 0.002)" in report.line()


def test_mmd_p_values_are_roughly_uniform_under_the_null():
    ps = [mmd_test(np.random.default_rng(s).normal(size=(40, 4)), np.random.default_rng(500 + s).normal(size=(50, 4)),
                   permutations=199, seed=s)[1] for s in range(40)]
    assert 0.3 < np.mean(ps) < 0.7
    assert sum(p < 0.05 for p in ps) <= 6


def test_mmd_is_seeded_and_bounded():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2000, 4)), rng.normal(size=(1500, 4)) + 0.3
    first = mmd_test(x, y, permutations=100, max_rows=300, seed=7)
    assert first == mmd_test(x, y, permutations=100, max_rows=300, seed=7)  # same seed, same answer
    assert first[1] == pytest.approx(1 / 101)  # 300 vs 300 rows still see a 0.3 shift
    with pytest.raises(ValueError, match="at least 2 rows"):
        mmd_test(x[:1], y)


def test_flag_rate_test_is_one_sided():
    many = flag_rate_check(30, 100, 0.05)
    assert many.drift and many.p_value < 1e-8 and many.statistic == pytest.approx(0.3)
    assert many.short == "30 % of 100 unfamiliar (expected 5 %)"
    assert not flag_rate_check(7, 100, 0.05).drift  # a few more than 5 is chance
    none = flag_rate_check(0, 100, 0.05)
    assert none.p_value == 1.0 and not none.drift  # fewer flags than expected is no alarm
    assert not flag_rate_check(0, 0, 0.05).ran
    assert not flag_rate_check(3, 10, None).ran  # a version without a detector


def test_unfamiliar_photos_are_drift_even_with_features_unrecorded():
    recent = in_distribution(120, seed=3, familiarity_scale=0.06)  # most below alpha
    recent = Recent(recent.labels, recent.familiarity, recent.unfamiliar, projections=None)
    report = compare(recent, reference())
    assert report.verdict == DRIFT
    assert not report.check(FEATURES).ran
    assert report.threshold == pytest.approx(0.01 / 2)  # two checks ran
    assert report.line().startswith("monitor: drift — 8")  # "8x % of 120 unfamiliar (expected 5 %)"
    assert "of 120 unfamiliar (expected 5 %)" in report.line()


def test_expected_flag_rate_uses_the_measured_rate_but_never_less_than_alpha():
    assert reference(measured=0.12).expected_flag_rate == pytest.approx(0.12)
    assert reference(measured=0.12).flag_rate_source == "ood_flag_rate_in"
    assert reference(measured=0.0).expected_flag_rate == pytest.approx(0.05)  # a small test split's zero
    assert reference(measured=None).flag_rate_source == "alpha"
    recent = in_distribution(200, seed=4, familiarity_scale=0.33)  # ~15 % flagged
    assert compare(recent, reference(measured=0.15)).check(FLAG_RATE).p_value > 0.2
    assert compare(recent, reference(measured=None)).check(FLAG_RATE).drift


def test_label_mix_two_classes_exact():
    same = label_mix_check({"clean": 52, "messy": 48}, TRAINING_COUNTS)
    assert not same.drift and same.p_value > 0.5
    moved = label_mix_check({"clean": 10, "messy": 90}, TRAINING_COUNTS)
    assert moved.drift and moved.p_value < 1e-10
    assert moved.short == "labels 90 % messy vs 50 % in training"
    assert moved.test.startswith("exact binomial")
    assert label_mix_check({"clean": 70, "messy": 30}, {"clean": 700, "messy": 300}).p_value > 0.9
    assert not label_mix_check({"clean": 5}, None).ran


def test_label_mix_more_classes():
    training = {"a": 100, "b": 100, "c": 100}
    large = label_mix_check({"a": 40, "b": 35, "c": 45}, training)
    assert large.test.startswith("chi-square test") and not large.drift
    small = label_mix_check({"a": 1, "b": 2, "c": 9}, training, seed=0)  # expected 4 each: Monte Carlo
    assert small.test.startswith("chi-square statistic, Monte Carlo")
    assert small.p_value == pytest.approx(label_mix_check({"a": 1, "b": 2, "c": 9}, training, seed=0).p_value)
    from scipy.stats import chisquare

    assert small.p_value == pytest.approx(chisquare([1, 2, 9]).pvalue, abs=0.02)


def test_a_shifted_label_mix_is_drift():
    report = compare(in_distribution(200, seed=5, messy_share=0.85), reference())
    assert report.verdict == DRIFT and report.check(LABEL_MIX).drift
    assert "messy vs 50 % in training" in report.line()


def test_too_few_requests_are_not_enough_data_not_drift():
    report = compare(in_distribution(12, seed=6, shift=3.0, familiarity_scale=0.01), reference())
    assert report.verdict == NOT_ENOUGH and not report.drift
    assert report.check(FLAG_RATE).drift  # the evidence is reported, the verdict waits for data
    assert report.line() == "monitor: not enough data — 12 classified photos, at least 20 needed (12 unfamiliar)"
    assert report.metrics()["drift"] == 0.0 and report.metrics()["enough_data"] == 0.0
    empty = compare(Recent([], np.zeros(0), np.zeros(0), None, n_errors=4), reference())
    assert empty.verdict == NOT_ENOUGH and empty.n_errors == 4
    assert not any(c.ran for c in empty.checks)


def test_a_version_without_a_detector_checks_the_label_mix_only():
    recent = in_distribution(100, seed=7)
    plain = Recent(recent.labels, np.full(100, np.nan), np.full(100, np.nan), None)
    report = compare(plain, Reference(dict(TRAINING_COUNTS), None, None))
    assert [c.ran for c in report.checks] == [False, True, False]
    assert report.verdict == NO_DRIFT and report.threshold == 0.01
    assert report.line() == "monitor: no drift — 100 photos, label mix as in training"
    assert report.expected_flag_rate is None and "flag_rate" not in report.metrics()


def test_verdict_line_fits_100_columns_in_the_worst_case():
    worst = compare(in_distribution(1000, seed=8, shift=2, messy_share=0.99, familiarity_scale=0.01),
                    Reference({"a-rather-long-class-name": 500, "messy": 500}, reference().projections, 0.05))
    assert worst.verdict == DRIFT and all(c.drift for c in worst.checks)
    assert len(worst.line()) <= monitor.WIDTH, worst.line()
    assert worst.line().startswith("monitor: drift — ")


def test_metrics_report_and_json():
    report = compare(in_distribution(150, seed=9, shift=1.0), reference())
    metrics = report.metrics()
    assert set(metrics) >= {"n", "flag_rate", "expected_flag_rate", "flag_rate_p", "label_mix_p", "mmd", "drift_p",
                            "drift"}
    assert metrics["drift"] == 1.0 and metrics["n"] == 150
    data = json.loads(json.dumps(report.to_dict(), default=monitor._json_default))
    assert data["verdict"] == DRIFT and [c["name"] for c in data["checks"]] == [FLAG_RATE, LABEL_MIX, FEATURES]
    assert data["line"] == report.line()


def log_line(i: int, model: str = "clean-vs-messy/3", **changes) -> dict:
    rng = np.random.default_rng(i)
    familiarity = float(rng.uniform(0.01, 1))
    return {"time": f"2026-12-07T09:00:{i % 60:02d}.000Z", "source": "app", "model": model, "sha256": f"{i:064x}",
            "label": "clean" if i % 2 else "messy", "probabilities": {"clean": 0.4, "messy": 0.6},
            "familiarity": familiarity, "unfamiliar": familiarity < 0.05,
            "projection": rng.normal(size=4).tolist(), "error": "", **changes}


def test_recent_from_request_log_records():
    records = [log_line(0), log_line(1, familiarity=None, unfamiliar=None, projection=None),
               log_line(2, error="not_an_image: ...", label=""), log_line(3, projection=[1.0, 2.0])]
    recent = Recent.from_records(records)
    assert recent.n == 3 and recent.n_errors == 1
    assert np.isnan(recent.familiarity[1]) and np.isnan(recent.unfamiliar[1])
    assert recent.projections.shape == (3, 4)
    assert np.isfinite(recent.projections[0]).all()
    assert np.isnan(recent.projections[1]).all() and np.isnan(recent.projections[2]).all()  # null, wrong length
    assert Recent.from_records([log_line(0, projection=None)]).projections is None


def test_recent_from_classify_frame():
    frame = pd.DataFrame({"label": ["clean", "", "messy"], "clean": [0.9, None, 0.2], "messy": [0.1, None, 0.8],
                          "familiarity": [0.5, None, 0.01], "unfamiliar": [False, None, True],
                          "error": ["", "not_an_image: x", ""]})
    projections = np.array([[1.0, 2.0], [np.nan, np.nan], [3.0, 4.0]])
    recent = Recent.from_frame(frame, projections)
    assert recent.labels == ["clean", "messy"] and recent.n_errors == 1
    assert recent.unfamiliar.tolist() == [0.0, 1.0]
    assert recent.projections.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    old = frame.drop(columns=["familiarity", "unfamiliar"])  # a version without a detector
    plain = Recent.from_frame(old, None)
    assert np.isnan(plain.familiarity).all() and plain.projections is None


def test_select_records_takes_the_newest_model_and_the_last_n():
    records = ([log_line(i, "clean-vs-messy/2") for i in range(5)] + [log_line(i, "") for i in range(5, 7)]
               + [log_line(i, "clean-vs-messy/3") for i in range(7, 20)])
    chosen = select_records(records, last=10)
    assert chosen.model == "clean-vs-messy/3" and len(chosen.records) == 10
    assert chosen.records[-1] is records[-1] and chosen.records[0] is records[10]
    assert (chosen.n_model, chosen.n_other, chosen.n_unknown) == (13, 5, 2)
    older = select_records(records, last=100, model="clean-vs-messy/2")
    assert len(older.records) == 5 and older.n_other == 13
    assert select_records([log_line(0, "")], last=10) is None


def test_figure_renders():
    recent = in_distribution(80, seed=10, shift=1.0, familiarity_scale=0.3)
    ref = reference()
    report = compare(recent, ref)
    buffer = io.BytesIO()
    monitor.figure(report, recent, ref).savefig(buffer, format="png")
    assert buffer.getvalue().startswith(b"\x89PNG")
    plain = Recent(recent.labels, np.full(80, np.nan), np.full(80, np.nan), None)
    empty_ref = Reference(None, None, None)
    monitor.figure(compare(plain, empty_ref), plain, empty_ref).savefig(io.BytesIO(), format="png")


def test_features_check_skips_what_it_cannot_compare():
    training = np.random.default_rng(0).normal(size=(50, 4))
    assert not features_check(None, training).ran
    assert not features_check(np.zeros((30, 4)), None).ran
    assert "dimensions" in features_check(np.zeros((30, 3)), training).reason
    rows = np.random.default_rng(1).normal(size=(30, 4))
    rows[::2] = np.nan  # photos whose lines had no projection are left out
    check = features_check(rows, training)
    assert check.ran and not check.drift
    assert not features_check(np.full((30, 4), np.nan), training).ran


def test_label_mix_against_the_labels_the_model_gave_its_test_split():
    """A model that calls everything clean does so on its test split too: no drift in that alone."""
    biased = label_mix_check({"clean": 60}, TRAINING_COUNTS, tested={"clean": 2, "messy": 0})
    assert biased.ran and not biased.drift and biased.p_value == 1.0
    assert label_mix_check({"clean": 60}, TRAINING_COUNTS).drift  # against the training labels it would be
    same = label_mix_check({"clean": 55, "messy": 45}, TRAINING_COUNTS, tested={"clean": 12, "messy": 12})
    assert same.test.startswith("Fisher's exact") and not same.drift
    moved = label_mix_check({"clean": 10, "messy": 190}, TRAINING_COUNTS, tested={"clean": 30, "messy": 30})
    assert moved.drift and moved.short == "labels 95 % messy vs 50 % on test photos"
    from scipy.stats import fisher_exact

    assert moved.p_value == pytest.approx(fisher_exact([[10, 190], [30, 30]]).pvalue)
    three = {"a": 40, "b": 40, "c": 40}
    large = label_mix_check({"a": 50, "b": 45, "c": 55}, None, tested=three)
    assert large.test.startswith("chi-square test") and not large.drift
    small = label_mix_check({"a": 1, "b": 1, "c": 6}, None, tested={"a": 3, "b": 3, "c": 2}, seed=0)
    assert small.test.startswith("chi-square statistic, permutation")
    assert 0.01 < small.p_value < 0.3  # 6 of 8 c against 2 of 8: suggestive, not conclusive
    assert not label_mix_check({}, None, tested=three).ran


def test_compare_prefers_the_test_splits_labels():
    recent = in_distribution(100, seed=11, messy_share=0.8)
    ref = reference()
    assert compare(recent, ref).check(LABEL_MIX).drift  # 80 % messy against 50 % training labels
    tested = Reference(ref.class_counts, ref.projections, ref.alpha, test_label_counts={"clean": 5, "messy": 19})
    report = compare(recent, tested)
    assert not report.check(LABEL_MIX).drift and report.verdict == NO_DRIFT
    assert report.test_label_counts == {"clean": 5, "messy": 19}


def test_the_bonferroni_threshold_counts_the_checks_that_ran():
    recent = in_distribution(100, seed=12)
    unrecorded = Recent(recent.labels, recent.familiarity, recent.unfamiliar, np.full((100, 8), np.nan))
    report = compare(unrecorded, reference())
    assert not report.check(FEATURES).ran and report.threshold == pytest.approx(0.01 / 2)
    other_dims = Recent(recent.labels, recent.familiarity, recent.unfamiliar, recent.projections[:, :3])
    assert compare(other_dims, reference()).threshold == pytest.approx(0.01 / 2)
