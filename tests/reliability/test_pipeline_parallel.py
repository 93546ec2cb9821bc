"""Measurements under pipeline parallelism (``torch.distributed.pipelining``: ``PipelineStage`` and the
``ScheduleGPipe`` / ``Schedule1F1B`` schedules), 2 gloo CPU ranks, each holding half of the blocks of a
small LM (torchtitan's way: the stage module keeps the unsplit model's names, ``h.0, h.1`` on stage 0 and
``h.2, h.3`` on stage 1). References: the unsplit model in one process (float64; numpy's covariance).

Before the fix (this model, one batch of 8 x 6 tokens in 4 microbatches):

* ``sl.attach`` around the user's first schedule step: 60 rows of 48 on every stage. The schedule's
  metadata inference (at its first ``step``/``eval`` and at every switch between them) runs the stage's
  module once more: on stage 0 on the first microbatch again (its rows counted twice), on the other stages
  on uninitialized ``torch.empty`` inputs (garbage rows in the spectrum).
* ``SpectralLens`` on a stage with a ``forward_fn`` that runs the schedule: the default group split the
  pool across the stages (stage 1 received stage 0's batch ``i`` while it counted batch ``i + 1``), then
  ``ValueError: the ranks measure different layers``; with the default forward, stage 1's module was fed
  token ids. A per-sample gradient probe on a stage's matrix was built without a word.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.ranks import checked_case, run_gloo_cases
from torch import nn

import spectral_lens as sl
from spectral_lens import PerSampleGradientProbe, SpectralLens, tail_window

# the cases build PipelineStage without example inputs (shape inference: torch 2.6, pytorch/pytorch#136912) and run
# forward-only steps with schedule.eval() (torch 2.9, pytorch/pytorch#157795); torch 2.4 has neither
pytestmark = pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < (2, 9),
                                reason=f"torch {torch.__version__}: torch.distributed.pipelining's schedules have no "
                                       "eval() (torch >= 2.9) and PipelineStage needs input_args (torch < 2.6)")

WORLD = 2
PG_TIMEOUT_S = 20
JOIN_S = 240.0
N_LAYERS = 4
MICROBATCHES = 4


class _Block(nn.Module):
    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.ln, self.fc, self.drop = nn.LayerNorm(d), nn.Linear(d, d), nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(self.fc(F.gelu(self.ln(x))))


class _LM(nn.Module):
    """``wte`` and ``head`` may be ``None`` and ``h`` a part of the blocks: a pipeline stage."""

    def __init__(self, vocab: int = 37, d: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleDict({str(i): _Block(d, dropout) for i in range(N_LAYERS)})
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        if self.wte is not None:
            x = self.wte(x)
        for block in self.h.values():
            x = block(x)
        return self.head(x) if self.head is not None else x


def _plain(dropout: float = 0.0) -> _LM:
    torch.manual_seed(0)
    return _LM(dropout=dropout).double()


def _stage_module(rank: int, dropout: float = 0.0) -> _LM:
    """This rank's slice of the unsplit model (the same weights): its half of the blocks."""
    model = _plain(dropout)
    per = N_LAYERS // WORLD
    for key in list(model.h.keys()):
        if not rank * per <= int(key) < (rank + 1) * per:
            del model.h[key]
    if rank > 0:
        model.wte = None
    if rank < WORLD - 1:
        model.head = None
    return model


def _loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _schedule(module: nn.Module, rank: int, kind: str = "GPipe"):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage = PipelineStage(module, rank, WORLD, torch.device("cpu"))
    return {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B}[kind](stage, n_microbatches=MICROBATCHES, loss_fn=_loss)


def _run(schedule, rank: int, batch, train: bool):
    """One batch through the pipeline, as every rank calls it: the inputs on the first stage, the targets on the
    last; a training step (forward and backward) or forwards only (``eval``)."""
    x, y = batch
    step = schedule.step if train else schedule.eval
    return step(x) if rank == 0 else step(target=y)


def _forward_fn(schedule, rank: int):
    return lambda model, batch: _run(schedule, rank, batch, train=False)


