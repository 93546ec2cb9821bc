"""The framework callbacks on an FSDP2 (``fully_shard``) model, on 2 gloo CPU ranks, one spawn for every case.

Under FSDP every forward all-gathers the weights, so the lens's whole gradient protocol runs on every
rank; the callbacks' :class:`~spectral_lens.integrations._driver.LensDriver` calls ``SpectralLens.measure``
on every rank and keeps only the sinks, the trainer's loggers and the record write on rank 0. Checked here:

* Lightning's ``ModelParallelStrategy`` (its FSDP2 strategy; it runs on the CPU with gloo), the
  ``LightningModule`` sharded in ``configure_model``, the lens built without a model (the callback
  attaches it), dropout on;
* the Hugging Face ``SpectralLensCallback`` driven by a plain torch training loop through the hooks the
  ``Trainer`` calls (``on_train_begin``, ``on_step_end`` after each optimizer step, ``on_train_end``):
  the ``Trainer``'s own FSDP goes through Accelerate, which shards only on accelerators.

For each: every rank measures at the scheduled steps, the spectra (activations and the probe's
per-sample gradients) equal those of the unwrapped model with the same weights (its full state dict at
that step, float64), rank 0 alone writes the run record (and holds the same spectra), and the training
(losses, shards, gradients, optimizer state, RNG stream) is bit-identical to the same run without the
callback.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from support.models import TinyGPT, lm_pool
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import SpectralLens
from spectral_lens.records import RunRecord

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORLD = 2
PARAM = "transformer.h.1.attn.c_proj.weight"
STEPS = 4
MEASURED = [2, 4]


def _net(dropout=0.1):
    torch.manual_seed(0)
    return TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12, dropout=dropout).double()


def _pool():
    return lm_pool(3, batch=4, t=12, vocab=37, seed=1)


def _batches(rank):
    return lm_pool(STEPS, batch=4, t=12, vocab=37, seed=2 + rank)


def _lens(writer, prefix=""):
    from spectral_lens import Schedule

    return SpectralLens(pool=_pool(), params=prefix + PARAM, precision="float64", progress=False,
                        schedule=Schedule(steps=frozenset(MEASURED)), writer=writer)


def _writer(out, rank, name):
    from spectral_lens.records import RunInfo, RunWriter

    return RunWriter(Path(out) / f"{name}-rank{rank}", RunInfo(name, family="fsdp", batch_tier=4, n_layer=2)) \
        if rank == 0 else None


def _full(model):
    """The full state dict (every rank takes part), as lists."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.tolist() for k, v in full.items()}


def _local(t):
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _end_state(model, opt):
    return ({n: _local(p) for n, p in model.named_parameters()},
            {n: _local(p.grad) for n, p in model.named_parameters() if p.grad is not None},
            [_local(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)], torch.rand(3))


def _same(a, b) -> dict:
    return {"params": a[0].keys() == b[0].keys() and all(torch.equal(a[0][n], b[0][n]) for n in a[0]),
            "grads": a[1].keys() == b[1].keys() and all(torch.equal(a[1][n], b[1][n]) for n in a[1]),
            "optimizer": len(a[2]) > 0 and all(torch.equal(x, y) for x, y in zip(a[2], b[2])),
            "rng": torch.equal(a[3], b[3])}


def _history(lens, strip=""):
    return [{"step": m.step, "spectra": {k.replace(strip, ""): v.values.tolist() for k, v in m.spectra.items()}}
            for m in lens.history]


# -- Lightning: ModelParallelStrategy (FSDP2) on the CPU -------------------------------------------------

def _lightning_run(out, rank, with_callback: bool):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from spectral_lens.integrations.lightning import SpectralLensLightningCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()
            self.losses, self.full = [], {}

        def configure_model(self):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.net.transformer.h:
                fully_shard(block, mesh=mesh, reshard_after_forward=False)
            fully_shard(self.net, mesh=mesh, reshard_after_forward=False)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x).flatten(0, 1), y.flatten())
            self.losses.append(loss.item())
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):  # after the callbacks' hook: the weights measured
            if self.global_step in MEASURED:
                self.full[self.global_step] = _full(self.net)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    writer = _writer(out, rank, "lightning") if with_callback else None
    lens = _lens(writer, prefix="net.")
    module = Module()
    torch.manual_seed(1234 + rank)
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, max_steps=STEPS, logger=False,
                         strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
                         callbacks=[SpectralLensLightningCallback(lens)] if with_callback else [],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)
    trainer.fit(module, torch.utils.data.DataLoader(_batches(rank), batch_size=None))
    end = _end_state(module, trainer.optimizers[0])  # the RNG stream's next draws too: before anything else runs
    if writer is not None:
        writer.close()
    return module, end, lens


