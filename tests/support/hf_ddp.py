"""A real ``transformers.Trainer`` under 2-process DDP (gloo, CPU) with the ``SpectralLensCallback``, for
``tests/integrations/test_review23_hfddp.py``: a config-built GPT-2 (no download), the lens's writer on rank 0.
Spawned by :func:`support.ranks.run_ranks`; each case's per-rank result is written with
:func:`support.ranks.write_case`. Imported by name in the spawned processes (hence a module here)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from pathlib import Path

import torch

VOCAB, T, BATCH, WORLD = 64, 16, 2, 2
TOKENS_PER_STEP = WORLD * BATCH * T  # the whole world's tokens per optimizer step


def tiny_gpt2():
    """A two-layer GPT-2 of width 32, seeded (the same weights on every rank), with dropout (training draws from
    the RNG stream, which a measurement must leave as it was)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return transformers.GPT2LMHeadModel(cfg)


def heldout_pool():
    """Three dict batches of two sequences (every rank passes the same whole pool; the lens shards it: 3 on 2
    ranks, rank 0 gets two)."""
    ids = torch.randint(0, VOCAB, (6, T), generator=torch.Generator().manual_seed(99))
    return [{"input_ids": ids[i:i + 2], "labels": ids[i:i + 2]} for i in range(0, 6, 2)]


class Tokens(torch.utils.data.Dataset):
    """Random token ids, labels = input_ids. ``poison_from``: from that item fetched on (counted in this
    process), the ids hold a token outside the vocabulary, so the model's embedding raises in that batch's
    forward (a poisoned batch)."""

    def __init__(self, n: int, seed: int, poison_from: int | None = None) -> None:
        self.ids = torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))
        self.poison_from, self.fetched = poison_from, 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i].clone()
        if self.poison_from is not None and self.fetched >= self.poison_from:
            ids[3] = VOCAB + 7
        self.fetched += 1
        return {"input_ids": ids, "labels": ids}


def _recorder_class():
    import transformers

    class Recorder(transformers.TrainerCallback):
        """What a ``report_to`` logger receives (its ``on_log``), and the weights at the steps ``keep`` names
        (independent copies: a tied head is saved under both names)."""

        def __init__(self, keep=()) -> None:
            self.logs, self.keep, self.weights = [], set(keep), {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append({**(logs or {}), "step": state.global_step})

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in self.keep:
                self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    return Recorder


def reference_spectrum(state_dict, layer: str = "transformer.h.1") -> torch.Tensor:
    """The float64 reference: the trace-normalized eigenvalues of the centred covariance of ``layer``'s outputs
    over the whole pool, in one process (the same float32 forwards, batch by batch, then float64)."""
    model = tiny_gpt2()
    model.load_state_dict(state_dict)
    model.eval()
    rows = []
    module = model.get_submodule(layer)
    handle = module.register_forward_hook(lambda m, a, out: rows.append((out[0] if isinstance(out, tuple) else out)
                                                                       .detach().reshape(-1, 32).double()))
    try:
        with torch.no_grad():
            for batch in heldout_pool():
                model(input_ids=batch["input_ids"])
    finally:
        handle.remove()
    h = torch.cat(rows)
    values = torch.linalg.eigvalsh(torch.cov(h.T)).flip(0).clamp_min(0)
    return values / values.sum()


def _args(out: str, **kw):
    import transformers

    kw.setdefault("save_strategy", "no")
    return transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=4, learning_rate=3e-3,
        report_to=[], use_cpu=True, ddp_backend="gloo", disable_tqdm=True, seed=0, **kw)


def _writer(rank: int, path: Path, info, **kw):
    """Rank 0's ``RunWriter`` at ``path`` (no fsync, a tail window of (4, 16)); ``None`` on the other ranks."""
    from spectral_lens.records import RunWriter

    return RunWriter(path, info, fsync=False, tail_window=(4, 16), **kw) if rank == 0 else None


def _train(trainer, writer) -> None:
    """``trainer.train()``, inside ``with writer`` on rank 0 (an error marks the record failed)."""
    with writer if writer is not None else contextlib.nullcontext():
        trainer.train()


