"""The REST API: `cleanmessy api` (what `make api` runs) serves the registered model with `mlflow
models serve`, for the version its alias names at start. Real servers, real HTTP: one server on the
session's read-only `tiny_project` for the module (started by the Makefile's own `api` recipe), and
servers of their own for the tests that move an alias or hold a port. Every server is stopped by
its process group, and anything left in its session by PID."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from cleanmessy.pyfunc import MAX_PHOTO_BYTES, MAX_ROWS

from conftest import VENV_BIN, copy_project, free_port, readme_api_lines, run, session_processes, tool_env

pytestmark = pytest.mark.slow
MODEL = "clean-vs-messy"
CLASSES = ["clean", "messy"]


@contextlib.contextmanager
def api_server(cmd: list[str], cwd: Path, log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real `cleanmessy api` (or `make api`) in its own session; yields it and the line it printed
    once /ping answered. Stopped as a user stops it (SIGTERM to its process group: `make` and
    `cleanmessy`, which stops the server it started), then anything left in the session, by PID."""
    with log.open("w") as err:  # a file: a pipe nobody reads would fill and block the server
        process = subprocess.Popen(cmd, cwd=cwd, env=tool_env(), stdout=subprocess.PIPE, stderr=err, text=True,
                                   start_new_session=True)
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        else:
            pytest.fail(f"no `serving` line; stdout {lines}, stderr:\n{log.read_text()[-4000:]}")
        yield process, line.rstrip("\n")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while (left := session_processes(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()


def post(url: str, body: bytes | dict, content_type: str = "application/json") -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def split_request(photos: list[bytes]) -> dict:
    """The README's request form: base64 in dataframe_split (the server decodes it only there)."""
    return {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p).decode()] for p in photos]}}


def predictions(url: str, photos: list[bytes]) -> list[dict]:
    status, body = post(url, split_request(photos))
    assert status == 200, body
    answer = json.loads(body, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))  # null, not NaN
    assert list(answer) == ["predictions"] and len(answer["predictions"]) == len(photos)
    return answer["predictions"]


def cli_predictions(project: Path, files: list[Path], tmp_path: Path) -> pd.DataFrame:
    out = tmp_path / "predict.csv"
    result = run(["cleanmessy", "predict", *map(str, files), "--out", str(out)], project, check=False)
    assert result.returncode == 0, result.stderr
    return pd.read_csv(out).fillna({"error": ""})


def assert_same(rest: dict, row: pd.Series | dict, classes: list[str] = CLASSES) -> None:
    assert rest["label"] == row["label"] and rest["error"] == "", (rest, row)
    for name in (*classes, "familiarity"):
        assert rest[name] == pytest.approx(row[name], abs=1e-6), (name, rest, row)
    assert rest["unfamiliar"] is bool(row["unfamiliar"]), (rest, row)


