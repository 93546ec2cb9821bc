"""The activation measurement's memory check per device, and per layer's own rows per update
(``spectral_lens._memory``).

* Layers on several devices in one process (a Hugging Face ``device_map`` across devices, pipeline stages): every
  layer was counted on the device of the pass's first rows (a false refusal there when the others are elsewhere)
  and no other device was checked. Now each layer is counted on its own device (its Accelerate hook's
  ``execution_device``, else the one accelerator its weights are on, else the first rows'), each device is checked
  at the first rows that arrive on it, and a layer whose rows come on another device than counted moves there.
* A layer fed more rows per update than the pass's first layer (the experts of an MoE layer fed top-k x tokens, a
  module fed the batch repeated) was counted at the first rows' count; now it is checked again at its own rows.

A second device is simulated by rows on ``meta`` (shapes without data: the check reads only the rows' shape, dtype
and device) with a free-memory budget of its own; ``free_bytes`` is patched per device type."""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens import _memory
from spectral_lens._memory import accumulator_bytes, check_rows, layer_device
from spectral_lens.accumulate import ActivationCovarianceAccumulator
from spectral_lens.activation_capture import ActivationCapture

D, ROWS = 64, 15
META = torch.device("meta")


def _size(rows: int = ROWS, device_type: str = "cpu") -> tuple[int, int, int]:
    return accumulator_bytes(D, "exact", rows, device_type=device_type, rows_float64=True)


def _peak(n: int, device_type: str = "cpu") -> int:
    return _memory._peak([_size(device_type=device_type)] * n)


class _Hook:  # Accelerate's AlignDevicesHook, duck-typed: where the module runs
    def __init__(self, device) -> None:
        self.execution_device = device


def _module(device) -> nn.Module:
    """A module that layer_device places on ``device`` (``None``: no weights, not known before its rows; ``"cpu"``:
    CPU weights, which are not known to run there either; another device: the execution device of its hook)."""
    if device is None:
        return nn.GELU()
    module = nn.Linear(2, 3, device=device if device == "cpu" else "meta")
    if device != "cpu":
        module._hf_hook = _Hook(device)
    return module


def _capture(devices: list) -> ActivationCapture:
    """A capture of ``len(devices)`` layers of width ``D`` (known before their rows), each on ``devices[i]``
    (``None``: not known before its rows)."""
    accs = {f"l{i}": ActivationCovarianceAccumulator(precision="exact", name=f"l{i}") for i in range(len(devices))}
    capture = ActivationCapture(accs)
    capture._widths = {name: D for name in accs}
    capture.held_modules = [_module(device) for device in devices]  # (the capture refers to them weakly)
    capture._modules = {name: weakref.ref(module) for name, module in zip(accs, capture.held_modules)}
    return capture


def _free(monkeypatch, budgets: dict[str, int], capture) -> None:
    """``free_bytes``: each device type's budget less the held bytes of the layers with state on it (the CPU ones:
    the meta rows make none)."""

    def free(device):
        held = sum(_size()[0] for acc in capture.accumulators.values() if acc.initialized)
        return budgets[device.type] - (held if device.type == "cpu" else 0)

    monkeypatch.setattr(_memory, "free_bytes", free)


def _rows(device, n: int = ROWS) -> torch.Tensor:
    return torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n)).to(device)


def _first_rows(capture, name: str, rows: torch.Tensor) -> None:
    """What the hook does at a layer's first rows: the check, then (CPU rows) the update."""
    acc = capture.accumulators[name]
    check_rows(capture, acc, rows)
    if rows.device.type == "cpu":
        acc.update(rows)


def test_layers_on_another_device_are_not_counted_on_the_first(monkeypatch):
    """Two layers on the CPU, two on a second device: each device has room for two. The pass's first check
    counted all four on the CPU (refused: a false refusal); now it counts the CPU's two, and the second device's
    two at its first rows."""
    capture = _capture([None, None, META, META])
    _free(monkeypatch, {"cpu": _peak(2), "meta": _peak(2, "meta")}, capture)
    for name, device in zip(capture.accumulators, ["cpu", "cpu", META, META]):
        _first_rows(capture, name, _rows(device))
    assert [acc.n_rows for acc in capture.accumulators.values()][:2] == [ROWS, ROWS]


def test_the_first_rows_on_another_device_check_that_device(monkeypatch):
    """The second device has room for one of its two layers: refused at its first rows, before any state there,
    naming it (before: no check on any device but the first's; an out-of-memory error part-way). The exact budget
    passes."""
    capture = _capture([None, None, META, META])
    _free(monkeypatch, {"cpu": _peak(2), "meta": _peak(2, "meta") - 1}, capture)
    _first_rows(capture, "l0", _rows("cpu"))
    _first_rows(capture, "l1", _rows("cpu"))
    with pytest.raises(MemoryError) as e:
        check_rows(capture, capture.accumulators["l2"], _rows(META))
    msg = str(e.value)
    for part in ("layer 'l2' got its first rows", "they are the first rows on meta, where 2 of its layers are counted",
                 "The 2 layer(s) of this capture without state yet there (d=64)", "on meta",
                 "SPECTRAL_LENS_MEMORY_CHECK=0"):
        assert part in msg, (part, msg)
    _free(monkeypatch, {"cpu": _peak(2), "meta": _peak(2, "meta")}, capture)
    check_rows(capture, capture.accumulators["l2"], _rows(META))
    assert META in _memory._PASSES[capture][0]


