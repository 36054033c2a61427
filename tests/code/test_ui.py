"""`cleanmessy ui` (what `make ui` runs): `mlflow ui` on the project's own store as a child process,
without MLflow's job runner; the link to the runs table appears only once the UI answers; Ctrl-C
and SIGTERM stop the UI with it; a port in use is one line."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from cleanmessy import tracking

from conftest import VENV_BIN, copy_project, free_port, job_runner_processes, run, session_processes, tool_env


@pytest.mark.slow  # starts a real `mlflow ui` (20-40 s on 2 busy cores)
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("stop", "status", "said"), [
    pytest.param("ctrl-c", 130, "interrupted", marks=pytest.mark.smoke), ("sigterm", 143, "terminated")])
def test_ui_prints_the_link_once_the_ui_answers_and_stops_with_it(stop, status, said, tmp_path):
    """The "open http://…" line comes after /health answers (read at that moment), and names the
    experiment's runs table; no job runner runs beside the UI. Ctrl-C (SIGINT to the terminal's
    process group) or a SIGTERM to `cleanmessy ui` alone stops the UI too: exit 130 / 143, one
    line, no traceback, none of its processes left."""
    project = copy_project(tmp_path / "project")
    port = free_port()
    log = tmp_path / "ui-stderr.log"
    with log.open("w") as err:  # a file: a pipe nobody reads would fill and block the server
        # A terminal's foreground job takes Ctrl-C; a job started in the background (as a CI runner may
        # start the suite) inherits SIGINT ignored, which `cleanmessy` respects, as a user's would be.
        # A handled signal is reset to its default by exec: the UI starts as from a terminal.
        ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            ui = subprocess.Popen([str(VENV_BIN / "cleanmessy"), "ui", "--port", str(port)], cwd=project,
                                  env=tool_env(), stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        finally:
            signal.signal(signal.SIGINT, ignored)
    try:
        assert ui.stdout is not None
        lines = []
        for line in ui.stdout:
            lines.append(line)
            if line.startswith("open "):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as health:
                    assert health.status == 200  # already up when the link appears
                break
        else:
            pytest.fail(f"no link; stdout {lines}, stderr:\n{log.read_text()[-4000:]}")
        assert lines[-1].split()[1] == tracking.runs_page(f"http://127.0.0.1:{port}", "1")
        assert job_runner_processes(ui.pid) == []

        if stop == "ctrl-c":
            os.killpg(ui.pid, signal.SIGINT)
        else:
            ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == status
        deadline = time.monotonic() + 30
        while left := session_processes(ui.pid):
            assert time.monotonic() < deadline, f"still running after `cleanmessy ui` stopped: {left}"
            time.sleep(0.2)
        stderr = log.read_text()
        assert "Traceback" not in stderr and stderr.rstrip().endswith(f"cleanmessy ui: {said}"), stderr[-4000:]
    finally:  # after a failure: cleanmessy, mlflow and its web server, by PID
        for pid in session_processes(ui.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ui.wait()


def test_ui_on_a_port_in_use_is_one_line_at_once(tmp_path):
    """Another `make ui` (or a tracking server) on the port: one line, exit 2, in seconds, instead
    of MLflow's own start-up, bind error and a "successful" exit."""
    project = copy_project(tmp_path / "project")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = run([str(VENV_BIN / "cleanmessy"), "ui", "--port", str(port)], project, check=False)
    assert result.returncode == 2 and time.monotonic() - started < 60  # MLflow's own bind error: ~20 s idle
    assert result.stdout == "" and result.stderr.strip().splitlines() == [
        f"cleanmessy ui: error: port {port} on 127.0.0.1 is in use (another `make ui`, or a tracking server?): "
        "choose another with --port (`make ui UI_PORT=...`)"]