def jpeg(path: Path, size: int | None = None) -> bytes:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    buffer = io.BytesIO()
    (rgb.resize((size, size)) if size else rgb).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def pixel_bomb() -> bytes:
    """74 bytes of PNG whose header claims 100000 x 100000 pixels."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def api(tiny_project, tmp_path_factory):
    """`make api` on the tiny project: the Makefile's own recipe, with the test's venv in place of
    `make setup` (which would install one into the read-only project)."""
    project, _ = tiny_project
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    with api_server(["make", "-o", "setup", "api", "RUN=", f"API_PORT={port}"], project, log) as (_, line):
        yield project, f"http://127.0.0.1:{port}", line, log


@pytest.fixture(scope="module")
def images(tiny_project) -> list[Path]:
    project, _ = tiny_project
    files = sorted((project / "data/images").rglob("*.png"))
    assert len(files) == 20 and {f.parent.name for f in files} == set(CLASSES)
    return files


def test_the_ready_line_names_the_version_and_says_the_alias_was_resolved_at_start(api):
    _, url, line, log = api
    assert line == (f"serving models:/{MODEL}/1 on {url}/invocations (models:/{MODEL}@production, resolved at "
                    "start: restart to serve a moved alias)")
    with urllib.request.urlopen(f"{url}/ping", timeout=5) as ping:
        assert ping.status == 200
    for noise in ("Traceback", "absl::InitializeLog", "oneDNN custom operations", "Downloading artifacts"):
        assert noise not in log.read_text(), noise


def test_rest_and_predict_agree_on_20_photos(api, images, tmp_path):
    """The tiny project's 20 photos in one request: labels and probabilities equal `cleanmessy
    predict`'s (the same registered version, loaded the same way) to 1e-6."""
    project, url, _, _ = api
    rest = predictions(url, [f.read_bytes() for f in images])
    cli = cli_predictions(project, images, tmp_path)
    assert list(cli["path"]) == [str(f) for f in images]
    for answer, (_, row) in zip(rest, cli.iterrows()):
        assert_same(answer, row)
        assert answer[CLASSES[0]] + answer[CLASSES[1]] == pytest.approx(1, abs=1e-5)


@pytest.mark.smoke  # `make test-fast`: this server starts and answers
def test_the_readme_request_answers_as_predict_does(api, images, tmp_path):
    """The README's `printf` and `curl` lines, run as they are (on this server's port) in a folder
    holding photo.jpg: the answer has the README's shape and predict's label and probabilities."""
    project, url, _, _ = api
    lines = readme_api_lines()
    assert lines[0] == "make api" and "http://127.0.0.1:5001" in lines[2]  # the fixture runs `make api`
    (tmp_path / "photo.jpg").write_bytes(jpeg(images[-1], 96))
    script = "\n".join(line.replace("127.0.0.1:5001", url.removeprefix("http://")) for line in lines[1:])
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert list(answer) == ["predictions"] and len(answer["predictions"]) == 1
    (row,) = answer["predictions"]
    assert list(row) == ["label", *CLASSES, "familiarity", "unfamiliar", "error"]
    assert_same(row, cli_predictions(project, [tmp_path / "photo.jpg"], tmp_path).iloc[0])


def test_the_rest_server_logs_each_photo_it_classified(api, images):
    """`make api` logs to the project's data/served/requests.jsonl: one line per photo, naming the
    version, the photo's sha256 and the answer, never the photo."""
    import hashlib

    from cleanmessy import requestlog

    project, url, _, _ = api
    photo = jpeg(images[3], 80)
    (answer,) = predictions(url, [photo])
    log = project / requestlog.DEFAULT_PATH
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records, bad = requestlog.read(log)
        mine = [r for r in records if r["sha256"] == hashlib.sha256(photo).hexdigest()]
        if mine:
            break
        time.sleep(0.2)
    assert bad == 0 and len(mine) == 1, records[-3:]
    (line,) = mine
    assert line["source"] == "rest" and line["model"] == f"{MODEL}/1" and line["label"] == answer["label"]
    assert line["familiarity"] == pytest.approx(answer["familiarity"], abs=1e-6)
    assert line["unfamiliar"] is answer["unfamiliar"] and len(line["projection"]) > 0
    assert base64.b64encode(photo)[:40].decode() not in log.read_text()


def test_a_request_mixing_good_and_bad_rows_answers_every_row(api, images):
    """Not an image, truncated, too small, a pixel bomb: each its own one-line reason; the good rows
    are classified as they are alone."""
    _, url, _, _ = api
    good, other = images[0].read_bytes(), jpeg(images[-1])
    big = jpeg(images[1], 256)
    tiny = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiny, "PNG")
    rows = predictions(url, [good, b"not an image at all", big[: len(big) * 2 // 3], tiny.getvalue(), pixel_bomb(),
                             other])
    alone = predictions(url, [good, other])
    assert_same(rows[0], alone[0])
    assert_same(rows[5], alone[1])
    reasons = [row["error"] for row in rows[1:5]]
    assert [r.split(":")[0] for r in reasons] == ["not_an_image", "truncated", "too_small", "too_large"], reasons
    assert reasons[2] == "too_small: 4x4 is smaller than 32 px on a side"
    for row in rows[1:5]:
        assert row["label"] == "" and all(row[c] is None for c in (*CLASSES, "familiarity", "unfamiliar")), row
        assert "\n" not in row["error"] and "Traceback" not in row["error"] and "/" not in row["error"], row


def test_more_than_max_rows_refuses_every_row_in_one_line(api, images):
    _, url, _, _ = api
    rows = predictions(url, [images[0].read_bytes()] * (MAX_ROWS + 1))
    assert {row["error"] for row in rows} == {
        f"too_many_photos: a request takes at most {MAX_ROWS} photos, this one has {MAX_ROWS + 1}"}
    assert {row["label"] for row in rows} == {""}
    assert MAX_PHOTO_BYTES == 15 * 1024 * 1024  # the README's "15 MB a photo"


def test_a_photo_over_15_mb_is_a_row_error_and_a_request_over_64_mb_is_413_unread(api, images):
    """A 20 MB photo is its row's `too_large`; a body over 64 MB is refused from its length alone
    (413, one line in MLflow's error shape), and the server answers normally after both."""
    from cleanmessy.serving.rest import MAX_REQUEST_MB

    _, url, _, _ = api
    (row,) = predictions(url, [b"\xff\xd8" + bytes(20 * 2**20)])
    assert row["error"] == f"too_large: more than {MAX_PHOTO_BYTES:,} bytes, the most a photo may have", row
    status, text = post(url, b"{" + b" " * (MAX_REQUEST_MB * 2**20) + b"}")
    assert status == 413 and MAX_REQUEST_MB == 64  # the README's "over 64 MB"
    assert json.loads(text) == {"error_code": "RESOURCE_LIMIT_EXCEEDED", "message": (
        f"the request is {MAX_REQUEST_MB * 2**20 + 2:,} bytes, over the {MAX_REQUEST_MB * 2**20:,}-byte limit: "
        "send fewer or smaller photos a request")}
    assert predictions(url, [images[0].read_bytes()])[0]["error"] == ""


@pytest.mark.parametrize(("case", "body", "says"), [
    ("not JSON", b"photo.jpg", "valid JSON"),
    ("no image column", {"dataframe_split": {"columns": ["photo"], "data": [["aGVsbG8="]]}},
     "missing inputs ['image']"),
    ("inputs, not dataframe_split", "inputs", "decodes base64 only in dataframe_split or dataframe_records"),
    ("invalid base64", {"dataframe_split": {"columns": ["image"], "data": [["!!!not base64"]]}},
     "Invalid base64-encoded string"),
])
def test_a_malformed_request_is_a_4xx_that_says_what_is_wrong(api, images, case, body, says):
    """No stack trace, no server path: only what the caller can fix."""
    project, url, _, _ = api
    if body == "inputs":  # the photo's base64, where the server passes text through undecoded
        body = {"inputs": {"image": [base64.b64encode(images[0].read_bytes()).decode()]}}
    status, text = post(url, body)
    assert 400 <= status < 500 and says in json.loads(text)["message"], (status, text)
    for leak in ("Traceback", "stack_trace", 'File "', str(project), "site-packages", str(VENV_BIN.parent)):
        assert leak not in text, (leak, text)


def swapped_version(project: Path, tmp_path: Path) -> tuple[str, str]:
    """A second version of the model: the production version's files with its classes named the
    other way round (its answers are told apart from the first's), not yet at any alias. Returns
    (production's version, the new one)."""
    from mlflow import MlflowClient

    store = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    first = client.get_model_version_by_alias(MODEL, "production")
    source = client.get_model_version_download_uri(MODEL, first.version)  # the store's own folder
    folder = tmp_path / "swapped"
    shutil.copytree(Path(urllib.parse.urlparse(source).path), folder)
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["config"]["class_names"] = CLASSES[::-1]
    mlmodel["metadata"]["class_names"] = CLASSES[::-1]
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    second = client.create_model_version(MODEL, folder.as_uri(), run_id=first.run_id, tags=first.tags)
    return str(first.version), str(second.version)


def move_production(project: Path, version: str) -> None:
    from mlflow import MlflowClient

    store = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    MlflowClient(tracking_uri=store, registry_uri=store).set_registered_model_alias(MODEL, "production", version)


@pytest.mark.timeout(600)
def test_after_the_alias_moves_a_restart_serves_the_new_version(own_project, tmp_path):
    """The alias is resolved at start: a running server keeps serving its version when production
    moves; restarted, it serves the new one. `cleanmessy api` itself never loads TensorFlow (the
    server it starts does), and a SIGTERM stops both: exit 143, one line, nothing left running."""
    first, second = swapped_version(own_project, tmp_path)
    photo = next((own_project / "data/images/messy").glob("*.png")).read_bytes()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(VENV_BIN / "cleanmessy"), "api", "--port", str(port)]
    with api_server(command, own_project, tmp_path / "first.log") as (process, line):
        assert line.startswith(f"serving models:/{MODEL}/{first} on {url}/invocations (")
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        assert "tensorflow" not in maps and "keras" not in maps
        (before,) = predictions(url, [photo])
        move_production(own_project, second)
        (after,) = predictions(url, [photo])
        assert after == before  # still the version it started with

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143
        deadline = time.monotonic() + 30
        while left := session_processes(process.pid):
            assert time.monotonic() < deadline, f"still running after `cleanmessy api` stopped: {left}"
            time.sleep(0.2)
        stderr = (tmp_path / "first.log").read_text()
        assert "Traceback" not in stderr and stderr.rstrip().endswith("cleanmessy api: terminated"), stderr[-4000:]

    with api_server(command, own_project, tmp_path / "second.log") as (_, line):  # the restart
        assert line.startswith(f"serving models:/{MODEL}/{second} on {url}/invocations (")
        (restarted,) = predictions(url, [photo])
    # The new version's classes are named the other way round: its "clean" is the first's "messy".
    assert restarted["clean"] == pytest.approx(before["messy"], abs=1e-6)
    assert restarted["messy"] == pytest.approx(before["clean"], abs=1e-6)
    assert restarted["label"] == ("clean" if before["label"] == "messy" else "messy")


def test_api_on_a_port_in_use_is_one_line_at_once(tmp_path):
    project = copy_project(tmp_path / "project")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = run([str(VENV_BIN / "cleanmessy"), "api", "--port", str(port)], project, check=False)
    assert result.returncode == 2 and time.monotonic() - started < 60
    assert result.stdout == "" and result.stderr.strip().splitlines() == [
        f"cleanmessy api: error: port {port} on 127.0.0.1 is in use (another `make api`, or another server?): "
        "choose another with --port (`make api API_PORT=...`)"]


def test_past_its_connections_a_worker_answers_busy_at_once(tiny_project, images, tmp_path):
    """Admission control (`--max-in-flight`): with its connections taken (here by two idle
    clients), a request gets 503 "Service Unavailable" at once, not a timeout; once they leave,
    requests are answered again."""
    project, _ = tiny_project
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    photo = images[0].read_bytes()
    with api_server(["cleanmessy", "api", "--port", str(port), "--max-in-flight", "2"], project,
                    tmp_path / "api.log"):
        assert predictions(url, [photo])[0]["error"] == ""
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            deadline = time.monotonic() + 30  # until the server has taken both connections
            while (answer := post(url, split_request([photo])))[0] != 503 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert answer[0] == 503, answer
            started = time.monotonic()
            assert post(url, split_request([photo]))[0] == 503 and time.monotonic() - started < 5
        finally:
            for connection in idle:
                connection.close()
        deadline = time.monotonic() + 30
        while (answer := post(url, split_request([photo])))[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert answer[0] == 200, answer
