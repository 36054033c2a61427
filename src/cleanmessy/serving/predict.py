"""`cleanmessy predict PATH...`: classify photos with a registered model, in batches.

Unreadable files get a row with the reason in `error`; they never stop the batch."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from cleanmessy.images import DEFAULT_MAX_PIXELS, ImageError, is_image_name, load_for_model
from cleanmessy.serving.model import ServedModel

log = logging.getLogger(__name__)


def collect(paths: list[Path]) -> list[Path]:
    """Files as given; folders searched recursively for image files (hidden ones skipped)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p)
                          and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            out.append(path)  # missing or unreadable files are reported in their row
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def predict_files(served: ServedModel, files: list[Path], batch_size: int = 32,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> pd.DataFrame:
    """One row per file: path, label, one confidence column per class, error."""
    rows: list[dict] = []
    for chunk in _chunks(files, batch_size):
        arrays, ok_rows = [], []
        for path in chunk:
            row = {"path": str(path), "label": "", **{c: np.nan for c in served.class_names}, "error": ""}
            try:
                arrays.append(load_for_model(path, served.image_size, max_pixels))
                ok_rows.append(row)
            except ImageError as exc:
                row["error"] = f"{exc.reason}: {exc}"
            except OSError as exc:  # missing, a folder, no permission
                row["error"] = f"unreadable: {exc.strerror or exc}"
            rows.append(row)
        if arrays:
            probs = served.predict(np.stack(arrays))
            for row, p in zip(ok_rows, probs):
                row["label"] = served.class_names[int(p.argmax())]
                row.update({c: float(v) for c, v in zip(served.class_names, p)})
    return pd.DataFrame(rows, columns=["path", "label", *served.class_names, "error"])


def run(paths: list[Path], model_uri: str, out: Path | None, batch_size: int) -> int:
    """The CLI command: prints a table, writes CSV if asked; exit 1 if any file failed."""
    files = collect(paths)
    if not files:
        print("predict: no image files found in the given paths", file=sys.stderr)
        return 1
    served = ServedModel.load(model_uri)
    frame = predict_files(served, files, batch_size)
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 80):
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep=""))
    if out is not None:
        frame.to_csv(out, index=False)
        print(f"predict: wrote {len(frame)} rows to {out}", file=sys.stderr)
    failed = int((frame["error"] != "").sum())
    if failed:
        print(f"predict: {failed} of {len(frame)} files could not be classified (see the error column)",
              file=sys.stderr)
    return 1 if failed else 0
