"""Review of ``ActivationCovarianceAccumulator.sync``'s failure flags (``spectral_lens._sync``): the state a Ctrl-C
during the last collective leaves, exact counts beside the flags, and the single-rank path.

One process stands for rank 0 of 2 (a patched ``all_reduce``, as in ``test_sync_failures_agreed.py``): the other
rank's tensors are this rank's own (a rank with the same state), so the synced state is the union of two copies,
whose closed form is known in float64."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator

from .test_sync_failures_agreed import _is_last, _sigint_here

D = 5


@pytest.fixture
def twin(monkeypatch):
    """This process as rank 0 of ``state["world"]`` (2) gloo ranks whose peer holds the same state: each all_reduce
    doubles a SUM's tensor and leaves a MAX/MIN's; ``state["calls"]``: the tensors reduced; ``state["during"]``:
    called inside each all_reduce."""
    import torch.distributed as dist

    state = {"calls": [], "during": lambda t: None, "world": 2}

    def all_reduce(t, op=None, group=None):
        state["calls"].append(t.clone())
        if op is None or op == dist.ReduceOp.SUM:
            t.mul_(2)
        state["during"](t)

    for name, value in {"is_initialized": lambda: True, "get_rank": lambda group=None: 0,
                        "get_world_size": lambda group=None: state["world"], "get_backend": lambda group=None: "gloo",
                        "all_reduce": all_reduce}.items():
        monkeypatch.setattr(dist, name, value)
    return state


def _rows(seed: int = 0, n: int = 9) -> torch.Tensor:
    return 3.0 + torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _twice_cov(rows: torch.Tensor) -> torch.Tensor:
    return torch.cov(torch.cat([rows, rows]).T)


def test_a_ctrl_c_in_the_last_collective_leaves_a_whole_synced_state(twin):
    """After the KeyboardInterrupt raised past the commit, the state is the whole synced one: the two copies' rows
    and covariance (float64), refusing updates and merges into it as any synced state does, merging into a fresh
    accumulator, and a state_dict round-trip that restores it exactly, synced; reset() makes it usable again."""
    rows = _rows()
    acc = ActivationCovarianceAccumulator(precision="float64", name="h.0")
    acc.update(rows)
    twin["during"] = lambda t: _sigint_here() if _is_last(t) else None
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            acc.sync()
    finally:
        signal.signal(signal.SIGINT, before)
    ref = _twice_cov(rows)
    assert acc.n_rows == 18
    torch.testing.assert_close(acc.covariance(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.mean, rows.mean(0), rtol=1e-12, atol=1e-12)
    values = acc.compute().values.double()
    torch.testing.assert_close(values, torch.linalg.eigvalsh(ref).flip(0).clamp_min(0), rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match="synced"):
        acc.update(rows)
    with pytest.raises(RuntimeError, match="synced"):
        acc.merge(_fed(rows))
    merged = ActivationCovarianceAccumulator(precision="float64").merge(acc)
    assert merged.n_rows == 18
    torch.testing.assert_close(merged.covariance(), ref, rtol=1e-12, atol=1e-12)
    restored = ActivationCovarianceAccumulator(precision="float64", name="h.0")
    restored.load_state_dict(acc.state_dict())
    assert restored.state_dict()["synced"] and restored.n_rows == 18
    assert torch.equal(restored.covariance(), acc.covariance())
    acc.reset()
    acc.update(rows)
    torch.testing.assert_close(acc.covariance(), torch.cov(rows.T), rtol=1e-12, atol=1e-12)


def _fed(rows: torch.Tensor) -> ActivationCovarianceAccumulator:
    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(rows)
    return acc


def _state(n: int, mean: np.ndarray, cov: np.ndarray, shift: np.ndarray) -> dict:
    """The ``state_dict`` of ``n`` rows of sample mean ``mean`` and covariance ``cov`` summed around ``shift``."""
    c = mean - shift
    return {"format": "spectral-lens/covariance-state", "dim": mean.size, "precision": "exact",
            "nonfinite": "raise", "updates": 1, "synced": False, "initialized": True,
            "low_precision_products": False, "products_underflowed": False,
            "shift": torch.tensor(shift), "n": torch.tensor(n, dtype=torch.int64), "m": torch.tensor(n * c),
            "s": torch.tensor((n - 1) * cov + n * np.outer(c, c)),
            "bad_rows": torch.tensor(0), "first_bad": torch.tensor(-1)}


@pytest.mark.parametrize("n", [2**24 + 1, 2**31 + 1, 3 * 2**32 + 5])
def test_counts_past_float32_and_int32_survive_beside_the_flags(twin, n):
    """The count rides in the float64 totals beside each rank's failure flag, and in the sums: the synced count is
    the exact integer 2 n (float32 would round 2^24 + 1, an int32 wrap 2^31), the mean and covariance those of the
    closed form in float64, and no flag is read as set."""
    rng = np.random.default_rng(0)
    b = rng.standard_normal((D, D))
    mean, cov = 1e3 * rng.standard_normal(D), b @ b.T + 0.1 * np.eye(D)
    acc = ActivationCovarianceAccumulator(D)
    acc.load_state_dict(_state(n, mean, cov, mean.astype(np.float32).astype(np.float64) + 0.25))
    acc.sync()
    totals = twin["calls"][1]
    assert totals.dtype == torch.float64 and totals.numel() == D + 1 + 2
    assert int(totals[D]) == n and totals[D + 1:].tolist() == [0.0, 0.0]
    assert acc.n_rows == 2 * n and acc.state_dict()["n"].dtype == torch.int64
    twice = (2 * n - 2) / (2 * n - 1) * cov  # two copies of n rows: a scatter 2 (n - 1) cov over 2 n - 1
    assert np.abs(acc.mean.numpy() - mean).max() <= 1e-13 * np.abs(mean).max()
    assert np.abs(acc.covariance().numpy() - twice).max() <= 1e-12 * np.abs(cov).max()


def test_one_rank_pays_no_collective(twin):
    """A group of one rank: sync returns at once, no all_reduce (the flags added nothing there), the state as it was
    and not marked synced."""
    twin["world"] = 1
    rows = _rows(1)
    acc = _fed(rows)
    before = acc.state_dict()
    assert acc.sync() is acc
    assert twin["calls"] == []
    after = acc.state_dict()
    assert not after["synced"] and all(torch.equal(after[k], v) for k, v in before.items()
                                       if isinstance(v, torch.Tensor))
