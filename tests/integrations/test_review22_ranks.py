"""Review of the callbacks' ``train_loss`` events on several ranks (``LensDriver.record_train_loss``): rank 0
writes each event and every rank agrees on its success (one small ``all_reduce`` per logged loss, at the
logging cadence, none per batch and none in a single process), so a failed write (a full disk, a read-only
directory) raises on every rank. Before, rank 0 wrote alone: it raised, and the other ranks went on into the
training's next collective and waited there until the process-group timeout.

The HF callback agrees in ``on_log``, which the ``Trainer`` calls on every rank at the same steps (its loss is
gathered over the ranks); the Lightning callback every ``log_every_n_steps`` and at the train end, on every
rank (before, the ranks other than 0 returned early). Both are driven through their hooks as the trainers call
them (no trainer: cheap). Fast: one process, alone or as one rank of 2 (a patched ``all_reduce``); slow: 2
gloo ranks."""

from __future__ import annotations

import errno
import re
import tempfile
from pathlib import Path

import pytest
import torch
from support.models import TinyGPT, lm_pool

import spectral_lens as sl
from spectral_lens.records import RunInfo, RunRecord, RunWriter

WHAT = "recording the training loss (rank 0 writes it)"


class FullDisk(RunWriter):
    """A run record whose ``log.jsonl`` appends fail as on a full disk."""

    def log(self, step, tokens, **scalars):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "log.jsonl"))


def _lens(path: Path | None, full: bool = False) -> sl.SpectralLens:
    torch.manual_seed(0)
    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
    writer = None if path is None else (FullDisk if full else RunWriter)(path, RunInfo("r", batch_tier=1),
                                                                          fsync=False, tail_window=(4, 12))
    return sl.SpectralLens(model, lm_pool(1, batch=4, t=12, vocab=37), writer=writer, params=(), progress=False,
                           forward_fn=lambda m, b: m(b[0]))


def _hf_run(lens: sl.SpectralLens, steps=(2, 4)) -> None:
    """The HF callback's hooks as ``Trainer.train()`` calls them, a loss logged at each of ``steps``."""
    import transformers

    from spectral_lens.integrations import SpectralLensCallback

    state, control = transformers.TrainerState(), transformers.TrainerControl()
    cb = SpectralLensCallback(lens, tokens_per_step=10)
    cb.on_train_begin(None, state, control, model=lens.model)
    for step in range(1, max(steps) + 1):
        state.global_step = step
        cb.on_step_end(None, state, control)
        if step in steps:
            cb.on_log(None, state, control, logs={"loss": 3.0 - step / 10, "learning_rate": 1e-3})
    cb.on_train_end(None, state, control)


class FakeTrainer:
    """What the Lightning callback's hooks read of a ``Trainer``."""

    def __init__(self, log_every_n_steps: int) -> None:
        self.global_step, self.log_every_n_steps, self.loggers, self.callback_metrics = 0, log_every_n_steps, [], {}


def _lightning_run(lens: sl.SpectralLens, batches: int = 4, every: int = 3) -> None:
    """The Lightning callback's hooks as ``fit`` calls them: ``batches`` optimizer steps, batch ``i`` returning
    the loss ``2 + i``, a ``train_loss`` event every ``every`` steps and at the train end."""
    from spectral_lens.integrations import SpectralLensLightningCallback

    cb = SpectralLensLightningCallback(lens, tokens_per_step=48)
    trainer = FakeTrainer(every)
    cb.on_train_start(trainer, lens.model)
    for i in range(batches):
        cb.on_train_batch_start(trainer, lens.model, None, i)
        trainer.global_step = i + 1
        cb.on_train_batch_end(trainer, lens.model, torch.tensor(2.0 + i), None, i)
    cb.on_train_end(trainer, lens.model)


def _losses(path: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["train_loss"]) for e in RunRecord.open(path).events if e.get("train_loss") is not None]


# ---------------------------------------------------------------- one process
@pytest.fixture
def no_collectives(monkeypatch):
    """No process group: any collective fails the test."""
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())

    def refuse(*args, **kwargs):
        raise AssertionError("a collective without a process group")

    for name in ("all_reduce", "broadcast", "broadcast_object_list", "all_gather_object", "barrier"):
        monkeypatch.setattr(dist, name, refuse)


def test_a_single_process_records_and_pays_no_collective(tmp_path, no_collectives):
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    lens = _lens(tmp_path / "hf")
    _hf_run(lens)
    lens.writer.close()
    assert _losses(tmp_path / "hf") == [(2, 2.8), (4, 2.6)]
    pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
    lens = _lens(tmp_path / "lit")
    _lightning_run(lens)
    lens.writer.close()
    assert _losses(tmp_path / "lit") == [(3, 3.0), (4, 5.0)]  # the mean of 2, 3, 4; then 5 at the train end


def test_a_single_process_raises_its_write_error(tmp_path, no_collectives):
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    with pytest.raises(OSError, match="No space left"):
        _hf_run(_lens(tmp_path / "hf", full=True))


