"""The activation measurement's memory check with layers of different widths (``spectral_lens._memory``):
widths known before the rows (``dim=``, torch layers' own widths), a second check at the first rows of a layer
whose width was not the one counted, two captures starting in one forward, and the environment variable that
turns the check off.

The device is simulated: a budget of bytes, less the state the accumulators with state hold (as the estimate
counts it), is what ``free_bytes`` reports, so a pass that fits the budget exactly is measured and one byte less
is refused, wherever in the pass the refusal has to come."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens import _memory
from spectral_lens._memory import accumulator_bytes, output_width

IN, BATCH, T = 16, 3, 5
ROWS = BATCH * T  # rows per update of every layer


class Stack(nn.Module):
    """Linear layers of the given output widths, one after the other (float64)."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip([IN, *widths], widths))
        self.double()

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _sizes(widths: list[int]) -> list[tuple[int, int, int]]:
    return [accumulator_bytes(d, "exact", ROWS, device_type="cpu", rows_float64=True) for d in widths]


def _peak(widths: list[int]) -> int:
    return _memory._peak(_sizes(widths))


def _device(monkeypatch, budget: int, *captures) -> None:
    """``free_bytes``: ``budget`` less the held bytes of the captures' accumulators that have state."""

    def free(device):
        held = [accumulator_bytes(acc.dim, acc.precision, ROWS, device_type="cpu", rows_float64=True)[0]
                for capture in captures for acc in capture.accumulators.values() if acc.initialized]
        return budget - sum(held)

    monkeypatch.setattr(_memory, "free_bytes", free)


