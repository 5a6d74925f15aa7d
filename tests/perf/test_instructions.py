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


def test_request_path_instructions_match_the_baseline(tmp_path: Path) -> None:
    if shutil.which("valgrind") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("valgrind is missing, so the performance guard cannot run "
                        "(scripts/setup installs it)")
        pytest.skip("valgrind is missing (scripts/setup installs it)")
    baseline = load_baseline()
    rewrite = bool(os.environ.get(REBASELINE_ENV))
    recorded = baseline.get("environment")
    if recorded and not rewrite:
        here = environment()
        differ = {k: (recorded.get(k), here[k]) for k in ("python", "trio", "machine")
                  if recorded.get(k) != here[k]}
        if differ:
            pytest.skip(f"the baseline was taken with another {', '.join(differ)} "
                        f"({differ}); counts would not compare: rewrite it here with "
                        f"{REBASELINE_ENV}=1")
    measured = measure(tmp_path)
    tolerance = baseline.get("tolerance", TOLERANCE)
    verdicts = compare(measured, baseline)
    table = report(verdicts, tolerance)
    print(table)
    if rewrite:
        write_baseline(measured)
        return
    bad = [v for v in verdicts if not v.ok(tolerance)]
    assert not bad, (f"instructions per operation moved by more than {tolerance:.0%} from "
                     f"tests/perf/baseline.json:\n{table}\nIf the change is meant, rewrite the "
                     f"baseline: {REBASELINE_ENV}=1 .venv/bin/python -m pytest tests/perf "
                     "(or python -m tests.perf.callgrind --write-baseline)")
