"""plot: the five report figures from splits, history, evaluation and predictions, with real images
and real matplotlib (Agg). No TensorFlow; MLflow is faked in the one test of `main`."""

import contextlib
import json
import subprocess
import sys
import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from cleanmessy.errors import UserError
from cleanmessy.params import Params, PlotParams
from cleanmessy.project import Paths
from cleanmessy.stages import plot
from cleanmessy.stages.plot import confusion_figure, make_figures, sample_grid, training_curves

NAMES = ["samples.png", "training_curves.png", "confusion_matrix.png", "predictions.png", "misclassified.png"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DPI = PlotParams().dpi
MAX_WIDTH_PX = 1200  # `dvc plots show` lays figures out in a 1280-px page
SIZES = [(12, 16), (16, 16), (20, 10), (10, 20)]  # (height, width): square and non-square photos


@pytest.fixture
def project(tmp_path):
    """8 small PNGs, 4 per class, under data/images/<label>/ as ingest lays them out."""
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for label in ("clean", "messy"):
        (tmp_path / "data" / "images" / label).mkdir(parents=True)
        for i, (h, w) in enumerate(SIZES):
            rel = f"data/images/{label}/{i}.png"
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / rel)
            paths.append(rel)
            labels.append(label)
    return tmp_path, pd.DataFrame({"path": paths, "label": labels})


def history(epochs: int = 3) -> pd.DataFrame:
    """As train writes history.csv: epochs numbered from 1, a phase, train_/val_ metrics."""
    if epochs == 3:
        return pd.DataFrame({"epoch": [1, 2, 3], "phase": "train", "train_loss": [0.9, 0.6, 0.5],
                             "train_accuracy": [0.5, 0.7, 0.8], "val_loss": [0.8, 0.55, 0.6],
                             "val_accuracy": [0.5, 0.75, 0.7]})
    e = np.arange(1, epochs + 1)
    return pd.DataFrame({"epoch": e, "phase": "train", "train_loss": 1 / e, "train_accuracy": 1 - 0.5 / e,
                         "val_loss": 1 / e + 0.01 * e, "val_accuracy": 1 - 0.6 / e})


def evaluation(accuracy: float = 0.75, wrong: int = 2) -> dict:
    """Shaped like compute_metrics' output, as evaluation.json holds it."""
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


def figures(project, wrong: set[int], p: PlotParams = PlotParams()) -> dict:
    root, train = project
    return make_figures(root, train, history(), evaluation(wrong=len(wrong)), predictions(train, wrong), p, seed=0)


def shown(fig) -> list:
    """The axes that show a photo."""
    return [ax for ax in fig.axes if ax.images]


def saved_size(fig, path) -> tuple[int, int]:
    """Save as the stage does (default dpi) with warnings as errors (a missing glyph warns); (w, h) px."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.savefig(path, dpi=DPI)
    assert path.read_bytes().startswith(PNG_MAGIC)
    with Image.open(path) as img:
        return img.size


def assert_fits(fig) -> None:
    """At most 1200 px wide at the default dpi; every title and text inside the figure; no caption
    overlapping another caption or another cell's photo."""
    assert fig.get_figwidth() * DPI <= MAX_WIDTH_PX
    canvas = FigureCanvasAgg(fig)  # the renderer savefig uses for PNGs
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for t in fig.texts if t.get_text()]
    for ax in fig.axes:
        texts += [t for t in (ax.title, *ax.texts) if t.get_text()]
    for text in texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= -1 and box.y0 >= -1, f"{text.get_text()!r} cut off"
        assert box.x1 <= fig.bbox.width + 1 and box.y1 <= fig.bbox.height + 1, f"{text.get_text()!r} cut off"
    cells = shown(fig)
    for ax in cells:
        caption = ax.title.get_window_extent(renderer)
        for other in cells:
            if other is not ax:
                assert not caption.overlaps(other.images[0].get_window_extent(renderer)), ax.title.get_text()
                assert not caption.overlaps(other.title.get_window_extent(renderer)), ax.title.get_text()


