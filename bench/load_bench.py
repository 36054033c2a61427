"""Load benchmark (issue 21): a crowd of large uploads to the app and to the REST API. Run from the
project root after `make run`:

    uv run python bench/load_bench.py [--clients 64] [--megabytes 20 14] [--deadline 30]
        [--stage production] [--out bench/results/load.json]

For each server, started as a user starts it on a free loopback port in its own session
(`cleanmessy serve`, the app; `cleanmessy api`, the REST API, with their defaults: the app
classifies 2 photos at a time with 16 waiting, the API takes 8 connections), and for each size in
--megabytes (20: over the 15 MB cap for one photo; 14: under it, so every admitted photo is decoded
and classified), --clients threads start together, each on its own connection, each uploading one
JPEG of that size (random pixels at quality 95, so it neither compresses nor decodes cheaply):

- app: `POST /gradio_api/upload` (multipart), then `POST /gradio_api/call/predict` and the event
  stream `GET /gradio_api/call/predict/<id>` until `complete` or `error`, as gradio_client does;
- API: `POST /invocations` with the photo base64-encoded in `dataframe_split`.

Each client's outcome is one of: `answered` (a label), `refused` (a one-line answer saying why: the
photo is over the cap), `busy` (HTTP 503 or Gradio's "queue is full": retry), `reset` (the server
closed the connection on an upload it had already refused, before the client could read why: this
is what uvicorn does past its connection limit while a client is still sending), or `no answer`
(an error without a message, or nothing within the deadline). The seconds from the start to its
outcome are recorded. Every 50 ms the RSS of every process in the server's session is summed; the
peak is reported. After the crowd, one ordinary photo must be answered with a label ("fine
afterwards").

Targets, per server and size: every client `answered`, `refused` or `busy` (or `reset`, which a
client retries as busy) within --deadline seconds; peak RSS <= 1.5 GiB; the server fine afterwards.
Writes --out with the machine, commit and command line; nothing else is written into the repository.
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

import numpy as np

from cleanmessy.console import quiet_environment

quiet_environment()
ROOT = Path(__file__).resolve().parents[1]
CLEANMESSY = Path(sys.executable).parent / "cleanmessy"
MIB = 2**20
RSS_LIMIT_MIB = 1536
OK = ("answered", "refused", "busy", "reset")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def noise_jpeg(megabytes: float, seed: int = 0) -> bytes:
    """A JPEG of random pixels (quality 95) of about `megabytes` MiB (within 2 %)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    target = megabytes * MIB

    def encode(side: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out, "JPEG", quality=95)
        return out.getvalue()

    side = 512
    for _ in range(6):  # bytes grow with the pixel count: scale the side by the square root
        data = encode(side)
        if abs(len(data) - target) < 0.02 * target:
            break
        side = max(64, int(side * (target / len(data)) ** 0.5))
    return data


def small_photo() -> bytes:
    from cleanmessy.sample import CLASSES, render

    out = io.BytesIO()
    render(CLASSES[1], 0, size=256).save(out, "JPEG", quality=90)
    return out.getvalue()


def session_rss_mib(sid: int) -> float:
    import psutil

    total = 0.0
    for process in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                total += process.memory_info().rss / MIB
    return total


@contextlib.contextmanager
def server(args: list[str], ready: str, log: Path, timeout: float = 300) -> Iterator[tuple[int, subprocess.Popen]]:
    """`cleanmessy <args> --port P` in its own session; yields (P, the process) once `ready` (a path)
    answers 200; stops its process group after (SIGTERM, then SIGKILL)."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen([str(CLEANMESSY), *args, "--port", str(port)], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PATH": f"{CLEANMESSY.parent}{os.pathsep}{os.environ['PATH']}"})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                sys.exit(f"cleanmessy {' '.join(args)} exited {process.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                sys.exit(f"cleanmessy {' '.join(args)} did not answer within {timeout:.0f} s; see {log}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", ready)
                if connection.getresponse().status == 200:
                    break
            time.sleep(0.5)
        yield port, process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# ---------------------------------------------------------------- one client


def _send(port: int, method: str, path: str, body: bytes, headers: dict[str, str],
          timeout: float) -> tuple[int | str, bytes]:
    """(status, body) of one request on a new connection, or ("reset", b"") when the server closed
    the connection before its answer could be read."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        try:
            connection.request(method, path, body, headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: it may still have answered
        try:
            response = connection.getresponse()
            return response.status, response.read(64 * 1024)
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            return "reset", b""
    finally:
        connection.close()


def app_client(port: int, photo: bytes, timeout: float) -> tuple[str, str]:
    """Upload and classify one photo through the app's HTTP API; (outcome, detail)."""
    boundary = "----load-bench-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"photo.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    status, text = _send(port, "POST", "/gradio_api/upload", body,
                         {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout)
    if status == "reset":
        return "reset", "upload: connection closed"
    if status == 413:
        return "refused", text.decode(errors="replace")[:200]
    if status != 200:
        return ("busy" if status == 503 else "no answer"), f"upload: HTTP {status} {text[:200]!r}"
    path = json.loads(text)[0]
    call = json.dumps({"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}]}).encode()
    status, text = _send(port, "POST", "/gradio_api/call/predict", call, {"Content-Type": "application/json"},
                         timeout)
    if status == 503:
        return "busy", text.decode(errors="replace")[:200]
    if status != 200:
        return "no answer", f"call: HTTP {status} {text[:200]!r}"
    event_id = json.loads(text)["event_id"]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", f"/gradio_api/call/predict/{event_id}")
        response = connection.getresponse()
        event = ""
        for raw in response:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event in ("complete", "error"):
                data = line[len("data: "):]
                if event == "complete":
                    return "answered", data[:200]
                message = data.strip('"') if data and data != "null" else ""
                if "queue is full" in message.lower():
                    return "busy", message[:200]
                return ("refused" if message else "no answer"), message[:200] or "an error without a message"
        return "no answer", "the event stream ended without an outcome"
    finally:
        connection.close()


def api_client(port: int, photo: bytes, timeout: float) -> tuple[str, str]:
    """One photo to `/invocations`; (outcome, detail)."""
    body = json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(photo).decode()]]}}).encode()
    status, text = _send(port, "POST", "/invocations", body, {"Content-Type": "application/json"}, timeout)
    if status == "reset":
        return "reset", "connection closed"
    if status == 503:
        return "busy", text.decode(errors="replace")[:200]
    if status != 200:
        return "no answer", f"HTTP {status} {text[:200]!r}"
    row = json.loads(text)["predictions"][0]
    if row.get("error"):
        return "refused", str(row["error"])[:200]
    return "answered", str(row.get("label"))


