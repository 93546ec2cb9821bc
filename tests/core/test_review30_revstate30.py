"""Review 30 (revstate30): adversarial review of the saved-state changes of ``audit-state30``.

A state that ``save`` wrote loads; the refusals added today keep every legitimate state (earlier formats, masked
or skipped rows, every precision and row dtype, both CPU paths) and resuming equals the saved accumulator going
on bit for bit; errors say what to do.
"""

from __future__ import annotations

import copy
import re
import threading
import time

import numpy as np
import pytest
import torch
from support.state import assert_same_state, snapshot

from spectral_lens import ActivationCovarianceAccumulator, NonFiniteError
from spectral_lens._warnings import StateFormatError

A = ActivationCovarianceAccumulator


def _nan_first_update(nonfinite="raise", **kw) -> ActivationCovarianceAccumulator:
    """An accumulator whose first update held a NaN row: under ``"raise"`` the rows (and the shift, a mean
    of them) are summed as they are, and ``compute`` names the update."""
    acc = A(4, nonfinite=nonfinite, **kw)
    x = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0, 0] = float("nan")
    acc.update(x)
    return acc


def _same_bits(a: dict, b: dict) -> bool:
    """Two states equal field by field, tensors bit for bit (NaN included, where ``torch.equal`` says no)."""
    def bits(v):
        return v.view(torch.int64) if v.dtype == torch.float64 else v
    return a.keys() == b.keys() and all(
        torch.equal(bits(a[k]), bits(b[k])) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


# ---------------------------------------------------------------------------------------------- bugs fixed
@pytest.mark.parametrize("how", ["to", "load_state_dict", "save/load"])
def test_a_state_with_nan_rows_under_raise_moves_and_loads_and_still_names_the_update(tmp_path, how):
    """NaN rows in the first update make the shift NaN: ``acc.to(device)`` (and ``capture.to``) raised
    ``StateFormatError: cannot load state_dict: shift is not finite``, and a file ``save`` wrote was refused by
    ``load``, where ``compute`` says which update held the NaN rows."""
    acc = _nan_first_update()
    assert not bool(torch.isfinite(acc.state_dict()["shift"]).all())  # the case: a non-finite shift
    before, live = snapshot(acc), copy.deepcopy(acc)
    if how == "to":
        got = acc.to("cpu")
        assert _same_bits(snapshot(got), before)
    elif how == "load_state_dict":
        got = A(4)
        got.load_state_dict(acc.state_dict())
    else:
        got = A.load(acc.save(tmp_path / "nan"))
    assert _same_bits(snapshot(got), before)
    with pytest.raises(NonFiniteError, match=r"non-finite values \(NaN/Inf\) in the rows of update #0"):
        got.compute()
    x = torch.randn(3, 4, dtype=torch.float64)
    got.update(x)  # goes on as the live one does
    live.update(x)
    assert _same_bits(snapshot(got), snapshot(live)) and got.n_rows == 13


@pytest.mark.parametrize("state", ["no bad rows recorded", "skip policy"])
def test_a_non_finite_shift_without_nan_rows_recorded_is_still_refused(state):
    """The guard of the fix above: a NaN shift in a state that records no NaN/Inf rows under ``"raise"``
    (a tampered state; under ``"skip"`` such rows are dropped, the shift never holds them) stays refused."""
    if state == "skip policy":
        sd = {**_nan_first_update("skip").state_dict(), "shift": torch.full((4,), float("nan"), dtype=torch.float64)}
        live = A(4, nonfinite="skip")
    else:
        sd = {**_nan_first_update().state_dict(), "first_bad": torch.tensor(-1)}
        live = A(4)
    live.update(torch.randn(6, 4, dtype=torch.float64))
    before = snapshot(live)
    with pytest.raises(StateFormatError, match="shift is not finite"):
        live.load_state_dict(sd)
    assert_same_state(snapshot(live), before)


@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_a_state_with_a_newer_versions_field_says_what_to_do(tmp_path, via):
    """A field this version does not know is refused (it may change what the sums mean: ``products_underflowed``
    did, and an older reader that ignored it would give a wrong spectrum without a word); the error said only
    "a state of a newer version", not which version this is or what to do."""
    import json
    import zipfile

    from spectral_lens import __version__

    acc = A(4)
    acc.update(torch.randn(6, 4, dtype=torch.float64))
    if via == "state_dict":
        load = lambda: A(4).load_state_dict({**acc.state_dict(), "rows_reweighted": True})
    else:
        src, dst = acc.save(tmp_path / "s"), tmp_path / "newer.npz"
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info)
                if info.filename == "header.npy":
                    header = json.loads(str(np.load(src)["header"]))
                    buf = __import__("io").BytesIO()
                    np.save(buf, np.array(json.dumps({**header, "rows_reweighted": True})))
                    data = buf.getvalue()
                zout.writestr(info.filename, data)
        load = lambda: A.load(dst)
    with pytest.raises(StateFormatError, match=rf"unknown field\(s\) \['rows_reweighted'\].*newer spectral-lens than "
                                               rf"this one \({__version__}\).*load it with the version that wrote it"):
        load()


