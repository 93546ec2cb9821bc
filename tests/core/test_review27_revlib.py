"""Review 27 (revlib): adversarial review of the lib merge (638e791) on names and wrappers.

* A name typed with wrapper segments that is a module or parameter of the model as typed selects that one (as the
  probe's ``params=`` does since 9447cd7): the stripped form is tried besides it only for globs and for names that
  are nothing in the model. Before: ``sl.attach(model, "a._orig_mod")`` on a module of the user's own holding a child
  called ``_orig_mod`` measured the parent (another width, other rows), and ``"h.0._orig_mod"`` of a compiled block
  hooked the compile wrapper ``h.0`` instead of the block it names.
* The probe's ``params=`` error names the parameter as typed (before: without its wrapper segments).
* A lookup of a capture by a module's own name (the keys before review 27) is a ``KeyError`` naming the key it has now.
* The heap scan for FSDP1's original shapes reads them from flat parameters only (an object of the user's own with
  ``_params`` / ``_shapes`` attributes over the same parameters is not one).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens.capture import select_modules
from spectral_lens.weights import select_parameters, weight_spectra

from support.wrapped import net


def _cov_eigs(rows: torch.Tensor) -> np.ndarray:
    """float64 reference: eigenvalues of the covariance of ``rows`` (descending)."""
    x = rows.detach().double().reshape(-1, rows.shape[-1]).numpy()
    return np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=False))[::-1], 0, None)


class Holder(nn.Module):
    """A module of the user's own whose child is really called ``_orig_mod`` (not a compile wrapper)."""

    def __init__(self):
        super().__init__()
        self._orig_mod, self.proj = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.proj(torch.tanh(self._orig_mod(x)))


class WithHolder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = Holder().double()

    def forward(self, x):
        return self.a(x)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.h = nn.ModuleList([nn.Sequential(nn.Linear(5, 5)), nn.Sequential(nn.Linear(5, 5))]).double()

    def forward(self, x):
        for b in self.h:
            x = torch.tanh(b(x))
        return x


# ---------------------------------------------------------------- a name that is a module selects that module

def test_a_typed_name_that_is_a_module_measures_that_module_not_the_one_its_stripped_name_has():
    model = WithHolder()
    x = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert [n for n, _ in select_modules(model, "a._orig_mod")] == ["a._orig_mod"]  # before: ["a"], the Holder
    with sl.attach(model, "a._orig_mod", precision="float64") as capture:
        model(x)
    (acc,) = capture.accumulators.values()
    assert acc.name == "a._orig_mod"
    # the Linear's rows (width 3), against float64; before: the Holder's output (width 2)
    np.testing.assert_allclose(acc.compute().values.numpy(), _cov_eigs(model.a._orig_mod(x)), rtol=1e-10, atol=1e-13)
    one = sl.ActivationCovarianceAccumulator(precision="float64")
    with one.attach(model, "a._orig_mod"):
        model(x)
    assert one.name == "a._orig_mod" and one.compute().values.shape == (3,)


def test_a_typed_name_of_a_block_inside_its_compile_wrapper_selects_the_block_as_before():
    model = Stack()
    model.h[0] = torch.compile(model.h[0])
    assert [n for n, _ in select_modules(model, "h.0._orig_mod")] == ["h.0._orig_mod"]  # before: ["h.0"], the wrapper
    assert [n for n, _ in select_modules(model, "h.0")] == ["h.0"]  # the eager name: the wrapper, as documented
    # globs of wrapper segments keep the merge's meaning (the eager names too: every block)
    assert [n for n, _ in select_modules(model, "h.*._orig_mod")] == ["h.0", "h.1"]
    plain = Stack()
    assert [n for n, _ in select_modules(plain, "h.1._orig_mod")] == ["h.1"]  # nothing as typed: the stripped name


def test_a_typed_parameter_name_that_is_a_parameter_selects_that_one_only():
    class Holds(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(2, 3, dtype=torch.float64))
            self._orig_mod = nn.Linear(4, 3).double()

    model = nn.Module()
    model.a = Holds()
    got = select_parameters(model, "a._orig_mod.weight")
    assert [tuple(p.shape) for _, p in got] == [(3, 4)]  # before: the Holds' own (2, 3) weight too
    assert [tuple(p.shape) for _, p in select_parameters(model, ["a._orig_mod.weight"])] == [(3, 4)]
    # a compiled model's printed name given to the plain model still selects the plain parameter
    (name, p), = select_parameters(net(), "_orig_mod.b.weight")
    assert name == "b.weight" and tuple(p.shape) == (4, 5)


