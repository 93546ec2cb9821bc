"""Review of the memory check per device (``spectral_lens._memory``): where a layer's device is read, and what the
check costs per forward.

* A layer's device was read once, at the attach: a model moved after it (``model.to``) kept its layers counted on
  the device they had left. The pass's first rows then counted only their own layer, and each other layer was
  checked alone at its first rows on the new device: a pass that does not fit was refused part-way (the layers
  before keeping their state) instead of before any state, and every layer read the free memory (a
  ``torch.cuda.mem_get_info`` per layer). Now the devices are read at the pass's first rows.
* An Accelerate execution device named without its index (``"cuda"``) was taken as ``torch.device("cuda")``, which
  no tensor's device equals (``cuda:0``): the same part-way checks. Now such a layer is counted on its rows' device.

No GPU here: weights reported on ``cuda:1`` stand for a model on a GPU (the check reads only their device), and
``free_bytes`` is patched to a budget less the held bytes of the layers with state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens import _memory
from spectral_lens._memory import accumulator_bytes, layer_device

D, ROWS, LAYERS = 32, 11, 4


class Movable(nn.Linear):
    """``nn.Linear`` (torch's own forward, so its width is known) whose weights report ``self.reported`` as their
    device while it is set (as on a GPU; this machine has none), else their real one (the CPU)."""

    reported: str | None = None

    def parameters(self, recurse: bool = True):
        if self.reported is None:
            return super().parameters(recurse)
        return iter([SimpleNamespace(device=torch.device(self.reported))] * 2)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[Movable(D, D) for _ in range(LAYERS)]).double()


def _size(acc) -> tuple[int, int, int]:
    return accumulator_bytes(D, acc.precision, ROWS, device_type="cpu", rows_float64=True)


def _budget(monkeypatch, capture, budget: int, calls: list) -> None:
    """``free_bytes``: ``budget`` less the held bytes of the layers with state; each call recorded."""

    def free(device):
        calls.append(device)
        return budget - sum(_size(acc)[0] for acc in capture.accumulators.values() if acc.initialized)

    monkeypatch.setattr(_memory, "free_bytes", free)


def _references(model, x) -> list[torch.Tensor]:
    out, refs = x, []
    with torch.no_grad():
        for layer in model:
            out = layer(out)
            refs.append(torch.linalg.eigvalsh(torch.cov(out.T)).flip(0).clamp_min(0))
    return refs


def test_a_model_moved_after_the_attach_is_checked_where_it_runs(monkeypatch):
    """Attached while its weights are on cuda:1, then moved to the CPU, where the four layers' rows come. One byte
    short of the four: refused at the pass's first rows, nothing measured (before: counted on cuda:1, the layers
    were checked one at a time on the CPU and the fourth refused, three keeping their state). The exact budget
    measures all four with one free-memory read (before: four), equal to float64 references."""
    model = _model()
    for layer in model:
        layer.reported = "cuda:1"
    x = torch.randn(ROWS, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with sl.attach(model, [str(i) for i in range(LAYERS)]) as capture:
        for layer in model:  # model.to("cpu")
            layer.reported = None
        accs = list(capture.accumulators.values())
        need = _memory._peak([_size(acc) for acc in accs])
        calls = []
        _budget(monkeypatch, capture, need - 1, calls)
        with pytest.raises(MemoryError, match=rf"measuring {LAYERS} layer\(s\) \(d={D}, precision='exact'") as e:
            model(x)
        assert "other devices" not in str(e.value)
        assert [acc.initialized for acc in accs] == [False] * LAYERS
        calls.clear()
        _budget(monkeypatch, capture, need, calls)
        model(x)
        assert calls == [torch.device("cpu")]
        spectra = capture.compute()
    for (name, spectrum), ref in zip(spectra.items(), _references(model, x)):
        assert spectrum.n_rows == ROWS
        torch.testing.assert_close(spectrum.values.double(), ref, rtol=1e-6, atol=1e-9 * float(ref[0]))


def test_an_execution_device_without_its_index_is_the_rows_device():
    """``execution_device="cuda"`` (a ``device_map`` or ``cpu_offload`` given "cuda"): its rows come on the current
    GPU, ``cuda:N``, which ``torch.device("cuda")`` does not equal; so it is not known before the rows (before:
    ``torch.device("cuda")``, a device no rows ever arrive on). Indexed ones, the CPU and meta are read as given."""
    def dispatched(device):
        module = nn.Linear(2, 3, device="meta")
        module._hf_hook = SimpleNamespace(execution_device=device)
        return module

    assert layer_device(dispatched("cuda")) is None
    assert layer_device(dispatched(torch.device("cuda"))) is None
    assert layer_device(dispatched("cuda:1")) == torch.device("cuda", 1)
    assert layer_device(dispatched(1)) == torch.device("cuda", 1)
    assert layer_device(dispatched("cpu")) == torch.device("cpu")
    assert layer_device(dispatched("meta")) == torch.device("meta")


def test_fifty_forwards_read_the_free_memory_and_the_devices_once(monkeypatch):
    """Regression guard of the hot path: 50 forwards of growing, padded batches through an attach read the free
    memory once, each layer's device once and the check's switch once per layer (its first rows; and the pass's check), whatever the
    batch (only a layer's first rows are checked: a later, longer batch is not)."""
    model = _model()
    counts = {"free_bytes": 0, "layer_device": 0, "check_enabled": 0}
    for name in counts:
        real = getattr(_memory, name)

        def counted(*args, _real=real, _name=name):
            counts[_name] += 1
            return _real(*args)

        monkeypatch.setattr(_memory, name, counted)
    with sl.attach(model, [str(i) for i in range(LAYERS)]) as capture:
        for i in range(50):
            n = 3 + 5 * i
            mask = torch.arange(n) < max(1, n - i % 4)
            with capture.mask(mask):
                model(torch.randn(n, D, dtype=torch.float64))
        assert counts == {"free_bytes": 1, "layer_device": LAYERS, "check_enabled": LAYERS + 1}
        assert all(acc.initialized for acc in capture.accumulators.values())
