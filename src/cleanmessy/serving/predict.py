"""`cleanmessy predict PATH...`: classify photos with a registered model, in batches.

Unreadable files, and photos smaller than the model's `min_side`, get a row with the reason in
`error`; they never stop the batch. Every photo gets its `familiarity` (familiarity.py), and a
photo unlike the model's training photos the status `unfamiliar`. Every row names the model and
the data it was trained on; a model trained on the synthetic sample is also warned about on stderr.
The printed table fits a 100-column terminal: failed rows show their reason code, the full reasons
are listed under the table (and kept whole in the --out CSV)."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cleanmessy.card import data_warning
from cleanmessy.errors import UserError
from cleanmessy.images import is_image_name

if TYPE_CHECKING:
    from cleanmessy.serving.model import ServedModel

log = logging.getLogger(__name__)
WIDTH = 100  # printed lines fit a 100-column terminal


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


def predict_files(served: ServedModel, files: list[Path], batch_size: int = 32) -> pd.DataFrame:
    """One row per file: path, label, one confidence column per class, error; then the model and
    its data family. The files' bytes go through the registered model itself (`served.classify`,
    as the REST server's rows do), a forward step at a time (at most `batch_size`), so memory holds
    one step's photos; a file is read up to one byte past the model's limit, which refuses it."""
    from cleanmessy.pyfunc import MAX_PHOTO_BYTES, MAX_ROWS

    frames = []
    for chunk in _chunks(files, min(batch_size, served.photos_per_step, MAX_ROWS)):
        photos, unreadable = [], {}
        for i, path in enumerate(chunk):
            try:
                with path.open("rb") as f:
                    photos.append(f.read(MAX_PHOTO_BYTES + 1))
            except OSError as exc:  # missing, a folder, no permission
                photos.append(b"")
                unreadable[i] = f"unreadable: {exc.strerror or exc}"
        rows = served.classify(photos)
        for i, reason in unreadable.items():
            rows.loc[i, "error"] = reason
        rows.insert(0, "path", [str(p) for p in chunk])
        frames.append(rows)
    columns = ["path", "label", *served.class_names, "familiarity", "unfamiliar", "error"]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    # Which model, trained on which data (card.data_family), with every row: a CSV outlives the run.
    frame["model"] = served.version.uri
    frame["trained_on"] = (served.training_data or {}).get("family") or "not recorded"
    return frame


def _shorten(text: str, width: int) -> str:
    """`text` cut to `width` characters, keeping its end (a path's file name): "...s/clean_0001.png"."""
    return text if len(text) <= width else "..." + text[-(width - 3):]


def render(frame: pd.DataFrame, class_names: list[str], width: int = WIDTH) -> str:
    """The table for the terminal, then the failed files with their full reasons. Lines fit `width`
    (unless there are too many classes for it): long paths are shortened in the table, from the
    front, and wrapped below it."""
    errors = frame["error"].astype(str)
    # the reason code (not_an_image, too_small, ...); "unfamiliar" for a photo unlike the training photos
    status = [e.split(":", 1)[0] if e else "unfamiliar" if flag is True else "ok"
              for e, flag in zip(errors, frame["unfamiliar"])]
    columns = {"label": frame["label"].astype(str).tolist(), "status": status}
    for c in (*class_names, "familiarity"):
        columns[c] = ["" if v is None or pd.isna(v) else f"{v:.4f}" for v in frame[c]]
    widths = {name: max(len(name), *(len(v) for v in values)) for name, values in columns.items()}
    path_width = max(16, width - sum(widths.values()) - 2 * len(widths))
    paths = [_shorten(str(p), path_width) for p in frame["path"]]
    path_width = max(len("path"), *(len(p) for p in paths))
    order = ["label", *class_names, "familiarity", "status"]
    right = {*class_names, "familiarity"}

    def line(path: str, values: dict[str, str]) -> str:
        cells = [path.ljust(path_width)] + [values[n].rjust(widths[n]) if n in right else values[n].ljust(widths[n])
                                            for n in order]
        return "  ".join(cells).rstrip()

    lines = [line("path", {n: n for n in order})]
    lines += [line(p, {n: columns[n][i] for n in order}) for i, p in enumerate(paths)]
    failed = [(str(p), e) for p, e in zip(frame["path"], errors) if e]
    if failed:
        lines += ["", f"not classified ({len(failed)}):"]
        for path, error in failed:
            lines += textwrap.wrap(f"{path}: {error}", width, initial_indent="  ", subsequent_indent="    ",
                                   break_on_hyphens=False)
    return "\n".join(lines)


def run(paths: list[Path], model_uri: Callable[[], str], out: Path | None, batch_size: int) -> int:
    """The CLI command: prints a table, writes CSV if asked; exit 1 if any file failed.
    `model_uri` is asked for only once the options are known good (it needs MLflow)."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise UserError(f"--out {out}: " + ("is a folder; give a file name" if out.is_dir()
                                             else f"folder {out.parent} does not exist"))
    files = collect(paths)
    if not files:
        print("predict: no image files found in the given paths", file=sys.stderr)
        return 1
    from cleanmessy.serving.model import ServedModel  # TensorFlow: only once the options are known good

    served = ServedModel.load(model_uri())
    if warning := data_warning(served.training_data):  # as the app warns over its panel
        print(textwrap.fill(f"predict: warning: {served.version.uri}: {warning}", WIDTH), file=sys.stderr)
    frame = predict_files(served, files, batch_size)
    try:
        print(render(frame, served.class_names), flush=True)
    except BrokenPipeError:  # `cleanmessy predict ... | head`: the reader left; the CSV is still written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if out is not None:
        try:
            frame.to_csv(out, index=False)
        except OSError as exc:
            raise UserError(f"cannot write --out {out}: {exc.strerror or exc}") from None
        print(f"predict: wrote {len(frame)} rows to {out}", file=sys.stderr)
    unfamiliar = int((frame["unfamiliar"] == True).sum())  # noqa: E712 (None for rows not classified)
    if unfamiliar:
        print(textwrap.fill(f"predict: {unfamiliar} of {len(frame)} photos are unlike the photos this model was "
                            "trained on (status unfamiliar): don't trust their labels", WIDTH), file=sys.stderr)
    failed = int((frame["error"] != "").sum())
    if failed:
        print(f"predict: {failed} of {len(frame)} files could not be classified (reasons under the table)",
              file=sys.stderr)
    return 1 if failed else 0
