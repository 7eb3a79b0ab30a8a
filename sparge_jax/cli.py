"""What every command line of the project shares: a `--help` that shows the defaults, and
one error path (a user error prints one line naming the option and what is allowed, exit 2;
anything else keeps its traceback)."""

from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` lists each option's default after its help text and keeps the description's
    line breaks (usage examples stay readable). Required options and defaults of None show no
    default: their help text says what leaving them out does."""

    def _get_help_string(self, action):
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def exit_on_user_error(prog: str, run, *args, **kwargs):
    """`run(*args, **kwargs)`; a `ValueError` or `OSError` (bad values, bad or missing files,
    mismatched presets, unsupported method/model combinations) prints `<prog>: error: <message>`
    on stderr and exits with status 2. Other exceptions propagate with their traceback."""
    try:
        return run(*args, **kwargs)
    except (ValueError, OSError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)


def moved_module(name: str, old: str, new: str, script: str) -> None:
    """The whole job of a module left at an old spelling `old` (e.g. "sparge_jax.sample") that moved
    to `new`: run as a script (`name == "__main__"`, `python -m old`) it prints one line naming
    the new spelling and the console `script` on stderr and exits with status 2; imported, it
    raises ImportError with the same line."""
    message = f"{old} moved to {new}: run `python -m {new}` or `{script}` (import {new} in code)"
    if name == "__main__":
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    raise ImportError(message)
