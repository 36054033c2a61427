"""The suite measures itself (tests/suite_clock.py) and a hang fails one test, named, not the run
(pytest-timeout, configured in pyproject.toml): checked on a small suite run in a subprocess."""

from __future__ import annotations

import csv
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO

TESTS = Path(__file__).resolve().parents[1]


def test_a_run_writes_every_tests_time_and_a_hang_fails_only_that_test(tmp_path):
    (tmp_path / "conftest.py").write_text(f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
from suite_clock import SuiteClock

def pytest_configure(config):
    config.pluginmanager.register(SuiteClock(Path({str(tmp_path / "out" / "durations.csv")!r})))
""")
    (tmp_path / "test_small.py").write_text("""
import threading
import pytest

@pytest.fixture
def prepared():
    threading.Event().wait(0.5)  # a setup that takes a while: counted in the test's total
    return 1

def test_passes(prepared):
    assert prepared == 1

def test_fails():
    assert 1 == 2

@pytest.mark.timeout(1)
def test_hangs():
    threading.Event().wait()  # forever

def test_after_the_hang():
    assert True

@pytest.fixture
def broken():
    yield
    raise RuntimeError("teardown fails")

def test_broken_fixture(broken):
    assert True

@pytest.mark.skip(reason="not here")
def test_skipped():
    assert False

@pytest.mark.xfail(reason="known")
def test_expected_to_fail():
    assert False
""")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_small.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 1, out
    assert "2 failed, 3 passed, 1 skipped, 1 xfailed, 1 error" in out, out
    assert "Timeout" in out and "FAILED test_small.py::test_hangs" in out, out
    with (tmp_path / "out" / "durations.csv").open() as table:
        rows = list(csv.DictReader(table))
    totals = [float(row["total_s"]) for row in rows]
    assert totals == sorted(totals, reverse=True)  # slowest first
    assert {row["test"].split("::")[1]: row["outcome"] for row in rows} == {
        "test_hangs": "failed", "test_passes": "passed", "test_fails": "failed", "test_after_the_hang": "passed",
        "test_broken_fixture": "error", "test_skipped": "skipped", "test_expected_to_fail": "xfailed"}
    hangs = next(row for row in rows if row["test"].endswith("test_hangs"))
    assert float(hangs["call_s"]) >= 1  # stopped by its timeout, not before
    passes = next(row for row in rows if row["test"].endswith("test_passes"))
    assert float(passes["setup_s"]) >= 0.5 and float(passes["total_s"]) >= float(passes["setup_s"])
    shown = out[out.index("the 7 slowest tests"):out.index("every test's time: ")]
    assert "total s  setup s  test" in shown and "s CPU (" in shown
    assert max(len(line) for line in shown.splitlines()) <= 100 and "test_small.py::test_hangs" in shown


def test_the_suite_is_bounded_per_test_and_in_all():
    """Ten minutes a test, the setup of its fixtures included; 80 for the run, inside CI's 90."""
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["timeout"] == 600 and options["session_timeout"] <= 80 * 60