def _lightning(out, rank):
    # torchrun's variables: Lightning's TorchElasticEnvironment then uses the process group formed already
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      GROUP_RANK="0", TORCHELASTIC_RUN_ID="fsdp-callbacks")
    plain_module, plain_end, _ = _lightning_run(out, rank, False)
    module, end, lens = _lightning_run(out, rank, True)
    return {"history": _history(lens, strip="net."), "full": module.full if rank == 0 else None,
            "losses": module.losses == plain_module.losses and len(module.losses) == STEPS,
            **_same(plain_end, end),
            "attached": lens.model is not None}


# -- the Hugging Face callback, driven by a plain training loop -------------------------------------------

def _hf_run(out, rank, with_callback: bool):
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from spectral_lens.integrations.hf import SpectralLensCallback

    model = _net()
    for block in model.transformer.h:
        fully_shard(block, reshard_after_forward=False)
    fully_shard(model, reshard_after_forward=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    writer = _writer(out, rank, "hf") if with_callback else None
    lens = _lens(writer)
    callback = SpectralLensCallback(lens)
    args, state, control = TrainingArguments(output_dir=str(Path(out) / "hf-args"), report_to=[]), TrainerState(), \
        TrainerControl()
    torch.manual_seed(1234 + rank)
    losses, full = [], {}
    if with_callback:
        callback.on_train_begin(args, state, control, model=model)
    for x, y in _batches(rank):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        state.global_step += 1
        losses.append(loss.item())
        if with_callback:
            callback.on_step_end(args, state, control)
        if state.global_step in MEASURED:
            full[state.global_step] = _full(model)
    if with_callback:
        callback.on_train_end(args, state, control)
        if writer is not None:
            writer.close()
    return losses, _end_state(model, opt), lens, full, state


def _hf(out, rank):
    plain_losses, plain_end, _, _, _ = _hf_run(out, rank, False)
    losses, end, lens, full, state = _hf_run(out, rank, True)
    logged = [sorted(k for k in row if k != "step") for row in state.log_history]
    return {"history": _history(lens), "full": full if rank == 0 else None, "losses": losses == plain_losses,
            **_same(plain_end, end), "attached": lens.model is not None, "logged": logged}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_callbacks")
    cases = {"lightning": functools.partial(_lightning, str(out)), "hf": functools.partial(_hf, str(out))}
    return out, run_gloo_cases(out, cases, WORLD, pg_timeout_s=60, join_s=400, preload="torch.distributed.fsdp")


def _reference(full: dict) -> dict:
    """The unwrapped model loaded with the full weights: the lens's spectra, float64."""
    model = _net()
    model.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in full.items()})
    m = SpectralLens(model, _pool(), params=PARAM, precision="float64", progress=False).measure(1, 1)
    return {k: v.values for k, v in m.spectra.items()}


def _check(results, case: str, run: str, prefix: str = "") -> None:
    out, got = results
    ranks = checked_case(got, case, None)
    for rank, r in enumerate(ranks):
        assert r["error"] is None, (case, rank, r["error"])
    values = [r["value"] for r in ranks]
    full = values[0]["full"]
    assert sorted(int(s) for s in full) == MEASURED
    refs = {int(s): _reference(f) for s, f in full.items()}
    record = RunRecord.open(out / f"{run}-rank0")
    assert [m.step for m in record.measurements] == MEASURED
    assert not (out / f"{run}-rank1").exists()  # rank 1 has no writer: nothing written there
    for rank, v in enumerate(values):
        assert {k: v[k] for k in ("losses", "params", "grads", "optimizer", "rng")} == dict.fromkeys(
            ("losses", "params", "grads", "optimizer", "rng"), True), (case, rank)
        assert not v["attached"], (case, rank)  # detached at the end of the run
        assert [h["step"] for h in v["history"]] == MEASURED, (case, rank)
        for h in v["history"]:
            want = refs[h["step"]]
            assert sorted(h["spectra"]) == sorted(want) and any(k.startswith("grad:") for k in want), (case, rank)
            for name, w in want.items():
                diff = (torch.tensor(h["spectra"][name], dtype=torch.float64) - w).abs().max().item()
                assert diff <= 1e-10 * w.max().item(), (case, rank, h["step"], name, diff)
    for m in record.measurements:  # the record holds rank 0's measurement, under the lens's names
        for name, w in refs[m.step].items():
            diff = (m.spectra[name.replace(':', ':' + prefix, 1)].values.to(torch.float64) - w).abs().max().item()
            assert diff <= 1e-6 * w.max().item(), (case, m.step, name, diff)


def test_lightning_fsdp2_callback_measures_on_every_rank_and_records_on_rank0(results):
    pytest.importorskip("lightning")
    _check(results, "lightning", "lightning", prefix="net.")


def test_hf_callback_on_fsdp2_measures_on_every_rank_and_records_on_rank0(results):
    pytest.importorskip("transformers")
    _check(results, "hf", "hf")
    for rank, r in enumerate(results[1]["hf"]):
        logged = r["value"]["logged"]
        assert (len(logged) == len(MEASURED)) if rank == 0 else (logged == []), (rank, logged)
