"""One console script: `cleanmessy <command>`. Stage commands are what dvc.yaml runs."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from cleanmessy import interrupts
from cleanmessy.console import filter_stderr, quiet_environment, setup_logging
from cleanmessy.errors import UserError
from cleanmessy.images import DEFAULT_MAX_PIXELS

log = logging.getLogger("cleanmessy.cli")

quiet_environment()  # before TensorFlow, MLflow or Gradio is imported

# The pipeline's stages, as dvc.yaml runs them (`cleanmessy <stage>`).
STAGES = {
    "ingest": "read the source (params: ingest.*) into data/images and data/manifest.csv",
    "split": "stratified train/val/test split into data/splits/",
    "train": "train the classifier (params: train.*), tracked in MLflow",
    "evaluate": "test metrics, log and register the model, promote by alias",
    "plot": "figures into pipeline/plots/, logged to the MLflow run",
}


def _run_stage(args: argparse.Namespace) -> None:
    from cleanmessy.stages import run_stage

    run_stage(args.command)


def _cv(args: argparse.Namespace) -> None:
    from cleanmessy.params import load_params
    from cleanmessy.project import project_paths
    from cleanmessy.stages import check_store

    paths = project_paths()
    params = load_params(paths.params)
    check_store(paths)  # before TensorFlow loads
    from cleanmessy import crossval

    crossval.main(paths, params)


def _exp_flags(args: argparse.Namespace) -> None:
    from cleanmessy.params import exp_flags, load_changes
    from cleanmessy.project import project_paths

    changes, _ = load_changes(args.file, project_paths().params)
    print(" ".join(exp_flags(changes)))


def _exp_name(args: argparse.Namespace) -> None:
    from cleanmessy.lineage import experiments_on_commit
    from cleanmessy.params import apply_changes, exp_name, load_changes, parse_set, with_changes
    from cleanmessy.project import project_paths

    paths = project_paths()
    base = load_changes(args.file, paths.params)[0] if args.file else {}
    experiments = [[text] for text in args.changes] if args.each else [args.changes]
    names: dict[str, str] = {}  # name -> what it names
    for sets in experiments:
        changes, where = base, " ".join([str(args.file or ""), *(f"-S {text}" for text in sets)]).strip()
        for text in sets:
            changes = with_changes(changes, parse_set(text))
        name = exp_name(changes, apply_changes(changes, paths.params, where or str(paths.params)))
        if name in names:
            raise UserError(f"`{names[name]}` and `{where}` would both be named {name}: change one of them")
        names[name] = where
    commit, taken = experiments_on_commit(paths.root)
    if clash := [name for name in names if name in taken]:
        it = "it" if len(clash) == 1 else "them"
        raise UserError(f"{'experiment' if len(clash) == 1 else 'experiments'} {', '.join(clash)} already ran on "
                        f"this commit ({commit[:7]}) and `dvc exp show` compares {it}; to run {it} again, "
                        f"`dvc exp remove {' '.join(clash)}` first")
    if names:
        print("\n".join(names))


def _connect_and_choose_model(args: argparse.Namespace) -> str:
    """Connect MLflow to the configured store and return the model to load: `--model-uri` as
    given, else the registered model at `--stage` (`models:/name@stage`), named --model-name, else
    the project's evaluate.model_name, else the default."""
    from cleanmessy.stages import check_tracking_server

    check_tracking_server(os.environ.get("MLFLOW_TRACKING_URI"))  # before MLflow retries for minutes
    from cleanmessy import tracking
    from cleanmessy.params import EvaluateParams, load_params
    from cleanmessy.project import project_paths

    tracking.connect()
    if args.model_uri:
        return args.model_uri
    name = args.model_name
    if not name:
        try:
            name = load_params(project_paths().params).evaluate.model_name
        except UserError:  # outside a project (e.g. against a remote MLFLOW_TRACKING_URI)
            name = EvaluateParams().model_name
    return tracking.model_uri_for(name, args.stage)


def _check(args: argparse.Namespace) -> None:
    """What `dvc repro` would choke on before any stage runs: params.yaml (an alias bomb makes DVC
    itself take gigabytes) and a named pipe or device in the folder source or data/feedback (DVC
    waits on it forever while hashing); and removes what a killed ingest left (its temporary
    outputs), unless an ingest is running. Silent when all is well, one line when not."""
    from cleanmessy.params import load_params
    from cleanmessy.project import project_paths
    from cleanmessy.sample import is_recipe
    from cleanmessy.stages.ingest import walk_folder

    paths = project_paths()
    source = load_params(paths.params).ingest.source
    folders = [paths.root / "data" / "feedback"]
    if not source.startswith(("http://", "https://")):
        path = Path(source) if Path(source).is_absolute() else paths.root / source
        if path.is_dir() and not is_recipe(path):
            folders.append(path)
    for folder in folders:
        if folder.is_dir():
            walk_folder(folder)
    from cleanmessy.stages.ingest import remove_leftovers

    for name in remove_leftovers(paths):  # SIGKILL: ingest could not clean up
        print(f"cleanmessy check: removed {name}, left by an ingest that was killed", file=sys.stderr)


