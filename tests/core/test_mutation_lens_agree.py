"""Mutation audit of SpectralLens's failure agreement (``spectral_lens._agree.agree``), in one process
with ``torch.distributed``'s calls patched (a subgroup whose group ranks are not the global ranks): the other ranks' ``RuntimeError``
names the failed rank by its global rank, and a failed rank re-raises its own exception."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from spectral_lens._agree import agree


@pytest.fixture
def subgroup_rank0(monkeypatch):
    """This process is group rank 0 of a two-rank subgroup of global ranks [1, 3]; group rank 1 failed."""
    reduced = []

    def all_reduce(t, op=None, group=None):
        assert op == dist.ReduceOp.MAX and group is _GROUP
        t[1] = 1
        reduced.append(t.tolist())

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "get_global_rank", lambda group, r: {0: 1, 1: 3}[r])
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return reduced


_GROUP = object()


def test_the_other_ranks_name_the_failed_rank_by_its_global_rank(subgroup_rank0):
    with pytest.raises(RuntimeError, match=r"the activation pass failed on global rank\(s\) \[3\]"):
        agree(_GROUP, None, "the activation pass")
    assert subgroup_rank0 == [[0, 1]]  # this rank's flag 0, the failed rank's 1
    with pytest.raises(KeyError, match="own"):  # a failed rank raises its own error, not the RuntimeError
        agree(_GROUP, KeyError("own"), "the activation pass")
    assert subgroup_rank0[-1] == [1, 1]
