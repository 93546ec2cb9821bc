"""Review 29 (revdriver), 2 gloo ranks: a warning of the integrations' driver raised as an error (``-W error``:
``warnings.simplefilter("error")``) raises on every rank alike, within seconds, the ranks in step afterwards.

* the Hugging Face callback's label-smoothing warning (the probe's own ``label_smoothing`` differs from the
  trainer's), a plain model over the world group: since the lead's commit "hf: the smoothing warning is given through
  warn_on_rank0" it is given at rank 0's agreed work after the measurement; before it, rank 0 raised it before
  measuring and rank 1 waited in the measurement's first collective until the process-group timeout (20 s here);
* :meth:`LensDriver.warn_on_rank0` under a tensor-parallel model whose lens ``group`` is each rank's own (one rank of
  the mesh): each rank is its group's rank 0 and gives it, so both raise (a regression guard).
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch.distributed as dist
from support.ranks import checked_case, run_gloo_cases

WORLD = 2
PG_TIMEOUT_S = 20
DEADLINE_S = 15.0
JOIN_S = 400.0
SAID = "built with label_smoothing=0.05"


def _hf_smoothing_error(rank: int) -> dict:
    from support.models import TinyGPT, lm_batch

    from spectral_lens import PerSampleGradientProbe, SpectralLens
    from spectral_lens.integrations import SpectralLensCallback

    model = TinyGPT().eval()
    probe = PerSampleGradientProbe(model, "transformer.h.1.attn.c_proj.weight", label_smoothing=0.05)
    lens = SpectralLens(model, [lm_batch(m=2, seed=s) for s in range(2)], layers=["transformer.h.1"], probe=probe,
                        progress=False, tail_window=(4, 16))
    callback = SpectralLensCallback(lens)
    state = types.SimpleNamespace(global_step=1, num_input_tokens_seen=0, log_history=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback._measure(state, types.SimpleNamespace(label_smoothing_factor=0.0))
    return {}


def _tp_own_group_error(rank: int) -> dict:
    from reliability.test_review29_drivertp import _lens

    from spectral_lens.integrations._driver import LensDriver

    driver = LensDriver(_lens(rank), (), None)
    driver.warn_on_rank0("a warning about the run (simulated)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*the tail window")  # (the shared lens's small layers)
        driver.measure(1, 1)
    return {}


CASES = {"hf_smoothing_error": _hf_smoothing_error, "tp_own_group_error": _tp_own_group_error}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
    assert not dist.is_initialized()
    return run_gloo_cases(tmp_path_factory.mktemp("revdriver"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="spectral_lens.integrations.hf")


@pytest.mark.slow
@pytest.mark.distributed
def test_the_hf_smoothing_warning_as_an_error_raises_on_every_rank_alike(results):
    r0, r1 = [r["error"] or "" for r in checked_case(results, "hf_smoothing_error", DEADLINE_S)]
    assert r0.startswith("SpectralLensWarning: SpectralLensCallback: the trainer trains with label_smoothing_factor=0")
    assert SAID in r0, r0
    assert r1.startswith("RuntimeError: SpectralLens: a sink's log_measurement or the trainer's loggers failed on "
                         "global rank(s) [0]"), r1


@pytest.mark.slow
@pytest.mark.distributed
def test_a_driver_warning_as_an_error_raises_on_both_mesh_peers_under_their_own_groups(results):
    got = [r["error"] or "" for r in checked_case(results, "tp_own_group_error", DEADLINE_S)]
    assert all(e.startswith("SpectralLensWarning: a warning about the run (simulated)") for e in got), got
