"""serving.follow.ModelFollower: a server's model kept on its alias, with fake registry calls (the
real app following a moved alias in a browser: tests/serving/test_serving.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cleanmessy.errors import UserError
from cleanmessy.serving.follow import ModelFollower
from cleanmessy.tracking import RegisteredVersion


def version(number: str, aliases: tuple[str, ...] = ("production",)) -> RegisteredVersion:
    return RegisteredVersion(name="m", version=number, aliases=list(aliases), run_id=f"run{number}",
                             test_accuracy=1.0, description="")


@dataclass
class FakeServed:
    version: RegisteredVersion

    def info(self) -> dict:
        return {"version": self.version.version, "model_card": ""}


class FakeRegistry:
    """The alias points at `at`; versions in `broken` fail to load."""

    def __init__(self) -> None:
        self.at, self.broken, self.loads = "1", set(), []

    def resolve(self, uri: str) -> RegisteredVersion:
        if self.at is None:
            raise UserError("the registry has no version at stage 'production'")
        return version(self.at)

    def load(self, uri: str) -> FakeServed:
        self.loads.append(uri)
        number = self.resolve(uri).version if "@" in uri else uri.rsplit("/", 1)[1]
        if number in self.broken:
            raise UserError(f"cannot download models:/m/{number} from the registry: gone")
        return FakeServed(version(number))


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry()


def follower(registry: FakeRegistry, uri: str = "models:/m@production") -> ModelFollower:
    clock = iter(range(1000, 2000, 10))
    return ModelFollower(uri, 5, load=registry.load, resolve=registry.resolve, clock=lambda: next(clock))


def test_a_moved_alias_is_loaded_and_swapped_in(registry):
    f = follower(registry)
    assert f.current.version.version == "1" and f.check() is False  # nothing moved: nothing loaded
    assert registry.loads == ["models:/m@production"]
    registry.at = "3"
    assert f.check() is True
    assert f.current.version.version == "3" and registry.loads[-1] == "models:/m/3"  # the exact version
    assert f.since == 1010 and f.error == ""
    assert f.info()["serving_since"] == "1970-01-01 00:16:50 UTC" and f.info()["version"] == "3"


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(registry):
    f = follower(registry)
    registry.at, registry.broken = "2", {"2"}
    assert f.check() is False
    assert f.current.version.version == "1"
    assert f.error.startswith("version 2 (now at models:/m@production) could not be loaded: cannot download")
    assert f.error.endswith("still serving version 1") and f.info()["load_error"] == f.error
    loads = len(registry.loads)
    f.check()  # the same broken version is not loaded again on every poll
    assert len(registry.loads) == loads
    registry.at = "3"  # the alias moves on: the new version is served and the error is gone
    assert f.check() is True and f.current.version.version == "3" and f.error == ""


def test_a_removed_alias_keeps_the_model_and_says_so(registry):
    f = follower(registry)
    registry.at = None
    assert f.check() is False and f.current.version.version == "1"
    assert "cannot check models:/m@production" in f.error
    registry.at = "1"
    f.check()
    assert f.error == ""


def test_any_load_failure_keeps_the_old_version_and_is_not_retried_every_poll(registry):
    """Not only the registry's UserError: a model that breaks while it is built (a bad metadata
    value, TensorFlow refusing it) leaves the old one serving, with the reason's first line."""
    f = follower(registry)
    registry.at = "2"

    def broken(uri: str) -> FakeServed:
        registry.loads.append(uri)
        raise ValueError("invalid literal for int() with base 10: 'big'\nmore detail")

    f._load = broken
    assert f.check() is False and f.current.version.version == "1"
    assert f.error == ("version 2 (now at models:/m@production) could not be loaded: invalid literal for int() with "
                       "base 10: 'big'; still serving version 1")
    loads = len(registry.loads)
    f.check()
    assert len(registry.loads) == loads


@pytest.mark.parametrize(("uri", "poll"), [("models:/m/1", 5), ("models:/m@production", 0)])
def test_an_exact_version_or_poll_0_is_never_checked_and_says_so(registry, uri, poll):
    clock = iter(range(1000, 2000, 10))
    f = ModelFollower(uri, poll, load=registry.load, resolve=registry.resolve, clock=lambda: next(clock))
    registry.at = "2"
    assert f.follows is False and f.check() is False and f.current.version.version == "1"
    assert f.info()["follows_alias"] is False
