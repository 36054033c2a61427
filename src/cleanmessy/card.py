"""The model card: a markdown page logged inside every registered model, shown by the app."""

from __future__ import annotations

import math
import os
from typing import Any

PHOTO_LIMITS = """\
- Trained on few photos: test accuracy on 20–30 images moves 3–5 points per image. Read the
  interval, not the point estimate.
- In the public clean/messy room photos, clean rooms are often staged interior shots and messy
  ones lived-in snapshots: a model can learn "staged vs lived-in" instead of clutter. Check the
  per-class recall and the Grad-CAM heat maps in the app.
- Labels are borderline for some rooms (a few toys on a tidy floor count as messy).
- The model sees the photo squashed to a square of the input size; tiny clutter may vanish.
- Not for decisions about people: it classifies rooms, not their occupants."""

SYNTHETIC_LIMITS = """\
- **Trained only on synthetic pictures**: flat cartoon rooms that the project's generator draws,
  where "messy" means many objects at random angles. It has never seen a photo. Its answers on
  real photos are not meaningful, however confident they look; train on photos for that
  (`ingest.source`, see the README).
- Its test accuracy is measured on more synthetic pictures of the same kind, so it says nothing
  about real rooms.
- The model sees the picture squashed to a square of the input size."""

SOURCE_KINDS = {
    "sample": "the embedded synthetic sample: cartoon rooms drawn by the project's generator, not photos",
    "folder": "photos from the folder {source}",
    "zip": "photos from the archive {source}",
    "url": "photos downloaded from {source}",
}


def data_family(kind: str, source: str) -> str:
    """Which kind of data from which source a model was trained on: `sample` for the embedded
    synthetic sample, else `<kind>:<source>` (`folder:../photos`, `zip:rooms.zip`, `url:https://...`),
    a path as written but normalised (`./photos/` is `photos`). Versions are compared, and
    promoted, only within one family (tracking.decide_production)."""
    if kind == "sample":
        return "sample"
    return f"{kind}:{source if kind == 'url' else os.path.normpath(source)}"


def describe_data(ingest_report: dict[str, Any]) -> dict[str, Any]:
    """What a model was trained on, for people: the kind of source, its family, a sentence, the
    image counts (from data/ingest_report.json). Kept in the registered model's metadata and shown
    by the app and `cleanmessy predict`."""
    kind = ingest_report.get("source_kind", "folder")
    classes = dict(ingest_report["classes"])
    return {"kind": kind, "family": data_family(kind, ingest_report["source"]),
            "description": SOURCE_KINDS.get(kind, SOURCE_KINDS["folder"]).format(source=ingest_report["source"]),
            "n_images": int(sum(classes.values())), "classes": classes}


def data_warning(training_data: dict[str, Any] | None) -> str:
    """The warning for a model that never saw a photo (trained on the embedded sample), in plain
    words; "" for any other. The app shows it beside its model panel, `cleanmessy predict` prints it."""
    if (training_data or {}).get("kind") != "sample":
        return ""
    return ("Not trained on photos. This model learned from synthetic cartoon rooms only, so its answers on real "
            "photos are not meaningful (its test accuracy is on cartoons too). To classify photos, train the "
            "pipeline on a folder of photos (see the README).")


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound for small n and for 0 or n successes)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # rounded: float noise like 0.9999999999999999 reads as a bug in a table
    return round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def familiarity_section(report: dict[str, Any] | None) -> str:
    """The model card's "Familiarity" section: how the `unfamiliar` flag is set, and how often it
    fires on the test split and on the out-of-distribution set (evaluate.familiarity_report)."""
    if not report:
        return ""
    kinds = ", ".join(f"{kind} {m['flag_rate'] * 100:.0f} %" for kind, m in report["by_kind"].items())
    auroc = "n/a" if report["auroc"] is None else f"{report['auroc']:.3f}"
    return f"""
## Familiarity
Every answer carries a `familiarity` score: the share of training photos (each left out) that are at
least as far from their {ordinal(report['familiarity_k'])}-nearest training photo, in the model's features,
as this photo is from its own. Below {report['familiarity_alpha'] * 100:.0f} % the photo is flagged
`unfamiliar`: unlike the photos this model was trained on, so its label is not to be trusted.
- Test split flagged: **{report['flag_rate_in'] * 100:.1f} %** ({report['flagged_in']}/{report['n_in']})
- Out-of-distribution set flagged: **{report['flag_rate_out'] * 100:.1f} %** \
({report['flagged_out']}/{report['n_out']}: {kinds})
- AUROC, test split against the out-of-distribution set: **{auroc}**
"""


def render_card(name: str, data: dict[str, Any], train: dict[str, Any], test: dict[str, Any],
                familiarity: dict[str, Any] | None = None) -> str:
    """Markdown for `name`: the data (what it is in words, source, counts, manifest hash), the
    params the model used, test metrics with their interval, per-class recall, and the known
    limits of a model trained on that kind of data."""
    lo, hi = test["accuracy_ci95_low"], test["accuracy_ci95_high"]
    correct = round(test["accuracy"] * test["n"])
    auc = "n/a" if test["roc_auc"] is None else f"{test['roc_auc']:.3f}"
    rows = "\n".join(f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
                     for c, m in test["per_class"].items())
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in train.items())
    counts = ", ".join(f"{split}: {n}" for split, n in data["split_sizes"].items())
    return f"""# Model card: {name}

## Data
Trained on {data['description']}.
- Source: `{data['source']}`
- Images: {data['n_images']} ({', '.join(f'{c}: {n}' for c, n in data['classes'].items())}); splits {counts}
- Manifest sha256: `{data['manifest_sha256']}`

## Model
| param | value |
|---|---|
{params}

## Test results ({test['n']} images)
- Accuracy **{test['accuracy']:.3f}** ({correct}/{test['n']}), 95 % Wilson interval **[{lo:.3f}, {hi:.3f}]**
- ROC AUC {auc}, macro F1 {test['macro_f1']:.3f}, loss {test['loss']:.4f}

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

{familiarity_section(familiarity)}
## Known limits
{SYNTHETIC_LIMITS if data['kind'] == 'sample' else PHOTO_LIMITS}
"""
