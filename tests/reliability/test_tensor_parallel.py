"""``SpectralLens`` and ``PerSampleGradientProbe`` on a tensor-parallel model (``parallelize_module``), 2 gloo CPU ranks.

A small LM of MLP blocks whose ``mlp.c_fc`` is ``ColwiseParallel`` and ``mlp.c_proj`` ``RowwiseParallel``
over a 1-D mesh of both ranks (one model replica: both ranks run the same batches), and a
sequence-parallel variant (``SequenceParallel`` norms, the embedding and ``c_proj`` returning sequence
shards). References: the plain model in one process (float64; the activations by numpy's covariance).

Before the fix (numbers from this model, pool of 4 batches of 4 x 12 tokens):

* default ``group`` (the world): the lens split the pool across the two ranks of the mesh, so each
  ``RowwiseParallel`` all-reduce summed partial products of *different* batches: a silently wrong spectrum
  with the right row count (``act:h.1`` top eigenvalue 3.0200 against 3.2090; ``act:h.0`` 2.8446 against
  2.8109). With a probed matrix the gradient protocol ran on rank 0 alone, whose forwards' all-reduces met
  rank 1's agreement: gloo aborted rank 1's process (``op.preamble.length <= op.nbytes ... collective
  mismatch``).
* a tensor-parallel probed matrix (``DTensor``): ``RuntimeError: aten.nonzero.default ... Sharding
  propagation failed`` inside the probe's finiteness check, naming neither the matrix nor what to do.
* sequence parallelism (each rank holds a slice of the tokens): 96 of the 192 rows, silently; with each
  rank's own group as ``group=``, two different spectra (top eigenvalue of ``act:h.0`` 2.2846 on rank 0,
  3.6375 on rank 1, against 2.8109); under the default group, mixed batches (3.6177).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from spectral_lens import PerSampleGradientProbe, SpectralLens

from support.ranks import checked_case, run_gloo_cases

WORLD = 2
PG_TIMEOUT_S = 20
JOIN_S = 300.0
LAYERS = ["h.0", "h.1"]


class _MLP(nn.Module):
    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.c_fc, self.c_proj, self.drop = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class _Block(nn.Module):
    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.ln, self.mlp = nn.LayerNorm(d), _MLP(d, dropout)

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class _LM(nn.Module):
    def __init__(self, vocab: int = 37, d: int = 16, layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(_Block(d, dropout) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _plain(dropout: float = 0.0) -> _LM:
    torch.manual_seed(0)
    return _LM(dropout=dropout).double()


def _pool(n: int = 4, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, 37, (4, 13), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def _tp(model: _LM, mesh) -> _LM:
    """Megatron-style MLPs: c_fc column-parallel, c_proj row-parallel (its output replicated, a plain tensor)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    for block in model.h:
        parallelize_module(block.mlp, mesh, {"c_fc": ColwiseParallel(), "c_proj": RowwiseParallel()})
    return model


