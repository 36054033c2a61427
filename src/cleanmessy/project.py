"""Where the project lives: every path the stages read or write is derived here, from the root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cleanmessy.errors import UserError

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
    raise UserError(
        f"no Clean vs Messy project found at or above {here} (looked for {' and '.join(MARKERS)}); "
        "run the command inside the repository or set CLEANMESSY_ROOT"
    )


@dataclass(frozen=True)
class Paths:
    """The project's file layout (mirrors dvc.yaml's deps and outs)."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    # data/: ingest and split outputs
    @property
    def images(self) -> Path:
        return self.root / "data" / "images"

    @property
    def manifest(self) -> Path:
        return self.root / "data" / "manifest.csv"

    @property
    def ingest_report(self) -> Path:
        return self.root / "data" / "ingest_report.json"

    @property
    def splits(self) -> Path:
        return self.root / "data" / "splits"

    def split_csv(self, split: str) -> Path:
        return self.splits / f"{split}.csv"

    # pipeline/: train, evaluate and plot outputs
    @property
    def model(self) -> Path:
        return self.root / "pipeline" / "model.keras"

    @property
    def history(self) -> Path:
        return self.root / "pipeline" / "history.csv"

    @property
    def run_info(self) -> Path:
        return self.root / "pipeline" / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "pipeline" / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.root / "pipeline" / "predictions.csv"

    @property
    def plots(self) -> Path:
        return self.root / "pipeline" / "plots"

    # mlruns/: the local MLflow store (never a DVC output: `dvc repro` deletes outputs first)
    @property
    def mlruns(self) -> Path:
        return self.root / "mlruns"


def project_paths(start: Path | None = None) -> Paths:
    """Paths of the project containing `start` (default: cwd)."""
    return Paths(find_root(start))