def _predict(args: argparse.Namespace) -> int:
    from cleanmessy.serving.predict import run

    return run(args.paths, lambda: _connect_and_choose_model(args), args.out, args.batch_size)


def _monitor(args: argparse.Namespace) -> int:
    from cleanmessy import monitor

    photos = None
    if args.photos is not None:
        if not args.photos.is_dir():
            raise UserError(f"--photos {args.photos}: not a folder")
        from cleanmessy.serving.predict import collect

        photos = (args.photos, collect([args.photos]))
    return monitor.run(args.log, photos, lambda: _connect_and_choose_model(args), args.model_uri, args.last,
                       args.fail_on_drift)


def _request_log(args: argparse.Namespace):
    """The servers' request log: --request-log, else the project's data/served/requests.jsonl
    (none outside a project); None with --no-request-log."""
    from cleanmessy import requestlog

    if args.no_request_log:
        return None
    if not 0.001 <= args.request_log_mb <= 100_000:  # NaN fails every comparison
        raise UserError(f"--request-log-mb must be 0.001 to 100000, not {args.request_log_mb:g}")
    path = args.request_log
    if path is None:
        try:
            from cleanmessy.project import find_root

            path = find_root() / requestlog.DEFAULT_PATH
        except UserError:
            return None
    if path.exists() and not path.is_file():
        raise UserError(f"--request-log {path}: not a file")
    return requestlog.RequestLog(path.resolve(), int(args.request_log_mb * 1024 * 1024))


def _add_request_log_options(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--request-log", type=Path, metavar="FILE",
                       help="append a JSON line per classified photo here (default: data/served/requests.jsonl "
                            "in the project; never the photo itself)")
    which.add_argument("--no-request-log", action="store_true", help="log no requests")
    parser.add_argument("--request-log-mb", type=float, default=20, metavar="MB",
                        help="rotate the log past this size; the log and its predecessor are kept (default 20)")


def _serve(args: argparse.Namespace) -> None:
    from cleanmessy.malloc import give_back_freed_memory

    give_back_freed_memory()  # before TensorFlow and Gradio start their threads
    from cleanmessy.serving.app import serve

    if args.auth:
        log.warning("--auth shows the password to anyone who can run `ps` here; prefer CLEANMESSY_AUTH=user:password")
    if not (args.poll == 0 or 0.5 <= args.poll <= 86_400):  # NaN fails every comparison
        raise UserError(f"--poll must be 0 (never) or 0.5 to 86400 seconds, not {args.poll:g}")
    request_log = _request_log(args)
    serve(_connect_and_choose_model(args), "0.0.0.0" if args.public else args.host, args.port, args.auth,
          args.max_pixels, args.upload_ttl, args.poll, request_log, feedback=args.feedback)


DOCKER_PORT = 8080  # MLflow's image: nginx in front of the scoring server (mlflow/models/container)


def _docker_unavailable() -> str:
    """Why no image can be built here ("" when a Docker daemon answers `docker info`)."""
    import shutil

    docker = shutil.which("docker")
    if docker is None:
        return "`docker` is not installed here"
    try:
        info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode:
        why = next((line.strip() for line in info.stderr.splitlines() if line.strip()), f"status {info.returncode}")
        return f"no Docker daemon answers (`docker info`: {why.removeprefix('ERROR: ')})"
    return ""