def test_a_layer_not_known_to_be_elsewhere_moves_to_its_rows_device(monkeypatch):
    """Layers whose device is not known before their rows (None) are counted on the first rows' device; when a
    layer's rows come on another device, it is counted there (and no longer on the first): the CPU's budget for
    all four passes the first check, the second device's budget for one layer is checked at its rows."""
    capture = _capture([None, None, None, None])
    _free(monkeypatch, {"cpu": _peak(4), "meta": _peak(1, "meta") - 1}, capture)
    _first_rows(capture, "l0", _rows("cpu"))
    _first_rows(capture, "l1", _rows("cpu"))
    with pytest.raises(MemoryError, match=r"it was counted on cpu, not on meta, by the pass's first check"):
        check_rows(capture, capture.accumulators["l2"], _rows(META))
    _free(monkeypatch, {"cpu": _peak(4), "meta": _peak(1, "meta")}, capture)
    check_rows(capture, capture.accumulators["l2"], _rows(META))
    layers = _memory._PASSES[capture][1]
    cpu = torch.device("cpu")
    assert [layers[acc][0] for acc in capture.accumulators.values()] == [cpu, cpu, META, cpu]


def test_one_device_is_checked_as_before(monkeypatch):
    """Every layer on the CPU (known or not): refused at the pass's first rows one byte short of all four, the
    message as for one device."""
    for devices in (["cpu"] * 4, [None] * 4):  # (a CPU one: a simulated layer, as a capture could be told)
        capture = _capture(devices)
        _free(monkeypatch, {"cpu": _peak(4) - 1}, capture)
        with pytest.raises(MemoryError, match=r"measuring 4 layer\(s\) \(d=64, precision='exact'") as e:
            _first_rows(capture, "l0", _rows("cpu"))
        assert "other devices" not in str(e.value)
        _free(monkeypatch, {"cpu": _peak(4)}, capture)
        _first_rows(capture, "l0", _rows("cpu"))


def test_the_first_check_names_the_layers_on_other_devices(monkeypatch):
    capture = _capture([None, None, None, META])
    _free(monkeypatch, {"cpu": _peak(3) - 1, "meta": 0}, capture)
    with pytest.raises(MemoryError, match=r"measuring 3 layer\(s\) \(1 more of the capture's layers are on other "
                                          r"devices, checked at their first rows there\)"):
        _first_rows(capture, "l0", _rows("cpu"))


class Placed(nn.Module):
    """A module whose weights report the given devices (as on GPUs; this machine has none)."""

    def __init__(self, *devices: str) -> None:
        super().__init__()
        self.devices = [torch.device(d) for d in devices]

    def parameters(self, recurse: bool = True):
        return iter([SimpleNamespace(device=d) for d in self.devices])


def test_layer_device():
    assert layer_device(Placed("cuda:1", "cuda:1")) == torch.device("cuda", 1)  # a pipeline stage, a device_map
    assert layer_device(Placed("cuda:0", "cuda:1")) is None
    assert layer_device(nn.Linear(2, 3)) is None  # CPU weights may run on an accelerator (FSDP's CPU offload)
    assert layer_device(nn.Linear(2, 3, device="meta")) is None  # offloaded: no data, no device
    assert layer_device(nn.GELU()) is None

    class Hook:  # Accelerate's AlignDevicesHook, duck-typed: where the module runs
        execution_device = 1

    dispatched = nn.Linear(2, 3, device="meta")
    dispatched._hf_hook = Hook()
    assert layer_device(dispatched) == torch.device("cuda", 1)


class Repeated(nn.Module):
    """A layer, then a second one fed the first's output ``k`` times over (as the experts of an MoE layer are fed
    top-k x tokens rows): its rows per update are ``k`` times the first's."""

    def __init__(self, k: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.k = k
        self.first, self.second = nn.Linear(8, D), nn.Linear(D, D)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.second(torch.cat([h] * self.k))


def test_a_layer_fed_more_rows_than_the_first_is_checked_at_its_own(monkeypatch):
    """The second layer gets 64 x the first's rows per update: its update's rows outweigh the d x d sums. The first
    check counted it at the first rows' count and let the pass through (an out-of-memory error in its update);
    now its first rows check again with their own count: one byte short of the real peak is refused there, before
    its state; the exact budget measures both, equal to float64 references."""
    k = 64
    model = Repeated(k)
    x = torch.randn(ROWS, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    real = _memory._peak([_size(ROWS), _size(k * ROWS)])
    assert _memory._peak([_size(ROWS)] * 2) < real - 1
    with sl.attach(model, ["first", "second"]) as capture:
        def free(device, budget):
            return budget - sum(_size(acc.n_rows)[0] for acc in capture.accumulators.values() if acc.initialized)

        monkeypatch.setattr(_memory, "free_bytes", lambda device: free(device, real - 1))
        with pytest.raises(MemoryError) as e:
            model(x)
        msg = str(e.value)
        for part in (f"layer 'second' got its first rows, of width d={D} ({k * ROWS} rows per update)",
                     f"counted at {ROWS} rows per update by the pass's first check"):
            assert part in msg, (part, msg)
        assert [acc.initialized for acc in capture.accumulators.values()] == [True, False]
        capture.reset()
        monkeypatch.setattr(_memory, "free_bytes", lambda device: free(device, real))
        model(x)
        second = capture.compute()["second"]
    h = torch.tanh(model.first(x)).detach()
    y = model.second(torch.cat([h] * k)).detach()
    ref = torch.linalg.eigvalsh(torch.cov(y.T)).flip(0).clamp_min(0)
    assert second.n_rows == k * ROWS
    torch.testing.assert_close(second.values.double(), ref, rtol=1e-6, atol=1e-9 * float(ref[0]))
