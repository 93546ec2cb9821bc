"""Toy model switches, the schedule, and continuing from a checkpoint equals never stopping."""
import copy
import math

import pytest
import torch

from examples.toy.model import ToyConfig, ToyTransformer
from examples.toy.task import CyclicTask
from examples.toy.train import FAMILIES, ToyRun, evaluate, lr_multiplier

CFG = ToyConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, seq_len=16)
TASK = CyclicTask(c=17, context=16, vocab=64, max_step=4, n_examples=600, heldout=100)
LRS = {"Baseline": {"adam": 3e-3}, "RoPE": {"adam": 3e-3}, "Muon": {"embed": 3e-3, "hidden": 0.02},
       "Untied": {"embed": 3e-3, "head": 3e-3, "hidden": 0.02}}


def test_switches():
    base = ToyRun("Baseline", 8, LRS["Baseline"], CFG).model
    rope = ToyRun("RoPE", 8, LRS["RoPE"], CFG).model
    untied = ToyRun("Untied", 8, LRS["Untied"], CFG).model
    assert base.wpe is not None and base.rotary is None and base.lm_head is None
    assert rope.wpe is None and rope.rotary is not None
    assert untied.lm_head is not None and float(untied.lm_head.weight.detach().abs().sum()) == 0.0
    x = torch.randint(64, (3, 16))
    assert untied(x).abs().max() == 0  # zero readout
    assert base(x).shape == (3, 64)
    assert list(FAMILIES) == ["Baseline", "RoPE", "Muon", "Untied"]


def test_last_token_pooling_is_causal():
    model = ToyTransformer(CFG)
    x = torch.randint(64, (2, 16))
    h = model.hidden(x)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 64
    assert torch.allclose(model.hidden(y)[:, :-1], h[:, :-1], atol=1e-6)  # earlier positions do not see the last token
    assert not torch.allclose(model(y), model(x))


def test_schedule():
    assert lr_multiplier(0, 10, 1000) == pytest.approx(10 / 50)
    assert lr_multiplier(40, 10, 1000) == pytest.approx(1 - 0.9 * 0.04)
    assert lr_multiplier(990, 10, 1000) == pytest.approx(1 - 0.9 * 0.99)
    assert lr_multiplier(2000, 10, 1000) == pytest.approx(0.1)


