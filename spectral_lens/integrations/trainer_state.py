"""A finished (or running) Hugging Face ``Trainer`` run, read from its checkpoints' ``trainer_state.json``.

Measuring the checkpoints of a run after the fact (``docs/guide-checkpoints.md``) needs two things the
checkpoints hold in ``trainer_state.json``, which this module reads as JSON, never unpickling anything
(a checkpoint's ``training_args.bin``, ``optimizer.pt``, ``rng_state.pth`` are not opened):

* :func:`checkpoint_position`: the ``(step, tokens)`` at which a checkpoint was saved, to pass to
  ``SpectralLens.measure``;
* :func:`log_history`: the training and evaluation curves of ``log_history`` appended to a run record
  (``train_loss``, ``val_loss``, ``lr`` events of ``log.jsonl``), so ``spectral-lens report`` draws the
  loss curve and ``predict --target-loss`` finds the tokens to the target.

Tokens come from the Trainer's own count, ``num_input_tokens_seen``, which it keeps only with
``TrainingArguments(include_num_input_tokens_seen=True)`` (``"all"``: padding included; ``"non_padding"``).
Without it pass ``tokens_per_step`` (per-device batch x gradient accumulation steps x processes x sequence
length): nothing is guessed, and a state without a count and without ``tokens_per_step`` raises
``ValueError`` naming the file. Needs no ``transformers`` import.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any

from ..records import RunRecord

__all__ = ["checkpoint_position", "log_history"]

STATE_FILE = "trainer_state.json"


def _read_state(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """``(file, state)``: the JSON of ``trainer_state.json``, given the file or the checkpoint directory
    that holds it. A missing file or one that is not a JSON object raises naming the file."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() and path.name != STATE_FILE else path
    if not file.is_file():
        where = (f"{file} is not a file" if file.exists() else
                 f"{path} holds no {STATE_FILE}" if path.is_dir() else f"{file} does not exist")
        raise FileNotFoundError(f"{where}: expected a Trainer checkpoint directory (checkpoint-N/) or its {STATE_FILE}")
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep to parse
        raise ValueError(f"{file}: not a JSON file ({exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a JSON object (a Trainer state), got {type(state).__name__}")
    return file, state


def _count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _tokens(file: Path, where: str, step: int, seen: Any, tokens_per_step: int | None) -> int:
    """The Trainer's token count ``seen`` when it kept one, else ``step * tokens_per_step``."""
    if seen is not None and not _count(seen):
        raise ValueError(f"{file}: {where} num_input_tokens_seen must be a token count, got {seen!r}")
    if seen or step == 0:  # a count of 0 after step 0 is the Trainer's default: it did not count
        return int(seen or 0)
    if tokens_per_step is None:
        raise ValueError(
            f"{file}: {where} has no token count (num_input_tokens_seen is "
            f"{'0' if seen == 0 else 'absent'}: the run was trained without "
            "TrainingArguments(include_num_input_tokens_seen=True)); pass tokens_per_step= (per-device batch "
            "size x gradient_accumulation_steps x number of processes x sequence length)"
        )
    return int(step) * tokens_per_step


def _tokens_per_step(tokens_per_step: Any) -> int | None:
    if tokens_per_step is not None and (not _count(tokens_per_step) or tokens_per_step == 0):
        raise ValueError(f"tokens_per_step must be a positive integer, got {tokens_per_step!r}")
    return None if tokens_per_step is None else int(tokens_per_step)


def checkpoint_position(path: str | os.PathLike, *, tokens_per_step: int | None = None) -> tuple[int, int]:
    """``(step, tokens)`` of a Trainer checkpoint: its state's ``global_step`` and ``num_input_tokens_seen``.

    Args:
        path: a checkpoint directory (``out/checkpoint-500``) or its ``trainer_state.json``.
        tokens_per_step: training tokens per optimizer step, for a run trained without
            ``include_num_input_tokens_seen`` (whose state records ``num_input_tokens_seen: 0``):
            ``tokens = step * tokens_per_step``. Ignored when the state has a count.

    Raises ``ValueError`` naming the file when ``global_step`` is missing or not a step count, or when the
    state has no token count and ``tokens_per_step`` is not given.
    """
    tokens_per_step = _tokens_per_step(tokens_per_step)
    file, state = _read_state(path)
    step = state.get("global_step")
    if not _count(step):
        raise ValueError(f"{file}: global_step must be the checkpoint's optimizer step, got "
                         f"{'nothing (missing)' if 'global_step' not in state else repr(step)}")
    named = re.fullmatch(r"checkpoint-(\d+)", file.parent.name)
    if named and int(named[1]) != step:
        raise ValueError(f"{file}: global_step is {step} but the directory is {file.parent.name}: expected the step in "
                         "its name (the Trainer saves checkpoint-<global_step>); was this state copied from another "
                         "checkpoint?")
    return int(step), _tokens(file, "the state", int(step), state.get("num_input_tokens_seen"), tokens_per_step)


