"""One console script: `cleanmessy <command>`. Stage commands are what dvc.yaml runs."""

from __future__ import annotations

import argparse
import logging
import os
import signal
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


def _predict(args: argparse.Namespace) -> int:
    from cleanmessy.serving.predict import run

    return run(args.paths, lambda: _connect_and_choose_model(args), args.out, args.batch_size)


def _serve(args: argparse.Namespace) -> None:
    from cleanmessy.serving.app import serve

    if args.auth:
        log.warning("--auth shows the password to anyone who can run `ps` here; prefer CLEANMESSY_AUTH=user:password")
    if not (args.poll == 0 or 0.5 <= args.poll <= 86_400):  # NaN fails every comparison
        raise UserError(f"--poll must be 0 (never) or 0.5 to 86400 seconds, not {args.poll:g}")
    serve(_connect_and_choose_model(args), "0.0.0.0" if args.public else args.host, args.port, args.auth,
          args.max_pixels, args.upload_ttl, args.poll)


# MLflow 3.17 starts a job runner (huey: 7 processes, ~2.7 GB) beside every server, for GenAI jobs
# this project never runs; on a busy machine it delays the UI by minutes. This turns it off.
NO_JOB_RUNNER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _port_in_use(host: str, port: int) -> bool:
    import errno
    import socket

    try:
        with socket.create_server((host, port)):  # SO_REUSEADDR, as the server binds
            return False
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE  # anything else (an IPv6 host, ...) is the server's to report


def _wait_until_up(child: subprocess.Popen[bytes], health: str) -> None:
    """Poll the server's `health` URL until it answers; a UserError if the server exits first."""
    import time
    import urllib.error
    import urllib.request

    while child.poll() is None:
        try:
            with urllib.request.urlopen(health, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    raise UserError(f"`mlflow ui` exited (status {child.returncode}) before it answered {health}; "
                    "its messages are above")


def _ui(args: argparse.Namespace) -> int:
    """Run `mlflow ui` on the project's store (without MLflow's job runner) and print the link to
    the experiment's runs once it answers; Ctrl-C or SIGTERM stops it. Returns its exit status."""
    from cleanmessy.project import project_paths

    paths = project_paths()
    if os.environ.get("MLFLOW_TRACKING_URI"):
        raise UserError(f"MLFLOW_TRACKING_URI is set ({os.environ['MLFLOW_TRACKING_URI']}): open that server's UI; "
                        "`cleanmessy ui` serves the project's own store")
    if _port_in_use(args.host, args.port):
        raise UserError(f"port {args.port} on {args.host} is in use (another `make ui`, or a tracking server?): "
                        "choose another with --port (`make ui UI_PORT=...`)")
    from cleanmessy import tracking

    experiment_id = tracking.open_experiment(paths)  # so the link works before the first run
    store = tracking.tracking_uri(paths)
    # Closing the terminal (SIGHUP) stops the UI too: its own process group would not get the hang-up.
    signal.signal(signal.SIGHUP, signal.getsignal(signal.SIGTERM))
    base = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"
    print(f"MLflow UI for {store}: starting on {base} (Ctrl-C stops it)", flush=True)
    child = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host",
                              args.host, "--port", str(args.port), "--workers", "1"],
                             env={**os.environ, **NO_JOB_RUNNER}, stdout=sys.stderr,  # stdout: our lines only
                             # Its own process group: Ctrl-C reaches only us. mlflow forwards a SIGINT to its
                             # web server, which then gets two and prints a traceback; one SIGTERM stops it cleanly.
                             process_group=0)
    try:
        _wait_until_up(child, f"{base}/health")
        print(f"open {tracking.runs_page(base, experiment_id)}", flush=True)
        return child.wait()
    finally:  # Ctrl-C, SIGTERM or SIGHUP (as KeyboardInterrupt), an error, or the UI stopped by itself
        if child.poll() is None:
            child.terminate()  # mlflow passes it on to its web server
            try:
                child.wait(timeout=30)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):  # too slow, or a second signal: at once
                child.kill()
                child.wait()


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
    serve.set_defaults(func=_serve)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    interrupts.install()
    if args.func not in (_exp_flags, _exp_name, _ui):  # every other command may load TensorFlow (ui runs mlflow)
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
