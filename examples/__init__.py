"""Runnable examples for spectral-lens (not part of the installed package).

Run them from the repository root, e.g. ``python -m examples.nanogpt params``.
"""
