"""Review 27 (revsmalls): an adversarial review of the review-27 smalls merge (62f2582).

1. ``select_modules`` took a module holding no parameter or buffer of its own for a wrapper: a container of the
   user's own (its layers all in children, one called ``_orig_mod``) and the child were merged silently, listed
   apart or by ``"**"``, and so were two sibling containers ``a.x`` / ``a._orig_mod.x``. A wrapper is now a module
   whose one child sits under a wrapper segment and that holds nothing of its own, on every step between the two.
2. ``RunInfo`` took a ``seed`` / ``n_layer`` beyond the float range (written, then refused by the reader), refused the
   other numeric fields so with a bare ``OverflowError``, and refused a NumPy ``batch_tier`` (``np.int64(8)``) as
   "must be a positive number, got np.int64(8)", where every other numeric field takes NumPy numbers.
3. The report's header labels the early checkpoint apart from the 5% grid (``20.04%``), but its figure's legend and
   the tail predictor's notes in the same report said ``20%``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from spectral_lens.capture import select_modules


# --- 1. a container of the user's own is no wrapper -----------------------------------------------------------------

class _Container(nn.Module):
    """A block whose layers are all in children (no parameter of its own), one of them called ``_orig_mod``."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(4, 4)
        self._orig_mod = nn.Linear(4, 3)

    def forward(self, x):
        return self.mlp(x) + self._orig_mod(x).sum()


def _container_model():
    m = nn.Module()
    m.a = _Container()
    return m


def _siblings_model():
    m = nn.Module()
    m.a = nn.Module()
    m.a.x = nn.Sequential(nn.Linear(4, 4))  # a container: no parameter of its own
    m.a._orig_mod = nn.Module()
    m.a._orig_mod.x = nn.Sequential(nn.Linear(4, 3))
    return m


@pytest.mark.parametrize("make, target, names", [
    (_container_model, ["a", "a._orig_mod"], r"'a' and 'a\._orig_mod'"),
    (_container_model, "**", r"'a' and 'a\._orig_mod'"),
    (_siblings_model, ["a.x", "a._orig_mod.x"], r"'a\.x' and 'a\._orig_mod\.x'"),
])
def test_two_different_modules_of_one_record_name_are_refused_though_the_first_holds_no_state(make, target, names):
    with pytest.raises(ValueError, match=names + r".*both be recorded as.*no wrapper"):
        select_modules(make(), target)


def test_a_name_as_typed_still_selects_that_module_only():
    assert [n for n, _ in select_modules(_container_model(), "a")] == ["a"]
    assert [n for n, _ in select_modules(_container_model(), "a._orig_mod")] == ["a._orig_mod"]
    assert [n for n, _ in select_modules(_siblings_model(), "a.x")] == ["a.x"]


def test_checkpoint_wrappers_listed_twice_or_by_glob_are_selected_once():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    m = nn.Module()
    m.k = checkpoint_wrapper(nn.Sequential(nn.Linear(4, 4)))
    m.n = checkpoint_wrapper(checkpoint_wrapper(nn.Sequential(nn.Linear(4, 4))))  # a chain of two wrappers
    chosen = select_modules(m, ["k", "k._checkpoint_wrapped_module", "n", "n._checkpoint_wrapped_module",
                                "n._checkpoint_wrapped_module._checkpoint_wrapped_module"])
    assert [n for n, _ in chosen] == ["k", "n"]
    assert [n for n, _ in select_modules(m, "**")] == [
        "k", "k._checkpoint_wrapped_module.0", "n", "n._checkpoint_wrapped_module._checkpoint_wrapped_module.0"]