def _sp(model: _LM, mesh) -> _LM:
    """Sequence parallelism as torchtitan does it: the embedding and every c_proj return this rank's slice of
    the sequence (a plain local tensor), the norms run on the slices."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    parallelize_module(model, mesh, {
        "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "ln_f": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    for block in model.h:
        parallelize_module(block, mesh, {
            "ln": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.c_fc": ColwiseParallel(),
            "mlp.c_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
    return model


def _values(m) -> dict:
    return {k: {"values": s.values.tolist(), "n_rows": s.n_rows} for k, s in m.spectra.items()}


def _replicated(rank: int) -> dict:
    """The block outputs (replicated) under the default group (the world: the mesh is the whole group, one
    replica) and under each rank's own group (the documented data-parallel group of a single replica), and
    the gradient spectrum of the replicated head under the default group."""
    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    mesh = _mesh()
    out = {}
    lens = SpectralLens(_tp(_plain(), mesh), _pool(), layers=LAYERS, params="lm_head.weight", precision="float64",
                        mask_fn=None, progress=False)
    out["world"] = _values(lens.measure(1, 1))
    lens = SpectralLens(_tp(_plain(), mesh), _pool(3), layers=LAYERS, params=(), precision="float64", mask_fn=None,
                        progress=False)
    out["world_3"] = _values(lens.measure(1, 1))  # a pool of 3 batches on 2 ranks: each runs all 3
    lens = SpectralLens(_tp(_plain(), mesh), _pool(), layers=LAYERS, params=(), precision="float64", mask_fn=None,
                        progress=False, group=groups[rank])
    out["own_group"] = _values(lens.measure(1, 1))
    return out


def _refused(rank: int) -> dict:
    """A tensor-parallel (DTensor) probed matrix, Colwise and Rowwise: refused when the probe or the lens is
    built, before any pass; the weights and .grad untouched."""
    model = _tp(_plain(), _mesh())
    before = {n: p.to_local().clone() if hasattr(p, "to_local") else p.detach().clone()
              for n, p in model.named_parameters()}
    errors = []
    for build in (lambda: PerSampleGradientProbe(model, params="h.1.mlp.c_proj.weight"),
                  lambda: PerSampleGradientProbe(model, params="h.0.mlp.c_fc.weight"),
                  lambda: SpectralLens(model, _pool(), layers=LAYERS, params="h.1.mlp.c_proj.weight")):
        try:
            build()
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
    after = {n: p.to_local() if hasattr(p, "to_local") else p.detach() for n, p in model.named_parameters()}
    return {"errors": errors, "untouched": all(torch.equal(before[n], after[n]) for n in before),
            "no_grads": all(p.grad is None for p in model.parameters())}


def _sharded_outputs(rank: int) -> dict:
    """Outputs that differ between the ranks of the mesh: the sequence-parallel blocks' (a slice of the tokens
    each), under the default group and under each rank's own group, and a ColwiseParallel output read as its
    local tensor (some of the features): refused on both ranks; the sequence slices gathered in the pick
    measure the whole output."""
    from torch.distributed.tensor import DTensor, Shard

    groups = [dist.new_group([r]) for r in range(WORLD)]
    mesh = _mesh()
    out = {}
    for key, kwargs in (("sp_world", {"layers": LAYERS}), ("sp_own_group", {"layers": LAYERS, "group": groups[rank]}),
                        ("colwise_local", {"layers": "h.1.mlp.c_fc"})):
        build = _sp if key.startswith("sp") else _tp
        lens = SpectralLens(build(_plain(), mesh), _pool(), params=(), precision="float64", mask_fn=None,
                            progress=False, **kwargs)
        try:
            out[key] = _values(lens.measure(1, 1))
        except ValueError as exc:
            out[key] = str(exc)
    lens = SpectralLens(_sp(_plain(), mesh), _pool(), layers=LAYERS, params=(), precision="float64", mask_fn=None,
                        progress=False, pick=lambda o: DTensor.from_local(o, mesh, [Shard(1)]).full_tensor())
    out["sp_gathered"] = _values(lens.measure(1, 1))
    return out


def _train(measure: bool) -> tuple:
    """Three AdamW steps of the tensor-parallel model (dropout on), a measurement (activations and the
    head's gradient spectrum) between each backward and optimizer step when ``measure``; the losses, the
    local shards, grads, optimizer state, the modes and the RNG stream afterwards."""
    model = _tp(_plain(dropout=0.1), _mesh())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lens = SpectralLens(model, _pool(2), layers=LAYERS, params="lm_head.weight", precision="float64", mask_fn=None,
                        progress=False)
    torch.manual_seed(1234)  # the same on both ranks: tensor parallelism runs one replica's dropout
    losses = []
    for step, (x, y) in enumerate(_pool(3, seed=2), start=1):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if measure:
            lens.measure(step, step)
        opt.step()
        opt.zero_grad(set_to_none=False)
        losses.append(loss.item())
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    params = {n: local(p).detach().clone() for n, p in model.named_parameters()}
    grads = {n: local(p.grad).clone() for n, p in model.named_parameters()}
    state = [local(v).clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return losses, params, grads, state, all(m.training for m in model.modules()), torch.rand(3)


def _training_unchanged(rank: int) -> dict:
    a, b = _train(False), _train(True)
    return {"losses": a[0] == b[0],
            "params": all(torch.equal(a[1][n], b[1][n]) for n in a[1]),
            "grads": all(torch.equal(a[2][n], b[2][n]) for n in a[2]),
            "optimizer": len(a[3]) > 0 and len(a[3]) == len(b[3]) and all(torch.equal(x, y) for x, y in zip(a[3], b[3])),
            "training": a[4] and b[4], "rng": torch.equal(a[5], b[5])}


CASES = {  # the refusals first: on the old code, the later cases' collective mismatches abort a rank
    "refused": _refused,
    "sharded_outputs": _sharded_outputs,
    "replicated": _replicated,
    "training_unchanged": _training_unchanged,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("tensor_parallel"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


def _got(results, case) -> list:
    got = checked_case(results, case, None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    return [r["value"] for r in got]


def _rows(model: _LM, pool: list, layer: str) -> np.ndarray:
    """A layer's output rows over the pool, float64, from the plain model in this process."""
    rows = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: rows.append(o.detach().flatten(0, 1)))
    with torch.no_grad():
        for x, _ in pool:
            model(x)
    handle.remove()
    return torch.cat(rows).numpy()


