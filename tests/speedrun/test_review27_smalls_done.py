"""Review 27 (smalls): the speedrun's final ``done in ...`` line printed ``pooled rho nan (p = nan)`` where the
verdict says ``n/a`` (no pooled rho: too few ranked tiers)."""
from types import SimpleNamespace

import pytest


@pytest.mark.parametrize("rho, p, said", [(float("nan"), float("nan"), "pooled rho n/a (p = n/a)"),
                                          (0.8123, 0.0417, "pooled rho 0.812 (p = 0.0417)")])
def test_the_done_line_says_n_a_for_a_nan_pooled_rho(tmp_path, monkeypatch, capsys, rho, p, said):
    import examples.replicate as rep
    from examples.speedrun.__main__ import main

    monkeypatch.setattr(rep, "replicate", lambda *a, **kw: SimpleNamespace(pooled_rho=rho, pooled_pvalue=p))
    assert main(["--preset", "tiny", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("done in ") and f"; {said}, paper " in last and "nan" not in last, last