def test_make_figures_returns_the_five_pngs(project, tmp_path):
    """make_figures gives the five named figures, each a Figure that saves to a valid PNG at most
    1200 px wide, with nothing cut off or overlapping."""
    for wrong in ({1, 6}, set(), {0, 1, 2, 3, 4, 5, 6, 7}):
        figs = figures(project, wrong)
        assert list(figs) == NAMES
        for name, fig in figs.items():
            assert isinstance(fig, matplotlib.figure.Figure)
            width, height = saved_size(fig, tmp_path / name)
            assert 50 < width <= MAX_WIDTH_PX and height > 50
            assert_fits(fig)


def test_six_column_grid_is_1200_px_and_rows_clear_each_other(project, tmp_path):
    """A full grid (6 columns, 2 rows) is exactly 1200 px wide; second-row captions stay below the
    first row's photos, for square and non-square photos."""
    fig = figures(project, {1, 6})["predictions.png"]
    assert len(shown(fig)) == 8
    width, height = saved_size(fig, tmp_path / "predictions.png")
    assert width == MAX_WIDTH_PX and height >= 2 * 200
    assert_fits(fig)
    FigureCanvasAgg(fig).draw()
    first_row_bottom = min(ax.images[0].get_window_extent().y0 for ax in shown(fig)[:6])
    assert all(ax.title.get_window_extent().y1 < first_row_bottom for ax in shown(fig)[6:])


def test_misclassified_figure_shows_only_wrong_rows(project):
    """The misclassified grid has one image per wrong prediction, red ✗ captions, and a count."""
    fig = figures(project, {1, 6})["misclassified.png"]
    cells = shown(fig)
    assert len(cells) == 2
    assert all(ax.title.get_color() == "red" for ax in cells)
    assert {ax.title.get_text().split("\n")[0] for ax in cells} == {"✗ clean → messy", "✗ messy → clean"}
    assert fig.get_suptitle() == "Misclassified test images: 2 of 8"


def test_titles_say_when_a_grid_shows_fewer_than_all(project):
    """With more images than plot.grid_images, each grid's title says how many it shows."""
    figs = figures(project, {0, 1, 2}, PlotParams(grid_images=2))
    assert figs["misclassified.png"].get_suptitle() == "Misclassified test images: 3 of 8 (showing 2)"
    assert figs["predictions.png"].get_suptitle() == "Test predictions: 8 images (showing 2)"
    assert figs["samples.png"].get_suptitle() == "Training samples: 8 images (showing 2)"
    assert all(len(shown(figs[name])) == 2 for name in ("misclassified.png", "predictions.png", "samples.png"))
    figs = figures(project, {0, 1, 2}, PlotParams(grid_images=8))
    assert figs["predictions.png"].get_suptitle() == "Test predictions: 8 images"
    assert figs["samples.png"].get_suptitle() == "Training samples: 8 images"


def test_predictions_figure_marks_right_and_wrong_without_colour(project, tmp_path):
    """Each caption starts with ✓ (green) when right or ✗ (red) when wrong, and ends with the
    confidence; a key under the grid explains them; the glyphs render (no missing-glyph warning)."""
    fig = figures(project, {1, 6})["predictions.png"]
    captions = [(ax.title.get_text(), ax.title.get_color()) for ax in shown(fig)]
    assert len(captions) == 8
    assert sorted(text[0] + colour for text, colour in captions) == ["✓green"] * 6 + ["✗red"] * 2
    for text, _ in captions:
        mark, actual, arrow, predicted = text.split("\n")[0].split(" ")
        assert arrow == "→" and mark == ("✓" if actual == predicted else "✗")
    assert all(text.endswith(("80%", "70%")) for text, _ in captions)
    assert "✓ right" in fig.get_supxlabel() and "✗ wrong" in fig.get_supxlabel()
    saved_size(fig, tmp_path / "predictions.png")


