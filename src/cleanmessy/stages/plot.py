"""plot: splits, history, evaluation and predictions -> pipeline/plots/*.png (DVC plots), also logged
to the run in MLflow. Matplotlib PNGs render in `dvc plots show` offline (vega needs a CDN)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

# Figures are built with matplotlib's object API, not pyplot: no GUI backend to choose, no global
# figure list to close, and `Figure.savefig` renders PNGs with Agg on any machine.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cleanmessy import tracking
from cleanmessy.errors import UserError
from cleanmessy.images import open_rgb
from cleanmessy.inputs import read_split
from cleanmessy.params import Params, PlotParams
from cleanmessy.project import Paths

log = logging.getLogger(__name__)

# `dvc plots show` lays figures out in a 1280-px page: 12 in is 1200 px at the default plot.dpi 100.
MAX_WIDTH_IN = 12.0
GRID_COLS = 6
CELL_IN = MAX_WIDTH_IN / GRID_COLS  # width per image column
ROW_IN = 2.5  # an image plus its two-line caption, so captions clear the row above
TITLE_IN = 0.8  # suptitle and the caption key under the grid
MIN_GRID_WIDTH_IN = 6.0  # room for the full title above a grid of one or two images
RIGHT, WRONG = "✓", "✗"  # a cue besides green/red for colour-blind readers (DejaVu Sans has both)
# The columns of pipeline/history.csv (training.HISTORY_COLUMNS) that the curves draw; checked before
# drawing, so an old history.csv asks for a retrain. Not imported: plot loads no TensorFlow.
PLOTTED_HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")


def _grid(n: int) -> tuple[int, int]:
    cols = max(1, min(n, GRID_COLS))
    return max(1, math.ceil(n / cols)), cols


def _showing(shown: int, total: int) -> str:
    """Title suffix when a grid shows fewer images than there are, so the count is never misread."""
    return f" (showing {shown})" if shown < total else ""


def message_figure(title: str, text: str) -> Figure:
    """A short, wide figure with a title and a line of text, for a grid with nothing to show."""
    fig = Figure(figsize=(MIN_GRID_WIDTH_IN, 2.0), layout="constrained")
    fig.suptitle(title)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="dimgrey")
    return fig


def image_grid(root: Path, rows: pd.DataFrame, titles: list[str], colours: list[str], suptitle: str,
               note: str = "") -> Figure:
    """Photos with a coloured caption each, `note` under the grid; an empty frame gets a figure
    that says "none"."""
    if rows.empty:
        return message_figure(suptitle, "none")
    n_rows, n_cols = _grid(len(rows))
    size = (max(MIN_GRID_WIDTH_IN, CELL_IN * n_cols), TITLE_IN + ROW_IN * n_rows)
    # Constrained layout reserves each caption's height, which tight_layout did not between rows.
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path, title, colour in zip(axes.flat, rows["path"], titles, colours):
        img, _ = open_rgb(root / path)
        ax.imshow(img)
        ax.set_title(title, fontsize=8, color=colour)
    fig.suptitle(suptitle)
    if note:
        fig.supxlabel(note, fontsize=9, color="dimgrey")
    return fig


def sample_grid(root: Path, train: pd.DataFrame, n: int, seed: int) -> Figure:
    """`n` training images with their labels, as the seed notebook shows its data."""
    rows = train.sample(n=min(n, len(train)), random_state=seed)
    title = f"Training samples: {len(train)} images{_showing(len(rows), len(train))}"
    return image_grid(root, rows, list(rows["label"]), ["black"] * len(rows), title)


def training_curves(history: pd.DataFrame) -> Figure:
    """Train and val loss and accuracy per epoch; the kept epoch (lowest val loss) marked."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    best = history["epoch"][history["val_loss"].idxmin()]
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(history["epoch"], history[f"train_{metric}"], "o-", label=f"train {metric}")
        ax.plot(history["epoch"], history[f"val_{metric}"], "o-", label=f"val {metric}")
        ax.axvline(best, color="grey", linestyle="--", label="best epoch (kept)")
        # Epochs are whole numbers; min_n_ticks=1 keeps a 1-epoch run from falling back to 0.95, 0.96...
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    return fig


