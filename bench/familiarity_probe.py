"""Which features tell a photo unlike the training photos (docs/monitoring.md). From the project
root, after `make run` (the default seed_cnn model in pipeline/model.keras):

    uv run python bench/familiarity_probe.py [--photos ../shared/datasets/clean-messy]

For three feature choices of the workspace's model — the penultimate dense layer, the last conv
block's channel means, and its means with standard deviations (what familiarity.py uses) — and
k = 1 and 5: the k-th-nearest-neighbour detector fitted on the training split and calibrated
leave-one-out, then its flag rate on the test split, on ood.py's generated set and on --photos,
and the AUROC of the test split against both. Prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def flag_rate(detector, features: np.ndarray) -> str:
    flags = detector.unfamiliar(detector.familiarity(detector.scores(features)))
    return f"{flags.mean() * 100:5.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", default=str(ROOT.parent / "shared" / "datasets" / "clean-messy"))
    args = parser.parse_args()

    import keras

    from cleanmessy import familiarity, ood
    from cleanmessy.images import is_image_name, open_rgb, to_model_input
    from cleanmessy.inference import load_model_file
    from cleanmessy.models import feature_map

    model = load_model_file(ROOT / "pipeline" / "model.keras")
    size = int(model.input_shape[1])
    layers = keras.Model(model.inputs, [model.get_layer("probabilities").input, feature_map(model)])

    def load(files: list[Path]) -> np.ndarray:
        return np.stack([to_model_input(open_rgb(f)[0], size) for f in files])

    def features(x: np.ndarray) -> dict[str, np.ndarray]:
        penultimate, maps = layers.predict(x, verbose=0)
        means, stds = maps.mean(axis=(1, 2)), maps.std(axis=(1, 2))

        def unit(a: np.ndarray) -> np.ndarray:
            return (a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)).astype(np.float32)

        return {"penultimate": unit(penultimate), "conv means": unit(means),
                "conv means+stds": familiarity.embed(np.concatenate([means, stds], axis=1))}

    split = {s: pd.read_csv(ROOT / "data" / "splits" / f"{s}.csv") for s in ("train", "test")}
    train = features(load([ROOT / p for p in split["train"]["path"]]))
    test = features(load([ROOT / p for p in split["test"]["path"]]))
    generated = features(np.stack([to_model_input(img, size) for _, img in ood.pictures(True)]))
    photos = Path(args.photos)
    real_files = sorted(p for p in photos.rglob("*") if p.is_file() and is_image_name(p)) if photos.is_dir() else []
    real = features(load(real_files)) if real_files else None

    print(f"{len(split['train'])} training, {len(split['test'])} test, {len(generated['penultimate'])} generated, "
          f"{len(real_files)} real photos")
    print(f"{'features':16} {'k':>2} {'test':>6} {'generated':>10} {'real':>6} {'AUROC':>6}")
    for name in train:
        for k in (1, 5):
            detector = familiarity.fit(train[name], k=k)
            out = [generated[name]] + ([real[name]] if real else [])
            auroc = familiarity.auroc(detector.scores(test[name]), detector.scores(np.concatenate(out)))
            rates = [flag_rate(detector, f[name]) if f else "     -" for f in (test, generated, real)]
            print(f"{name:16} {k:2d} {rates[0]} {rates[1]:>10} {rates[2]} {auroc:6.3f}")


if __name__ == "__main__":
    main()
