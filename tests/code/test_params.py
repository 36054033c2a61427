"""params.yaml parsing and validation: defaults, errors that name the key, flattening."""

import re
from pathlib import Path

import pytest

from cleanmessy.errors import UserError
from cleanmessy.params import (
    Params,
    apply_changes,
    exp_flags,
    exp_name,
    flatten,
    load_changes,
    load_params,
    parse_params,
    parse_set,
    with_changes,
)

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_empty_mapping_gives_defaults():
    """An empty params file means every section takes its dataclass defaults."""
    assert parse_params({}) == Params()
    assert parse_params(None) == Params()
    p = parse_params({})
    assert p.base.seed == 42
    assert p.train.augment.flip == "horizontal"
    assert p.train.filters == [32, 64]


def test_the_codes_defaults_are_the_committed_params():
    """One home for every default: the dataclasses' defaults are exactly params.yaml's values, so
    a key left out of params.yaml (or a script building Params()) gets what the pipeline runs."""
    assert flatten(Params()) == flatten(load_params(REPO_PARAMS))


def test_partial_section_keeps_other_defaults():
    """Setting one key in a section leaves its siblings at their defaults."""
    p = parse_params({"train": {"epochs": 3}})
    assert p.train.epochs == 3
    assert p.train.batch_size == 32
    assert p.split == Params().split


def test_unknown_nested_key_is_named():
    """A typo such as train.epoch is rejected with its full dotted name."""
    with pytest.raises(UserError, match=r"unknown key train\.epoch\b"):
        parse_params({"train": {"epoch": 10}})


def test_unknown_top_level_key_is_named():
    """An unknown section name is reported as it was written."""
    with pytest.raises(UserError, match="unknown key trian"):
        parse_params({"trian": {}})


def test_wrong_type_names_key():
    """epochs: "ten" is refused and the message names train.epochs."""
    with pytest.raises(UserError, match=r"train\.epochs must be int"):
        parse_params({"train": {"epochs": "ten"}})


def test_bool_is_not_an_int():
    """YAML `true` for an integer key is a type error, not 1."""
    with pytest.raises(UserError, match=r"train\.epochs"):
        parse_params({"train": {"epochs": True}})


def test_literal_choice_rejected_with_choices():
    """flip: diagonal is refused, naming the key and listing the allowed values."""
    with pytest.raises(UserError) as exc:
        parse_params({"train": {"augment": {"flip": "diagonal"}}})
    msg = str(exc.value)
    assert "train.augment.flip" in msg
    assert "horizontal_and_vertical" in msg
    assert "'diagonal'" in msg


def test_literal_choice_accepted():
    """A listed choice is kept as given."""
    assert parse_params({"train": {"augment": {"flip": "none"}}}).train.augment.flip == "none"


def test_int_accepted_for_float():
    """learning_rate: 1 is accepted and stored as the float 1.0."""
    lr = parse_params({"train": {"learning_rate": 1}}).train.learning_rate
    assert lr == 1.0 and isinstance(lr, float)


def test_list_items_are_checked_with_index():
    """A bad element of train.filters is named with its index."""
    with pytest.raises(UserError, match=r"train\.filters\[1\]"):
        parse_params({"train": {"filters": [32, "x"]}})


def test_section_must_be_mapping():
    """A scalar where a section belongs is refused, naming the section."""
    with pytest.raises(UserError, match="train must be a mapping"):
        parse_params({"train": 5})


@pytest.mark.parametrize("val, test", [(0.5, 0.5), (0.6, 0.5)])
def test_fractions_summing_to_one_or_more_rejected(val, test):
    """val_fraction + test_fraction >= 1 would leave nothing to train on."""
    with pytest.raises(UserError, match=r"val_fraction \+ split\.test_fraction"):
        parse_params({"split": {"val_fraction": val, "test_fraction": test}})


def test_fraction_out_of_range_rejected():
    """A negative fraction is refused with its key."""
    with pytest.raises(UserError, match=r"split\.test_fraction"):
        parse_params({"split": {"test_fraction": -0.1}})


def test_non_positive_value_rejected():
    """batch_size: 0 is refused with its key."""
    with pytest.raises(UserError, match=r"train\.batch_size must be positive"):
        parse_params({"train": {"batch_size": 0}})


def test_null_string_becomes_empty():
    """sha256: (empty in YAML) is read as the empty string."""
    assert parse_params({"ingest": {"sha256": None}}).ingest.sha256 == ""


def test_load_params_missing_file(tmp_path):
    """A missing params.yaml is a UserError naming the path."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match="not found"):
        load_params(path)


def test_load_params_invalid_yaml(tmp_path):
    """Broken YAML is a UserError, not a yaml traceback."""
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n  epochs: 3\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(path)


def test_load_params_reads_values(tmp_path):
    """load_params parses the file and applies its values."""
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  seed: 7\ntrain:\n  augment:\n    flip: vertical\n")
    p = load_params(path)
    assert p.base.seed == 7
    assert p.train.augment.flip == "vertical"


def test_flatten_gives_dotted_keys():
    """flatten() turns nested sections into dotted keys with leaf values."""
    flat = flatten(parse_params({"train": {"augment": {"flip": "vertical"}}}))
    assert flat["train.augment.flip"] == "vertical"
    assert flat["train.filters"] == [32, 64]
    assert flat["base.seed"] == 42
    assert "train.augment" not in flat
    assert all("." in k for k in flat)


def test_repo_params_yaml_parses():
    """The project's own params.yaml is valid and its values are read."""
    p = load_params(REPO_PARAMS)
    assert p.ingest.source == "data/sample"
    assert p.train.arch == "seed_cnn"
    assert p.split.val_fraction + p.split.test_fraction < 1


