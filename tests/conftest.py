"""Shared fixtures: throw-away copies of the project, run with the real tools (dvc, MLflow).

`tiny_project` is the one project of the session on which the real `dvc repro` has run: tests only
read it (the session checks at its end that nothing in it changed). A test that changes anything
(params, files, a `dvc repro` or `dvc exp run`, an evaluate, new MLflow runs or versions) takes
`own_project`, a private copy of it, so no test depends on another's order or clean-up."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cleanmessy.console import QUIET_ENVIRONMENT
from cleanmessy.params import with_changes

from suite_clock import SuiteClock

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_PHOTOS = SHARED / "datasets" / "clean-messy"
VENV_BIN = Path(sys.executable).parent

# What a fresh clone holds that the pipeline needs (outputs, stores and caches excluded).
PROJECT_FILES = ["dvc.yaml", "params.yaml", "pyproject.toml", "Makefile", ".gitignore", ".dvc/config",
                 ".dvc/.gitignore", ".dvc/plots-page.html", ".dvcignore", "data/.gitignore", "pipeline/.gitignore",
                 "mlruns/.gitignore", "data/feedback/README.md"]
PROJECT_DIRS = ["src", "data/sample"]

# Tiny settings: a full `dvc repro` in well under a minute on 2 cores.
TINY_PARAMS = {
    "base": {"image_size": 32},
    "train": {"epochs": 1, "batch_size": 8, "patience": 1},
    "evaluate": {"min_accuracy": 0.0},
}
TINY_SAMPLE = {"per_class": 10, "size": 32, "seed": 0}


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SuiteClock(), "suite-clock")  # each test's time, the suite's wall and CPU


def tool_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would have after `make setup`: the venv's tools on PATH,
    no remote tracking server, no telemetry."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "CLEANMESSY_ROOT", "DVC_EXP_NAME", "DVC_ROOT", "DVC_STAGE",
                         "PYTEST_CURRENT_TEST")}
    env.update({
        **QUIET_ENVIRONMENT,  # what `cleanmessy` sets for itself, here also for dvc and mlflow
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
    })
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    """Run a real command; on an unexpected failure the assertion shows its output."""
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(**extra_env), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}"
                             f"\n--- stderr\n{result.stderr[-6000:]}")
    return result


def set_params(project: Path, changes: dict) -> None:
    """Edit params.yaml as `dvc exp run -S` does (DVC's own round-trip writer: comments and style kept)."""
    from dvc.utils.serialize import modify_yaml

    def apply(target: dict, nested: dict) -> None:
        for key, value in nested.items():
            if isinstance(value, dict):
                apply(target.setdefault(key, {}), value)
            else:
                target[key] = value

    with modify_yaml(project / "params.yaml") as data:
        apply(data, changes)


def labelled_photos(root: Path, n: int, side: int, seed: int = 0):
    """`n` tiny PNGs under root/images/<label>/, alternating clean and messy (bright = messy), as
    ingest lays them out; returns the split frame (path, label) pointing at them."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ("clean", "messy")[i % 2]
        path = f"images/{label}/{i}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        base = 60 if label == "clean" else 190
        Image.fromarray(rng.integers(base - 40, base + 40, (side, side, 3), dtype=np.uint8)).save(root / path)
        rows.append({"path": path, "label": label})
    return pd.DataFrame(rows)


def copy_project(dest: Path, params: dict | None = None, sample: dict | None = None) -> Path:
    """A fresh-clone-like copy of the project in `dest`, committed to its own git repository."""
    for name in PROJECT_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    set_params(dest, with_changes(TINY_PARAMS, params or {}))
    (dest / "data/sample/sample.yaml").write_text(yaml.safe_dump({**TINY_SAMPLE, **(sample or {})}))
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "fresh clone"], dest)
    return dest


# What reading a project writes: DVC's lock files, the servers' request log, and the
# registered_model_meta (name and version) that MLflow writes into a local store's model folder
# whenever a registered model is loaded from it (ModelsArtifactRepository.download_artifacts
# returns the store's own folder, not a copy).
def _written_by_reads(name: Path) -> bool:
    return (name.is_relative_to(".dvc/tmp") or name.is_relative_to("data/served")  # the servers' request log
            or (name.is_relative_to("mlruns") and name.name == "registered_model_meta"))


def fingerprint(project: Path) -> dict[str, str]:
    """sha256 of every file in a project, except what reading it writes."""
    return {str(path.relative_to(project)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(project.rglob("*"))
            if path.is_file() and not path.is_symlink() and not _written_by_reads(path.relative_to(project))}


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, subprocess.CompletedProcess]]:
    """A project copy on which the real `dvc repro` has run once with tiny params; read-only. Tests
    that change a project take `own_project`. At the end of the session, any file that a test
    changed, added or removed here is an error."""
    project = copy_project(tmp_path_factory.mktemp("project"))
    result = run(["dvc", "repro"], project)
    before = fingerprint(project)
    yield project, result
    after = fingerprint(project)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"tests changed the read-only tiny_project (use own_project): {changed[:20]}"


def clone_project(source: Path, dest: Path) -> Path:
    """A private copy of a project that has run: workspace, git repository, DVC cache and the local
    MLflow store. The store holds absolute locations under the source's mlruns/ (experiments'
    artifact_location, runs' artifact_uri, logged models' and model versions' storage locations,
    each MLmodel's artifact_path, and pipeline/mlflow_run.json's store URI): left as they are, the
    copy would read the source's artifacts and log new ones into it. They are moved to the copy.
    The source's request log (what other tests' servers classified) is not copied: a copy starts
    with none."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        if Path(folder) == source / ".dvc":
            return ["tmp"]
        return ["served"] if Path(folder) == source / "data" else []

    shutil.copytree(source, dest, symlinks=True, ignore=ignore)
    moves = [(source.as_uri() + "/", dest.as_uri() + "/"), (f"{source}/", f"{dest}/")]
    with contextlib.closing(sqlite3.connect(dest / "mlruns" / "mlflow.db")) as db, db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]:
                for old, new in moves:
                    db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                               f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0', (old, new, old))
    others = [p for p in (dest / "mlruns").rglob("*") if p.is_file() and p.name != "mlflow.db"]
    for path in [*others, dest / "pipeline" / "mlflow_run.json"]:
        data = path.read_bytes() if path.is_file() else b""
        if str(source).encode() in data:
            text = data.decode()  # a binary file naming the source's path would need more than this
            for old, new in moves:
                text = text.replace(old, new)
            path.write_text(text)
    return dest