def _pool(n: int = 2, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 37, (8, 6), generator=g), torch.randint(0, 37, (8, 6), generator=g)) for _ in range(n)]


def _values(spectra) -> dict:
    return {k: {"values": s.values.tolist(), "n_rows": s.n_rows} for k, s in spectra.items()}


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------- the cases (each runs on every rank)
def _refused(rank: int) -> dict:
    """A lens with the default forward, a lens with a probed matrix, and a probe on a stage: refused when built,
    on every stage, without a collective (nothing to hang on)."""
    module = _stage_module(rank)
    schedule = _schedule(module, rank)  # the stage holds the module while the lens is built
    mine = f"h.{2 * rank}.fc.weight"
    errors = []
    for build in (lambda: SpectralLens(module, _pool(), layers="all", params=()),
                  lambda: SpectralLens(module, _pool(), layers="all", params=mine, forward_fn=_forward_fn(schedule, rank)),
                  lambda: PerSampleGradientProbe(module, params=mine)):
        try:
            build()
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
    return {"errors": errors, "hooks": _hooks(module)}


def _attached(rank: int) -> dict:
    """``sl.attach`` on the stage's blocks around the user's own training steps (GPipe, then 1F1B, each from a
    fresh schedule: its first step runs the metadata inference) and around forward-only steps after them."""
    out = {}
    for kind in ("GPipe", "1F1B"):
        module = _stage_module(rank)
        schedule = _schedule(module, rank, kind)
        with sl.attach(module, "h.*", precision="float64") as capture:
            for batch in _pool():
                _run(schedule, rank, batch, train=True)
        out[kind] = _values(capture.compute())
        with sl.attach(module, "h.*", precision="float64") as capture:
            for batch in _pool():
                _run(schedule, rank, batch, train=False)  # the switch to forwards only: inference runs again
        out[f"{kind}_eval"] = _values(capture.compute())
        out[f"{kind}_hooks"] = _hooks(module)
    return out


def _lens(rank: int) -> dict:
    """``SpectralLens`` on a stage, every batch through the schedule (``forward_fn``): every layer, named layers
    of both stages, a layer that stage 0 does not hold, the default layer (the deepest block, on the last
    stage) and a pool of 3 batches; each rank returns every stage's spectra."""
    module = _stage_module(rank)
    schedule = _schedule(module, rank)
    out = {}
    for key, layers, pool in (("all", "all", _pool()), ("named", ["h.1", "h.2"], _pool()), ("last_only", "h.3", _pool()),
                              ("default", None, _pool()), ("all_3", "all", _pool(3))):
        lens = SpectralLens(module, pool, layers=layers, params=(), precision="float64", mask_fn=None, progress=False,
                            forward_fn=_forward_fn(schedule, rank))
        out[key] = _values(lens.measure(1, 1).spectra)
    lens = SpectralLens(module, _pool(), layers=["h.0", "h.9"], params=(), precision="float64", mask_fn=None,
                        progress=False, forward_fn=_forward_fn(schedule, rank))
    try:
        lens.measure(1, 1)
        out["nowhere"] = None
    except ValueError as exc:
        out["nowhere"] = str(exc)
    out["hooks"] = _hooks(module)
    deep = _plain()  # 24 blocks, 12 on each stage: the default tail window follows the whole model's depth
    deep.h = nn.ModuleDict({str(i): _Block(8, 0.0).double() for i in range(12 * rank, 12 * rank + 12)})
    deep.wte, deep.head = (deep.wte, None) if rank == 0 else (None, deep.head)
    lens = SpectralLens(deep, _pool(1), layers="all", params=(), mask_fn=None, progress=False,
                        forward_fn=_forward_fn(_schedule(deep, rank), rank))
    out["deep"] = {"layers": len(lens.measure(1, 1).spectra), "tail_window": list(lens._windows()[0])}
    return out