def test_no_misclassified_rows_gets_a_readable_figure(project, tmp_path):
    """With every prediction right the misclassified figure is 600 x 200 px, its full title inside."""
    root, train = project
    figs = make_figures(root, train, history(), evaluation(1.0, wrong=0), predictions(train, set()),
                        PlotParams(), seed=0)
    fig = figs["misclassified.png"]
    assert not shown(fig)
    assert fig.get_suptitle() == "No misclassified test images (0 of 8)"
    assert "all 8 test predictions are right" in [t.get_text() for ax in fig.axes for t in ax.texts]
    assert saved_size(fig, tmp_path / "misclassified.png") == (600, 200)
    assert_fits(fig)


def test_single_image_grid_keeps_its_title(project, tmp_path):
    """One wrong prediction: a grid of one photo still has room for the whole title."""
    fig = figures(project, {3})["misclassified.png"]
    assert len(shown(fig)) == 1
    assert fig.get_suptitle() == "Misclassified test images: 1 of 8"
    assert saved_size(fig, tmp_path / "misclassified.png")[0] == 600
    assert_fits(fig)


def test_sample_grid_larger_than_train_set(project, tmp_path):
    """Asking for more sample images than the train split has shows them all, once each."""
    root, train = project
    fig = sample_grid(root, train, n=20, seed=0)
    cells = shown(fig)
    assert len(cells) == len(train)
    assert sorted(ax.title.get_text() for ax in cells) == sorted(train["label"])
    assert saved_size(fig, tmp_path / "samples.png")[0] == MAX_WIDTH_PX
    figs = figures(project, {0}, PlotParams(grid_images=50))
    assert len(shown(figs["samples.png"])) == 8


def test_sample_grid_respects_grid_images_and_seed(project):
    """grid_images limits the sample; the same seed picks the same images."""
    root, train = project

    def shown_images(seed):
        fig = sample_grid(root, train, n=3, seed=seed)
        return [ax.images[0].get_array().tobytes() for ax in shown(fig)]

    first = shown_images(0)
    assert len(first) == 3
    assert shown_images(0) == first


def test_training_curves_mark_best_epoch(tmp_path):
    """Loss and accuracy panels with train_ and val_ lines; the kept epoch (min val_loss) is marked
    on both, in the legend too."""
    fig = training_curves(history())
    loss_ax, acc_ax = fig.axes
    assert loss_ax.get_title() == "loss" and acc_ax.get_title() == "accuracy"
    assert [line.get_label() for line in acc_ax.lines] == ["train accuracy", "val accuracy", "best epoch (kept)"]
    np.testing.assert_array_equal(loss_ax.lines[0].get_ydata(), [0.9, 0.6, 0.5])
    np.testing.assert_array_equal(loss_ax.lines[1].get_ydata(), [0.8, 0.55, 0.6])
    np.testing.assert_array_equal(acc_ax.lines[0].get_ydata(), [0.5, 0.7, 0.8])
    for ax in (loss_ax, acc_ax):
        marker = ax.lines[-1]  # axvline at epoch 2, where val_loss is lowest
        assert list(marker.get_xdata()) == [2, 2]
        assert "best epoch (kept)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert saved_size(fig, tmp_path / "curves.png") == (1000, 400)


@pytest.mark.parametrize("epochs, expected", [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (40, None)])
def test_training_curves_tick_whole_epochs(epochs, expected):
    """Epoch ticks are whole numbers, also for a 1-epoch run (no 0.95, 0.96, ...)."""
    fig = training_curves(history(epochs))
    FigureCanvasAgg(fig).draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks)
        if expected:
            assert ticks == expected
        else:
            assert ticks[-1] >= 35
    assert_fits(fig)


