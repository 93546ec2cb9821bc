"""``SpectralLens`` and ``PerSampleGradientProbe`` on FSDP-sharded models, on 2 gloo CPU ranks.

FSDP2 (``fully_shard`` per block and on the root, ``reshard_after_forward`` True and False; the root
alone) and FSDP1 (``FullyShardedDataParallel(device_id=cpu)``, ``use_orig_params`` True and False).
Activations are whole on every rank, so the lens's activation spectra must equal the unwrapped model's
(float64, one process, computed by the test process). Every forward of an FSDP model all-gathers its
weights over the mesh, so every rank must run as many forwards. Before the fix, a pool whose length is
not a multiple of the world size (3 batches on 2 ranks: rank 0 forwards 2, rank 1 one) left rank 0
waiting in an all-gather that rank 1 answered with the lens's agreement: a gloo timeout on every rank
(or a pool of 1 batch); and the probe was accepted on an FSDP model, whose gradient protocol (on rank
0 alone) then waited in FSDP's all-gathers.

One spawn runs every case, each followed by a barrier (:func:`support.ranks.run_cases`), so a case that
left the ranks in mismatched collectives shows up there (or as a timeout).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from spectral_lens import PerSampleGradientProbe, SpectralLens

from support.models import TinyGPT, lm_pool
from support.ranks import case_results, gloo_group, run_cases, run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORLD = 2
PG_TIMEOUT_S = 15  # a collective left waiting fails after this (the default is 30 min for gloo)
JOIN_S = 240.0
PARAM = "transformer.h.1.attn.c_proj.weight"


def _plain(dropout=0.0):
    torch.manual_seed(0)
    return TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12, dropout=dropout).double()


def _pool(n):
    return lm_pool(n, batch=4, t=12, vocab=37, seed=1)


def _fsdp2(per_block=True, reshard=True, dropout=0.0):
    from torch.distributed.fsdp import fully_shard

    model = _plain(dropout)
    if per_block:
        for block in model.transformer.h:
            fully_shard(block, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return model


def _fsdp1(orig):
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(_plain(), device_id=torch.device("cpu"), use_orig_params=orig)


def _values(model, n_batches, params=PARAM):
    m = SpectralLens(model, _pool(n_batches), params=params, precision="float64", progress=False).measure(1, 1)
    return {k.replace("_fsdp_wrapped_module.", ""): {"values": v.values.tolist(), "n_rows": v.n_rows}
            for k, v in m.spectra.items()}


def _local(model):  # each parameter's local shard (FSDP2: a DTensor's; FSDP1: the flat parameter's)
    out = {}
    for name, p in model.named_parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        out[name] = (type(p).__name__, t.detach().clone())
    return out


def _activations(build, n_batches, params=PARAM):
    """The spectra, and the parameters' classes before and after (FSDP2: sharded DTensors registered)."""
    model = build()
    before = [type(p).__name__ for p in model.parameters()]
    return {"spectra": _values(model, n_batches, params), "before": before,
            "after": [type(p).__name__ for p in model.parameters()]}


def _state_kept(rank):
    """After a measurement of a model kept unsharded after forward (reshard_after_forward=False), the
    parameters are still the same sharded DTensors with the same shards, in training mode."""
    model = _fsdp2(reshard=False, dropout=0.1)
    model.train()
    before = _local(model)
    _values(model, 2)
    after = _local(model)
    return {"same_types": [before[n][0] for n in before] == [after[n][0] for n in after],
            "types": sorted({t for t, _ in after.values()}),
            "same_shards": all(torch.equal(before[n][1], after[n][1]) for n in before),
            "training": all(m.training for m in model.modules())}