@functools.cache
def _reference(n_batches: int = 4) -> dict:
    """The plain model's activation spectra (numpy: eigenvalues of the sample covariance, n - 1) and, from a
    lens in this one process, the head's gradient spectrum."""
    pool = _pool(n_batches)
    ref = {}
    for layer in LAYERS:
        rows = _rows(_plain(), pool, layer)
        ref[f"act:{layer}"] = {"values": np.linalg.eigvalsh(np.cov(rows.T))[::-1].tolist(), "n_rows": len(rows)}
    lens = SpectralLens(_plain(), pool, layers=LAYERS, params="lm_head.weight", precision="float64", mask_fn=None,
                        progress=False)
    ref["grad:lm_head.weight"] = _values(lens.measure(1, 1))["grad:lm_head.weight"]
    return ref


def _assert_spectra(got: dict, want: dict, where: str) -> None:
    assert sorted(got) == sorted(want), where
    for name, w in want.items():
        g = got[name]
        assert g["n_rows"] == w["n_rows"], (where, name, g["n_rows"], w["n_rows"])  # rows counted once
        np.testing.assert_allclose(g["values"], w["values"], rtol=1e-9, atol=1e-12 * w["values"][0],
                                   err_msg=f"{where} {name}")


@pytest.mark.slow
@pytest.mark.distributed
def test_replicated_outputs_under_the_default_group_equal_the_plain_model(results):
    """The mesh is the lens's whole group (one replica): every rank runs every batch and the rows are not
    summed over the ranks; the head's gradient spectrum runs on every rank (its passes are collectives)."""
    want = _reference()
    acts = {k: v for k, v in want.items() if k.startswith("act:")}
    for rank, r in enumerate(_got(results, "replicated")):
        _assert_spectra(r["world"], want, f"rank {rank}, default group")
        _assert_spectra(r["world_3"], {k: v for k, v in _reference(3).items() if k.startswith("act:")},
                        f"rank {rank}, default group, 3 batches")
        _assert_spectra(r["own_group"], acts, f"rank {rank}, each rank's own group")


@pytest.mark.slow
@pytest.mark.distributed
def test_a_tensor_parallel_probed_matrix_is_refused_naming_it_and_its_placements(results):
    for r in _got(results, "refused"):
        rowwise, colwise, lens = r["errors"]
        assert rowwise is not None and rowwise.startswith("PerSampleGradientProbe: h.1.mlp.c_proj.weight is a DTensor"), rowwise
        assert "Shard(dim=1)" in rowwise and "ranks [0, 1]" in rowwise and "params=()" in rowwise, rowwise
        assert colwise is not None and "h.0.mlp.c_fc.weight" in colwise and "Shard(dim=0)" in colwise, colwise
        assert lens is not None and "h.1.mlp.c_proj.weight is a DTensor" in lens, lens
        assert r["untouched"] and r["no_grads"], r