def test_confusion_figure_numbers_and_title():
    """Cells show the confusion counts (actual rows, predicted columns); the title has accuracy and n."""
    test = evaluation()["test"]
    test["confusion_matrix"] = {"clean": {"clean": 3, "messy": 1}, "messy": {"clean": 0, "messy": 4}}
    test["accuracy"] = 0.875
    fig = confusion_figure(test)
    (ax,) = fig.axes
    np.testing.assert_array_equal(ax.images[0].get_array(), [[3, 1], [0, 4]])
    assert sorted(t.get_text() for t in ax.texts) == ["0", "1", "3", "4"]
    assert ax.get_title() == "Test accuracy 0.875 (n=8)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["clean", "messy"]
    assert_fits(fig)


def test_confusion_figure_of_many_classes_stays_1200_px():
    """Ten classes would want 18 in; the figure is scaled to 12 in (1200 px at dpi 100)."""
    names = [f"class{i}" for i in range(10)]
    cm = {a: {p: int(a == p) * 5 for p in names} for a in names}
    fig = confusion_figure({"confusion_matrix": cm, "accuracy": 1.0, "n": 50})
    assert fig.get_figwidth() * DPI == MAX_WIDTH_PX
    assert fig.get_figheight() <= fig.get_figwidth()


class FakeMlflow:
    """Records what `main` logs, instead of a tracking store: `tracking` resumes a fake run,
    `mlflow` logs into it."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.artifacts: list[tuple[str, str | None]] = []

    @contextlib.contextmanager
    def resume_training_run(self, paths):
        self.runs.append("run-1")
        yield "run-1"

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        assert self.runs, "logged outside the training run"
        self.artifacts.append((local_path, artifact_path))

    def log_artifacts(self, *args, **kwargs) -> None:
        raise AssertionError("figures are logged one by one, at the artifact root")


def pipeline_outputs(project) -> Paths:
    """What train and evaluate leave for plot: no metrics.json (plot must not read it)."""
    root, train = project
    paths = Paths(root)
    paths.splits.mkdir(parents=True)
    train.to_csv(paths.split_csv("train"), index=False)
    paths.history.parent.mkdir(parents=True)
    history().to_csv(paths.history, index=False)
    paths.evaluation.write_text(json.dumps(evaluation()))
    predictions(train, {1, 6}).to_csv(paths.predictions, index=False)
    return paths


def test_main_reads_evaluation_and_logs_each_figure_at_the_artifact_root(project, monkeypatch):
    """main reads evaluation.json (not metrics.json), writes the five PNGs and logs each one to the
    run at the artifact root, where MLflow's run-compare view shows them side by side."""
    paths = pipeline_outputs(project)
    fake = FakeMlflow()
    monkeypatch.setattr(plot, "mlflow", fake)
    monkeypatch.setattr(plot, "tracking", fake)
    plot.main(paths, Params())
    assert not paths.metrics.exists()
    assert sorted(p.name for p in paths.plots.iterdir()) == sorted(NAMES)
    assert fake.runs == ["run-1"]
    assert fake.artifacts == [(str(paths.plots / name), None) for name in NAMES]
    with Image.open(paths.plots / "predictions.png") as img:
        assert img.width == MAX_WIDTH_PX


def test_main_refuses_an_old_history(project, monkeypatch):
    """A history.csv with the old column names (loss, accuracy) asks to rerun train."""
    paths = pipeline_outputs(project)
    old = history().drop(columns="phase").rename(columns={"train_loss": "loss", "train_accuracy": "accuracy"})
    old.to_csv(paths.history, index=False)
    fake = FakeMlflow()
    monkeypatch.setattr(plot, "mlflow", fake)
    monkeypatch.setattr(plot, "tracking", fake)
    with pytest.raises(UserError, match=r"rerun `cleanmessy train`"):
        plot.main(paths, Params())


def test_plot_stage_does_not_import_tensorflow():
    """Importing the plot stage (in a fresh interpreter) loads neither TensorFlow nor Keras."""
    code = ("import sys, cleanmessy.stages.plot; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
