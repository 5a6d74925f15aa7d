"""A thousand backends in one mount, created, used and deleted by parallel shell scripts.

Each script owns its backends (one in five a small raw file, the others null drives) and
uses only what a shell user has: ``echo`` into ``.ctl`` files, ``dd``, ``cmp`` and ``rm``,
with ``set -e`` so any failed command fails the script. Meanwhile the test lists the
mount, reads both status files and reads and writes a canary backend. At the end every
backend the scripts made is gone, and the daemon holds no more descriptors than before.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_fuse
from tests.helpers import Mount, pattern_image

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.stress]

SCRIPTS = 4
PER_SCRIPT = 256  # 1,024 backends
MiB = 1 << 20

SCRIPT = r"""
set -euo pipefail
M=$1 W=$2 N=$3 IMG=$4 STATE=$5 DURATION=$6
ops=0
create() {  # NAME KIND: a raw file for every fifth backend, a null drive otherwise
    if (( $2 % 5 == 0 )); then
        [ -e "$IMG/$1.img" ] || truncate -s 64k "$IMG/$1.img"
        echo "$1 $IMG/$1.img" > "$M/.ctl/create"
    else
        echo "$1 driver=null,size=1M" > "$M/.ctl/create"
    fi
    ops=$((ops + 1))
}
for ((i = 0; i < N; i++)); do create "w${W}b$i" $i; done
touch "$STATE/created.$W"
while [ ! -e "$STATE/go" ]; do sleep 0.05; done

end=$((SECONDS + DURATION))
round=0
while ((round == 0 || SECONDS < end)); do
    for ((i = round % 3; i < N; i += 3)); do
        b="w${W}b$i"
        if (( (i / 3 + round) % 4 == 0 )); then          # delete and create again
            if ((i % 2)); then rm "$M/$b"; else echo "$b" > "$M/.ctl/delete"; fi
            ops=$((ops + 1))
            [ ! -e "$M/$b" ]
            create "$b" $i
        elif ((i % 5 == 0)); then                        # raw: a write must read back
            printf 'w%d r%d %s' "$W" "$round" "$b" > "$STATE/data.$W"
            dd if="$STATE/data.$W" of="$M/$b" bs=4k seek=$((round % 16)) conv=notrunc,sync \
                status=none
            dd if="$M/$b" bs=4k skip=$((round % 16)) count=1 status=none \
                | cmp -s -n "$(stat -c %s "$STATE/data.$W")" - "$STATE/data.$W"
            ops=$((ops + 2))
        elif (( (i / 3 + round) % 4 == 1 )); then        # null: eject, insert
            echo "$b" > "$M/.ctl/eject"
            echo "$b driver=null,size=2M" > "$M/.ctl/insert"
            ops=$((ops + 2))
        else                                             # null: reads zeros
            cmp -s -n 8192 "$M/$b" /dev/zero
            ops=$((ops + 1))
        fi
    done
    round=$((round + 1))
done
touch "$STATE/churned.$W"
while [ ! -e "$STATE/finish" ]; do sleep 0.05; done
for ((i = 0; i < N; i++)); do echo "w${W}b$i" > "$M/.ctl/delete"; ops=$((ops + 1)); done
echo "$ops $round"
"""


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def status_nodes(mount: Mount) -> int:
    """How many nodes the backends' trees in status.json hold."""

    def count(tree: dict[str, Any] | None) -> int:
        return 0 if tree is None else 1 + sum(count(c) for c in tree["children"].values())

    return sum(count(b["tree"]) for b in mount.status()["backends"])


class Watcher:
    """What a user keeps doing while the scripts run: ls, both status files, canary I/O."""

    def __init__(self, mount: Mount, canary: bytes) -> None:
        self.mount, self.canary = mount, canary
        self.rounds = 0
        self.max_listed = 0

    def once(self) -> None:
        listed = os.listdir(self.mount.path)
        assert ".ctl" in listed and "canary" in listed
        self.max_listed = max(self.max_listed, len(listed))
        status = self.mount.status()
        assert any(b["name"] == "canary" for b in status["backends"])
        assert "canary" in (self.mount / ".ctl" / "status").read_text()
        offset = (self.rounds % 256) * 4096
        with open(self.mount / "canary", "r+b", buffering=0) as f:
            f.seek(offset)
            assert f.read(4096) == self.canary[offset : offset + 4096]
            f.seek(offset)
            f.write(self.canary[offset : offset + 4096])
        self.rounds += 1

    def until(self, done: Callable[[], bool], procs: list[subprocess.Popen]) -> None:
        while not done():
            for proc in procs:
                if proc.poll() not in (None, 0):
                    pytest.fail(f"a script failed: {proc.communicate()[1]}")
            self.once()


def test_a_thousand_backends_created_used_and_deleted_concurrently(
    mount_factory: Callable[..., Mount],
    images: Path,
    tmp_path: Path,
    stress_seconds: Callable[[float], float],
    figures: dict[str, Any],
) -> None:
    canary_image = images / "canary.img"
    canary = pattern_image(canary_image, MiB, image_id=7)
    mount = mount_factory("--backend", f"canary={canary_image}")
    state = tmp_path / "state"
    state.mkdir()
    script = tmp_path / "churn.sh"
    script.write_text(SCRIPT)
    fds_before, nodes_before = daemon_fds(mount.pid), status_nodes(mount)
    watcher = Watcher(mount, canary)
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                "bash",
                str(script),
                str(mount.path),
                str(w),
                str(PER_SCRIPT),
                str(images),
                str(state),
                str(int(stress_seconds(12))),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(SCRIPTS)
    ]
    try:

        def marked(kind: str) -> Callable[[], bool]:
            return lambda: all((state / f"{kind}.{w}").exists() for w in range(SCRIPTS))

        watcher.until(marked("created"), procs)
        backends = len(mount.backends())
        listed = len(os.listdir(mount.path))
        (state / "go").touch()
        watcher.until(marked("churned"), procs)
        (state / "finish").touch()
        watcher.until(lambda: all(p.poll() is not None for p in procs), procs)
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = time.monotonic() - started
    for proc, (_, err) in zip(procs, results, strict=False):
        assert proc.returncode == 0, err
    ops = sum(int(out.split()[0]) for out, _ in results)
    rounds = min(int(out.split()[1]) for out, _ in results)
    figures.update(
        backends=backends,
        listed=listed,
        rounds=rounds,
        ops=ops,
        ops_per_s=round(ops / seconds),
        seconds=round(seconds, 1),
        watcher_rounds=watcher.rounds,
        fds_before=fds_before,
        fds_after=daemon_fds(mount.pid),
    )
    assert backends == SCRIPTS * PER_SCRIPT + 1
    assert listed == backends + 1  # and .ctl
    assert sorted(os.listdir(mount.path)) == [".ctl", "canary"]
    assert list(mount.backends()) == ["canary"]
    assert status_nodes(mount) == nodes_before
    assert daemon_fds(mount.pid) <= fds_before
    assert (mount / "canary").read_bytes() == canary


def test_a_name_deleted_and_created_again_opens_at_once(
    mount_factory: Callable[..., Mount], images: Path
) -> None:
    image = images / "a.img"
    pattern_image(image, MiB, image_id=1)
    mount = mount_factory()
    failures = 0
    for _ in range(50):
        mount.ctl("create", f"r {image},read-only=on")
        try:
            assert (mount / "r").read_bytes()[:7] == b"img0001"
        except FileNotFoundError:
            failures += 1
        mount.ctl("delete", "r")
    assert failures == 0, f"{failures} of 50 opens failed with ENOENT"
