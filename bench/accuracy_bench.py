"""Accuracy and cost benchmark on real photos (issue: real-photo accuracy). From the project root:

    CLEANMESSY_KERAS_WEIGHTS=../shared/keras-weights uv run python bench/accuracy_bench.py \\
        [--source ../shared/datasets/clean-messy] [--folds 5] [--repeats 1] [--configs NAME ...] [--out FILE]

For each configuration, in a throw-away copy of the project: `cleanmessy cv` (repeated stratified
k-fold) in its own process, reporting cross-validated accuracy with its 95 % interval, mean
training time per fold, peak memory (max RSS of that process) and inference images/s (compiled
forward pass). Prints a table and writes bench/results/accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from cleanmessy.console import QUIET_ENVIRONMENT
from cleanmessy.params import with_changes

ROOT = Path(__file__).resolve().parents[1]
NO_AUGMENT = {"flip": "none", "rotation": 0.0}
REAL_PHOTOS = yaml.safe_load((ROOT / "experiments" / "real-photos.yaml").read_text())
CONFIGS = {
    # The seed notebook's model at its 256 px for its full 50 epochs (patience 50: no early stop).
    "seed_cnn_256": {"base": {"image_size": 256}, "train": {"arch": "seed_cnn", "epochs": 50, "patience": 50}},
    "mobilenet_0.25_224": {"base": {"image_size": 224}, "train": {
        "arch": "mobilenet", "alpha": 0.25, "epochs": 100, "patience": 10, "dropout": 0.5, "augment": NO_AUGMENT}},
    "mobilenet_v2_0.35_224": {"base": {"image_size": 224}, "train": {
        "arch": "mobilenet_v2", "alpha": 0.35, "epochs": 100, "patience": 10, "dropout": 0.5, "augment": NO_AUGMENT}},
    # The levers, one at a time: a logistic head (L2, no epochs) on the whole photo and its mirror,
    # then the full multi-view configuration of experiments/real-photos.yaml, on each backbone.
    "mobilenet_v2_0.35_logistic_flip": {"base": {"image_size": 224}, "train": {
        "arch": "mobilenet_v2", "alpha": 0.35, "augment": NO_AUGMENT, "head": "logistic", "views": {"flip": True}}},
    "mobilenet_0.25_multiview": with_changes(REAL_PHOTOS, {"train": {"arch": "mobilenet", "alpha": 0.25}}),
    "real_photos": REAL_PHOTOS,  # mobilenet_v2 0.35, multi-view
}


def run_measured(cmd: list[str], cwd: Path, env: dict) -> tuple[int, float, float]:
    """(exit status, wall seconds, peak RSS in MiB) of one process."""
    started = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.stderr.write(process.stderr.read()[-4000:])
    return process.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "datasets" / "clean-messy"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "accuracy.json")
    args = parser.parse_args()
    source = Path(args.source).resolve()
    if not source.is_dir():
        sys.exit(f"no photos at {source}: pass --source")

    work = Path(tempfile.mkdtemp(prefix="accuracy-bench-"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, work / name)
    env = {**QUIET_ENVIRONMENT, **os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    changes = {"ingest": {"source": str(source)}, "cv": {"folds": args.folds, "repeats": args.repeats}}
    base_params = with_changes(yaml.safe_load((ROOT / "params.yaml").read_text()), changes)
    (work / "params.yaml").write_text(yaml.safe_dump(base_params, sort_keys=False))
    status, _, _ = run_measured(["cleanmessy", "ingest"], work, env)
    if status:
        sys.exit("ingest failed")

    rows = []
    for name in args.configs:
        params = with_changes(base_params, CONFIGS[name])
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        print(f"running {name} ...", flush=True)
        status, wall, rss = run_measured(["cleanmessy", "cv"], work, env)
        if status:
            sys.exit(f"cv failed for {name}")
        summary = json.loads((work / "pipeline" / "cv.json").read_text())["summary"]
        rows.append({"config": name, **summary, "cv_wall_seconds": wall, "peak_rss_mib": rss,
                     "params": CONFIGS[name]})

    seed = next((r for r in rows if r["config"].startswith("seed_cnn")), None)
    print(f"\n{args.folds}-fold x {args.repeats} CV on {rows[0]['n_images']} photos, {os.cpu_count()} CPUs")
    print(f"{'config':24} {'accuracy':>9} {'95% interval':>16} {'train s/fold':>13} {'peak MiB':>9} "
          f"{'infer img/s':>12}")
    for r in rows:
        if seed:
            r["train_speedup_vs_seed_cnn"] = seed["train_seconds_mean"] / r["train_seconds_mean"]
        print(f"{r['config']:24} {r['accuracy_mean']:9.4f} "
              f"[{r['accuracy_ci95_low']:.3f}, {r['accuracy_ci95_high']:.3f}] "
              f"{r['train_seconds_mean']:13.1f} {r['peak_rss_mib']:9.0f} {r['infer_images_per_s']:12.0f}")
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"folds": args.folds, "repeats": args.repeats, "source": str(source), "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
