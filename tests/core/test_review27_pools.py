"""Review 27 (pools): the held-out pool the lens measures on, audited as an adversary.

The fixed pool (protocol.md section 1): samplers that draw a random part of their data at every pass
(``RandomSampler(num_samples=)``, ``WeightedRandomSampler(replacement=False)`` with fewer samples than
weights) are refused like the other unfixed pools; a pool with no batches, and a pool whose every
position is masked out, say so instead of blaming a module that did not run; the gradient progress
total counts a ``DataLoader``'s sampler, not its dataset. What holds already is pinned against float64
references of the intended rows: ragged, padded and tuple/dict/tensor batches, the gradient cap in the
middle of a batch, bit-identical repeat measurements (dropout model in train mode, any global RNG
state, ``num_workers`` > 0), and a shuffled pool equal to the fixed one up to rounding only.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (DataLoader, RandomSampler, SubsetRandomSampler, TensorDataset,
                              WeightedRandomSampler)

from spectral_lens import SpectralLens, SpectralLensWarning
from spectral_lens.lens import unfixed_pool

from support.models import TinyLM

GRAD = "grad:h.2.attn.c_proj.weight"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tail window.*")
        yield


def _model(dropout=0.0):
    torch.manual_seed(0)
    return TinyLM(tied=False, dropout=dropout).double().eval()


def _seq(n=12, t=9, seed=0):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def _ds(n=12):
    seq = _seq(n)
    return TensorDataset(seq[:, :-1], seq[:, 1:])


class _Dict(nn.Module):
    """``TinyLM`` called as a Hugging Face model: ``model(input_ids=..., attention_mask=..., extra keys)``."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask=None, **extra):
        return self.m(input_ids)


def _rows(model, inputs, masks=None):
    """float64 reference rows: the deepest block's output at every kept position of each input."""
    seen = []
    handle = model.h[-1].register_forward_hook(lambda mod, args, o: seen.append(o.detach().to(torch.float64)))
    try:
        with torch.no_grad():
            for x in inputs:
                model(x)
    finally:
        handle.remove()
    masks = masks or [None] * len(seen)
    return torch.cat([h.flatten(0, 1) if k is None else h[k.bool()] for h, k in zip(seen, masks)])


def _cov_eigs(rows):
    rows = rows.to(torch.float64)
    centered = rows - rows.mean(0)
    cov = centered.T @ centered / (rows.shape[0] - 1)
    return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)


def _close(got, ref):
    torch.testing.assert_close(got[: ref.numel()], ref, rtol=1e-9, atol=1e-12 * float(ref[0]))


def _hand_grads(model, xs, ys):
    """Squared singular values of G, one row per sequence: its mean next-token loss's gradient (float64)."""
    w = model.h[2].attn.c_proj.weight
    rows = []
    for x, y in zip(xs, ys):
        keep = y != -100
        loss = F.cross_entropy(model(x[None])[0][keep], y[keep], reduction="mean")
        rows.append(torch.autograd.grad(loss, w)[0].flatten())
    return torch.linalg.svdvals(torch.stack(rows)) ** 2


# --------------------------------------------------------------------------- the fixed pool

@pytest.mark.parametrize("sampler, why", [
    (lambda ds: RandomSampler(ds, num_samples=6), "a random 6 of its 12"),
    (lambda ds: RandomSampler(ds, num_samples=15), "1 whole pass.* and a random 3"),
    (lambda ds: WeightedRandomSampler([1.0] * 12, 6, replacement=False), "a random 6 of its 12"),
])
def test_samplers_drawing_a_random_part_of_their_data_are_refused(sampler, why):
    # before: accepted (no replacement, no cap, no drop_last), and each measurement saw another subset
    ds = _ds()
    loader = DataLoader(ds, batch_size=3, sampler=sampler(ds))
    assert unfixed_pool(loader) is not None
    with pytest.raises(ValueError, match=f"pool draws {why}.*fixed held-out pool"):
        SpectralLens(_model(), loader, params=(), progress=False)
    with pytest.raises(ValueError, match=f"gradient_pool draws {why}"):
        SpectralLens(_model(), [ds[:6]], gradient_pool=loader, progress=False)


