"""Review of the each-entry-must-match selector change (session 26): tied parameter aliases, a looped (weight-
shared) stack under ``layers="all"``, duplicates and overlapping entries, the wrappers' short names, and an error
that leaves nothing bound."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import spectral_lens as sl
from spectral_lens.capture import select_modules
from spectral_lens.weights import select_parameters, weight_spectra


class _Tied(nn.Module):
    """An embedding and an output head sharing one matrix (GPT-2's ``lm_head.weight is transformer.wte.weight``)."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.block = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, x):
        return self.lm_head(torch.relu(self.block(self.wte(x))))


class _Looped(nn.Module):
    """One block object registered three times in the stack (a looped transformer, ALBERT)."""

    def __init__(self):
        super().__init__()
        block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.blocks = nn.ModuleList([block, block, block])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize("select", ["lm_head.weight", ["block.weight", "lm_head.weight"]])
def test_a_tied_parameter_alias_is_named_as_such(select):
    """``lm_head.weight`` is the embedding's tensor again: ``named_parameters()`` lists it once, so the entry
    matched nothing and the error listed the other matrices with no word of the tie (a list holding it, dropped
    silently before, now fails the same way). The error names the tie and the name to select."""
    model = _Tied()
    with pytest.raises(ValueError, match=r"'lm_head\.weight' is the parameter 'wte\.weight' again \(tied weights"):
        weight_spectra(model, select)
    got = select_parameters(model, ["block.weight", "wte.weight"])
    assert [n for n, _ in got] == ["wte.weight", "block.weight"] and got[0][1] is model.lm_head.weight


def test_all_on_a_looped_stack_measures_the_shared_block_once():
    """``layers="all"``: the lens's own list of the stack named the shared block's second and third names, which
    match no module now that each entry must match (the error told the user to drop names they never typed);
    before the change the shared block was measured once under its first name, over all its calls. It still is."""
    torch.manual_seed(0)
    model = _Looped().double()
    pool = [torch.randn(8, 4, dtype=torch.float64)]
    lens = sl.SpectralLens(model, pool, layers="all", params=(), forward_fn=lambda m, b: m(b), progress=False, tail_window=(1, 3))
    assert lens.layers == ["blocks.0"]
    m = lens.measure(0, 0)
    assert set(m.spectra) == {"act:blocks.0"}
    rows, x = [], pool[0]
    for _ in range(3):
        x = model.blocks[0](x)
        rows.append(x.detach())
    ref = np.linalg.eigvalsh(np.cov(torch.cat(rows).numpy(), rowvar=False, bias=False))[::-1]
    assert m.spectra["act:blocks.0"].n_rows == 3 * 8
    vals = np.asarray(m.spectra["act:blocks.0"].values, dtype=np.float64)
    np.testing.assert_allclose(vals[: len(ref)], ref[: len(vals)], rtol=1e-8, atol=1e-12)
    # naming the second name itself is still refused, with the alias named
    with pytest.raises(ValueError, match="'blocks.1' is the module 'blocks.0' again"):
        sl.SpectralLens(model, pool, layers=["blocks.0", "blocks.1"], params=(), forward_fn=lambda m, b: m(b),
                        progress=False)


def test_duplicate_and_overlapping_entries_select_each_module_once():
    """Two entries matching the same module (a duplicate, a glob covering a name, a module object and its name)
    both count as matched and the module is selected, hooked and measured once."""
    torch.manual_seed(0)
    model = _Looped()
    model.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)])
    for target in (["blocks.1", "blocks.1"], ["blocks.*", "blocks.1"], ["blocks.1", model.blocks[1]]):
        names = [n for n, _ in select_modules(model, target)]
        assert len(names) == len(set(names)) and "blocks.1" in names
    cap = sl.attach(model, ["blocks.*", "blocks.1", "blocks.1"])
    assert sum(len(m._forward_hooks) for m in model.modules()) == 3
    model(torch.randn(5, 4))
    assert all(a.n_rows == 5 for a in cap.accumulators.values())
    cap.remove()
    assert [n for n, _ in select_parameters(model, ["blocks.*.0.weight", "blocks.1.0.weight"])] == [
        f"blocks.{i}.0.weight" for i in range(3)]


def test_a_refused_list_binds_nothing_and_a_corrected_lens_attaches():
    """The error names the missing entry, the model class and the closest names; no hook, the lens unbound."""
    model = _Looped()
    pool = [torch.randn(4, 4)]
    lens = sl.SpectralLens(pool=pool, layers=["head", "blokcs.2"], params=(), forward_fn=lambda m, b: m(b),
                           progress=False, tail_window=(1, 3))
    with pytest.raises(ValueError, match=r"_Looped: entry 'blokcs.2' of target .* closest names: \[.*'blocks"):
        lens.attach(model)
    assert lens.model is None and sum(len(m._forward_hooks) for m in model.modules()) == 0
    fixed = sl.SpectralLens(pool=pool, layers=["head", "blocks.0"], params=(), forward_fn=lambda m, b: m(b),
                            progress=False, tail_window=(1, 3))
    with fixed.attach(model):
        assert set(fixed.measure(0, 0).spectra) == {"act:head", "act:blocks.0"}
