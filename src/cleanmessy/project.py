"""Where the project lives: every path the stages read or write is derived here, from the root."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cleanmessy.errors import UndeclaredInput, UserError

MARKERS = ("dvc.yaml", "params.yaml")


def find_root(start: Path | None = None) -> Path:
    """Nearest ancestor of `start` (default: cwd) holding dvc.yaml and params.yaml.

    `CLEANMESSY_ROOT` overrides the search, for running the CLI from outside the checkout.
    """
    if env := os.environ.get("CLEANMESSY_ROOT"):
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if all((candidate / m).is_file() for m in MARKERS):
            return candidate
        if (candidate / "dvc.yaml").is_file() and (candidate / "params.yaml").exists():
            raise UserError(f"{candidate / 'params.yaml'} is not a file; remove it and restore the file with "
                            "`git checkout params.yaml`")
    raise UserError(
        f"no Clean vs Messy project found at or above {here} (looked for {' and '.join(MARKERS)}); "
        "run the command inside the repository or set CLEANMESSY_ROOT"
    )


# Written by the stages but not DVC data: the MLflow store, and which MLflow run trained the
# workspace's model (a run id differs on every run, so it must not be a DVC output).
UNTRACKED = ("mlruns", "pipeline/mlflow_run.json")

# data/feedback/<label>/: corrections kept by `cleanmessy serve --feedback` (serving/feedback.py),
# which ingest merges into the training data; data/feedback/<this>/ (photos marked "not a room")
# never becomes training data (evaluate's out-of-distribution set takes it).
FEEDBACK_NOT_A_ROOM = "not-a-room"


@dataclass(frozen=True)
class Paths:
    """The project's file layout (mirrors dvc.yaml's deps and outs).

    With `declared` (what a stage's dvc.yaml entry lists), asking for any other file raises
    `cleanmessy.errors.UndeclaredInput`: a stage cannot read what DVC does not know it reads."""

    root: Path
    declared: frozenset[str] | None = field(default=None, compare=False)
    stage: str = field(default="", compare=False)

    def _at(self, rel: str) -> Path:
        if self.declared is not None and not any(
                rel == d or rel.startswith(f"{d}/") or d.startswith(f"{rel}/") for d in (*self.declared, *UNTRACKED)):
            raise UndeclaredInput(f"stage '{self.stage}' uses {rel}, which its dvc.yaml entry does not declare")
        return self.root / rel

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    # data/: ingest and split outputs
    @property
    def images(self) -> Path:
        return self._at("data/images")

    @property
    def manifest(self) -> Path:
        return self._at("data/manifest.csv")

    @property
    def ingest_report(self) -> Path:
        return self._at("data/ingest_report.json")

    @property
    def splits(self) -> Path:
        return self._at("data/splits")

    @property
    def feedback(self) -> Path:
        """Corrections from the app (`serve --feedback`): photos by label, an ingest input."""
        return self._at("data/feedback")

    def split_csv(self, split: str) -> Path:
        return self._at(f"data/splits/{split}.csv")

    @property
    def not_a_room(self) -> Path:
        """Photos users marked "not a room" in the app: evaluate's OOD set, never training data."""
        return self._at(f"data/feedback/{FEEDBACK_NOT_A_ROOM}")

    # pipeline/: train, evaluate and plot outputs
    @property
    def model(self) -> Path:
        return self._at("pipeline/model.keras")

    @property
    def familiarity(self) -> Path:
        """The familiarity detector train fits on the training photos' features (familiarity.py)."""
        return self._at("pipeline/familiarity.npz")

    @property
    def ood_metrics(self) -> Path:
        """The familiarity detector's headline figures (a DVC metrics file beside metrics.json)."""
        return self._at("pipeline/ood.json")

    @property
    def history(self) -> Path:
        return self._at("pipeline/history.csv")

    @property
    def run_info(self) -> Path:
        return self._at("pipeline/run.json")

    @property
    def metrics(self) -> Path:
        return self._at("pipeline/metrics.json")

    @property
    def evaluation(self) -> Path:
        """The full test evaluation (per-class metrics, confusion matrix); metrics.json holds the headline."""
        return self._at("pipeline/evaluation.json")

    @property
    def predictions(self) -> Path:
        return self._at("pipeline/predictions.csv")

    @property
    def training_run(self) -> Path:
        """The id of the MLflow run that trained pipeline/model.keras (see UNTRACKED)."""
        return self._at("pipeline/mlflow_run.json")

    # Records that evaluate registered, and plot logged, this model in the MLflow store: DVC-cached
    # outputs, not in git. A fresh clone (whose store is empty) lacks them, so DVC reruns both
    # stages there; a teammate who `dvc pull`s them shares the team's tracking server and registry,
    # and reruns nothing.
    @property
    def registered(self) -> Path:
        return self._at("pipeline/registered.json")

    @property
    def figures_logged(self) -> Path:
        return self._at("pipeline/plots_logged.json")

    @property
    def cv_report(self) -> Path:
        return self._at("pipeline/cv.json")

    @property
    def plots(self) -> Path:
        return self._at("pipeline/plots")

    # mlruns/: the local MLflow store (never a DVC output: `dvc repro` deletes outputs first). A
    # queued or `--temp` experiment runs in a copy of the project under .dvc/tmp/exps/, which DVC
    # deletes afterwards: its store is the one of the project it copies, which DVC_ROOT names.
    @property
    def mlruns(self) -> Path:
        self._at("mlruns")
        return experiment_home(self.root, os.environ.get("DVC_ROOT")) / "mlruns"


def experiment_home(root: Path, dvc_root: str | None) -> Path:
    """The project a workspace belongs to: `dvc_root` when `root` is one of DVC's temporary
    experiment copies inside it (.dvc/tmp/exps/...), else `root` itself (also when DVC_ROOT names
    some other repository, e.g. a DVC stage of another project that runs cleanmessy)."""
    if dvc_root and root.resolve().is_relative_to(Path(dvc_root).resolve() / ".dvc" / "tmp" / "exps"):
        return Path(dvc_root)
    return root


def project_paths(start: Path | None = None) -> Paths:
    """Paths of the project containing `start` (default: cwd)."""
    return Paths(find_root(start))


def scratch_dir(root: Path) -> Path:
    """Where a stage keeps temporary files (a downloaded zip, caches that spill out of memory):
    inside the project, never the system's temp folder. DVC's own scratch folder .dvc/tmp
    (git-ignored, never hashed) when the project has .dvc/, else the project root itself."""
    if (root / ".dvc").is_dir():
        (root / ".dvc" / "tmp").mkdir(exist_ok=True)
        return root / ".dvc" / "tmp"
    return root
