"""Hypothesis profiles for the whole suite.

``ci`` (the default) draws the same examples on every run (``derandomize``), so the README's test
command passes or fails the same way on every clean clone. ``explore`` draws new examples each run:
``HYPOTHESIS_PROFILE=explore python -m pytest -q`` (repeat it, or pin a run with
``--hypothesis-seed=N``). Cases that exploration found and fixed are pinned with ``@example``.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
