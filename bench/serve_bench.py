"""Serving benchmark (issue: serve the registered model). Run from the project root after `make run`:

    uv run python bench/serve_bench.py [--stage production] [--requests 100] [--images 200]

Measures, on this machine, for the model the registry holds at --stage:
- single-image latency through the app's HTTP API (p50/p95, gradio_client, sequential requests);
- the HTTP round trip of a no-op Gradio function taking the same upload (the floor any Gradio app pays);
- the raw in-process forward pass (compiled) and the in-process forward + Grad-CAM the app runs;
- `cleanmessy predict` throughput on --images photos vs a bare `model.predict` loop with the same decoding.
Targets: served p50 <= 1.5 x (raw forward + no-op round trip); predict >= 0.9 x the bare loop.
Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cleanmessy.console import quiet_environment

quiet_environment()  # before MLflow, Gradio or TensorFlow is imported
ROOT = Path(__file__).resolve().parents[1]
CLEANMESSY = Path(sys.executable).parent / "cleanmessy"  # the CLI of the environment running this


@contextlib.contextmanager
def serving(project: Path, log: Path, *args: str, timeout: float = 180) -> Iterator[str]:
    """`cleanmessy serve` as a user starts it, on a free loopback port; yields its URL once it
    answers, stops it (its whole process group) after. Its console goes to `log`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    with log.open("w") as out:
        process = subprocess.Popen([str(CLEANMESSY), "serve", "--port", str(port), *args], cwd=project, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                sys.exit(f"cleanmessy serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                sys.exit(f"{url} did not answer within {timeout:.0f} s; see {log}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "n": len(ms)}


def time_calls(fn, n: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def noop_round_trip(photo: str, n: int) -> dict[str, float]:
    """A Gradio app whose function does nothing with the same upload: the HTTP + queue floor."""
    import gradio as gr
    from gradio_client import Client, handle_file

    with gr.Blocks() as demo:
        inp = gr.Image(type="filepath", image_mode=None)
        out = gr.Textbox()
        gr.Button().click(lambda p: "ok", inp, out, api_name="noop")
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        client = Client(demo.local_url, verbose=False)
        return percentiles(time_calls(lambda: client.predict(handle_file(photo), api_name="/noop"), n))
    finally:
        demo.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="production")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    from cleanmessy import sample, tracking
    from cleanmessy.images import load_for_model, open_rgb
    from cleanmessy.project import project_paths
    from cleanmessy.serving.model import ServedModel
    from cleanmessy.serving.predict import predict_files

    tracking.connect(project_paths(ROOT))
    uri = tracking.model_uri_for("clean-vs-messy", args.stage)
    served = ServedModel.load(uri)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    files = []
    for i in range(args.images):  # photos of the embedded sample at a typical upload size
        path = work / f"{i:04d}.png"
        sample.render(sample.CLASSES[i % 2], i, size=256).save(path)
        files.append(path)
    photo = str(files[1])
    x = load_for_model(files[1], served.image_size)[None]
    pil, _ = open_rgb(files[1])

    raw_forward = percentiles(time_calls(lambda: served.predict(x), args.requests))
    raw_explain = percentiles(time_calls(lambda: served.explain(pil), args.requests))
    noop = noop_round_trip(photo, args.requests)
    with serving(ROOT, work / "serve.log", "--stage", args.stage) as url:
        client = Client(url, verbose=False)
        app = percentiles(time_calls(lambda: client.predict(handle_file(photo), api_name="/predict"), args.requests))
        # The same call without fetching the heat-map file: the label alone, as an API user may want.
        no_download = Client(url, verbose=False, download_files=False)
        app_label_only = percentiles(time_calls(
            lambda: no_download.predict(handle_file(photo), api_name="/predict"), args.requests))

    batch = 32

    def bare_loop() -> None:
        for i in range(0, len(files), batch):
            arrays = np.stack([load_for_model(p, served.image_size) for p in files[i:i + batch]])
            served.keras_model.predict(arrays, verbose=0)

    bare_s = min(time_calls(bare_loop, 3, warmup=1))
    ours_s = min(time_calls(lambda: predict_files(served, files, batch), 3, warmup=1))

    floor = raw_forward["p50_ms"] + noop["p50_ms"]
    result = {
        "model": served.info()["uri"], "image_size": served.image_size,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "app_http": app, "app_http_without_heatmap_download": app_label_only, "noop_gradio_http": noop,
        "raw_forward": raw_forward, "raw_forward_gradcam": raw_explain,
        "served_p50_over_floor": app["p50_ms"] / floor,
        "served_p50_over_floor_without_heatmap_download": app_label_only["p50_ms"] / floor,
        "predict_images_per_s": len(files) / ours_s, "bare_predict_loop_images_per_s": len(files) / bare_s,
        "predict_over_bare": bare_s / ours_s,
    }
    out = ROOT / "bench" / "results" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"model {result['model']} ({served.image_size} px) on {result['cpus']} CPUs")
    print(f"{'measure':38} {'p50 ms':>9} {'p95 ms':>9}")
    for name, key in (("app HTTP /predict (label + Grad-CAM)", "app_http"),
                      ("  same, heat-map file not fetched", "app_http_without_heatmap_download"),
                      ("no-op Gradio HTTP round trip", "noop_gradio_http"),
                      ("raw forward (compiled)", "raw_forward"), ("raw forward + Grad-CAM", "raw_forward_gradcam")):
        print(f"{name:38} {result[key]['p50_ms']:9.2f} {result[key]['p95_ms']:9.2f}")
    print(f"served p50 / (raw forward + no-op round trip) = {result['served_p50_over_floor']:.2f}  (target <= 1.5); "
          f"without fetching the heat map {result['served_p50_over_floor_without_heatmap_download']:.2f}")
    print(f"predict CLI {result['predict_images_per_s']:.0f} img/s vs bare model.predict loop "
          f"{result['bare_predict_loop_images_per_s']:.0f} img/s = {result['predict_over_bare']:.2f}x  (target >= 0.9)")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
