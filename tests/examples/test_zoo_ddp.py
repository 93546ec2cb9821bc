"""Data parallelism: 2 gloo processes compute what one process computes for the same effective batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from examples.nanogpt.data import builtin_data
from examples.nanogpt.model import GPT, window_at
from examples.nanogpt.train import accumulate_gradients, load_model, train
from examples.nanogpt.variants import build_config

VARIANT = "AttnScale"   # Muon + Adam groups, value embeddings, a layer without attention, LSWA
KW = dict(variant=VARIANT, profile="tiny", data="pydoc", steps=3, batch_tier=4, val_tokens=2 * 512,
          eval_every_tokens=10**9, verbose=False, device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        grads, loss = _step_gradients(rank, 2)
        if rank == 0:
            torch.save(dict(grads=grads, loss=loss), os.path.join(out, "grads.pt"))
        train(run_dir=os.path.join(out, "run"), **KW)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_match_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)

    # one step's gradients: equal up to fp32 summation order (a wrong reduction scale would show here;
    # Adam and Muon are nearly scale-invariant, so parameters alone could hide it)
    ddp = torch.load(tmp_path / "grads.pt", weights_only=True)
    grads, loss = _step_gradients()
    assert abs(ddp["loss"] - loss) < 1e-6
    assert ddp["grads"].keys() == grads.keys()
    for name, g in grads.items():
        assert torch.allclose(ddp["grads"][name], g, rtol=1e-4, atol=1e-7 * g.abs().max()), name

    # the whole trainer: same parameters after 3 steps (Adam amplifies summation-order rounding on
    # entries whose gradient is ~0, so compare relative to the size of the training update)
    single = train(run_dir=tmp_path / "single", **KW)
    a = load_model(tmp_path / "run" / "ckpt_000003.pt").state_dict()
    b = load_model(tmp_path / "single" / "ckpt_000003.pt").state_dict()
    torch.manual_seed(0)
    init = GPT(build_config(VARIANT, "tiny", eot_id=256)).state_dict()
    flat = lambda sd: torch.cat([sd[n].flatten() for n in b])  # noqa: E731
    diff, update = (flat(a) - flat(b)).norm(), (flat(b) - flat(init)).norm()
    assert update > 1.0 and diff < 1e-3 * update, (float(diff), float(update))
    assert single.history[-1]["val_loss"] < single.history[0]["val_loss"]
