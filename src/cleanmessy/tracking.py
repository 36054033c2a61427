"""MLflow in one place: where the store is, which experiment, lineage tags, and the registry
(register a version, promote it by alias, resolve a stage to a model URI)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cleanmessy.errors import UserError
from cleanmessy.project import Paths

EXPERIMENT = "clean-vs-messy"
STAGES = ("staging", "production")  # registry stages, held as MLflow aliases


def tracking_uri(paths: Paths) -> str:
    """`MLFLOW_TRACKING_URI` when set (e.g. a team server), else the project's SQLite store.
    Anchored at the project root, so any working directory sees the same store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlruns / 'mlflow.db'}"


def setup(paths: Paths) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    uri = tracking_uri(paths)
    if uri.startswith("sqlite:///"):
        paths.mlruns.mkdir(parents=True, exist_ok=True)
    _point_to(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        # A local store keeps artifacts beside the database, under mlruns/artifacts.
        location = (paths.mlruns / "artifacts").as_uri() if uri.startswith("sqlite:") else None
        experiment_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def lineage_tags(paths: Paths, manifest_sha256: str, source: str) -> dict[str, str]:
    """Tags that say where a run came from, so runs compare side by side in the MLflow UI."""
    commit = _git(paths.root, "rev-parse", "HEAD")
    tags = {
        "git_commit": commit or "none",
        "git_dirty": str(bool(_git(paths.root, "status", "--porcelain", "--untracked-files=no"))).lower(),
        "data_manifest_sha256": manifest_sha256,
        "data_source": source,
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = exp
    return tags


@dataclass(frozen=True)
class RunInfo:
    """What train hands to evaluate and plot (pipeline/run.json)."""

    run_id: str
    experiment_id: str
    class_names: list[str]
    image_size: int

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunInfo:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise UserError(f"{path} not found: run `cleanmessy train` (or `dvc repro`) first") from None


def pip_requirements() -> list[str]:
    """The serving requirements, pinned to what trained the model (inferring them costs ~10 s)."""
    reqs = []
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "mlflow", "pillow", "numpy"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


class _KerasFlavor:
    """`mlflow.keras` with one fix: MLflow 3.17's Keras flavor writes the input example before it
    creates the model folder, so `log_model(..., input_example=...)` fails with FileNotFoundError.
    This shim creates the folder first and hands everything else to `mlflow.keras.save_model`."""

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path: str, extra_files: dict[str, str] | None = None, **kwargs: Any) -> None:
        import mlflow.keras

        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)
        for name, text in (extra_files or {}).items():  # e.g. the model card, beside MLmodel
            Path(path, name).write_text(text)


def log_keras_model(model: Any, example: Any, prediction: Any, metadata: dict[str, Any],
                    extra_files: dict[str, str] | None = None) -> Any:
    """Log `model` to the active run (name "model") with signature, input example, pinned
    requirements, `metadata` (class names, image size) in its MLmodel and `extra_files` (name ->
    text) beside it; returns the ModelInfo."""
    from mlflow.models import Model, infer_signature

    return Model.log(
        artifact_path=None,
        name="model",
        flavor=_KerasFlavor,
        flavor_name="mlflow.keras",
        model=model,
        signature=infer_signature(example, prediction),
        input_example=example,
        pip_requirements=pip_requirements(),
        metadata=metadata,
        extra_files=extra_files,
    )


# ---------------------------------------------------------------- registry


def decide_production(accuracy: float, min_accuracy: float, current: float | None) -> tuple[bool, str]:
    """Whether a new version becomes `production`, and why, in words for its description."""
    if accuracy < min_accuracy:
        return False, f"not promoted: test accuracy {accuracy:.4f} is below evaluate.min_accuracy {min_accuracy:.4f}"
    if current is not None and accuracy < current:
        return False, f"not promoted: test accuracy {accuracy:.4f} is below the production version's {current:.4f}"
    if current is None:
        return True, f"promoted: test accuracy {accuracy:.4f} >= min_accuracy {min_accuracy:.4f}; first production version"
    return True, (f"promoted: test accuracy {accuracy:.4f} >= min_accuracy {min_accuracy:.4f} "
                  f"and >= the previous production version's {current:.4f}")


def alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


@dataclass(frozen=True)
class Promotion:
    version: str
    production: bool
    reason: str


def register_and_promote(model_uri: str, name: str, run_id: str, accuracy: float, min_accuracy: float,
                         tags: dict[str, str]) -> Promotion:
    """Register `model_uri` as a new version of `name`: it always gets `staging`, and `production`
    when `decide_production` says so. The reason is kept in the version's description and tags."""
    client = MlflowClient()
    current = alias_version(client, name, "production")
    current_acc = float(current.tags["test_accuracy"]) if current and "test_accuracy" in current.tags else None
    promote, reason = decide_production(accuracy, min_accuracy, current_acc)
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # it exists already
    version = client.create_model_version(name, model_uri, run_id=run_id,
                                          tags={**tags, "test_accuracy": repr(accuracy)},  # exact: ties compare equal
                                          description=reason)
    client.set_registered_model_alias(name, "staging", version.version)
    if promote:
        client.set_registered_model_alias(name, "production", version.version)
    client.set_model_version_tag(name, version.version, "promotion", reason)
    return Promotion(str(version.version), promote, reason)


def model_uri_for(name: str, stage: str) -> str:
    """`models:/name@stage` — stages are held as aliases."""
    return f"models:/{name}@{stage.lower()}"


# ---------------------------------------------------------------- model selection (serving)

_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<ref>[\w-]+))")


def use_store(start: Path | None = None) -> str:
    """Point MLflow at the configured store without creating anything: `MLFLOW_TRACKING_URI`, or
    the SQLite store of the project found from `start` (default: cwd). Returns the URI."""
    from cleanmessy.project import project_paths

    return _point_to(os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(project_paths(start)))


def _point_to(uri: str) -> str:
    """Runs and the registry live in the same store."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered model, as the registry describes it."""

    name: str
    version: str
    aliases: list[str]
    run_id: str
    test_accuracy: float | None
    description: str

    @property
    def uri(self) -> str:
        """The exact version: what is shown is what is loaded, even if an alias moves meanwhile."""
        return f"models:/{self.name}/{self.version}"


def resolve_version(model_uri: str) -> RegisteredVersion:
    """The registered version a URI names: `models:/name@stage` (stages are aliases),
    `models:/name/3`, or a legacy stage URI `models:/name/Production` (read as alias `production`)."""
    found = _MODEL_URI.fullmatch(model_uri)
    if not found:
        raise UserError(f"model URI {model_uri!r} is not one of models:/<name>@<stage>, models:/<name>/<version> "
                        "or models:/<name>/<Stage>; loose files are not served, only registered models")
    name, alias, ref = found["name"], found["alias"], found["ref"]
    client = MlflowClient()
    try:
        if ref and ref.isdigit():
            version = client.get_model_version(name, ref)
        else:
            alias = (alias or ref).lower()
            version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        what = f"version {ref}" if ref and ref.isdigit() else f"version at stage '{alias}'"
        raise UserError(f"the registry at {mlflow.get_registry_uri()} has no {what} of model '{name}'; "
                        "`dvc repro` (or `cleanmessy evaluate`) registers one and promotes it") from None
    accuracy = version.tags.get("test_accuracy")
    return RegisteredVersion(name=name, version=str(version.version), aliases=sorted(version.aliases or []),
                             run_id=version.run_id or "", description=version.description or "",
                             test_accuracy=float(accuracy) if accuracy else None)
