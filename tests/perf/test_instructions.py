"""The request path costs what the baseline says, within its tolerance (instruction counts
under callgrind, which noise cannot move; see :mod:`tests.perf.callgrind`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.perf.callgrind import (
    REBASELINE_ENV,
    TOLERANCE,
    compare,
    environment,
    load_baseline,
    measure,
    report,
    write_baseline,
)

pytestmark = pytest.mark.perf
REBASELINE_COMMAND = (
    f"{REBASELINE_ENV}=1 .venv/bin/python -m pytest tests/perf "
    "(or .venv/bin/python -m tests.perf.callgrind --write-baseline)"
)


def test_request_path_instructions_match_the_baseline(tmp_path: Path) -> None:
    if shutil.which("valgrind") is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "valgrind is missing, so the performance guard cannot run "
                "(scripts/setup installs it)"
            )
        pytest.skip("valgrind is missing (scripts/setup installs it)")
    baseline = load_baseline()
    rewrite = bool(os.environ.get(REBASELINE_ENV))
    recorded = baseline.get("environment")
    if recorded and not rewrite:
        here = environment()
        differ = {
            k: (recorded.get(k), here[k])
            for k in ("python", "trio", "machine")
            if recorded.get(k) != here[k]
        }
        if differ:
            why = (
                f"the baseline was taken with another {', '.join(differ)} ({differ}); "
                f"counts would not compare: rewrite it here with {REBASELINE_COMMAND}"
            )
            if os.environ.get("CI") == "true":  # CI must not go green without the guard
                pytest.fail(f"{why}, on the machine CI runs on, and commit it")
            pytest.skip(why)
    measured = measure(tmp_path)
    tolerance = baseline.get("tolerance", TOLERANCE)
    verdicts = compare(measured, baseline)
    table = report(verdicts, tolerance)
    print(table)
    if rewrite:
        write_baseline(measured)
        return
    bad = [v for v in verdicts if not v.ok(tolerance)]
    assert not bad, (
        f"instructions per operation moved by more than {tolerance:.0%} from "
        f"tests/perf/baseline.json:\n{table}\nIf the change is meant, rewrite the "
        f"baseline: {REBASELINE_COMMAND}"
    )
