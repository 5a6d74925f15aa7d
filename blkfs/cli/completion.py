"""Shell completion for bash and zsh (``blkfs --print-completion bash|zsh``, made by shtab
from the parser): commands, flags and choices as declared, files and directories where an
argument names one, and, once a command names a mount, that mount's backends and jobs (read
from the mount itself: its files and ``.ctl/jobs``)."""

from __future__ import annotations

import argparse

import shtab

FIND_MOUNT = {
    "bash": """
# The mount a command line names: its first word that is a directory holding .ctl.
_blkfs_mount() {
  local word
  for word in "${COMP_WORDS[@]:1:COMP_CWORD-1}"; do
    [[ -d $word/.ctl ]] && { printf '%s\\n' "$word"; return; }
  done
}
_blkfs_backends() {
  local mnt; mnt=$(_blkfs_mount); [[ -n $mnt ]] || return 0
  compgen -W "$(ls -1 -- "$mnt" 2>/dev/null)" -- "$1"
}
_blkfs_jobs() {
  local mnt; mnt=$(_blkfs_mount); [[ -n $mnt ]] || return 0
  compgen -W "$(awk 'NR > 1 {print $1}' "$mnt/.ctl/jobs" 2>/dev/null)" -- "$1"
}
""",
    "zsh": """
# The mount a command line names: its first word that is a directory holding .ctl.
_blkfs_mount() {
  local word
  for word in ${words[2,CURRENT-1]}; do
    [[ -d $word/.ctl ]] && { print -r -- $word; return }
  done
}
_blkfs_backends() {
  local mnt=$(_blkfs_mount); [[ -n $mnt ]] || return 1
  compadd -- ${(f)"$(ls -1 -- $mnt 2>/dev/null)"}
}
_blkfs_jobs() {
  local mnt=$(_blkfs_mount); [[ -n $mnt ]] || return 1
  compadd -- ${(f)"$(awk 'NR > 1 {print $1}' $mnt/.ctl/jobs 2>/dev/null)"}
}
""",
}
BACKEND = {"bash": "_blkfs_backends", "zsh": "_blkfs_backends"}
JOB = {"bash": "_blkfs_jobs", "zsh": "_blkfs_jobs"}
COMPLETERS = {
    "mountpoint": shtab.DIRECTORY,
    "name": BACKEND,
    "args": BACKEND,
    "job": JOB,
    "config": shtab.FILE,
    "file": shtab.FILE,
    "path": shtab.FILE,
    "target": shtab.FILE,
    "source": shtab.FILE,
    "log_file": shtab.FILE,
    "image_dir": shtab.DIRECTORY,
}
"""What completes an argument, by its name wherever it is declared (``args`` of ``ctl``
begins with a backend's name)."""


def add_to(parser: argparse.ArgumentParser) -> None:
    """Mark every argument ``parser`` and its subcommands declare with its completer, and
    give the parser ``--print-completion``."""
    _mark(parser)
    shtab.add_argument_to(parser, "--print-completion", preamble=FIND_MOUNT)


def _mark(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _mark(sub)
        elif action.dest in COMPLETERS and not action.choices:
            action.complete = COMPLETERS[action.dest]  # type: ignore[attr-defined]  # shtab reads it