def log_history(writer, path: str | os.PathLike, *, tokens_per_step: int | None = None,
                eval_loss_key: str = "eval_loss") -> int:
    """Append the training curves of a Trainer state's ``log_history`` to ``writer``'s ``log.jsonl``.

    Each entry with ``loss``, ``eval_loss_key`` or ``learning_rate`` becomes one event at its ``step``:
    ``train_loss`` (the Trainer's mean over its logging interval), ``val_loss``, ``lr``, at the entry's
    ``num_input_tokens_seen`` (else ``step * tokens_per_step``). Other keys (``grad_norm``, the run
    summary's ``train_loss``, the other evaluation sets' losses) are not copied.

    Idempotent: a value the record already holds at the same step (a re-run, the state of a later
    checkpoint of the same run, whose history extends the earlier one, or a validation loss the
    ``SpectralLensCallback`` recorded during training) is not written again; a different value at the
    same step and key raises ``ValueError`` naming both, and nothing is written: the state of another
    run, or of this run resumed from a checkpoint before that step (``writer.drop_after(that
    checkpoint's step)`` removes what the record holds after it; measure the checkpoints after it
    again, they were overwritten). Read the newest checkpoint's state: it holds the whole history up
    to that checkpoint (a resumed Trainer continues the history of the checkpoint it resumed from).

    Args:
        writer: the run's :class:`~spectral_lens.records.RunWriter`.
        path: a checkpoint directory or its ``trainer_state.json``.
        tokens_per_step: as in :func:`checkpoint_position`.
        eval_loss_key: the evaluation metric recorded as ``val_loss``, as the callback's: ``eval_loss``,
            or ``eval_<name>_loss`` for one of several evaluation datasets (a dict). A history without it
            but with other ``eval_<name>_loss`` keys raises ``ValueError`` listing them.

    Returns:
        The number of events appended.
    """
    tokens_per_step = _tokens_per_step(tokens_per_step)
    eval_loss_key = str(eval_loss_key)
    keys = {"loss": "train_loss", eval_loss_key: "val_loss", "learning_rate": "lr"}
    file, state = _read_state(path)
    history = state.get("log_history")
    if not isinstance(history, list):
        raise ValueError(f"{file}: expected a list under 'log_history', got "
                         f"{'nothing (missing)' if 'log_history' not in state else type(history).__name__}")
    record = RunRecord.open(writer.path, errors="skip")
    had: dict[tuple[int, str], tuple[float, str]] = {}  # (step, key) -> (value, where it is)
    for e in record.events:
        for key in keys.values():
            if isinstance(e.get(key), numbers.Real) and isinstance(e.get("step"), int):
                had.setdefault((e["step"], key), (float(e[key]), f"the record {writer.path}"))
    for m in record.measurements:  # the callback's measurement at an evaluation holds its loss
        if m.val_loss is not None:
            had.setdefault((m.step, "val_loss"), (float(m.val_loss), f"the record {writer.path}"))
    events, other_losses, has_key = [], set(), False
    for i, entry in enumerate(history):
        where = f"log_history[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{file}: {where} is a {type(entry).__name__}, expected an object")
        has_key = has_key or eval_loss_key in entry
        other_losses.update(k for k in entry if isinstance(k, str) and re.fullmatch(r"eval_\w+_loss", k))
        values = {}
        for src, key in keys.items():
            if src in entry:
                v = entry[src]
                if isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise ValueError(f"{file}: {where}['{src}'] must be a number, got {v!r}")
                values[key] = float(v)
        if not values:
            continue
        step = entry.get("step")
        if not _count(step):
            raise ValueError(f"{file}: {where} has {sorted(values)} but "
                             f"{'no step' if 'step' not in entry else f'step {step!r}'}: expected the optimizer step")
        new = {}
        for key, v in values.items():
            old, there = had.get((step, key), (None, ""))
            if old is None:
                new[key] = v
            elif not (old == v or (math.isnan(old) and math.isnan(v))):
                why = ("the state of another run? A run resumed from a checkpoint before that step trained it "
                       "again: call writer.drop_after(<the step of the checkpoint it resumed from>) and measure the "
                       "checkpoints after it again" if there.startswith("the record") else
                       "two values at one step (a second evaluation there, e.g. trainer.evaluate() on another "
                       "dataset): record the one you mean with writer.log(step, tokens, val_loss=...)")
                raise ValueError(f"{file}: {where} has {key}={v!r} at step {step}, but {there} already holds "
                                 f"{key}={old!r} there: {why}; nothing was written")
        if new:
            tokens = _tokens(file, where, step, entry.get("num_input_tokens_seen"), tokens_per_step)
            events.append((step, tokens, new))
            for key, v in new.items():
                had[(step, key)] = (v, f"{where} of {file.name}")
    if not has_key and other_losses - {eval_loss_key}:  # several evaluation datasets: which one is not guessed
        raise ValueError(f"{file}: log_history holds no {eval_loss_key!r} but {sorted(other_losses)} (one per "
                         "evaluation dataset): pass eval_loss_key= the one to record as the validation loss; "
                         "nothing was written")
    for step, tokens, new in events:
        writer.log(step, tokens, **new)
    return len(events)