@pytest.mark.parametrize("sampler", [
    lambda ds: RandomSampler(ds),
    lambda ds: RandomSampler(ds, num_samples=24),  # two whole permutations: every sample twice, every pass
    lambda ds: WeightedRandomSampler([1.0] * 12, 12, replacement=False),  # a permutation of all of them
    lambda ds: SubsetRandomSampler(range(12)),
])
def test_samplers_drawing_whole_passes_are_fixed(sampler):
    ds = _ds()
    assert unfixed_pool(DataLoader(ds, batch_size=3, sampler=sampler(ds))) is None


def test_a_subset_sampler_really_measured_other_rows_at_each_checkpoint():
    """Why it is refused: the same weights, two measurements, two spectra (the sampler draws from the training
    loop's RNG streams, which move between checkpoints)."""
    ds = _ds()
    model = _model()
    loader = DataLoader(ds, batch_size=3, sampler=RandomSampler(ds, num_samples=6))
    lens = SpectralLens(model, [ds[:3]], params=(), progress=False)
    lens.pool = loader  # past the constructor's check, as before the fix
    torch.manual_seed(1)
    a = lens.measure(0, 0).spectra["act:h.2"].values
    torch.manual_seed(2)
    b = lens.measure(1, 0).spectra["act:h.2"].values
    assert not torch.equal(a, b)


def test_a_shuffled_whole_pool_equals_the_fixed_one_up_to_rounding():
    ds, seq = _ds(), _seq()
    model = _model()
    ref = _cov_eigs(_rows(model, [seq[:, :-1]]))
    lens = SpectralLens(model, DataLoader(ds, batch_size=5, shuffle=True), params=(), progress=False)
    torch.manual_seed(1)
    a = lens.measure(0, 0).spectra["act:h.2"].values
    torch.manual_seed(2)
    b = lens.measure(1, 0).spectra["act:h.2"].values
    _close(a, ref)
    _close(b, ref)


def test_repeat_measurements_are_bit_identical_in_any_rng_state_with_dropout_in_train_mode():
    ds, seq = _ds(), _seq()
    model = _model(dropout=0.3).train()  # the lens measures in eval mode: no dropout mask drawn
    lens = SpectralLens(model, DataLoader(ds, batch_size=5), gradient_samples=7, progress=False)
    torch.manual_seed(1)
    a = lens.measure(0, 0)
    torch.manual_seed(2)
    torch.rand(3)
    b = lens.measure(1, 0)
    assert model.training
    for k in a.spectra:
        assert torch.equal(a.spectra[k].values, b.spectra[k].values), k
    model.eval()
    _close(a.spectra["act:h.2"].values, _cov_eigs(_rows(model, [seq[:, :-1]])))
    _close(a.spectra[GRAD].values, _hand_grads(model, seq[:7, :-1], seq[:7, 1:]))


@pytest.mark.parametrize("persistent", [False, True])
def test_worker_processes_give_the_same_bits_as_the_main_process(persistent):
    ds = _ds()
    model = _model()
    one = SpectralLens(model, DataLoader(ds, batch_size=5), progress=False).measure(0, 0)
    lens = SpectralLens(model, DataLoader(ds, batch_size=5, num_workers=2, persistent_workers=persistent),
                        progress=False)
    for step in (0, 1):  # persistent workers: the second measurement reuses them
        two = lens.measure(step, 0)
        for k in one.spectra:
            assert torch.equal(one.spectra[k].values, two.spectra[k].values), k


def test_a_one_shot_generator_is_refused():
    ds = _ds()
    with pytest.raises(TypeError, match="one-shot iterator"):
        SpectralLens(_model(), (b for b in [ds[:6]]), progress=False)
    with pytest.raises(TypeError, match="gradient_pool is a one-shot iterator"):
        SpectralLens(_model(), [ds[:6]], gradient_pool=iter(DataLoader(ds, batch_size=3)), progress=False)


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("pool", [[], DataLoader(TensorDataset(torch.zeros(0, 8, dtype=torch.long)), batch_size=2)],
                         ids=["list", "dataloader"])
