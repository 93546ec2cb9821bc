"""Batches that are mappings but not ``dict`` (Hugging Face ``BatchEncoding`` is a ``UserDict``, as
tokenizers and ``DataCollatorForLanguageModeling`` return it) are read as the plain dict of their
items; a dict batch without ``labels`` gets an error that says what to pass."""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe, causal_lm_loss, default_forward
from spectral_lens.gradients._batch import batch_size, map_tensors, slice_batch


class KwargLM(nn.Module):
    """A causal LM called Hugging Face style, ``model(input_ids=..., attention_mask=...)``."""

    def __init__(self, vocab=13, d=8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)
        self.seen: list[set] = []

    def forward(self, input_ids, attention_mask=None):
        self.seen.append({"input_ids"} | ({"attention_mask"} if attention_mask is not None else set()))
        h = torch.tanh(self.proj(self.emb(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head(h)


class DictSubclass(dict):
    """A dict subclass that torch.utils._pytree does not know (it flattens exact registered types only)."""


def _batch(m=5, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 13, (m, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _model(seed=0):
    torch.manual_seed(seed)
    return KwargLM().double().eval()


@pytest.mark.parametrize("wrap", [UserDict, DictSubclass])
def test_batch_helpers_read_a_mapping_as_its_dict(wrap):
    plain = _batch()
    batch = wrap(plain)
    assert batch_size(batch) == 5
    sliced = slice_batch(batch, 1, 3)
    assert type(sliced) is dict and set(sliced) == set(plain)
    assert all(torch.equal(sliced[k], plain[k][1:3]) for k in plain)
    assert type(map_tensors(torch.clone, batch)) is dict
    model = _model()
    torch.testing.assert_close(default_forward(model, batch), model(plain["input_ids"], plain["attention_mask"]))
    assert model.seen[0] == {"input_ids", "attention_mask"}  # labels are not passed to the model
    loss = causal_lm_loss(model(plain["input_ids"], plain["attention_mask"]), batch)
    torch.testing.assert_close(loss, causal_lm_loss(model(plain["input_ids"], plain["attention_mask"]), plain))


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
@pytest.mark.parametrize("wrap", [UserDict, DictSubclass])
def test_probe_takes_a_mapping_batch_as_the_dict(engine, wrap):
    plain = _batch()
    model = _model()
    ref = PerSampleGradientProbe(model, "proj.weight", engine=engine, keep_matrix=True, chunk_size=2).update(plain)
    got = PerSampleGradientProbe(model, "proj.weight", engine=engine, keep_matrix=True, chunk_size=2)
    got.update(wrap(plain))
    assert got.n_samples_ == 5
    torch.testing.assert_close(got.matrix(), ref.matrix(), rtol=0, atol=0)
    torch.testing.assert_close(got.losses_, ref.losses_, rtol=0, atol=0)


def test_probe_takes_a_hugging_face_batch_encoding():
    transformers = pytest.importorskip("transformers")
    plain = _batch()
    enc = transformers.BatchEncoding(dict(plain))
    assert not isinstance(enc, dict)
    model = _model()
    ref = PerSampleGradientProbe(model, "proj.weight", keep_matrix=True).update(plain)
    got = PerSampleGradientProbe(model, "proj.weight", keep_matrix=True).update(enc)
    torch.testing.assert_close(got.matrix(), ref.matrix(), rtol=0, atol=0)


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
@pytest.mark.parametrize("wrap", [dict, UserDict])
def test_dict_batch_without_labels_names_the_key_and_the_remedy(engine, wrap):
    batch = _batch()
    del batch["labels"]
    probe = PerSampleGradientProbe(_model(), "proj.weight", engine=engine)
    with pytest.raises(ValueError, match=r"keys \['attention_mask', 'input_ids'\]\) has no 'labels'") as err:
        probe.update(wrap(batch))
    for remedy in ("input_ids", "-100", "(input_ids, targets)", "loss_fn="):
        assert remedy in str(err.value)
    assert probe.n_samples_ == 0
    # a loss_fn that needs no labels is the other way out
    own = PerSampleGradientProbe(_model(), "proj.weight", engine=engine, loss_fn=lambda out, b: out.pow(2).mean((1, 2)))
    assert own.update(batch).n_samples_ == 5