# ---------------------------------------------------------------- a crowd


def crowd(kind: str, port: int, sid: int, photo: bytes, clients: int, deadline: float) -> dict:
    """`clients` threads sending `photo` at once; their outcomes, times and the server's peak RSS."""
    client = app_client if kind == "app" else api_client
    results: list[dict] = [{} for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def one(i: int) -> None:
        start.wait()
        began = time.monotonic()
        try:
            outcome, detail = client(port, photo, deadline)
        except TimeoutError:
            outcome, detail = "no answer", f"nothing within {deadline:.0f} s"
        except Exception as exc:  # noqa: BLE001 - any other failure is recorded, not raised
            outcome, detail = "no answer", f"{type(exc).__name__}: {exc}"[:200]
        seconds = time.monotonic() - began
        if seconds > deadline and outcome in OK:
            outcome, detail = "no answer", f"{outcome} after {seconds:.1f} s: {detail}"
        results[i] = {"outcome": outcome, "seconds": round(seconds, 2), "detail": detail}

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    peak, stop = [session_rss_mib(sid)], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(session_rss_mib(sid))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start.wait()
    for thread in threads:
        thread.join(deadline + 60)
    stop.set()
    sampler.join()
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r.get("outcome", "no answer")] = outcomes.get(r.get("outcome", "no answer"), 0) + 1
    seconds = [r["seconds"] for r in results if r]
    details = {}
    for r in results:
        details.setdefault(r.get("outcome"), r.get("detail"))
    return {"outcomes": outcomes, "max_seconds": max(seconds), "p50_seconds": float(np.median(seconds)),
            "rss_before_mib": round(peak[0], 1), "rss_peak_mib": round(max(peak), 1), "example": details}


def run(kind: str, args: argparse.Namespace, photos: dict[float, bytes], work: Path) -> list[dict]:
    if kind == "app":
        command, ready = ["serve", "--stage", args.stage], "/"
    else:
        command, ready = ["api", "--stage", args.stage, "--no-request-log"], "/ping"
    rows = []
    with server(command, ready, work / f"{kind}.log") as (port, process):
        sid = os.getsid(process.pid)
        client = app_client if kind == "app" else api_client
        warm = client(port, small_photo(), 120)
        if warm[0] != "answered":
            sys.exit(f"{kind}: a small photo was not answered before the load: {warm}")
        for photo in photos.values():
            result = crowd(kind, port, sid, photo, args.clients, args.deadline)
            after = client(port, small_photo(), 120)
            result |= {"server": kind, "megabytes": round(len(photo) / MIB, 1), "clients": args.clients,
                       "fine_afterwards": after[0] == "answered", "after": after[1][:100]}
            result["pass"] = (sum(result["outcomes"].get(o, 0) for o in OK) == args.clients
                              and result["rss_peak_mib"] <= RSS_LIMIT_MIB and result["fine_afterwards"])
            rows.append(result)
            print(f"{kind:3} {result['megabytes']:5.1f} MB x{args.clients}: {result['outcomes']}, "
                  f"slowest {result['max_seconds']:.1f} s, RSS peak {result['rss_peak_mib']:.0f} MiB, "
                  f"fine afterwards: {result['fine_afterwards']} -> {'PASS' if result['pass'] else 'FAIL'}",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--megabytes", type=float, nargs="+", default=[20.0, 14.0])
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds each client may wait")
    parser.add_argument("--servers", default="app,api")
    parser.add_argument("--stage", default="production")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = parser.parse_args()
    photos = {mb: noise_jpeg(mb, seed=i) for i, mb in enumerate(args.megabytes)}
    work = Path(tempfile.mkdtemp(prefix="load-bench-"))
    rows = []
    for kind in args.servers.split(","):
        rows += run(kind, args, photos, work)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    import psutil

    report = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit,
              "command": shlex.join([Path(sys.executable).name, *sys.argv]),
              "machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                          "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
              "deadline_s": args.deadline, "rss_limit_mib": RSS_LIMIT_MIB, "results": rows, "logs": str(work)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}; server logs in {work}")
    sys.exit(0 if all(r["pass"] for r in rows) else 1)


if __name__ == "__main__":
    main()
