"""Where a run and a model came from: the code (git commit, uncommitted changes), the data (the
manifest's hash and the source), the DVC experiment, and the model file's md5. Pure reads of the
working tree; tracking.py writes them to MLflow."""

from __future__ import annotations

import hashlib
import os
import subprocess
from datetime import datetime
from pathlib import Path

# Not code: params are logged as params, data by its hash, and dvc.lock and the pipeline outputs
# are rewritten by every run (so they would make every run "dirty").
NOT_CODE = ("params.yaml", "dvc.lock", "data", "pipeline", "mlruns", ".dvc")


def manifest_hash(manifest_csv: Path) -> str:
    """Content hash of the manifest: the data lineage tag on MLflow runs and dataset digest."""
    return hashlib.sha256(manifest_csv.read_bytes()).hexdigest()


def file_md5(path: Path) -> str:
    """md5 of a file, as dvc.lock records it (the `model_md5` tag)."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def dvc_experiment() -> str | None:
    """The DVC experiment being run (`dvc exp run` sets DVC_EXP_NAME), if any."""
    return os.environ.get("DVC_EXP_NAME") or None


def experiments_on_commit(root: Path) -> tuple[str, set[str]]:
    """The current commit and the names of the DVC experiments based on it. DVC keeps each as the
    git ref refs/exps/<commit[:2]>/<commit[2:]>/<name> (dvc/repo/experiments/refs.py), so a name is
    taken per commit: `dvc exp run -n` refuses one its commit already has."""
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return "", set()
    refs = _git(root, "for-each-ref", "--format=%(refname)", f"refs/exps/{commit[:2]}/{commit[2:]}/")
    return commit, {ref.rsplit("/", 1)[1] for ref in refs.splitlines()}


def lineage_tags(root: Path, manifest_sha256: str, source: str) -> dict[str, str]:
    """Tags that say where a run came from, so runs compare side by side in the MLflow UI.
    `git_dirty` is true when tracked files other than params.yaml, dvc.lock and outputs differ
    from `git_commit`: the code that ran is then not the commit's."""
    commit = _git(root, "rev-parse", "HEAD")
    excluded = [f":(exclude){p}" for p in NOT_CODE]
    tags = {
        "git_commit": commit or "none",
        "git_dirty": str(bool(_git(root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                   *excluded))).lower(),
        "data_manifest_sha256": manifest_sha256,
        "data_source": source,
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if exp := dvc_experiment():
        tags["dvc_exp_name"] = exp
    return tags


def run_name(exp_name: str | None, arch: str, image_size: int, now: datetime) -> str:
    """The DVC experiment's name when there is one, else what and when: `seed_cnn-64px-1127-123005`.
    (MLflow's own random names repeat here: train seeds Python's random generator.)"""
    return exp_name or f"{arch}-{image_size}px-{now:%m%d-%H%M%S}"
