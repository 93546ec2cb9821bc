"""The ``SpectralLensCallback`` in a real ``transformers.Trainer`` under 2-process DDP (gloo, CPU; slow tier, about
45 s on the 2-core machine): a config-built GPT-2 with dropout, the ``RunWriter`` on rank 0, the lens measuring
every 2 steps, a loss logged and an evaluation every 2 steps (``tests/support/hf_ddp.py`` runs the ranks, in one
pair of processes). Checked: no hang (a join deadline, a 60 s collective timeout), rank 0's record
(measurements, ``train_loss`` and ``val_loss`` events, ``RunInfo.tokens_per_step``), the loggers' values on
rank 0 only, the activation spectra on both ranks against a one-process float64 reference over the same pool,
training bit-identical to training without the callback, the final ``train_loss`` of a run that logged none, a
resume from a checkpoint, a measurement failing on rank 1 (agreed: both ranks raise, in step), and a poisoned
training batch on rank 1: both ranks end within seconds, rank 0's record marked failed."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PG_TIMEOUT_S = 60.0  # a collective left waiting fails after this (so a hang shows as the timeout's error)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results of every case (one pair of processes: the poisoned case last, as it ends them)."""
    from support import hf_ddp
    from support.ranks import case_results, run_ranks

    out = tmp_path_factory.mktemp("hfddp")
    worker = functools.partial(hf_ddp.worker, pg_timeout_s=PG_TIMEOUT_S)
    hung = run_ranks(worker, hf_ddp.WORLD, out, join_s=400)
    return {"_hung": hung, "out": out, **case_results(out, hf_ddp.CASES, hf_ddp.WORLD)}


def _ok(ranks, case):
    got = ranks[case]
    assert ranks["_hung"] == [], f"ranks still running at the deadline (killed): {ranks['_hung']}"
    assert None not in got, f"{case}: no result from a rank: {got}"
    assert [r["error"] for r in got] == [None, None], [r.get("traceback") for r in got]
    assert [r["barrier"] for r in got] == ["ok", "ok"], got
    return [r["value"] for r in got]


def _normalized(values) -> torch.Tensor:
    v = torch.tensor(values, dtype=torch.float64)
    return v / v.sum()


def test_trainer_under_ddp_records_on_rank0_and_measures_the_whole_pool(ranks):
    from safetensors.torch import load_file
    from support.hf_ddp import (
        TOKENS_PER_STEP,
        heldout_pool,
        reference_spectrum,
        tiny_gpt2,
    )

    import spectral_lens as sl

    r0, r1 = _ok(ranks, "train")
    assert [r0["process_index"], r1["process_index"]] == [0, 1] and r0["world"] == 2
    assert r0["wrapped"] == r1["wrapped"] == "DistributedDataParallel"
    want_steps = [[s, s * TOKENS_PER_STEP] for s in (2, 4, 6)]
    assert r0["history"] == r1["history"] == r0["measured"] == want_steps
    assert r0["detached"] and r1["detached"]  # the callback attached the lens for the run only, on every rank
    assert r0["run_json"]["tokens_per_step"] == TOKENS_PER_STEP

    # train_loss events at the logged steps: the trainer's loss (gathered over the ranks) with a throughput
    trainer_loss = {h["step"]: h["loss"] for h in r0["logs"] if "loss" in h}
    assert trainer_loss == {h["step"]: h["loss"] for h in r1["logs"] if "loss" in h}  # the same on both ranks
    train = [e for e in r0["events"] if "train_loss" in e]
    assert [[e["step"], e["tokens"]] for e in train] == want_steps
    assert [e["train_loss"] for e in train] == [trainer_loss[s] for s in (2, 4, 6)]
    assert all(e["tokens_per_s"] > 0 for e in train)
    # the evaluations fell on measured steps: their losses are val_loss events (the eval_loss of both ranks)
    eval_loss = {h["step"]: h["eval_loss"] for h in r0["logs"] if "eval_loss" in h}
    assert eval_loss == {h["step"]: h["eval_loss"] for h in r1["logs"] if "eval_loss" in h}
    val = [e for e in r0["events"] if "val_loss" in e]
    assert [[e["step"], e["val_loss"]] for e in val] == [[s, eval_loss[s]] for s in (2, 4, 6)]

    # the loggers (a report_to callback's on_log, and log_history) got the scalars on rank 0 only
    for key in ("logs", "log_history"):
        lens_logs = [h for h in r0[key] if any(k.startswith("spectral_lens/") for k in h)]
        assert [h["step"] for h in lens_logs if "spectral_lens/noise_scale" in h] == [2, 4, 6], key
        assert [(h["step"], h["spectral_lens/val_loss"]) for h in lens_logs if "spectral_lens/val_loss" in h] == \
            [(s, eval_loss[s]) for s in (2, 4, 6)], key
        assert not [h for h in r1[key] if any(k.startswith("spectral_lens/") for k in h)], key
    # rank 0's loggers got the record's summaries and noise scale, each at its step
    logged = {h["step"]: h for h in r0["logs"] if "spectral_lens/noise_scale" in h}
    for step in ("2", "4", "6"):
        for name, summaries in r0["summaries"][step].items():
            for k in ("alpha_tail", "alpha_head", "rankme", "stable_rank"):
                got, want = logged[int(step)][f"spectral_lens/{name}/{k}"], summaries.get(k, math.nan)
                assert got == want or (math.isnan(got) and math.isnan(want)), (step, name, k, got, want)
        assert logged[int(step)]["spectral_lens/noise_scale"] == r0["scalars"][step]["noise_scale"]
    assert not math.isnan(logged[6]["spectral_lens/act:transformer.h.1/alpha_tail"])  # the record's window (4, 16)

    # the activation spectra: the whole pool (3 batches on 2 ranks: 96 rows) on both ranks, as one process
    assert set(r0["spectra"]["6"]) == {"act:transformer.h.1", "grad:transformer.h.1.attn.c_proj.weight"}
    assert r0["n_rows"]["act:transformer.h.1"] == 3 * 2 * 16
    for step in ("2", "4", "6"):
        weights = load_file(str(ranks["out"] / f"weights{step}.safetensors"))
        want = reference_spectrum(weights)
        for r in (r0, r1):
            got = _normalized(r["spectra"][step]["act:transformer.h.1"])
            assert (got - want).abs().max() < 1e-12 * want.max(), (step, (got - want).abs().max())
    # the gradient spectrum (rank 0 measures the whole gradient pool, then broadcasts): a one-process lens's
    final = tiny_gpt2()
    final.load_state_dict(load_file(str(ranks["out"] / "weights6.safetensors")))
    one = sl.SpectralLens(final, heldout_pool(), precision="float64", tail_window=(4, 16), progress=False).measure(6, 0).spectra
    key = "grad:transformer.h.1.attn.c_proj.weight"
    for r in (r0, r1):
        got, want = torch.tensor(r["spectra"]["6"][key], dtype=torch.float64), one[key].values
        assert (got - want).abs().max() < 1e-10 * want.max()


