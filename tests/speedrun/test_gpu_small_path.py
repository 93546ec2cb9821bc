"""The ``gpu-small`` preset's code path (windowed trunk, FlexAttention) on the CPU at tiny sizes.

No GPU here: this runs the same workload code with the preset's settings (windowed family, packed
long row, measurement schedule) at the tiny profile. FlexAttention's backward is not implemented on the
CPU (torch 2.13 raises NotImplementedError), so training here uses the dense form of the same window
mask (the two masks are tested equal in ``tests/examples/test_zoo_attention.py``); bf16 autocast is
CUDA-only in the trainer and the lens.
"""
import math


import examples.nanogpt.model as zoo_model
from examples.speedrun.presets import PRESETS
from examples.speedrun.workload import ZooWorkload
from spectral_lens.records import RunRecord


def test_gpu_small_path_runs_on_cpu_at_tiny_sizes(tmp_path, monkeypatch):
    g = PRESETS["gpu-small"]
    assert g.attn_impl == "flex" and g.families[0] == "FixedWin"
    p = g.replace(profile="tiny", data="pydoc", device="cpu", families=g.families[:1], tiers=(1, 2), attn_impl="dense",
                  reference_tier=1, budget=5120, rungs=(4096,), val_tokens=1024, pool_seqs=8,
                  pool_seq_len=128, gradient_samples=8, measure_every=0.1, tail_window=(4, 12), head_window=(1, 4))
    calls = []
    real = zoo_model.dense_window_mask
    monkeypatch.setattr(zoo_model, "dense_window_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = ZooWorkload(p, verbose=False)
    rd = w.run("FixedWin", 1, w.reference_lrs("FixedWin"), tmp_path / "fixedwin-b1")
    assert calls  # the windowed (document-aware sliding window) path ran
    r = RunRecord.open(rd)
    assert r.info.extras["status"] == "complete" and r.run_id == "fixedwin-b1"
    assert len(r.measurements) == 11 and r.info.extras["device"] == "cpu"  # 10 steps of one 512-token row
    _, losses = r.val_curve()
    # the tuner's trainable with the same settings (schedule over the run budget)
    t = w.trainable()
    from examples.tune.trainable import Candidate

    c = Candidate("FixedWin", 1, 1.0, w.reference_lrs("FixedWin"))
    seen = []
    t(c, 4096, horizon=4096, workdir=tmp_path / "trial", report=lambda tok, loss: seen.append((tok, loss)))
    assert t.schedule_tokens == 5120 and t.attn_impl == "dense" and seen[-1][0] == 4096
    assert all(math.isfinite(x) for _, x in seen)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
