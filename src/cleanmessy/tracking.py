"""MLflow in one place: where the store is (`connect`), which experiment, the training run that
evaluate and plot resume, what a run logs (lineage from lineage.py, the dataset, the model), and
the registry (register a version, promote it by alias, resolve a stage, download a version)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cleanmessy.errors import UserError
from cleanmessy.lineage import file_md5
from cleanmessy.project import Paths, project_paths

log = logging.getLogger(__name__)
EXPERIMENT = "clean-vs-messy"
# Registry stages, held as MLflow aliases (MLflow deprecated its own stages in favour of them).
STAGING, PRODUCTION = "staging", "production"
EXPERIMENT_TAGS = {"mlflow.note.content": "Clean vs Messy: one run per `dvc repro` / `dvc exp run` that trained, "
                                          "named after its DVC experiment. Compare runs by their `test_` metrics."}


def tracking_uri(paths: Paths | None = None) -> str:
    """`MLFLOW_TRACKING_URI` when set (e.g. a team server), else the SQLite store of the project
    (`paths`, or the one found from the working directory): `Paths.mlruns`, anchored at the
    project root (or at the project a DVC experiment copy belongs to), so any working directory
    sees the same store."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    return f"sqlite:///{(paths or project_paths()).mlruns / 'mlflow.db'}"


def runs_page(base_url: str, experiment_id: str) -> str:
    """The MLflow UI's page of an experiment's runs. MLflow 3.17's UI opens experiments on its
    GenAI "Traces" view unless the link asks for the machine-learning view (experiment tags such
    as mlflow.experimentKind are ignored by that version)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def server_runs_link(run_id: str) -> str | None:
    """The runs table (`runs_page`) of the experiment `run_id` belongs to, on the tracking server
    MLflow is connected to; None for a local store (`cleanmessy ui` prints that link). A login in
    the URI (`http://user:password@host`) is left out of the link."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    parts = urllib.parse.urlsplit(uri)
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    try:
        return runs_page(base, MlflowClient().get_run(run_id).info.experiment_id)
    except MlflowException:  # only a link: never fail a stage over it
        return None


def connect(paths: Paths | None = None) -> str:
    """Point MLflow's runs and registry at the configured store (`tracking_uri`); creates
    nothing. Returns the URI. The one place that sets MLflow's global store."""
    uri = tracking_uri(paths)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # runs and the registry live in the same store
    return uri


