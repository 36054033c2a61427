"""evaluate's pure parts: metrics from probabilities, their flat MLflow names, the predictions table.
The expected numbers are worked out by hand, not by calling the same sklearn functions."""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cleanmessy.stages.evaluate import compute_metrics, mlflow_metrics, prediction_frame

CLASSES = ["clean", "messy"]

# 5 test images: 3 clean, 2 messy. Predictions: clean, clean, messy | messy, messy.
HAND_Y = np.array([0, 0, 0, 1, 1])
HAND_P = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.45, 0.55]])


def test_perfect_predictions():
    """One-hot correct probabilities: accuracy 1, loss ~0, AUC 1, everything on the diagonal."""
    y = np.array([0, 1, 1, 0])
    probs = np.eye(2)[y]
    m = compute_metrics(y, probs, CLASSES)
    assert m["n"] == 4
    assert m["accuracy"] == 1.0
    assert m["loss"] == pytest.approx(0.0, abs=1e-6)
    assert m["roc_auc"] == 1.0
    assert m["macro_f1"] == 1.0
    assert m["confusion_matrix"] == {"clean": {"clean": 2, "messy": 0}, "messy": {"clean": 0, "messy": 2}}
    for c in CLASSES:
        assert m["per_class"][c] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}


def test_hand_computed_binary_case():
    """Loss, accuracy, per-class precision/recall/F1, macro F1, AUC and confusion match hand sums."""
    m = compute_metrics(HAND_Y, HAND_P, CLASSES)
    assert m["n"] == 5
    # mean of -log p[true class]
    expected_loss = -(math.log(0.9) + math.log(0.6) + math.log(0.3) + math.log(0.8) + math.log(0.55)) / 5
    assert m["loss"] == pytest.approx(expected_loss)
    assert m["accuracy"] == pytest.approx(4 / 5)
    # clean: TP 2, FP 0, FN 1 -> P 1, R 2/3, F1 0.8; messy: TP 2, FP 1, FN 0 -> P 2/3, R 1, F1 0.8
    clean, messy = m["per_class"]["clean"], m["per_class"]["messy"]
    assert clean["precision"] == pytest.approx(1.0)
    assert clean["recall"] == pytest.approx(2 / 3)
    assert clean["f1"] == pytest.approx(0.8)
    assert clean["support"] == 3
    assert messy["precision"] == pytest.approx(2 / 3)
    assert messy["recall"] == pytest.approx(1.0)
    assert messy["f1"] == pytest.approx(0.8)
    assert messy["support"] == 2
    assert m["macro_f1"] == pytest.approx(0.8)
    # p(messy): messy {0.8, 0.55} vs clean {0.1, 0.4, 0.7}: 0.8 beats 3, 0.55 beats 2 -> 5 of 6 pairs
    assert m["roc_auc"] == pytest.approx(5 / 6)
    # rows actual, columns predicted
    assert m["confusion_matrix"] == {"clean": {"clean": 2, "messy": 1}, "messy": {"clean": 0, "messy": 2}}


def test_result_is_plain_json():
    """Every value is a plain Python type, so metrics.json serialises without a custom encoder."""
    m = compute_metrics(HAND_Y, HAND_P, CLASSES)
    assert json.loads(json.dumps(m)) == m
    assert type(m["n"]) is int
    assert type(m["confusion_matrix"]["clean"]["messy"]) is int
    assert type(m["per_class"]["messy"]["support"]) is int


def test_loss_clips_zero_probability():
    """A zero probability for the true class costs -log(1e-7), not infinity, as Keras clips it."""
    y = np.array([0, 1])
    probs = np.array([[0.0, 1.0], [0.0, 1.0]])
    m = compute_metrics(y, probs, CLASSES)
    assert math.isfinite(m["loss"])
    assert m["loss"] == pytest.approx(-math.log(1e-7) / 2)
    assert m["accuracy"] == 0.5


