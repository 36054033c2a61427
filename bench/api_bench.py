"""REST API benchmark (issue 19): the registered model behind `mlflow models serve`. From the project root:

    .venv/bin/python bench/api_bench.py [--configs default,real-photos] [--requests 200] [--workers 1]
        [--workdir DIR] [--keep] [--out FILE]

1. For each configuration, a copy of the working tree (the files git tracks or would track, as they
   are now: uncommitted edits included) in a temporary folder, committed to its own git repository,
   on which `dvc repro` runs with the copy's code (PYTHONPATH=<copy>/src): `default` with the
   committed params.yaml (the embedded sample, 64 px), `real-photos` with the changes of
   experiments/real-photos.yaml on ../shared/datasets/clean-messy and ImageNet weights from
   ../shared/keras-weights (skipped, with the reason, when either is missing). Its registered
   version at `production` is what is measured.
2. One JPEG photo (quality 90) at the model's input size: a sample picture for `default`, the first
   real messy photo (by path), resized, for `real-photos`.
3. In this process: the version loaded as every consumer loads it (`load_photo_classifier`), then
   the raw forward pass (`classifier.predictor` on the decoded photo, compiled) and the pyfunc's
   whole `predict` on the photo's bytes (decode + forward + output frame).
4. `mlflow models serve -m models:/<name>@production --env-manager local --workers N` on a free
   loopback port (its own session, stopped by process group): seconds from start to the first
   `/ping` that answers 200; the answer of one request checked against the in-process predict
   (same label, probabilities within 1e-6); then the REST call (`/invocations`, base64 in
   `dataframe_split`) from 1 client (--requests sequential calls) and from 4 concurrent clients
   (--requests calls in all), each client on its own keep-alive connection, after 3 warm-up calls
   each; p50 and p95 of the client-side time from sending the request to reading the whole answer.
   Then the RSS of every process of the server's session (the `mlflow` CLI, uvicorn, its workers).
5. Target: REST p50 with 1 client <= raw forward p50 + 15 ms: PASS/FAIL per configuration.

Writes --out (bench/results/api.json) with machine, commit and command line; nothing else is
written into the repository.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import yaml
from serve_bench import percentiles, time_calls  # bench/ is on sys.path: the script's own folder

from cleanmessy.console import QUIET_ENVIRONMENT, filter_stderr, quiet_environment

quiet_environment()  # before MLflow or TensorFlow is imported
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SHARED = ROOT.parent / "shared"
REAL_PHOTOS, WEIGHTS = SHARED / "datasets" / "clean-messy", SHARED / "keras-weights"
CONFIGS = ("default", "real-photos")
TARGET_MS = 15.0  # REST p50 (1 client) may exceed the raw forward p50 by this much
CLIENTS = 4
WARMUP = 3
MIB = 2**20


# ---------------------------------------------------------------- the project and its model


def env_for(project: Path) -> dict[str, str]:
    """As tests/conftest.py's tool_env: the venv's tools first, no remote tracking server, quiet
    libraries, the copy's code on PYTHONPATH and its store as MLFLOW_TRACKING_URI."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "CLEANMESSY_ROOT", "DVC_EXP_NAME", "DVC_ROOT", "DVC_STAGE",
                        "PYTHONPATH")}
    return {**QUIET_ENVIRONMENT, **env, "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(project / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlruns/mlflow.db",
            "CLEANMESSY_KERAS_WEIGHTS": str(WEIGHTS)}


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{shlex.join(cmd)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def copy_working_tree(dest: Path) -> None:
    """The files git tracks or would track, as they are in the working tree, committed in `dest`."""
    listed = sh(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT).split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}
    sh(["git", "init", "-q", "-b", "main"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-q", "-m", "working tree"], dest, env)


def prepare(config: str, project: Path) -> tuple[str, float]:
    """A copy of the working tree at `project` with `config`'s params, `dvc repro` run on it; the
    registered model's name and the repro's wall seconds."""
    from cleanmessy.params import with_changes

    project.mkdir(parents=True)
    copy_working_tree(project)
    params = project / "params.yaml"
    if config == "real-photos":
        changes = with_changes(yaml.safe_load((project / "experiments" / "real-photos.yaml").read_text()),
                               {"ingest": {"source": str(REAL_PHOTOS)}})
        params.write_text(yaml.safe_dump(with_changes(yaml.safe_load(params.read_text()), changes), sort_keys=False))
    started = time.perf_counter()
    sh(["dvc", "repro"], project, env_for(project))
    name = yaml.safe_load(params.read_text()).get("evaluate", {}).get("model_name", "clean-vs-messy")
    return name, time.perf_counter() - started


def jpeg_photo(config: str, size: int) -> bytes:
    """One JPEG (quality 90) at the model's input size."""
    from PIL import Image

    from cleanmessy.sample import CLASSES, render

    if config == "real-photos":
        first = sorted(p for p in REAL_PHOTOS.rglob("*") if p.is_file() and p.parent.name == "messy")[0]
        image = Image.open(first).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    else:
        image = render(CLASSES[1], 0, size=size)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


# ---------------------------------------------------------------- measuring




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive connection to the scoring server, as a requests.Session would hold."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def invoke(self, body: bytes) -> dict:
        self.connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"/invocations answered {response.status}: {data[:500]!r}")
        return json.loads(data)


def session_rss(sid: int) -> list[dict]:
    """Every live process of session `sid` (the server's): pid, what it is, RSS in MiB."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(process.pid) != sid or process.status() == psutil.STATUS_ZOMBIE:
                continue
            command = " ".join(process.info["cmdline"] or [])
            role = ("mlflow models serve (CLI)" if "models serve" in command else
                    "uvicorn worker" if "multiprocessing" in command else
                    "uvicorn" if "uvicorn" in command else command[:60])
            found.append({"pid": process.pid, "process": role, "rss_mib": process.info["memory_info"].rss / MIB})
    if not any(p["process"] == "uvicorn worker" for p in found):  # --workers 1: uvicorn serves in its own process
        found = [{**p, "process": "uvicorn (its one worker)"} if p["process"] == "uvicorn" else p for p in found]
    return sorted(found, key=lambda p: p["pid"])


@contextlib.contextmanager
def scoring_server(project: Path, uri: str, workers: int, log: Path) -> Iterator[tuple[int, float, subprocess.Popen]]:
    """`mlflow models serve` in its own session; yields (port, seconds to the first /ping, the
    process) and stops its process group after."""
    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
           "-p", str(port), "--workers", str(workers)]
    with log.open("w") as out:
        started = time.perf_counter()
        process = subprocess.Popen(cmd, cwd=project, env=env_for(project), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = started + 300
        while True:
            if process.poll() is not None:
                sys.exit(f"mlflow models serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            if time.perf_counter() > deadline:
                sys.exit(f"mlflow models serve did not answer /ping within 300 s; see {log}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/ping")
                if connection.getresponse().status == 200:
                    connection.close()
                    break
            time.sleep(0.05)
        yield port, time.perf_counter() - started, process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def concurrent_calls(port: int, body: bytes, clients: int, total: int) -> tuple[list[float], float]:
    """`total` calls from `clients` threads, each on its own connection after WARMUP calls; every
    call's seconds, and the wall seconds of the measured part."""
    times: list[list[float]] = [[] for _ in range(clients)]
    ready = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            connection = Client(port)
            for _ in range(WARMUP):
                connection.invoke(body)
        except BaseException as exc:  # reported below, the barrier must not wait for a dead thread
            errors.append(exc)
            ready.abort()
            return
        ready.wait()
        try:
            for _ in range(total // clients):
                start = time.perf_counter()
                connection.invoke(body)
                times[i].append(time.perf_counter() - start)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return [t for each in times for t in each], wall


def bench_config(config: str, project: Path, args: argparse.Namespace) -> dict:
    import mlflow
    import pandas as pd

    from cleanmessy import tracking
    from cleanmessy.pyfunc import INPUT_COLUMN, load_photo_classifier

    print(f"[{config}] dvc repro in {project} ...", flush=True)
    name, repro_s = prepare(config, project)
    uri = tracking.model_uri_for(name, "production")
    store = env_for(project)["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    version = tracking.resolve_version(uri)
    local, _ = tracking.download_version(version.uri)
    classifier = load_photo_classifier(local, version.uri)
    photo = jpeg_photo(config, classifier.image_size)
    x = classifier.decode(photo)[None]
    frame = pd.DataFrame({INPUT_COLUMN: [photo]})
    expected = classifier.predict(None, frame).iloc[0]
    raw_forward = percentiles(time_calls(lambda: classifier.predictor(x), args.requests))
    pyfunc_predict = percentiles(time_calls(lambda: classifier.predict(None, frame), args.requests))

    body = json.dumps({"dataframe_split": {"columns": [INPUT_COLUMN],
                                           "data": [[base64.b64encode(photo).decode()]]}}).encode()
    with tempfile.TemporaryDirectory(prefix="api-bench-log-") as logs, \
            scoring_server(project, uri, args.workers, Path(logs) / "serve.log") as (port, ping_s, process):
        client = Client(port)
        answer = client.invoke(body)["predictions"][0]
        agrees = answer["label"] == expected["label"] and all(
            abs(answer[c] - expected[c]) <= 1e-6 for c in classifier.class_names) and not answer["error"]
        one = percentiles(time_calls(lambda: client.invoke(body), args.requests))
        many, wall = concurrent_calls(port, body, CLIENTS, args.requests)
        rss = session_rss(process.pid)
    four = {**percentiles(many), "requests_per_s": len(many) / wall}
    target = raw_forward["p50_ms"] + TARGET_MS
    return {
        "config": config, "model": version.uri, "image_size": classifier.image_size, "photo_bytes": len(photo),
        "request_bytes": len(body), "dvc_repro_s": repro_s, "workers": args.workers,
        "raw_forward": raw_forward, "pyfunc_predict_bytes": pyfunc_predict,
        "rest_1_client": one, f"rest_{CLIENTS}_clients": four, "start_to_first_ping_s": ping_s,
        "rss": rss, "rest_agrees_with_in_process": bool(agrees),
        "target_ms": target, "pass": one["p50_ms"] <= target,
    }


def report(result: dict) -> None:
    print(f"\n{result['config']}: {result['model']} ({result['image_size']} px), JPEG {result['photo_bytes']:,} B, "
          f"request {result['request_bytes']:,} B, --workers {result['workers']}")
    print(f"{'measure':44} {'p50 ms':>9} {'p95 ms':>9}")
    rows = (("raw forward (classifier.predictor, decoded)", "raw_forward"),
            ("pyfunc predict on the bytes (in process)", "pyfunc_predict_bytes"),
            ("REST /invocations, 1 client", "rest_1_client"),
            (f"REST /invocations, {CLIENTS} concurrent clients", f"rest_{CLIENTS}_clients"))
    for label, key in rows:
        print(f"{label:44} {result[key]['p50_ms']:9.2f} {result[key]['p95_ms']:9.2f}")
    print(f"{CLIENTS} clients: {result[f'rest_{CLIENTS}_clients']['requests_per_s']:.1f} requests/s")
    print(f"start to first /ping: {result['start_to_first_ping_s']:.1f} s")
    for p in result["rss"]:
        print(f"RSS {p['process']} (pid {p['pid']}): {p['rss_mib']:.0f} MiB")
    print(f"REST answer = in-process predict (label, probabilities to 1e-6): {result['rest_agrees_with_in_process']}")
    verdict = "PASS" if result["pass"] else "FAIL"
    print(f"{verdict}: REST p50 {result['rest_1_client']['p50_ms']:.2f} ms vs raw forward + {TARGET_MS:g} ms = "
          f"{result['target_ms']:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="default,real-photos (default both)")
    parser.add_argument("--requests", type=int, default=200, help="measured calls per measure (default 200)")
    parser.add_argument("--workers", type=int, default=1, help="the server's uvicorn workers (default 1, MLflow's)")
    parser.add_argument("--workdir", type=Path, help="where the project copies go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the project copies")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api.json")
    args = parser.parse_args()
    filter_stderr()  # TensorFlow's start-up lines
    configs = [c for c in args.configs.split(",") if c]
    if unknown := set(configs) - set(CONFIGS):
        parser.error(f"unknown configurations {sorted(unknown)}; choose from {', '.join(CONFIGS)}")

    dirty = bool(sh(["git", "status", "--porcelain", "--untracked-files=no"], ROOT).strip())
    run = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
           "commit": sh(["git", "rev-parse", "--short", "HEAD"], ROOT).strip() + (" + uncommitted changes" * dirty),
           "command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": platform.processor() or
           platform.machine(), "cpus": os.cpu_count(), "results": [], "skipped": {}}
    workdir = Path(tempfile.mkdtemp(prefix="api-bench-", dir=args.workdir))
    try:
        for config in configs:
            if config == "real-photos" and not (REAL_PHOTOS.is_dir() and WEIGHTS.is_dir()):
                run["skipped"][config] = f"needs {REAL_PHOTOS} and {WEIGHTS}"
                print(f"[{config}] skipped: {run['skipped'][config]}")
                continue
            result = bench_config(config, workdir / config, args)
            report(result)
            run["results"].append(result)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(run, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nwrote {args.out} ({run['commit']}, {run['date']})")


if __name__ == "__main__":
    main()
