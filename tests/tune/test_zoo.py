"""End to end with real tiny training runs: the zoo's tiny profile through examples.nanogpt.train.train."""
import math

import pytest

pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

from examples.tune import load_choices, tune  # noqa: E402
from examples.tune.zoo import ZooTrainable, zoo_reference_lrs  # noqa: E402
from support.threads import one_intra_op_thread  # noqa: E402, F401  (autouse)


def test_zoo_tuning_end_to_end(tmp_path):
    from examples.nanogpt.train import train

    zoo = ZooTrainable(eval_every_tokens=2048, val_tokens=1024)
    # tier 2: scale {1}; tier 4: the centers sqrt(2) and 2 (multiplier 1 only, to stay fast)
    res = tune(zoo, families={"RoPE": zoo_reference_lrs("RoPE")}, tiers=[2, 4], reference_tier=2,
               rungs=[2048, 4096], multipliers=(1.0,), workdir=tmp_path / "tune", progress=False)
    assert [s.candidate.scale for s in res.trials] == pytest.approx([1.0, 2 ** 0.5, 2.0])
    assert sorted(s.state for s in res.trials) == ["complete"] * 2 + ["pruned"]
    assert all(s.error is None and all(math.isfinite(v) for v in s.rung_losses) for s in res.trials)
    choices = load_choices(res.choices_path)
    assert set(choices) == {("RoPE", 2), ("RoPE", 4)} and choices == res.choices
    # the promoted trial continued from its checkpoint: its loss at the horizon equals an uninterrupted run's
    c = choices[("RoPE", 4)]
    full = train(variant="RoPE", profile="tiny", run_dir=tmp_path / "full", tokens=4096, batch_tier=4,
                 lr_scale=c.scale, eval_every_tokens=2048, val_tokens=1024, verbose=False, save_final=False)
    assert res.losses[("RoPE", 4)] == full.final_val_loss
    assert res.losses[("RoPE", 4)] == min(s.rung_losses[-1] for s in res.trials
                                          if s.candidate.tier == 4 and s.state == "complete")


def test_zoo_rejects_rates_it_cannot_apply_and_unaligned_budgets(tmp_path):
    zoo = ZooTrainable(eval_every_tokens=2048, val_tokens=1024)
    res = tune(zoo, families={"RoPE": {"embed": 1.0}}, tiers=[2], reference_tier=2, rungs=[2048],
               multipliers=(1.0,), workdir=tmp_path / "a", progress=False)
    (s,) = res.trials
    assert s.state == "failed" and "RoPE/b2/x1: rates name groups ['embed']" in s.error
    res = tune(zoo, families={"RoPE": zoo_reference_lrs("RoPE")}, tiers=[2], reference_tier=2, rungs=[1536, 2048],
               multipliers=(1.0,), workdir=tmp_path / "b", progress=False)
    (s,) = res.trials  # tier 2 of the tiny profile trains 1,024 tokens per step: 1,536 is no step boundary
    assert s.state == "failed" and "stopped at 2048 tokens, past the rung budget 1536" in s.error
    with pytest.raises(KeyError, match="unknown variant 'NoSuchVariant'"):
        zoo_reference_lrs("NoSuchVariant")
