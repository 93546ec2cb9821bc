"""Checkpoint loading shared by the examples' trainers (``examples.toy.train``, ``examples.nanogpt.train``).

A checkpoint is read with ``torch.load(weights_only=True)`` (no pickle) and checked against the live
model and optimizers *before* anything is loaded, so a rejected checkpoint leaves the live state
untouched; every error is a ``ValueError`` naming the file.
"""
from __future__ import annotations

import os

import torch

__all__ = ["read_checkpoint", "state_problems"]


def read_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """``torch.load(path, weights_only=True)`` as a dict; an unreadable file is a ``ValueError`` naming it."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):  # opening a FIFO waits for a writer
        raise ValueError(f"{path}: cannot read the checkpoint (not a regular file: a FIFO, socket or device)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, not a checkpoint, a directory, a forbidden pickle, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: the checkpoint holds a {type(state).__name__}, expected a dict")
    return state


def _dense(v: torch.Tensor) -> bool:
    """Whether ``v`` holds values a ``copy_`` into a parameter or an optimizer's cast can read: a strided tensor
    not on ``meta`` (``torch.load(weights_only=True)`` returns sparse and meta tensors too; loading one failed
    part-way, after the tensors before it were copied)."""
    return v.layout == torch.strided and v.device.type != "meta"


def _drops_imaginary(v: torch.Tensor, into: torch.Tensor) -> bool:
    """Whether loading ``v`` into the real ``into`` casts complex values to real: torch warns and drops the
    imaginary part (under ``-W error`` the load fails part-way, after the tensors before it were copied)."""
    return v.is_complex() and into.is_floating_point()


def _hashable(v) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


def _optimizer_problems(i: int, opt: torch.optim.Optimizer, s) -> list[str]:
    if not isinstance(s, dict) or not isinstance(s.get("param_groups"), list) or not isinstance(s.get("state"), dict):
        return [f"optimizer {i} ({type(opt).__name__}): not an optimizer state dict"]
    if len(s["param_groups"]) != len(opt.param_groups):
        return [f"optimizer {i} ({type(opt).__name__}): {len(s['param_groups'])} parameter groups, "
                f"this run has {len(opt.param_groups)}"]
    params = {}
    for k, (g, have) in enumerate(zip(opt.param_groups, s["param_groups"])):
        ids = have.get("params") if isinstance(have, dict) else None
        if not isinstance(ids, list) or len(ids) != len(g["params"]):
            return [f"optimizer {i} ({type(opt).__name__}) group {k}: "
                    f"{len(ids) if isinstance(ids, list) else '?'} parameters, this run has {len(g['params'])}"]
        if not all(_hashable(pid) for pid in ids):  # torch's load_state_dict keys a dict by them: a TypeError
            return [f"optimizer {i} ({type(opt).__name__}) group {k}: parameter ids {ids[:5]} are not all hashable "
                    "(torch numbers them)"]
        params.update(zip(ids, g["params"]))
    out = []
    for pid, entry in s["state"].items():
        if pid not in params:
            out.append(f"optimizer {i}: state for unknown parameter {pid!r}")
            continue
        if not isinstance(entry, dict):  # the optimizer's load_state_dict fails on it, after the model loaded
            out.append(f"optimizer {i} parameter {pid}: state is a {type(entry).__name__}, expected a dict")
            continue
        for name, v in entry.items():
            if isinstance(v, torch.Tensor) and not _dense(v):
                out.append(f"optimizer {i} parameter {pid} {name}: a {v.layout} tensor on {v.device}, "
                           "expected a dense tensor holding values")
            elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != params[pid].shape:
                out.append(f"optimizer {i} parameter {pid} {name}: shape {tuple(v.shape)}, "
                           f"the parameter's {tuple(params[pid].shape)}")
            elif isinstance(v, torch.Tensor) and _drops_imaginary(v, params[pid]):
                out.append(f"optimizer {i} parameter {pid} {name}: {v.dtype}, the parameter's {params[pid].dtype} "
                           "is real (the cast would drop the imaginary part)")
    return out


def state_problems(model: torch.nn.Module, optimizers, model_state, optimizer_states) -> list[str]:
    """What keeps ``model_state`` / ``optimizer_states`` from loading into ``model`` / ``optimizers`` (empty: loadable).

    Checks the model's keys, shapes and tensors (dense, holding values, not complex for a real tensor) and the
    optimizers' count, group and parameter counts and per-parameter states (dicts of dense tensors of the
    parameter's shape, not complex for a real parameter), without changing anything.
    """
    out = []
    if not isinstance(model_state, dict):
        return [f"model state is a {type(model_state).__name__}, expected a dict"]
    live = model.state_dict()
    missing, extra = sorted(set(live) - set(model_state)), sorted(set(model_state) - set(live))
    if missing:
        out.append(f"model keys missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        out.append(f"unexpected model keys: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k in sorted(set(live) & set(model_state)):
        v = model_state[k]
        if not isinstance(v, torch.Tensor) or v.shape != live[k].shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            out.append(f"model {k}: {got}, this run has {tuple(live[k].shape)}")
        elif not _dense(v):
            out.append(f"model {k}: a {v.layout} tensor on {v.device}, expected a dense tensor holding values")
        elif _drops_imaginary(v, live[k]):
            out.append(f"model {k}: {v.dtype}, this run's {live[k].dtype} is real (the copy would drop the "
                       "imaginary part)")
    optimizers = list(optimizers)
    if not isinstance(optimizer_states, (list, tuple)) or len(optimizer_states) != len(optimizers):
        n = len(optimizer_states) if isinstance(optimizer_states, (list, tuple)) else type(optimizer_states).__name__
        out.append(f"{n} optimizer states, this run builds {len(optimizers)} optimizers")
    else:
        for i, (opt, s) in enumerate(zip(optimizers, optimizer_states)):
            out.extend(_optimizer_problems(i, opt, s))
    return out