def test_an_empty_pool_says_so(pool):
    # before: "h.2: need at least 2 rows, have 0 (no update reached it: the module did not run, ...)"
    lens = SpectralLens(_model(), pool, params=(), progress=False)
    with pytest.raises(ValueError, match="the pool gave no batches"):
        lens.measure(0, 0)


def test_a_pool_masked_out_entirely_blames_the_mask_not_the_module():
    ids = _seq(3, 8)
    lens = SpectralLens(_Dict(_model()), [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}], params=(),
                        progress=False)
    with pytest.raises(ValueError, match=r"have 0 \(1 update\(s\) reached it, every row masked out") as info:
        lens.measure(0, 0)
    assert "did not run" not in str(info.value)


def test_ragged_padded_and_mixed_batches_measure_exactly_the_kept_rows():
    """Batches of different sizes and lengths, a last partial batch, right and left padding, extra keys: the
    rows measured are the unpadded positions, every one once (float64 reference)."""
    base = _model()
    model = _Dict(base)
    a, b, c = _seq(4, 7, 1), _seq(3, 11, 2), _seq(1, 5, 3)
    ma = torch.ones_like(a)
    ma[1, 5:] = 0  # right padding
    ma[3, :2] = 0  # left padding
    mb = torch.ones_like(b)
    mb[0, 3:] = 0
    pool = [{"input_ids": a, "attention_mask": ma, "labels": a, "doc_id": torch.arange(4)},
            {"input_ids": b, "attention_mask": mb},
            {"input_ids": c}]  # no mask: every position
    m = SpectralLens(model, pool, params=(), progress=False).measure(0, 0)
    rows = _rows(base, [a, b, c], [ma, mb, None])
    assert rows.shape[0] == int(ma.sum() + mb.sum() + c.numel()) == m.spectra["act:m.h.2"].n_rows
    _close(m.spectra["act:m.h.2"].values, _cov_eigs(rows))
    # tuples and plain tensors of different lengths: every position
    tup = SpectralLens(base, [(a, a), (b, b), (c, c)], params=(), progress=False).measure(0, 0)
    ten = SpectralLens(base, [a, b, c], params=(), progress=False).measure(0, 0)
    ref = _cov_eigs(_rows(base, [a, b, c]))
    assert tup.spectra["act:h.2"].n_rows == ten.spectra["act:h.2"].n_rows == a.numel() + b.numel() + c.numel()
    _close(tup.spectra["act:h.2"].values, ref)
    assert torch.equal(tup.spectra["act:h.2"].values, ten.spectra["act:h.2"].values)


def test_gradient_samples_cutting_a_batch_takes_its_first_sequences():
    """gradient_samples=5 over dict batches of 3 (ragged lengths, padding, an extra key): the first 5 sequences
    of the pool, in order, each one gradient of its mean loss over its kept targets (float64 reference)."""
    base = _model()
    a, b = _seq(3, 8, 1), _seq(3, 10, 2)
    mb = torch.ones_like(b)
    mb[1, 6:] = 0
    lb = b.masked_fill(mb == 0, -100)
    pool = [{"input_ids": a, "labels": a, "doc_id": torch.arange(3)},
            {"input_ids": b, "attention_mask": mb, "labels": lb, "doc_id": torch.arange(3, 6)}]
    lens = SpectralLens(_Dict(base), pool, params="m.h.2.attn.c_proj.weight", gradient_samples=5, progress=False)
    got = lens.measure(0, 0).spectra["grad:m.h.2.attn.c_proj.weight"]
    assert got.n_rows == 5
    xs = [a[0], a[1], a[2], b[0], b[1]]
    ys = [torch.cat([s[1:], s.new_tensor([-100])]) for s in (a[0], a[1], a[2], lb[0], lb[1])]
    _close(got.values, _hand_grads(base, xs, ys))


