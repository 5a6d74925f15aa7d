"""What a command-line tool is expected to keep: --version, a man page, shell completion that
names a mount's backends and jobs, a systemd unit, and the FUSE mount-helper form that
``mount -t fuse.blkfs`` and /etc/fstab use."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import needs_fuse
from tests.helpers import Mount, blkfs, mounted, pattern_image

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
BIN = Path(sys.executable).parent
UNIT = ROOT / "systemd" / "blkfs@.service"
MiB = 1 << 20


def test_version_is_the_distributions() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert importlib.metadata.version("blkfs") == version
    assert blkfs("--version").stdout == f"blkfs {version}\n"


def test_man_blkfs_finds_the_page_made_from_the_parser(tmp_path: Path) -> None:
    """scripts/setup writes .venv/share/man/man1/blkfs.1; man finds it from .venv/bin on
    PATH, and it is what argparse-manpage makes of the parser today, with every command."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("MANPATH", None)
    found = subprocess.run(["man", "-w", "blkfs"], env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    page = VENV / "share/man/man1/blkfs.1"
    assert Path(found.stdout.strip()) == page
    fresh = tmp_path / "blkfs.1"
    subprocess.run([ROOT / "scripts/manpage", str(fresh)], check=True)
    undated = re.compile(r"^\.TH .*$", re.M)
    assert undated.sub("", page.read_text()) == undated.sub("", fresh.read_text()), (
        "the installed man page is stale: run scripts/setup"
    )
    text = subprocess.run(
        ["man", "-l", str(page)], env={**env, "MANWIDTH": "100"}, capture_output=True, text=True
    ).stdout
    for command in ("mount", "umount", "ctl", "snapshot", "mirror", "job", "image"):
        assert f"blkfs {command}" in text
    assert "--poll-max-ns" in text and "--print-completion" in text


# -- completion -----------------------------------------------------------------------------


def bash_completions(*words: str) -> list[str]:
    """What bash offers for the last of ``words``, with the script users source."""
    script = (
        f'source <("{BIN / "blkfs"}" --print-completion bash)\n'
        'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}\n'
        '_shtab_blkfs blkfs "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "-c", script, "bash", "blkfs", *words], capture_output=True, text=True, check=True
    )
    return result.stdout.split()


@needs_fuse
@pytest.mark.fuse
def test_bash_completes_commands_and_the_backends_and_jobs_of_a_mount(
    tmp_path: Path, images: Path, mount_factory: Callable[..., Mount]
) -> None:
    for name in ("a", "vm2"):
        pattern_image(images / f"{name}.img", MiB, image_id=1)
    mount = mount_factory(
        "--backend", f"a={images / 'a.img'}", "--backend", f"vm2={images / 'vm2.img'}"
    )
    mnt = str(mount.path)
    assert bash_completions("mi") == ["mirror"]
    assert bash_completions("snapshot", mnt, "") == ["a", "vm2"]
    assert bash_completions("rollback", mnt, "v") == ["vm2"]
    assert bash_completions("ctl", mnt, "eject", "") == ["a", "vm2"]
    assert bash_completions("snapshot", str(tmp_path / "nothing-here"), "") == []
    assert bash_completions("job", "wait", mnt, "") == []
    blkfs(
        "mirror",
        mnt,
        "vm2",
        str(images / "copy.img"),
        "--format",
        "raw",
        "--speed",
        "1K",
        "--no-wait",
    )
    try:
        assert bash_completions("job", "cancel", mnt, "") == ["vm2"]
    finally:
        blkfs("job", "cancel", mnt, "vm2")


@needs_fuse
@pytest.mark.fuse
def test_zsh_completes_the_backends_of_a_mount(
    tmp_path: Path, images: Path, mount_factory: Callable[..., Mount]
) -> None:
    """A real interactive zsh (zsh/zpty) with the completion installed where compinit finds
    it, pressing Tab after a mount."""
    for name in ("alpha", "beta"):
        pattern_image(images / f"{name}.img", MiB, image_id=1)
    mount = mount_factory(
        "--backend", f"alpha={images / 'alpha.img'}", "--backend", f"beta={images / 'beta.img'}"
    )
    functions = tmp_path / "site-functions"
    functions.mkdir()
    (functions / "_blkfs").write_text(blkfs("--print-completion", "zsh").stdout)
    driver = f"""
zmodload zsh/zpty
zpty -b z 'zsh -f -i'
zpty -w z 'PS1=; fpath=({functions} $fpath); autoload -Uz compinit; compinit -u -D'
zpty -w -n z $'blkfs snapshot {mount.path} \\t\\t'
zpty -r z out '*beta*'
print -r -- $out
zpty -d z
"""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["zsh", "-f", "-c", driver], capture_output=True, text=True, timeout=60, env=env
    )
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", " ", result.stdout)
    listing = screen.rsplit(str(mount.path), 1)[-1].split()
    assert {"alpha", "beta"} <= set(listing), result.stdout


