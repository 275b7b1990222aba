"""What the `dz` commands of this package share: ordinary mistakes end in one line and a next step, not a traceback.

    @command("dz train")
    def train_main(argv): ...
        raise CommandError("--steps must be >= 1, got 0 (e.g. --steps 60)")

- `CommandError`: an ordinary mistake (a missing folder, a busy port, a wrong URL); its message names the problem and
  what to do. `command` prints `<prog>: error: <message>` on stderr and returns exit code 2; so it does for the
  errors of the data, config and checkpoint code that name their file (DataError, ConfigNameError, CheckpointError).
  Anything else is a bug and keeps its traceback.
- `--debug` anywhere on a command line (stripped before parsing) re-raises instead, with the traceback.
- `ArgumentParser`: argparse with one-line errors (exit code 2, the next step `<prog> --help`) that reads negative
  numbers as values, scientific notation included (`--lr -1e-3`), and lists `--debug` in its help.
Standard library only: the torch-free client command uses it too.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys

__all__ = ["CommandError", "ArgumentParser", "command", "is_ordinary_mistake"]

_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class CommandError(Exception):
    """An ordinary command-line mistake: the message names the problem and the next step."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with one-line errors and negative numbers (also 1e-3 style) read as values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER     # argparse's own misses "-1e-3"
        self.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def is_ordinary_mistake(e: BaseException) -> bool:
    """CommandError, and the errors of the data, config and checkpoint code, whose messages name the file or name."""
    if isinstance(e, CommandError):
        return True
    kinds = []
    for module, name in (("dreamzero.train.data.config", "DataError"), ("dreamzero.config", "ConfigNameError"),
                         ("dreamzero.checkpoint.keys", "CheckpointError")):
        mod = sys.modules.get(module)          # if the module was never imported, it raised nothing
        if mod is not None:
            kinds.append(getattr(mod, name))
    return isinstance(e, tuple(kinds))


def command(prog: str):
    """Decorator for a command `main(argv) -> int`: ordinary mistakes become `<prog>: error: ...` on stderr and exit
    code 2; `--debug` in argv re-raises them with the traceback."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(argv=None):
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = "--debug" in argv
            argv = [a for a in argv if a != "--debug"]
            try:
                return fn(argv)
            except Exception as e:
                if debug or not is_ordinary_mistake(e):
                    raise
                print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
                return 2
        return wrapper
    return deco
