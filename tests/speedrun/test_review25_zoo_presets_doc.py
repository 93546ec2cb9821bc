"""Review 25 (zoo): the presets table of docs/replication-speedrun.md states each preset's settings."""
import re
from pathlib import Path

import pytest

from examples.speedrun.presets import PRESETS

DOC = Path(__file__).resolve().parents[2] / "docs" / "replication-speedrun.md"


def _rows():
    text = DOC.read_text(encoding="utf-8").split("## Presets", 1)[1]
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `([\w-]+)`", line)
        if m and m.group(1) in PRESETS:
            rows[m.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_table_matches_the_code(name):
    _, families, tiers, budget, _, target, *_ = _rows()[name]
    p = PRESETS[name]
    assert [f.strip() for f in families.split("->")] == list(p.families)
    m = re.fullmatch(r"([\d, ]+) \((\d+)\)", tiers)
    assert tuple(int(t) for t in m.group(1).split(",")) == p.tiers and int(m.group(2)) == p.reference_tier
    number = budget.split()[0]
    value = float(number[:-1]) * 1e6 if number.endswith("M") else int(number.replace(",", ""))
    assert value == p.budget
    assert float(target.strip("*")) == p.target_loss
