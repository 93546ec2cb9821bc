"""Running the ``spectral-lens`` command line in the test process."""

from __future__ import annotations

import contextlib
import io


def run_cli(argv) -> tuple[int, str, list[str]]:
    """``spectral_lens.cli.main(argv)``'s exit status, stdout and stderr lines (argparse's ``SystemExit`` is
    caught as a status; any other exception, a traceback, fails the calling test)."""
    from spectral_lens.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exc:
            status = exc.code
    return status, out.getvalue(), err.getvalue().splitlines()
