"""Where the suite's time goes, measured in every run (issue 26): each test's setup, call and
teardown, written to build/test-durations.csv (slowest first), and at the end of the run the 20
slowest tests and the suite's wall and CPU time. docs/testing.md keeps the table a run printed.

CPU time is pytest's own plus that of the processes it waited for (`cleanmessy`, `dvc`, servers
stopped by their tests); a server's grandchild that its parent never waits for is not counted."""

from __future__ import annotations

import csv
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DURATIONS = REPO / "build" / "test-durations.csv"
SHOWN = 20
WIDTH = 100  # a terminal's columns


def _cpu() -> tuple[float, float]:
    """CPU seconds (user + system) of this process, and of the children it has waited for."""
    times = os.times()
    return times.user + times.system, times.children_user + times.children_system


class SuiteClock:
    """A pytest plugin (registered by conftest.py): durations per test and the suite's totals."""

    def __init__(self, path: Path = DURATIONS) -> None:
        self.path = path
        self.started = time.monotonic()
        self.cpu_started = _cpu()
        self.phases: dict[str, dict[str, float]] = defaultdict(dict)
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.phases[report.nodeid][report.when] = report.duration
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.failed and report.when != "call":
            outcome = "error"  # in a fixture's setup or teardown, as pytest counts it
        else:
            outcome = report.outcome
        if report.when != "teardown" or outcome == "error":  # the call's outcome, unless a fixture failed
            self.outcomes[report.nodeid] = outcome

    def rows(self) -> list[tuple[str, float, float, float, float, str]]:
        rows = []
        for nodeid, phase in self.phases.items():
            setup, call, teardown = (phase.get(when, 0.0) for when in ("setup", "call", "teardown"))
            rows.append((nodeid, setup + call + teardown, setup, call, teardown, self.outcomes.get(nodeid, "passed")))
        return sorted(rows, key=lambda row: -row[1])

    def pytest_sessionfinish(self) -> None:
        """The file, whether or not a summary is printed (`--no-summary`); nothing when no test ran."""
        rows = self.rows()
        if not rows:
            return
        self.path.parent.mkdir(exist_ok=True)
        with self.path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["test", "total_s", "setup_s", "call_s", "teardown_s", "outcome"])
            writer.writerows([nodeid, *(f"{value:.2f}" for value in values), outcome]
                             for nodeid, *values, outcome in rows)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        wall = time.monotonic() - self.started
        own, children = (now - then for now, then in zip(_cpu(), self.cpu_started))
        rows = self.rows()
        if not rows:
            return
        write = terminalreporter.write_line
        terminalreporter.section(f"the {min(SHOWN, len(rows))} slowest tests", sep="-")
        write("  total s  setup s  test (whole ids in the file named below)")
        for nodeid, total, setup, _call, _teardown, _ in rows[:SHOWN]:
            line = f"{total:9.1f}{setup:9.1f}  {nodeid}"
            write(line if len(line) <= WIDTH else line[:WIDTH - 1] + "…")
        write(f"suite: {len(rows)} tests in {wall:.0f} s wall, {own + children:.0f} s CPU ({own:.0f} s pytest, "
              f"{children:.0f} s the processes it waited for)")
        write(f"every test's time: {self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path}")
