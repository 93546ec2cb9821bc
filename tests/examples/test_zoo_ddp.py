"""Data parallelism: 2 gloo processes compute what one process computes for the same effective batch.

Why the trainer comparison runs in float64. The two runs sum the same micro-batch gradients in a
different order, so their gradients differ by rounding: a residue ``r ~ u * S`` with ``u`` the unit
roundoff and ``S`` the summed magnitudes of an entry. Adam's step ``m / (sqrt(v) + eps)`` turns an entry
whose exact gradient is ~0 (cancellation) into a step set by ``r``: in fp32 (``u = 6e-8``, ``S ~ 1e-2``)
``r`` reaches ``eps = 1e-8`` and the step becomes a full ``+-lr`` in a direction chosen by rounding.
Which entries land there depends on the BLAS kernels: in fp32 the runs differed by 2.4e-4 of the
update on an Intel Xeon and by 1.4e-2 on an AMD EPYC with OPENBLAS_CORETYPE=Haswell (the issue's
failure). That is Adam amplifying rounding, not a fault of the data parallelism (the one-step
gradients agree to fp32 rounding). In float64 (``u = 1e-16``) ``r ~ 1e-18 << eps``: Adam divides the
residue by ``eps`` instead of amplifying it, so each step differs by ``<~ lr * r / eps ~ 1e-10 lr``.
For that the model must really compute in float64: Muon's Newton-Schulz on CPU now runs in the
parameter's dtype (it rounded fp64 momenta to fp32, and its quintic has slope ~3.4^5 near zero), and
the logits and RoPE no longer round fp64 activations to fp32. Measured: 1.4e-9 of the update (Intel
Xeon, also with OPENBLAS_CORETYPE=Haswell). The tolerance 1e-6 leaves ~700x for amplification over
the 3 steps and is four orders below the fp32 failure. The one-step gradient check stays in fp32.
"""
import contextlib
import faulthandler
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from examples.nanogpt.data import builtin_data
from examples.nanogpt.model import GPT, window_at
from examples.nanogpt.train import accumulate_gradients, train
from examples.nanogpt.variants import build_config
from support.ranks import gloo_group, run_ranks
from support.teardown import end_rank

VARIANT = "AttnScale"   # Muon + Adam groups, value embeddings, a layer without attention, LSWA
KW = dict(variant=VARIANT, profile="tiny", data="pydoc", steps=3, batch_tier=4, val_tokens=2 * 512,
          eval_every_tokens=10**9, verbose=False, device="cpu")


def _perturbed_model() -> GPT:
    """A model whose gradients are all non-zero (the zero-initialized head would block them)."""
    torch.manual_seed(0)
    model = GPT(build_config(VARIANT, "tiny", eot_id=256))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(std=0.05)
    return model


def _step_gradients(rank: int = 0, world: int = 1) -> tuple[dict, float]:
    model = _perturbed_model()
    loss = accumulate_gradients(model, builtin_data("pydoc").train, step=1, batch_tier=4, rows=1, seq_len=512,
                                window=window_at(model.config, 0.5), rank=rank, world=world)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, float(loss)


@contextlib.contextmanager
def _float64():
    """Build and train the model in float64 (restores the default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _params(ckpt) -> dict:
    """The checkpoint's parameters as saved (``load_model`` would cast them to the default dtype)."""
    return torch.load(ckpt, weights_only=True)["model"]


PG_TIMEOUT_S = 240  # a collective left waiting (the other rank failed) fails instead of waiting 30 minutes
JOIN_S = 420        # both ranks took ~30 s on the 2-core machine under load; a hang is killed at this deadline


def _worker(rank: int, port: int, out: str) -> None:
    # rank 1 died three times with SIGABRT, "terminate called without an active exception" (a C++ std::thread
    # destroyed while joinable). It is torch 2.13's process teardown on CPU (gloo), not this code: a plain gloo
    # script without spectral-lens (init, a few all_reduces, destroy_process_group, exit) aborted the same way in
    # 32 of 237 runs under torchrun, and in 0 of 184 when its ranks ended with os._exit (2026-11-28; see
    # tests/support/teardown.py). So a finished rank ends with end_rank (os._exit; its results are complete on
    # disk, and done.rank<r> says it got there), and a native abort elsewhere prints every thread's Python stack
    # to the captured stderr
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    with gloo_group(rank, port, 2, PG_TIMEOUT_S):
        grads, loss = _step_gradients(rank, 2)
        if rank == 0:
            torch.save(dict(grads=grads, loss=loss), os.path.join(out, "grads.pt"))
        with _float64():
            train(run_dir=os.path.join(out, "run"), **KW)
        dist.barrier()  # both ranks done before either tears the group down
    Path(out, f"done.rank{rank}").write_text("ok")
    end_rank()


@pytest.mark.distributed
def test_two_gloo_ranks_match_single_process(tmp_path):
    # support.ranks.run_ranks: mp.spawn on a bare free_port() failed the test when another process took the port
    # before rank 0 bound it; run_ranks launches again on a new port, and kills a rank still running at JOIN_S
    hung = run_ranks(_worker, 2, tmp_path, JOIN_S)
    assert hung == [], f"ranks {hung} still running after {JOIN_S} s (killed)"
    assert sorted(p.name for p in tmp_path.glob("done.rank*")) == ["done.rank0", "done.rank1"], \
        "a rank failed before the end (its traceback is in the captured stderr)"

    # one step's gradients: equal up to fp32 summation order (a wrong reduction scale would show here;
    # Adam and Muon are nearly scale-invariant, so parameters alone could hide it)
    ddp = torch.load(tmp_path / "grads.pt", weights_only=True)
    grads, loss = _step_gradients()
    assert abs(ddp["loss"] - loss) < 1e-6
    assert ddp["grads"].keys() == grads.keys()
    for name, g in grads.items():
        assert torch.allclose(ddp["grads"][name], g, rtol=1e-4, atol=1e-7 * g.abs().max()), name

    # the whole trainer in float64: same parameters after 3 steps (see the module docstring for the bound)
    with _float64():
        single = train(run_dir=tmp_path / "single", **KW)
        torch.manual_seed(0)
        init = GPT(build_config(VARIANT, "tiny", eot_id=256)).state_dict()
    a, b = _params(tmp_path / "run" / "ckpt_000003.pt"), _params(tmp_path / "single" / "ckpt_000003.pt")
    assert all(t.dtype == torch.float64 for t in b.values() if t.is_floating_point())
    flat = lambda sd: torch.cat([sd[n].flatten() for n in b])  # noqa: E731
    diff, update = (flat(a) - flat(b)).norm(), (flat(b) - flat(init)).norm()
    assert update > 1.0 and diff < 1e-6 * update, (float(diff), float(update))
    assert single.history[-1]["val_loss"] < single.history[0]["val_loss"]