def _events(path: Path) -> list[dict]:
    from spectral_lens.records import RunRecord

    return RunRecord.open(path).events


def _measured(path: Path) -> list[list[int]]:
    from spectral_lens.records import RunRecord

    return [[m.step, m.tokens] for m in RunRecord.open(path).measurements]


def case_train(rank: int, root: Path) -> dict:
    """6 steps, a loss logged and an evaluation every 2 steps, the lens measuring every 2 steps (activations and
    the default gradient probe). Each rank returns its lens's spectra and what its loggers received, rank 0
    also its record, and saves the weights at every measured step (``weights<step>.safetensors``)."""
    import transformers

    import spectral_lens as sl
    from spectral_lens.integrations import SpectralLensCallback
    from spectral_lens.records import RunInfo, RunRecord

    path = root / "train"
    writer = _writer(rank, path, RunInfo("hf-ddp", family="gpt2", batch_tier=BATCH * WORLD, n_layer=2,
                                         total_tokens=6 * TOKENS_PER_STEP), head_window=(1, 4))
    # fp64 products (the default "exact" forms them in fp32), to compare against a float64 reference
    lens = sl.SpectralLens(pool=heldout_pool(), writer=writer, schedule=sl.Schedule.every(2), precision="float64",
                           progress=False)
    args = _args(str(root / f"out{rank}"), max_steps=6, logging_steps=2, eval_strategy="steps", eval_steps=2)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(64, 0),
                                   eval_dataset=Tokens(8, 1))
    SpectralLensCallback(lens, on_evaluate=True, tokens_per_step=TOKENS_PER_STEP).attach(trainer)
    recorder = _recorder_class()(keep={2, 4, 6} if rank == 0 else ())
    trainer.add_callback(recorder)
    _train(trainer, writer)
    result = {
        "process_index": trainer.args.process_index, "world": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__, "detached": lens.model is None,
        "history": [[m.step, m.tokens] for m in lens.history],
        "spectra": {str(m.step): {k: s.values.tolist() for k, s in m.spectra.items()} for m in lens.history},
        "n_rows": {k: s.n_rows for k, s in lens.history[-1].spectra.items()},
        "logs": [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in recorder.logs],
        "log_history": [{k: v for k, v in h.items() if isinstance(v, (int, float))}
                        for h in trainer.state.log_history],
    }
    if rank == 0:
        record = RunRecord.open(path)
        result["measured"] = [[m.step, m.tokens] for m in record.measurements]
        result["summaries"] = {str(m.step): m.summaries for m in record.measurements}
        result["scalars"] = {str(m.step): m.scalars for m in record.measurements}
        result["events"] = record.events
        result["run_json"] = json.loads((path / "run.json").read_text())
        from safetensors.torch import save_file

        for step, weights in recorder.weights.items():  # the parent computes the one-process references
            save_file(weights, str(root / f"weights{step}.safetensors"))
    return result


def case_plain(rank: int, root: Path) -> dict:
    """:func:`case_train`'s training without the callback; rank 0 saves the final weights
    (``weights_plain.safetensors``)."""
    import transformers
    from safetensors.torch import save_file

    args = _args(str(root / f"plain{rank}"), max_steps=6, logging_steps=2, eval_strategy="steps", eval_steps=2)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(64, 0),
                                   eval_dataset=Tokens(8, 1))
    trainer.train()
    if rank == 0:
        save_file({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                  str(root / "weights_plain.safetensors"))
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def case_short(rank: int, root: Path) -> dict:
    """2 steps with ``logging_steps=5``: no loss logged, so the callback records ``train()``'s final
    ``train_loss`` (rank 0's own mean) at step 2, at ``on_train_end``, the ranks agreeing on the write."""
    import transformers

    import spectral_lens as sl
    from spectral_lens.integrations import SpectralLensCallback
    from spectral_lens.records import RunInfo

    path = root / "short"
    writer = _writer(rank, path, RunInfo("hf-short", batch_tier=4))
    lens = sl.SpectralLens(pool=heldout_pool(), writer=writer, params=(), schedule=sl.Schedule.every(2),
                           progress=False)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=_args(str(root / f"short{rank}"), max_steps=2,
                                                                 logging_steps=5), train_dataset=Tokens(64, 2))
    SpectralLensCallback(lens, tokens_per_step=TOKENS_PER_STEP).attach(trainer)
    try:
        trainer.train()
    finally:
        if writer is not None:
            writer.close()
    final = [h["train_loss"] for h in trainer.state.log_history if "train_runtime" in h]
    return {"final_train_loss": final, "events": _events(path) if rank == 0 else None}


