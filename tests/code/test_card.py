"""The model card and the Wilson interval it reports."""

from __future__ import annotations

import pytest

from cleanmessy.card import render_card, wilson_interval


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
    data = {"source": "../photos", "n_images": 192, "classes": {"clean": 96, "messy": 96},
            "split_sizes": {"train": 152, "val": 20, "test": 20}, "manifest_sha256": "ab" * 32}
    card = render_card("clean-vs-messy", data, {"train.arch": "mobilenet_v2", "train.alpha": 0.35}, test)
    assert "# Model card: clean-vs-messy" in card
    assert "`../photos`" in card and "clean: 96" in card and "ab" * 32 in card
    assert "| `train.arch` | `mobilenet_v2` |" in card
    assert "(29/30)" in card and "[0.833, 0.994]" in card
    assert "| clean | 1.000 | 0.933 |" in card
    assert "staged vs lived-in" in card