def _docker(args: argparse.Namespace) -> int:
    """Write the Docker build context of the registered model at --stage into --dir with `mlflow
    models generate-dockerfile` (on the project's store, offline: --env-manager local), replacing a
    context written before; then build it as --tag where a Docker daemon answers, else say in one
    line why the build was skipped and how to build it elsewhere."""
    import shutil
    import tempfile

    from cleanmessy import tracking
    from cleanmessy.project import project_paths

    uri = _connect_and_choose_model(args)
    # One line, not MLflow's traceback, when the registry has no such version or it takes no photo bytes.
    _require_photo_classifier(tracking.resolve_version(uri).uri)
    out = (args.dir or project_paths().root / "build" / "docker").absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "Dockerfile").is_file())):
        raise UserError(f"{out} exists and is not a Docker context this command wrote: choose another --dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # never half a context in --dir
    try:
        generate = subprocess.run([sys.executable, "-m", "mlflow", "models", "generate-dockerfile", "-m", uri, "-d",
                                   str(staging), "--env-manager", "local"], capture_output=True, text=True,
                                  env={**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri()})
        if generate.returncode:
            last = [line for line in generate.stderr.splitlines() if line.strip()][-1:] or ["no message"]
            raise UserError(f"`mlflow models generate-dockerfile -m {uri}` failed: {last[0].strip()}")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta = dict(line.split(": ", 1) for line in (out / "model_dir" / "registered_model_meta").read_text().splitlines()
                if ": " in line)
    version = f"{meta.get('model_name', uri)} version {meta.get('model_version', '?')}"
    print(f"Docker context for {version} ({uri}) in {out}", flush=True)
    run_it = f"docker run -p {DOCKER_PORT}:{DOCKER_PORT} {args.tag}"
    if why := _docker_unavailable():
        print(f"Docker image not built: {why}; where Docker runs: docker build -t {args.tag} {out} && {run_it}")
        return 0
    if subprocess.run(["docker", "build", "-t", args.tag, str(out)]).returncode:
        raise UserError(f"`docker build -t {args.tag} {out}` failed: its messages are above")
    print(f"built image {args.tag}: `{run_it}` serves it on http://127.0.0.1:{DOCKER_PORT}/invocations")
    return 0


def _ui(args: argparse.Namespace) -> int:
    """Run `mlflow ui` on the project's store (without MLflow's job runner) and print the link to
    the experiment's runs once it answers; Ctrl-C or SIGTERM stops it. Returns its exit status."""
    from cleanmessy import servers
    from cleanmessy.project import project_paths

    paths = project_paths()
    if os.environ.get("MLFLOW_TRACKING_URI"):
        raise UserError(f"MLFLOW_TRACKING_URI is set ({os.environ['MLFLOW_TRACKING_URI']}): open that server's UI; "
                        "`cleanmessy ui` serves the project's own store")

    def prepare(base: str) -> servers.ChildServer:
        from cleanmessy import tracking

        experiment_id = tracking.open_experiment(paths)  # so the link works before the first run
        store = tracking.tracking_uri(paths)
        print(f"MLflow UI for {store}: starting on {base} (Ctrl-C stops it)", flush=True)
        return servers.ChildServer([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host",
                                    args.host, "--port", str(args.port), "--workers", "1"],
                                   {**os.environ, **servers.NO_JOB_RUNNER}, f"{base}/health",
                                   f"open {tracking.runs_page(base, experiment_id)}")

    return servers.run_server("mlflow ui", args.host, args.port, "ui", "another `make ui`, or a tracking server?",
                              prepare)


API_TIMEOUT = 120  # seconds a request may take: MAX_ROWS photos of MAX_PHOTO_BYTES on a big backbone, on CPU


def _api(args: argparse.Namespace) -> int:
    """Run MLflow's scoring server (the app `mlflow models serve` runs, behind the byte budget of
    serving/rest.py) for the registered version that --stage's alias (or --model-uri) names now,
    on the configured store, offline; print its URL and version once /ping answers. The alias is
    resolved and the version downloaded here, once, into a temporary folder removed when the server
    stops: a moved alias is served after a restart. TensorFlow loads in the server, not here.
    Returns the server's exit status."""
    import tempfile

    from cleanmessy import requestlog, servers
    from cleanmessy.serving import rest

    if not 1 <= args.workers <= 64:
        raise UserError(f"--workers must be 1 to 64, not {args.workers}")
    if not 2 <= args.max_in_flight <= 1024:
        raise UserError(f"--max-in-flight must be 2 to 1024, not {args.max_in_flight}")
    request_log = _request_log(args)

    with tempfile.TemporaryDirectory(prefix="cleanmessy-api-") as downloads:
        def prepare(base: str) -> servers.ChildServer:
            import mlflow.artifacts
            from mlflow.exceptions import MlflowException

            from cleanmessy import tracking

            uri = _connect_and_choose_model(args)
            version = tracking.resolve_version(uri)  # the exact version, now: `models:/name/N`
            _require_photo_classifier(version.uri)
            at = ("" if tracking.names_exact_version(uri)
                  else f" ({uri}, resolved at start: restart to serve a moved alias)")
            print(f"REST API for {version.uri}: starting on {base} (Ctrl-C stops it)", flush=True)
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=version.uri, dst_path=downloads)
            except (MlflowException, OSError) as exc:
                raise UserError(tracking.download_error(version.uri, exc)) from None
            env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
                   requestlog.ENV_MODEL: f"{version.name}/{version.version}",
                   # what `mlflow models serve --env-manager local --timeout` gives its web server
                   "__pyfunc_model_path__": Path(local).resolve().as_uri(),
                   "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(API_TIMEOUT)}
            env.pop(requestlog.ENV_PATH, None)
            if request_log is not None:  # the registered model, in the server's workers, appends to it
                env.update({requestlog.ENV_PATH: str(request_log.path),
                            requestlog.ENV_MAX_MB: str(request_log.max_bytes / 1024 / 1024)})
            host = args.host.strip("[]")
            # Admission control: past --max-in-flight open connections a worker answers 503 at once
            # (uvicorn's --limit-concurrency); past its byte budget too (rest.ByteBudget).
            return servers.ChildServer(
                [sys.executable, "-m", "uvicorn", "--host", host, "--port", str(args.port), "--workers",
                 str(args.workers), "--limit-concurrency", str(args.max_in_flight), f"{rest.__name__}:app"],
                env, f"{base}/ping", f"serving {version.uri} on {base}/invocations{at}")

        return servers.run_server("the REST API server (uvicorn)", args.host, args.port, "api",
                                  "another `make api`, or another server?", prepare)