def _crash_at(step: int):
    import transformers

    class CrashAt(transformers.TrainerCallback):
        """The training loop crashes after optimizer step ``step``, on every rank (after the callback's hooks)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt(f"crash at step {step}")

    return CrashAt()


def case_resume(rank: int, root: Path) -> dict:
    """A run with a checkpoint every 2 steps that crashes after step 5 on every rank, then ``train(resume_from_
    checkpoint=<checkpoint-2>)`` with ``eval_on_start`` to step 6, rank 0's writer opened with ``resume=True``: the
    record holds each step once (rank 0 drops what came after step 2, both ranks agree whether step 2 counts as
    measured). One output directory for both ranks, as under torchrun (rank 0 saves the checkpoints)."""
    import transformers

    import spectral_lens as sl
    from spectral_lens.integrations import SpectralLensCallback
    from spectral_lens.records import RunInfo

    path, out = root / "resume", str(root / "resume_out")
    steps = []
    for resume in (False, True):
        writer = _writer(rank, path, None if resume else RunInfo("hf-resume", batch_tier=4, n_layer=2), resume=resume)
        lens = sl.SpectralLens(pool=heldout_pool(), writer=writer, params=(), schedule=sl.Schedule.every(2),
                               progress=False)
        args = _args(out, max_steps=6, logging_steps=2, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                     save_steps=2, eval_on_start=resume)
        trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(64, 0),
                                       eval_dataset=Tokens(8, 1))
        SpectralLensCallback(lens, on_evaluate=True, tokens_per_step=TOKENS_PER_STEP).attach(trainer)
        try:
            if resume:
                trainer.train(resume_from_checkpoint=f"{out}/checkpoint-2")
            else:
                trainer.add_callback(_crash_at(5))
                trainer.train()
        except KeyboardInterrupt:
            pass
        finally:
            if writer is not None:
                writer.close()
        steps.append([m.step for m in lens.history])
    if rank != 0:
        return {"history": steps}
    events = [[e["step"], "train_loss" if "train_loss" in e else "val_loss"] for e in _events(path)]
    return {"history": steps, "measured": _measured(path), "events": events}


def case_measurement_fails(rank: int, root: Path) -> dict:
    """As :func:`case_poisoned`, but what fails is rank 1's share of the lens's activation pass at step 4 (its
    ``forward_fn``): the lens agrees on it, so both ranks raise at once (rank 0 a ``RuntimeError`` naming rank 1)
    and stay in step (the worker's barrier after the case), the callback detaches the lens it attached on both
    ranks, and rank 0's ``with RunWriter(...)`` marks the record failed."""
    import transformers

    import spectral_lens as sl
    from spectral_lens.integrations import SpectralLensCallback
    from spectral_lens.records import RunInfo

    calls = []

    def forward(model, batch):
        calls.append(1)
        if rank == 1 and len(calls) == 2:  # rank 1's one pool batch of the second measurement
            raise RuntimeError("bad held-out batch on rank 1")
        return model(**batch)

    path = root / "measurement_fails"
    writer = _writer(rank, path, RunInfo("hf-measurement-fails", batch_tier=4, n_layer=2))
    lens = sl.SpectralLens(pool=heldout_pool(), writer=writer, params=(), forward_fn=forward,
                           schedule=sl.Schedule.every(2), progress=False)
    args = _args(str(root / f"fails{rank}"), max_steps=6, logging_steps=2)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(64, 0))
    SpectralLensCallback(lens, tokens_per_step=TOKENS_PER_STEP).attach(trainer)
    try:
        _train(trainer, writer)
    finally:
        Path(root, f"measurement_fails.state.rank{rank}.json").write_text(json.dumps(
            {"history": [m.step for m in lens.history], "global_step": trainer.state.global_step,
             "detached": lens.model is None}))
    return None