@pytest.mark.slow
@pytest.mark.distributed
def test_outputs_that_differ_across_the_mesh_are_refused_and_gathered_sequence_shards_are_measured(results):
    want = {k: v for k, v in _reference().items() if k.startswith("act:")}
    for rank, r in enumerate(_got(results, "sharded_outputs")):
        for key, layers in (("sp_world", "['h.0', 'h.1']"), ("sp_own_group", "['h.0', 'h.1']"),
                            ("colwise_local", "['h.1.mlp.c_fc']")):
            assert isinstance(r[key], str), (rank, key, r[key])  # a ValueError, not a spectrum
            assert r[key].startswith(f"SpectralLens: the outputs of {layers} differ between the tensor-parallel ranks "
                                     "[0, 1]"), (rank, key, r[key])
            assert "sequence-parallel" in r[key] and "full_tensor()" in r[key], r[key]
        _assert_spectra(r["sp_gathered"], want, f"rank {rank}, sequence shards gathered in the pick")


@pytest.mark.slow
@pytest.mark.distributed
def test_training_is_unchanged_by_measurements_of_a_tensor_parallel_model(results):
    for r in _got(results, "training_unchanged"):
        assert r == {"losses": True, "params": True, "grads": True, "optimizer": True, "training": True,
                     "rng": True}, r


# ---------------------------------------------------------------- 4 ranks: 2 data-parallel replicas of 2
def _mesh_2d():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


def _two_replicas(rank: int) -> dict:
    """A (dp, tp) mesh of 4 ranks, tensor parallelism on "tp": the lens's default group (the world) would
    split the pool across the ranks of one replica, refused when the lens is built; the data-parallel
    group ("dp") measures the whole pool (each replica its share of the batches, summed over "dp")."""
    mesh = _mesh_2d()
    out = {}
    try:
        SpectralLens(_tp(_plain(), mesh["tp"]), _pool(), layers=LAYERS, params=())
        out["world"] = None
    except ValueError as exc:
        out["world"] = str(exc)
    lens = SpectralLens(_tp(_plain(), mesh["tp"]), _pool(), layers=LAYERS, params="lm_head.weight",
                        precision="float64", mask_fn=None, progress=False, group=mesh["dp"].get_group())
    out["dp"] = _values(lens.measure(1, 1))
    return out


@pytest.fixture(scope="module")
def results_4(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("tensor_parallel_4"), {"two_replicas": _two_replicas}, 4,
                          pg_timeout_s=PG_TIMEOUT_S, join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_replicas_need_the_data_parallel_group_and_measure_the_whole_pool_with_it(results_4):
    got = checked_case(results_4, "two_replicas", None)
    assert [r["error"] for r in got] == [None] * 4, got
    for rank, r in enumerate(r["value"] for r in got):
        peers = "[0, 1]" if rank < 2 else "[2, 3]"
        assert r["world"] is not None and r["world"].startswith("SpectralLens: the model is tensor-parallel"), r["world"]
        assert f"holds the tensor-parallel ranks {peers} together with other ranks" in r["world"], r["world"]
        assert "device_mesh['dp'].get_group()" in r["world"], r["world"]
        _assert_spectra(r["dp"], _reference(), f"rank {rank}, group= the dp group")


def test_the_ranks_digests_agree_for_round_off_and_differ_for_other_rows():
    """check_replicated's comparison (no process group): replicated rows with float32 round-off (as kernels
    that are not bitwise deterministic give) count as the same; the other half of the tokens, or other
    features of the same width, do not."""
    from spectral_lens import ActivationCovarianceAccumulator
    from spectral_lens._tensor_parallel import _digest, _same

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(96, 16, generator=g, dtype=torch.float64) * 3 + 1

    def digest(x):
        acc = ActivationCovarianceAccumulator(precision="float64")
        acc.update(x)
        return _digest(acc)

    base = digest(rows)
    noisy = digest(rows * (1 + 1e-7 * torch.randn(rows.shape, generator=g, dtype=torch.float64)))
    pair = torch.stack([base, noisy])
    assert _same(pair.max(0).values, pair.min(0).values)
    for other in (torch.randn(96, 16, generator=g, dtype=torch.float64) * 3 + 1,  # other tokens
                  rows[:, torch.randperm(16, generator=g)] * torch.linspace(0.5, 1.5, 16, dtype=torch.float64),
                  rows[:95]):  # a row fewer
        pair = torch.stack([base, digest(other)])
        assert not _same(pair.max(0).values, pair.min(0).values)
