"""What every `pdpush` command module shares with `pdpush.cli`, kept apart from it so that a command
imports these without importing the command line (and `python -m pdpush.cli` sees one copy).

A command's `run(args)` raises UsageError for bad options or input (exit 2, nothing was started)
and RunError when the run itself failed (exit 1); `pdpush.cli.main` prints the message as one line
on stderr. `renamed` keeps an option's old spelling working without showing it in --help.
"""

from __future__ import annotations

import argparse


class CommandError(Exception):
    """A one-line message for the user; `exit_code` is what `pdpush` exits with."""

    exit_code = 1


class UsageError(CommandError):
    """Bad options or input, found before anything was started."""

    exit_code = 2


class RunError(CommandError):
    """The command started and failed (a server did not come up, a worker died...)."""

    exit_code = 1


def renamed(parser: argparse.ArgumentParser, name: str, old: str, **kwargs) -> argparse.Action:
    """Add option `name`, plus `old` as a hidden alias that stores into the same place, so commands
    written down with the old spelling (results/*/README.md) still run."""
    action = parser.add_argument(name, **kwargs)
    hidden = {**kwargs, "dest": action.dest, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS}
    parser.add_argument(old, **hidden)
    return action


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value
