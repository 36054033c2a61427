"""tracking: the MLflow store, experiment, lineage tags, run hand-off and registry promotion,
against a real SQLite store in tmp_path."""

import os
import subprocess
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from mlflow import MlflowClient

from cleanmessy import tracking
from cleanmessy.errors import UserError
from cleanmessy.inputs import ModelSpec
from cleanmessy.lineage import lineage_tags, run_name
from cleanmessy.project import Paths

# MLflow keeps the tracking URI, registry URI and experiment id both in module globals and in
# these environment variables (set_tracking_uri / set_experiment export them for subprocesses).
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
              "DVC_EXP_NAME")
GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


@pytest.fixture(autouse=True)
def isolated_mlflow(monkeypatch: pytest.MonkeyPatch):
    """No tracking server from the environment, and no MLflow state leaking into later tests."""
    for key in MLFLOW_ENV:
        # setenv first so monkeypatch records the original value (or its absence) and restores it,
        # even after MLflow itself exported the variable during the test.
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # tracking.connect points MLflow at a store process-wide (MLflow's public API has no other
    # way); put the previous store back afterwards. Each test opens its own experiment.
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    yield
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])
    assert mlflow.active_run() is None, "a test left an MLflow run open"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    (tmp_path / "mlruns").mkdir()
    return Paths(tmp_path)


def log_dummy_model(root: Path) -> str:
    """A finished run with a small artifact folder logged as "model"; returns the run id."""
    model_dir = root / "dummy_model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "weights.txt").write_text("not really a model\n")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
    return run.info.run_id


def register(root: Path, accuracy: float, min_accuracy: float = 0.8,
             comparison: tracking.Comparison | None = None) -> tracking.Promotion:
    run_id = log_dummy_model(root)
    model = SimpleNamespace(model_uri=f"runs:/{run_id}/model", model_id=None)
    return tracking.register_and_promote(model, "m", run_id, accuracy, min_accuracy, comparison, {"a": "b"},
                                         "# Model card: m\n")


def versus(production_version: str, candidate: int, production: int, n_unseen: int = 20) -> tracking.Comparison:
    return tracking.Comparison(production_version, n_test=30, n_unseen=n_unseen, candidate_correct=candidate,
                               production_correct=production, candidate_family="sample", production_family="sample")


def aliases(version) -> set[str]:
    return set(MlflowClient().get_model_version("m", str(version)).aliases)


# ---------------------------------------------------------------- store and experiment


def test_tracking_uri_is_the_projects_sqlite_store(paths):
    """Without MLFLOW_TRACKING_URI the store is <root>/mlruns/mlflow.db, as an absolute sqlite URI."""
    uri = tracking.tracking_uri(paths)
    assert uri == f"sqlite:///{paths.root / 'mlruns' / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")  # three slashes plus an absolute path


def test_tracking_uri_env_var_overrides(paths, monkeypatch):
    """MLFLOW_TRACKING_URI (a team server) wins over the project's store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.invalid:5000")
    assert tracking.tracking_uri(paths) == "http://mlflow.example.invalid:5000"


def test_setup_creates_experiment_with_local_artifact_location(paths):
    """setup creates "clean-vs-messy" with artifacts under <root>/mlruns/artifacts (a file URI)."""
    experiment_id = tracking.open_experiment(paths)
    assert (paths.mlruns / "mlflow.db").is_file()
    experiment = MlflowClient().get_experiment(experiment_id)
    assert experiment.name == "clean-vs-messy" == tracking.EXPERIMENT
    assert experiment.artifact_location == (paths.root / "mlruns" / "artifacts").as_uri()
    assert experiment.artifact_location.startswith("file://")
    assert mlflow.get_tracking_uri() == tracking.tracking_uri(paths)


def test_setup_twice_returns_the_same_experiment(paths):
    """A second setup finds the existing experiment instead of creating another."""
    first = tracking.open_experiment(paths)
    second = tracking.open_experiment(paths)
    assert first == second
    names = [e.name for e in MlflowClient().search_experiments()]
    assert names.count("clean-vs-messy") == 1


def test_setup_honours_experiment_name_env(paths, monkeypatch):
    """MLFLOW_EXPERIMENT_NAME picks a different experiment name."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "other-experiment")
    experiment_id = tracking.open_experiment(paths)
    assert MlflowClient().get_experiment(experiment_id).name == "other-experiment"


