"""Review of the NCCL device change (``sync(device=...)``): the state copied to the collective device and back.

Under NCCL a state held off the collective device (on the CPU, another GPU) is copied there for the sums and the
result put back on its own device. That copy back came after the last collective: running out of memory there
(a d x d float64 on the state's device) raised on this rank only, its state unsynced while every other rank had
committed the sums, and a lens's other ranks went on into the next layer's sync, waiting for this one until the
process-group timeout. Now the buffers on the state's device are made before the sums (a failure rides in their
first collective: every rank raises, each state as it was) and filled in place after the last one.

No GPU: the faked "nccl" of ``test_review24_nccl.py`` (rank 1 of 2; ``all_reduce`` adds nothing, ``Tensor.to`` a
CUDA device recorded and left on the CPU).
"""

from __future__ import annotations

import pytest
import torch
from reliability.test_review24_nccl import CUDA1, _rows, nccl  # noqa: F401 (the fixture)

from spectral_lens import ActivationCovarianceAccumulator

pytestmark = pytest.mark.distributed


def _home_out_of_memory(monkeypatch, after: list):
    """From the moment ``after`` is non-empty, any new tensor made on the CPU (the state's device here: ``to``
    the CPU, ``empty_like``, ``empty``) runs out of memory."""
    to, empty_like, empty = torch.Tensor.to, torch.empty_like, torch.empty

    def oom():
        raise torch.OutOfMemoryError("CPU out of memory (faked)")

    def failing_to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if after and isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
            oom()
        return to(self, *args, **kwargs)

    def failing_empty_like(t, *args, **kwargs):
        if after:
            oom()
        return empty_like(t, *args, **kwargs)

    def failing_empty(*args, **kwargs):
        if after:
            oom()
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", failing_to)
    monkeypatch.setattr(torch, "empty_like", failing_empty_like)
    monkeypatch.setattr(torch, "empty", failing_empty)


def test_the_copy_back_out_of_memory_is_agreed_and_leaves_the_state_as_it_was(nccl, monkeypatch):
    """The group bound to cuda:1, the state on the CPU, the CPU out of memory once the status is agreed: the
    failure rides in a collective (this rank's failure flag set: the other ranks raise too, none commits), and
    this rank raises the OutOfMemoryError with its state bit for bit as it was, not synced."""
    import torch.distributed as dist

    nccl["bound"] = CUDA1
    acc = ActivationCovarianceAccumulator(4, precision="float64")
    acc.update(_rows())
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in acc.state_dict().items()}
    carried, started = [], []

    def all_reduce(t, op=None, group=None):  # rank 1 of 2: a failure flag of this rank in any vector of flags
        nccl["reduced"] += 1
        if t.dtype == torch.float64 and t.ndim == 1 and t.numel() == 4 + 1 + 2:  # the first sums' totals
            carried.append(bool(t[4 + 1 + 1] > 0))
        if t.dtype == torch.int64 and t.numel() == 2 * 2 + 2:  # the last collective's flags
            carried.append(bool(t[2 + 2 + 1] > 0))
        started.append(True)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    _home_out_of_memory(monkeypatch, started)
    with pytest.raises(torch.OutOfMemoryError, match="faked"):
        acc.sync()
    assert any(carried), "the failure stayed on this rank: the others committed the sums (or wait in the next sync)"
    assert not acc._synced
    after = acc.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert after[k].dtype == v.dtype and after[k].device == v.device and torch.equal(after[k], v), k
        else:
            assert after[k] == v, k


@pytest.mark.parametrize("precision", ["float64", "exact"])
def test_a_state_elsewhere_keeps_its_dtypes_device_and_values(nccl, precision):
    """The copy to the collective device and back keeps every field's dtype and device, the row count and the
    mean (float64 reference), and the state is synced; the other rank added nothing."""
    nccl["bound"] = CUDA1
    rows = _rows(20, 5)
    acc = ActivationCovarianceAccumulator(5, precision=precision)
    acc.update(rows)
    dtypes = {k: v.dtype for k, v in acc.state_dict().items() if isinstance(v, torch.Tensor)}
    acc.sync()
    assert acc._synced and acc.n_rows == 20
    assert {k: v.dtype for k, v in acc.state_dict().items() if isinstance(v, torch.Tensor)} == dtypes
    assert all(v.device.type == "cpu" for v in acc.state_dict().values() if isinstance(v, torch.Tensor))
    torch.testing.assert_close(acc.mean, rows.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.covariance(), torch.cov(rows.T), rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="synced"):
        acc.update(rows)


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_a_torn_state_is_refused_in_a_collective_not_before_one(nccl, monkeypatch, backend):
    """A state torn by an interrupted in-place update refuses every sync; that refusal came from reading ``S``'s
    device before the status collective, so this rank raised alone and the others waited in the status collective
    until the process-group timeout. Now the state's device is read from its shift, and the refusal rides in the
    sums' first collective: every rank raises (this one the torn error), the state still torn."""
    import torch.distributed as dist

    carried = []

    def all_reduce(t, op=None, group=None):
        nccl["reduced"] += 1
        if t.dtype == torch.float64 and t.ndim == 1 and t.numel() == 4 + 1 + 2:  # the first sums' totals
            carried.append(bool(t[4 + 1 + 1] > 0))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    acc = ActivationCovarianceAccumulator(4, precision="float64")
    acc.update(_rows())
    acc._s_stale = True  # the next read of S mirrors it in place: interrupted there, the state stays torn
    acc._s_escaped = False
    acc._torn = True
    with pytest.raises(RuntimeError, match="interrupted"):
        acc.sync(device="cuda:1")
    assert carried == [True] and acc._torn and not acc._synced
