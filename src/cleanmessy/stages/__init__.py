"""Pipeline stages: each module has a pure core and a thin `main(paths, params)` doing the I/O.

`run_stage` hands a stage only what its dvc.yaml entry declares: params it does not list and
project files it neither depends on nor writes raise `UndeclaredInput`. DVC decides what to rerun
from those declarations, so a stage that read more than it declares could be served stale from
DVC's cache; the pipeline tests run every stage through here and would fail on such a read."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import importlib
import os
import sqlite3
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml

from cleanmessy import interrupts
from cleanmessy.errors import UndeclaredInput, UserError
from cleanmessy.params import Params, load_params
from cleanmessy.project import Paths, project_paths


@dataclasses.dataclass(frozen=True)
class Declaration:
    """What dvc.yaml says a stage reads and writes."""

    params: tuple[str, ...]  # "train" (a whole section) or "base.image_size" (one key)
    files: tuple[str, ...]  # deps, outs, metrics and plots, relative to the project root


def declaration(dvc_yaml: Path, stage: str, params: Params) -> Declaration:
    """The params and files `stage` declares in dvc.yaml (`${ingest.source}` filled in)."""
    try:
        entry = yaml.safe_load(dvc_yaml.read_text())["stages"][stage]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        raise UserError(f"{dvc_yaml} has no stage '{stage}'") from None
    files = []
    for kind in ("deps", "outs", "metrics", "plots"):
        for item in entry.get(kind) or []:
            path = next(iter(item)) if isinstance(item, dict) else item
            files.append(path.replace("${ingest.source}", params.ingest.source))
    keys = [k for item in entry.get("params") or [] for k in ([item] if isinstance(item, str) else [])]
    return Declaration(tuple(keys), tuple(files))


class _Section:
    """A params section of which the stage declared only some keys."""

    def __init__(self, stage: str, name: str, value: Any, allowed: set[str]) -> None:
        self._stage, self._name, self._value, self._allowed = stage, name, value, allowed

    def __getattr__(self, key: str) -> Any:
        if key not in self._allowed:
            raise UndeclaredInput(f"stage '{self._stage}' reads param {self._name}.{key}, which its "
                                  "dvc.yaml entry does not declare")
        return getattr(self._value, key)


def restrict_params(params: Params, keys: tuple[str, ...], stage: str) -> Params:
    """`params` with every section or key that `keys` does not name replaced by a guard."""
    changes = {}
    for f in dataclasses.fields(params):
        if f.name in keys:
            continue
        allowed = {k.split(".", 1)[1] for k in keys if k.startswith(f"{f.name}.")}
        changes[f.name] = _Section(stage, f.name, getattr(params, f.name), allowed)
    return dataclasses.replace(params, **changes)


# What MLFLOW_TRACKING_URI may start with: a server, or a database MLflow's SQL store opens.
TRACKING_SCHEMES = ("http://", "https://", "sqlite:///", "postgresql://", "postgresql+", "mysql://", "mysql+",
                    "mssql://", "mssql+", "databricks")


def check_tracking_server(uri: str | None, timeout: float = 5.0) -> None:
    """Fail in seconds, before TensorFlow loads, when MLFLOW_TRACKING_URI is not a store MLflow
    can open, names a server that does not answer, or a server that refuses our login
    (MLFLOW_TRACKING_USERNAME/PASSWORD): MLflow itself retries with backoff for minutes, then
    prints tracebacks."""
    if not uri:
        return
    if not uri.startswith(TRACKING_SCHEMES):
        raise UserError(f"MLFLOW_TRACKING_URI={uri} is not a tracking store: use http(s)://host:port for a "
                        "server, or a database URI (sqlite:///..., postgresql://...)")
    if not uri.startswith(("http://", "https://")):
        return
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError as exc:
        raise UserError(f"{uri} answers /health with HTTP {exc.code}: is MLFLOW_TRACKING_URI the MLflow server's "
                        "address (http://host:port, no path)?") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"the MLflow tracking server at {uri} does not answer ({reason}); start it, or unset "
                        "MLFLOW_TRACKING_URI to use the project's own store") from None
    # /health needs no login; one read of the experiments does (a server run with basic-auth).
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user or password:
        token = base64.b64encode(f"{user or ''}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:  # a server that answers /health may still take seconds to check a password (PBKDF2)
        with urllib.request.urlopen(request, timeout=max(timeout, 30.0)):
            return
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            who = f"user '{user}'" if user else "no user (MLFLOW_TRACKING_USERNAME is not set)"
            raise UserError(f"the MLflow tracking server at {uri} refused the login of {who}: set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account on it") from None
        if exc.code == 403:
            raise UserError(f"the MLflow tracking server at {uri} does not let user '{user}' read experiments; "
                            "ask its admin for permission") from None
        raise UserError(f"the MLflow tracking server at {uri} answers HTTP {exc.code} to a search of experiments; "
                        "is it an MLflow server?") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(f"the MLflow tracking server at {uri} stopped answering "
                        f"({getattr(exc, 'reason', exc)})") from None


def check_local_store(db: Path) -> None:
    """Fail at once, with one line, when the project's SQLite store exists but cannot be
    written (a read-only file or mount): MLflow would fail mid-run with a long traceback. The
    probe writes inside a transaction that is rolled back."""
    if not db.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as connection:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(f"CREATE TABLE cleanmessy_probe_{uuid.uuid4().hex} (x INTEGER)")
            connection.rollback()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):  # another experiment is writing (`dvc queue start -j 2`): not our business
            return
        raise UserError(f"the MLflow store {db} cannot be written ({exc}); make it writable, or set "
                        "MLFLOW_TRACKING_URI to another store") from None


def check_store(paths: Paths) -> None:
    """Before TensorFlow loads, so a bad store fails in seconds with one line: the tracking
    server answers, or the project's own SQLite store can be written."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_tracking_server(uri)
    else:
        check_local_store(paths.mlruns / "mlflow.db")


TRACKING_STAGES = ("train", "evaluate", "plot")  # the stages that write to the MLflow store


def run_stage(stage: str) -> None:
    """Run `cleanmessy <stage>` as dvc.yaml declares it: only the params and files it lists. Under
    `dvc repro` the stage stops when that dvc process is gone (interrupts.die_with)."""
    if (dvc := interrupts.dvc_ancestor()) is not None:
        interrupts.die_with(dvc)
    paths = project_paths()
    params = load_params(paths.params)
    if stage in TRACKING_STAGES:
        check_store(paths)
    module = importlib.import_module(f"cleanmessy.stages.{stage}")
    declared = declaration(paths.root / "dvc.yaml", stage, params)
    params = restrict_params(params, declared.params, stage)
    module.main(Paths(paths.root, declared=frozenset(declared.files), stage=stage), params)
