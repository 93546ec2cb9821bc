"""``measure``'s collectives under NCCL: one device per rank for a whole measurement, chosen as the constructor's.

A user who moved the model to ``cuda:{local_rank}`` without ``torch.cuda.set_device`` had every rank's measure
collectives on ``cuda:0`` (the current device): NCCL refuses two ranks on one GPU, or the ranks wait. And a rank
with no rows synced its empty accumulator on the current device, not on the device the process group is bound to
(``init_process_group(device_id=...)``), which NCCL requires. Now every agreement of ``measure`` and every
accumulator's ``sync`` take the bound device, else the model's GPU, else the current device
(``_agree.collective_device``); a state elsewhere (on the CPU, another GPU) is copied there for the sums and the
result put back on its own device.

No GPU here: this process is rank 1 of 2 under a faked "nccl" (``all_reduce`` leaves the tensor as it is: the
other rank adds nothing); the tensors the collectives' code makes are built on the CPU, the device each asked for
recorded, and ``Tensor.to`` a CUDA device is recorded and left on the CPU. Unverified on real NCCL.
"""

from __future__ import annotations

import types

import pytest
import torch
from support.fake_nccl import fake_nccl_rank1
from support.models import TinyLM, lm_pool

from spectral_lens import ActivationCovarianceAccumulator, SpectralLens, _agree, _sync
from spectral_lens import accumulate as accumulate_mod

pytestmark = pytest.mark.distributed

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


class _Torch:
    """``torch`` as a module sees it, but ``zeros``, ``tensor`` and ``full`` record the device asked for and
    build on the CPU."""

    def __init__(self, seen: list):
        self.seen = seen

    def __getattr__(self, name):
        return getattr(torch, name)

    def _record(self, device):
        self.seen.append(torch.device("cpu") if device is None else torch.device(device))

    def zeros(self, *shape, device=None, **kwargs):
        self._record(device)
        return torch.zeros(*shape, **kwargs)

    def tensor(self, data, device=None, **kwargs):
        self._record(device)
        return torch.tensor(data, **kwargs)

    def full(self, *args, device=None, **kwargs):
        self._record(device)
        return torch.full(*args, **kwargs)


class _SyncTorch(_Torch):
    """``_sync``'s ``torch``: the tensors made on its ``dev`` recorded (the status vector, the first sums); those
    made on the state's own tensors' device (its ``first_bad``: on the CPU here, the state never moved) are not."""

    def tensor(self, data, device=None, **kwargs):
        if isinstance(data, list):
            self._record(device)
        return torch.tensor(data, **kwargs)

    def full(self, *args, device=None, **kwargs):
        return torch.full(*args, **kwargs)


@pytest.fixture
def nccl(monkeypatch):
    """Rank 1 of 2 under "nccl", 2 GPUs, ``set_device`` never called (current device 0), no device bound
    (``state["bound"]``); ``state["devices"]``: every device a collective's tensor asked for (the agreements',
    the sync's, an empty accumulator's zero state, a copy made with ``Tensor.to``, an object broadcast's)."""

    state = {"devices": [], "bound": None, "reduced": 0}

    def all_reduce(t, op=None, group=None):
        state["reduced"] += 1

    def broadcast_object_list(objs, src=None, group=None, device=None):
        state["devices"].append(torch.device("cuda", 0) if device is None else torch.device(device))

    fake_nccl_rank1(monkeypatch, state, all_reduce=all_reduce, broadcast_object_list=broadcast_object_list)
    monkeypatch.setattr(_agree, "torch", _Torch(state["devices"]))
    monkeypatch.setattr(_sync, "torch", _SyncTorch(state["devices"]))
    zero_state = accumulate_mod._zero_state

    def recorded_zero_state(dim, device, shift, precision):
        state["devices"].append(torch.device(device))
        return zero_state(dim, torch.device("cpu"), shift, precision)

    monkeypatch.setattr(accumulate_mod, "_zero_state", recorded_zero_state)
    to = torch.Tensor.to

    def recorded_to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
            state["devices"].append(torch.device(target))
            return self
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recorded_to)
    return state


def _rows(n: int = 12, d: int = 4) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_an_empty_accumulators_sync_takes_the_bound_device(nccl):
    """A rank with no rows, the group bound to cuda:1, ``set_device`` never called: its zero state and every
    tensor of the sync on cuda:1; before, on the current device (cuda:0), which NCCL refuses for a bound group."""
    nccl["bound"] = CUDA1
    acc = ActivationCovarianceAccumulator(4)
    acc.sync()
    assert nccl["reduced"] >= 4 and set(nccl["devices"]) == {CUDA1}
    assert acc._n.item() == 0 and acc._synced


def test_an_empty_accumulators_sync_takes_the_device_it_is_given(nccl):
    """The lens passes its measurement's device (here the model's GPU, cuda:1): the empty rank joins there."""
    acc = ActivationCovarianceAccumulator(4)
    acc.sync(device="cuda:1")
    assert set(nccl["devices"]) == {CUDA1}


def test_a_state_elsewhere_is_summed_on_the_bound_device_and_stays_home(nccl):
    """A state on the CPU under NCCL (which takes no CPU tensor), the group bound to cuda:1: copied there for the
    sums, the result back on the CPU; before, the collectives took the CPU tensors. The sum (the other rank adds
    nothing) is this rank's own state, to the float64 reference."""
    nccl["bound"] = CUDA1
    acc = ActivationCovarianceAccumulator(4, precision="float64")
    rows = _rows()
    acc.update(rows)
    acc.sync()
    assert set(nccl["devices"]) == {CUDA1}
    assert acc._s.device.type == "cpu" and acc._n.item() == 12
    torch.testing.assert_close(acc.covariance(), torch.cov(rows.T), rtol=1e-12, atol=1e-12)


