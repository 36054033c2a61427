"""Servers the CLI runs as child processes (`cleanmessy ui`: `mlflow ui`; `cleanmessy api`: MLflow's
scoring server under uvicorn): a port in use refused at once, the child in its own process group, its ready line
printed only once it answers, and stopped, with its whole group, on Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from cleanmessy.errors import UserError

# MLflow 3.17 starts a job runner (huey: 7 processes, ~2.7 GB) beside every server, for GenAI jobs
# this project never runs; on a busy machine it delays the UI by minutes. This turns it off.
NO_JOB_RUNNER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def port_in_use(host: str, port: int) -> bool:
    import errno
    import socket

    try:
        with socket.create_server((host, port)):  # SO_REUSEADDR, as the server binds
            return False
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE  # anything else (an IPv6 host, ...) is the server's to report


def wait_until_up(child: subprocess.Popen[bytes], health: str, what: str) -> None:
    """Poll the server's `health` URL until it answers; a UserError if the server (`what`) exits first."""
    import time
    import urllib.error
    import urllib.request

    while child.poll() is None:
        try:
            with urllib.request.urlopen(health, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    raise UserError(f"`{what}` exited (status {child.returncode}) before it answered {health}; "
                    "its messages are above")


class ChildServer(NamedTuple):
    """What `run_server` starts: the command, its environment, the URL that answers once it
    serves, and the line to print then."""

    argv: list[str]
    env: dict[str, str]
    health: str
    ready: str


def run_server(what: str, host: str, port: int, target: str, holder: str,
                prepare: Callable[[str], ChildServer]) -> int:
    """Run a server (`what`, e.g. `mlflow ui`; `make <target>` starts it) as a child process until
    it stops or we are told to stop: refuse a port in use at once (one line naming `holder`, what
    may hold it), then `prepare(base_url)` says what to start; the child runs in its own process
    group, its output on our stderr (stdout: our lines only), and `ready` is printed once `health`
    answers. Ctrl-C, SIGTERM or SIGHUP (closing the terminal) stop the child with one SIGTERM; a
    second signal, or 30 s without exiting, kills its whole group. Returns the child's exit status."""
    if port_in_use(host, port):
        raise UserError(f"port {port} on {host} is in use ({holder}): choose another with --port "
                        f"(`make {target} {target.upper()}_PORT=...`)")
    child_server = prepare(f"http://{f'[{host}]' if ':' in host else host}:{port}")
    # Closing the terminal (SIGHUP) stops the server too: its own process group would not get the hang-up.
    signal.signal(signal.SIGHUP, signal.getsignal(signal.SIGTERM))
    child = subprocess.Popen(child_server.argv, env=child_server.env, stdout=sys.stderr,
                             # Its own process group: Ctrl-C reaches only us. mlflow forwards a SIGINT to its
                             # web server, which then gets two and prints a traceback; one SIGTERM stops it cleanly.
                             process_group=0)
    try:
        wait_until_up(child, child_server.health, what)
        print(child_server.ready, flush=True)
        return child.wait()
    finally:  # Ctrl-C, SIGTERM or SIGHUP (as KeyboardInterrupt), an error, or the server stopped by itself
        stop_server(child)


def group_running(group: int) -> bool:
    """Whether a process of process group `group` still runs (zombies aside); False where /proc is
    absent (not Linux): there, nothing is waited for."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _parent, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]  # after "pid (comm)"
        except (OSError, ValueError):  # it exited meanwhile
            continue
        if int(process_group) == group and state != "Z":
            return True
    return False


def stop_server(child: subprocess.Popen[bytes]) -> None:
    """Stop a server `run_server` started with one SIGTERM (mlflow passes it on to its web server,
    or the web server gets it when mlflow exits) and wait until its whole process group has gone,
    so that its last lines come before ours and its port is free; a second signal, or 30 s, kills
    the group at once."""
    import time

    try:
        if child.poll() is None:
            child.terminate()
        deadline = time.monotonic() + 30
        while child.poll() is None or group_running(child.pid):
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.1)
    except (TimeoutError, KeyboardInterrupt):  # too slow, or a second signal
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # the web server and its workers too
    child.wait()
