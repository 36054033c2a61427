"""One console script: `cleanmessy <command>`. Stage commands are what dvc.yaml runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from cleanmessy.errors import UserError

# Quiet TensorFlow's C++ start-up chatter, and keep MLflow and Gradio from phoning home (their
# telemetry); set before they are imported. The user's own environment wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

STAGES = {
    "ingest": "read the source (params: ingest.*) into data/images and data/manifest.csv",
    "split": "stratified train/val/test split into data/splits/",
    "train": "train the classifier (params: train.*), tracked in MLflow",
    "evaluate": "test metrics, log and register the model, promote by alias",
    "plot": "figures into pipeline/plots/, logged to the MLflow run",
}


def _run_stage(args: argparse.Namespace) -> None:
    from cleanmessy.params import load_params
    from cleanmessy.project import project_paths

    paths = project_paths()
    params = load_params(paths.params)
    module = importlib.import_module(f"cleanmessy.stages.{args.command}")
    module.main(paths, params)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleanmessy", description="Clean vs Messy room classifier pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in STAGES.items():
        sub.add_parser(name, help=help_text, description=help_text).set_defaults(func=_run_stage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow.store", "urllib3", "httpx", "absl", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.func(args)
    except UserError as exc:
        print(f"cleanmessy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cleanmessy {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