def _require_photo_classifier(uri: str) -> None:
    """One line, before the server starts, when the version `uri` is not a photo classifier that
    takes photo bytes (a version registered before that is a plain Keras model)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from cleanmessy.pyfunc import check_photo_classifier

    try:  # the MLmodel file only: the server downloads the model itself
        flavors = Model.load(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/MLmodel")).flavors
    except (MlflowException, OSError) as exc:
        from cleanmessy.tracking import download_error

        raise UserError(download_error(uri, exc)) from None
    check_photo_classifier(flavors, uri)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--stage", default="production",
                       help="registry stage (an MLflow alias) to load: production (default), staging, ...")
    which.add_argument("--model-uri", help="a registered model URI instead: models:/clean-vs-messy/3, "
                                           "models:/clean-vs-messy@staging, models:/clean-vs-messy/Production")
    parser.add_argument("--model-name", help="registered model name (default: evaluate.model_name's default, "
                                             "clean-vs-messy)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleanmessy", description="Clean vs Messy room classifier pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in STAGES.items():
        sub.add_parser(name, help=help_text, description=help_text).set_defaults(func=_run_stage)
    cv_help = "repeated stratified k-fold cross-validation of train.* (params: cv.*) into pipeline/cv.json"
    sub.add_parser("cv", help=cv_help, description=cv_help + "; not a DVC stage: run it after ingest"
                   ).set_defaults(func=_cv)

    check_help = "check params.yaml and the source before `dvc repro` reads them (make run does)"
    sub.add_parser("check", help=check_help, description=check_help + ": one line for a params file DVC would "
                   "choke on, or a named pipe or device in a folder source, which DVC would wait on forever"
                   ).set_defaults(func=_check)

    predict = sub.add_parser("predict", help="classify photos with a registered model",
                             description="Classify image files (folders are searched recursively) with the "
                                         "model the MLflow registry holds at a stage. Prints a table; "
                                         "--out writes it as CSV. Exit status 1 if any file failed.")
    predict.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    _add_model_options(predict)
    predict.add_argument("--out", type=Path, help="write the predictions to this CSV file")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.set_defaults(func=_predict)

    serve = sub.add_parser("serve", help="the Gradio app for a registered model",
                           description="Serve the model the MLflow registry holds at a stage as a Gradio app.")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--public", action="store_true", help="bind 0.0.0.0: reachable from other machines")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--auth", help="user:password for a login page; better set CLEANMESSY_AUTH, which `ps` "
                                      "does not show")
    serve.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest photo accepted, in pixels")
    serve.add_argument("--upload-ttl", type=int, default=900, metavar="SECONDS",
                       help="delete uploaded photos this long after they arrive (default 900)")
    serve.add_argument("--poll", type=float, default=5.0, metavar="SECONDS",
                       help="check the stage's alias this often and serve the version it moves to (default 5; "
                            "0: never)")
    _add_request_log_options(serve)
    serve.add_argument("--feedback", action="store_true",
                       help="offer \"Wrong? It is ...\" corrections (and POST /feedback); corrected photos are kept "
                            "in the project's data/feedback for the next `dvc repro` (default: off)")
    serve.set_defaults(func=_serve)

    docker = sub.add_parser("docker", help="a Docker image of a registered model (MLflow's scoring server)",
                            description="Write the Docker build context of the model the MLflow registry holds "
                                        "at a stage (`mlflow models generate-dockerfile`), then build the image "
                                        f"where a Docker daemon answers. The image serves on port {DOCKER_PORT}.")
    _add_model_options(docker)
    docker.add_argument("--dir", type=Path, help="the build context's folder, replaced if this command wrote it "
                                                 "(default: build/docker in the project)")
    docker.add_argument("--tag", default="clean-vs-messy", help="the image's name (default clean-vs-messy)")
    docker.set_defaults(func=_docker)

    flags = sub.add_parser("exp-flags", help="print a params changes file as `dvc exp run -S` flags",
                           description="Check a params changes file (e.g. experiments/real-photos.yaml) "
                                       "against params.yaml and print it as `-S key=value` flags: "
                                       "dvc exp run $(cleanmessy exp-flags FILE)")
    flags.add_argument("file", type=Path, metavar="FILE")
    flags.set_defaults(func=_exp_flags)

    name = sub.add_parser("exp-name", help="print the name `make real` and `make grid` give an experiment",
                          description="Check params changes (FILE's, e.g. experiments/real-photos.yaml, and "
                                      "the -S ones, as `dvc exp run -S` takes them) against params.yaml and "
                                      "print the experiment's name, after what it changes: `lr-0.002` for "
                                      "-S train.learning_rate=0.002 (params.exp_name has the rule). Refuses a "
                                      "name that an experiment of the current commit already has.")
    name.add_argument("file", type=Path, nargs="?", metavar="FILE")
    name.add_argument("-S", "--set-param", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                      help="a params change, as `dvc exp run -S` takes it (repeatable)")
    name.add_argument("--each", action="store_true",
                      help="each -S change is an experiment of its own (a grid): one name a line")
    name.set_defaults(func=_exp_name)

    ui = sub.add_parser("ui", help="the MLflow UI on the project's store, with a link to the runs",
                        description="Start `mlflow ui` on the project's MLflow store and, once it answers, "
                                    "print the link that opens the experiment on its runs table (MLflow 3's "
                                    "UI otherwise opens its GenAI view). Ctrl-C stops it.")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=_ui)

    api = sub.add_parser("api", help="the REST API: MLflow's scoring server for a registered model",
                         description="Resolve the stage's alias to its version now, download it, then serve it "
                                     "with MLflow's scoring server (the app `mlflow models serve` runs, offline) "
                                     "and print its URL once /ping answers. POST photos, base64 in "
                                     "dataframe_split, to /invocations (at most 64 MB a request). A moved alias "
                                     "is served after a restart. Ctrl-C stops it.")
    _add_model_options(api)
    api.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=5001)
    api.add_argument("--workers", type=int, default=1, help="server processes, each loading the model (default 1)")
    api.add_argument("--max-in-flight", type=int, default=8, metavar="N",
                     help="open connections a worker takes; past them it answers 503 at once: busy, retry "
                          "(default 8)")
    _add_request_log_options(api)
    api.set_defaults(func=_api)

    watch = sub.add_parser(
        "monitor", help="compare served photos with the model's training data; log a monitoring run",
        description="Compare the request log's recent requests (the model that served them: the newest line's, or "
                    "--model-uri's version), or a folder of photos classified now, with the training data of the "
                    "model: the unfamiliar-photo rate, the label mix and the photos' features. Logs a run to the "
                    "MLflow experiment clean-vs-messy-monitoring and prints a one-line verdict. Drift: a check's "
                    "p-value below 0.01 / the checks run; under 20 photos: not enough data.")
    source = watch.add_mutually_exclusive_group()
    source.add_argument("--log", type=Path, help="the request log (default: data/served/requests.jsonl in the "
                                                 "project, and its rotated predecessor)")
    source.add_argument("--photos", type=Path, metavar="DIR", help="a folder of photos instead, classified with the "
                                                                   "model at --stage (or --model-uri)")
    _add_model_options(watch)
    watch.add_argument("--last", type=int, default=1000, metavar="N",
                       help="the most recent N requests (the N newest photos with --photos; default 1000)")
    watch.add_argument("--fail-on-drift", action="store_true", help="exit with status 1 when the verdict is drift")
    watch.set_defaults(func=_monitor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    interrupts.install()
    # every other command may load TensorFlow (ui runs mlflow)
    if args.func not in (_exp_flags, _exp_name, _ui, _check):
        filter_stderr()
    try:
        status = args.func(args)
    except UserError as exc:
        print(f"cleanmessy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except interrupts.Terminated:
        print(f"cleanmessy {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"cleanmessy {args.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