def test_real_photo_experiment_file_applies_to_params_yaml():
    """experiments/real-photos.yaml is a valid set of changes to params.yaml, printed as -S flags
    with no spaces (the Makefile lets the shell split them)."""
    root = Path(__file__).resolve().parents[2]
    changes, _ = load_changes(root / "experiments" / "real-photos.yaml", root / "params.yaml")
    flags = exp_flags(changes)
    assert flags[::2] == ["-S"] * (len(flags) // 2)
    assert "train.views.regions=[[0.6,3]]" in flags and "train.views.flip=true" in flags
    assert not any(" " in flag for flag in flags)


def test_experiment_file_typo_names_the_file_and_key(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  arch: mobilenet\n")
    (tmp_path / "exp.yaml").write_text("train:\n  views:\n    region: [[0.8, 2]]\n")
    with pytest.raises(UserError, match=r"exp\.yaml: unknown key train\.views\.region"):
        load_changes(tmp_path / "exp.yaml", tmp_path / "params.yaml")


def test_exp_flags_refuse_values_with_spaces():
    with pytest.raises(UserError, match="ingest.source"):
        exp_flags({"ingest": {"source": "my photos"}})


def named(*sets: str, base: dict | None = None) -> str:
    """The name of the experiment that makes these `-S` changes (after `base`'s) to the repo's params."""
    changes = base or {}
    for text in sets:
        changes = with_changes(changes, parse_set(text))
    return exp_name(changes, apply_changes(changes, REPO_PARAMS, "test"))


def test_make_real_names_its_experiment_after_the_model_on_photos():
    """`make real` = experiments/real-photos.yaml plus `-S ingest.source=SOURCE`: many changes, so
    named after the model they train (arch, image size), `real` and the source's name first
    as the source changes (another source, another experiment)."""
    changes, _ = load_changes(REPO_PARAMS.parent / "experiments" / "real-photos.yaml", REPO_PARAMS)
    assert named("ingest.source=../shared/datasets/clean-messy", base=changes) == "real-clean-messy-mobilenet_v2-224"
    assert named("ingest.source=data/sample", base=changes) == "sample-mobilenet_v2-224"
    assert named(base=changes) == "mobilenet_v2-224"


def test_a_grid_entry_is_named_after_its_change():
    """One or two changes are spelled out, read as `dvc exp run -S` reads them (1e-3 is a number);
    a key by its shortest unambiguous suffix (flip is also train.views.flip)."""
    assert named("train.learning_rate=0.002") == "lr-0.002"
    assert named("train.learning_rate=1e-3") == "lr-0.001"
    assert named("params.yaml:split.test_fraction=0.3") == "test_fraction-0.3"
    assert named("train.augment.flip=none", "train.batch_size=16") == "augment.flip-none-batch_size-16"
    assert named("train.filters=[16,32]") == "filters-16-32"
    assert named("ingest.source=photos", "base.image_size=128") == "real-photos-image_size-128"
    assert named() == "seed_cnn-64"  # no change: the baseline's model


@pytest.mark.parametrize("changes", [
    {"train": {"filters": [16, 32]}},
    {"ingest": {"source": "a b/../c"}},
    {"evaluate": {"model_name": "..x..lock"}},
    {"evaluate": {"model_name": "-a:b~c^d?e*f[g\\h@{i} j/k."}, "split": {"test_fraction": 0.3}},
    {"train": {"views": {"regions": []}}},
])
def test_experiment_names_are_valid_git_ref_names(changes):
    """DVC keeps an experiment as the git ref refs/exps/<commit>/<name>: every name must pass git's
    own check, keep to [A-Za-z0-9._-], and start with a letter (so `-n NAME` is no option)."""
    import subprocess

    name = exp_name(changes, Params())
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", name) and ".." not in name and not name.endswith((".", ".lock"))
    ref = f"refs/exps/ab/cdef/{name}"
    assert subprocess.run(["git", "check-ref-format", ref], capture_output=True).returncode == 0, name


@pytest.mark.parametrize(("text", "message"), [
    ("train.learning_rate", "expected key=value"),
    ("other.yaml:train.epochs=3", "only params.yaml is read here, not other.yaml"),
    ("train.learning_rate=0.001,0.002", "one value per param"),
    ("~train.epochs", "one value per param"),
])
def test_a_change_dvc_would_not_take_as_one_value_is_refused(text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_set(text)


def test_a_misspelt_change_names_the_key():
    with pytest.raises(UserError, match=r"^-S train\.learning_rte=0\.1: unknown key train\.learning_rte"):
        apply_changes(parse_set("train.learning_rte=0.1"), REPO_PARAMS, "-S train.learning_rte=0.1")


def test_used_train_params_are_what_the_model_uses():
    """MLflow and the model card show only the train.* params the architecture and head use."""
    from cleanmessy.params import AugmentParams, TrainParams, used_train_params

    cnn = used_train_params(TrainParams())
    assert {"train.filters", "train.dense_units", "train.epochs", "train.augment.flip"} <= set(cnn)
    assert not {"train.weights", "train.alpha", "train.head", "train.head_c", "train.views.regions"} & set(cnn)
    logistic = used_train_params(TrainParams(arch="mobilenet_v2", head="logistic", augment=AugmentParams("none", 0)))
    assert {"train.weights", "train.alpha", "train.head_c", "train.views.regions"} <= set(logistic)
    assert not {"train.epochs", "train.learning_rate", "train.filters", "train.fine_tune_epochs"} & set(logistic)
    tuned = used_train_params(TrainParams(arch="mobilenet", fine_tune_layers=10))
    assert {"train.epochs", "train.fine_tune_epochs", "train.fine_tune_learning_rate"} <= set(tuned)


def test_dvc_style_params_file_changes_one_line_per_set(tmp_path):
    """params.yaml is already in the style DVC writes, so `dvc exp run -S train.epochs=30` (DVC's
    own round-trip writer) changes exactly that line: no reformatted lists or quotes."""
    import difflib
    import shutil

    from dvc.utils.serialize import modify_yaml

    from conftest import REPO

    copy = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", copy)
    with modify_yaml(copy) as data:
        data["train"]["epochs"] = 30
    diff = [line for line in difflib.unified_diff((REPO / "params.yaml").read_text().splitlines(),
                                                  copy.read_text().splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("---", "+++"))]
    assert diff == ["-  epochs: 40", "+  epochs: 30"]


@pytest.mark.parametrize(("text", "message"), [
    ("base:\n  seed: -1\n", "base.seed must be 0 or more, got -1"),
    ("train:\n  learning_rate: .nan\n", "train.learning_rate must be a finite number, got nan"),
    ("train:\n  learning_rate: .inf\n", "train.learning_rate must be a finite number, got inf"),
    ("train:\n  patience: -3\n", "train.patience must be 0 or more, got -3"),
    ("ingest:\n  feedback_max_share: 1.5\n", "ingest.feedback_max_share must be in [0, 1], got 1.5"),
    ("", "is empty; restore it with `git checkout params.yaml`"),
])
def test_values_that_used_to_end_in_tracebacks_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        load_params(path)
    assert message in str(error.value)


def test_params_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("base:\n  seed: 42  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_params(path)


# ---------------------------------------------------------------- hardening, second round (issue 21)


def alias_bomb(levels: int = 8) -> str:
    """3 KB of YAML whose aliases expand to 9**levels strings (the "billion laughs")."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + f"\ntrain:\n  filters: *a{levels}\n"


def test_an_alias_bomb_is_refused_at_once_in_one_short_line(tmp_path):
    import time

    path = tmp_path / "params.yaml"
    path.write_text(alias_bomb())
    started = time.perf_counter()
    with pytest.raises(UserError) as error:
        load_params(path)
    assert time.perf_counter() - started < 2
    message = str(error.value)
    assert "YAML aliases (*name) are not allowed in params files" in message and len(message) < 300
    assert "\n" not in message
    changes = tmp_path / "experiment.yaml"  # the same loader reads experiment files (exp-flags, exp-name)
    changes.write_text(alias_bomb(3))
    with pytest.raises(UserError, match="YAML aliases"):
        load_changes(changes, path)


def test_a_user_value_is_shown_as_a_bounded_excerpt(tmp_path):
    """A 10,000-item list, a 5 MB string, a 300-byte name: every message stays one short line."""
    cases = {
        "train:\n  filters: [" + ", ".join(['"a long string value"'] * 10_000) + "]\n": "train.filters[0] must be int",
        "train:\n  arch: " + "x" * 100_000 + "\n": "train.arch must be one of",
        "ingest:\n  source: " + "y" * 5_000 + "\n": "ingest.source is 5,000 characters",
        "ingest:\n  source: data/" + "z" * 300 + "/photos\n": "has a name of 300 bytes",
        "x" * 200 + ": 1\n": "unknown key " + "x" * 80 + " (known",
    }
    for i, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"p{i}.yaml"
        path.write_text(text)
        with pytest.raises(UserError) as error:
            load_params(path)
        assert expected in str(error.value) and len(str(error.value)) < 250, str(error.value)[:400]
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "b" * (2 * 1024 * 1024) + "\n")
    with pytest.raises(UserError, match="more than a params file may be"):
        load_params(big)


def test_params_yaml_as_a_folder_is_named(tmp_path):
    from cleanmessy.project import find_root

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").mkdir()
    with pytest.raises(UserError, match=r"params.yaml is not a file; remove it and restore the file with `git"):
        find_root(tmp_path)
    with pytest.raises(UserError, match="is a folder, not a file"):
        load_params(tmp_path / "params.yaml")