def test_measuring_leaves_the_ddp_training_bit_identical(ranks):
    """Dropout on: the measurements (both ranks' forwards, rank 0's gradient passes) change neither the trained
    weights nor the logged losses."""
    from safetensors.torch import load_file

    measured, plain = _ok(ranks, "train"), _ok(ranks, "plain")
    for r, p in zip(measured, plain):
        assert [h["loss"] for h in r["log_history"] if "loss" in h] == p["losses"]
    got = load_file(str(ranks["out"] / "weights6.safetensors"))
    want = load_file(str(ranks["out"] / "weights_plain.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_run_that_logged_no_loss_records_the_final_train_loss_once(ranks):
    r0, r1 = _ok(ranks, "short")
    (final,) = r0["final_train_loss"]
    assert r1["final_train_loss"] != [final]  # rank 0's own mean (the trainer does not gather it), as documented
    assert [[e["step"], e["train_loss"]] for e in r0["events"] if "train_loss" in e] == [[2, final]]
    assert r1["events"] is None


def test_a_run_resumed_from_a_checkpoint_records_each_step_once(ranks):
    """Crashed after step 5 (on every rank), resumed from checkpoint-2 with ``eval_on_start``: rank 0's record
    drops steps 3-5 and holds each step's measurement, train_loss and val_loss once."""
    r0, r1 = _ok(ranks, "resume")
    assert r0["history"] == r1["history"] == [[2, 4], [4, 6]]
    assert r0["measured"] == [[s, s * 64] for s in (2, 4, 6)]
    assert r0["events"] == [[s, k] for s in (2, 4, 6) for k in ("train_loss", "val_loss")]


def test_a_measurement_that_fails_on_rank1_raises_on_every_rank_at_once(ranks):
    assert ranks["_hung"] == [], f"ranks still running at the deadline (killed): {ranks['_hung']}"
    r0, r1 = ranks["measurement_fails"]
    assert r1["error"] == "RuntimeError: bad held-out batch on rank 1", r1
    assert r0["error"].startswith("RuntimeError: SpectralLens: the activation pass failed on global rank(s) [1]"), r0
    assert [r0["barrier"], r1["barrier"]] == ["ok", "ok"]  # the ranks made the same collectives
    assert abs(r0["ended"] - r1["ended"]) < PG_TIMEOUT_S / 2
    out = ranks["out"]
    states = [json.loads((out / f"measurement_fails.state.rank{r}.json").read_text()) for r in (0, 1)]
    assert states == [{"history": [2], "global_step": 4, "detached": True}] * 2, states
    header = json.loads((out / "measurement_fails" / "run.json").read_text())
    assert header["extras"]["status"] == "failed"
    assert header["extras"]["failure"].startswith("RuntimeError: SpectralLens: the activation pass failed"), header


def test_a_poisoned_batch_on_rank1_ends_every_rank_and_marks_the_record_failed(ranks):
    assert ranks["_hung"] == [], f"ranks still running at the deadline (killed): {ranks['_hung']}"
    r0, r1 = ranks["poisoned"]
    assert r0 is not None and r1 is not None, ranks["poisoned"]
    assert r1["error"].startswith("IndexError: index out of range"), r1
    assert r0["error"] is not None and r0["value"] is None, r0
    # rank 0 did not wait for the process-group timeout: gloo failed its collective once rank 1 left
    assert r0["ended"] - r1["ended"] < PG_TIMEOUT_S / 2, (r0["ended"] - r1["ended"], r0["error"])
    assert "timeout" not in r0["error"].lower() and "timed out" not in r0["error"].lower(), r0["error"]
    out = ranks["out"]
    steps = [json.loads((out / f"poisoned.history.rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["history"] for s in steps] == [[2], [2]], steps
    header = json.loads((out / "poisoned" / "run.json").read_text())
    assert header["extras"]["status"] == "failed", header
    assert header["extras"]["failure"].startswith(r0["error"].split(":")[0]), (header, r0["error"])
    from spectral_lens.records import RunRecord

    record = RunRecord.open(out / "poisoned")
    assert [m.step for m in record.measurements] == [2]
    assert [(e["step"], "train_loss" in e, "val_loss" in e) for e in record.events] == [(2, True, False), (2, False, True)]
