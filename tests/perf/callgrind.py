"""Instruction counts of the request path, under callgrind, against a committed baseline.

Wall-clock figures on a shared machine swing by a third between runs; the number of
instructions a request executes does not. :func:`measure` runs :mod:`tests.perf.workload`
under ``valgrind --tool=callgrind`` and returns instructions per operation; :func:`compare`
holds them to ``baseline.json`` within its tolerance, both ways: a change that makes an
operation cheaper by more than the tolerance must rewrite the baseline too, or the slack
would hide the next regression.

Rewrite the baseline deliberately, after a change that is meant to move the counts::

    .venv/bin/python -m tests.perf.callgrind --write-baseline
    BLKFS_PERF_REBASELINE=1 .venv/bin/python -m pytest tests/perf   # the same, from the test

Counts depend on the interpreter and trio, so the baseline records their versions; on
another version the comparison is skipped until the baseline is rewritten there (under
CI=true it fails instead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from tests.perf.workload import OPERATIONS

BASELINE = Path(__file__).with_name("baseline.json")
TOLERANCE = 0.05
REBASELINE_ENV = "BLKFS_PERF_REBASELINE"
REPO = Path(__file__).resolve().parents[2]


def environment() -> dict[str, str]:
    """What instruction counts depend on besides blkfs."""
    valgrind = subprocess.run(
        ["valgrind", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "python": platform.python_version(),
        "trio": version("trio"),
        "valgrind": valgrind,
        "machine": platform.machine(),
    }


def measure(work: Path, only: list[str] | None = None) -> dict[str, int]:
    """Instructions per operation of each operation in ``only`` (default: all)."""
    names = [op.name for op in OPERATIONS if only is None or op.name in only]
    images = work / "images"
    images.mkdir()
    python = sys.executable
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run(
        [python, "-m", "tests.perf.workload", "--prepare", str(images)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    out = work / "callgrind.out"
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--dump-before=getppid",
            "--dump-instr=no",
            "--compress-strings=no",
            f"--callgrind-out-file={out}",
            "-q",
            python,
            "-m",
            "tests.perf.workload",
            "--only",
            ",".join(names),
            str(images),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"the workload failed under callgrind: {proc.stderr[-3000:]}")
    counts = {}
    per_op = {op.name: op.count for op in OPERATIONS}
    for i, name in enumerate(names):
        # dump 1 ends at the first marker; then each operation's measured run ends with a
        # dump, and the next one's warm-up with another
        text = Path(f"{out}.{2 * i + 2}").read_text()
        total = int(re.search(r"^totals:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
        counts[name] = round(total / per_op[name])
    return counts


@dataclass(frozen=True)
class Verdict:
    name: str
    baseline: int | None
    measured: int

    @property
    def ratio(self) -> float | None:
        return self.measured / self.baseline if self.baseline else None

    def ok(self, tolerance: float) -> bool:
        return self.ratio is not None and abs(self.ratio - 1) <= tolerance

    def line(self, tolerance: float) -> str:
        ratio = self.ratio
        if ratio is None:
            verdict = "no baseline"
        elif ratio > 1 + tolerance:
            verdict = "SLOWER"
        elif ratio < 1 - tolerance:
            verdict = "FASTER: rewrite the baseline"
        else:
            verdict = "ok"
        base = f"{self.baseline:,}" if self.baseline else "-"
        change = f"{ratio - 1:+.1%}" if ratio is not None else "-"
        return f"{self.name:22} {base:>12} {self.measured:>12,} {change:>8}  {verdict}"


def load_baseline() -> dict:
    return json.loads(BASELINE.read_text()) if BASELINE.exists() else {}


def compare(measured: dict[str, int], baseline: dict) -> list[Verdict]:
    counts = baseline.get("instructions", {})
    return [Verdict(name, counts.get(name), value) for name, value in measured.items()]


def report(verdicts: list[Verdict], tolerance: float) -> str:
    head = f"{'operation':22} {'baseline':>12} {'measured':>12} {'change':>8}"
    return "\n".join([head, *(v.line(tolerance) for v in verdicts)])


def write_baseline(measured: dict[str, int]) -> None:
    baseline = {
        "tolerance": TOLERANCE,
        "environment": environment(),
        "operations": {op.name: f"{op.description} (x{op.count})" for op in OPERATIONS},
        "instructions": measured,
    }
    BASELINE.write_text(json.dumps(baseline, indent=2) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--write-baseline",
        action="store_true",
        help=f"record the counts as the new baseline ({BASELINE.name})",
    )
    ap.add_argument("--only", help="operations, comma separated (default: all)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        ap.error("valgrind is not installed (scripts/setup installs it)")
    with tempfile.TemporaryDirectory(prefix="blkfs-callgrind-") as work:
        measured = measure(Path(work), args.only.split(",") if args.only else None)
    baseline = load_baseline()
    tolerance = baseline.get("tolerance", TOLERANCE)
    verdicts = compare(measured, baseline)
    print(report(verdicts, tolerance))
    if args.write_baseline:
        if args.only:
            ap.error("--write-baseline records every operation: drop --only")
        write_baseline(measured)
        print(f"baseline written to {BASELINE}")
        return 0
    return 0 if all(v.ok(tolerance) for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
