"""The multi-GPU guide's script under torchrun: 2 CPU processes (gloo), one record, global spectra."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def guide_script() -> str:
    text = (ROOT / "docs" / "guide-multi-gpu.md").read_text(encoding="utf-8")
    start = text.index("```python\n") + len("```python\n")
    return text[start : text.index("```", start)]


@pytest.mark.slow
@pytest.mark.distributed
def test_guide_script_under_torchrun(tmp_path):
    stand_ins = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "import torch\nfrom support.models import TinyGPT, lm_pool\ntorch.manual_seed(0)\n"
        "model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)\n"
        "heldout_pool = lm_pool(4, batch=4, t=12, vocab=37, seed=1)\n"
        "train_batches = lm_pool(4, batch=4, t=12, vocab=37, seed=2)\n"
    )
    # one write per rank (print writes its parts separately, and the two ranks share the pipe)
    report = ("\nimport sys\nsys.stdout.write(f\"ROWS {[m.spectra['act:transformer.h.1'].n_rows for m in lens.history]}"
              "\\n\"); sys.stdout.flush()\n")
    (tmp_path / "train.py").write_text(stand_ins + guide_script() + report, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"ROWS \[[^\]]*\]", proc.stdout)
    assert rows == ["ROWS [192, 192]"] * 2  # both ranks hold the whole pool's spectrum (4 x 4 x 12 rows)
    lines = (tmp_path / "runs" / "ddp-b8" / "measurements.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]  # written once, by rank 0
