"""Review 24 (rev-probe2): adversarial review of the refusals' "other matrices" hint (:func:`other_fast_matrix`).

Under DeepSpeed ZeRO-3 as it leaves the parameters between forwards (each ``.data`` an empty placeholder, the whole
shape in ``ds_shape``: the fake of tests/integrations/test_deepspeed.py), ``other_fast_matrix`` judged "a matrix"
by ``p.ndim >= 2``, so it found none (every placeholder is 1-D) and the refusal of a parameter without a fast path
(an Embedding) dropped the "probe other matrices that have a fast path (such as ...)" remedy, although the
``nn.Linear`` weights measure with ``engine='auto'`` and ``'fast'``. The audit's ZeRO-3 setting keeps ``.data``
whole, so it did not see this. Now the whole shape is judged (``whole_shape``).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens.gradients._engine_choice import other_fast_matrix


def _zero3():
    """``zero3(model)`` of tests/integrations/test_deepspeed.py (loaded from its file)."""
    path = Path(__file__).parents[1] / "integrations" / "test_deepspeed.py"
    spec = importlib.util.spec_from_file_location("review24_revprobe2_deepspeed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.zero3


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.o, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11)

    def forward(self, ids):
        return self.head(torch.tanh(self.o(self.emb(ids))))


KW = {"forward_fn": lambda m, b: m(b), "loss_fn": lambda out, b: out.pow(2).sum((1, 2))}
IDS = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    return _zero3()(_Net().double())


def test_zero3_placeholders_are_matrices_by_their_whole_shape():
    model = _model()
    assert model.o.weight.shape == (0,) and model.o.weight.ds_shape == (6, 6)  # as ZeRO-3 leaves it
    assert other_fast_matrix(model, False, ["emb.weight"]) == "o.weight"
    assert other_fast_matrix(model, False, ["o.weight"]) == "head.weight"


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_a_zero3_refusal_names_another_matrix_that_measures(engine):
    with pytest.raises(ValueError, match="ZeRO stage 3") as info:
        sl.PerSampleGradientProbe(_model(), params="emb.weight", engine=engine, **KW)
    named = re.findall(r"probe other matrices that have a fast path \(such as ([\w.]+);", str(info.value))
    assert named == ["o.weight"], str(info.value)
    for e in ("auto", "fast"):  # the named matrix binds and measures
        probe = sl.PerSampleGradientProbe(_model(), params=named[0], engine=e, **KW)
        probe.update(IDS)
        assert probe.engines_ == {"o.weight": "fast"} and probe.n_samples_ == 3