@pytest.mark.parametrize("family", ["Baseline", "Untied"])
def test_checkpoint_continuation_equals_one_run(tmp_path, family):
    s = TASK.split()
    one = ToyRun(family, 8, LRS[family], CFG, seed=1)
    one.train_until(160, 160, s.x_train, s.y_train)
    part = ToyRun(family, 8, LRS[family], CFG, seed=1)
    part.train_until(80, 160, s.x_train, s.y_train)
    part.save(tmp_path / "ck.pt")
    rest = ToyRun(family, 8, LRS[family], CFG, seed=1)
    rest.load(tmp_path / "ck.pt")
    assert rest.seen == 80
    rest.train_until(160, 160, s.x_train, s.y_train)
    for (n, a), b in zip(one.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert math.isfinite(evaluate(rest.model, s.x_heldout, s.y_heldout))
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def _snapshot(run):
    return ({k: v.clone() for k, v in run.model.state_dict().items()},
            [copy.deepcopy(o.state_dict()) for o in run.optimizers], run.gen.get_state().clone(), run.seen, run.step)


def _unchanged(run, snap):
    model, opts, gen, seen, step = snap
    return (all(torch.equal(v, model[k]) for k, v in run.model.state_dict().items())
            and all(str(o.state_dict()) == str(s) for o, s in zip(run.optimizers, opts))
            and torch.equal(run.gen.get_state(), gen) and (run.seen, run.step) == (seen, step))


def test_rejected_checkpoint_names_the_file_and_leaves_the_run_untouched(tmp_path):
    s = TASK.split()
    base = ToyRun("Baseline", 8, LRS["Baseline"], CFG, seed=1)
    base.train_until(16, 32, s.x_train, s.y_train)
    base.save(tmp_path / "baseline.pt")
    muon = ToyRun("Muon", 8, LRS["Muon"], CFG, seed=2)
    muon.train_until(16, 32, s.x_train, s.y_train)
    muon.save(tmp_path / "muon.pt")

    rope = ToyRun("RoPE", 8, LRS["RoPE"], CFG, seed=3)
    rope.train_until(8, 32, s.x_train, s.y_train)
    snap = _snapshot(rope)
    with pytest.raises(ValueError, match=f"{tmp_path / 'baseline.pt'}: .*unexpected model keys: \\['wpe.weight'\\]"):
        rope.load(tmp_path / "baseline.pt")  # the old loader had copied 13 of 13 tensors before refusing
    assert _unchanged(rope, snap)

    cut = tmp_path / "cut.pt"
    cut.write_bytes((tmp_path / "muon.pt").read_bytes()[:2000])
    other = ToyRun("Muon", 8, LRS["Muon"], CFG, seed=4)
    snap = _snapshot(other)
    with pytest.raises(ValueError, match=f"{cut}: cannot read the checkpoint"):
        other.load(cut)
    assert _unchanged(other, snap)

    state = torch.load(tmp_path / "muon.pt", weights_only=True)
    for bad, why in [({**state, "optimizers": state["optimizers"][:1]}, "1 optimizer states, this run builds 2"),
                     ({**state, "optimizers": []}, "0 optimizer states"),  # zip() used to accept this silently
                     ({**state, "seen": -8}, "'seen' = -8"),
                     ({k: v for k, v in state.items() if k != "gen"}, "missing 'gen'")]:
        with pytest.raises(ValueError, match=f"origin.pt: .*{why}"):
            other.load_state_dict(bad, origin="origin.pt")
        assert _unchanged(other, snap)
    other.load(tmp_path / "muon.pt")
    assert other.seen == 16


def test_bad_rates_are_named():
    with pytest.raises(ValueError, match=r"expected \['embed', 'hidden'\]"):
        ToyRun("Muon", 8, {"adam": 1e-3}, CFG)
    with pytest.raises(ValueError, match="unknown family"):
        ToyRun("Nope", 8, {}, CFG)
    with pytest.raises(ValueError, match="horizon"):
        ToyRun("RoPE", 8, LRS["RoPE"], CFG).train_until(100, 50, torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_trainable_continues_a_promoted_trial(tmp_path):
    from examples.toy.presets import PRESETS
    from examples.toy.workload import ToyTrainable
    from examples.tune import Candidate

    trainable = ToyTrainable(PRESETS["smoke"])
    cand = Candidate("Muon", 16, 1.0, {"embed": 4e-3, "hidden": 0.03})
    seen = []
    trainable(cand, 64, horizon=128, workdir=tmp_path / "a", report=lambda r, v: seen.append((r, v)))
    trainable(cand, 128, horizon=128, workdir=tmp_path / "a", report=lambda r, v: seen.append((r, v)))
    direct = []
    trainable(cand, 128, horizon=128, workdir=tmp_path / "b", report=lambda r, v: direct.append((r, v)))
    assert [r for r, _ in seen] == [32, 64, 96, 128] and [r for r, _ in direct] == [64, 128]
    assert seen[-1] == direct[-1]  # continuing from the checkpoint is the same as never stopping
    assert all(math.isfinite(v) for _, v in seen)
    # a checkpoint a batch or more past the rung (another rung schedule) is refused, naming the file
    with pytest.raises(ValueError, match=r"checkpoint.pt: the checkpoint has seen 128 examples, a batch or more past"):
        trainable(cand, 64, horizon=128, workdir=tmp_path / "a", report=lambda r, v: None)
    # but a retry of a rung on its own checkpoint (a worker lost after saving it) reports again
    big = Candidate("Muon", 64, 1.0, {"embed": 4e-3, "hidden": 0.03})
    again = []
    for _ in range(2):
        trainable(big, 128, horizon=256, workdir=tmp_path / "c", report=lambda r, v: again.append((r, v)))
    assert [r for r, _ in again][-1] == 128 and again[-1] == again[-2]
    # a budget that is not a whole number of batches (100 with batches of 64) would be overshot (128): its
    # validation would land past the rung and the tuner would promote on an earlier report, so it is
    # refused (protocol.md section 8: promotion on the loss at the rung)
    with pytest.raises(ValueError, match="rung budget 100 is not a whole number of batches of tier 64"):
        trainable(big, 100, horizon=256, workdir=tmp_path / "d", report=lambda r, v: None)