@pytest.fixture
def own_project(tiny_project, tmp_path: Path) -> Path:
    """A private copy of `tiny_project` (its `dvc repro` done, model registered) for a test that
    changes anything: params, files, `dvc repro`/`dvc exp run`, evaluate, new MLflow runs or
    versions. A copy takes well under a second; a repro takes most of a minute."""
    source, _ = tiny_project
    return clone_project(source, tmp_path / "project")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll until the server answers; fail with its log if it died or never answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    process.kill()
    raise AssertionError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def server(cmd: list[str] | str, cwd: Path, log: Path, ready_url: str, env: dict[str, str] | None = None,
           timeout: float = 180) -> Iterator[subprocess.Popen]:
    """A real server (a command line, or a shell command such as `make ui`) in its own process
    group, its output in `log` (a file, not a pipe: a pipe nobody reads fills and blocks the
    server); yields once `ready_url` answers; stops the whole group after."""
    with log.open("w") as out:
        process = subprocess.Popen(cmd, shell=isinstance(cmd, str), cwd=cwd, env=env or tool_env(), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(ready_url, process, log, timeout)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have stopped by itself
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def session_processes(sid: int) -> dict[int, str]:
    """PID -> command line of the live (not zombie) processes in session `sid`: what a process
    started with start_new_session=True runs, whatever process groups it makes (from /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, _group, session = stat.read_text().rsplit(")", 1)[1].split()[:4]  # after "pid (comm)"
            if int(session) == sid and state != "Z":
                command = stat.with_name("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found[int(stat.parent.name)] = command
        except (OSError, ValueError):  # it exited meanwhile
            continue
    return found


def job_runner_processes(sid: int) -> list[str]:
    """MLflow's job runner (`mlflow.server.jobs._job_runner` and its huey consumers) in a server's
    session; asserts the session holds the server itself, so an empty answer means something."""
    commands = list(session_processes(sid).values())
    assert any("uvicorn" in command for command in commands), commands
    return [command for command in commands if "mlflow.server.jobs" in command or "huey" in command]


@contextlib.contextmanager
def serving(project: Path, *args: str, log: Path | None = None, **extra_env: str) -> Iterator[str]:
    """A real `cleanmessy serve` in `project` on a free loopback port; yields its URL, stops it
    after. Its console goes to `log`, else to a temporary file; never into the project."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory(prefix="serve-") as folder:
        with server(["cleanmessy", "serve", "--port", str(port), *args], project, log or Path(folder) / "serve.log",
                    url, env=tool_env(**extra_env)):
            yield url


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; `make test` installs it (Playwright downloads no browser)
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
SCREENSHOTS = os.environ.get("CLEANMESSY_SCREENSHOTS")  # a folder to keep the tests' screenshots in


@contextlib.contextmanager
def browser_page(width: int = 1280, height: int = 900) -> Iterator:
    """A Playwright page in headless Chromium; skips without Chromium, except in CI where it fails."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (make test does)")
        pytest.skip("Debian's chromium is not installed (`make test` installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def screenshot(page, path: Path) -> None:
    """Save a full-page screenshot, and a copy in $CLEANMESSY_SCREENSHOTS when set (to look at)."""
    page.screenshot(path=str(path), full_page=True)
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(SCREENSHOTS) / path.name)


requires_real_photos = pytest.mark.skipif(
    not REAL_PHOTOS.is_dir(), reason=f"real photos not available at {REAL_PHOTOS} (only on the team's machines)")


def readme_api_lines() -> list[str]:
    """The README's REST API block, line by line, comments stripped (as tests/test_readme.py reads it)."""
    import re

    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if b.startswith("make api")]
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]
