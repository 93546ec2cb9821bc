"""Review 25 of the tuner: a journal left with a half-written line, a trial taken over after its last
report, the asynchronous pruner's settings, and the caller's RNG under the zoo trainable."""
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

from support.threads import one_intra_op_thread  # noqa: E402, F401  (autouse: the zoo test trains)

from examples.tune import tune  # noqa: E402
from examples.tune.synthetic import SyntheticTrainable  # noqa: E402

CFG = dict(families={"f": {"lr": 1e-3}}, tiers=[1, 8], reference_tier=8, rungs=[10, 20, 40])


def _quiet_tune(trainable, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # the at-edge warning of the synthetic grid
        return tune(trainable, progress=False, **(CFG | kw))


def _outcome(res):
    return res.choices, res.survivors, [(s.candidate.key, s.state, s.rung_losses) for s in res.trials]


# ---------------------------------------------------------------- the journal after a kill mid-append

def test_a_half_written_last_journal_line_costs_that_line_only(tmp_path, monkeypatch):
    """A process killed (or out of disk space) mid-append leaves a last line without its newline.
    Optuna skips it on reading, but the next append used to be glued onto it: one line that is not
    JSON, and every later read of the journal raised (the study was lost). Now the resume drops the
    half-written line and finishes with the results of an uninterrupted run."""
    ref = _quiet_tune(SyntheticTrainable(), workdir=tmp_path / "ref")
    log = tmp_path / "tune.log"
    kw = dict(workdir=tmp_path / "w", storage=f"journal:{log}", heartbeat_interval=0.1, grace_period=0.5,
              poll_interval=0.05)

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt   # the first run stops as its first trial begins training
    with monkeypatch.context() as m:
        m.setattr(SyntheticTrainable, "__call__", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _quiet_tune(SyntheticTrainable(), **kw)
    good = log.read_bytes()
    assert good.endswith(b"\n")
    with open(log, "ab") as f:    # the kill: an operation cut short, no newline
        f.write(b'{"op_code":8,"worker_id":"dead","trial_id":0,"user_attr":{"rung:0"')
    res = _quiet_tune(SyntheticTrainable(), **kw)
    assert _outcome(res) == _outcome(ref)
    for i, line in enumerate(log.read_bytes().splitlines()):   # every line of the journal is one operation
        json.loads(line)
    assert log.read_bytes().startswith(good)


def test_the_journal_backend_drops_a_half_written_tail_before_appending(tmp_path):
    from examples.tune.storage import open_storage

    log = tmp_path / "j.log"
    import optuna

    optuna.create_study(storage=open_storage(f"journal:{log}"), study_name="a")
    with open(log, "ab") as f:
        f.write(b'{"op_code":0,"wor')
    storage = open_storage(f"journal:{log}")          # a live worker's storage, opened before or after the kill
    optuna.create_study(storage=storage, study_name="b")
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(open_storage(f"journal:{log}")))
    assert names == ["a", "b"]
    assert all(line.startswith(b"{") and line.endswith(b"}") for line in log.read_bytes().splitlines())


def test_a_journal_storage_still_pickles(tmp_path):
    """The journal backend that drops torn lines is a module-level class: a storage pickles, as Optuna's does."""
    import pickle

    from examples.tune.storage import open_storage

    storage = pickle.loads(pickle.dumps(open_storage(f"journal:{tmp_path}/j.log")))
    assert type(storage._backend).__name__ == "TornTailJournalBackend"


@pytest.mark.parametrize("where", ["middle", "last"])
def test_a_malformed_journal_line_is_named_with_its_line_number(tmp_path, where):
    """A complete line that is not JSON (a damaged journal): Optuna raised a bare JSONDecodeError
    ('line 1 column 1') mid-run, or, for a last line, only at the first append after opening."""
    import optuna

    from examples.tune.storage import open_storage

    log = tmp_path / "j.log"
    for name in ("a", "b"):
        optuna.create_study(storage=open_storage(f"journal:{log}"), study_name=name)
    lines = log.read_bytes().splitlines(keepends=True)
    at = 1 if where == "middle" else len(lines)
    log.write_bytes(b"".join(lines[:at]) + b"not json\n" + b"".join(lines[at:]))
    with pytest.raises(ValueError, match=rf"line {at + 1} \(b'not json\\n'\) of .*j.log' is not a JSON operation"):
        open_storage(f"journal:{log}")


# ---------------------------------------------------------------- a trial taken over after its last report

@dataclass(frozen=True)
class _TakenOverOnce(SyntheticTrainable):
    """Trains like ``SyntheticTrainable``; the first time ``key`` returns from rung ``budget``, another
    worker's sweep has just failed and re-enqueued the trial (its heartbeat looked stale)."""

    resume_ignores: ClassVar[tuple[str, ...]] = ("sleep", "storage", "key", "at")

    storage: str = ""
    key: str = ""
    at: int = 0

    def __call__(self, candidate, budget, *, horizon, workdir, report):
        super().__call__(candidate, budget, horizon=horizon, workdir=workdir, report=report)
        mark = Path(workdir) / "taken-over"
        if candidate.key != self.key or budget != self.at or mark.exists():
            return
        mark.write_text("1")
        import optuna

        from examples.tune.storage import open_storage
        from examples.tune.trials import _retry_callback

        storage = open_storage(self.storage)
        for s in optuna.get_all_study_summaries(storage):
            study = optuna.load_study(study_name=s.study_name, storage=storage)
            for t in study.get_trials(deepcopy=False):
                if t.user_attrs.get("key") == self.key and t.state == optuna.trial.TrialState.RUNNING:
                    storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
                    _retry_callback()(study, storage.get_trial(t._trial_id))


@pytest.mark.parametrize("mode", ["synchronized", "asynchronous"])
def test_a_trial_taken_over_after_its_last_report_is_let_go(tmp_path, mode):
    """Storing the rung loss of a trial another worker has just failed raised UpdateFinishedTrialError
    out of the worker loop: ``tune`` crashed. Now the worker lets the trial go (a warning) and the
    retry finishes it, with the results of an uninterrupted run."""
    extra = {} if mode == "synchronized" else dict(mode="asynchronous")
    ref = _quiet_tune(SyntheticTrainable(), workdir=tmp_path / "ref", **extra)
    storage = f"journal:{tmp_path}/j.log"
    trainable = _TakenOverOnce(storage=storage, key="f/b8/x1", at=20)
    with pytest.warns(UserWarning, match="taken over by another worker"):
        res = tune(trainable, workdir=tmp_path / "w", storage=storage, progress=False, **(CFG | extra))
    assert len(list((tmp_path / "w").rglob("taken-over"))) == 1   # the take-over happened
    assert _outcome(res) == _outcome(ref)


def test_asynchronous_pruner_counts_a_lost_trial_and_its_retry_once():
    """A trial failed for a lost worker keeps its ``completed_rung_0`` and its retry inherits it:
    Optuna's pruner counted the candidate twice, which pruned a trial the rung promotes."""
    import optuna

    from examples.tune.trials import CandidateHalvingPruner

    def decide(pruner):
        study = optuna.create_study(pruner=pruner)
        S = optuna.trial.TrialState
        for state, loss, attrs in [(S.FAIL, 5.0, {}),                       # lost worker (no error)
                                   (S.RUNNING, 5.0, {}),                    # its retry, the same candidate
                                   (S.COMPLETE, 5.75, {}), (S.COMPLETE, 5.1875, {}),
                                   (S.FAIL, None, {"duplicate_of": 3})]:    # a dropped duplicate has no value
            study.add_trial(optuna.trial.create_trial(
                state=state, value=loss if state == S.COMPLETE else None, intermediate_values={10: loss or 0.0},
                system_attrs={} if loss is None else {"completed_rung_0": loss}, user_attrs=attrs))
        trial = study.ask()
        trial.report(5.1875, 10)
        return pruner.prune(study, study._storage.get_trial(trial._trial_id))

    kw = dict(min_resource=10, reduction_factor=2, min_early_stopping_rate=0)
    # competing 5.0, 5.75, 5.1875 and its own 5.1875: the top 2 of 4 are 5.0 and 5.1875, it survives
    assert decide(CandidateHalvingPruner(**kw)) is False
    assert decide(optuna.pruners.SuccessiveHalvingPruner(**kw)) is True    # Optuna's: 5.0 twice, the bar is 5.0


# ---------------------------------------------------------------- the asynchronous pruner's settings

@pytest.mark.parametrize("min_resource, says", [
    (41, r"min_resource=41 is beyond the last rung the asynchronous pruner is asked at \(20; rungs \[10, 20, 40\]\)"),
    (21, r"min_resource=21 .*it would never prune; expected at most 20"),
    (True, r"min_resource=True must be a positive int"),
])
def test_asynchronous_min_resource_beyond_the_last_rung_is_refused(tmp_path, min_resource, says):
    """The pruner is asked at the end of every rung but the last: a min_resource beyond that never
    prunes anything (every candidate trains to the end). It was accepted silently, and ``True`` was
    taken for 1."""
    with pytest.raises(ValueError, match=says):
        tune(SyntheticTrainable(), workdir=tmp_path, mode="asynchronous", min_resource=min_resource,
             progress=False, **CFG)


def test_cli_min_resource_beyond_the_last_rung_is_one_line_exit_2(tmp_path, capsys):
    from examples.tune.__main__ import main

    rc = main(["synthetic", "--tiers", "8", "--rungs", "10", "20", "--workdir", str(tmp_path), "--mode",
               "asynchronous", "--min-resource", "100", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "min_resource=100" in err and "expected at most 10" in err, err
    assert not (tmp_path / "trials").exists()


def test_cli_a_group_given_twice_in_a_family_is_refused(tmp_path, capsys):
    from examples.tune.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["synthetic", "--tiers", "8", "--rungs", "10", "--workdir", str(tmp_path),
              "--family", "a=lr:1e-3,lr:2e-3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "'lr'" in err and "twice" in err, err


@pytest.mark.parametrize("argv, says", [
    (["--workdir", "{file}"], r"error: tune: workdir '.*afile' cannot be made \(File exists: .*afile\); expected a "
                              r"directory"),
    (["--workdir", "{tmp}/w", "--study", ""], r"error: tune: study_name=''; expected a non-empty string"),
])
def test_cli_an_unusable_workdir_or_study_name_is_one_line_naming_it(tmp_path, capsys, argv, says):
    """A --workdir that is a file was '[Errno 17] File exists' (which option?); an empty --study ran, its
    trial directories directly under workdir/trials."""
    from examples.tune.__main__ import main

    (tmp_path / "afile").write_text("x")
    argv = [a.format(file=tmp_path / "afile", tmp=tmp_path) for a in argv]
    rc = main(["synthetic", "--tiers", "8", "--rungs", "10", "--quiet", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert __import__("re").search(says, err), err
    assert not (tmp_path / "w" / "trials").exists()


def test_cli_warnings_are_one_line_without_source_code(tmp_path, capsys):
    """The grid-edge warning printed the file, line and source line of the call to ``tune`` (two
    lines, the second a line of code) to a command-line user."""
    from examples.tune.__main__ import main

    rc = main(["synthetic", "--tiers", "8", "--reference-tier", "1", "--rungs", "10", "--workdir", str(tmp_path),
               "--quiet", "--family", "a=lr:1e-3"])   # scales 1..8 around the synthetic optimum 1: the lowest
    err = capsys.readouterr().err.splitlines()
    assert rc == 0
    assert err == ["python -m examples.tune: warning: tune: the chosen learning rate is the lowest candidate for "
                   "a/b8 of the grid: the best rate may lie beyond it (widen the multipliers)"], err


@pytest.mark.parametrize("rate", [True, "3e-4", "abc", None])
def test_a_reference_rate_that_is_not_a_number_is_refused_naming_it(tmp_path, rate):
    """``True`` was trained as the rate 1.0 and ``"3e-4"`` as 3e-4; ``"abc"`` was 'could not convert string
    to float' without the family or group."""
    with pytest.raises(ValueError, match=rf"tune: family 'f' group 'lr' has reference rate {rate!r}; expected a "
                                         r"finite rate > 0"):
        tune(SyntheticTrainable(), **(CFG | dict(families={"f": {"lr": rate}}, workdir=tmp_path, progress=False)))


# ---------------------------------------------------------------- the caller's state

def test_zoo_trainable_leaves_the_callers_torch_rng_alone(tmp_path):
    """``examples.nanogpt.train.train`` seeds torch's global generator (``torch.manual_seed(seed)``):
    a ``tune(ZooTrainable(...))`` in the caller's process reset the caller's random stream."""
    import torch

    from examples.tune.zoo import ZooTrainable, zoo_reference_lrs

    torch.manual_seed(1234)
    state = torch.get_rng_state().clone()
    _quiet_tune(ZooTrainable(eval_every_tokens=2048, val_tokens=1024), families={"RoPE": zoo_reference_lrs("RoPE")},
                tiers=[2], reference_tier=2, rungs=[2048], multipliers=(1.0,), workdir=tmp_path)
    assert torch.equal(torch.get_rng_state(), state)
