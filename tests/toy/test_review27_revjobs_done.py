"""Review 27 (revjobs): ``python -m examples.toy`` ended with its verdict, while ``python -m examples.speedrun`` ends
with one ``done in ...: report ...`` line naming the report and the run records: the toy says it too now."""
import re
from types import SimpleNamespace

import examples.replicate.pipeline as pipeline
from examples.toy.__main__ import main


def test_the_toy_ends_with_a_done_line_as_the_speedrun(tmp_path, capsys, monkeypatch):
    def done(workload, out, tuner, **kwargs):
        print("\nVerdict:\n  (the verdict)")
        return SimpleNamespace(pooled_rho=0.9, pooled_pvalue=0.0417)  # (the verdict: printed above, not again)
    monkeypatch.setattr(pipeline, "replicate", done)
    out = tmp_path / "toy"
    assert main(["--preset", "smoke", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"done in \d\d:\d\d:\d\d: .*", last) and last.endswith(
        f": report {out / 'report' / 'report.md'}; run records in {out / 'runs'} "
        f"(python -m spectral_lens.cli predict {out / 'runs'}/*)"), last
