"""Review of the constructor's agreement (``_agree.built_together``): under NCCL, where its flag tensor lives.

A lens is often built before ``torch.cuda.set_device(local_rank)`` (scripts build their helpers first;
``measure`` needs the device set, the constructor did not before it made a collective). The current CUDA device
is then ``cuda:0`` on every rank: the constructor's ``all_reduce`` there puts every rank on GPU 0 (NCCL refuses two
ranks on one GPU, or the ranks wait), and leaves a CUDA context on GPU 0 for every rank. Now the agreement runs on
the device the process group is bound to (``init_process_group(device_id=...)``), else the model's GPU, else
(CUDA untouched in this process) ``LOCAL_RANK``'s GPU, else the current device (``_agree.built_device``); every
collective of ``measure`` prefers the bound device too, as torch's own ``barrier`` does.

No GPU here: ``torch.distributed`` and ``torch.cuda`` are patched (this process is a rank of 2 under "nccl"), and
the tensors the agreement makes are built on the CPU, their requested device recorded. Unverified on real NCCL."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from spectral_lens import SpectralLens
from spectral_lens import _agree
from spectral_lens._agree import built_device, collective_device, model_cuda_device

from support.fake_nccl import fake_nccl_rank1
from support.models import TinyLM, lm_pool

pytestmark = pytest.mark.distributed

CUDA1 = torch.device("cuda", 1)


class _Torch:
    """``torch`` as ``_agree`` sees it, but ``zeros`` records the device asked for and builds on the CPU."""

    def __init__(self, seen: list):
        self.seen = seen

    def __getattr__(self, name):
        return getattr(torch, name)

    def zeros(self, *shape, device=None, **kwargs):
        self.seen.append(None if device is None else torch.device(device))
        return torch.zeros(*shape, **kwargs)


@pytest.fixture
def nccl(monkeypatch):
    """This process as rank 1 of 2 under "nccl" with 2 GPUs, ``set_device`` never called (current device 0),
    CUDA initialized, no device bound; ``state["devices"]``: the devices the agreement's tensors asked for,
    ``state["calls"]``: the tensors all-reduced (the other rank succeeded: nothing merged in)."""

    state = {"devices": [], "calls": [], "bound": None}

    def all_reduce(t, op=None, group=None):
        state["calls"].append(t.clone())

    fake_nccl_rank1(monkeypatch, state, all_reduce=all_reduce)
    monkeypatch.setattr(_agree, "torch", _Torch(state["devices"]))
    return state


def _lens(model=None, **kwargs) -> SpectralLens:
    torch.manual_seed(0)
    return SpectralLens(TinyLM() if model is None else model, lm_pool(n_batches=2), params=(), progress=False,
                        **kwargs)


def test_a_lens_built_under_a_bound_device_agrees_there_not_on_cuda0(nccl):
    """``init_process_group("nccl", device_id=cuda:1)`` without ``set_device``: before, the constructor's
    all_reduce went to cuda:0 (the current device) on every rank."""
    nccl["bound"] = CUDA1
    assert _lens().model is not None
    assert nccl["devices"] == [CUDA1] and len(nccl["calls"]) == 1


def test_a_lens_built_before_cuda_is_touched_agrees_on_local_ranks_gpu(nccl, monkeypatch):
    """The lens built first thing under torchrun (a CPU model, no ``set_device`` yet, CUDA not initialized):
    ``LOCAL_RANK``'s GPU, as the script's later ``set_device(local_rank)`` makes current; before, cuda:0."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "3")  # 2 GPUs: 3 % 2
    assert _lens().model is not None
    assert nccl["devices"] == [CUDA1]
    monkeypatch.delenv("LOCAL_RANK")  # no torchrun: the global rank (1)
    nccl["devices"].clear()
    _lens()
    assert nccl["devices"] == [CUDA1]


