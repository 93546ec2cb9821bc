"""Review of the FSDP, PEFT and float16 loss-scaling changes: the cases that broke.

1. FSDP2 ``reshard_after_forward=<int>`` (reshard to a smaller group after forward, 4 gloo CPU ranks,
   int 2): the lens's no-grad forward left each module in FSDP's post-forward state, whose registered
   parameters are new ``DTensor``s (the post-forward shards), not the sharded parameters the optimizer
   holds. ``kept_sharded`` took any ``DTensor`` for "sharded" and did not reshard, so with a measurement
   between ``backward`` and ``optimizer.step()`` the next forward all-gathered the stale post-forward
   shards: the weights from before the step (training diverged from the unmeasured run).
2. float16 loss scaling: an all-zero gradient (a sample whose every label is ignored, or a chunk of
   them) searched upward to the 2^40 bound and carried that scale to the next sample or chunk, which then
   overflowed and searched back down: 19 backward passes for 6 samples on the loop engine and the fast
   engine in 1-sample chunks (4 for the 3 samples with a gradient alone; 13 now).
Also: FSDP pools of different lengths (a timeout, now a ValueError before any forward), float16 losses
(a RuntimeError converting the seed), the overflowing scale not carried (5-6 backwards per later chunk),
and float32 LoRA factors in a float16 model (not scaled: rows all zero). Each test says what it was.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spectral_lens import SpectralLens
from spectral_lens.gradients import PerSampleGradientProbe

from support.models import TinyGPT, TinyLM, lm_pool
from support.ranks import checked_case, run_gloo_cases

PARAM = "transformer.h.1.attn.c_proj.weight"


# ---------------------------------------------------------------- 1. FSDP2 reshard_after_forward=int
def _fsdp2_int(dropout=0.0):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12, dropout=dropout).double()
    for block in model.transformer.h:
        fully_shard(block, reshard_after_forward=2)  # 4 ranks: reshard to groups of 2 after forward
    fully_shard(model, reshard_after_forward=2)
    return model


def _train_int(measure: bool):
    import torch.distributed as dist

    model = _fsdp2_int()
    model.train()
    registered = list(model.parameters())  # the sharded DTensors the optimizer updates
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    # activations only: a gradient protocol after the forwards ends in FSDP's post-backward reshard,
    # which hid the stale post-forward shards (checked: with params=PARAM the old code passed)
    lens = SpectralLens(model, lm_pool(2, batch=4, t=12, vocab=37, seed=1), params=(), precision="float64",
                        progress=False)
    losses, same = [], True
    for step, (x, y) in enumerate(lm_pool(3, batch=4, t=12, vocab=37, seed=2 + dist.get_rank()), start=1):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if measure:  # between backward and step, where gradient clipping goes
            lens.measure(step, step)
            same = same and all(a is b for a, b in zip(model.parameters(), registered))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, same


def _reshard_int(rank):
    plain, _ = _train_int(False)
    measured, same = _train_int(True)
    return {"losses_equal": plain == measured, "same_params": same}


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_reshard_after_forward_int_is_resharded(tmp_path):
    """The lens's forwards leave the sharded parameters registered (the optimizer's), and three SGD
    steps with a measurement between backward and step give the same losses as without (before: the
    post-forward DTensors stayed registered and the next forward used the weights from before the
    step)."""
    results = run_gloo_cases(tmp_path, {"reshard_int": _reshard_int}, 4, pg_timeout_s=30, join_s=300,
                             preload="torch.distributed.fsdp")
    for r in checked_case(results, "reshard_int", None):
        assert r["error"] is None, r["error"]
        assert r["value"] == {"losses_equal": True, "same_params": True}, r["value"]


def _fsdp2_pools_of_different_lengths(rank):
    """Rank 0's pool has 3 batches, rank 1's 2 (the docs require the same whole pool)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12).double()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    SpectralLens(model, lm_pool(3 - rank, batch=4, t=12, vocab=37, seed=1), params=(), progress=False).measure(1, 1)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_pools_of_different_lengths_are_refused_before_any_forward(tmp_path):
    """Under FSDP every forward all-gathers, so pools of different lengths left rank 0 in its second
    forward's all-gather while rank 1 went on to the lens's agreement: the process-group timeout (15 s
    here; 30 min by default), then gloo's error on both ranks. A pool with a length is now compared
    before any forward: the same ValueError as without FSDP, on every rank, at once, the ranks in step."""
    results = run_gloo_cases(tmp_path, {"lengths": _fsdp2_pools_of_different_lengths}, 2, pg_timeout_s=15,
                             join_s=240, preload="torch.distributed.fsdp")
    for r in checked_case(results, "lengths", 10.0):
        assert r["error"].startswith("ValueError: SpectralLens: the ranks' pools gave different numbers of batches "
                                     "(2 to 3)"), r["error"]


