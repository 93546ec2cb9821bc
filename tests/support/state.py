"""Accumulator state comparison for the update tests (bit for bit)."""

from __future__ import annotations

import copy

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