def test_a_state_on_its_gpu_is_summed_there_where_no_device_is_bound(nccl, monkeypatch):
    """No bound device, no device given: the state's GPU (where the model's rows arrived), as before."""
    acc = ActivationCovarianceAccumulator(4)
    acc.update(_rows())
    monkeypatch.setattr(acc, "_shift", types.SimpleNamespace(device=CUDA1))  # (read for the device only)
    with pytest.raises(AttributeError):  # the fake state cannot be copied (agreed, then raised); devices chosen
        acc.sync()
    assert nccl["devices"] and set(nccl["devices"]) == {CUDA1}


def test_a_device_other_than_the_bound_one_is_refused(nccl):
    nccl["bound"] = CUDA1
    with pytest.raises(ValueError, match=r"sync\(device=cuda:0\) under NCCL.*bound to \(cuda:1"):
        ActivationCovarianceAccumulator(4).sync(device=CUDA0)
    with pytest.raises(ValueError, match="expected a CUDA device"):
        ActivationCovarianceAccumulator(4).sync(device="cpu")


@pytest.mark.parametrize("bound", [None, CUDA1])
def test_measure_takes_the_models_gpu_for_every_collective(nccl, monkeypatch, bound):
    """The model on cuda:1 (``model.to(local_rank)``), ``set_device`` never called (current device cuda:0): every
    collective of ``measure`` (its agreements, each layer's sync, the broadcasts from rank 0) on cuda:1; before,
    the agreements and the broadcasts on cuda:0 (NCCL: two ranks on one GPU). With a bound device: that one.
    (No GPU here: the model is on the CPU, its GPU given by the patched ``model_cuda_device``.)"""
    import torch.distributed as dist

    def all_reduce(t, op=None, group=None):  # rank 0 loaded as this rank did: agree_round's 2 x 2 slots alike
        nccl["reduced"] += 1
        if t.dtype == torch.int64 and t.shape == (4,):
            t[0], t[2] = t[1], t[3]

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    nccl["bound"] = bound
    monkeypatch.setattr(_agree, "model_cuda_device", lambda m: CUDA1 if isinstance(m, TinyLM) else None)
    torch.manual_seed(0)
    lens = SpectralLens(TinyLM(), lm_pool(n_batches=2), params=(), progress=False, layers=["h.0", "h.1"],
                       tail_window=(8, 32))
    nccl["devices"].clear()
    m = lens.measure(step=1, tokens=10)
    assert m is not None and nccl["reduced"] > 5
    assert set(nccl["devices"]) == {CUDA1}


def test_the_gradient_pools_agreement_and_the_callbacks_take_the_models_gpu(nccl, monkeypatch):
    """Under FSDP the gradient pool is compared batch by batch (``agreed_batches``), and the integrations'
    callbacks agree between measurements (``_Driver``): on the model's GPU too, as ``measure``'s other
    collectives; before, on the current device (cuda:0), a second device for this rank's collectives."""
    import torch.distributed as dist

    from spectral_lens._gradient_pool import agreed_batches
    from spectral_lens.integrations._driver import LensDriver

    def all_reduce(t, op=None, group=None):  # the other rank had the same batches
        nccl["reduced"] += 1
        t[0] = t[1]

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    model = TinyLM()
    monkeypatch.setattr(_agree, "model_cuda_device", lambda m: CUDA1 if m is model else None)
    assert len(list(agreed_batches(None, iter(lm_pool(n_batches=2)), None, model))) == 2
    driver = LensDriver.__new__(LensDriver)  # (rank 1: only the agreement runs)
    driver.lens = types.SimpleNamespace(group=None, model=model)
    driver._agreed_on_rank0(lambda: None, "a callback's work")
    assert nccl["reduced"] == 4 and set(nccl["devices"]) == {CUDA1}


def test_gloo_sync_is_unchanged(monkeypatch):
    """Not NCCL: the state's device, else the CPU, whatever ``device`` says; ``torch.cuda`` not asked."""
    import torch.distributed as dist

    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: seen.append(t.device))
    for name in ("current_device", "device_count", "is_initialized"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("cuda asked")))
    acc = ActivationCovarianceAccumulator(4)
    acc.sync(device="cuda:1")
    assert seen and set(seen) == {torch.device("cpu")}


def test_settings_that_differ_are_gathered_on_the_models_gpu(nccl, monkeypatch):
    """The failure path of ``agree_settings`` gathers the ranks' settings with ``all_gather_object``, which takes
    no device (torch's current one): run with the measurement's device made current (cuda:1, the model's);
    before, on cuda:0, a second device for this rank's collectives."""
    import contextlib

    import torch.distributed as dist

    current = [0]

    @contextlib.contextmanager
    def device(d):
        before, current[0] = current[0], torch.device(d).index
        try:
            yield
        finally:
            current[0] = before

    def all_reduce(t, op=None, group=None):  # rank 0's lens is configured otherwise: another digest
        t[0], t[2] = t[1], t[3] + 1

    def all_gather_object(out, obj, group=None):
        nccl["devices"].append(torch.device("cuda", current[0]))
        out[:] = [{"precision": "fast"}, obj]

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    model = TinyLM()
    monkeypatch.setattr(_agree, "model_cuda_device", lambda m: CUDA1 if m is model else None)
    with pytest.raises(ValueError, match="precision=fast on global rank 0, precision=exact on global rank 1"):
        _agree.agree_settings(None, {"precision": "exact"}, None, "checking", model)
    assert set(nccl["devices"]) == {CUDA1} and current[0] == 0