def test_the_probes_error_names_the_parameter_as_typed():
    for typed in ("_orig_mod.h.7.0.weight", "_orig_mod.h.*.9.weight"):
        with pytest.raises(ValueError) as info:
            sl.PerSampleGradientProbe(Stack(), params=typed)
        assert f"no parameter {typed!r}" in str(info.value), info.value  # before: without "_orig_mod."
        assert "h.1.0.weight" in str(info.value)  # the closest names still shown


# ---------------------------------------------------------------- an old key says the new one

def test_a_lookup_by_the_modules_own_name_names_the_key_it_has_now():
    model = Stack()
    model.h[1] = torch.compile(model.h[1], backend="eager")  # no C++ compiler needed
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with sl.attach(model, ["h.0.0", "h.1.0"], precision="float64") as capture:
        model(x)
    assert list(capture.accumulators) == ["h.0.0", "h.1.0"]
    assert capture.accumulators["h.1.0"].name == "h.1._orig_mod.0"
    spectra = capture.compute()
    for mapping in (capture.accumulators, spectra):
        with pytest.raises(KeyError) as info:
            mapping["h.1._orig_mod.0"]  # the key before review 27
        msg = str(info.value)
        assert "'h.1._orig_mod.0'" in msg and "now keyed 'h.1.0'" in msg and "docs/guide-attach.md" in msg, msg
        with pytest.raises(KeyError) as info:
            mapping["h.7"]  # any other missing key: the keys there are
        assert "['h.0.0', 'h.1.0']" in str(info.value), info.value
    assert spectra == {k: v for k, v in spectra.items()} and "h.1._orig_mod.0" not in spectra
    assert spectra.get("h.1._orig_mod.0") is None  # get, in: plain dict behaviour
    want = _cov_eigs(model.h[1]._orig_mod[0](torch.tanh(model.h[0](x))))
    np.testing.assert_allclose(spectra["h.1.0"].values.numpy(), want, rtol=1e-10, atol=1e-13)
    future = capture.compute_async().result()
    with pytest.raises(KeyError, match="now keyed 'h.1.0'"):
        future["h.1._orig_mod.0"]
    acc = sl.ActivationCovarianceAccumulator()
    with acc.attach(model, "h.1.0") as one, pytest.raises(KeyError, match="now keyed 'h.1.0'"):
        one.accumulators["h.1._orig_mod.0"]


# ---------------------------------------------------------------- FSDP1's original shapes: flat parameters only

def test_the_heap_scan_reads_original_shapes_from_flat_parameters_only():
    """Stand-in for the module inside an FSDP1 wrapper (use_orig_params=True, sharded): its matrix is a 1-D view of
    this rank's shard and the flat parameter is out of reach. An object of the user's own that records the same
    parameters and their (1-D) shapes in ``_params`` / ``_shapes`` must not be taken for the flat parameter."""
    from spectral_lens.weights import _fsdp1_original_shapes

    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(4, dtype=torch.float64))  # this rank's part of a (2, 4) matrix
    model.w._fsdp_flattened = True

    class Tracker:  # e.g. an optimizer wrapper of the user's own
        def __init__(self, params):
            self._params, self._shapes = list(params), [p.shape for p in params]

    tracker = Tracker([model.w])
    vars(tracker)  # its attribute dict materialized, as any vars()/copy/__dict__ access does
    gc.collect()  # the tracker among the old objects: the heap scan finds it after the flat parameter
    flat = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    flat._is_flat_param, flat._params, flat._shapes = True, [model.w], (torch.Size([2, 4]),)
    assert _fsdp1_original_shapes([model.w]) == {id(model.w): (2, 4)}  # before: (4,), the tracker's
    with pytest.raises(ValueError, match=r"as views of this rank's shard.*\['w'\]"):  # before: "no matrix parameter"
        weight_spectra(model)
    del tracker, flat
