"""Review 30: checkpoints outside the accumulator: the examples' ``.pt`` checkpoints (``examples/checkpoint.py``,
the toy trainer) and a Trainer's ``trainer_state.json``. A rejected checkpoint is refused before anything
loads, naming the file; nothing pickled runs."""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch

from examples.checkpoint import read_checkpoint, state_problems
from spectral_lens.integrations.trainer_state import checkpoint_position, log_history


def _trained():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, opt


def _meta(t):
    return t.to("meta")


def _sparse(t):
    return t.to_sparse()


def _bad_states():
    model, opt = _trained()
    msd, osd = model.state_dict(), opt.state_dict()

    def opt_with(change):
        s = copy.deepcopy(osd)
        change(s)
        return s

    return {  # each one loaded part of the model (or all of it) before failing, or failed in state_problems
        "meta weight": ({**msd, "1.bias": _meta(msd["1.bias"])}, osd, "model 1.bias: a torch.strided tensor on meta"),
        "sparse weight": ({**msd, "1.weight": _sparse(msd["1.weight"])}, osd, "model 1.weight: a torch.sparse_coo"),
        "meta exp_avg": (msd, opt_with(lambda s: s["state"][3].update(exp_avg=_meta(s["state"][3]["exp_avg"]))),
                         "parameter 3 exp_avg: a torch.strided tensor on meta"),
        "sparse exp_avg": (msd, opt_with(lambda s: s["state"][3].update(exp_avg=_sparse(s["state"][3]["exp_avg"]))),
                           "parameter 3 exp_avg: a torch.sparse_coo"),
        "state entry not a dict": (msd, opt_with(lambda s: s["state"].update({3: 5})),
                                   "parameter 3: state is a int, expected a dict"),
        "unhashable parameter id": (msd, opt_with(lambda s: s["param_groups"][0].update(params=[[0], 1, 2, 3])),
                                    r"parameter ids \[\[0\], 1, 2, 3\] are not all hashable"),
    }


@pytest.mark.parametrize("case", list(_bad_states()))
def test_state_problems_finds_what_fails_part_way_through_a_load(tmp_path, case):
    """Each of these passed ``state_problems`` (or raised a ``TypeError`` in it), then ``load_state_dict`` of the
    model or the optimizer failed after copying tensors: the run was left half loaded."""
    model_state, opt_state, why = _bad_states()[case]
    model, opt = _trained()
    torch.save({"model": model_state, "optimizers": [opt_state]}, tmp_path / "ck.pt")
    ck = read_checkpoint(tmp_path / "ck.pt")  # weights_only=True hands these back as they were saved
    problems = state_problems(model, [opt], ck["model"], ck["optimizers"])
    assert any(re.search(why, p) for p in problems), problems


def test_a_good_checkpoint_has_no_problems(tmp_path):
    model, opt = _trained()
    torch.save({"model": model.state_dict(), "optimizers": [opt.state_dict()]}, tmp_path / "ck.pt")
    ck = read_checkpoint(tmp_path / "ck.pt")
    assert state_problems(model, [opt], ck["model"], ck["optimizers"]) == []


def test_a_toy_checkpoint_with_an_invalid_generator_state_leaves_the_run_untouched(tmp_path):
    """``gen`` of the right dtype and size but not a Mersenne Twister state: ``set_state`` refused it after the
    model and the optimizers had loaded."""
    from examples.toy.train import ToyRun
    from tests.toy.test_train import CFG, LRS, TASK, _snapshot, _unchanged

    s = TASK.split()
    donor = ToyRun("Baseline", 8, LRS["Baseline"], CFG, seed=1)
    donor.train_until(16, 32, s.x_train, s.y_train)
    state = donor.state_dict()
    state["gen"] = torch.zeros_like(state["gen"])
    torch.save(state, tmp_path / "gen.pt")
    run = ToyRun("Baseline", 8, LRS["Baseline"], CFG, seed=2)
    snap = _snapshot(run)
    with pytest.raises(ValueError, match=r"gen\.pt: .*'gen' is not a CPU generator state \(Invalid mt19937 state\)"):
        run.load(tmp_path / "gen.pt")
    assert _unchanged(run, snap)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch review30-pickle-ran",))


def test_a_checkpoint_holding_a_pickled_object_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "evil": _Boom()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: cannot read the checkpoint \(UnpicklingError"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "review30-pickle-ran").exists()
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(ValueError, match=r"dir\.pt: cannot read the checkpoint"):
        read_checkpoint(tmp_path / "dir.pt")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_given_as_a_checkpoint_is_refused_instead_of_waiting_for_a_writer(tmp_path):
    """``torch.load`` opened the FIFO and waited for a writer forever (the library's own loads refuse one)."""
    import threading

    fifo = tmp_path / "ck.pt"
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            read_checkpoint(fifo)
        except ValueError as exc:
            outcome.append(str(exc))

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # the old behaviour: unblock the reader before failing
        with open(fifo, "wb"):
            pass
        t.join(5)
        pytest.fail("read_checkpoint waited on a FIFO")
    assert outcome and "ck.pt: cannot read the checkpoint (not a regular file" in outcome[0], outcome


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000,
                                  '{"global_step": 4, "log_history": ' + "[" * 100_000 + "]" * 100_000 + "}"])
def test_a_trainer_state_nested_too_deep_is_a_value_error_naming_the_file(tmp_path, text):
    """``json.loads`` raises ``RecursionError`` on a deeply nested document: it escaped naming no file."""
    ck = tmp_path / "checkpoint-4"
    ck.mkdir()
    (ck / "trainer_state.json").write_text(text)
    with pytest.raises(ValueError, match=r"checkpoint-4/trainer_state\.json: not a JSON file \(maximum recursion"):
        checkpoint_position(ck)
    with pytest.raises(ValueError, match=r"checkpoint-4/trainer_state\.json: not a JSON file"):
        log_history(None, ck)  # refused before the writer is used
