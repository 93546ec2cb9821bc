"""Hypothesis profiles for the whole suite, and one intra-op torch thread per test (restored afterwards).

``ci`` (the default) draws the same examples on every run (``derandomize``), so the README's test
command passes or fails the same way on every clean clone. ``explore`` draws new examples each run:
``HYPOTHESIS_PROFILE=explore python -m pytest -q`` (repeat it, or pin a run with
``--hypothesis-seed=N``). Cases that exploration found and fixed are pinned with ``@example``.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test runs on one intra-op thread and leaves torch's thread count as it found it.

    The suite's models and matrices are tiny: on this project's 2-core machine, two OpenMP threads
    spin-waiting on each other cost several times the CPU as soon as anything else runs (a tiny LM's
    ``linear`` took 11 ms a call on two threads under load, 0.24 ms on one; tests/analysis/
    test_report_real_records.py's training 64 s against 15 s). A test that needs more threads sets them;
    this restores the count afterwards (the benchmarks' one-thread cases, bench_covariance.fixed_cost,
    bench_gradients.host_overhead / new_probe, set 1 and keep it). Worker processes set their own
    (support/ranks.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_job(tmp_path_factory):
    """One uninterrupted ``python -m examples.toy --preset smoke`` job (tuner, three runs, report), run once per
    session: ``(exit status, output directory, what it printed)``. Shared by tests/toy/test_smoke.py and
    tests/replicate/test_resume_audit.py, which each ran the same job (~10 s); copy the directory before
    writing into it."""
    pytest.importorskip("optuna", reason="the toy's tuner needs the tune extra: pip install -e '.[tune]'")
    import contextlib
    import io

    from examples.toy.__main__ import main

    out = tmp_path_factory.mktemp("smoke") / "toy"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["--preset", "smoke", "--out", str(out)])
    return status, out, printed.getvalue()


@pytest.fixture
def one_rank(monkeypatch):
    """A one-process gloo group (what DDP and FSDP need), destroyed afterwards."""
    import datetime

    import torch.distributed as dist
    from support.ranks import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()