def test_a_gradient_pool_smaller_than_gradient_samples_takes_all_of_it():
    model = _model()
    seq = _seq(4)
    m = SpectralLens(model, [(seq[:, :-1], seq[:, 1:])], gradient_samples=512, progress=False).measure(0, 0)
    assert m.spectra[GRAD].n_rows == 4
    _close(m.spectra[GRAD].values, _hand_grads(model, seq[:, :-1], seq[:, 1:]))


def test_gradient_progress_total_counts_the_loaders_sampler():
    # before: the dataset's 12, though the sampler draws 7 (the progress bar's total)
    ds = _ds()
    lens = SpectralLens(pool=DataLoader(ds, batch_size=5, sampler=SubsetRandomSampler(range(7))), progress=False)
    assert lens._gradient_total() == 7
    lens = SpectralLens(pool=DataLoader(ds, batch_size=5, sampler=range(7), drop_last=True), progress=False)
    assert lens._gradient_total() == 5 == sum(x.shape[0] for x, _ in lens.pool)


def test_the_probes_train_mode_draws_dropout_from_the_callers_rng_state():
    """What docs/lens.md says: with train_mode=True the gradient spectrum depends on the global RNG state at
    measure() (dropout masks), the same state giving the same bits."""
    from spectral_lens import PerSampleGradientProbe

    model = _model(dropout=0.3)
    seq = _seq(6)
    lens = SpectralLens(model, [(seq[:, :-1], seq[:, 1:])], layers="h.0", progress=False,
                        probe=PerSampleGradientProbe(params="h.2.attn.c_proj.weight", train_mode=True))
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(lens.measure(0, 0).spectra[GRAD].values)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.slow  # ~5 s: imports transformers
@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_a_failure_mid_pass_on_an_accelerate_offloaded_model_leaves_it_as_dispatched(how, tmp_path):
    """A batch whose mask fails (wrong shape) in the middle of the pool: the measurement raises, every offloaded
    weight is a meta placeholder again with Accelerate's hooks as they were, and the next measurement equals the
    plain model's bit for bit."""
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    pytest.importorskip("accelerate", reason="the hf extra installs accelerate")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "integrations"))
    try:
        from test_accelerate_offload import accelerate_state, dispatched, pool
    finally:
        sys.path.pop(0)
    ref, model = dispatched(how, tmp_path)
    batches = pool(3)
    before = accelerate_state(model)
    bad = batches[:1] + [{**batches[1], "attention_mask": torch.ones(2, 5, dtype=torch.long)}] + batches[2:]
    with pytest.raises(ValueError, match="mask"):
        SpectralLens(model, bad, progress=False, mask_fn=lambda b: b.get("attention_mask", torch.ones(3, 12)).bool(),
                     forward_fn=lambda m, b: m(input_ids=b["input_ids"])).measure(0, 0)
    assert accelerate_state(model) == before
    got = SpectralLens(model, batches, progress=False).measure(0, 0).spectra
    want = SpectralLens(ref, batches, progress=False).measure(0, 0).spectra
    for k in want:
        assert torch.equal(got[k].values, want[k].values), k


# --------------------------------------------------------------------------- a shuffled pool split between ranks

def test_a_shuffled_pool_split_between_ranks_is_refused(monkeypatch):
    """Each rank measures batches i % world == rank of its own pass, shuffled from its own RNG streams: the shares
    overlap and miss samples (tests/core/test_review27_pools.py::test_..._on_two_gloo_ranks measures it).
    The check itself, with the lens's rank count patched to 2 (no collective reached: the refusal comes first)."""
    import spectral_lens.lens as lens_module

    lens = SpectralLens(_model(), DataLoader(_ds(), batch_size=2, shuffle=True), params=(), progress=False)
    monkeypatch.setattr(lens_module, "ranks", lambda group: (0, 2))
    with pytest.raises(ValueError, match=r"RandomSampler \(shuffle=True\).*the 2 ranks measure their shares"):
        lens.measure(0, 0)


def _shuffled_on_each_rank(rank):
    torch.manual_seed(100 + rank)  # rank-seeded training: each rank's shuffle differs
    SpectralLens(_model(), DataLoader(_ds(), batch_size=2, shuffle=True), params=(), progress=False).measure(0, 0)