def test_runs_land_in_the_project_store(paths):
    """After setup, a run started with the fluent API is stored in the project's experiment."""
    experiment_id = tracking.open_experiment(paths)
    run_id = log_dummy_model(paths.root)
    run = MlflowClient().get_run(run_id)
    assert run.info.experiment_id == experiment_id
    assert run.info.artifact_uri.startswith((paths.mlruns / "artifacts").as_uri())
    assert (paths.mlruns / "artifacts").is_dir()


def test_server_runs_link_names_the_servers_runs_table_without_the_login(paths, monkeypatch):
    """What evaluate prints after a run on a tracking server: the runs table (machine-learning
    view) of the run's experiment, without a login the URI carries; nothing for a local store."""
    experiment_id = tracking.open_experiment(paths)
    run_id = log_dummy_model(paths.root)
    assert tracking.server_runs_link(run_id) is None  # the project's own SQLite store
    # As if connected to a server (MlflowClient still reads the run from the local store)
    monkeypatch.setattr(tracking.mlflow, "get_tracking_uri", lambda: "https://alice:secret@mlflow.example.invalid:5050/")
    assert tracking.server_runs_link(run_id) == (
        f"https://mlflow.example.invalid:5050/#/experiments/{experiment_id}/runs?workflowType=machine_learning")


# ---------------------------------------------------------------- promotion rule


@pytest.mark.parametrize(
    ("accuracy", "min_accuracy", "comparison", "promoted", "words"),
    [
        (0.70, 0.80, None, False, ["not promoted", "min_accuracy", "0.7000", "< evaluate.min_accuracy 0.8"]),
        (0.70, 0.80, ("1", 20, 5), False, ["not promoted", "min_accuracy"]),  # min wins over a worse production
        (0.85, 0.80, None, True, ["promoted", "first production version"]),
        (0.80, 0.80, None, True, ["first production version"]),  # exactly the minimum is enough
        (0.90, 0.80, ("1", 18, 18), True, ["promoted", "on the 20 of 30 test images that production version 1 never "
                                                       "trained on, this version got 18 right (90.0%), version 1 18"]),
        (0.95, 0.80, ("2", 19, 18), True, ["promoted", "19 right"]),
        (0.85, 0.80, ("3", 17, 18), False, ["not promoted", "version 3 18 (90.0%)"]),
    ],
)
def test_decide_production(accuracy, min_accuracy, comparison, promoted, words):
    """Below min never promotes; no production yet promotes; otherwise the candidate must get at
    least as many of the shared test images right as production (a tie promotes)."""
    ok, reason = tracking.decide_production(accuracy, min_accuracy, comparison and versus(*comparison))
    assert ok is promoted
    assert reason.startswith("promoted" if promoted else "not promoted")
    for word in words:
        assert word in reason


def test_no_shared_test_image_never_promotes():
    """When production trained on every one of the candidate's test images, nothing is compared
    and nothing is promoted: the reason says why."""
    ok, reason = tracking.decide_production(1.0, 0.8, versus("4", 0, 0, n_unseen=0))
    assert not ok and "all 30 test images were in production version 4's training data" in reason


def test_incomparable_production_never_promotes_and_says_why():
    """A production version with other classes (or no record of its training images) cannot be
    scored on the same images: the candidate is registered but not promoted, with the reason."""
    why = "production version 2 tells ['a', 'b', 'c'] apart, this version ['clean', 'messy']: they cannot be compared"
    comparison = tracking.Comparison("2", n_test=30, n_unseen=0, candidate_correct=0, production_correct=0,
                                     incomparable=why, candidate_family="sample", production_family="sample")
    ok, reason = tracking.decide_production(0.95, 0.8, comparison)
    assert not ok and reason == f"not promoted: {why}"