def _x() -> torch.Tensor:
    return torch.randn(BATCH, T, IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _reference(model: Stack, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 eigenvalues of each layer's output covariance."""
    out, ref = x, {}
    for i, layer in enumerate(model.layers):
        y = layer(out).detach()
        ref[f"layers.{i}"] = torch.linalg.eigvalsh(torch.cov(y.reshape(-1, y.shape[-1]).T)).flip(0).clamp_min(0)
        out = torch.tanh(y)
    return ref


def _measured_all(capture, model, x) -> None:
    ref = _reference(model, x)
    for name, spectrum in capture.compute().items():
        assert spectrum.n_rows == ROWS
        torch.testing.assert_close(spectrum.values.double(), ref[name], rtol=1e-5, atol=1e-6 * float(ref[name][0]))


def test_known_widths_a_wide_layer_first_is_no_false_refusal(monkeypatch):
    """An MLP's up-projection (4x wide) before narrower layers: every width is an nn.Linear's out_features. The
    check counted every layer at the first rows' width (5 x 128: a false refusal of a pass that fits); now it
    counts each at its own, so the exact budget measures and one byte less is refused before any state."""
    widths = [128, 32, 32, 32, 32]
    model, x = Stack(widths), _x()
    with sl.attach(model, "layers.*") as capture:
        _device(monkeypatch, _peak(widths) - 1, capture)
        with pytest.raises(MemoryError, match=r"5 layer\(s\) \(widths d=32\.\.128") as e:
            model(x)
        assert "nothing was measured" in str(e.value) and "not known before" not in str(e.value)
        assert not any(acc.initialized for acc in capture.accumulators.values())
        _device(monkeypatch, _peak(widths), capture)
        model(x)
    _measured_all(capture, model, x)


def test_known_widths_a_narrow_layer_first_is_refused_before_any_state(monkeypatch):
    """A narrow first layer (an MoE router's outputs, d = n_experts) before wide ones: the check counted every
    layer at d = 8 and let a pass through that does not fit (an out-of-memory error part-way). Now the Linear
    layers' widths are counted, and it is refused at the first rows."""
    widths = [8, 128, 128, 128]
    model, x = Stack(widths), _x()
    assert _peak([8] * 4) < _peak(widths) - 1
    with sl.attach(model, "layers.*") as capture:
        _device(monkeypatch, _peak(widths) - 1, capture)
        with pytest.raises(MemoryError, match=r"4 layer\(s\) \(widths d=8\.\.128.*nothing was measured"):
            model(x)
        assert not any(acc.initialized for acc in capture.accumulators.values())
        _device(monkeypatch, _peak(widths), capture)
        model(x)
    _measured_all(capture, model, x)


def test_unknown_widths_are_checked_again_at_their_first_rows(monkeypatch):
    """Widths unknown before the rows (a pick= can choose any tensor): the pass's first check counts them at the
    first rows' d = 8; each wider layer's first rows check again, with the state held by then out of the free
    memory and not counted twice, the layers still to come at the width counted for them so far. The exact
    budget measures every layer; one byte less is refused at 'layers.3', the first layer at whose rows the
    pass's real need is known, before its state, naming it and its width (it was an out-of-memory error
    part-way)."""
    widths = [8, 128, 128, 128]
    model, x = Stack(widths), _x()
    with sl.attach(model, "layers.*", pick=lambda out: out) as capture:
        _device(monkeypatch, _peak(widths) - 1, capture)
        with pytest.raises(MemoryError) as e:
            model(x)
        msg = str(e.value)
        for part in ("layer 'layers.3' got its first rows, of width d=128", "counted at d=8",
                     "after 3 of its capture's 4 layers", "The 1 layer(s) of this capture without state yet (d=128)",
                     "got no rows from this forward", "SPECTRAL_LENS_MEMORY_CHECK=0"):
            assert part in msg, (part, msg)
        assert [acc.initialized for acc in capture.accumulators.values()] == [True, True, True, False]
    with sl.attach(model, "layers.*", pick=lambda out: out) as capture:
        _device(monkeypatch, _peak(widths), capture)
        model(x)
    _measured_all(capture, model, x)


class Wrapped(nn.Module):
    """A block-like module: its output width is not an attribute of its own."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.inner = nn.Linear(a, b)

    def forward(self, x):
        return torch.tanh(self.inner(x))


class UpThenBlocks(nn.Module):
    """An up-projection (an nn.Linear, 128 wide) run first, then blocks of width 32 whose widths are not known."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(IN, 128)
        self.blocks = nn.ModuleList([Wrapped(128, 32), Wrapped(32, 32), Wrapped(32, 32), Wrapped(32, 32)])
        self.double()

    def forward(self, x):
        x = torch.tanh(self.up(x))
        for block in self.blocks:
            x = block(x)
        return x


def test_unknown_widths_after_a_known_wide_layer_are_counted_at_their_own_rows(monkeypatch):
    """The up-projection's rows come first (d = 128, known: an nn.Linear); the blocks' widths are not known before
    their rows. They were counted at 128 (5 x 128: a false refusal of a pass that fits); now they are counted at
    the first block's rows, at its d = 32: the exact budget measures all, one byte less is refused there, with
    only the up-projection's state held, naming the block."""
    model, x = UpThenBlocks(), _x()
    real = [128, 32, 32, 32, 32]
    with sl.attach(model, ["up", "blocks.*"]) as capture:
        _device(monkeypatch, _peak(real) - 1, capture)
        with pytest.raises(MemoryError) as e:
            model(x)
        msg = str(e.value)
        for part in ("layer 'blocks.0' got its first rows, of width d=32", "after 1 of its capture's 5 layers",
                     "not counted yet (its width was not known before its rows)",
                     "still to come are counted at its d=32",
                     "The 4 layer(s) of this capture without state yet (d=32)"):
            assert part in msg, (part, msg)
        assert [acc.initialized for acc in capture.accumulators.values()] == [True, False, False, False, False]
        capture.reset()
        _device(monkeypatch, _peak(real), capture)
        model(x)
    assert [acc.dim for acc in capture.accumulators.values()] == real
    assert all(acc.n_rows == ROWS for acc in capture.accumulators.values())


def test_an_output_changed_by_an_earlier_hook_is_checked_at_its_rows(monkeypatch):
    """A Linear's width is its out_features unless a forward hook registered before the attach's returns
    another output: the layer's first rows are checked again at their real width."""
    widths = [32, 32, 32, 32]
    model, x = Stack(widths), _x()
    handle = model.layers[3].register_forward_hook(lambda m, a, out: torch.cat([out, out], -1))
    try:
        real = [32, 32, 32, 64]
        assert _peak(widths) < _peak(real) - 1
        with sl.attach(model, "layers.*") as capture:
            _device(monkeypatch, _peak(real) - 1, capture)
            with pytest.raises(MemoryError, match=r"'layers\.3' got its first rows, of width d=64.*counted at d=32"):
                model(x)
            _device(monkeypatch, _peak(real), capture)
            capture.reset()
            model(x)
        assert [acc.dim for acc in capture.accumulators.values()] == real
    finally:
        handle.remove()


def test_two_captures_starting_in_one_forward_are_counted_together(monkeypatch):
    """Two attaches on the same layers, first rows in the same forward: each was checked alone, the second
    after the first's first layer took its state, so together they passed a budget that holds one and a bit.
    Now the second counts the first's layers that hold no state yet; the exact budget for both measures."""
    widths = [32, 32, 32, 32]
    model, x = Stack(widths), _x()
    both = _memory._peak(_sizes(widths) * 2)
    with sl.attach(model, "layers.*") as first, sl.attach(model, "layers.*") as second:
        _device(monkeypatch, both - 1, first, second)
        with pytest.raises(MemoryError, match=r"3 layer\(s\) of other captures on that device that hold no state"):
            model(x)
        assert not any(acc.initialized for acc in second.accumulators.values())
        first.reset()
        _device(monkeypatch, both, first, second)
        model(x)
    _measured_all(first, model, x)
    _measured_all(second, model, x)


def test_a_removed_capture_claims_nothing(monkeypatch):
    """A capture whose pass began (its first layer has state, the others are still to come) claims their memory
    while its hooks are on; removed, it claims none, and the other capture's pass fits."""
    widths = [32, 32, 32, 32]
    model, x = Stack(widths), _x()
    one = _sizes(widths)[0]
    first = sl.attach(model, "layers.*")
    second = None
    try:
        budget = one[0] + _peak(widths)  # the first's one layer with state, and the second's pass
        _device(monkeypatch, budget, first)
        model.layers[0](x)  # only the first layer runs: the first capture's pass begins
        second = sl.attach(model, "layers.*")
        _device(monkeypatch, budget, first, second)
        assert [acc.initialized for acc in first.accumulators.values()] == [True, False, False, False]
        with pytest.raises(MemoryError, match="other captures"):
            model(x)
        first.remove()
        model(x)
        assert all(acc.n_rows == ROWS for acc in second.accumulators.values())
    finally:
        first.remove()
        if second is not None:
            second.remove()


def test_the_environment_variable_turns_the_check_off(monkeypatch):
    """The way around a refusal the user knows to be wrong: SPECTRAL_LENS_MEMORY_CHECK=0, named in every
    refusal. Another value than 0 or 1 is an error naming the variable, not a silent check or none."""
    widths = [32, 32]
    model, x = Stack(widths), _x()
    monkeypatch.setattr(_memory, "free_bytes", lambda device: 1000)
    with sl.attach(model, "layers.*", pick=lambda out: out) as capture:
        with pytest.raises(MemoryError) as e:
            model(x)
        msg = str(e.value)
        assert "SPECTRAL_LENS_MEMORY_CHECK=0" in msg and "was taken as the first rows' d=32" in msg, msg
        monkeypatch.setenv("SPECTRAL_LENS_MEMORY_CHECK", "0")
        model(x)
        assert all(acc.n_rows == ROWS for acc in capture.accumulators.values())
        monkeypatch.setenv("SPECTRAL_LENS_MEMORY_CHECK", "off")
        capture.reset()
        with pytest.raises(ValueError, match="SPECTRAL_LENS_MEMORY_CHECK='off' must be 0"):
            model(x)
    assert all(acc.n_rows == 0 for acc in capture.accumulators.values())


def test_output_width_only_where_certain():
    class OwnForward(nn.Linear):
        def forward(self, x):
            return super().forward(x)[..., :2]

    assert output_width(nn.Linear(3, 5), None) == 5
    assert output_width(nn.LazyLinear(6), None) == 6
    assert output_width(nn.Bilinear(2, 3, 4), None) == 4
    assert output_width(nn.Embedding(10, 7), None) == 7
    assert output_width(nn.EmbeddingBag(10, 7), None) == 7
    assert output_width(nn.LayerNorm([4, 6]), None) == 6
    if hasattr(nn, "RMSNorm"):
        assert output_width(nn.RMSNorm(9), None) == 9
    assert output_width(nn.Linear(3, 5), lambda out: out) is None  # a pick can choose any tensor
    assert output_width(OwnForward(3, 5), None) is None
    assert output_width(nn.Sequential(nn.Linear(3, 5)), None) is None
    assert output_width(nn.GELU(), None) is None


def test_a_lens_refused_at_a_layers_first_rows_leaves_nothing_behind(monkeypatch):
    """A lens over an up-projection (an nn.Linear, 4 d) and blocks (widths not known before their rows): the
    blocks are counted at the first block's rows. One byte short, the lens's pass is refused there with a
    MemoryError, the model keeps no hook, the lens no record; with the exact budget it measures every layer."""
    from support.models import TinyLM, lm_pool

    from spectral_lens import SpectralLens, activation_capture

    made = []

    class Recorded(activation_capture.ActivationCovarianceAccumulator):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    def device(budget):
        made.clear()
        monkeypatch.setattr(_memory, "free_bytes", lambda dev: budget - sum(
            accumulator_bytes(a.dim, a.precision, rows, device_type="cpu", rows_float64=True)[0]
            for a in made if a.initialized))

    monkeypatch.setattr(activation_capture, "ActivationCovarianceAccumulator", Recorded)
    torch.manual_seed(0)
    model, pool = TinyLM(layers=3).double(), lm_pool()
    rows = pool[0][0].numel()
    layers = ["h.0.mlp.c_fc", "h.0", "h.1", "h.2"]
    real = _memory._peak([accumulator_bytes(d, "exact", rows, device_type="cpu", rows_float64=True)
                          for d in (128, 32, 32, 32)])
    lens = SpectralLens(model, pool, layers=layers, params=())
    device(real - 1)
    with pytest.raises(MemoryError, match=r"layer 'h\.0' got its first rows, of width d=32"):
        lens.measure(0, 0)
    assert all(len(m._forward_hooks) == 0 for m in model.modules()) and lens.history == []
    device(real)
    record = lens.measure(0, 0)
    assert {k: s.dim for k, s in record.spectra.items()} == {
        "act:h.0.mlp.c_fc": 128, "act:h.0": 32, "act:h.1": 32, "act:h.2": 32}
