"""plot: the five report figures from splits, history, metrics and predictions, with real images
and real matplotlib (Agg). No TensorFlow."""

import subprocess
import sys

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cleanmessy.params import PlotParams
from cleanmessy.stages.plot import confusion_figure, make_figures, sample_grid, training_curves

NAMES = ["samples.png", "training_curves.png", "confusion_matrix.png", "predictions.png", "misclassified.png"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def project(tmp_path):
    """8 small PNGs, 4 per class, under data/images/<label>/ as ingest lays them out."""
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for label in ("clean", "messy"):
        (tmp_path / "data" / "images" / label).mkdir(parents=True)
        for i in range(4):
            rel = f"data/images/{label}/{i}.png"
            pixels = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / rel)
            paths.append(rel)
            labels.append(label)
    return tmp_path, pd.DataFrame({"path": paths, "label": labels})


def history() -> pd.DataFrame:
    """As train writes history.csv: epochs numbered from 1."""
    return pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.9, 0.6, 0.5], "accuracy": [0.5, 0.7, 0.8],
                         "val_loss": [0.8, 0.55, 0.6], "val_accuracy": [0.5, 0.75, 0.7]})


def metrics(accuracy: float = 0.75, wrong: int = 2) -> dict:
    """Shaped like compute_metrics' output, as metrics.json holds it."""
    return {"test": {"n": 8, "loss": 0.5, "accuracy": accuracy, "roc_auc": 0.8, "macro_f1": accuracy,
                     "per_class": {},
                     "confusion_matrix": {"clean": {"clean": 4 - wrong // 2, "messy": wrong // 2},
                                          "messy": {"clean": wrong - wrong // 2, "messy": 4 - (wrong - wrong // 2)}}}}


def predictions(train: pd.DataFrame, wrong: set[int]) -> pd.DataFrame:
    """Predictions for the 8 images; rows in `wrong` get the other class."""
    preds = train[["path", "label"]].copy()
    other = {"clean": "messy", "messy": "clean"}
    preds["predicted"] = [other[lab] if i in wrong else lab for i, lab in enumerate(preds["label"])]
    p_messy = np.where(preds["predicted"] == "messy", 0.8, 0.3)
    preds["p_clean"] = 1 - p_messy
    preds["p_messy"] = p_messy
    return preds


def assert_saves_png(fig, path) -> None:
    fig.savefig(path, dpi=50)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    with Image.open(path) as img:
        assert img.width > 50 and img.height > 50


def test_make_figures_returns_the_five_pngs(project, tmp_path):
    """make_figures gives the five named figures, each a Figure that saves to a valid PNG."""
    root, train = project
    figures = make_figures(root, train, history(), metrics(), predictions(train, {1, 6}), PlotParams(), seed=0)
    assert list(figures) == NAMES
    out = tmp_path / "plots"
    out.mkdir()
    for name, fig in figures.items():
        assert isinstance(fig, matplotlib.figure.Figure)
        assert_saves_png(fig, out / name)


def test_misclassified_figure_shows_only_wrong_rows(project):
    """The misclassified grid has one image per wrong prediction, red titles, and a count."""
    root, train = project
    preds = predictions(train, {1, 6})
    fig = make_figures(root, train, history(), metrics(), preds, PlotParams(), seed=0)["misclassified.png"]
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 2
    assert all(ax.title.get_color() == "red" for ax in shown)
    assert {ax.title.get_text().split("\n")[0] for ax in shown} == {"clean → messy", "messy → clean"}
    assert "(2 of 8)" in fig.get_suptitle()


def test_predictions_figure_colours_and_confidence(project):
    """The prediction grid shows every row (8 < grid_images), green when right, with confidence."""
    root, train = project
    preds = predictions(train, {1, 6})
    fig = make_figures(root, train, history(), metrics(), preds, PlotParams(), seed=0)["predictions.png"]
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 8
    colours = [ax.title.get_color() for ax in shown]
    assert colours.count("red") == 2 and colours.count("green") == 6
    titles = [ax.title.get_text() for ax in shown]
    assert all(t.endswith(("80%", "70%")) for t in titles)


def test_no_misclassified_rows_still_works(project, tmp_path):
    """With every prediction right the misclassified figure says "none" and still saves."""
    root, train = project
    preds = predictions(train, set())
    figures = make_figures(root, train, history(), metrics(1.0, wrong=0), preds, PlotParams(), seed=0)
    fig = figures["misclassified.png"]
    assert not any(ax.images for ax in fig.axes)
    assert "none" in [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "(0 of 8)" in fig.get_suptitle()
    assert_saves_png(fig, tmp_path / "misclassified.png")


def test_sample_grid_larger_than_train_set(project, tmp_path):
    """Asking for more sample images than the train split has shows them all, once each."""
    root, train = project
    fig = sample_grid(root, train, n=20, seed=0)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == len(train)
    assert sorted(ax.title.get_text() for ax in shown) == sorted(train["label"])
    assert_saves_png(fig, tmp_path / "samples.png")
    figures = make_figures(root, train, history(), metrics(), predictions(train, {0}),
                           PlotParams(grid_images=50), seed=0)
    assert len([ax for ax in figures["samples.png"].axes if ax.images]) == 8


def test_sample_grid_respects_grid_images_and_seed(project):
    """grid_images limits the sample; the same seed picks the same images."""
    root, train = project

    def shown_images(seed):
        fig = sample_grid(root, train, n=3, seed=seed)
        return [ax.images[0].get_array().tobytes() for ax in fig.axes if ax.images]

    first = shown_images(0)
    assert len(first) == 3
    assert shown_images(0) == first


def test_training_curves_mark_best_epoch():
    """Loss and accuracy panels with train and val lines; the kept epoch (min val_loss) is marked."""
    fig = training_curves(history())
    loss_ax, acc_ax = fig.axes
    assert loss_ax.get_title() == "loss" and acc_ax.get_title() == "accuracy"
    assert [line.get_label() for line in acc_ax.lines] == ["train accuracy", "val accuracy"]
    np.testing.assert_array_equal(loss_ax.lines[1].get_ydata(), [0.8, 0.55, 0.6])
    marker = loss_ax.lines[-1]  # axvline at epoch 2, where val_loss is lowest
    assert list(marker.get_xdata()) == [2, 2]


def test_confusion_figure_numbers_and_title():
    """Cells show the confusion counts (actual rows, predicted columns); the title has accuracy and n."""
    test = metrics()["test"]
    test["confusion_matrix"] = {"clean": {"clean": 3, "messy": 1}, "messy": {"clean": 0, "messy": 4}}
    test["accuracy"] = 0.875
    fig = confusion_figure(test)
    (ax,) = fig.axes
    np.testing.assert_array_equal(ax.images[0].get_array(), [[3, 1], [0, 4]])
    assert sorted(t.get_text() for t in ax.texts) == ["0", "1", "3", "4"]
    assert ax.get_title() == "Test accuracy 0.875 (n=8)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["clean", "messy"]


def test_plot_stage_does_not_import_tensorflow():
    """Importing the plot stage (in a fresh interpreter) loads neither TensorFlow nor Keras."""
    code = ("import sys, cleanmessy.stages.plot; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
