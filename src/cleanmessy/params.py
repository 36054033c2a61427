"""Load and validate params.yaml once; each stage gets a typed section, errors name the key."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cleanmessy.errors import UserError
from cleanmessy.images import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class BaseParams:
    seed: int = 42
    image_size: int = 64  # side in pixels of the square uint8 RGB image the model takes


@dataclass(frozen=True)
class IngestParams:
    source: str = "data/sample"  # folder | .zip | http(s):// URL of a zip | a sample recipe folder
    sha256: str = ""  # required for URL sources: the download is checked against it
    min_side: int = 32  # images smaller than this (either side) are rejected
    max_pixels: int = DEFAULT_MAX_PIXELS  # decoding budget: larger images are rejected, never decoded
    feedback_max_share: float = 0.25  # data/feedback adds at most this share of a class's source photos


@dataclass(frozen=True)
class SplitParams:
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    keep_source_split: bool = False  # use the source's own train/val/test folders when it has them


@dataclass(frozen=True)
class AugmentParams:
    flip: Literal["horizontal", "vertical", "horizontal_and_vertical", "none"] = "horizontal"
    rotation: float = 0.1  # fraction of a full turn, as keras.layers.RandomRotation


@dataclass(frozen=True)
class ViewParams:
    """Transfer models only: test-time augmentation inside the model. Each photo goes through the
    backbone at `size` (and mirrored, with `flip`); besides the whole feature map, each `regions`
    entry `[side fraction, grid]` pools a grid x grid of square regions of it as extra views. With
    `normalize`, each view's features are scaled to unit length. The head trains on every view and
    predicts from their mean."""

    regions: list[list[float]] = field(default_factory=list)  # e.g. [[0.6, 3]]
    flip: bool = False
    normalize: bool = False
    size: int = 0  # side the photo is resized to for the backbone; 0 = base.image_size

    def region_grids(self) -> list[tuple[float, int]]:
        return [(float(side), int(grid)) for side, grid in self.regions]


@dataclass(frozen=True)
class TrainParams:
    arch: Literal["seed_cnn", "mobilenet", "mobilenet_v2"] = "seed_cnn"
    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 0.001
    patience: int = 8  # early stopping on val loss; the best epoch's weights are kept
    filters: list[int] = field(default_factory=lambda: [32, 64])  # one Conv2D+MaxPool block each
    dense_units: int = 64
    dropout: float = 0.0
    augment: AugmentParams = field(default_factory=AugmentParams)
    # Transfer learning (arch mobilenet / mobilenet_v2): a new head on a frozen ImageNet backbone,
    # then optionally the top `fine_tune_layers` layers of the backbone trained at a lower rate.
    alpha: float = 0.25  # backbone width: mobilenet 0.25/0.5/0.75/1.0, mobilenet_v2 0.35/0.5/0.75/1.0/1.3/1.4
    weights: Literal["imagenet", "none"] = "imagenet"
    fine_tune_layers: int = 0
    fine_tune_epochs: int = 10
    fine_tune_learning_rate: float = 0.00001
    views: ViewParams = field(default_factory=ViewParams)
    # dense: a softmax layer trained with Adam and early stopping; logistic: an L2-regularised
    # logistic regression on standardised cached features (no epochs), folded into that layer.
    head: Literal["dense", "logistic"] = "dense"
    head_c: float = 0.1  # logistic head: inverse L2 strength (scikit-learn's C)
    # Scale (README "Scaling out"): where training runs, and how much decoded data it keeps in memory.
    distribute: Literal["none", "mirrored", "multi_worker"] = "none"  # tf.distribute strategy
    memory_mb: int = 512  # per cache (a split's decoded images or features): memory up to this, else a scratch file


@dataclass(frozen=True)
class EvaluateParams:
    model_name: str = "clean-vs-messy"  # registered model name in the MLflow registry
    min_accuracy: float = 0.8  # test accuracy a version needs before it may become `production`


@dataclass(frozen=True)
class CvParams:
    folds: int = 5  # `cleanmessy cv`: repeated stratified k-fold over all ingested images
    repeats: int = 2


@dataclass(frozen=True)
class PlotParams:
    grid_images: int = 12
    dpi: int = 100


@dataclass(frozen=True)
class Params:
    base: BaseParams = field(default_factory=BaseParams)
    ingest: IngestParams = field(default_factory=IngestParams)
    split: SplitParams = field(default_factory=SplitParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    plot: PlotParams = field(default_factory=PlotParams)
    cv: CvParams = field(default_factory=CvParams)


MAX_SOURCE = 4096  # characters of ingest.source (PATH_MAX); a file or folder name has at most 255


def _check_source(source: str) -> None:
    if len(source) > MAX_SOURCE:
        raise UserError(f"params.yaml: ingest.source is {len(source):,} characters; a path or URL has at most "
                        f"{MAX_SOURCE:,} (starts {excerpt(source, 40)})")
    if "\0" in source:
        raise UserError("params.yaml: ingest.source holds a NUL character; no path or URL does")
    if not source.startswith(("http://", "https://")):
        long = next((part for part in source.split("/") if len(part.encode()) > 255), None)
        if long is not None:
            raise UserError(f"params.yaml: ingest.source has a name of {len(long.encode())} bytes "
                            f"({excerpt(long, 40)}); a file or folder name has at most 255")


def _check_values(p: Params) -> None:
    _check_source(p.ingest.source)
    for key, value in flatten(p).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"params.yaml: {key} must be a finite number, got {excerpt(value)}")
    if p.base.seed < 0:
        raise UserError(f"params.yaml: base.seed must be 0 or more, got {p.base.seed}")
    if p.train.patience < 0:
        raise UserError(f"params.yaml: train.patience must be 0 or more, got {p.train.patience}")
    s = p.split
    for key, value in (("val_fraction", s.val_fraction), ("test_fraction", s.test_fraction)):
        if not 0 <= value < 1:
            raise UserError(f"params.yaml: split.{key} must be in [0, 1), got {value}")
    if s.val_fraction + s.test_fraction >= 1:
        raise UserError("params.yaml: split.val_fraction + split.test_fraction must be below 1")
    positive = {
        "base.image_size": p.base.image_size,
        "train.epochs": p.train.epochs,
        "train.batch_size": p.train.batch_size,
        "train.learning_rate": p.train.learning_rate,
        "train.dense_units": p.train.dense_units,
        "train.memory_mb": p.train.memory_mb,
        "ingest.min_side": p.ingest.min_side,
        "ingest.max_pixels": p.ingest.max_pixels,
        "plot.grid_images": p.plot.grid_images,
        "plot.dpi": p.plot.dpi,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"params.yaml: {key} must be positive, got {value}")
    if p.base.image_size < 16:
        raise UserError(f"params.yaml: base.image_size must be at least 16, got {p.base.image_size}")
    if not p.train.filters or any(f <= 0 for f in p.train.filters):
        raise UserError("params.yaml: train.filters must be a non-empty list of positive integers")
    if not 0 <= p.train.dropout < 1:
        raise UserError(f"params.yaml: train.dropout must be in [0, 1), got {p.train.dropout}")
    if p.cv.folds < 2 or p.cv.repeats < 1:
        raise UserError("params.yaml: cv.folds must be at least 2 and cv.repeats at least 1")
    if p.train.fine_tune_layers < 0 or p.train.fine_tune_epochs < 0:
        raise UserError("params.yaml: train.fine_tune_layers and train.fine_tune_epochs must be >= 0")
    if not 0 <= p.ingest.feedback_max_share <= 1:
        raise UserError(f"params.yaml: ingest.feedback_max_share must be in [0, 1], got {p.ingest.feedback_max_share}")
    if not 0 <= p.evaluate.min_accuracy <= 1:
        raise UserError("params.yaml: evaluate.min_accuracy must be in [0, 1]")
    _check_transfer(p)


def _check_transfer(p: Params) -> None:
    t, v = p.train, p.train.views
    for i, region in enumerate(v.regions):
        if len(region) != 2 or not 0 < region[0] <= 1 or region[1] < 1 or region[1] != int(region[1]):
            raise UserError(f"params.yaml: train.views.regions[{i}] must be [side fraction in (0, 1], grid >= 1], "
                            f"got {excerpt(region)}")
    if v.size < 0 or 0 < v.size < 16:
        raise UserError(f"params.yaml: train.views.size must be 0 (= base.image_size) or at least 16, got {v.size}")
    if t.head_c <= 0:
        raise UserError(f"params.yaml: train.head_c must be positive, got {t.head_c}")
    if t.head == "logistic" and (t.augment.flip != "none" or t.augment.rotation > 0):
        raise UserError("params.yaml: train.head logistic fits on cached features, so it needs "
                        "train.augment.flip none and train.augment.rotation 0 (use train.views for flips)")
    if t.arch == "seed_cnn" and (v.regions or v.flip or v.normalize or v.size or t.head != "dense"):
        raise UserError("params.yaml: train.views and train.head logistic are for transfer models "
                        "(train.arch mobilenet or mobilenet_v2), not seed_cnn")
    from cleanmessy.weights import check_alpha

    check_alpha(t.arch, t.alpha)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise UserError(f"params.yaml: {key} must be one of {choices}; got {excerpt(value)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"params.yaml: {key} must be a list, got {excerpt(value)}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and value is None:
        return ""
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"params.yaml: {key} must be {tp.__name__}, got {excerpt(value)}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"params.yaml: {prefix} must be a mapping, got {excerpt(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # in declaration order: stable messages
    unknown = sorted(str(key) for key in set(raw) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise UserError(
            f"params.yaml: unknown key {where}{unknown[0][:EXCERPT]} (known: {', '.join(sorted(names))})"
        )
    values = {
        name: _coerce(raw[name], hints[name], f"{prefix}.{name}" if prefix else name)
        for name in names
        if name in raw
    }
    return cls(**values)


def parse_params(raw: Any) -> Params:
    """Validate a parsed params mapping; missing keys take the defaults above."""
    params = _build(Params, raw, "")
    _check_values(params)
    return params


MAX_YAML_BYTES = 1024 * 1024  # params.yaml is ~3 KB; an experiment file less
EXCERPT = 80  # characters of a user's value an error message shows at most


def excerpt(value: Any, limit: int = EXCERPT) -> str:
    """`repr(value)`, bounded: nested containers and long strings shortened (reprlib), then cut to
    `limit` characters. An error message shows a user's value this way, never whole."""
    import reprlib

    shorten = reprlib.Repr()  # (keyword arguments only from Python 3.12)
    shorten.maxlevel, shorten.maxdict, shorten.maxlist, shorten.maxtuple, shorten.maxset = 3, 4, 6, 6, 6
    shorten.maxstring, shorten.maxother, shorten.maxlong = limit, limit, 40
    short = shorten.repr(value)
    return short if len(short) <= limit else short[:limit - 1] + "…"


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases (`*name`): a few KB of nested aliases expand to gigabytes ("billion
    laughs"); params files have no use for them."""

    def compose_node(self, parent, index):  # noqa: ANN001 (PyYAML's signature)
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in params files",
                                              mark)
        return super().compose_node(parent, index)