def _fixed_on_each_rank(rank):
    torch.manual_seed(100 + rank)
    m = SpectralLens(_model(), DataLoader(_ds(), batch_size=2), params=(), progress=False).measure(0, 0)
    return m.spectra["act:h.2"].values.tolist()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_shuffled_pool_on_two_gloo_ranks(tmp_path):
    """Before: accepted, and the two ranks' shares of their own shuffles measured other rows than the pool's
    (the top eigenvalue off by ~0.6 on this pool). Now every rank refuses it; the same pool unshuffled equals
    the float64 reference of the whole pool."""
    from support.ranks import checked_case, run_gloo_cases

    results = run_gloo_cases(tmp_path, {"shuffled": _shuffled_on_each_rank, "fixed": _fixed_on_each_rank}, 2,
                             pg_timeout_s=30, join_s=240.0, preload="torch.distributed")
    for r in checked_case(results, "shuffled", None):
        assert r["error"].startswith("ValueError") and "shuffle=False" in r["error"], r
    ref = _cov_eigs(_rows(_model(), [_seq()[:, :-1]]))
    for r in checked_case(results, "fixed", None):
        assert r["error"] is None, r
        _close(torch.tensor(r["value"], dtype=torch.float64), ref)


def test_an_additive_float_attention_mask_is_refused_not_read_inverted():
    """``attention_mask`` as bool: an additive mask (0 real, -inf padding) gave True at the padding and measured
    exactly the padded positions. Float 1/0 masks are still read."""
    from spectral_lens import attention_mask

    ids = _seq(2, 6)
    ones = torch.ones(2, 6)
    ones[1, 4:] = 0
    assert torch.equal(attention_mask({"input_ids": ids, "attention_mask": ones}), ones.bool())
    additive = (1 - ones) * torch.finfo(torch.float32).min
    with pytest.raises(ValueError, match="values other than 0 and 1.*additive"):
        attention_mask({"input_ids": ids, "attention_mask": additive})
    lens = SpectralLens(_Dict(_model()), [{"input_ids": ids, "attention_mask": additive}], params=(), progress=False)
    with pytest.raises(ValueError, match="additive"):
        lens.measure(0, 0)


class _Growing:
    """A re-iterable whose passes differ in size (a streaming pool, a sampler of its own): no torch sampler to read.
    Each measurement iterates it twice (the activation pass, then the gradient pass)."""

    def __init__(self, seq):
        self.seq, self.passes = seq, 0

    def __iter__(self):
        self.passes += 1
        n = 3 + self.passes
        yield self.seq[:n, :-1], self.seq[:n, 1:]


def test_a_pool_whose_rows_change_between_measurements_is_warned_once():
    lens = SpectralLens(_model(), _Growing(_seq()), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*tail window.*")
        lens.measure(0, 0)
    with pytest.warns(SpectralLensWarning, match=r"act:h.2 has 48 rows at this measurement and had 32 .*1 more spectra"):
        lens.measure(1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*tail window.*")
        lens.measure(2, 0)  # said once per lens
    fixed = SpectralLens(_model(), [(_seq()[:, :-1], _seq()[:, 1:])], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*tail window.*")
        fixed.measure(0, 0)
        fixed.measure(1, 0)


def test_a_single_dict_batch_passed_as_the_pool_is_refused():
    """Before: accepted, and iterating it gave the keys as batches ("cannot call the model on a batch of type str"
    at the first measurement, or a forward_fn of your own handed strings)."""
    from collections import UserDict

    ids = _seq(2, 6)
    for batch in ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, UserDict(input_ids=ids)):
        with pytest.raises(TypeError, match=r"^SpectralLens: pool is a mapping .*\[batch\]"):
            SpectralLens(_Dict(_model()), batch, params=(), progress=False)
        with pytest.raises(TypeError, match=r"gradient_pool is a mapping.*\[batch\]"):
            SpectralLens(_Dict(_model()), [batch], gradient_pool=batch, progress=False)