def test_a_load_replaces_an_inferred_width_as_a_reset_does():
    """A load replaces the rows, and (review 30) the width inferred from them goes with them, yet a state of
    another width was refused while the inferred one was held (``dim 6 differs from this accumulator's 4``):
    loading an empty state first, or ``reset()``, let the same state load. A width given at construction is
    still enforced."""
    other = A(precision="float64")
    other.update(torch.randn(7, 6, dtype=torch.float64))
    acc = A(precision="float64")
    acc.update(torch.randn(5, 4, dtype=torch.float64))
    acc.load_state_dict(other.state_dict())
    assert _same_bits(acc.state_dict(), other.state_dict()) and acc.dim == 6
    acc.update(torch.randn(3, 6, dtype=torch.float64))  # goes on at the loaded width
    given = A(4, precision="float64")
    given.update(torch.randn(5, 4, dtype=torch.float64))
    before = snapshot(given)
    with pytest.raises(StateFormatError, match="dim 6 differs from this accumulator's 4"):
        given.load_state_dict(other.state_dict())
    assert_same_state(snapshot(given), before)


class _LoadAfterRelease:
    """An accumulator's lock that, the first time it is released, lets "another thread" load ``state`` (as a
    thread waiting on the lock would, right then): a deterministic interleaving."""

    def __init__(self, acc, state):
        self.lock, self.acc, self.state, self.armed = acc._lock, acc, state, True

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()
        if self.armed:
            self.armed = False
            with self.lock:
                self.acc._load_state_dict(self.state)


def test_compute_reads_the_sums_and_their_flags_under_one_lock():
    """``compute`` took the lock for the sums but read the flags and counts that go with them (float32 products,
    the update count) after releasing it: a ``load_state_dict`` (now locked too) or an update landing in between
    paired one state's sums with another's flags. Here: rows too small for float32 products (refused), with
    the flags of a float64 state loaded in between: a spectrum of underflowed values came back, 2.9e-47."""
    tiny = A(4, precision="exact")
    tiny.update(torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) * 1e-23)
    other = A(4, precision="exact")
    other.update(torch.randn(50, 4, dtype=torch.float64))  # float64 rows: float64 products
    assert tiny.state_dict()["low_precision_products"] and not other.state_dict()["low_precision_products"]
    tiny._lock = _LoadAfterRelease(tiny, other.state_dict())
    with pytest.raises(NonFiniteError, match="too small for float32 products"):
        tiny.compute()  # the state as of the call
    assert tiny.n_rows == 50 and not tiny._low_products  # the load did land, after it


def test_covariance_counts_the_rows_of_the_sums_it_read():
    """``covariance`` checked ``n >= 2`` on the state after the lock was released: a state of one row, replaced
    in between by one of many, gave a covariance divided by n - 1 = 0 (non-finite) instead of the error."""
    one = A(4, precision="float64")
    one.update(torch.randn(1, 4, dtype=torch.float64))
    other = A(4, precision="float64")
    other.update(torch.randn(9, 4, dtype=torch.float64))
    one._lock = _LoadAfterRelease(one, other.state_dict())
    with pytest.raises(ValueError, match="need at least 2 rows|at least 2"):
        one.covariance()


def test_merge_waits_for_an_update_of_the_other_accumulator_in_flight():
    """``a.merge(b)`` took ``a``'s lock only, yet reads ``b``'s sums and may write ``b``'s ``S`` in place (the
    first read mirrors it): beside a thread updating ``b`` (its lock held here, as by an update in flight) it
    went ahead, reading a half-updated ``b`` and racing its in-place writes."""
    a, b = A(4, precision="float64"), A(4, precision="float64")
    a.update(torch.randn(6, 4, dtype=torch.float64))
    b.update(torch.randn(6, 4, dtype=torch.float64))
    done = threading.Event()
    with b._lock:  # an update of b in flight
        t = threading.Thread(target=lambda: (a.merge(b), done.set()), daemon=True)
        t.start()
        assert not done.wait(0.5), "merge read b while b's update held its lock"
    t.join(10)
    assert done.is_set() and a.n_rows == 12


