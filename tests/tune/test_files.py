"""The choices file, storage URLs and the power-law diagnostic."""
import json
import math
import os

import numpy as np
import pytest

from examples.tune import Candidate, load_choices
from examples.tune.choices import write_choices
from examples.tune.extrapolate import extrapolate_loss
from examples.tune.storage import open_storage


def _cand(family="RoPE", tier=32, scale=2.0):
    return Candidate(family, tier, scale, {"embed": 0.6 * scale, "head": 0.008 * scale},
                     (("sqrt", 1.0), ("linear", 0.5)))


def test_choices_round_trip_and_atomic(tmp_path):
    path = tmp_path / "sub" / "choices.json"
    ch = {("RoPE", 32): _cand(), ("RoPE", 1): _cand(tier=1, scale=0.25)}
    write_choices(path, ch, losses={("RoPE", 32): 3.25}, meta=dict(study_name="s", mode="synchronized"))
    assert os.listdir(path.parent) == ["choices.json"]          # no temp file left behind
    back = load_choices(path)
    assert back == ch
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["mode"] == "synchronized"
    assert {r["tier"]: r["loss"] for r in data["choices"]} == {1: None, 32: 3.25}
    with pytest.raises(KeyError, match=r"no chosen learning rate for family/tier \('RoPE', 8\); the file has RoPE/b1, RoPE/b32"):
        back[("RoPE", 8)]
    with pytest.raises(KeyError, match="'Muon', 32"):
        back[("Muon", 32)]


def test_choices_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; run the tuner first"):
        load_choices(tmp_path / "nope.json")
    p = tmp_path / "c.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_choices(p)
    p.write_text(json.dumps({"version": 7, "choices": []}))
    with pytest.raises(ValueError, match="expected a JSON object with version 1, got version 7"):
        load_choices(p)
    p.write_text(json.dumps({"version": 1, "choices": [{"family": "x", "tier": 2}]}))
    with pytest.raises(ValueError, match="choice #0 is malformed"):
        load_choices(p)
    row = {"family": "x", "tier": 2, "scale": 1.0, "lrs": {"a": 1.0}}
    for change, match in [({"lrs": {"a": -1e-3}}, r"lrs\['a'\] -0.001 \(expected a finite rate > 0\)"),
                          ({"lrs": {"a": float("nan")}}, r"lrs\['a'\] nan"), ({"lrs": {}}, "no rates in lrs"),
                          ({"scale": 0.0}, "scale 0.0"), ({"tier": 2.5}, r"tier 2.5 \(expected an int >= 1\)"),
                          ({"tier": 0}, "tier 0"), ({"tier": True}, "tier True")]:
        p.write_text(json.dumps({"version": 1, "choices": [row | change]}))   # a rate the runs cannot train with
        with pytest.raises(ValueError, match="choice #0 is malformed .*" + match):
            load_choices(p)
    p.write_text(json.dumps({"version": 1, "choices": [row, row]}))
    with pytest.raises(ValueError, match="x/b2 is chosen twice"):
        load_choices(p)


def test_storage_urls(tmp_path):
    import optuna

    assert isinstance(open_storage(None), optuna.storages.InMemoryStorage)
    assert isinstance(open_storage(f"journal:{tmp_path}/j.log"), optuna.storages.JournalStorage)
    assert isinstance(open_storage(str(tmp_path / "k.log")), optuna.storages.JournalStorage)
    assert isinstance(open_storage(f"sqlite:///{tmp_path}/s.db"), optuna.storages.RDBStorage)


@pytest.mark.parametrize("url, match", [
    ("journal:/nonexistent-dir-xyz/j.log", "cannot be opened: directory '/nonexistent-dir-xyz' does not exist"),
    ("sqlite:////nonexistent-dir-xyz/s.db", "storage 'sqlite:////nonexistent-dir-xyz/s.db' cannot be opened"),
    ("postgresql://u:p@127.0.0.1:9/db", "storage 'postgresql://u:p@127.0.0.1:9/db' cannot be opened"),
    ("redis://localhost", "unknown scheme 'redis'"),
    ("", "must be a non-empty string"),
])
def test_storage_that_cannot_be_opened(url, match):
    with pytest.raises(ValueError, match=match):
        open_storage(url)


