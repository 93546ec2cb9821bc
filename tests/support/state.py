"""Accumulator state comparison for the update tests (bit for bit)."""

from __future__ import annotations

import copy
import re

import pytest
import torch


def snapshot(acc) -> dict:
    """Every field of the logical state, read from a deep copy (reading applies deferred CPU re-shift
    terms; the original is left untouched) and cloned, so later in-place writes would show."""
    sd = copy.deepcopy(acc).state_dict()
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def assert_refused_until_reset(acc, x, mask=None) -> None:
    """An accumulator stopped between its in-place add into ``S`` and the stores after it (a torn state):
    every use raises a ``RuntimeError`` naming what happened and ``reset()``; after ``reset()`` it measures
    again exactly as a new one."""
    from spectral_lens import ActivationCovarianceAccumulator

    label = acc.name
    for use in (lambda: acc.update(x, mask), acc.compute, acc.covariance, acc.state_dict, acc.compute_async,
                lambda: acc.save("unused.npz"), lambda: ActivationCovarianceAccumulator().merge(acc),
                lambda: acc.merge(ActivationCovarianceAccumulator())):
        with pytest.raises(RuntimeError, match=rf"{re.escape(label)}: an earlier update or read was interrupted .*reset\(\)"):
            use()
    acc.reset()
    acc.update(x, mask)
    fresh = ActivationCovarianceAccumulator(acc.dim, precision=acc.precision, max_chunk_rows=acc.max_chunk_rows,
                                            name=label)
    fresh.update(x, mask)
    assert_same_state(snapshot(acc), snapshot(fresh))