@pytest.mark.parametrize("production_family", ["sample", "folder:../other-photos", ""])
def test_promotion_never_crosses_data_families(production_family):
    """A candidate trained on other data than production (another kind, another source, or a
    production version that does not record its data) is never promoted, however well it scores
    on its own test images; the one-line reason names both families, or says what to do."""
    comparison = tracking.Comparison("1", n_test=20, n_unseen=20, candidate_correct=20, production_correct=10,
                                     candidate_family="folder:../shared/datasets/clean-messy",
                                     production_family=production_family)
    ok, reason = tracking.decide_production(1.0, 0.8, comparison)
    assert not ok and "\n" not in reason
    if production_family:
        assert reason.startswith(f"not promoted: production version 1 was trained on {production_family}, this "
                                 "version on folder:../shared/datasets/clean-messy: promotion never crosses kinds")
    else:
        assert reason == ("not promoted: production version 1 does not record which data it was trained on, so the "
                          "two are not compared (to serve this version, move the alias by hand)")


def test_a_production_version_no_server_loads_is_replaced_within_its_family():
    """A production version registered before models took photo bytes is no longer served: a
    candidate of the same family that reaches min_accuracy replaces it, without a comparison; below
    min_accuracy, or of another family, it does not."""
    why = "production version 1 was registered before models took photo bytes and no server loads it any more"
    comparison = tracking.Comparison("1", n_test=20, n_unseen=0, candidate_correct=0, production_correct=0,
                                     candidate_family="sample", production_family="sample", unservable=why)
    assert tracking.decide_production(0.9, 0.8, comparison) == (
        True, f"promoted: test accuracy 0.9000 >= evaluate.min_accuracy 0.8; {why}")
    assert tracking.decide_production(0.7, 0.8, comparison)[0] is False
    other = tracking.Comparison(**{**comparison.__dict__, "production_family": "folder:photos"})
    assert tracking.decide_production(0.9, 0.8, other)[0] is False


def test_version_family_from_tags():
    """A version's family: its data_family tag, else what the data_kind and data_source tags of
    versions registered before that tag imply."""
    assert tracking.version_family({"data_family": "zip:rooms.zip"}) == "zip:rooms.zip"
    assert tracking.version_family({"data_kind": "sample", "data_source": "data/sample"}) == "sample"
    assert tracking.version_family({"data_kind": "folder", "data_source": "../photos/"}) == "folder:../photos"
    assert tracking.version_family({"git_commit": "abc"}) == ""


# ---------------------------------------------------------------- registry


def test_first_version_gets_staging_and_production(paths):
    """The first version above min_accuracy is registered with both aliases, tags, the decision
    and the model card in its description, and the registered model gets a description."""
    tracking.open_experiment(paths)
    promotion = register(paths.root, 0.9)
    assert str(promotion.version) == "1"
    assert promotion.production is True and promotion.staging is True
    assert "first production version" in promotion.reason
    version = MlflowClient().get_model_version("m", "1")  # search results carry no aliases
    assert set(version.aliases) == {"staging", "production"}
    assert float(version.tags["test_accuracy"]) == 0.9
    assert version.tags == {"a": "b", "test_accuracy": "0.9"}  # few tags: the registry's table shows them all
    # Plain text first: the registry's versions table shows a description's markdown raw.
    assert version.description == f"{promotion.reason}\n\n# Model card: m\n"
    assert "`production`" in MlflowClient().get_registered_model("m").description


def test_versions_move_aliases_by_comparison(paths):
    """production moves only to a version at least as good on the shared images; staging to every
    version that reaches min_accuracy."""
    tracking.open_experiment(paths)
    first = register(paths.root, 0.9)
    assert aliases(first.version) == {"staging", "production"}

    worse = register(paths.root, 0.95, comparison=versus("1", 16, 18))
    assert str(worse.version) == "2" and worse.production is False
    assert aliases(1) == {"production"} and aliases(2) == {"staging"}
    assert "version 1 18" in MlflowClient().get_model_version("m", "2").description

    better = register(paths.root, 0.85, comparison=versus("1", 19, 18))
    assert better.production is True
    assert aliases(1) == set() and aliases(2) == set() and aliases(3) == {"staging", "production"}


