"""Shared by the tuner's interrupt tests: a ``tune()`` call without its progress bar or the synthetic grid's
at-edge warning, and what two tunings are compared by."""

from __future__ import annotations

import warnings


def quiet_tune(trainable, *, cfg: dict, **kw):
    """``tune(trainable, **cfg, **kw)`` without a progress bar, the synthetic grid's at-edge warning ignored."""
    from examples.tune import tune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # the at-edge warning of the synthetic grid
        return tune(trainable, progress=False, **(cfg | kw))


def outcome(res):
    """What an interrupted-then-resumed tuning must share with an uninterrupted one."""
    return res.choices, res.losses, res.survivors, [(s.candidate.key, s.state, s.rung_losses) for s in res.trials]
