"""What every example command line shares: argparse errors as one line with exit status 2."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line ``PROG: error: ...`` on stderr with exit status 2
    (argparse prints its usage block first); sub-command parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def directory(text: str) -> str:
    """An output directory option (``--run-dir``, ``--workdir``, ``--out``): an empty value (an unset
    shell variable) is refused. It would be the current directory, where the run's files replace the
    user's, or (``--out`` of toy and speedrun) silently the default directory, whose earlier results a
    rerun with the same preset reuses as its own."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a directory, got {text!r}")
    return text


def reader_gone() -> int:
    """After a ``BrokenPipeError`` (``... | head`` stopped reading): point standard output at /dev/null,
    so that the interpreter's final flush prints nothing, and return 141 (128 + SIGPIPE, as a shell
    reports a command killed by it), as ``spectral-lens`` does."""
    import os
    import sys

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (a captured stream in tests): nothing to flush
        pass
    return 141


def one_line(exc: BaseException) -> str:
    """The message of a user error as one line: a ``KeyError``'s own text (not its quoted repr), and
    newlines of a wrapped library message (a database driver's hint on a second line) folded."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return " ".join(str(text).split()) or type(exc).__name__
