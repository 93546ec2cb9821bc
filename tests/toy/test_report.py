"""The toy report's chain-step statistic (Fig. 11b analogue) on hand-written records."""
from types import SimpleNamespace

import pytest
import torch

from examples.toy.report import _h_peak_steps, toy_sections
from spectral_lens import Spectrum
from spectral_lens.records import RunInfo, RunWriter, open_runs

H_PEAK = {"A": 0.1, "B": 0.15, "C": 0.2, "D": 0.45}  # D - C = 0.25 = 5x the earlier steps (0.05)


def _write(root, family, tier, h_peak, slow):
    path = root / f"{family.lower()}-b{tier}"
    spec = Spectrum(values=torch.tensor([1.0 / r**1.5 for r in range(1, 65)], dtype=torch.float64), n_rows=500, dim=64)
    with RunWriter(path, RunInfo(path.name, family=family, batch_tier=tier, total_tokens=1000, n_layer=2,
                                 primary_spectrum="act:blocks.1"), tail_window=(10, 40), fsync=False) as w:
        for i, f in enumerate((0.0, 0.1, 0.2, 1 / 3, 0.5, 2 / 3, 1.0)):
            loss = 4.0 - 3.0 * f / slow
            w.log_measurement(i, int(1000 * f), {"act:blocks.1": spec}, val_loss=loss, progress=f,
                              scalars={"H_peak": h_peak * f, "H_S": 0.5, "pc1_peak": 0.5, "pc1_peak:1-2": 0.4})
    return path


def test_h_peak_steps_and_paper_ratio(tmp_path):
    dirs = []
    for fam, h in H_PEAK.items():
        dirs.append(_write(tmp_path, fam, 1, h, slow=1.0))
        dirs.append(_write(tmp_path, fam, 2, h * 10, slow=2.0))  # the slower tier is not the best run
    runs = open_runs(dirs)
    steps = _h_peak_steps(runs, list(H_PEAK), target=2.0)
    mean_f = (1 / 3 + 2 / 3 + 1.0) / 3
    assert [s for s, _ in steps] == ["A -> B", "B -> C", "C -> D"]
    assert [d for _, d in steps] == pytest.approx([0.05 * mean_f, 0.05 * mean_f, 0.25 * mean_f])
    wl = SimpleNamespace(target_loss=2.0, window=(10, 40), families=tuple(H_PEAK))
    text = "\n\n".join(toy_sections(wl, runs, tmp_path))
    assert "C -> D: +0.1667" in text
    assert "C -> D step / mean |earlier step| = 5.00" in text  # the paper's Fig. 11b ratio (about 5)
    assert "| A | 0.400 |" in text  # band sweep table
    assert (tmp_path / "toy_fig11b.png").exists()


def test_paper_ratio_for_the_paper_chain(tmp_path):
    names = dict(zip(H_PEAK, ("Baseline", "RoPE", "Muon", "Untied")))
    runs = open_runs([_write(tmp_path, names[f], 1, h, slow=1.0) for f, h in H_PEAK.items()])
    wl = SimpleNamespace(target_loss=2.0, window=(10, 40), families=("Baseline", "RoPE", "Muon", "Untied"))
    text = "\n\n".join(toy_sections(wl, runs, tmp_path))
    assert "Muon -> Untied step / mean |earlier step| = 5.00" in text
    assert "Muon rho at 20% = n/a" in text  # one tier per family: no ranking, said as n/a
