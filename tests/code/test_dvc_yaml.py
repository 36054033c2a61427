"""dvc.yaml declares, for every stage, exactly the package code it runs (its import closure, read
from the source) and the code is what DVC hashes: a change to a module reruns exactly the stages
that run it. Params and files a stage reads are enforced at run time (`cleanmessy.stages.run_stage`),
which the pipeline tests exercise; here the declarations themselves are checked."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from cleanmessy.errors import UndeclaredInput
from cleanmessy.params import Params
from cleanmessy.project import Paths
from cleanmessy.stages import declaration, restrict_params

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
STAGES = ["ingest", "split", "train", "evaluate", "plot"]
LAUNCHER = "src/stage.sh"


def module_path(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    """The cleanmessy modules a file imports (anywhere in it, or only at its top level)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from cleanmessy import tracking`
    return {m for m in found if m.split(".")[0] == "cleanmessy" and module_path(m)}


def closure(roots: set[str]) -> set[str]:
    """Every cleanmessy module the roots run, with the packages that contain them."""
    seen: set[str] = set()
    todo = set(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo |= {".".join(parts[:i]) for i in range(1, len(parts))}  # importing a.b runs a/__init__.py
        todo |= imported_modules(module_path(name))
    return seen


def code_run_by(stage: str) -> set[str]:
    """Files a stage runs: the launcher, cli.py's top level (its commands import lazily; stage
    commands go through cleanmessy.stages.run_stage), and the stage module's closure."""
    cli = SRC / "cleanmessy" / "cli.py"
    modules = closure(imported_modules(cli, top_level_only=True) | {"cleanmessy.stages", f"cleanmessy.stages.{stage}"})
    files = {module_path(m).relative_to(REPO).as_posix() for m in modules}
    files |= {cli.relative_to(REPO).as_posix(), LAUNCHER}
    # A package __init__ that is only a docstring runs no code worth a rerun.
    return {f for f in files if not (f.endswith("__init__.py") and _docstring_only(REPO / f))}


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def stage_entry(stage: str) -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_declares_exactly_the_code_it_runs(stage):
    entry = stage_entry(stage)
    deps = {d for d in entry["deps"] if isinstance(d, str) and (d.startswith("src/"))}
    expected = code_run_by(stage)
    assert sorted(expected - deps) == [], f"{stage} runs these but does not declare them"
    assert sorted(deps - expected) == [], f"{stage} declares these but does not run them"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_command_goes_through_the_launcher(stage):
    assert stage_entry(stage)["cmd"] == f"sh {LAUNCHER} {stage}"


def test_undeclared_param_read_raises():
    params = restrict_params(Params(), ("base.seed", "plot"), "plot")
    assert params.base.seed == 42 and params.plot.dpi == 100
    with pytest.raises(UndeclaredInput, match="reads param base.image_size"):
        _ = params.base.image_size
    with pytest.raises(UndeclaredInput, match="reads param train.epochs"):
        _ = params.train.epochs


def test_undeclared_file_raises(tmp_path):
    paths = Paths(tmp_path, declared=frozenset({"data/splits", "pipeline/history.csv"}), stage="plot")
    assert paths.split_csv("train") == tmp_path / "data/splits/train.csv"
    assert paths.history == tmp_path / "pipeline/history.csv"
    assert paths.mlruns == tmp_path / "mlruns"  # the MLflow store is no DVC data
    with pytest.raises(UndeclaredInput, match="uses data/manifest.csv"):
        _ = paths.manifest


def test_declaration_reads_dvc_yaml_with_the_source_filled_in():
    declared = declaration(REPO / "dvc.yaml", "ingest", Params())
    assert "data/sample" in declared.files and "ingest.source" in declared.params