def _train(measure: bool):
    """Three AdamW steps of the FSDP2 model (dropout on, reshard_after_forward=False), a lens measurement
    between each backward and optimizer step when ``measure`` (where gradient clipping goes); the losses
    and the local shards, grads and optimizer state after them, and the RNG stream."""
    model = _fsdp2(reshard=False, dropout=0.1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lens = SpectralLens(model, _pool(2), params=PARAM, precision="float64", progress=False)
    torch.manual_seed(1234 + dist.get_rank())
    losses = []
    for step, (x, y) in enumerate(lm_pool(3, batch=4, t=12, vocab=37, seed=2 + dist.get_rank()), start=1):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if measure:  # with the step's gradients in .grad
            lens.measure(step, step)
        opt.step()
        opt.zero_grad(set_to_none=False)
        losses.append(loss.item())
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731 - left unsharded: whole
    shards = {n: local(p) for n, p in model.named_parameters()}
    grads = {n: local(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    state = [v.to_local() for s in opt.state.values() for v in s.values() if hasattr(v, "to_local")]
    return losses, shards, grads, state, torch.rand(3)


def _training_identical(rank):
    a, b = _train(False), _train(True)
    return {"losses": a[0] == b[0],
            "params": all(a[1][n].shape == b[1][n].shape and torch.equal(a[1][n], b[1][n]) for n in a[1]),
            "grads": a[2].keys() == b[2].keys() and all(torch.equal(a[2][n], b[2][n]) for n in a[2]),
            "optimizer": len(a[3]) > 0 and all(torch.equal(x, y) for x, y in zip(a[3], b[3])),
            "rng": torch.equal(a[4], b[4])}


def _errors(*builds):
    out = []
    for build in builds:
        try:
            build()
            out.append(None)
        except Exception as exc:  # noqa: BLE001 - recorded for the parent
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def _probe_alone(rank):
    """A PerSampleGradientProbe of its own on an FSDP2 model (reshard_after_forward False), every rank
    updating with the same batches: every rank's spectrum (compared by the parent), the shards and .grad
    (None) untouched."""
    model = _fsdp2(reshard=False)
    before = _local(model)
    probe = PerSampleGradientProbe(model, params=PARAM)
    for batch in _pool(2):
        probe.update(batch)
    after = _local(model)
    return {"values": probe.compute().values.tolist(), "engines": probe.engines_,
            "untouched": [v[0] for v in before.values()] == [v[0] for v in after.values()]
            and all(torch.equal(before[n][1], after[n][1]) for n in before),
            "no_grads": all(p.grad is None for p in model.parameters())}


def _probe_refused(rank):
    """The vmap and loop engines on an FSDP model: refused at construction, by a lens, and (a probe bound
    before fully_shard, which works in place) by update before any pass, with the model untouched."""
    from torch.distributed.fsdp import fully_shard

    plain = _plain()
    bound = PerSampleGradientProbe(plain, params=PARAM, engine="vmap")
    for block in plain.transformer.h:
        fully_shard(block)
    fully_shard(plain)
    before = _local(plain)
    errors = _errors(lambda: PerSampleGradientProbe(_fsdp2(), params=PARAM, engine="vmap"),
                     lambda: SpectralLens(_fsdp2(), _pool(2), probe=PerSampleGradientProbe(params=PARAM, engine="loop")),
                     lambda: PerSampleGradientProbe(_fsdp1(True), params="**h.1.attn.c_proj.weight"),
                     lambda: bound.update(_pool(1)[0]),
                     lambda: PerSampleGradientProbe(_fsdp1(False), params="**.h.1.attn.c_proj.weight"))
    after = _local(plain)
    return {"errors": errors, "untouched": all(torch.equal(before[n][1], after[n][1]) for n in before),
            "no_grads": all(p.grad is None for p in plain.parameters()), "samples": bound.n_samples_}


def _lens_with_probe_bound_before_sharding(rank):
    """A lens whose vmap probe was bound before fully_shard: every rank (all run the gradient protocol
    under FSDP) raises the refusal before any pass, and the barrier after it passes."""
    from torch.distributed.fsdp import fully_shard

    model = _plain()
    lens = SpectralLens(model, _pool(2), probe=PerSampleGradientProbe(params=PARAM, engine="vmap"), progress=False)
    fully_shard(model)
    lens.measure(1, 1)


def _probe_of_gathered_copy(rank):
    """The documented way to gradient spectra: gather the full weights, load them into a plain model on
    rank 0, probe that. Returns its spectrum (compared with the unwrapped model's by the parent)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = _fsdp2()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # every rank
    if rank != 0:
        return None
    copy = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12).double()
    copy.load_state_dict(full)
    probe = PerSampleGradientProbe(copy, params=PARAM)
    for batch in _pool(2):
        probe.update(batch)
    return probe.compute().values.tolist()


def _forward_fails_on_rank1(rank):
    """Rank 1's batch has out-of-vocabulary ids: its forward raises after FSDP's first all-gathers, rank 0
    waits in the next one (the forwards are collectives, so this cannot be agreed) until the process-group
    timeout; rank 1 raises its own error (at once since test_rank_failures.py's fix; before that, after
    waiting for the timeout in the lens's agreement; before that, the agreement's timeout hid it). Leaves
    the group broken: runs last."""
    pool = _pool(2)
    pool[1] = (pool[1][0] + 1000, pool[1][1])
    SpectralLens(_fsdp2(), pool, params=(), progress=False).measure(1, 1)


# the activation cases: (build on each rank, number of pool batches)
ACTIVATIONS = {
    "fsdp2_even": (_fsdp2, 4),
    "fsdp2_keep_unsharded": (functools.partial(_fsdp2, reshard=False), 2),
    "fsdp2_uneven": (_fsdp2, 3),
    "fsdp2_one_batch": (_fsdp2, 1),
    "fsdp2_keep_unsharded_uneven": (functools.partial(_fsdp2, reshard=False), 3),
    "fsdp2_root_only": (functools.partial(_fsdp2, per_block=False), 3),
    "fsdp1_orig_params": (functools.partial(_fsdp1, True), 3, ()),  # the probe refuses FSDP1: below
    "fsdp1_flat_params": (functools.partial(_fsdp1, False), 3, ()),  # no matrix to name: refused below
}
# cases that could leave the ranks in mismatched collectives run last, so they cannot mask the others
# (before the fix an uneven pool timed out and broke the process group: the even pools go first)
CASES = ["probe_alone", "probe_refused", "probe_of_gathered_copy", "state_kept", "training_identical", *ACTIVATIONS,
         "lens_with_probe_bound_before_sharding", "forward_fails_on_rank1"]


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, port, WORLD, PG_TIMEOUT_S):
        dist.barrier()
        cases = {"probe_alone": functools.partial(_probe_alone, rank),
                 "probe_refused": functools.partial(_probe_refused, rank),
                 "probe_of_gathered_copy": functools.partial(_probe_of_gathered_copy, rank),
                 "state_kept": functools.partial(_state_kept, rank),
                 "training_identical": functools.partial(_training_identical, rank),
                 **{case: functools.partial(_activations, *spec) for case, spec in ACTIVATIONS.items()},
                 "lens_with_probe_bound_before_sharding": functools.partial(_lens_with_probe_bound_before_sharding, rank),
                 "forward_fails_on_rank1": functools.partial(_forward_fails_on_rank1, rank)}
        run_cases(out, rank, cases)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    hung = run_ranks(_worker, WORLD, out, JOIN_S)
    assert not hung, f"ranks {hung} hung"
    return case_results(out, CASES, WORLD)


def _ok(results, case) -> list:
    got = results[case]
    assert all(r is not None for r in got), f"{case}: a rank wrote no result: {got}"
    for rank, r in enumerate(got):
        assert r["error"] is None, f"{case} on rank {rank}: {r['error']}"
        assert r["barrier"] == "ok", f"{case} on rank {rank}: the barrier after it failed: {r['barrier']}"
    return [r["value"] for r in got]


@pytest.mark.parametrize("case", list(ACTIVATIONS))
def test_activation_spectra_equal_the_unwrapped_models(results, case):
    n_batches = ACTIVATIONS[case][1]
    params = () if case.startswith("fsdp1") else PARAM
    ref = SpectralLens(_plain(), _pool(n_batches), params=params, precision="float64", progress=False).measure(1, 1)
    for rank, got in enumerate(_ok(results, case)):
        assert got["after"] == got["before"], (case, rank)  # FSDP2: the sharded DTensors, registered again
        if case.startswith("fsdp2"):
            assert set(got["before"]) == {"DTensor"}
        got = got["spectra"]
        assert sorted(got) == sorted(ref.spectra), (case, rank)
        for name, spectrum in ref.spectra.items():
            assert got[name]["n_rows"] == spectrum.n_rows == n_batches * (4 * 12 if name.startswith("act") else 4)
            want = spectrum.values
            diff = (torch.tensor(got[name]["values"], dtype=torch.float64) - want).abs().max().item()
            assert diff <= 1e-12 * want.max().item(), (case, rank, name, diff)


def test_measurement_leaves_the_fsdp_state_alone(results):
    for got in _ok(results, "state_kept"):
        assert got == {"same_types": True, "types": ["DTensor"], "same_shards": True, "training": True}


def test_training_steps_are_bit_identical_with_measurements(results):
    for got in _ok(results, "training_identical"):
        assert got == {"losses": True, "params": True, "grads": True, "optimizer": True, "rng": True}


def _probe_reference():
    probe = PerSampleGradientProbe(_plain(), params=PARAM)
    for batch in _pool(2):
        probe.update(batch)
    return probe.compute().values


def test_probe_alone_measures_the_full_weight_on_every_rank(results):
    want = _probe_reference()
    for rank, got in enumerate(_ok(results, "probe_alone")):
        assert got["engines"] == {PARAM: "fast"} and got["untouched"] and got["no_grads"], rank
        diff = (torch.tensor(got["values"], dtype=torch.float64) - want).abs().max().item()
        assert diff <= 1e-12 * want.max().item(), (rank, diff)


def test_probe_refuses_other_engines_under_fsdp_before_any_pass(results):
    for got in _ok(results, "probe_refused"):
        assert got["untouched"] and got["no_grads"] and got["samples"] == 0
        assert "flattened the parameters into ['_fsdp_wrapped_module._flat_param']" in got["errors"].pop()
        for error in got["errors"]:
            assert error is not None and error.startswith("ValueError: PerSampleGradientProbe: ")
            assert "sharded with FSDP" in error and "params=()" in error and "get_model_state_dict" in error
        assert "<the model>" in got["errors"][0] and "transformer.h.0" in got["errors"][0]
        assert "vmap" in got["errors"][0] and "FSDP1's FullyShardedDataParallel" in got["errors"][2]


def test_lens_refuses_a_probe_bound_before_sharding_on_every_rank(results):
    for r in results["lens_with_probe_bound_before_sharding"]:
        assert r["error"].startswith("ValueError: PerSampleGradientProbe: ") and "sharded with FSDP" in r["error"]
        assert r["barrier"] == "ok"


def test_probe_of_the_gathered_copy_equals_the_unwrapped_model(results):
    got = _ok(results, "probe_of_gathered_copy")
    assert got[1] is None
    want = _probe_reference()
    diff = (torch.tensor(got[0], dtype=torch.float64) - want).abs().max().item()
    assert diff <= 1e-12 * want.max().item(), diff


def test_a_failed_forward_shows_its_own_error_after_the_timeout(results):
    r0, r1 = results["forward_fails_on_rank1"]
    assert r1["error"].startswith("IndexError: index out of range"), r1["error"]
    assert r0["error"].startswith("RuntimeError: "), r0["error"]  # gloo's timeout or closed connection
