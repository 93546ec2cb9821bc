"""Optimizer steps counted for :class:`~spectral_lens.gradients.PerSampleGradientProbe`'s weight-change check.

Fused optimizers (``torch.optim.AdamW(fused=True)``, ``SGD(fused=True)``) write the weights without moving their
version counters, so the probe's counters alone miss their steps. A global ``torch.optim`` step post-hook counts
steps per optimizer; it is installed only while some probe holds an accumulation (:func:`hold_counting` /
:func:`release_counting`), so measurement leaves no hook behind.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch

# optimizer steps counted process-wide (_count_step): the count, and each optimizer's count at its last step.
# Fused optimizers (torch.optim.AdamW(fused=True), SGD(fused=True)) write the weights without moving their
# version counters, so the counters alone miss their steps. The global step post-hook is installed only while
# some probe holds an accumulation (hold_counting / release_counting): measurement leaves no hook behind.
# _STEPPED: per optimizer, the count at its last step that ran, and the later GradScaler steps with their flags
_STEPS = [0]
_STEPPED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, list]]" = weakref.WeakKeyDictionary()
_COUNTING_LOCK = threading.Lock()
_HOLDERS: set[int] = set()  # keys of the accumulations holding the hook (one per probe between update and reset)
_KEYS = itertools.count()
_COUNTING: list = []  # the hook's handle while _HOLDERS is not empty
_MAYBE_KEPT = 16  # GradScaler steps kept per optimizer with their unread inf flags (_count_step)


def _count_step(optimizer, args, kwargs) -> None:
    """The step post-hook: counts the step against ``optimizer``. A ``GradScaler`` step of an optimizer that scales
    itself (fused ones) calls ``step()`` also when it skips the update for inf gradients, with the flag as
    ``optimizer.found_inf``: kept, unread (no sync here), and read by :func:`stepped_parameters`."""
    _STEPS[0] += 1
    found = getattr(optimizer, "found_inf", None)
    try:
        sure, maybe = _STEPPED.get(optimizer, (0, []))
        if not isinstance(found, torch.Tensor):
            sure, maybe = _STEPS[0], []
        else:
            maybe = [*maybe, (_STEPS[0], found)]
            if len(maybe) > _MAYBE_KEPT:  # bounded: the oldest counts as a step
                sure, maybe = maybe[0][0], maybe[1:]
        _STEPPED[optimizer] = (sure, maybe)
    except TypeError:  # an optimizer that cannot be weakly referenced or hashed: not followed, never an error
        pass


def hold_counting() -> int:
    """Install the global optimizer step post-hook unless installed (O(1) per step), and hold it: returns the
    key for :func:`release_counting`."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    with _COUNTING_LOCK:
        key = next(_KEYS)
        if not _COUNTING:
            _COUNTING.append(register_optimizer_step_post_hook(_count_step))
        _HOLDERS.add(key)
        return key


def release_counting(key: int) -> None:
    """Drop the hold ``key`` (idempotent); the last one removes the hook."""
    with _COUNTING_LOCK:
        _HOLDERS.discard(key)
        if not _HOLDERS and _COUNTING:
            _COUNTING.pop().remove()


def optimizer_steps() -> int:
    """The number of ``torch.optim.Optimizer.step()`` calls counted so far (while some probe held the hook)."""
    return _STEPS[0]


def stepped_parameters(since: int, ids: set[int]) -> set[int]:
    """The ids among ``ids`` of parameters an optimizer stepped after the count ``since`` (a step a ``GradScaler``
    skipped for inf gradients, its ``found_inf`` flag set, left them unchanged: not counted)."""
    out: set[int] = set()
    for opt, (sure, maybe) in list(_STEPPED.items()):
        if sure > since or any(n > since and not bool(found) for n, found in maybe):
            out.update(i for g in opt.param_groups for i in map(id, g["params"]) if i in ids)
    return out