# -- systemd --------------------------------------------------------------------------------


def unit_for_this_checkout(where: Path, instance: str) -> Path:
    """The unit as scripts/setup installs it (ExecStart: this .venv's blkfs), named as an
    instance."""
    text = UNIT.read_text().replace("/usr/local/bin/blkfs", str(BIN / "blkfs"))
    assert text == (VENV / "share/systemd/blkfs@.service").read_text(), "run scripts/setup"
    path = where / f"blkfs@{instance}.service"
    path.write_text(text)
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """It checks the syntax, that ExecStart is a program, and that man:blkfs(1) exists."""
    unit = unit_for_this_checkout(tmp_path, "vm")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("MANPATH", None)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0 and not result.stderr, result.stderr


@needs_fuse
@pytest.mark.fuse
def test_the_units_command_tells_systemd_it_serves_and_a_stop_unmounts(
    tmp_path: Path, images: Path
) -> None:
    """What systemd does with blkfs@vm.service, done by hand: run ExecStart with %i and the
    config folder filled in and $NOTIFY_SOCKET set; READY=1 comes once the files are there;
    SIGTERM (systemctl stop) flushes, unmounts and ends the daemon with status 0."""
    data = pattern_image(images / "disk.img", MiB, image_id=3)
    mountpoint = tmp_path / "mnt"
    (tmp_path / "vm.toml").write_text(
        f'mountpoint = "{mountpoint}"\n[backends.disk]\noptions = "{images / "disk.img"}"\n\n'
    )
    unit = unit_for_this_checkout(tmp_path, "vm")
    (command,) = re.findall(r"^ExecStart=(.*)$", unit.read_text(), re.M)
    argv = command.replace("/etc/blkfs/", f"{tmp_path}/").replace("%i", "vm").split()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as f:
        daemon = subprocess.Popen(argv, env=env, stderr=f)
    try:
        assert notify.recv(100) == b"READY=1"
        assert (mountpoint / "disk").read_bytes() == data
        with open(mountpoint / "disk", "r+b", buffering=0) as f:
            f.write(b"written under systemd")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=120) == 0
        assert not mounted(mountpoint)
        assert (images / "disk.img").read_bytes().startswith(b"written under systemd")
        assert "Traceback" not in stderr.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        notify.close()


def test_a_config_without_a_mountpoint_needs_one_on_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("")
    result = blkfs("mount", "--config", str(tmp_path / "c.toml"), check=False)
    assert result.returncode == 1 and "no mountpoint" in result.stderr


# -- mount -t fuse.blkfs and /etc/fstab ---------------------------------------------------------