# ---------------------------------------------------------------- 2. float16: an all-zero gradient
def _half_model_and_batch():
    torch.manual_seed(0)
    model = TinyLM(vocab=64, d=16, layers=1, ctx=8, tied=False).eval().half()
    ids = torch.randint(0, 64, (6, 9), generator=torch.Generator().manual_seed(1))
    return model, ids[:, :-1], ids[:, 1:].clone()


def _summed_ce(logits, batch):
    return F.cross_entropy(logits.transpose(1, 2).float(), batch[1], reduction="none").sum(1) / 8


@pytest.mark.parametrize("engine", ["loop", "fast"])
def test_float16_all_zero_gradient_does_not_carry_the_bound(engine, monkeypatch):
    """Every other sample has every label ignored (-100): zero gradient. Its search may go up to 2^40,
    but the scale carried on stays the one the last sample with a gradient found, so the next sample
    (loop engine) or chunk (fast engine, 1-sample chunks) starts at a representable scale: at most
    3 passes per zero sample or chunk more than without them (before: 19 passes on either engine, 13
    now, 4 for the nonzero samples alone). The nonzero rows still match a float64 reference, the zero
    rows are zero."""
    model, x, y = _half_model_and_batch()
    name = "h.0.attn.c_attn.weight"
    masked = y.clone()
    masked[1::2] = -100
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    def passes(batch):
        calls.clear()
        monkeypatch.setattr(torch.autograd, "grad", counting)
        probe = PerSampleGradientProbe(model, [name], engine=engine, loss_fn=_summed_ce, keep_matrix=True,
                                       chunk_size=1)
        probe.update(batch)
        monkeypatch.setattr(torch.autograd, "grad", real)
        return len(calls), probe.matrix(name)

    alone, _ = passes((x[0::2], y[0::2]))
    mixed, rows = passes((x, masked))
    assert mixed <= alone + 3 * 3, (mixed, alone)
    m64 = TinyLM(vocab=64, d=16, layers=1, ctx=8, tied=False).double().eval()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    w = dict(m64.named_parameters())[name]
    for i in range(6):
        ref = torch.autograd.grad(_summed_ce(m64(x[i : i + 1]), (x[i : i + 1], masked[i : i + 1])).sum(), w,
                                  allow_unused=True)[0]
        if i % 2:
            assert torch.equal(rows[i], torch.zeros_like(rows[i]))
        else:
            err = ((rows[i].double() - ref.reshape(-1)).norm() / ref.norm()).item()
            assert err <= 5e-3, (i, err)


def _small_half_lm():
    """The loss-scaling tests' model: TinyLM (V = 64, d = 16, one block, T = 16), weights x0.02, in float16;
    a batch of 3 sequences and the probed weight's name."""
    torch.manual_seed(0)
    model = TinyLM(vocab=64, d=16, layers=1, ctx=16, tied=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.02)
    ids = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))
    return model.half(), (ids[:, :-1], ids[:, 1:]), "h.0.mlp.c_fc.weight"


def _float64_rows(model, name, loss_fn, batch):
    """Per-sample gradients of ``name`` in a float64 copy of ``model``, one sequence at a time."""
    import copy

    m64 = copy.deepcopy(model).double()
    w = dict(m64.named_parameters())[name]
    return torch.stack([torch.autograd.grad(loss_fn(m64(batch[0][i : i + 1]), (None, batch[1][i : i + 1])).sum(), w)[0]
                        .reshape(-1) for i in range(len(batch[0]))])


# ---------------------------------------------------------------- 3. float16: a loss_fn returning float16 losses
@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
def test_float16_losses_are_seeded_within_float16(engine):
    """A loss_fn that returns float16 losses (cross_entropy of float16 logits without ``.float()``):
    the seed is the losses' own gradient, so it stays at most 2^15. Before: the fast engine raised
    "value cannot be converted to type c10::Half without overflow" as soon as the search wanted a seed
    past 65504 (2^20 here; the loop engine's ``new_full`` too where its search got there). Rows within
    5e-3 of float64 (measured about 1e-3)."""
    model, batch, name = _small_half_lm()

    def half_ce(logits, b):
        return F.cross_entropy(logits.transpose(1, 2), b[1], reduction="none").mean(1)  # float16

    probe = PerSampleGradientProbe(model, [name], engine=engine, loss_fn=half_ce, keep_matrix=True).update(batch)
    ref = _float64_rows(model, name, half_ce, batch)
    got = probe.matrix(name).double()
    assert ((got - ref).norm() / ref.norm()).item() <= 5e-3