@contextlib.contextmanager
def store_lock(paths: Paths) -> Iterator[None]:
    """Hold the project's local store for one writer at a time, for the steps that race when
    several experiments run at once (`dvc queue start -j 2`): creating and migrating the SQLite
    database, creating the experiment, registering a version and moving aliases. A tracking
    server serialises these itself: nothing to hold then."""
    uri = tracking_uri(paths)
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    database = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])  # beside the database, whoever uses it
    lock_file = database.with_name(database.name + ".writer-lock")
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(lock_file, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
    except OSError as exc:
        raise UserError(f"cannot use the MLflow store's lock {lock_file}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)  # releases the lock


def open_experiment(paths: Paths, name: str | None = None, tags: dict[str, str] | None = None) -> str:
    """`connect`, and make sure the experiment exists and is the active one; returns its id. The
    experiment is `name` (created with `tags`), by default $MLFLOW_EXPERIMENT_NAME or EXPERIMENT."""
    with store_lock(paths):
        uri = connect(paths)
        name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        experiment = mlflow.get_experiment_by_name(name)  # creates and migrates a new database
        if experiment is None:
            # A local store keeps artifacts beside the database, under mlruns/artifacts.
            location = (paths.mlruns / "artifacts").as_uri() if uri.startswith("sqlite:") else None
            experiment_id = mlflow.create_experiment(name, artifact_location=location,
                                                     tags=EXPERIMENT_TAGS if tags is None else tags)
        else:
            experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextlib.contextmanager
def resume_training_run(paths: Paths) -> Iterator[str]:
    """The MLflow run that trained the workspace's model, active inside the block (evaluate and
    plot add to it); yields its id. An exception inside marks the run FAILED. Runs that a dead
    process left RUNNING are marked KILLED first (`reap_dead_runs`)."""
    experiment_id = open_experiment(paths)
    reap_dead_runs(experiment_id, paths.stage or "evaluate")
    run_id = training_run_id(paths, experiment_id)
    with mlflow.start_run(run_id=run_id, tags=process_tags()):
        yield run_id


# Which process holds a run open: a run RUNNING whose process is gone was killed (SIGKILL, power
# loss), since every other way out ends it (FINISHED, or FAILED from an exception or a signal).
PID_TAG, HOST_TAG = "cleanmessy.pid", "cleanmessy.host"


def process_tags() -> dict[str, str]:
    import socket

    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def reap_dead_runs(experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED the runs of `experiment_id` left RUNNING by a process of this host that is gone,
    one line each; returns their ids. Runs of other hosts, of live processes and without the tags
    (older runs, runs of other tools) are left alone."""
    import socket

    client, host, killed = MlflowClient(), socket.gethostname(), []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=200):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) != host or not pid.isdigit() or _alive(int(pid)):
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        killed.append(run.info.run_id)
        log.warning("%s: MLflow run %s (%s) was left RUNNING by process %s, which is gone (killed): marked KILLED",
                    stage, run.info.run_name, run.info.run_id, pid)
    return killed


def remember_training_run(paths: Paths, run_id: str) -> None:
    """Note which run trained pipeline/model.keras, and tag the run with the model's md5 so the
    run can be found again after `dvc exp apply` or `dvc checkout` brings an older model back."""
    md5 = file_md5(paths.model)
    MlflowClient().set_tag(run_id, "model_md5", md5)
    paths.training_run.write_text(json.dumps({"run_id": run_id, "model_md5": md5,
                                              "tracking_uri": mlflow.get_tracking_uri()}) + "\n")


def training_run_id(paths: Paths, experiment_id: str) -> str:
    """The MLflow run that trained the workspace's pipeline/model.keras: the one train noted, if
    the model is still the one it trained, else the newest run tagged with the model's md5."""
    md5 = file_md5(paths.model)
    try:
        noted = json.loads(paths.training_run.read_text())
    except (OSError, ValueError):
        noted = {}
    client = MlflowClient()
    if noted.get("model_md5") == md5 and noted.get("tracking_uri") == mlflow.get_tracking_uri():
        try:
            return client.get_run(noted["run_id"]).info.run_id
        except MlflowException:
            pass  # the store lost it (mlruns/ deleted): look for another run of this model
    found = client.search_runs([experiment_id], f"tags.model_md5 = '{md5}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise UserError(f"no MLflow run in {mlflow.get_tracking_uri()} trained {paths.model.name} (md5 {md5}); "
                        "run `dvc repro --force` to train, evaluate and plot it again with tracking there")
    return found[0].info.run_id


def log_manifest(manifest: Any, source: str, name: str, sha256: str) -> None:
    """The ingested data as the run's training dataset (the UI's Datasets column): the manifest,
    with its sha256 as digest (cut to the 32 characters MLflow's database holds)."""
    import warnings

    import mlflow.data

    with warnings.catch_warnings():  # MLflow guesses the source's type and the schema aloud
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(manifest, source=source, name=name, digest=sha256[:32])
        mlflow.log_input(dataset, context="training")


TRAINING_IMAGES = "training_images.txt"  # run artifact: sha256 of every train and val image


def log_training_images(hashes: list[str]) -> None:
    """Record what the model saw, so a later candidate can be compared with it on other images."""
    mlflow.log_text("\n".join(sorted(set(hashes))) + "\n", TRAINING_IMAGES)


def training_images(run_id: str) -> set[str] | None:
    """The content hashes a run trained and validated on; None when the run did not record them."""
    try:
        return set(mlflow.artifacts.load_text(f"runs:/{run_id}/{TRAINING_IMAGES}").split())
    except (MlflowException, OSError):
        return None


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Comparison:
    """The candidate and the production version, scored on the same test images: the
    candidate's test images that the production version neither trained nor validated on."""

    production_version: str
    n_test: int  # the candidate's test images
    n_unseen: int  # of those, the ones production never trained or validated on
    candidate_correct: int
    production_correct: int
    incomparable: str = ""  # why the two cannot be scored on the same images at all (then n_unseen is 0)
    candidate_family: str = ""  # card.data_family of each; "" when not recorded
    production_family: str = ""
    unservable: str = ""  # why no server loads the production version any more: the candidate replaces it

    @property
    def same_family(self) -> bool:
        return bool(self.candidate_family) and self.candidate_family == self.production_family

    def describe(self) -> str:
        if not self.same_family:
            if not self.production_family:
                return (f"production version {self.production_version} does not record which data it was trained "
                        "on, so the two are not compared (to serve this version, move the alias by hand)")
            return (f"production version {self.production_version} was trained on {self.production_family}, this "
                    f"version on {self.candidate_family or 'unrecorded data'}: promotion never crosses kinds of "
                    "data (give each its own evaluate.model_name, as experiments/real-photos.yaml does)")
        if self.incomparable:
            return self.incomparable
        if not self.n_unseen:
            return (f"all {self.n_test} test images were in production version {self.production_version}'s "
                    "training data, so the two cannot be compared fairly")
        return (f"on the {self.n_unseen} of {self.n_test} test images that production version "
                f"{self.production_version} never trained on, this version got {self.candidate_correct} right "
                f"({self.candidate_correct / self.n_unseen:.1%}), version {self.production_version} "
                f"{self.production_correct} ({self.production_correct / self.n_unseen:.1%})")


def decide_production(accuracy: float, min_accuracy: float, comparison: Comparison | None) -> tuple[bool, str]:
    """Whether a new version becomes `production`, and why, in words for its description. It must
    reach `min_accuracy` on its own test images, and do at least as well as the production version
    on the same images (counts, not rounded rates, so a tie is a tie)."""
    relation = ">=" if accuracy >= min_accuracy else "<"
    gate = f"test accuracy {accuracy:.4f} {relation} evaluate.min_accuracy {min_accuracy:g}"
    if accuracy < min_accuracy:
        return False, f"not promoted: {gate}" + (f"; {comparison.describe()}" if comparison else "")
    if comparison is None:
        return True, f"promoted: {gate}; first production version"
    if comparison.same_family and comparison.unservable:
        return True, f"promoted: {gate}; {comparison.unservable}"
    if not comparison.same_family or not comparison.n_unseen:
        return False, f"not promoted: {comparison.describe()}"
    if comparison.candidate_correct < comparison.production_correct:
        return False, f"not promoted: {comparison.describe()}"
    return True, f"promoted: {gate}; {comparison.describe()}"


def version_family(tags: dict[str, str]) -> str:
    """A registered version's data family (card.data_family): its `data_family` tag, or for versions
    registered before that tag, the family its `data_kind` and `data_source` tags imply; "" if none."""
    from cleanmessy.card import data_family

    if family := tags.get("data_family"):
        return family
    if tags.get("data_kind") and tags.get("data_source"):
        return data_family(tags["data_kind"], tags["data_source"])
    return ""


def alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


@dataclass(frozen=True)
class Promotion:
    version: str
    production: bool
    staging: bool
    reason: str


REGISTERED_MODEL_DESCRIPTION = """\
Tells photos of clean, tidy rooms from messy, cluttered ones. Every version is registered by the
pipeline's `evaluate` stage (`dvc repro` / `dvc exp run`) and carries its model card: the data it
was trained on, its params and its test results.

- **`production`**: the version `cleanmessy serve` and `cleanmessy predict` load by default. A new
  version takes it when it was trained on the same kind of data from the same source (its
  `data_family` tag), reaches `evaluate.min_accuracy` and does at least as well as the current one on
  the same test images (those the current one never trained on).
- **`staging`**: the newest version that reached `evaluate.min_accuracy`, promoted or not.
"""


def register_and_promote(model_info: Any, name: str, run_id: str, accuracy: float, min_accuracy: float,
                         comparison: Comparison | None, tags: dict[str, str], card: str) -> Promotion:
    """Register the logged model as a new version of `name`. It gets `staging` when it reaches
    `min_accuracy`, and `production` when `decide_production` says so. The version's description
    is the decision (its first paragraph, plain text: the registry's table shows it raw) and its
    model card; its tags are `tags` and `test_accuracy` (few: the registry's table shows them all)."""
    client = MlflowClient()
    promote, reason = decide_production(accuracy, min_accuracy, comparison)
    staging = accuracy >= min_accuracy
    try:
        client.create_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        if not client.get_registered_model(name).description:  # never overwrite what people wrote
            client.update_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
    # model_id: a tracking server accepts a LoggedModel's models:/m-... source only with its id.
    version = client.create_model_version(name, model_info.model_uri, run_id=run_id, model_id=model_info.model_id,
                                          tags={**tags, "test_accuracy": repr(accuracy)},
                                          description=f"{reason}\n\n{card}")
    if staging:
        client.set_registered_model_alias(name, STAGING, version.version)
    if promote:
        client.set_registered_model_alias(name, PRODUCTION, version.version)
    return Promotion(str(version.version), promote, staging, reason)


def model_uri_for(name: str, stage: str) -> str:
    """`models:/name@stage` — stages are held as aliases."""
    return f"models:/{name}@{stage.lower()}"


# ---------------------------------------------------------------- model selection (serving)

_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<ref>[\w-]+))")


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered model, as the registry describes it."""

    name: str
    version: str
    aliases: list[str]
    run_id: str
    test_accuracy: float | None
    description: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        """The exact version: what is shown is what is loaded, even if an alias moves meanwhile."""
        return f"models:/{self.name}/{self.version}"


def names_exact_version(model_uri: str) -> bool:
    """True for `models:/name/3`, which always means the same version; False for an alias or stage."""
    found = _MODEL_URI.fullmatch(model_uri)
    return bool(found and found["ref"] and found["ref"].isdigit())


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
                        "`dvc repro` registers one and promotes it (after a `dvc pull` into an empty store: "
                        "`dvc repro --force --single-item evaluate`)") from None
    accuracy = version.tags.get("test_accuracy")
    return RegisteredVersion(name=name, version=str(version.version), aliases=sorted(version.aliases or []),
                             run_id=version.run_id or "", description=version.description or "",
                             test_accuracy=float(accuracy) if accuracy else None, tags=dict(version.tags or {}))


def run_tag(run_id: str, name: str) -> str:
    """A tag of a run, "" when the run or the tag is gone."""
    try:
        return MlflowClient().get_run(run_id).data.tags.get(name, "") if run_id else ""
    except MlflowException:
        return ""


def download_error(uri: str, exc: BaseException) -> str:
    """One line for a version that cannot be downloaded: its files gone from the store (MLflow says
    only `No such artifact: ''`), or the store's own first line."""
    text = str(exc)
    if "No such artifact" in text or isinstance(exc, FileNotFoundError):
        return (f"{uri}'s files are gone from the MLflow store (deleted?): this version cannot be loaded; register "
                "it again (`dvc repro --force --single-item evaluate`) or move the alias to another version")
    return f"cannot download {uri} from the registry: {text.splitlines()[0] if text else type(exc).__name__}"


def download_version(uri: str) -> tuple[Path, dict[str, Any]]:
    """A registered version's files, downloaded to a local folder, and its MLmodel metadata (class
    names, image size, ...); a UserError when it cannot be downloaded or was not logged by
    evaluate."""
    import mlflow.artifacts
    from mlflow.models import Model

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        meta = Model.load(str(local)).metadata or {}
    except (MlflowException, OSError) as exc:  # artifacts deleted or the store unreachable
        raise UserError(download_error(uri, exc)) from None
    if "class_names" not in meta or "image_size" not in meta:
        raise UserError(f"{uri} has no class_names/image_size metadata: it was not logged by `cleanmessy evaluate`")
    return local, meta
