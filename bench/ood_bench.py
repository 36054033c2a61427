"""Familiarity benchmark (issue: know when not to trust the model). From the project root:

    CLEANMESSY_KERAS_WEIGHTS=../shared/keras-weights uv run python bench/ood_bench.py \\
        [--photos ../shared/datasets/clean-messy] [--configs default real_photos] [--out FILE]

For each configuration, in a throw-away copy of the project (its own MLflow store), the pipeline's
own stages (`cleanmessy ingest`, `split`, `train`, `evaluate`), then what evaluate measured
(pipeline/ood.json, evaluation.json's `familiarity`):
- `default`: params.yaml as it is (seed_cnn on the embedded synthetic sample). Its other domain is
  real room photos: the trained model and its detector also score every photo of --photos, and the
  share flagged `unfamiliar` is reported (target >= 90 %).
- `real_photos`: experiments/real-photos.yaml trained on --photos (its OOD set includes the
  synthetic sample).
Targets (issue 20), for both: flag rate on the test split <= 10 %, OOD AUROC >= 0.95.
Prints a table and writes bench/results/ood.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from cleanmessy.console import QUIET_ENVIRONMENT
from cleanmessy.params import with_changes

ROOT = Path(__file__).resolve().parents[1]
REAL_PHOTOS = yaml.safe_load((ROOT / "experiments" / "real-photos.yaml").read_text())


def run_stages(work: Path, env: dict) -> None:
    for stage in ("ingest", "split", "train", "evaluate"):
        result = subprocess.run(["cleanmessy", stage], cwd=work, env=env, capture_output=True, text=True)
        if result.returncode:
            sys.stderr.write(result.stderr[-4000:])
            sys.exit(f"cleanmessy {stage} failed")


def flag_rate_on(work: Path, photos: Path) -> dict:
    """The trained model's detector on every photo under `photos`: how many it flags unfamiliar."""
    import numpy as np

    from cleanmessy.familiarity import Familiarity, embed
    from cleanmessy.images import ImageError, is_image_name, open_rgb, to_model_input
    from cleanmessy.inference import Predictor, load_model_file

    model = load_model_file(work / "pipeline" / "model.keras")
    size = int(model.input_shape[1])
    arrays = []
    for file in sorted(p for p in photos.rglob("*") if p.is_file() and is_image_name(p)):
        try:
            arrays.append(to_model_input(open_rgb(file)[0], size))
        except ImageError:
            continue
    _, stats = Predictor(model, size).with_features(np.stack(arrays))
    detector = Familiarity.load(work / "pipeline" / "familiarity.npz")
    flags = detector.unfamiliar(detector.familiarity(detector.scores(embed(stats))))
    return {"n": len(flags), "flagged": int(flags.sum()), "flag_rate": float(flags.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", default=str(ROOT.parent / "shared" / "datasets" / "clean-messy"))
    parser.add_argument("--configs", nargs="+", default=["default", "real_photos"], choices=["default", "real_photos"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ood.json")
    args = parser.parse_args()
    photos = Path(args.photos).resolve()
    if not photos.is_dir():
        sys.exit(f"no photos at {photos}: pass --photos")
    env = {**QUIET_ENVIRONMENT, **os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if env.get("CLEANMESSY_KERAS_WEIGHTS"):  # the stages run in another folder
        env["CLEANMESSY_KERAS_WEIGHTS"] = str(Path(env["CLEANMESSY_KERAS_WEIGHTS"]).resolve())
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    rows = []
    for name in args.configs:
        work = Path(tempfile.mkdtemp(prefix="ood-bench-"))
        try:
            for file in ("dvc.yaml", "params.yaml"):
                shutil.copy2(ROOT / file, work / file)
            for folder in ("data/sample", "data/feedback"):
                shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("*.png", "*.jpg",
                                                                                            "*.jsonl"))
            params = base if name == "default" else with_changes(
                with_changes(base, REAL_PHOTOS), {"ingest": {"source": str(photos)}})
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            print(f"running {name} ...", flush=True)
            run_stages(work, env)
            headline = json.loads((work / "pipeline" / "ood.json").read_text())
            report = json.loads((work / "pipeline" / "evaluation.json").read_text())["familiarity"]
            row = {"config": name, **headline, "n_in": report["n_in"], "n_out": report["n_out"],
                   "by_kind": report["by_kind"], "threshold": report["familiarity_threshold"]}
            if name == "default":
                row["real_photos"] = flag_rate_on(work, photos)
            rows.append(row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'config':12} {'auroc':>7} {'flag_in':>8} {'flag_out':>9} {'real photos flagged':>20}")
    for r in rows:
        real = r.get("real_photos")
        real_text = f"{real['flagged']}/{real['n']} ({real['flag_rate'] * 100:.1f} %)" if real else "-"
        print(f"{r['config']:12} {r['auroc']:7.3f} {r['flag_in'] * 100:7.1f}% {r['flag_out'] * 100:8.1f}% "
              f"{real_text:>20}")
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"photos": str(photos), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
