"""Review 26 (revzoofix): the speedrun report's "Target loss" section took each run's best validation loss as the
minimum of its curve, NaN once the curve holds a NaN (numpy's min). Since a diverged measured run is kept as a
result (its record ends with the NaN validation loss), a run that reached the target and then diverged was listed
as having missed it, with best loss "–". The best loss is the lowest finite one, and a diverged run says so."""
import math
from types import SimpleNamespace

from examples.speedrun.summary import speedrun_sections
from spectral_lens.records import RunInfo, RunWriter, open_runs


def _run(root, tier, losses, status="complete"):
    d = root / f"rope-b{tier}"
    info = RunInfo(d.name, family="RoPE", batch_tier=tier, tokens_per_step=128 * tier, seed=0, n_layer=2,
                   total_tokens=128 * tier * len(losses), batch_size=tier, primary_spectrum="act:blocks.1")
    with RunWriter(d, info) as w:
        for i, loss in enumerate(losses, 1):
            w.log(i, 128 * tier * i, val_loss=loss)
        w.update_info(status=status, **({"divergence": "validation loss nan"} if status == "diverged" else {}))
    return d


def _target_section(tmp_path, target):
    runs = open_runs([_run(tmp_path, 1, [4.0, 3.0, math.nan], "diverged"), _run(tmp_path, 2, [4.0, 3.5, 3.2]),
                      _run(tmp_path, 4, [4.0, 3.9, math.nan], "diverged")])
    workload = SimpleNamespace(preset=SimpleNamespace(name="t", profile="tiny", data="pydoc", budget=384),
                               target_loss=target, families=("RoPE",), unit="tokens", fraction=0.2, window=(4, 12),
                               tiers=(1, 2, 4))
    (out := tmp_path / "report").mkdir()
    (section,) = [s for s in speedrun_sections(workload, runs, out) if s.startswith("## Target loss")]
    return section


def test_a_run_that_reached_the_target_before_diverging_did_not_miss_it(tmp_path):
    section = _target_section(tmp_path, 3.4)
    assert "rope-b1" not in section  # reached 3.0 <= 3.4 before its NaN
    assert "| rope-b4 | RoPE | 4 | 3.900 (diverged) |" in section  # its best finite loss, and why it stopped
    assert "rope-b2" not in section