def in_private_namespace(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as root in a mount namespace of its own, where /usr/local/bin (the PATH
    mount.fuse3's shell searches: mount(8) runs helpers with no PATH) holds this checkout's
    blkfs, and /etc/fstab is the test's: the machine's own stay untouched. Whatever the
    script mounts goes with the namespace; a trap unmounts it so its daemon ends."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "blkfs").symlink_to(BIN / "blkfs")
    (tmp_path / "fstab").touch()
    preamble = (
        "set -eu\n"
        f"mount --bind {bin_dir} /usr/local/bin\n"
        f"mount --bind {tmp_path / 'fstab'} /etc/fstab\n"
        f"trap 'umount -l {tmp_path / 'mnt'} 2>/dev/null || true' EXIT\n"
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", preamble + script],
        capture_output=True,
        text=True,
        timeout=120,
    )


WAIT_FOR_DAEMON = """
pid=$(sed -n 's/.*"pid": \\([0-9]*\\).*/\\1/p' {mnt}/.ctl/status.json)
umount {mnt}
while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
"""
"""Plain umount(8), then wait until the daemon has flushed and ended."""


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) and unshare need root")


@needs_fuse
@needs_root
@pytest.mark.fuse
def test_mount_t_fuse_blkfs_mounts_a_config(tmp_path: Path, images: Path) -> None:
    data = pattern_image(images / "disk.img", MiB, image_id=5)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = tmp_path / "vm.toml"
    config.write_text(f'[backends.disk]\noptions = "{images / "disk.img"}"\n')
    result = in_private_namespace(
        tmp_path,
        f"mount -t fuse.blkfs -o allow_other,log_level=debug,log_file={tmp_path / 'log'} "
        f"{config} {mnt}\n"
        f"grep ' {mnt} ' /proc/mounts\n"
        f"cmp <(head -c {MiB} {mnt}/disk) {images / 'disk.img'}\n"
        f"printf 'through mount -t' | dd of={mnt}/disk conv=notrunc status=none\n"
        + WAIT_FOR_DAEMON.format(mnt=mnt),
    )
    assert result.returncode == 0, result.stderr
    assert "fuse.blkfs" in result.stdout and "allow_other" in result.stdout
    assert (images / "disk.img").read_bytes()[:16] == b"through mount -t"
    assert (images / "disk.img").stat().st_size == len(data)
    assert "DEBUG" in (tmp_path / "log").read_text()


@needs_fuse
@needs_root
@pytest.mark.fuse
def test_an_fstab_line_mounts_by_its_mountpoint(tmp_path: Path, images: Path) -> None:
    pattern_image(images / "disk.img", MiB, image_id=6)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = tmp_path / "vm.toml"
    config.write_text(f'[backends.disk]\noptions = "{images / "disk.img"}"\n')
    (tmp_path / "fstab.line").write_text(
        f"{config}  {mnt}  fuse.blkfs  noauto,nofail,_netdev,x-systemd.automount  0 0\n"
    )
    result = in_private_namespace(
        tmp_path,
        f"cat {tmp_path / 'fstab.line'} > /etc/fstab\n"
        f"mount {mnt}\n"
        f"ls {mnt}\n" + WAIT_FOR_DAEMON.format(mnt=mnt),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["disk"]


@needs_fuse
@needs_root
@pytest.mark.fuse
def test_mount_t_with_an_option_blkfs_lacks_says_so_and_mounts_nothing(
    tmp_path: Path, images: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = tmp_path / "vm.toml"
    config.write_text("")
    result = in_private_namespace(
        tmp_path,
        f"mount -t fuse.blkfs -o cache=on {config} {mnt} || echo status $?\n"
        f"mount -t fuse.blkfs -o ro {config} {mnt} || echo status $?\n"
        f"grep -c ' {mnt} ' /proc/mounts || true\n",
    )
    assert result.returncode == 0, result.stderr
    assert "unknown option 'cache'" in result.stderr and "allow_other" in result.stderr
    assert "option 'ro'" in result.stderr
    assert result.stdout.split() == ["status", "1", "status", "1", "0"]
    assert not mounted(mnt)
