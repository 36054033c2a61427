"""Team-scale costs on this machine, measured in one run (docs/team.md, "Figures"):

1. `dvc repro` of the default pipeline on a fresh clone, tracking to the project's own SQLite
   store, to an `mlflow server` on loopback backed by SQLite, and to one backed by PostgreSQL (a
   throwaway cluster from Debian's initdb/pg_ctl); wall time of each and the ratio to local.
2. Two queued experiments (`dvc exp run --queue`) run with `dvc queue start -j 2` and, queued
   again with other values, with `-j 1` (one after the other).

Usage: uv run python bench/team_bench.py   (writes bench/results/team.json)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from cleanmessy.console import QUIET_ENVIRONMENT

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_ROOT", "DVC_STAGE", "CLEANMESSY_ROOT")}
    return {**QUIET_ENVIRONMENT, **base, "PATH": f"{VENV_BIN}{os.pathsep}{base['PATH']}", **extra}


def sh(cmd: list[str], cwd: Path, **extra: str) -> float:
    """Run a command; its wall time in seconds (it must succeed)."""
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env(**extra), capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def fresh_clone(work: Path, name: str) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work / name)], check=True)
    return work / name


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend: str, cwd: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (cwd / "server.log").open("w") as log:
        process = subprocess.Popen([str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", backend,
                                    "--artifacts-destination", str(cwd / "artifacts"), "--host", "127.0.0.1",
                                    "--port", str(port)], cwd=cwd, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        for _ in range(240):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            time.sleep(0.5)
        else:
            sys.exit(f"mlflow server did not start: {(cwd / 'server.log').read_text()[-2000:]}")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (as the test's; as root it runs as Debian's `postgres`)."""
    programs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1].parent
    base = Path(tempfile.mkdtemp(prefix="team-bench-pg-"))
    as_owner = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), base / "data"
    subprocess.run([*as_owner, str(programs / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run([*as_owner, str(programs / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w",
                    "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run([str(programs / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                       check=True, capture_output=True)
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGINT)
        time.sleep(3)
        shutil.rmtree(base, ignore_errors=True)


def queue_two(project: Path, rates: tuple[str, str], jobs: int) -> float:
    started = time.perf_counter()
    for rate in rates:
        sh(["dvc", "exp", "run", "--queue", "-S", f"train.learning_rate={rate}"], project)
    sh(["dvc", "queue", "start", "-j", str(jobs)], project)
    while True:
        status = subprocess.run(["dvc", "queue", "status"], cwd=project, env=env(), capture_output=True, text=True)
        if "Running" not in status.stdout and "Queued" not in status.stdout:
            break
        time.sleep(2)
    if status.stdout.count("Success") < 2 or "Failed" in status.stdout:
        sys.exit(f"queued experiments failed:\n{status.stdout}")
    sh(["dvc", "queue", "remove", "--success"], project)
    return time.perf_counter() - started


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="team-bench-"))
    result: dict[str, float] = {}
    local = fresh_clone(work, "local")
    result["repro_local_s"] = sh(["dvc", "repro"], local)
    with mlflow_server(f"sqlite:///{work / 'server-sqlite.db'}", work) as url:
        result["repro_server_sqlite_s"] = sh(["dvc", "repro"], fresh_clone(work, "sqlite"), MLFLOW_TRACKING_URI=url)
    with postgres() as database, mlflow_server(database, work) as url:
        result["repro_server_postgresql_s"] = sh(["dvc", "repro"], fresh_clone(work, "pg"), MLFLOW_TRACKING_URI=url)
    result["server_sqlite_over_local"] = result["repro_server_sqlite_s"] / result["repro_local_s"]
    result["server_postgresql_over_local"] = result["repro_server_postgresql_s"] / result["repro_local_s"]

    # The experiments are based on HEAD, whose dvc.lock a fresh `dvc repro` reproduces exactly.
    if subprocess.run(["git", "status", "--porcelain"], cwd=local, capture_output=True, text=True).stdout.strip():
        sys.exit(f"dvc repro changed the clone's tracked files: commit them at {ROOT} first")
    result["two_queued_j2_s"] = queue_two(local, ("0.002", "0.003"), 2)
    result["two_queued_j1_s"] = queue_two(local, ("0.004", "0.005"), 1)
    result["j1_over_j2"] = result["two_queued_j1_s"] / result["two_queued_j2_s"]
    result["cpus"] = os.cpu_count()

    out = ROOT / "bench" / "results" / "team.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key:32} {value:8.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