def read_yaml(path: Path) -> Any:
    """A params file (params.yaml, an experiment's changes) parsed, or a one-line UserError: not
    found, a folder, over MAX_YAML_BYTES, not UTF-8, not YAML (the parser's first line), aliases."""
    try:
        if path.is_dir():
            raise UserError(f"{path} is a folder, not a file; remove it and restore the file with "
                            f"`git checkout {path.name}`")
        if path.stat().st_size > MAX_YAML_BYTES:
            raise UserError(f"{path} is {path.stat().st_size:,} bytes, more than a params file may be "
                            f"({MAX_YAML_BYTES:,})")
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise UserError(f"{path} is not valid YAML: {reason[:200]}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def load_params(path: Path) -> Params:
    """Read and validate params.yaml."""
    raw = read_yaml(path)
    if raw is None:  # the code's defaults are not the committed params: running on them would mislead
        raise UserError(f"{path} is empty; restore it with `git checkout {path.name}`")
    return parse_params(raw)


def with_changes(base: dict, changes: dict) -> dict:
    """A copy of the raw params mapping `base` with the nested `changes` applied."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = with_changes(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def change_leaves(changes: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping of params changes as `{"train.learning_rate": 0.002, ...}`, in its order."""
    leaves: dict[str, Any] = {}
    for key, value in changes.items():
        if isinstance(value, dict):
            leaves.update(change_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def _value_text(value: Any) -> str:
    """A param value as `-S` takes it: strings as they are, the rest as compact JSON (DVC reads YAML)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def exp_flags(changes: dict) -> list[str]:
    """`dvc exp run` arguments for a nested mapping of params changes: `-S key=value` per leaf,
    the value in compact JSON (DVC reads it as YAML), without spaces so a shell can split them."""
    flags: list[str] = []
    for key, value in change_leaves(changes).items():
        text = _value_text(value)
        if not text or any(c.isspace() for c in text):
            raise UserError(f"{key}: {excerpt(value)} cannot be passed as a -S flag (empty or with spaces)")
        flags += ["-S", f"{key}={text}"]
    return flags


def parse_set(text: str) -> dict:
    """One `dvc exp run -S` argument (`[params.yaml:]key=value`) as a nested changes mapping, read
    as DVC reads it (its own parser: Hydra's override grammar, so `1e-3` is a number)."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import to_hydra_overrides
    from hydra.errors import HydraException

    ((file, (override,)),) = to_path_overrides([text]).items()
    if file != "params.yaml":
        raise UserError(f"-S {text}: only params.yaml is read here, not {file}")
    try:
        (parsed,) = to_hydra_overrides([override])
    except HydraException:
        raise UserError(f"-S {text}: expected key=value, e.g. train.learning_rate=0.002") from None
    if parsed.is_sweep_override() or parsed.is_delete() or parsed.is_add():
        raise UserError(f"-S {text}: one experiment takes one value per param (no sweeps, `~`, `+`)")
    changes: dict = {}
    *sections, leaf = parsed.key_or_group.split(".")
    node = changes
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = parsed.value()
    return changes


def apply_changes(changes: dict, params_file: Path, where: str) -> Params:
    """The params of `params_file` with the nested `changes` applied, checked: an error names `where`
    the changes came from and the key, before any stage runs."""
    base = read_yaml(params_file) or {}
    if not isinstance(base, dict):
        raise UserError(f"{params_file} must be a mapping of sections")
    try:
        return parse_params(with_changes(base, changes))
    except UserError as exc:
        raise UserError(f"{where}: {str(exc).removeprefix('params.yaml: ')}") from None


def load_changes(path: Path, params_file: Path) -> tuple[dict, Params]:
    """A params changes file (like experiments/real-photos.yaml) and the params of `params_file`
    with those changes applied: checked here, so a typo is caught before any stage runs."""
    changes = read_yaml(path) or {}
    if not isinstance(changes, dict):
        raise UserError(f"{path} must be a mapping of params.yaml sections")
    return changes, apply_changes(changes, params_file, str(path))


# How an experiment's name spells a param: its shortest key suffix no other param shares
# (`test_fraction`, `augment.flip`), or a short name from here.
SHORT_KEYS = {"train.learning_rate": "lr"}
SOURCE_KEYS = ("ingest.source", "ingest.sha256")  # changing the data: the name's first word
SPELLED_CHANGES = 2  # an experiment with more changes (a configuration file) is named after its model
SOURCE_NAME_CHARS = 32  # of a photo source's last name, in the experiment's name


def _short_key(key: str) -> str:
    if key in SHORT_KEYS:
        return SHORT_KEYS[key]
    others = [k.split(".") for k in flatten(Params()) if k != key]
    parts = key.split(".")
    for n in range(1, len(parts)):
        if not any(other[-n:] == parts[-n:] for other in others):
            return ".".join(parts[-n:])
    return ".".join(parts[1:]) or key


def _name_part(text: str) -> str:
    """`text` in the characters a git ref (so a DVC experiment name) may hold, kept readable."""
    return re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", text)).strip("-.")


def exp_name(changes: dict, params: Params) -> str:
    """The name `make real` and `make grid` give a DVC experiment, and so its MLflow run: what it
    changes (`changes`, nested as params.yaml), given the `params` it then runs with.

    - One or two changed params are spelled out, each as `<key>-<value>`: `lr-0.002` for
      `train.learning_rate=0.002`, `test_fraction-0.3`, `augment.flip-none`.
    - More (a configuration such as experiments/real-photos.yaml) name the model they train:
      `<arch>-<image_size>`, as `mobilenet_v2-224`; so does no change at all.
    - A changed `ingest.source` comes first: `real` and the source's last name (photos), or
      `sample` for the embedded sample; `make real SOURCE=../clean-messy` gives
      `real-clean-messy-mobilenet_v2-224`.

    Only [A-Za-z0-9._-], no `..`, no leading or trailing `-` or `.`: a valid git ref name."""
    leaves = change_leaves(changes)
    words = []
    if any(key in leaves for key in SOURCE_KEYS):
        source = str(leaves.get("ingest.source", params.ingest.source))
        if source == IngestParams().source:
            words.append("sample")
        else:  # `real` and the source's last name (so two sources are two experiments): real-clean-messy
            words += ["real", _name_part(Path(source.rstrip("/")).stem)[:SOURCE_NAME_CHARS]]
    spelled = {key: value for key, value in leaves.items() if key not in SOURCE_KEYS}
    if 0 < len(spelled) <= SPELLED_CHANGES:
        words += [f"{_short_key(key)}-{_name_part(_value_text(value)) or 'empty'}" for key, value in spelled.items()]
    else:
        words += [params.train.arch, str(params.base.image_size)]
    name = _name_part("-".join(words))
    return name[:-len(".lock")] + "-lock" if name.endswith(".lock") else name


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """`{"train.augment.flip": "horizontal", ...}` — the keys MLflow and `dvc params diff` show."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{key}."))
        else:
            out[key] = value
    return out


def used_train_params(t: TrainParams) -> dict[str, Any]:
    """The `train.*` params the chosen architecture and head actually use, flattened: what MLflow
    and the model card show (a seed_cnn run has no ImageNet weights, a logistic head no epochs)."""
    flat = flatten(t, "train.")
    keys = {"arch", "batch_size", "augment.flip", "augment.rotation", "distribute", "memory_mb"}
    if t.arch == "seed_cnn":
        keys |= {"epochs", "learning_rate", "patience", "filters", "dense_units", "dropout"}
    else:
        keys |= {"alpha", "weights", "head", "fine_tune_layers", "views.regions", "views.flip", "views.normalize",
                 "views.size"}
        keys |= {"epochs", "learning_rate", "patience", "dropout"} if t.head == "dense" else {"head_c"}
        if t.fine_tune_layers > 0 and t.fine_tune_epochs > 0:
            keys |= {"fine_tune_epochs", "fine_tune_learning_rate", "patience"}
    return {k: v for k, v in flat.items() if k.removeprefix("train.") in keys}
