"""The plain progress lines of a followed job (stderr not a terminal): nothing claimed
before the job knows its size."""

from __future__ import annotations

import pytest

from blkfs.cli.progress import JobProgress


def entry(status: str, done: int, total: int) -> dict[str, object]:
    return {"type": "commit", "status": status, "current-progress": done, "total-progress": total}


def test_a_job_that_has_not_measured_its_work_claims_no_percentage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = JobProgress("vol")
    for job in (
        entry("created", 0, 0),
        entry("running", 0, 0),
        entry("running", 0, 16 << 20),
        entry("running", 8 << 20, 16 << 20),
        entry("concluded", 16 << 20, 16 << 20),
    ):
        progress.update(job)
    assert capsys.readouterr().err.splitlines() == [
        "vol: commit created (size not known yet)",
        "vol: commit running (size not known yet)",
        "vol: commit running 0 B of 16.0 MiB (0%)",
        "vol: commit running 8.0 MiB of 16.0 MiB (50%)",
        "vol: commit concluded 16.0 MiB of 16.0 MiB (100%)",
    ]


def test_a_job_with_nothing_to_do_concludes_at_100_percent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    JobProgress("vol").update(entry("concluded", 0, 0))
    assert capsys.readouterr().err == "vol: commit concluded 0 B of 0 B (100%)\n"