def test_a_lens_built_on_a_model_on_one_gpu_agrees_on_that_gpu(nccl, monkeypatch):
    """The model moved to ``cuda:1`` (``model.to(local_rank)``) before ``set_device``: its GPU, before cuda:0.
    (No GPU here: the model's device is given by the patched ``model_cuda_device``, tested on its own below.)"""
    model = TinyLM()
    asked = []
    monkeypatch.setattr(_agree, "model_cuda_device", lambda m: asked.append(m) or CUDA1, raising=False)
    assert _lens(model).model is model
    assert asked == [model] and nccl["devices"] == [CUDA1]


def test_another_ranks_failure_is_agreed_on_the_same_device(nccl):
    """The failure path's second all_reduce (the error texts) asks for the same device as the flags."""
    nccl["bound"] = CUDA1

    def all_reduce(t, op=None, group=None):
        nccl["calls"].append(t.clone())
        if t.dim() == 1:
            t[0] = 1  # rank 0 failed (no text: an empty cause)

    import torch.distributed as dist

    dist.all_reduce = all_reduce  # (the fixture's monkeypatch restores it)
    with pytest.raises(RuntimeError, match=r"building the lens failed on global rank\(s\) \[0\]"):
        _lens()
    assert nccl["devices"] == [CUDA1, CUDA1]


def test_the_current_device_where_nothing_else_says(nccl, monkeypatch):
    """CUDA initialized (``set_device(3)`` called), a CPU model, no bound device: the current device, as before."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    _lens()
    assert nccl["devices"] == [torch.device("cuda", 3)]


def test_measures_collectives_prefer_the_bound_device(nccl):
    """``measure``'s agreements (``collective_device``) take the bound device first, as torch's barrier does;
    before, the current device (cuda:0 where ``set_device`` was never called)."""
    assert collective_device(None) == torch.device("cuda", 0)
    nccl["bound"] = CUDA1
    assert collective_device(None) == CUDA1
    assert collective_device(types.SimpleNamespace(bound_device_id=torch.device("cuda", 2))) == torch.device("cuda", 2)
    assert collective_device(object()) == torch.device("cuda", 0)  # a group without the attribute (older torch)


def test_gloo_takes_the_cpu_without_touching_cuda(monkeypatch):
    """Not NCCL: the CPU, and ``torch.cuda`` is not asked (it would make a CUDA context on GPU 0)."""
    import torch.distributed as dist

    def refuse(*args, **kwargs):
        raise AssertionError("torch.cuda asked under gloo")

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    for name in ("current_device", "device_count", "is_initialized"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    assert built_device(None, TinyLM()) == torch.device("cpu") == collective_device(None)


class _OnDevices(nn.Module):
    """A module whose parameters and buffers report the given devices (no GPU needed)."""

    def __init__(self, *devices):
        super().__init__()
        self._fake = [types.SimpleNamespace(device=torch.device(d)) for d in devices]

    def parameters(self, recurse=True):
        return iter(self._fake[:1])

    def buffers(self, recurse=True):
        return iter(self._fake[1:])


@pytest.mark.parametrize("devices, expected", [
    (("cuda:1", "cuda:1"), CUDA1),
    (("cpu", "cuda:1"), CUDA1),             # a buffer on the GPU, the parameters elsewhere: still one GPU
    (("cuda:0", "cuda:1"), None),           # spread over two GPUs: no hint
    (("cpu", "cpu"), None),
    (("meta", "meta"), None),               # offloaded (Accelerate): no hint
    ((), None),
])
def test_model_cuda_device(devices, expected):
    assert model_cuda_device(_OnDevices(*devices)) == expected


def test_model_cuda_device_of_what_is_not_a_module():
    assert model_cuda_device(None) is None and model_cuda_device("TinyLM") is None


def test_model_cuda_device_of_a_module_whose_tensors_cannot_be_listed():
    """No hint, no error: a rank raising here would skip the agreement's collective the others wait in."""
    class Broken(nn.Module):
        def parameters(self, recurse=True):
            raise RuntimeError("cannot list")

    assert model_cuda_device(Broken()) is None
