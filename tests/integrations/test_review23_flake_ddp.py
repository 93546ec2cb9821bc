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
by 12 s, as a loaded machine can make them; every rank still refuses, promptly once both are up. Slow tier
(about two minutes, most of it the injected sleeps)."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")

pytestmark = pytest.mark.slow

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


def test_a_slow_rank_1_start_and_a_slow_rank_0_refusal_still_refuse_on_every_rank(tmp_path):
    from integrations.test_review22_revlightuser_ddp import check_refused, run_script

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITE)
    done, after_fit = run_script(tmp_path, pythonpath=(str(tmp_path / "site"),))
    fits = {line.split(" t=")[0]: float(line.split(" t=")[1]) for line in done.stdout.splitlines()
            if line.startswith("FIT rank=")}
    assert sorted(fits) == ["FIT rank=0", "FIT rank=1"], (done.stdout + done.stderr)[-3000:]
    assert fits["FIT rank=1"] - fits["FIT rank=0"] > START_DELAY_S, fits  # the delay did hold rank 1 back
    check_refused(done, after_fit)
    assert after_fit > REFUSAL_DELAY_S, after_fit  # rank 0's refusal was held back too
