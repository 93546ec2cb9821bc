"""``python -m spectral_lens ...``: the ``spectral-lens`` command line (:mod:`spectral_lens.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