def test_version_below_min_accuracy_gets_no_alias(paths):
    """Below evaluate.min_accuracy a version is registered (its card says why) but takes neither
    alias: staging keeps pointing at the last acceptable candidate."""
    tracking.open_experiment(paths)
    low = register(paths.root, 0.5, min_accuracy=0.8)
    assert low.production is False and low.staging is False
    assert aliases(low.version) == set()
    assert tracking.alias_version(MlflowClient(), "m", "production") is None
    assert "min_accuracy" in MlflowClient().get_model_version("m", "1").description

    register(paths.root, 0.9, min_accuracy=0.8)
    register(paths.root, 0.7, min_accuracy=0.8, comparison=versus("2", 20, 10))
    assert aliases(2) == {"staging", "production"} and aliases(3) == set()


def test_alias_version_missing_model_is_none(paths):
    """alias_version answers None for a model or alias that does not exist."""
    tracking.open_experiment(paths)
    assert tracking.alias_version(MlflowClient(), "no-such-model", "production") is None


def test_model_uri_for_uses_lower_case_alias():
    """Stages resolve to alias URIs, whatever the case they are given in."""
    assert tracking.model_uri_for("m", "Production") == "models:/m@production"
    assert tracking.model_uri_for("clean-vs-messy", "staging") == "models:/clean-vs-messy@staging"


# ---------------------------------------------------------------- run hand-off


def test_run_info_round_trip(tmp_path):
    """ModelSpec saved to JSON loads back equal, lists and ints included."""
    info = ModelSpec(class_names=["clean", "messy"], image_size=64)
    path = tmp_path / "run.json"
    info.save(path)
    loaded = ModelSpec.load(path)
    assert loaded == info
    assert loaded.class_names == ["clean", "messy"]
    assert isinstance(loaded.image_size, int)


def test_run_info_missing_file_says_run_train(tmp_path):
    """A missing run.json is a UserError telling the user to run `cleanmessy train`."""
    with pytest.raises(UserError, match="cleanmessy train") as excinfo:
        ModelSpec.load(tmp_path / "pipeline" / "run.json")
    assert "run.json" in str(excinfo.value)


# ---------------------------------------------------------------- lineage


def git(root: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "tracked.txt").write_text("one\n")
    git(root, "add", "tracked.txt")
    git(root, "commit", "-q", "-m", "first")
    return root


def test_lineage_tags_in_git_repo(git_repo):
    """In a clean checkout the tags carry HEAD's commit, dirty=false, and the data fingerprint."""
    tags = lineage_tags(git_repo, "f" * 64, "data/sample")
    head = git(git_repo, "rev-parse", "HEAD")
    assert len(head) == 40
    assert tags["git_commit"] == head
    assert tags["mlflow.source.git.commit"] == head
    assert tags["git_dirty"] == "false"
    assert tags["data_manifest_sha256"] == "f" * 64
    assert tags["data_source"] == "data/sample"
    assert "dvc_exp_name" not in tags


def test_lineage_tags_dirty_when_tracked_file_changed(git_repo):
    """A modified tracked file makes git_dirty "true"; an untracked one does not."""
    (git_repo / "untracked.txt").write_text("new\n")
    assert lineage_tags(git_repo, "x", "s")["git_dirty"] == "false"
    (git_repo / "tracked.txt").write_text("two\n")
    assert lineage_tags(git_repo, "x", "s")["git_dirty"] == "true"


def test_lineage_tags_not_dirty_for_params_lock_and_outputs(git_repo):
    """params.yaml (logged as params), dvc.lock and pipeline outputs change on every run and
    experiment: they do not make the code dirty."""
    for name in ("params.yaml", "dvc.lock", "pipeline/metrics.json", "data/ingest_report.json"):
        (git_repo / name).parent.mkdir(exist_ok=True)
        (git_repo / name).write_text("one\n")
    git(git_repo, "add", "-A")
    git(git_repo, "commit", "-q", "-m", "outputs")
    for name in ("params.yaml", "dvc.lock", "pipeline/metrics.json", "data/ingest_report.json"):
        (git_repo / name).write_text("two\n")
    assert lineage_tags(git_repo, "x", "s")["git_dirty"] == "false"


