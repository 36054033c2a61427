"""What a person sees on the terminal: the project's own log lines, not the start-up chatter of
the libraries under it (TensorFlow's absl/oneDNN lines, MLflow's environment guesses)."""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

# TensorFlow's C++ start-up lines: written to file descriptor 2 by absl before any Python logging
# is set up (so TF_CPP_MIN_LOG_LEVEL does not silence them), once per shared library that logs.
STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
    r"Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|"
    r"This TensorFlow binary is optimized to use available CPU instructions|"
    r"rebuild TensorFlow with the appropriate compiler flags|Could not find cuda drivers|TF-TRT Warning")

# The libraries' settings every cleanmessy process, and every tool it starts, runs with: no
# telemetry (MLflow, Gradio, DVC), no TensorFlow C++ chatter, no MLflow INFO lines (they are about
# MLflow, not the run), and a tracking server that goes away mid-run fails in about a minute, not
# after minutes of backoff. Set before those libraries are imported; the user's own values win.
QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" bars from a server
}


def quiet_environment() -> None:
    """Apply QUIET_ENVIRONMENT to this process (and so to its children), keeping what is set."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


# Loggers whose INFO lines are about the libraries, not the user's run.
QUIET_LOGGERS = {"alembic": logging.WARNING, "mlflow": logging.WARNING, "urllib3": logging.WARNING,
                 "httpx": logging.WARNING, "absl": logging.WARNING, "matplotlib": logging.WARNING,
                 "tensorflow": logging.WARNING,  # tf.distribute's set-up lines (devices, collectives)
                 # "Failed to resolve installed pip version": uv venvs have no pip; the requirements are pinned
                 "mlflow.utils.environment": logging.ERROR}


def filter_stderr() -> None:
    """From now on, pass everything written to file descriptor 2 (by Python, C++ libraries or
    child processes) through a thread that drops the known start-up lines. TensorFlow writes them
    from C++ at import and again when it first builds a graph, where no Python setting reaches.
    At exit the original stderr is put back and the thread drains what is left."""
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe, os.fdopen(os.dup(original), "wb", buffering=0) as out:
            for line in pipe:
                if not STARTUP_NOISE.search(line.decode(errors="replace")):
                    out.write(line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the pump sees end of file
        thread.join(timeout=5)

    atexit.register(restore)


def setup_logging(verbose: bool) -> None:
    """`HH:MM:SS LEVEL logger: message` lines on stderr; libraries only from WARNING up."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else level)


def progress(iterable: Iterable[T], total: int | None, desc: str, unit: str = "photo") -> Iterator[T]:
    """A progress bar on stderr for long work (ingest's checks, decoding, feature extraction),
    drawn only on a terminal: under CI or with output to a file it prints nothing, and the stage's
    own log lines say what was done."""
    from tqdm import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=None,
                     mininterval=0.5, dynamic_ncols=True, leave=False))
