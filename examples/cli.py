"""What every example command line shares: argparse errors as one line with exit status 2; SIGTERM stopping
a command as Ctrl-C does, with one line and status 143 (Ctrl-C: 130)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading


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


class Terminated(KeyboardInterrupt):
    """SIGTERM in a command line's process, raised as Ctrl-C is (see :func:`sigterm_raises`): the tuner's workers
    release their trials on the way out, and a measured run's ``RunWriter`` marks its record failed (a plain
    SIGTERM ended the process at once: the trials stayed RUNNING until the tuner's grace period ran out, and
    nothing was printed)."""

    def __init__(self, *args):
        super().__init__(*args or ("SIGTERM",))  # the record's failure text: 'examples.cli.Terminated: SIGTERM'


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM raises :class:`Terminated` in the block (main thread, default disposition only: a SIGTERM that the
    caller ignores or handles is left so); the disposition is restored after."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stopped(prog: str, exc: KeyboardInterrupt, resume: str) -> int:
    """Say in one line that ``prog`` was stopped (``PROG: terminated: RESUME`` for SIGTERM, ``PROG: interrupted:
    RESUME`` for Ctrl-C) and return the status a shell gives a process the signal ended (143, 130)."""
    import sys

    kind, status = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
    print(f"{prog}: {kind}: {resume}", file=sys.stderr)
    return status


def run_stoppable(prog: str, resume: str, body, argv: list[str] | None) -> int:
    """``body(argv)``'s exit status, with SIGTERM raised as Ctrl-C is (:func:`sigterm_raises`) and either one said in
    one line (:func:`stopped`: 143 or 130): the job command lines' ``main``."""
    try:
        with sigterm_raises():
            return body(argv)
    except KeyboardInterrupt as e:
        return stopped(prog, e, resume)