def confusion_figure(test_metrics: dict) -> Figure:
    """Counts of actual (rows) by predicted (columns) class, titled with accuracy and n."""
    cm = test_metrics["confusion_matrix"]
    names = list(cm)
    matrix = np.array([[cm[a][p] for p in names] for a in names])
    width, height = 1.6 * len(names) + 2, 1.6 * len(names) + 1.5
    scale = min(1.0, MAX_WIDTH_IN / width)  # many classes: shrink, keeping the cells square
    fig = Figure(figsize=(width * scale, height * scale), layout="constrained")
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black", fontsize=14)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"Test accuracy {test_metrics['accuracy']:.3f} (n={test_metrics['n']})")
    return fig


def prediction_grid(root: Path, preds: pd.DataFrame, n: int, title: str) -> Figure:
    """Test images captioned ✓/✗ actual → predicted and confidence; green right, red wrong."""
    rows = preds.head(n)
    conf = [row[f"p_{row['predicted']}"] for _, row in rows.iterrows()]
    right = [a == p for a, p in zip(rows["label"], rows["predicted"])]
    titles = [f"{RIGHT if ok else WRONG} {a} → {p}\n{c:.0%}"
              for ok, a, p, c in zip(right, rows["label"], rows["predicted"], conf)]
    colours = ["green" if ok else "red" for ok in right]
    note = f"{RIGHT} right   {WRONG} wrong   caption: actual → predicted, confidence in the prediction"
    return image_grid(root, rows, titles, colours, title, note)


def make_figures(root: Path, train: pd.DataFrame, history: pd.DataFrame, evaluation: dict,
                 preds: pd.DataFrame, p: PlotParams, seed: int) -> dict[str, Figure]:
    """All figures by file name; `evaluation` as evaluation.json holds it ({"test": {...}})."""
    # Spread the grids over classes: the first rows of a sorted split are one class.
    mixed = preds.sample(frac=1.0, random_state=seed)
    wrong = mixed[mixed["label"] != mixed["predicted"]]
    total, n_wrong, n = len(preds), len(wrong), p.grid_images
    if wrong.empty:
        misclassified = message_figure(f"No misclassified test images (0 of {total})",
                                       f"all {total} test predictions are right")
    else:
        misclassified = prediction_grid(root, wrong, n, f"Misclassified test images: {n_wrong} of {total}"
                                        f"{_showing(min(n, n_wrong), n_wrong)}")
    return {
        "samples.png": sample_grid(root, train, n, seed),
        "training_curves.png": training_curves(history),
        "confusion_matrix.png": confusion_figure(evaluation["test"]),
        "predictions.png": prediction_grid(root, mixed, n,
                                           f"Test predictions: {total} images{_showing(min(n, total), total)}"),
        "misclassified.png": misclassified,
    }


def main(paths: Paths, params: Params) -> None:
    try:
        history = pd.read_csv(paths.history)
        evaluation = json.loads(paths.evaluation.read_text())
        preds = pd.read_csv(paths.predictions, keep_default_na=False)
    except FileNotFoundError as exc:
        raise UserError(f"{exc.filename} not found: run `cleanmessy train` and `evaluate` first") from None
    if missing := [c for c in PLOTTED_HISTORY_COLUMNS if c not in history.columns]:
        raise UserError(f"{paths.history} has no column(s) {missing}: rerun `cleanmessy train`")
    train = read_split(paths.split_csv("train"))
    figures = make_figures(paths.root, train, history, evaluation, preds, params.plot, params.base.seed)
    paths.plots.mkdir(parents=True, exist_ok=True)
    files = []
    for name, fig in figures.items():
        files.append(paths.plots / name)
        fig.savefig(files[-1], dpi=params.plot.dpi)
    with tracking.resume_training_run(paths) as run_id:
        for file in files:  # at the artifact root, where MLflow's run-compare view shows images side by side
            mlflow.log_artifact(str(file))
    paths.figures_logged.write_text(json.dumps({"figures": sorted(figures)}) + "\n")  # see Paths.registered
    log.info("plot: %d figures in %s, logged to run %s", len(figures), paths.plots, run_id)
