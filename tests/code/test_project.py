"""project: where the project and its MLflow store are."""

from __future__ import annotations

from pathlib import Path

from cleanmessy.project import Paths, experiment_home


def test_a_dvc_experiment_copy_tracks_into_the_project_it_copies(tmp_path, monkeypatch):
    """A queued or --temp experiment runs in .dvc/tmp/exps/<tmp> inside the project; its runs go to
    the project's store (DVC_ROOT), not to the copy DVC deletes afterwards."""
    project = tmp_path / "project"
    copy = project / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert Paths(copy).mlruns == project / "mlruns"
    assert Paths(project).mlruns == project / "mlruns"


def test_dvc_root_of_another_repository_is_ignored(tmp_path, monkeypatch):
    """DVC_ROOT set by some other project's stage (or inherited) never moves this project's store."""
    project, other = tmp_path / "project", tmp_path / "other"
    project.mkdir()
    monkeypatch.setenv("DVC_ROOT", str(other))
    assert Paths(project).mlruns == project / "mlruns"
    assert experiment_home(project, None) == project
    assert experiment_home(Path(project), str(project)) == project