# ---------------------------------------------------------------- 4. float16: the overflow scale is carried
@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
def test_float16_later_chunks_take_one_backward(engine, monkeypatch):
    """Weights x0.02 (the loss-scaling tests' model): the logits' gradient (about S / T) overflows at
    2^21 while the probed gradients' largest entry is still about 4 < 2^6. Each chunk used to try above
    the carried scale again, overflow and bisect back: 5 (fast) or 6 (vmap, loop) backward passes for
    every later chunk. The overflowing scale is carried too now: each later chunk takes 1 pass. The
    rows stay within 5e-3 of float64."""
    from spectral_lens.gradients import engines

    model, batch, name = _small_half_lm()

    def ce(logits, b):
        return F.cross_entropy(logits.transpose(1, 2).float(), b[1], reduction="none").mean(1)

    passes = []  # per call of scaled_backward: its backward passes
    real = engines.scaled_backward

    def counting(grads_at, *args, **kw):
        passes.append(0)

        def counted(s):
            passes[-1] += 1
            return grads_at(s)

        return real(counted, *args, **kw)

    monkeypatch.setattr(engines, "scaled_backward", counting)
    probe = PerSampleGradientProbe(model, [name], engine=engine, loss_fn=ce, keep_matrix=True, chunk_size=1)
    for _ in range(3):
        probe.update(batch)
    assert len(passes) == 9 and passes[1:] == [1] * 8, passes
    ref = _float64_rows(model, name, ce, batch)
    got = probe.matrix(name).double()
    assert ((got - ref.repeat(3, 1)).norm() / ref.repeat(3, 1).norm()).item() <= 5e-3


# ---------------------------------------------------------------- 5. float16: float32 modules in a float16 model
@pytest.mark.parametrize("engine", ["fast", "loop"])
def test_float32_lora_factor_in_a_float16_model_is_loss_scaled(engine):
    """peft keeps the LoRA factors in float32 on a float16 base (autocast_adapter_dtype): the factor's
    own output gradient is float32, but it is the float16 backward's value cast up, flushed below 2^-24.
    Only float16 output gradients (fast) or float16 / autocast parameters (loop, vmap) turned scaling on,
    so lora_B's rows (weights x0.003, largest entry about 3e-9) came back all zero (relative error 1.0;
    8.7e-3 with c_proj a target too). Now any float16 parameter in the model turns it on: within 2e-3
    of float64 (measured 7e-4)."""
    import copy
    import warnings

    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=61, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    base = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(0.003)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base.half(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                                 fan_in_fan_out=True, init_lora_weights=False))
    name = "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"
    assert model.get_parameter(name).dtype == torch.float32
    ids = torch.randint(0, 61, (3, 10), generator=torch.Generator().manual_seed(1))

    def loss_fn(out, b):
        return F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), b["input_ids"][:, 1:], reduction="none").mean(1)

    probe = PerSampleGradientProbe(model, [name], engine=engine, loss_fn=loss_fn, forward_fn=lambda m, b: m(**b),
                                   keep_matrix=True).update({"input_ids": ids})
    m64 = copy.deepcopy(model).double().eval()
    w = m64.get_parameter(name)
    ref = torch.stack([torch.autograd.grad(loss_fn(m64(input_ids=ids[i : i + 1]), {"input_ids": ids[i : i + 1]}).sum(),
                                           w)[0].reshape(-1) for i in range(3)])
    got = probe.matrix(name).double()
    assert ((got - ref).norm() / ref.norm()).item() <= 2e-3


@pytest.mark.parametrize("engine", ["fast", "loop"])
def test_float16_carried_overflow_level_follows_the_gradients_magnitude(engine):
    """Chunks whose gradients differ by 2^36 (the loss times 2^-20, 2^16, 2^-20): the overflow carried
    from the large chunk is a level of the watched maximum, not a scale, so the next small chunk still
    searches up to its own scale. (Carrying the overflowing scale itself, as a first version of the fix
    above did, left that chunk's rows all zero: relative error 1.0.) Every row within 5e-3 of float64."""
    import copy

    torch.manual_seed(0)
    model = TinyLM(vocab=64, d=16, layers=1, ctx=8, tied=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.1)
    model = model.half()
    ids = torch.randint(0, 64, (6, 9), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    factor = torch.tensor([2.0 ** -20] * 2 + [2.0 ** 16] * 2 + [2.0 ** -20] * 2)
    at = [0]

    def loss_fn(logits, b):
        f = factor[at[0] : at[0] + logits.shape[0]]
        return F.cross_entropy(logits.transpose(1, 2).float(), b[1], reduction="none").mean(1) * f

    name = "h.0.attn.c_attn.weight"
    probe = PerSampleGradientProbe(model, [name], engine=engine, loss_fn=loss_fn, keep_matrix=True)
    for c in range(3):
        at[0] = 2 * c
        if engine == "loop":  # it calls loss_fn per sample: one sample per update
            for i in range(2):
                at[0] = 2 * c + i
                probe.update((x[2 * c + i : 2 * c + i + 1], y[2 * c + i : 2 * c + i + 1]))
        else:
            probe.update((x[2 * c : 2 * c + 2], y[2 * c : 2 * c + 2]))
    m64 = copy.deepcopy(model).double()
    w = dict(m64.named_parameters())[name]
    got = probe.matrix(name).double()
    for i in range(6):
        loss = F.cross_entropy(m64(x[i : i + 1]).transpose(1, 2), y[i : i + 1], reduction="none").mean(1) * factor[i]
        ref = torch.autograd.grad(loss.sum(), w)[0].reshape(-1)
        assert ((got[i] - ref).norm() / ref.norm()).item() <= 5e-3, i