def test_roc_auc_none_with_one_class_present():
    """AUC is undefined when the test labels hold a single class: None, not NaN or an error."""
    y = np.array([1, 1, 1])
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    m = compute_metrics(y, probs, CLASSES)
    assert m["roc_auc"] is None
    assert m["accuracy"] == pytest.approx(2 / 3)
    # the absent class still has its row and column, and zero support
    assert m["confusion_matrix"] == {"clean": {"clean": 0, "messy": 0}, "messy": {"clean": 1, "messy": 2}}
    assert m["per_class"]["clean"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_three_classes_use_one_vs_rest_auc():
    """With 3 classes AUC is the macro mean of one-vs-rest AUCs and the confusion matrix is 3x3."""
    classes = ["clean", "messy", "tidy"]
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([
        [0.7, 0.2, 0.1],
        [0.3, 0.5, 0.2],  # clean predicted messy
        [0.1, 0.8, 0.1],
        [0.2, 0.6, 0.2],
        [0.1, 0.1, 0.8],
        [0.5, 0.1, 0.4],  # tidy predicted clean
    ])
    m = compute_metrics(y, probs, classes)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == {
        "clean": {"clean": 1, "messy": 1, "tidy": 0},
        "messy": {"clean": 0, "messy": 2, "tidy": 0},
        "tidy": {"clean": 1, "messy": 0, "tidy": 1},
    }
    # one-vs-rest, worked out per class as binary problems:
    # clean vs rest: pos {.7,.3}, neg {.1,.2,.1,.5}: .7 beats 4, .3 beats 3 -> 7/8
    # messy vs rest: pos {.8,.6}, neg {.2,.5,.1,.1}: both beat all 4 -> 1
    # tidy vs rest:  pos {.8,.4}, neg {.1,.2,.1,.2}: both beat all 4 -> 1
    assert m["roc_auc"] == pytest.approx((7 / 8 + 1 + 1) / 3)
    ovr = [roc_auc_score(y == k, probs[:, k]) for k in range(3)]
    assert m["roc_auc"] == pytest.approx(np.mean(ovr))
    assert set(m["per_class"]) == set(classes)
    assert m["per_class"]["tidy"]["recall"] == pytest.approx(0.5)


def test_three_classes_with_one_absent_gives_no_nan_auc():
    """A class missing from the test labels makes AUC undefined: None, never NaN."""
    y = np.array([0, 1, 0, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's UndefinedMetricWarning for the absent class
        m = compute_metrics(y, probs, ["clean", "messy", "tidy"])
    assert m["roc_auc"] is None or math.isfinite(m["roc_auc"])
    assert "NaN" not in json.dumps(m)


def test_class_order_follows_class_names():
    """Per-class and confusion keys follow class_names; index i is class_names[i]."""
    m = compute_metrics(HAND_Y, HAND_P, ["zeta", "alpha"])
    assert list(m["per_class"]) == ["zeta", "alpha"]
    assert list(m["confusion_matrix"]) == ["zeta", "alpha"]
    assert m["per_class"]["zeta"]["support"] == 3
    assert m["confusion_matrix"]["zeta"]["alpha"] == 1


# ---------------------------------------------------------------- MLflow names


def test_mlflow_metrics_flat_names():
    """The MLflow names are flat `test_*`, one per scalar and per class x (precision, recall, f1)."""
    m = compute_metrics(HAND_Y, HAND_P, CLASSES)
    flat = mlflow_metrics(m)
    expected = {"test_loss", "test_accuracy", "test_accuracy_ci95_low", "test_accuracy_ci95_high",
                "test_macro_f1", "test_roc_auc"} | {
        f"test_{name}_{c}" for c in CLASSES for name in ("precision", "recall", "f1")}
    assert set(flat) == expected
    assert flat["test_accuracy"] == pytest.approx(0.8)
    assert flat["test_loss"] == pytest.approx(m["loss"])
    assert flat["test_roc_auc"] == pytest.approx(5 / 6)
    assert flat["test_precision_clean"] == pytest.approx(1.0)
    assert flat["test_recall_clean"] == pytest.approx(2 / 3)
    assert flat["test_f1_messy"] == pytest.approx(0.8)
    assert all(isinstance(v, float) for v in flat.values())
    assert not any("support" in k or "confusion" in k or k == "test_n" for k in flat)


def test_mlflow_metrics_omit_missing_auc():
    """With AUC undefined (None) there is no test_roc_auc, and nothing else is dropped."""
    m = compute_metrics(np.array([0, 0]), np.array([[0.9, 0.1], [0.2, 0.8]]), CLASSES)
    assert m["roc_auc"] is None
    flat = mlflow_metrics(m)
    assert "test_roc_auc" not in flat
    assert len(flat) == 5 + 3 * len(CLASSES)  # loss, accuracy + its interval, macro F1
    assert flat["test_accuracy"] == 0.5


# ---------------------------------------------------------------- predictions table


def test_prediction_frame_columns_and_values():
    """Columns path, label, predicted, p_<class>; predicted is the argmax class name."""
    frame = pd.DataFrame({
        "path": [f"data/images/x/{i}.png" for i in range(5)],
        "label": ["clean", "clean", "clean", "messy", "messy"],
        "sha256": ["s"] * 5,  # extra columns are not carried over
    })
    out = prediction_frame(frame, HAND_P, CLASSES)
    assert list(out.columns) == ["path", "label", "predicted", "p_clean", "p_messy"]
    assert list(out["path"]) == list(frame["path"])
    assert list(out["predicted"]) == ["clean", "clean", "messy", "messy", "messy"]
    assert list(out["p_messy"]) == pytest.approx([0.1, 0.4, 0.7, 0.8, 0.55])
    assert list(out["p_clean"]) == pytest.approx([0.9, 0.6, 0.3, 0.2, 0.45])
    assert "sha256" in frame.columns  # the input frame is left alone


def test_prediction_frame_round_trips_through_csv(tmp_path):
    """Written and read back as the plot stage reads it, the table is unchanged."""
    frame = pd.DataFrame({"path": ["a.png", "b.png"], "label": ["messy", "clean"]})
    out = prediction_frame(frame, np.array([[0.25, 0.75], [0.5, 0.5]]), CLASSES)
    out.to_csv(tmp_path / "p.csv", index=False)
    back = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(back, out)
    assert list(back["predicted"]) == ["messy", "clean"]  # a tie goes to the first class