def _traced(rank: int) -> dict:
    """The tracing frontend: ``pipeline()`` with a ``SplitPoint`` before ``h.2``, ``build_stage``; the stage
    modules keep the model's names. A lens on each, every batch through the schedule."""
    from torch.distributed.pipelining import (
        ScheduleGPipe,
        SplitPoint,
        build_stage,
        pipeline,
    )

    x, _ = _pool()[0]
    pipe = pipeline(_plain(), mb_args=(x[: len(x) // MICROBATCHES],), split_spec={"h.2": SplitPoint.BEGINNING})
    module = pipe.get_stage_module(rank)
    schedule = ScheduleGPipe(build_stage(module, rank, pipe.info(), torch.device("cpu")), n_microbatches=MICROBATCHES,
                             loss_fn=_loss)
    lens = SpectralLens(module, _pool(), layers="h.*", params=(), precision="float64", mask_fn=None, progress=False,
                        forward_fn=_forward_fn(schedule, rank))
    return {"spectra": _values(lens.measure(1, 1).spectra), "hooks": _hooks(module)}


def _train(rank: int, measure: bool) -> tuple:
    """Three AdamW steps through the GPipe schedule (dropout on), a measurement between each step's backward and
    optimizer step when ``measure``; the losses, parameters, grads, optimizer state, modes and RNG afterwards."""
    module = _stage_module(rank, dropout=0.1)
    module.train()
    schedule = _schedule(module, rank)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    lens = SpectralLens(module, _pool(), layers="all", params=(), precision="float64", mask_fn=None, progress=False,
                        forward_fn=_forward_fn(schedule, rank))
    torch.manual_seed(1234 + rank)
    losses = []
    for step, (x, y) in enumerate(_pool(3, seed=2), start=1):
        mb_losses = []
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=mb_losses)
        if measure:
            lens.measure(step, step)
        opt.step()
        opt.zero_grad(set_to_none=False)
        losses.append([loss.item() for loss in mb_losses])
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    state = [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return losses, params, grads, state, all(m.training for m in module.modules()), torch.rand(3), _hooks(module)


def _training_unchanged(rank: int) -> dict:
    a, b = _train(rank, False), _train(rank, True)
    return {"losses": a[0] == b[0] and (rank == 0 or len(a[0][0]) == MICROBATCHES),
            "params": all(torch.equal(a[1][n], b[1][n]) for n in a[1]),
            "grads": all(torch.equal(a[2][n], b[2][n]) for n in a[2]),
            "optimizer": len(a[3]) > 0 and len(a[3]) == len(b[3]) and all(torch.equal(x, y) for x, y in zip(a[3], b[3])),
            "training": a[4] and b[4], "rng": torch.equal(a[5], b[5]), "hooks": b[6]}


CASES = {  # the refusals first: on the old code, the later cases leave the ranks out of step
    "refused": _refused,
    "attached": _attached,
    "lens": _lens,
    "traced": _traced,
    "training_unchanged": _training_unchanged,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("pipeline"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S, join_s=JOIN_S,
                          preload="torch.distributed.pipelining")


def _got(results, case) -> list:
    got = checked_case(results, case, None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    return [r["value"] for r in got]


# ---------------------------------------------------------------- references: the unsplit model, float64
@functools.cache
def _reference(n_batches: int = 2) -> dict:
    """Every block's output spectrum over the pool (numpy: eigenvalues of the sample covariance, n - 1)."""
    model, rows = _plain(), {}
    handles = [block.register_forward_hook(functools.partial(lambda k, m, i, o: rows.setdefault(k, []).append(
        o.detach().flatten(0, 1)), f"h.{key}")) for key, block in model.h.items()]
    with torch.no_grad():
        for x, _ in _pool(n_batches):
            model(x)
    for h in handles:
        h.remove()
    ref = {}
    for name, parts in rows.items():
        r = torch.cat(parts).numpy()
        ref[f"act:{name}"] = {"values": np.linalg.eigvalsh(np.cov(r.T))[::-1].tolist(), "n_rows": len(r)}
    return ref


def _assert_spectra(got: dict, want: dict, where: str) -> None:
    assert sorted(got) == sorted(want), (where, sorted(got), sorted(want))
    for name, w in want.items():
        g = got[name]
        assert g["n_rows"] == w["n_rows"], (where, name, g["n_rows"], w["n_rows"])  # each microbatch's rows once
        np.testing.assert_allclose(g["values"], w["values"], rtol=1e-9, atol=1e-12 * w["values"][0],
                                   err_msg=f"{where} {name}")


def _of(want: dict, *layers) -> dict:
    return {f"act:{layer}": want[f"act:{layer}"] for layer in layers}


@pytest.mark.distributed
def test_a_lens_or_probe_that_cannot_measure_a_stage_is_refused_naming_pipeline_parallelism(results):
    for rank, r in enumerate(_got(results, "refused")):
        default, probed, probe = r["errors"]
        assert default is not None and default.startswith(f"SpectralLens: the model is stage {rank} of 2 of a pipeline"), default
        assert "forward_fn=" in default and "schedule.eval" in default and "sl.attach" in default, default
        assert probed is not None and "per-sample gradient needs each sample's loss" in probed, probed
        assert probe is not None and probe.startswith(f"PerSampleGradientProbe: the model is stage {rank} of 2"), probe
        assert r["hooks"] == 0, r


@pytest.mark.distributed
def test_attach_around_the_users_schedule_reads_each_microbatch_once(results):
    """The stage's rows equal the unsplit model's, under GPipe and 1F1B, training steps and forward-only steps:
    the metadata inference's forwards (a repeated microbatch, uninitialized inputs) are not read."""
    want = _reference()
    for rank, r in enumerate(_got(results, "attached")):
        held = _of(want, f"h.{2 * rank}", f"h.{2 * rank + 1}")
        for kind in ("GPipe", "1F1B"):
            _assert_spectra({f"act:{k}": v for k, v in r[kind].items()}, held, f"rank {rank}, {kind} training steps")
            _assert_spectra({f"act:{k}": v for k, v in r[f"{kind}_eval"].items()}, held, f"rank {rank}, {kind} eval")
            assert r[f"{kind}_hooks"] == 0, r


@pytest.mark.distributed
def test_the_lens_runs_the_pool_through_the_schedule_and_every_rank_gets_every_stage(results):
    want = _reference()
    for rank, r in enumerate(_got(results, "lens")):
        _assert_spectra(r["all"], want, f"rank {rank}, layers='all'")
        _assert_spectra(r["named"], _of(want, "h.1", "h.2"), f"rank {rank}, layers=['h.1', 'h.2']")
        _assert_spectra(r["last_only"], _of(want, "h.3"), f"rank {rank}, a layer of the last stage only")
        _assert_spectra(r["default"], _of(want, "h.3"), f"rank {rank}, the default layer")
        _assert_spectra(r["all_3"], _reference(3), f"rank {rank}, 3 batches")
        assert r["nowhere"] is not None and "['h.9'] match no module of any pipeline stage" in r["nowhere"], r["nowhere"]
        assert r["deep"] == {"layers": 24, "tail_window": list(tail_window(24))}, r["deep"]  # not tail_window(12)
        assert r["hooks"] == 0, r


@pytest.mark.distributed
def test_the_lens_measures_the_stages_of_a_traced_pipeline(results):
    for rank, r in enumerate(_got(results, "traced")):
        _assert_spectra(r["spectra"], _reference(), f"rank {rank}, pipeline() split")
        assert r["hooks"] == 0, r


@pytest.mark.distributed
def test_measuring_a_stage_leaves_pipeline_training_unchanged(results):
    for r in _got(results, "training_unchanged"):
        assert r == {"losses": True, "params": True, "grads": True, "optimizer": True, "training": True,
                     "rng": True, "hooks": 0}, r


# ---------------------------------------------------------------- Interleaved1F1B: two stages on each rank
def _interleaved(rank: int) -> dict:
    """``sl.attach`` on both of a rank's stage modules (one block each: stage ``s`` holds ``h.s``, stages 0 and 2
    on rank 0, 1 and 3 on rank 1) around ``ScheduleInterleaved1F1B`` training steps and forward-only steps."""
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B

    modules, stages = [], []
    for index in (rank, rank + WORLD):
        module = _plain()
        for key in list(module.h.keys()):
            if int(key) != index:
                del module.h[key]
        module.wte = module.wte if index == 0 else None
        module.head = module.head if index == N_LAYERS - 1 else None
        modules.append(module)
        stages.append(PipelineStage(module, index, N_LAYERS, torch.device("cpu")))
    schedule = ScheduleInterleaved1F1B(stages, n_microbatches=MICROBATCHES, loss_fn=_loss)
    out = {}
    for train in (True, False):
        captures = [sl.attach(m, "h.*", precision="float64") for m in modules]
        for batch in _pool():
            _run(schedule, rank, batch, train=train)
        for c in captures:
            c.remove()
        out["train" if train else "eval"] = {k: v for c in captures for k, v in _values(c.compute()).items()}
    out["hooks"] = sum(_hooks(m) for m in modules)
    return out


@pytest.fixture(scope="module")
def results_interleaved(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("pipeline_interleaved"), {"interleaved": _interleaved}, WORLD,
                          pg_timeout_s=PG_TIMEOUT_S, join_s=JOIN_S, preload="torch.distributed.pipelining")


@pytest.mark.slow
@pytest.mark.distributed
def test_attach_under_an_interleaved_schedule_reads_each_microbatch_once(results_interleaved):
    """The second stage of a rank gets its metadata from the first on the same rank (uninitialized tensors
    too): not read either."""
    want = _reference()
    got = checked_case(results_interleaved, "interleaved", None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    for rank, r in enumerate(r["value"] for r in got):
        held = _of(want, f"h.{rank}", f"h.{rank + WORLD}")
        for mode in ("train", "eval"):
            _assert_spectra({f"act:{k}": v for k, v in r[mode].items()}, held, f"rank {rank}, interleaved {mode}")
        assert r["hooks"] == 0, r


# ---------------------------------------------------------------- 4 ranks: 2 pipelines of 2 stages, (pp, dp)
def _pp_dp(rank: int) -> dict:
    """A ``(pp, dp)`` mesh: ranks 0 and 1 hold stage 0, ranks 2 and 3 stage 1; the pipelines are [0, 2] and
    [1, 3]. The default group (the world) would split the pool across the stages: refused when the lens is
    built. The data-parallel group splits the pool across the two pipelines (each runs its share through
    its schedule) and sums each stage's rows over them; every rank gets every stage's spectra."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    pp = mesh["pp"].get_local_rank()
    module = _stage_module(pp)
    stage = PipelineStage(module, pp, 2, torch.device("cpu"), group=mesh["pp"].get_group())
    schedule = ScheduleGPipe(stage, n_microbatches=MICROBATCHES, loss_fn=_loss)
    forward_fn = _forward_fn(schedule, pp)
    out = {}
    try:
        SpectralLens(module, _pool(), layers="all", params=(), forward_fn=forward_fn)
        out["world"] = None
    except ValueError as exc:
        out["world"] = str(exc)
    for key, pool in (("dp", _pool()), ("dp_3", _pool(3))):
        lens = SpectralLens(module, pool, layers="all", params=(), precision="float64", mask_fn=None, progress=False,
                            forward_fn=forward_fn, group=mesh["dp"].get_group())
        out[key] = _values(lens.measure(1, 1).spectra)
    out["hooks"] = _hooks(module)
    return out


@pytest.fixture(scope="module")
def results_4(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("pipeline_4"), {"pp_dp": _pp_dp}, 4, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.pipelining")


@pytest.mark.slow
@pytest.mark.distributed
def test_pipelines_with_data_parallel_replicas_need_the_data_parallel_group(results_4):
    got = checked_case(results_4, "pp_dp", None)
    assert [r["error"] for r in got] == [None] * 4, got
    for rank, r in enumerate(r["value"] for r in got):
        assert r["world"] is not None and r["world"].startswith(f"SpectralLens: the model is stage {rank // 2} of 2"), r
        assert f"holds the pipeline's ranks {[rank % 2, rank % 2 + 2]} together with other ranks" in r["world"], r
        assert "device_mesh['dp'].get_group()" in r["world"], r["world"]
        _assert_spectra(r["dp"], _reference(), f"rank {rank}, group= the dp group")
        _assert_spectra(r["dp_3"], _reference(3), f"rank {rank}, group= the dp group, 3 batches")
        assert r["hooks"] == 0, r
