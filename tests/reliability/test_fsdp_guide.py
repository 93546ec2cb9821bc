"""The multi-GPU guide's FSDP script under torchrun: 2 CPU processes (gloo), FSDP2 per block and on the root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def fsdp_script() -> str:
    """The first python block after the guide's "## FSDP" heading."""
    text = (ROOT / "docs" / "guide-multi-gpu.md").read_text(encoding="utf-8")
    section = text.index("\n## FSDP\n")
    start = text.index("```python\n", section) + len("```python\n")
    return text[start : text.index("```", start)]


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_guide_script_under_torchrun(tmp_path):
    stand_ins = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "import torch\nfrom support.models import TinyGPT, lm_pool\ntorch.manual_seed(0)\n"
        "model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)\n"
        "heldout_pool = lm_pool(3, batch=4, t=12, vocab=37, seed=1)\n"  # 3 batches on 2 ranks: uneven
        "train_batches = lm_pool(4, batch=4, t=12, vocab=37, seed=2)\n"
    )
    # one write per rank (the two ranks share the pipe)
    report = ("\nimport json, sys\nfrom torch.distributed.tensor import DTensor\n"
              "sys.stdout.write('RESULT ' + json.dumps({'rank': dist.get_rank(), "
              "'rows': [m.spectra['act:transformer.h.1'].n_rows for m in lens.history], "
              "'grad': [m.spectra['grad:transformer.h.1.attn.c_proj.weight'].values.tolist() for m in lens.history], "
              "'sharded': all(isinstance(p, DTensor) for p in model.parameters())}) + '\\n'); sys.stdout.flush()\n"
              "dist.destroy_process_group()\n")
    (tmp_path / "train.py").write_text(stand_ins + fsdp_script() + report, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = sorted((json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
                 key=lambda r: r["rank"])
    assert [r["rank"] for r in got] == [0, 1]
    for r in got:
        assert r["rows"] == [144, 144]  # steps 2 and 4, the whole pool (3 x 4 x 12 rows) on each rank
        assert r["sharded"] and len(r["grad"]) == 2 and all(len(v) == 12 for v in r["grad"])
    assert got[0]["grad"] == got[1]["grad"]
