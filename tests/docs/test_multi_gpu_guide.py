"""The multi-GPU guide's scripts under torchrun, 2 CPU processes (gloo): the DDP script (one record, global
spectra) and the FSDP script (FSDP2 per block and on the root)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.teardown import torn_down

ROOT = Path(__file__).resolve().parents[2]


def guide_script(heading: str | None = None) -> str:
    """The first python block of the guide, or the first one after the line ``heading``."""
    text = (ROOT / "docs" / "guide-multi-gpu.md").read_text(encoding="utf-8")
    section = 0 if heading is None else text.index(f"\n{heading}\n")
    start = text.index("```python\n", section) + len("```python\n")
    return text[start : text.index("```", start)]


def run_under_torchrun(tmp_path: Path, script: str, *, pool_batches: int, report: str) -> subprocess.CompletedProcess:
    """``script`` with the names the guide leaves out (a tiny model, a held-out pool of ``pool_batches``
    batches of 4 x 12 tokens, training batches) before it and ``report`` after it, on 2 ranks."""
    stand_ins = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "import torch\nfrom support.models import TinyGPT, lm_pool\ntorch.manual_seed(0)\n"
        "model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)\n"
        f"heldout_pool = lm_pool({pool_batches}, batch=4, t=12, vocab=37, seed=1)\n"
        "train_batches = lm_pool(4, batch=4, t=12, vocab=37, seed=2)\n"
    )
    (tmp_path / "train.py").write_text(stand_ins + script + report, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    # a rank's gloo teardown abort at its exit (torch 2.13, CPU) is accepted: the callers check every rank's report
    assert proc.returncode == 0 or torn_down(proc), proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.distributed
def test_guide_script_under_torchrun(tmp_path):
    # one write per rank (print writes its parts separately, and the two ranks share the pipe)
    report = ("\nimport sys\nsys.stdout.write(f\"ROWS {[m.spectra['act:transformer.h.1'].n_rows for m in lens.history]}"
              "\\n\"); sys.stdout.flush()\n")
    proc = run_under_torchrun(tmp_path, guide_script(), pool_batches=4, report=report)
    rows = re.findall(r"ROWS \[[^\]]*\]", proc.stdout)
    assert rows == ["ROWS [192, 192]"] * 2  # both ranks hold the whole pool's spectrum (4 x 4 x 12 rows)
    lines = (tmp_path / "runs" / "ddp-b8" / "measurements.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]  # written once, by rank 0


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_guide_script_under_torchrun(tmp_path):
    # one write per rank (the two ranks share the pipe)
    report = ("\nimport json, sys\nfrom torch.distributed.tensor import DTensor\n"
              "sys.stdout.write('RESULT ' + json.dumps({'rank': dist.get_rank(), "
              "'rows': [m.spectra['act:transformer.h.1'].n_rows for m in lens.history], "
              "'grad': [m.spectra['grad:transformer.h.1.attn.c_proj.weight'].values.tolist() for m in lens.history], "
              "'sharded': all(isinstance(p, DTensor) for p in model.parameters())}) + '\\n'); sys.stdout.flush()\n"
              "dist.destroy_process_group()\n")
    proc = run_under_torchrun(tmp_path, guide_script("## FSDP"), pool_batches=3, report=report)  # 3 on 2 ranks: uneven
    got = sorted((json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
                 key=lambda r: r["rank"])
    assert [r["rank"] for r in got] == [0, 1]
    for r in got:
        assert r["rows"] == [144, 144]  # steps 2 and 4, the whole pool (3 x 4 x 12 rows) on each rank
        assert r["sharded"] and len(r["grad"]) == 2 and all(len(v) == 12 for v in r["grad"])
    assert got[0]["grad"] == got[1]["grad"]
