"""Which views are worth their cost? A quick probe of `train.views` choices on real photos. From the
project root:

    CLEANMESSY_KERAS_WEIGHTS=../shared/keras-weights uv run python bench/views_probe.py \\
        [--source ../shared/datasets/clean-messy] [--repeats 10] [--out FILE]

The MobileNetV2 0.35 backbone sees each photo (224 px) and its mirror once; the schemes below are
then pooled from those feature maps, and crops for comparison go through the backbone each (the
28 views of 224 px crops from the 299 px photo that an earlier `experiments/real-photos.yaml`
used). Each scheme is scored by repeated stratified 5-fold CV of the logistic head
(`train.head: logistic`, C = 0.1), fitted as `cleanmessy train` fits it, on every view of the
training photos, predicting from the mean view. Seconds of backbone time per photo are measured
here. Writes bench/results/views.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import RepeatedStratifiedKFold

from cleanmessy.crossval import summarize
from cleanmessy.images import load_for_model
from cleanmessy.layers import RegionPool, view_boxes
from cleanmessy.models import POOL, VIEW_FEATURES, VIEWS, build_model
from cleanmessy.params import parse_params
from cleanmessy.training import fit_logistic

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = {  # name: (regions, normalize)
    "whole photo + mirror (2 views)": ([], False),
    "+ 3x3 regions of 60 % (20 views)": ([(0.6, 3)], False),
    "+ 2x2 of 80 %, 3x3 of 60 % (28 views)": ([(0.8, 2), (0.6, 3)], False),
    "+ 3x3 regions of 60 %, normalised (20 views)": ([(0.6, 3)], True),
}


def feature_maps(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """(photos, passes, h, w, c): the backbone's last feature maps of each photo (and mirror)."""
    import keras

    passes = model.get_layer(VIEWS).n_passes
    maps = keras.Model(model.inputs, model.get_layer(POOL).input)
    out = [maps.predict(images[i:i + batch], verbose=0) for i in range(0, len(images), batch)]
    return np.concatenate([m.reshape(passes, -1, *m.shape[1:]).swapaxes(0, 1) for m in out])


def pooled_views(maps: np.ndarray, regions: list[tuple[float, int]], normalize: bool) -> np.ndarray:
    """(photos, views, c): the model's own `pool` (and `view_normalize`) layers on the cached maps."""
    import keras

    n, passes, h, w, c = maps.shape
    views = RegionPool(view_boxes(regions))(maps.reshape(n * passes, h, w, c))
    if normalize:
        views = keras.layers.UnitNormalization()(views)
    return keras.ops.convert_to_numpy(views).reshape(n, -1, c)  # each photo's passes, then their regions


def cross_validate(views: np.ndarray, labels: np.ndarray, repeats: int, c: float = 0.1, seed: int = 42) -> dict:
    accuracies = []
    splitter = RepeatedStratifiedKFold(n_splits=5, n_repeats=repeats, random_state=seed)
    for train, test in splitter.split(views[:, 0], labels):
        x = views[train].reshape(-1, views.shape[-1])
        kernel, bias = fit_logistic(x, np.repeat(labels[train], views.shape[1]), 2, c)
        accuracies.append(float(np.mean((views[test].mean(axis=1) @ kernel + bias).argmax(1) == labels[test])))
    per_repeat = np.reshape(accuracies, (repeats, 5)).mean(axis=1)
    return {**summarize(accuracies, len(labels)), "repeat_sd": float(per_repeat.std()),
            "repeat_min": float(per_repeat.min()), "repeat_max": float(per_repeat.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "datasets" / "clean-messy")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "views.json")
    args = parser.parse_args()
    files = sorted(f for f in args.source.rglob("*") if f.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not files:
        raise SystemExit(f"no photos under {args.source}: pass --source")
    labels = np.array([f.parent.name == "messy" for f in files], dtype=int)
    train = {"arch": "mobilenet_v2", "alpha": 0.35, "augment": {"flip": "none", "rotation": 0}, "head": "logistic"}

    photos = np.stack([load_for_model(f, 224) for f in files])
    model = build_model(2, 224, parse_params({"train": {**train, "views": {"flip": True}}}).train, seed=0)
    feature_maps(model, photos[:2])  # trace outside the timing
    started = time.perf_counter()
    maps = feature_maps(model, photos)
    map_seconds = (time.perf_counter() - started) / len(files)
    rows = []
    for name, (regions, normalize) in SCHEMES.items():
        rows.append({"scheme": name, "backbone_seconds_per_photo": map_seconds,
                     **cross_validate(pooled_views(maps, regions, normalize), labels, args.repeats)})

    # For comparison: crops through the backbone, one pass each (28 per photo).
    import keras
    import tensorflow as tf

    large = np.stack([load_for_model(f, 299) for f in files]).astype("float32")
    boxes = tf.constant(view_boxes([(0.8, 2), (0.6, 3)]), tf.float32)
    plain = build_model(2, 224, parse_params({"train": train}).train, seed=0)
    features = keras.Model(plain.inputs, plain.get_layer(VIEW_FEATURES).output)
    started = time.perf_counter()
    crops = []
    for image in large:
        views = tf.image.crop_and_resize(image[None], boxes, tf.zeros(len(boxes), tf.int32), (224, 224))
        views = tf.cast(tf.round(tf.concat([views, tf.reverse(views, [2])], 0)), tf.uint8)
        crops.append(features.predict(views, verbose=0)[:, 0])
    crop_seconds = (time.perf_counter() - started) / len(files)
    rows.append({"scheme": "28 crops of the 299 px photo through the backbone",
                 "backbone_seconds_per_photo": crop_seconds,
                 **cross_validate(np.stack(crops), labels, args.repeats)})

    print(f"5-fold x {args.repeats} CV, logistic head, {len(files)} photos")
    print(f"{'scheme':52} {'accuracy':>9} {'95% interval':>16} {'repeat sd':>10} {'backbone s/photo':>17}")
    for r in rows:
        print(f"{r['scheme']:52} {r['accuracy_mean']:9.4f} "
              f"[{r['accuracy_ci95_low']:.3f}, {r['accuracy_ci95_high']:.3f}] "
              f"{r['repeat_sd']:10.4f} {r['backbone_seconds_per_photo']:17.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"repeats": args.repeats, "source": str(args.source), "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
