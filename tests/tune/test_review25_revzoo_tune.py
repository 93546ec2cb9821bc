"""Review 25 (revzoo): a tuner trial whose checkpoint the trainer refuses stops the tuner with one line.

Before, ``ZooTrainable`` let the trainer's refusal (a study begun before the data fingerprint, rerun
now; or data changed since) fail the trial alone: every promoted trial failed in turn and the tuner
chose among the candidates that happened to finish before, or among none (the speedrun then said
only "no choice ... delete the tuning directory"). It is a property of the directory, not of the
candidate: now a ``TrialDirMismatch`` naming the checkpoint and what to delete stops the tuner.
"""
from pathlib import Path

import pytest
import torch

pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

from examples.tune import tune  # noqa: E402
from examples.tune.worker import TrialDirMismatch  # noqa: E402
from examples.tune.zoo import ZooTrainable, zoo_reference_lrs  # noqa: E402
from support.threads import one_intra_op_thread  # noqa: E402, F401  (autouse)


class _OlderCheckpoints(ZooTrainable):
    """Leaves each trial checkpoint as an older trainer (no fingerprint) or other data would have."""

    fingerprint: str | None = None

    def __call__(self, candidate, budget, *, horizon, workdir, report):
        super().__call__(candidate, budget, horizon=horizon, workdir=workdir, report=report)
        ck_path = Path(workdir) / "ckpt.pt"
        ck = torch.load(ck_path, weights_only=True)
        if self.fingerprint is None:
            del ck["settings"]["data_fingerprint"]
        else:
            ck["settings"]["data_fingerprint"] = self.fingerprint
        torch.save(ck, ck_path)


@pytest.mark.parametrize("fingerprint", [None, "train 1 shards, 7 tokens, crc32 00000000"])
def test_a_trial_checkpoint_the_trainer_refuses_stops_the_tuner(tmp_path, fingerprint):
    zoo = _OlderCheckpoints(eval_every_tokens=2048, val_tokens=1024)
    object.__setattr__(zoo, "fingerprint", fingerprint)
    with pytest.raises(TrialDirMismatch) as e:
        tune(zoo, families={"RoPE": zoo_reference_lrs("RoPE")}, tiers=[2], reference_tier=2,
             rungs=[2048, 4096], multipliers=(1.0,), workdir=tmp_path / "tune", progress=False)
    msg = str(e.value)
    wd = tmp_path / "tune" / "trials" / "tune" / "RoPE" / "b2" / "x1"
    assert f"{wd / 'ckpt.pt'}" in msg and f"delete {wd}" in msg and "\n" not in msg
    assert ("no data fingerprint" if fingerprint is None else "data changed") in msg


@pytest.mark.slow
def test_a_study_interrupted_before_the_fingerprint_resumes_after_deleting_its_trials(tmp_path, monkeypatch):
    """What docs/replication-speedrun.md tells the user: delete the trial directories, rerun; the
    trials train again from the start and the choice equals an uninterrupted tuning's."""
    import shutil

    kw = dict(families={"RoPE": zoo_reference_lrs("RoPE")}, tiers=[2], reference_tier=2, rungs=[2048, 4096],
              multipliers=(1.0,), progress=False, study_name="s", heartbeat_interval=0.2, grace_period=1.0)
    work = tmp_path / "tune"
    journal = f"journal:{work / 'tune.journal'}"
    import examples.nanogpt.train as T

    real = T.train

    def interrupted_at_rung_1(**a):  # Ctrl-C as the trial starts its second rung (the first is checkpointed)
        if a["stop_tokens"] > 2048:
            raise KeyboardInterrupt
        return real(**a)

    zoo = ZooTrainable(eval_every_tokens=2048, val_tokens=1024)
    monkeypatch.setattr(T, "train", interrupted_at_rung_1)
    with pytest.raises(KeyboardInterrupt):
        tune(zoo, workdir=work, storage=journal, **kw)
    monkeypatch.setattr(T, "train", real)
    (ck_path,) = work.glob("trials/s/RoPE/b2/x1/ckpt.pt")
    ck = torch.load(ck_path, weights_only=True)
    del ck["settings"]["data_fingerprint"]  # as the trainer before review 25 wrote it
    torch.save(ck, ck_path)
    with pytest.raises(TrialDirMismatch, match="no data fingerprint"):
        tune(zoo, workdir=work, storage=journal, **kw)
    shutil.rmtree(work / "trials")
    resumed = tune(zoo, workdir=work, storage=journal, **kw)
    straight = tune(zoo, workdir=tmp_path / "straight", **kw)
    assert resumed.losses == straight.losses and set(resumed.choices) == {("RoPE", 2)}