def case_poisoned(rank: int, root: Path) -> dict:
    """As :func:`case_train`, but rank 1's 4th training batch holds a token outside the vocabulary: its forward
    at step 4 raises on rank 1 only. Every rank must end (rank 0 with gloo's error from DDP's gradient all-reduce,
    once rank 1's process has left the group), and rank 0's ``with RunWriter(...)`` marks the record failed."""
    import transformers

    import spectral_lens as sl
    from spectral_lens.integrations import SpectralLensCallback
    from spectral_lens.records import RunInfo

    path = root / "poisoned"
    writer = _writer(rank, path, RunInfo("hf-poisoned", batch_tier=4, n_layer=2))
    lens = sl.SpectralLens(pool=heldout_pool(), writer=writer, params=(), schedule=sl.Schedule.every(2),
                           progress=False)
    args = _args(str(root / f"poisoned{rank}"), max_steps=6, logging_steps=2, eval_strategy="steps", eval_steps=2)
    data = Tokens(64, 0, poison_from=3 * BATCH if rank == 1 else None)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=data, eval_dataset=Tokens(8, 1))
    SpectralLensCallback(lens, on_evaluate=True, tokens_per_step=TOKENS_PER_STEP).attach(trainer)
    try:
        _train(trainer, writer)
    finally:
        steps = [m.step for m in lens.history]
        Path(root, f"poisoned.history.rank{rank}.json").write_text(json.dumps(
            {"history": steps, "global_step": trainer.state.global_step}))
    return {"history": steps}


CASES = {"train": case_train, "plain": case_plain, "short": case_short, "resume": case_resume,
         "measurement_fails": case_measurement_fails,
         "poisoned": case_poisoned}
ENDS_THE_PROCESS = {"poisoned"}  # a rank that failed there exits, as under torchrun (the others' collective fails)


def worker(rank: int, port: int, out: str, cases: tuple[str, ...] = tuple(CASES), pg_timeout_s: float = 60.0) -> None:
    """One rank's process: the environment torchrun would give (the ``Trainer``'s Accelerate state reads it), a
    gloo group with a collective timeout of ``pg_timeout_s`` (Accelerate keeps a group that is already up; on the
    CPU it would start one with the default 30 minutes), then each case in turn. A case's value or error, its end
    time and seconds, and (after every case but those of :data:`ENDS_THE_PROCESS`) the outcome of a barrier (the
    ranks in step again) go to ``<case>.rank<r>.json``. A case of :data:`ENDS_THE_PROCESS` that raised ends the
    process (a failed rank exits, as under torchrun), so the other ranks' next collective fails at once."""
    from support.ranks import gloo_group, write_case

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    import transformers  # noqa: F401  (imported before the group forms: seconds on a loaded machine)

    import spectral_lens.integrations  # noqa: F401

    root = Path(out)
    with gloo_group(rank, port, WORLD, pg_timeout_s):
        torch.distributed.barrier()  # connection set-up is not part of any case's seconds
        for case in cases:
            start = time.monotonic()
            result = {"value": None, "error": None}
            try:
                result["value"] = CASES[case](rank, root)
            except BaseException as exc:  # noqa: BLE001 - recorded for the parent
                result["error"] = f"{type(exc).__name__}: {exc}"
                result["traceback"] = traceback.format_exc()[-3000:]
            result["seconds"], result["ended"] = time.monotonic() - start, time.time()
            if result["error"] is not None and case in ENDS_THE_PROCESS:
                write_case(out, case, rank, result)
                return  # leaves the group: the process ends
            try:
                torch.distributed.barrier()
                result["barrier"] = "ok"
            except Exception as exc:  # noqa: BLE001
                result["barrier"] = f"{type(exc).__name__}: {exc}"
            write_case(out, case, rank, result)
