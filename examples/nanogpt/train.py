"""Trainer for the variant zoo.

One optimizer step at batch tier ``B`` consumes ``B`` micro-batches of ``rows x seq_len`` tokens
(gradient accumulation; the loss of each micro-batch is divided by ``B``). By default a micro-batch
is the profile's ``long_ctx`` tokens: one packed row for windowed variants, or
``long_ctx / short_ctx`` rows for dense-causal ones. At d12 that is 65,536 tokens, so tier 8 is the
records' 524,288 tokens per step (8 x 65,536-token rows, or 512 rows of 1,024).

Data parallelism: launched by ``torchrun`` (or inside an initialized process group) each rank
takes micro-batches ``i = rank, rank + W, ...`` of every step and gradients are summed with one
all-reduce per step, so W ranks compute the same update as one process (records from 01-13 on
do the same instead of wrapping the model in DDP). NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from examples.checkpoint import read_checkpoint, state_problems
from spectral_lens.atomic import write_atomic, write_json_atomic, write_text_atomic

from .data import load_data, micro_batch
from .model import GPT, count_params, window_at
from .optim import apply_schedule, build_optimizers, lr_multiplier
from .variants import build_config, build_recipe, canonical_name, get_profile

OnEval = Callable[[torch.nn.Module, int, int, float], None]


class CheckpointMismatch(ValueError):
    """``resume=`` names a checkpoint this run cannot continue (other settings, other data, another
    shape): a property of the checkpoint, not of the run, so a caller that resumes on its own (the
    tuner's ``ZooTrainable``) can tell it from a run that fails."""


class TrainingDiverged(FloatingPointError):
    """The training loss, a validation loss or the weights to be checkpointed turned non-finite: :func:`train`
    stops there (training on a NaN model only wrote NaN rows and NaN checkpoints). ``step``, ``tokens``,
    ``what`` (``"training loss"``, ``"validation loss"``, ``"weights"``) and ``value`` say where; ``checkpoint``
    is the newest checkpoint of the run (saved by it, or the one it resumed from; ``None``: none), saved
    while its weights were finite; under torchrun rank 0 saves it and every rank names it (until review 27 the
    other ranks said no checkpoint was saved). A ``FloatingPointError``, as the speedrun's and the toy's divergence."""

    def __init__(self, message: str, *, step: int, tokens: int, what: str, value: float,
                 checkpoint: Path | None):
        super().__init__(message)
        self.step, self.tokens, self.what, self.value, self.checkpoint = step, tokens, what, value, checkpoint


def _finite_weights(model: torch.nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite (one synchronization)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


@dataclass
class TrainResult:
    """What a run produced. ``history`` holds the evaluation rows written to ``metrics.jsonl``."""

    run_dir: Path
    steps: int
    tokens: int
    final_val_loss: float
    tokens_per_s: float
    history: list[dict]


def _setup_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks with one flat all-reduce per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def accumulate_gradients(model: GPT, stream, step: int, *, batch_tier: int, rows: int, seq_len: int,
                         window=None, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Gradients of optimizer step ``step`` into ``.grad``; returns the step's mean loss (a tensor).

    This rank runs micro-batches ``step * batch_tier + i`` for ``i = rank, rank + world, ...``,
    each loss divided by ``batch_tier``; with ``world > 1`` gradients and loss are then summed
    over ranks, so every rank holds the gradient one process would compute for the whole step.
    bf16 autocast on CUDA.
    """
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    for i in range(rank, batch_tier, world):
        x, y = micro_batch(stream, step * batch_tier + i, rows, seq_len, device, model.config.vocab_size)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(x, y, window=window)
        (loss / batch_tier).backward()
        loss_sum += loss.detach()
    if world > 1:
        _all_reduce_grads([p for p in model.parameters() if p.requires_grad])
        dist.all_reduce(loss_sum)
    return loss_sum / batch_tier


def train(*, variant: str = "FlexWin", profile: str = "tiny", data: str = "pydoc", run_dir: str | os.PathLike = "runs/nanogpt",
          steps: int | None = None, tokens: int | None = None, batch_tier: int = 8, seq_len: int | None = None,
          rows: int | None = None, lr_scale: float = 1.0, matrix_optimizer: str | None = None,
          matrix_lr: float | None = None, muon_impl: str = "auto", eval_every_tokens: int | None = None,
          val_tokens: int | None = None, target_val_loss: float | None = None,
          checkpoint_every_tokens: int | None = None, save_final: bool = True, resume: str | os.PathLike | None = None,
          stop_tokens: int | None = None,
          seed: int = 0, device: str | None = None, compile: bool = False, attn_impl: str = "auto",
          on_eval: OnEval | None = None, log_every: int = 10, verbose: bool = True) -> TrainResult:
    """Train ``variant`` at ``profile`` and return a :class:`TrainResult`.

    Length: ``steps`` optimizer steps, or enough steps for ``tokens`` training tokens.
    ``batch_tier``: micro-batches per step (see the module docstring); ``seq_len``/``rows`` override
    the micro-batch geometry. ``lr_scale`` multiplies every group's base rate (the paper's
    per-tier LR sweep). ``matrix_optimizer``: "muon" | "adamw" | "lamb" for the hidden matrices
    (default: the variant's), with ``matrix_lr`` as its base rate.

    Evaluation: mean loss on the first ``val_tokens`` held-out tokens (default: up to the records'
    10,485,760), at step 0, every ``eval_every_tokens`` training tokens (default: ten times per run)
    and at the end, with the window of the current step. After each evaluation
    ``on_eval(model, step, tokens, val_loss)`` is called on every rank with the unwrapped model in
    eval mode (train mode is restored afterwards). ``target_val_loss`` stops at the first
    evaluation at or below it. ``stop_tokens`` ends the run early, after the first step that reaches
    that many training tokens (evaluated and checkpointed like an end), while the LR schedule and the
    evaluation points still span the full ``steps``/``tokens``: a run stopped there and resumed from
    its checkpoint is the same run as one never stopped (the tuner's promoted trials). Every evaluation and every ``log_every`` steps append a JSON line
    (step, tokens, train_loss, val_loss, tokens_per_s, lr_mult, elapsed_s) to
    ``run_dir/metrics.jsonl``; checkpoints are ``run_dir/ckpt_<step>.pt`` state dicts. The temporary
    files a killed run left behind (an interrupted checkpoint save: as large as a checkpoint) are
    removed when a run starts in ``run_dir``.

    Divergence: a non-finite training loss (checked whenever it is read: every ``log_every`` steps, at
    evaluations, after the evaluation and ``on_eval``, and before each checkpoint), a non-finite validation
    loss (after ``on_eval``, which may raise its own exception first) or non-finite weights about to be checkpointed stop the run with
    :class:`TrainingDiverged` (its row written to ``metrics.jsonl``); no checkpoint of a NaN model is saved, so
    the newest one (``TrainingDiverged.checkpoint``) is the last finite state.
    """
    _check_arguments(steps=steps, tokens=tokens, batch_tier=batch_tier, seq_len=seq_len, rows=rows,
                     eval_every_tokens=eval_every_tokens, val_tokens=val_tokens,
                     checkpoint_every_tokens=checkpoint_every_tokens, stop_tokens=stop_tokens, log_every=log_every)
    for name, v in (("lr_scale", lr_scale), ("matrix_lr", matrix_lr)):
        if v is not None and not (isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0):
            raise ValueError(f"train: {name}={v!r}, expected a finite number >= 0")
    if target_val_loss is not None and not (isinstance(target_val_loss, numbers.Real) and math.isfinite(target_val_loss)
                                            and target_val_loss > 0):
        # nan never stops the run and inf stops it at step 0, before any training: both are mistakes
        raise ValueError(f"train: target_val_loss={target_val_loss!r}, expected a finite loss > 0")
    variant = canonical_name(variant)
    prof = get_profile(profile)
    device = _device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    rank, world, own_group = _setup_distributed(device)
    finished = False
    try:
        td = load_fitting_data(data, profile)
        base = build_config(variant, prof)
        windowed = base.attn_mask == "window"
        seq_len = seq_len or base.seq_len
        rows = rows or (1 if windowed else max(1, prof.long_ctx // seq_len))
        cfg = build_config(variant, prof, seq_len=seq_len, eot_id=td.eot_id)
        if batch_tier < world:
            raise ValueError(f"batch_tier={batch_tier} < world size {world}: every rank needs a micro-batch")
        tokens_per_step = batch_tier * rows * seq_len
        if steps is None:
            if tokens is None:
                raise ValueError("train: give steps= or tokens=")
            steps = math.ceil(tokens / tokens_per_step)
        recipe = build_recipe(variant)
        stop_step = steps if stop_tokens is None else min(steps, max(1, math.ceil(stop_tokens / tokens_per_step)))

        torch.manual_seed(seed)
        model = GPT(cfg).to(device)
        model.attn_impl = attn_impl
        if world > 1:
            for t in model.state_dict().values():
                dist.broadcast(t, 0)
        opts = build_optimizers(model, recipe, matrix_optimizer=matrix_optimizer, matrix_lr=matrix_lr,
                                lr_scale=lr_scale, muon_impl=muon_impl)
        # what a checkpoint must share with the run that resumes it (stop_tokens, evaluation and logging may differ)
        settings = dict(variant=variant, profile=profile, data=td.name, data_fingerprint=td.fingerprint, steps=steps,
                        batch_tier=batch_tier, rows=rows, seq_len=seq_len, tokens_per_step=tokens_per_step,
                        lr_scale=float(lr_scale),
                        matrix_optimizer=matrix_optimizer or recipe.matrix_optimizer, matrix_lr=matrix_lr,
                        muon_impl=muon_impl, seed=seed, config=dataclasses.asdict(cfg))
        start = 0
        if resume is not None:
            start = _load_checkpoint(resume, model, opts, settings, device, data=td)
        # compile=True: one compiled graph of the whole model for the training steps only. Evaluation
        # and on_eval measurements use the eager module: no recompiles for grad mode or for the
        # measurement hooks. (Compiling each block separately re-specialized per block and grad mode
        # and hit dynamo's recompile limit within three steps, after which blocks ran eager.)
        step_model = torch.compile(model) if compile else model

        micro_tokens = rows * seq_len
        n_val = td.val.num_chunks(micro_tokens)
        if val_tokens is not None:
            n_val = min(n_val, max(1, val_tokens // micro_tokens))
        n_val = min(n_val, max(1, 10_485_760 // micro_tokens))
        if n_val == 0:
            raise ValueError(f"held-out stream of {td.name} has {td.val.num_tokens:,} tokens, fewer than one "
                             f"micro-batch of {micro_tokens + 1:,}")
        # chunks wrap around at the end of the training tokens: say so when this run (up to stop_step) reuses them
        n_train = td.train.num_chunks(micro_tokens)
        epochs = stop_step * batch_tier / n_train if n_train else None  # None: the first micro-batch fails
        if epochs is not None and epochs > 1 and rank == 0:
            warnings.warn(f"train: {stop_step} steps x {tokens_per_step:,} tokens = {epochs:.2f} passes over the "
                          f"{n_train * micro_tokens:,} training tokens of {td.name}: micro-batches repeat from step "
                          f"{n_train // batch_tier}", stacklevel=2)
        eval_steps = max(1, round(eval_every_tokens / tokens_per_step)) if eval_every_tokens else max(1, steps // 10)
        ckpt_steps = max(1, round(checkpoint_every_tokens / tokens_per_step)) if checkpoint_every_tokens else None

        run_dir = Path(run_dir)
        last_loss = None  # the latest training loss, for the rows
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(run_dir)
            meta = dict(variant=variant, profile=profile, data=td.name, data_fingerprint=settings["data_fingerprint"],
                        world_size=world, steps=steps,
                        batch_tier=batch_tier, rows=rows, seq_len=seq_len, tokens_per_step=tokens_per_step,
                        lr_scale=lr_scale, matrix_optimizer=matrix_optimizer or recipe.matrix_optimizer,
                        matrix_lr=matrix_lr, optimizers=[type(o).__module__ + "." + type(o).__name__ for o in opts],
                        train_epochs=epochs and round(epochs, 6), val_tokens=n_val * micro_tokens,
                        params=count_params(model), seed=seed, device=str(device),
                        fp8_head_active=cfg.fp8_head and model.fp8_head_active(torch.empty(16, cfg.n_embd, device=device)),
                        config=dataclasses.asdict(cfg), recipe=dataclasses.asdict(recipe))
            write_json_atomic(run_dir / "config.json", meta)
            # rows the interrupted run wrote past the checkpoint are trained again; a fresh run (start 0)
            # replaces the rows of an earlier run in this directory, as config.json above does
            last_loss = _truncate_metrics(run_dir / "metrics.jsonl", start)
            log_file = open(run_dir / "metrics.jsonl", "a")

        def log(row: dict):
            if rank == 0:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                if verbose:
                    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                          flush=True)

        @torch.no_grad()
        def evaluate(step: int) -> float:
            model.eval()
            window = window_at(cfg, step / steps)
            total = torch.zeros((), device=device, dtype=torch.float64)
            for k in range(rank, n_val, world):
                x, y = micro_batch(td.val, k, rows, seq_len, device, cfg.vocab_size)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    total += model(x, y, window=window).double()
            if world > 1:
                dist.all_reduce(total)
            return float(total) / n_val

        history: list[dict] = []
        t_start, train_time, train_tokens = time.perf_counter(), 0.0, 0
        step = start
        saved = Path(resume) if resume is not None else None  # the newest checkpoint: the last finite state
        bad_loss = None  # a non-finite training loss read at a step with an evaluation due

        def diverged(what: str, value: float) -> TrainingDiverged:
            where = f"at step {step} ({step * tokens_per_step:,} tokens)"
            last = (f"the last checkpoint, {saved}, was saved before it" + (" (by rank 0)" if world > 1 else "")
                    if saved else "no checkpoint was saved before it")
            return TrainingDiverged(f"train: {variant} diverged: {what} {value} {where}; {last}", step=step,
                                    tokens=step * tokens_per_step, what=what, value=value, checkpoint=saved)

        def check_weights() -> None:  # on every rank (identical weights): no rank waits for one that stopped
            if not _finite_weights(model):
                raise diverged("weights", math.nan)
        while True:
            last = step >= stop_step
            if last or step % eval_steps == 0 or step == start:
                val = evaluate(step)
                row = dict(step=step, tokens=step * tokens_per_step, train_loss=last_loss, val_loss=val,
                           tokens_per_s=train_tokens / train_time if train_time else None,
                           lr_mult=lr_multiplier(recipe, min(max(step - 1, 0), steps - 1), steps),
                           elapsed_s=time.perf_counter() - t_start)
                history.append(row)
                log(row)
                if on_eval is not None:
                    on_eval(model, step, step * tokens_per_step, val)
                if not math.isfinite(val):  # a caller's on_eval may have raised its own exception first
                    raise diverged("validation loss", val)
                if bad_loss is not None:  # read just before this evaluation: evaluated (and on_eval called) first
                    raise diverged("training loss", bad_loss)
                model.train()
                stop = target_val_loss is not None and val <= target_val_loss
                if last or stop:
                    break
            t0 = time.perf_counter()
            mult = apply_schedule(opts, recipe, step, steps)
            loss = accumulate_gradients(step_model, td.train, step, batch_tier=batch_tier, rows=rows, seq_len=seq_len,
                                        window=window_at(cfg, step / steps), rank=rank, world=world)
            for opt in opts:
                opt.step()
            model.zero_grad(set_to_none=True)
            step += 1
            checkpoint_due = bool(ckpt_steps) and step % ckpt_steps == 0 and step < stop_step
            if step % log_every == 0 or step >= stop_step or (step % eval_steps == 0) or checkpoint_due:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                last_loss = float(loss)
                if not math.isfinite(last_loss):  # the same on every rank (the loss is all-reduced)
                    if step >= stop_step or step % eval_steps == 0:
                        bad_loss = last_loss  # the evaluation due now records it, then the run stops
                    else:
                        log(dict(step=step, tokens=step * tokens_per_step, train_loss=last_loss, val_loss=None,
                                 lr_mult=mult, elapsed_s=time.perf_counter() - t_start))
                        raise diverged("training loss", last_loss)
            train_time += time.perf_counter() - t0
            train_tokens += tokens_per_step
            if step % log_every == 0 and step % eval_steps != 0 and step < stop_step:
                log(dict(step=step, tokens=step * tokens_per_step, train_loss=last_loss, val_loss=None,
                         tokens_per_s=train_tokens / train_time, lr_mult=mult,
                         elapsed_s=time.perf_counter() - t_start))
            if checkpoint_due and bad_loss is None:  # (else the evaluation due now stops the run)
                check_weights()
                saved = run_dir / f"ckpt_{step:06d}.pt"  # on every rank: TrainingDiverged names it on each
                if rank == 0:  # (rank 0 saves it; the others reach their next all-reduce only after it has)
                    _save_checkpoint(saved, model, opts, step, tokens_per_step, settings)
        if save_final:
            check_weights()
        if rank == 0:
            if save_final:
                _save_checkpoint(run_dir / f"ckpt_{step:06d}.pt", model, opts, step, tokens_per_step, settings)
            log_file.close()
        finished = True
        return TrainResult(run_dir, step, step * tokens_per_step, history[-1]["val_loss"],
                           train_tokens / train_time if train_time else float("nan"), history)
    finally:
        if own_group:  # after a success every rank waits for the others (rank 0's last checkpoint) first
            try:
                if finished:
                    dist.barrier()  # fails (gloo: connection reset) when another rank failed and exited
            finally:
                dist.destroy_process_group()


def load_fitting_data(data: str, profile: str):
    """``load_data(data)``, refusing (``ValueError``) token ids beyond ``profile``'s vocabulary: the
    check every trainer runs, exposed so that a command line (tuner, speedrun) makes it once, before
    any trial, instead of each trial failing on it alone."""
    td = load_data(data)
    vocab = get_profile(profile).vocab_size
    if td.vocab_size > vocab:
        raise ValueError(f"data {td.name} has {td.vocab_size} token ids but profile {profile!r} has "
                         f"vocab_size={vocab}; use a profile that fits the tokenizer")
    return td


def _check_arguments(**counts) -> None:
    """Every given count must be positive: an integer (steps, tier, geometry, log interval) or, for
    the ``*tokens`` amounts, any real number."""
    for name, v in counts.items():
        kind = numbers.Real if name.endswith("tokens") else numbers.Integral
        if v is not None and (isinstance(v, bool) or not isinstance(v, kind) or not v >= 1):
            raise ValueError(f"train: {name}={v!r}, expected a positive {'number' if kind is numbers.Real else 'integer'}")


def _device(device: str | None) -> torch.device:
    """The run's device (default: CUDA if available); an unknown or unavailable one is a ``ValueError``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"train: device={device!r} is not a torch device ({str(e).splitlines()[0][:80]})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train: device={device!r} but CUDA is not available here; use device='cpu'")
    return dev


#: The temporary files of this trainer's atomic writes (``write_atomic``: ``.<name>.<uuid hex>.tmp``).
_TEMPORARY = re.compile(r"\.(ckpt_\d+\.pt|config\.json|metrics\.jsonl)\.[0-9a-f]{32}\.tmp")


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Remove what a run killed mid-write left in ``run_dir`` (one trainer per run directory)."""
    for p in run_dir.iterdir():
        if _TEMPORARY.fullmatch(p.name):
            p.unlink(missing_ok=True)


def _save_checkpoint(path: Path, model, opts, step, tokens_per_step, settings: dict) -> None:
    """Write the checkpoint atomically: a temporary file in the same directory, fsync, rename."""
    state = dict(model=model.state_dict(), optimizers=[o.state_dict() for o in opts], step=step,
                 tokens=step * tokens_per_step, variant=settings["variant"], profile=settings["profile"],
                 config=settings["config"], settings=settings)
    write_atomic(path, lambda fh: torch.save(state, fh))


def _load_checkpoint(path, model, opts, settings: dict, device, data=None) -> int:
    """Restore model and optimizer state (``weights_only=True``: no pickled code); returns the step.

    The checkpoint must have been made with the same ``settings`` (variant, profile, data, schedule
    length, batch tier, micro-batch geometry, learning-rate scale, optimizers, seed, model config) and
    fit the model and optimizers; everything is checked before anything is loaded, so a rejected
    checkpoint (a :class:`CheckpointMismatch` naming the file and what differs) leaves the run untouched.
    Shards are the same data wherever their directory is (:func:`_same_data`). A checkpoint from before
    the trainer recorded the data's fingerprint is refused too (its data cannot be checked), saying so.
    """
    ck = read_checkpoint(path, map_location=device)
    have = ck.get("settings")
    if not isinstance(have, dict):
        raise CheckpointMismatch(f"{path}: the checkpoint records no training settings (made by an older trainer), "
                                 "so it cannot be checked against this run; start the run again without --resume")
    from .data import FINGERPRINT_VERSION, fingerprint_version

    fp = have.get("data_fingerprint")
    if isinstance(fp, str) and fingerprint_version(fp) > FINGERPRINT_VERSION:  # not "the data changed"
        raise CheckpointMismatch(f"{path}: the checkpoint's data fingerprint is version {fingerprint_version(fp)}, "
                                 f"written by a newer trainer (this one knows versions 1 to {FINGERPRINT_VERSION}), "
                                 "so its data cannot be checked; resume with that trainer or start the run again "
                                 "without --resume")
    if "data_fingerprint" not in have:  # written before the trainer recorded it
        bins = str(have.get("data")).startswith("bin:") and settings["data"].startswith("bin:")  # any directory
        if all(have.get(k) == settings.get(k) or k == "data_fingerprint" or (k == "data" and bins)
               for k in set(have) | set(settings)):
            raise CheckpointMismatch(f"{path}: the checkpoint records no data fingerprint (made by an older trainer), "
                                     f"so the data it was trained on cannot be checked against {settings['data']}; "
                                     "start the run again without --resume")
    diff = [k for k in sorted(set(have) | set(settings)) if have.get(k) != settings.get(k)
            and not (k in ("data", "data_fingerprint") and _same_data(have, settings, data))]
    if diff:
        shown = ", ".join(k if k == "config" else f"{k} (checkpoint {have.get(k)!r}, this run {settings.get(k)!r})"
                          for k in diff)
        todo = ("the data changed since the checkpoint (a shard added, removed, renamed or replaced, or another "
                "Python's bundled text): start a new run") if "data_fingerprint" in diff else \
            "resume with the checkpoint's settings or start a new run"
        raise CheckpointMismatch(f"{path}: checkpoint made with other settings: {shown}; {todo}")
    step = ck.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= settings["steps"] \
            or ck.get("tokens") != step * settings["tokens_per_step"]:
        raise CheckpointMismatch(f"{path}: step {step!r} / tokens {ck.get('tokens')!r} do not fit this run "
                                 f"({settings['steps']} steps of {settings['tokens_per_step']} tokens)")
    problems = state_problems(model, opts, ck.get("model"), ck.get("optimizers"))
    if problems:
        raise CheckpointMismatch(f"{path}: the checkpoint does not fit this run: {'; '.join(problems)}")
    model.load_state_dict(ck["model"])
    for o, s in zip(opts, ck["optimizers"]):
        o.load_state_dict(s)
    return step


def _same_data(have: dict, settings: dict, data=None) -> bool:
    """Whether a checkpoint's recorded ``data`` / ``data_fingerprint`` (``have``) name the data of this run
    (``settings``; ``data``: its :class:`~examples.nanogpt.data.TokenData`).

    Shard directories are not compared: the fingerprint (file names, lengths, sampled tokens) identifies the
    shards, and the directory was recorded as typed before review 26 (``bin:shards`` and ``bin:/abs/shards``
    were refused as different data). A fingerprint of an older version is checked against this data's
    fingerprint of that version (needs ``data``). The bundled corpus is compared by name (it holds the Python
    version) and fingerprint."""
    from .data import fingerprint_version

    name, fp = have.get("data"), have.get("data_fingerprint")
    if not isinstance(name, str) or not isinstance(fp, str):
        return False
    both_bin = name.startswith("bin:") and settings["data"].startswith("bin:")
    if not (both_bin or name == settings["data"]):
        return False
    version = fingerprint_version(fp)
    if version == fingerprint_version(settings["data_fingerprint"]):
        return fp == settings["data_fingerprint"]
    try:
        return data is not None and fp == data.fingerprint_as(version)
    except ValueError:  # a version this trainer does not know
        return False


def _truncate_metrics(path: Path, start: int) -> float | None:
    """Drop the rows of ``path`` (``metrics.jsonl``) at or past step ``start`` (atomically); the resumed run
    writes them again. Returns the dropped row's ``train_loss`` at ``start`` (the resumed run's first row).

    A line that is not a metrics row (a torn write, stray bytes) costs that line only: it is dropped
    with the rewrite. The rewritten file ends with a newline, so the resumed run's rows never join an
    unterminated last line."""
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    keep, loss = [], None
    for line in lines:
        try:
            row = json.loads(line)
            step = row["step"]
        except (ValueError, TypeError, KeyError, IndexError):
            continue
        if isinstance(step, bool) or not isinstance(step, int):
            continue
        if step < start:
            keep.append(line)
        elif step == start and isinstance(row.get("train_loss"), (int, float)):
            loss = row["train_loss"]
    if len(keep) != len(lines) or (text and not text.endswith("\n")):
        write_text_atomic(path, "".join(k + "\n" for k in keep))
    return loss


def load_model(path: str | os.PathLike, device: str = "cpu") -> GPT:
    """Rebuild a :class:`GPT` from a trainer checkpoint (``weights_only=True``).

    A file that is not a zoo checkpoint, or whose config or weights do not fit together, is a
    ``ValueError`` naming the file and what is wrong (checked before anything is built or loaded)."""
    from .model import GPTConfig

    ck = read_checkpoint(path, map_location=device)
    cfg = ck.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a zoo trainer checkpoint (no model config; keys {sorted(ck)[:6]})")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ValueError(f"{path}: the checkpoint's model config has fields this GPTConfig lacks: {unknown}")
    try:
        config = GPTConfig(**{**cfg, "no_attn_layers": tuple(cfg.get("no_attn_layers", ()))})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: the checkpoint's model config is not valid: {e}") from None
    model = GPT(config).to(device)
    problems = state_problems(model, [], ck.get("model"), [])
    if problems:
        raise ValueError(f"{path}: the checkpoint's weights do not fit its model config: {'; '.join(problems)}")
    model.load_state_dict(ck["model"])
    return model