def test_run_name_is_the_experiment_or_what_and_when():
    from datetime import datetime

    assert run_name("lr-test", "seed_cnn", 64, datetime(2026, 11, 27, 12, 30, 5)) == "lr-test"
    assert run_name(None, "mobilenet_v2", 224, datetime(2026, 11, 27, 12, 30, 5)) == "mobilenet_v2-224px-1127-123005"


def test_lineage_tags_dvc_exp_name(git_repo, monkeypatch):
    """DVC_EXP_NAME (set by `dvc exp run`) becomes the dvc_exp_name tag."""
    monkeypatch.setenv("DVC_EXP_NAME", "lr-test")
    assert lineage_tags(git_repo, "x", "s")["dvc_exp_name"] == "lr-test"


def test_lineage_tags_outside_git(tmp_path, monkeypatch):
    """Outside any git repository the commit is "none" and no MLflow git tag is set."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # don't find a repo above tmp
    root = tmp_path / "plain"
    root.mkdir()
    tags = lineage_tags(root, "abc", "src")
    assert tags["git_commit"] == "none"
    assert tags["git_dirty"] == "false"
    assert "mlflow.source.git.commit" not in tags
    assert tags["data_manifest_sha256"] == "abc"


# ---------------------------------------------------------------- requirements


def test_pip_requirements_pin_installed_versions():
    """keras and mlflow are pinned with == to the installed versions; no package appears twice."""
    from cleanmessy.pyfunc import pip_requirements

    reqs = pip_requirements()
    pins = dict(r.split("==", 1) for r in reqs)
    assert all("==" in r for r in reqs)
    assert pins["keras"] == metadata.version("keras")
    assert pins["mlflow"] == metadata.version("mlflow")
    assert pins["numpy"] == metadata.version("numpy")
    assert len(pins) == len(reqs)


def test_runs_a_killed_process_left_running_are_marked_killed_in_one_line(paths, caplog):
    """SIGKILL leaves a run RUNNING forever: the next train or evaluate marks it KILLED (one line
    each), by the PID and host recorded on it. Runs of live processes, of other hosts and without
    the tags are left alone."""
    import socket

    experiment_id = tracking.open_experiment(paths)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a PID no process has now
    client = MlflowClient()
    host = socket.gethostname()
    runs = {name: client.create_run(experiment_id, run_name=name, tags=tags).info.run_id for name, tags in {
        "killed": {tracking.PID_TAG: str(dead.pid), tracking.HOST_TAG: host},
        "alive": {tracking.PID_TAG: str(os.getpid()), tracking.HOST_TAG: host},
        "elsewhere": {tracking.PID_TAG: str(dead.pid), tracking.HOST_TAG: f"not-{host}"},
        "untagged": {},
    }.items()}
    with caplog.at_level("WARNING"):
        assert tracking.reap_dead_runs(experiment_id, "train") == [runs["killed"]]
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"killed": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING", "untagged": "RUNNING"}
    (line,) = [r.getMessage() for r in caplog.records if "KILLED" in r.getMessage()]
    assert line.startswith(f"train: MLflow run killed ({runs['killed']}) was left RUNNING by process {dead.pid}")
    assert tracking.reap_dead_runs(experiment_id, "evaluate") == []  # once only


def test_a_version_whose_files_are_gone_says_so_in_one_line(paths):
    """The store's artifacts folder lost the version's files (deleted by hand, a disk cleaned): not
    MLflow's `No such artifact: ''` but which version, and what to do."""
    import shutil

    tracking.open_experiment(paths)
    promotion = register(paths.root, 0.9)
    uri = f"models:/m/{promotion.version}"
    run_id = MlflowClient().get_model_version("m", promotion.version).run_id
    shutil.rmtree(Path(MlflowClient().get_run(run_id).info.artifact_uri.removeprefix("file://")))
    with pytest.raises(UserError) as error:
        tracking.download_version(uri)
    message = str(error.value)
    assert message.startswith(f"{uri}'s files are gone from the MLflow store") and "No such artifact" not in message
    assert "\n" not in message and "register it again" in message
