"""Stress tests: sized for CI by default, longer with ``scripts/stress --minutes N``.

Each test sizes its run with ``stress_seconds`` and records what it measured with
``figures``; the figures are printed at the end of the run and written as JSON to
``$BLKFS_STRESS_REPORT`` when that is set (scripts/stress sets it), so the README's
Reliability section can quote the last run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest

_FIGURES: dict[str, dict[str, Any]] = {}


@pytest.fixture
def stress_seconds() -> Callable[[float], float]:
    """How long a soak phase runs: the test's CI default, or BLKFS_STRESS_SECONDS if set."""
    override = os.environ.get("BLKFS_STRESS_SECONDS")
    return lambda default: float(override) if override else default


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A dict the test fills with its figures (counts, rates, peak RSS, ...)."""
    return _FIGURES.setdefault(request.node.name, {})


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("stress figures")
    for test, values in _FIGURES.items():
        shown = ", ".join(f"{key}={value}" for key, value in values.items())
        terminalreporter.write_line(f"{test}: {shown}")
    report = os.environ.get("BLKFS_STRESS_REPORT")
    if report:
        with open(report, "w") as out:
            json.dump(_FIGURES, out, indent=2, sort_keys=True)