def test_sqlite_url_never_overwrites_a_file_that_is_not_a_database(tmp_path):
    """A mistyped sqlite path naming one of the user's small files: SQLite took a 1-byte file for an
    empty database and replaced its content. Refused; the file is unchanged; a real database (and a
    new or empty file) still opens."""
    for content in (b"x", b"my notes\n", b"\x00" * 200):
        victim = tmp_path / "notes.txt"
        victim.write_bytes(content)
        with pytest.raises(ValueError, match="exists and is not an SQLite database"):
            open_storage(f"sqlite:///{victim}")
        assert victim.read_bytes() == content
    with pytest.raises(ValueError, match="is a directory"):
        open_storage(f"sqlite:///{tmp_path}")
    db = tmp_path / "s.db"
    open_storage(f"sqlite:///{db}")  # created by the first open
    assert db.read_bytes()[:16] == b"SQLite format 3\x00"
    open_storage(f"sqlite:///{db}")  # reopened
    (tmp_path / "empty.db").touch()
    open_storage(f"sqlite:///{tmp_path / 'empty.db'}")


def test_journal_dir_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="must name a file"):
        open_storage(f"journal:{tmp_path}")


def test_power_law_recovered_and_fallbacks():
    b = np.array([10.0, 20, 40, 80, 160, 320])
    y = 2.0 + 5.0 * b ** -0.4
    ex = extrapolate_loss(np.r_[0, b], np.r_[9.9, y], 1000.0)       # step 0 ignored
    assert ex.model == "saturating"
    assert ex.loss == pytest.approx(2.0 + 5.0 * 1000 ** -0.4, rel=1e-5)
    a, k, c = ex.params
    assert (a, k, c) == pytest.approx((2.0, 5.0, 0.4), rel=1e-3)
    # a pure power law through 2 or 3 points: the log-log line, exact
    ex = extrapolate_loss([10, 100], [3.0, 3.0 * 10 ** -0.2], 1000)
    assert ex.model == "loglog" and ex.loss == pytest.approx(3.0 * 100 ** -0.2, rel=1e-12)
    ex = extrapolate_loss([10], [3.0], 1000)
    assert ex.model == "none" and math.isnan(ex.loss)
    assert extrapolate_loss([10, 20, float("nan")], [3.0, 2.9, float("nan")], 40).model == "loglog"
    with pytest.raises(ValueError, match="must be 1-D of one length"):
        extrapolate_loss([1, 2], [1.0], 4)


def test_study_setup_lock_follows_the_storage_url(tmp_path, monkeypatch):
    # The set-up lock sits next to a journal file, found by the same rule as open_storage: an SQLite
    # database named *.log is no journal, and '~' is the home directory.
    from examples.tune import tune
    from examples.tune.synthetic import SyntheticTrainable

    monkeypatch.setenv("HOME", str(tmp_path))
    args = dict(families={"f": {"lr": 1.0}}, tiers=[8], reference_tier=8, rungs=[10], multipliers=(1.0,),
                progress=False)
    res = tune(SyntheticTrainable(), workdir=tmp_path / "a", storage=f"sqlite:///{tmp_path}/tune.log", **args)
    assert set(res.choices) == {("f", 8)}
    res = tune(SyntheticTrainable(), workdir=tmp_path / "b", storage="journal:~/j.log", **args)
    assert set(res.choices) == {("f", 8)} and (tmp_path / "j.log.setup.lock").exists()


def test_an_unwritable_choices_path_is_refused_before_training(tmp_path):
    from examples.tune import tune
    from examples.tune.synthetic import SyntheticTrainable

    (tmp_path / "a-file").write_text("")
    args = dict(families={"f": {"lr": 1.0}}, tiers=[8], reference_tier=8, rungs=[10], workdir=tmp_path / "w",
                progress=False)
    for bad, match in [(tmp_path / "a-file" / "choices.json", "cannot be written"),
                       (tmp_path / "w", "cannot be written \\(a directory\\)")]:
        with pytest.raises(ValueError, match=match):
            tune(SyntheticTrainable(), choices_path=bad, **args)
        assert not list((tmp_path / "w").rglob("calls.jsonl"))    # nothing was trained (in memory: nothing kept)