@pytest.fixture
def one_of_2(monkeypatch):
    """This process as rank ``state["rank"]`` of 2 gloo ranks; ``state["peer"]``: the other rank's code in
    ``agree``'s flags (1: it failed); ``state["calls"]``: the all_reduces made."""
    import torch.distributed as dist

    state = {"rank": 1, "peer": 0, "calls": 0}

    def all_reduce(t, op=None, group=None):
        assert op == dist.ReduceOp.MAX and t.numel() == 2
        state["calls"] += 1
        other = 1 - state["rank"]
        t[other] = max(int(t[other]), state["peer"])

    def broadcast_object_list(objects, src=0, group=None):
        pass  # rank 0's values (this process's own, as rank 0 or standing in for it)

    for name, value in {"is_available": lambda: True, "is_initialized": lambda: True,
                        "get_rank": lambda group=None: state["rank"], "get_world_size": lambda group=None: 2,
                        "get_backend": lambda group=None: "gloo", "all_reduce": all_reduce,
                        "broadcast_object_list": broadcast_object_list}.items():
        monkeypatch.setattr(dist, name, value)
    return state


@pytest.mark.parametrize("framework", ["hf", "lightning"])
def test_rank0s_failed_write_is_agreed_before_it_raises(framework, tmp_path, one_of_2):
    """Rank 0's write fails: it raises its own OSError after the agreement's one all_reduce (before: at once,
    with no collective, the other ranks left in the training's next one)."""
    pytest.importorskip("transformers" if framework == "hf" else "lightning.pytorch")
    one_of_2["rank"] = 0
    lens = _lens(tmp_path / "run", full=True)
    one_of_2["calls"] = 0  # (the lens's constructor made one: its agreement)
    with pytest.raises(OSError, match="No space left"):
        (_hf_run if framework == "hf" else _lightning_run)(lens)
    assert one_of_2["calls"] == 1


@pytest.mark.parametrize("framework", ["hf", "lightning"])
def test_the_other_ranks_raise_when_rank0s_write_failed(framework, tmp_path, one_of_2):
    """On rank 1 (no writer): a RuntimeError naming rank 0 at the first event (before: nothing, training went
    on); when rank 0's writes succeed, one all_reduce per event and none per batch."""
    pytest.importorskip("transformers" if framework == "hf" else "lightning.pytorch")
    run = _hf_run if framework == "hf" else _lightning_run
    lens = _lens(None)  # (its constructor's agreement: the peer succeeds)
    one_of_2.update(peer=1, calls=0)
    with pytest.raises(RuntimeError, match=re.escape(WHAT) + r" failed on global rank\(s\) \[0\]"):
        run(lens)
    assert one_of_2["calls"] == 1
    one_of_2["peer"] = 0
    lens = _lens(None)
    one_of_2["calls"] = 0
    run(lens)
    assert one_of_2["calls"] == 2  # HF: the logs at steps 2 and 4; Lightning: step 3 and the train end


# ---------------------------------------------------------------- 2 gloo ranks
def _imports(rank):
    """Import both frameworks before the timed cases (seconds each on a loaded machine)."""
    import lightning.pytorch  # noqa: F401
    import transformers  # noqa: F401


def _run_on_ranks(run, rank: int, full: bool):
    """``run`` (a framework's hooks) on this rank, rank 0 with a run record (a full disk with ``full``), the
    others without; rank 0 returns its recorded losses."""
    path = Path(tempfile.mkdtemp()) / "run" if rank == 0 else None
    lens = _lens(path, full)
    run(lens)
    if path is None:
        return None
    lens.writer.close()
    return _losses(path)


def _hf_ok(rank):
    return _run_on_ranks(_hf_run, rank, False)


def _hf_full_disk(rank):
    return _run_on_ranks(_hf_run, rank, True)


def _lightning_ok(rank):
    return _run_on_ranks(_lightning_run, rank, False)


def _lightning_full_disk(rank):
    return _run_on_ranks(_lightning_run, rank, True)


CASES = {"imports": _imports, "hf_ok": _hf_ok, "hf_full_disk": _hf_full_disk, "lightning_ok": _lightning_ok,
         "lightning_full_disk": _lightning_full_disk}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_raise_together_when_rank0s_train_loss_write_fails(tmp_path):
    """2 gloo ranks (a 30 s collective timeout): with a full disk on rank 0, rank 0 raises its OSError and
    rank 1 a RuntimeError naming it, both at once, in step for the barrier after the case (before: rank 1 went
    on without an error, in a training into its next collective, which rank 0 never reached); with a working
    disk, rank 0 records every event."""
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
    from support.ranks import checked_case, run_gloo_cases

    results = run_gloo_cases(tmp_path, CASES, 2, pg_timeout_s=30, join_s=400, preload="spectral_lens.integrations")
    assert [r["error"] for r in checked_case(results, "imports", None)] == [None, None]
    for case, losses in (("hf_ok", [[2, 2.8], [4, 2.6]]), ("lightning_ok", [[3, 3.0], [4, 5.0]])):
        got = checked_case(results, case, 20.0)
        assert [r["error"] for r in got] == [None, None], got
        assert [r["value"] for r in got] == [losses, None], got
    for case in ("hf_full_disk", "lightning_full_disk"):
        r0, r1 = (r["error"] for r in checked_case(results, case, 20.0))
        assert r0.startswith("OSError: [Errno 28] No space left on device"), (case, r0)
        assert r1.startswith(f"RuntimeError: SpectralLens: {WHAT} failed on global rank(s) [0]"), (case, r1)
