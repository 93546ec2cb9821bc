"""Mutation audit (train.py): each optimizer group trains its own parameters at its own scheduled rate.

Written because mutants that gave the Muon group or the untied head the embedding rate, or dropped
the schedule factor, passed tests/toy/test_train.py. The check is physical: AdamW's first step moves
every parameter with a nonzero gradient by lr * g / (|g| + eps), i.e. by the rate itself.
"""
import pytest
import torch

from examples.toy.model import ToyConfig
from examples.toy.task import CyclicTask
from examples.toy.train import ToyRun, lr_multiplier

CFG = ToyConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, seq_len=16)
DATA = CyclicTask(c=17, context=16, vocab=64, max_step=4, n_examples=400, heldout=100).split()
BATCH, HORIZON = 8, 1600  # first step: warm-up factor (8/1600)/0.05 = 0.1, decay 1


def _one_step(family, lrs):
    run = ToyRun(family, BATCH, lrs, CFG, seed=3)
    if run.model.lm_head is not None:  # zero-initialized: give the embeddings a gradient on the first step
        with torch.no_grad():
            run.model.lm_head.weight.normal_(std=0.3)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.train_until(BATCH, HORIZON, DATA.x_train, DATA.y_train)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in run.model.named_parameters()}
    return run, moved


def _group_of(run):
    names = {id(p): n for n, p in run.model.named_parameters()}
    return {names[id(p)]: (g["name"], g["lr"]) for opt in run.optimizers for g in opt.param_groups for p in g["params"]}


def test_untied_groups_hold_their_parameters_and_move_at_their_rates():
    lrs = {"embed": 1e-3, "head": 4e-3, "hidden": 0.05}
    mult = lr_multiplier(0, BATCH, HORIZON)
    assert mult == pytest.approx(0.1)
    run, moved = _one_step("Untied", lrs)
    groups = _group_of(run)
    assert set(groups) == {n for n, _ in run.model.named_parameters()}  # every parameter trained once
    for name, (group, lr) in groups.items():
        want = "embed" if name.startswith("wte.") else "head" if name.startswith("lm_head.") else "hidden"
        assert group == want, name
        assert lr == pytest.approx(lrs[want] * mult, rel=1e-12), name
    # AdamW's first step: the largest move is the scheduled rate itself
    assert moved["wte.weight"] == pytest.approx(lrs["embed"] * mult, rel=1e-3)
    assert moved["lm_head.weight"] == pytest.approx(lrs["head"] * mult, rel=1e-3)


def test_adamw_family_moves_at_the_scheduled_rate_and_the_schedule_advances():
    run, moved = _one_step("Baseline", {"adam": 2e-3})
    assert all(g == "adam" for g, _ in _group_of(run).values())
    assert moved["wte.weight"] == pytest.approx(2e-3 * 0.1, rel=1e-3)
    assert moved["blocks.0.c_fc.weight"] == pytest.approx(2e-3 * 0.1, rel=1e-3)
    run.train_until(3 * BATCH, HORIZON, DATA.x_train, DATA.y_train)  # the third step starts after 16 examples
    lr = run.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(2e-3 * lr_multiplier(2 * BATCH, BATCH, HORIZON), rel=1e-12)
    assert lr == pytest.approx(2e-3 * 0.3 * (1 - 0.9 * 16 / 1600), rel=1e-12)