def test_merges_both_ways_at_once_and_a_self_merge_do_not_deadlock():
    """The guard of the fix above: ``a.merge(b)`` and ``b.merge(a)`` at once take the two locks in one order
    (no deadlock), and ``a.merge(a)`` takes its one lock once."""
    a, b = A(4, precision="float64"), A(4, precision="float64")
    a.update(torch.randn(3, 4, dtype=torch.float64))
    b.update(torch.randn(3, 4, dtype=torch.float64))
    a.merge(a)
    assert a.n_rows == 6
    src_a, src_b = copy.deepcopy(a), copy.deepcopy(b)

    def loop(x, y):
        for _ in range(200):
            x.load_state_dict(src_a.state_dict() if x is a else src_b.state_dict())
            x.merge(y)

    threads = [threading.Thread(target=loop, args=pair, daemon=True) for pair in ((a, b), (b, a))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "deadlock between a.merge(b) and b.merge(a)"


# ------------------------------------------------------------------------------------ legitimate states (guards)
def _old_state(version: str) -> dict:
    """A state as an earlier version's ``state_dict`` wrote it (its keys: git history of ``accumulate.py``)."""
    acc = A(4)
    acc.update(torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 7)
    sd = acc.state_dict()
    keys = {"15d59a0": ("format", "dim", "precision", "nonfinite", "updates", "synced"),  # the first format
            "12cf2a8": ("format", "dim", "precision", "nonfinite", "updates", "synced", "initialized"),
            "a4a6b42": ("format", "dim", "precision", "nonfinite", "updates", "synced", "initialized",
                        "low_precision_products")}[version]
    arrays = ("shift", "n", "m", "s", "bad_rows", "first_bad")
    return {k: v for k, v in sd.items() if k in keys or k in arrays}, acc


@pytest.mark.parametrize("version", ["15d59a0", "12cf2a8", "a4a6b42"])
def test_states_of_earlier_versions_still_load(version):
    """The unknown-field and count refusals keep every earlier format (fields were only ever added)."""
    old, acc = _old_state(version)
    got = A(4)
    got.load_state_dict(old)
    assert torch.equal(got.covariance(), acc.covariance()) and got.n_rows == 9


@pytest.mark.filterwarnings("ignore")
def test_states_of_masked_skipped_and_empty_updates_load_in_every_precision_and_dtype():
    """``n = 0`` with non-zero sums is refused: no way of measuring makes one. Updates of masked rows only (some
    holding NaN/Inf), of NaN rows skipped, of no rows at all, in every precision and row dtype, on the CPU's
    one-chunk path and its torch path (``max_chunk_rows`` below the rows), and their merges, all load."""
    for precision in ("float64", "exact", "fast"):
        for nonfinite in ("raise", "skip"):
            for mcr in (131072, 2):
                for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
                    acc = A(precision=precision, nonfinite=nonfinite, max_chunk_rows=mcr)
                    x = (torch.randn(6, 5, dtype=torch.float64) * 1e3 + 40).to(dtype)
                    x[0, 1], x[3, 2] = float("nan"), float("inf")
                    acc.update(x, torch.zeros(6, dtype=torch.bool))
                    acc.update(x[:0])
                    if nonfinite == "skip":
                        acc.update(x[[0, 3]])
                    merged = A(precision=precision, nonfinite=nonfinite).merge(acc).merge(copy.deepcopy(acc))
                    for state in (acc.state_dict(), merged.state_dict()):
                        assert int(state["n"]) == 0
                        got = A(precision=precision, nonfinite=nonfinite)
                        got.load_state_dict(state)
                        assert _same_bits(got.state_dict(), state)


def _resume_case(seed: int):
    """Random updates (masks, NaN rows under "skip", empty calls, every row dtype) and a split point."""
    r = np.random.default_rng(seed)
    precision, nonfinite = ("float64", "exact", "fast")[seed % 3], ("raise", "skip")[seed // 3 % 2]
    mcr = (131072, 3, 7)[seed // 6 % 3]
    dtype = (torch.float32, torch.float64, torch.bfloat16, torch.float16)[seed // 18 % 4]
    g = torch.Generator().manual_seed(seed)
    d, calls = int(r.integers(2, 9)), []
    for _ in range(int(r.integers(2, 7))):
        n = int(r.integers(0, 20))
        x = (torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + float(r.choice([0, 50, -1e3]))).to(dtype)
        mask = None if r.random() < 0.5 else torch.rand(n, generator=g) < float(r.choice([0.0, 0.5, 0.9]))
        if nonfinite == "skip" and n and r.random() < 0.3:
            x[int(r.integers(n)), int(r.integers(d))] = float("nan")
        calls.append((x, mask))
    return precision, nonfinite, mcr, calls, int(r.integers(0, len(calls) + 1))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("how", ["state_dict", "file", "to"])
def test_resuming_goes_on_bit_for_bit_as_the_saved_accumulator_with_masks_skips_and_every_dtype(tmp_path, how):
    """api-core.md's corrected claim, on the paths review 30's hypothesis test did not take: masked rows (the
    shift adopted from the first valid rows), rows skipped under ``"skip"``, empty calls, bf16/fp16 rows, calls of
    several chunks (the CPU torch path), and ``to()``. CPU only (no GPU in this review)."""
    for seed in range(72):
        precision, nonfinite, mcr, calls, split = _resume_case(seed)
        saved = A(precision=precision, nonfinite=nonfinite, max_chunk_rows=mcr)
        for x, mask in calls[:split]:
            saved.update(x, mask)
        if how == "state_dict":
            resumed = A(precision=precision, nonfinite=nonfinite, max_chunk_rows=mcr)
            resumed.load_state_dict(saved.state_dict())
        elif how == "file":
            resumed = A.load(saved.save(tmp_path / f"s{seed}"), max_chunk_rows=mcr)
        else:
            saved.state_dict()  # the read that a save makes
            resumed = copy.deepcopy(saved).to("cpu")
        for x, mask in calls[split:]:
            saved.update(x, mask)
            resumed.update(x, mask)
        assert _same_bits(resumed.state_dict(), saved.state_dict()), seed


def test_the_toy_generator_check_leaves_the_global_rng_untouched(tmp_path):
    """The toy's pre-check tries ``gen`` on a scratch generator: the global stream (and the run's own, for a
    refused checkpoint) is as before, for a good checkpoint and a refused one."""
    from examples.toy.train import ToyRun
    from tests.toy.test_train import CFG, LRS, TASK

    s = TASK.split()
    donor = ToyRun("Baseline", 8, LRS["Baseline"], CFG, seed=1)
    donor.train_until(16, 32, s.x_train, s.y_train)
    donor.save(tmp_path / "good.pt")
    state = donor.state_dict()
    state["gen"] = torch.zeros_like(state["gen"])
    torch.save(state, tmp_path / "bad.pt")
    run = ToyRun("Baseline", 8, LRS["Baseline"], CFG, seed=2)
    torch.manual_seed(123)
    before, run_gen = torch.get_rng_state(), run.gen.get_state()
    with pytest.raises(ValueError, match="'gen' is not a CPU generator state"):
        run.load(tmp_path / "bad.pt")
    assert torch.equal(torch.get_rng_state(), before) and torch.equal(run.gen.get_state(), run_gen)
    run.load(tmp_path / "good.pt")
    assert torch.equal(torch.get_rng_state(), before) and torch.equal(run.gen.get_state(), donor.gen.get_state())


def test_load_state_dict_and_to_under_concurrent_updates_neither_deadlock_nor_lose_rows():
    """The new lock: ``load_state_dict`` and ``to`` from other threads while updates run (each takes the lock
    once: no re-entry, so no deadlock); every update lands either before a load (replaced) or after it."""
    acc = A(4, precision="float64")
    saved = A(4, precision="float64")
    saved.update(torch.randn(10, 4, dtype=torch.float64))
    state = saved.state_dict()
    stop = threading.Event()
    errors = []

    def updates():
        try:
            while not stop.is_set():
                acc.update(torch.randn(3, 4, dtype=torch.float64))
        except Exception as exc:  # noqa: BLE001 - recorded, shown below
            errors.append(exc)

    def loads():
        try:
            for _ in range(50):
                acc.load_state_dict(state)
                acc.to("cpu")
        except Exception as exc:  # noqa: BLE001 - recorded, shown below
            errors.append(exc)
        finally:
            stop.set()

    threads = [threading.Thread(target=f, daemon=True) for f in (updates, updates, loads)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "deadlock: a thread still waits for the accumulator's lock"
    assert not errors, errors
    assert (acc.n_rows - 10) % 3 == 0 and acc.n_rows >= 10


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_a_complex_tensor_for_a_real_one_is_a_state_problem(tmp_path, where):
    """``state_problems`` let a complex tensor for a real weight (or its Adam moment) through: the load cast it,
    dropping the imaginary part with a warning, and under ``-W error`` failed part-way, after the tensors before
    it (the model, for the optimizer's) were copied: a half-loaded run."""
    from examples.checkpoint import read_checkpoint, state_problems

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    msd, osd = model.state_dict(), copy.deepcopy(opt.state_dict())
    if where == "model":
        msd = {**msd, "1.bias": msd["1.bias"].to(torch.complex64)}
        why = r"model 1\.bias: torch\.complex64, this run's torch\.float32 is real"
    else:
        osd["state"][3]["exp_avg"] = osd["state"][3]["exp_avg"].to(torch.complex64)
        why = r"optimizer 0 parameter 3 exp_avg: torch\.complex64, the parameter's torch\.float32 is real"
    torch.save({"model": msd, "optimizers": [osd]}, tmp_path / "ck.pt")
    ck = read_checkpoint(tmp_path / "ck.pt")
    problems = state_problems(model, [opt], ck["model"], ck["optimizers"])
    assert any(re.search(why, p) for p in problems), problems
    assert state_problems(model, [opt], model.state_dict(), [opt.state_dict()]) == []


# --------------------------------------------------------------------------------------------- two ranks
_SYNC_CASES = ("all masked", "one rank empty", "no rows", "nan rows on rank 0")


def _sync_worker(rank: int, port: int, out: str) -> None:
    """Per case: each rank's synced state (rows masked, absent, or NaN under ``"raise"``), loaded into a new
    accumulator and moved with ``to``."""
    from support.ranks import gloo_group, write_case

    with gloo_group(rank, port, 2, 30):
        for case in _SYNC_CASES:
            acc = A(4, precision="float64")
            x = torch.randn(5, 4, dtype=torch.float64) + 10 * (rank + 1)
            if case == "all masked" or (case == "one rank empty" and rank == 0):
                acc.update(x, torch.zeros(5, dtype=torch.bool))
            elif case == "nan rows on rank 0":
                x[0, 0] = float("nan") if rank == 0 else x[0, 0]
                acc.update(x)
            acc.sync()
            sd = acc.state_dict()
            result = {"n": int(sd["n"]), "zero sums": not (bool(sd["m"].ne(0).any()) or bool(sd["s"].ne(0).any()))}
            try:
                loaded = A(4, precision="float64")
                loaded.load_state_dict(sd)
                acc.to("cpu")
                result["loaded"] = _same_bits(loaded.state_dict(), sd) and _same_bits(acc.state_dict(), sd)
            except Exception as exc:  # noqa: BLE001 - recorded for the parent
                result["loaded"] = f"{type(exc).__name__}: {exc}"
            for key, which in (("error", loaded), ("moved error", acc)):
                try:
                    which.compute()
                except Exception as exc:  # noqa: BLE001 - recorded for the parent
                    result[key] = f"{type(exc).__name__}: {exc}"
            write_case(out, case.replace(" ", "-"), rank, result)


@pytest.mark.slow  # two spawned ranks: ~5 s
@pytest.mark.distributed
def test_synced_states_without_rows_or_with_nan_rows_load_and_move(tmp_path):
    """``sync`` of ranks without rows gives ``n = 0`` with exact zero sums (the new refusal keeps it); a synced
    state whose rows held NaN under ``"raise"`` loads (its ``compute`` names the update) and moves with ``to``
    (naming the rank too)."""
    from support.ranks import case_results, run_ranks

    hung = run_ranks(_sync_worker, 2, tmp_path, 120.0)
    got = case_results(tmp_path, [c.replace(" ", "-") for c in _SYNC_CASES], 2)
    assert hung == [] and all(None not in r for r in got.values()), (hung, got)
    for case in ("all-masked", "one-rank-empty", "no-rows"):
        for r in got[case]:
            assert r["n"] == 0 and r["zero sums"] and r["loaded"] is True, (case, r)
            assert r["error"].startswith("ValueError") and "need at least 2 rows" in r["error"], (case, r)
    for r in got["nan-rows-on-rank-0"]:  # the rank is not part of a saved state (to() keeps it): the update is
        assert r["n"] == 10 and r["loaded"] is True, r
        assert r["error"].startswith("NonFiniteError") and "in the rows of update #0" in r["error"], r
        assert "global rank 0's update #0" in r["moved error"], r
