"""Review 23 of the flaky multi-process slow tests: the Lightning ``strategy="ddp"`` refusal test
(tests/integrations/test_review22_revlightuser_ddp.py) relied on two timings that a loaded machine breaks.

- Rank 0 starts its rendezvous wait (``init_process_group``, bounded by the strategy's ``timeout``) before Lightning
  starts the script again for rank 1, so the timeout must cover rank 1's whole Python start-up. On the 2-core
  machine under load its imports alone took 54-57 s, and the test's 60 s timeout failed rank 0 with
  ``DistStoreError: Timed out after 61 seconds waiting for clients. 1/2 clients joined``.
- Rank 1 exited with its refusal's error, and Lightning's child-process observer in rank 0 (polling every 5 s)
  then kills rank 0 with SIGKILL: when rank 0 was slower to reach its own refusal, the test saw rank 1's alone
  and failed on ``refused[:1] == ["REFUSED rank=0"]``.

Here both are made slow on purpose (a ``sitecustomize``): rank 1's start-up by 75 s and rank 0's ``on_fit_start``
by 12 s, as a loaded machine can make them; every rank still refuses, promptly once both are up (slow tier: about
two minutes, most of it the injected sleeps). And the refusals are found in the ranks' interleaved output."""

from __future__ import annotations

import subprocess

import pytest

pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")

START_DELAY_S = 75  # rank 1's start-up: longer than the 60 s timeout the test had, well under its 240 s
REFUSAL_DELAY_S = 12  # rank 0's on_fit_start: longer than the observer's 5 s poll and rank 1's exit

SITE = f'''
import os, time
if os.environ.get("LOCAL_RANK") == "1":  # Lightning's re-run of the script for rank 1
    time.sleep({START_DELAY_S})
elif "LOCAL_RANK" not in os.environ:  # rank 0: the script as the test starts it
    from spectral_lens.integrations import _lightning_hooks

    def _slow(on_fit_start):
        def on_fit_start_later(self, trainer, pl_module):
            time.sleep({REFUSAL_DELAY_S})
            return on_fit_start(self, trainer, pl_module)
        return on_fit_start_later

    _lightning_hooks.LightningHooks.on_fit_start = _slow(_lightning_hooks.LightningHooks.on_fit_start)
'''


def test_refusals_are_found_in_the_ranks_interleaved_output():
    """With ``PYTHONUNBUFFERED=1`` (set on this machine) ``print`` writes its text and newline separately, and two
    ranks printing at once into one pipe interleave: both refusals are found (the lines' starts gave rank 1's alone,
    and the test failed)."""
    from integrations.test_review22_revlightuser_ddp import check_refused, fit_times

    refused = "SpectralLensLightningCallback: ... but Lit defines no forward (Lightning does not need one) ..."
    done = subprocess.CompletedProcess([], 1, stdout=f"FIT rank=0 t=10.5\nFIT rank=1 t=30.25\nREFUSED rank=1 {refused}"
                                       f"REFUSED rank=0 {refused}\n\n", stderr="Traceback ...")
    check_refused(done, after_fit=1.0)
    assert fit_times(done) == {0: 10.5, 1: 30.25}


@pytest.mark.slow
def test_a_slow_rank_1_start_and_a_slow_rank_0_refusal_still_refuse_on_every_rank(tmp_path):
    from integrations.test_review22_revlightuser_ddp import (
        check_refused,
        fit_times,
        run_script,
    )

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITE)
    done, after_fit = run_script(tmp_path, pythonpath=(str(tmp_path / "site"),))
    fits = fit_times(done)
    assert sorted(fits) == [0, 1], (done.stdout + done.stderr)[-3000:]
    assert fits[1] - fits[0] > START_DELAY_S, fits  # the delay did hold rank 1 back
    check_refused(done, after_fit)
    assert after_fit > REFUSAL_DELAY_S, after_fit  # rank 0's refusal was held back too