@pytest.mark.slow  # torch.compile's first use imports dynamo (about 4 s)
def test_compiled_modules_listed_twice_or_by_glob_are_selected_once():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    m = nn.Module()
    m.c = torch.compile(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    m.n = checkpoint_wrapper(torch.compile(nn.Sequential(nn.Linear(4, 4))))  # a chain of two wrappers
    chosen = select_modules(m, ["c", "c._orig_mod", "n", "n._checkpoint_wrapped_module",
                                "n._checkpoint_wrapped_module._orig_mod"])
    assert [n for n, _ in chosen] == ["c", "n"]
    assert [n for n, _ in select_modules(m, "**")] == ["c", "c._orig_mod.0", "c._orig_mod.1", "n",
                                                       "n._checkpoint_wrapped_module._orig_mod.0"]


def test_fsdp1_wrapper_listed_twice_is_selected_once(one_rank):
    from support.wrapped import net
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for orig in (False, True):
        m = nn.Module()
        m.f = FSDP(net(), use_orig_params=orig, device_id=torch.device("cpu"))
        assert [n for n, _ in select_modules(m, ["f", "f._fsdp_wrapped_module"])] == ["f"]
        assert [n for n, _ in select_modules(m, "**")][:2] == ["f", "f._fsdp_wrapped_module.a"]


# --- 2. RunInfo: NumPy batch tiers; integers beyond the float range --------------------------------------------------

@pytest.mark.parametrize("tier", [np.int64(8), np.int32(8), np.float32(8.0), np.float64(0.5)])
def test_runinfo_takes_a_numpy_batch_tier_and_writes_a_readable_run(tmp_path, tier):
    from spectral_lens.records import RunInfo, RunRecord, RunWriter

    with RunWriter(tmp_path / "r", RunInfo("r", batch_tier=tier), fsync=False):
        pass
    back = RunRecord.open(tmp_path / "r").info.batch_tier
    assert back == float(tier) and type(back) in (int, float)


@pytest.mark.parametrize("key", ["seed", "n_layer", "batch_tier", "tokens_per_step", "total_tokens", "batch_size"])
def test_runinfo_refuses_an_integer_beyond_the_float_range_naming_the_field(key):
    from spectral_lens.records import RunInfo

    with pytest.raises(ValueError, match=rf"RunInfo\.{key} .*beyond the float range"):
        RunInfo("r", **{key: 10**400})


@pytest.mark.parametrize("bad", [np.int64(0), np.float32(-1.0), np.float32("nan")])
def test_runinfo_still_refuses_a_bad_numpy_batch_tier(bad):
    from spectral_lens.records import RunInfo

    with pytest.raises(ValueError, match=r"RunInfo\.batch_tier"):
        RunInfo("r", batch_tier=bad)


# --- 3. one early-checkpoint label in the report: header, figure legend, the tail predictor's notes ----------------

def test_the_report_figure_labels_the_early_checkpoint_as_its_header(tmp_path):
    pytest.importorskip("matplotlib")
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.plot import plot_alpha_trajectories
    from spectral_lens.records import open_runs

    write_theorem6_sweep(tmp_path / "sw", (2, 4), family="g", n_measure=6, n_eval=20)
    fig = plot_alpha_trajectories(open_runs([tmp_path / "sw"]), fraction=0.2004)
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "early checkpoint (20.04%)" in labels, labels  # was "early checkpoint (20%)"
    fig = plot_alpha_trajectories(open_runs([tmp_path / "sw"]), fraction=0.2)
    assert "early checkpoint (20%)" in [t.get_text() for ax in fig.axes if ax.get_legend()
                                        for t in ax.get_legend().get_texts()]


def test_the_tail_predictor_names_the_fraction_as_the_report_header(tmp_path):
    from spectral_lens.analysis import TailPredictor
    from spectral_lens.records import RunInfo, RunWriter

    for name, tier in (("a", 4), ("b", 8)):
        with RunWriter(tmp_path / name, RunInfo(name, family="f", batch_tier=tier, total_tokens=1000), fsync=False) as w:
            w.log(0, 0, train_loss=1.0)
    with pytest.raises(ValueError, match=r"no run has a usable alpha_tail at 20\.04%"):  # was "at 20%"
        TailPredictor(fraction=0.2004).predict([tmp_path / "a", tmp_path / "b"])
