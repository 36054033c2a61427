"""plot: splits, history, metrics and predictions -> pipeline/plots/*.png (DVC plots), also logged
to the run in MLflow. Matplotlib PNGs render in `dvc plots show` offline (vega needs a CDN)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cleanmessy import tracking  # noqa: E402
from cleanmessy.errors import UserError  # noqa: E402
from cleanmessy.images import open_rgb  # noqa: E402
from cleanmessy.inputs import read_split  # noqa: E402
from cleanmessy.params import Params, PlotParams  # noqa: E402
from cleanmessy.project import Paths  # noqa: E402

log = logging.getLogger(__name__)
Figure = matplotlib.figure.Figure


def _grid(n: int) -> tuple[int, int]:
    cols = max(1, min(n, 6))
    return max(1, math.ceil(n / cols)), cols


def image_grid(root: Path, rows: pd.DataFrame, titles: list[str], colours: list[str], suptitle: str) -> Figure:
    """Photos with a coloured title each; an empty frame gets a figure that says so."""
    n_rows, n_cols = _grid(len(rows))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.4 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path, title, colour in zip(axes.flat, rows["path"], titles, colours):
        img, _ = open_rgb(root / path)
        ax.imshow(img)
        ax.set_title(title, fontsize=8, color=colour)
    if rows.empty:
        axes[0, 0].text(0.5, 0.5, "none", ha="center", va="center", fontsize=14)
    fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def sample_grid(root: Path, train: pd.DataFrame, n: int, seed: int) -> Figure:
    """`n` training images with their labels, as the seed notebook shows its data."""
    rows = train.sample(n=min(n, len(train)), random_state=seed)
    return image_grid(root, rows, list(rows["label"]), ["black"] * len(rows), "Training samples")


def training_curves(history: pd.DataFrame) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(history["epoch"], history[metric], "o-", label=f"train {metric}")
        ax.plot(history["epoch"], history[f"val_{metric}"], "o-", label=f"val {metric}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    best = int(history["val_loss"].idxmin())
    axes[0].axvline(history["epoch"][best], color="grey", linestyle="--", label="best (kept)")
    fig.tight_layout()
    return fig


def confusion_figure(test_metrics: dict) -> Figure:
    cm = test_metrics["confusion_matrix"]
    names = list(cm)
    matrix = np.array([[cm[a][p] for p in names] for a in names])
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 1.6 * len(names) + 1.5))
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
    fig.tight_layout()
    return fig


def prediction_grid(root: Path, preds: pd.DataFrame, n: int, title: str) -> Figure:
    """Test images titled actual / predicted / confidence; green right, red wrong."""
    rows = preds.head(n)
    conf = [row[f"p_{row['predicted']}"] for _, row in rows.iterrows()]
    titles = [f"{a} → {p}\n{c:.0%}" for a, p, c in zip(rows["label"], rows["predicted"], conf)]
    colours = ["green" if a == p else "red" for a, p in zip(rows["label"], rows["predicted"])]
    return image_grid(root, rows, titles, colours, title)


def make_figures(root: Path, train: pd.DataFrame, history: pd.DataFrame, metrics: dict,
                 preds: pd.DataFrame, p: PlotParams, seed: int) -> dict[str, Figure]:
    """All figures by file name."""
    wrong = preds[preds["label"] != preds["predicted"]]
    # Spread the prediction grid over classes: the first rows of a sorted split are one class.
    mixed = preds.sample(frac=1.0, random_state=seed)
    return {
        "samples.png": sample_grid(root, train, p.grid_images, seed),
        "training_curves.png": training_curves(history),
        "confusion_matrix.png": confusion_figure(metrics["test"]),
        "predictions.png": prediction_grid(root, mixed, p.grid_images, "Test predictions"),
        "misclassified.png": prediction_grid(root, wrong, p.grid_images,
                                             f"Misclassified test images ({len(wrong)} of {len(preds)})"),
    }


def main(paths: Paths, params: Params) -> None:
    try:
        history = pd.read_csv(paths.history)
        metrics = json.loads(paths.metrics.read_text())
        preds = pd.read_csv(paths.predictions, keep_default_na=False)
    except FileNotFoundError as exc:
        raise UserError(f"{exc.filename} not found: run `cleanmessy train` and `evaluate` first") from None
    train = read_split(paths.split_csv("train"))
    figures = make_figures(paths.root, train, history, metrics, preds, params.plot, params.base.seed)
    paths.plots.mkdir(parents=True, exist_ok=True)
    for name, fig in figures.items():
        fig.savefig(paths.plots / name, dpi=params.plot.dpi)
        plt.close(fig)
    run = tracking.RunInfo.load(paths.run_info)
    tracking.setup(paths)
    with mlflow.start_run(run_id=run.run_id):
        mlflow.log_artifacts(str(paths.plots), artifact_path="plots")
    log.info("plot: %d figures in %s, logged to run %s", len(figures), paths.plots, run.run_id)
