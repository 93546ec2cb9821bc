"""Spawning gloo ranks for the distributed tests: a free port, plain processes joined by a deadline, and
a module's cases run on every rank (:func:`run_gloo_cases`) with their per-rank results checked
(:func:`checked_case`)."""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, Iterator


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for ``MASTER_PORT``). It is released before the
    ranks bind it, so another process may take it first: :func:`run_ranks` launches again on a new one then."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_TAKEN_EXIT = 98  # a rank's exit status when its MASTER_PORT was taken (errno EADDRINUSE on Linux)


def _address_in_use(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed bind of a port already in use: torch's TCPStore raises ``DistNetworkError``
    ("... name: EADDRINUSE, message: address already in use"), a plain socket ``OSError`` ("[Errno 98] Address
    already in use")."""
    return "address already in use" in str(exc).lower()


def _die_with_parent(parent: int) -> None:
    """Linux: this rank is killed when the process that launched it dies (pytest killed by a signal runs no
    ``finally``), instead of living on, orphaned, until its own timeout. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


def _rank_main(worker: Callable, rank: int, port: int, out: str, parent: int) -> None:
    """A rank's process for :func:`run_ranks`: ``worker(rank, port, out)``; a port taken before the ranks bound it
    ends the process with :data:`PORT_TAKEN_EXIT`, for the parent to launch again (any other error: status 1)."""
    _die_with_parent(parent)
    try:
        worker(rank, port, out)
    except BaseException as exc:
        if not _address_in_use(exc):
            raise
        traceback.print_exc()
        sys.exit(PORT_TAKEN_EXIT)


def _launch(worker: Callable, world: int, out: Path, join_s: float) -> tuple[list[int], bool]:
    """One launch of :func:`run_ranks`: the ranks still running after ``join_s`` (killed), and whether a rank
    found the port taken (the others are killed at once: they would wait for it until their timeout). Every
    rank still running when this returns or raises (a Ctrl-C, pytest-timeout's error) is killed."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(worker, r, port, str(out), os.getpid())) for r in range(world)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + join_s
        running = list(procs)
        while running and time.monotonic() < deadline:
            multiprocessing.connection.wait([p.sentinel for p in running], max(0.0, deadline - time.monotonic()))
            running = [p for p in running if p.is_alive()]
            if any(p.exitcode == PORT_TAKEN_EXIT for p in procs):
                return [], True
        return [r for r, p in enumerate(procs) if p.is_alive()], False
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def _entries(out: Path) -> set[str]:
    """The names in ``out`` (none where it does not exist yet)."""
    return set(os.listdir(out)) if os.path.isdir(out) else set()


def _remove_new(out: Path, before: set[str]) -> None:
    """Remove what a launch that found its port taken left in ``out`` (every name not in ``before``): a rank
    that wrote its result before another found the port taken would otherwise pass for the relaunch's rank
    when that one writes none (hangs, dies)."""
    for name in _entries(out) - before:
        path = Path(out, name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def run_ranks(worker: Callable, world: int, out: Path, join_s: float) -> list[int]:
    """Run ``worker(rank, port, str(out))`` in ``world`` spawned processes; join them all within
    ``join_s`` seconds, kill the ones still running and return their ranks (a hang fails the caller's
    test instead of blocking CI, as ``mp.spawn``'s join would). A rank that finds the port taken
    (:func:`free_port` releases it before rank 0 binds it) has the whole launch made once more on a new port,
    after what the first launch wrote in ``out`` is removed.
    The ranks are killed when this is interrupted, and (Linux) when its process dies."""
    before = _entries(out)
    for _ in range(2):
        hung, port_taken = _launch(worker, world, out, join_s)
        if not port_taken:
            return hung
        _remove_new(out, before)
    raise RuntimeError(f"support.ranks.run_ranks: the ranks' MASTER_PORT was taken by another process twice "
                       f"(exit status {PORT_TAKEN_EXIT}; see the ranks' tracebacks above)")


@contextlib.contextmanager
def gloo_group(rank: int, port: int, world: int, timeout_s: float) -> Iterator[None]:
    """Inside a rank's process: the default gloo process group of ``world`` ranks on 127.0.0.1:``port``,
    with a collective timeout of ``timeout_s`` (a collective left waiting fails instead of hanging);
    destroyed on exit."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def write_case(out: str | Path, case: str, rank: int, result: dict) -> None:
    """One rank's result of one case, as :func:`case_results` reads it back; written atomically: a rank killed
    while writing it (the join deadline, a relaunch) leaves no file, not a truncated one that
    :func:`case_results` would fail to parse instead of reporting the rank's result missing."""
    from spectral_lens.atomic import write_text_atomic

    write_text_atomic(Path(out, f"{case}.rank{rank}.json"), json.dumps(result), fsync=False)


def case_results(out: Path, cases: Iterable[str], world: int) -> dict[str, list[dict | None]]:
    """Per case, each rank's ``<case>.rank<r>.json`` in ``out`` (``None`` where a rank wrote none)."""
    found = {}
    for case in cases:
        files = [Path(out) / f"{case}.rank{r}.json" for r in range(world)]
        found[case] = [json.loads(f.read_text()) if f.exists() else None for f in files]
    return found


def run_cases(out: str | Path, rank: int, cases: dict[str, Callable[[], object]]) -> None:
    """Inside a rank's process, in an initialized group: run each case (a call without arguments), then
    a barrier (the next training collective: the ranks must be in step again), and write the case's
    value or error (an interrupt included), its seconds and the barrier's outcome with :func:`write_case`."""
    import torch.distributed as dist

    for case, fn in cases.items():
        start = time.monotonic()
        result = {"value": None, "error": None}
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt included; recorded for the parent
            result["error"] = f"{type(exc).__name__}: {exc}"
        result["seconds"] = time.monotonic() - start
        try:
            dist.barrier()
            result["barrier"] = "ok"
        except Exception as exc:  # noqa: BLE001
            result["barrier"] = f"{type(exc).__name__}: {exc}"
        write_case(out, case, rank, result)


def _case_worker(rank: int, port: int, out: str, cases: dict, world: int, pg_timeout_s: float, preload: str,
                 subgroup: list[int] | None) -> None:
    """A rank's process for :func:`run_gloo_cases`."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    importlib.import_module(preload)  # its import (seconds on a loaded machine) is not part of a case's deadline
    with gloo_group(rank, port, world, pg_timeout_s):
        extra = () if subgroup is None else (dist.new_group(subgroup),)  # every rank creates it
        dist.barrier()  # connection set-up is not part of any case's deadline
        run_cases(out, rank, {case: functools.partial(fn, rank, *extra) for case, fn in cases.items()})


def run_gloo_cases(out: Path, cases: dict[str, Callable], world: int, *, pg_timeout_s: float, join_s: float,
                   preload: str, subgroup: list[int] | None = None) -> dict:
    """Run every case ``fn(rank)`` of ``cases`` (module-level functions, in order) on ``world`` gloo ranks,
    in one process group with a collective timeout of ``pg_timeout_s``, each case followed by a barrier
    (:func:`run_cases`); ``preload``: a module imported before the group forms, whose first import would
    otherwise count in a case's seconds. With ``subgroup`` (global ranks), every rank creates that
    group first and each case is called as ``fn(rank, group)``. Returns each case's per-rank results
    (:func:`case_results`) and, under ``"_hung"``, the ranks still running after ``join_s`` (killed)."""
    worker = functools.partial(_case_worker, cases=cases, world=world, pg_timeout_s=pg_timeout_s, preload=preload,
                               subgroup=subgroup)
    hung = run_ranks(worker, world, out, join_s)
    return {"_hung": hung, **case_results(out, cases, world)}


def checked_case(results: dict, case: str, deadline_s: float | None) -> list[dict]:
    """The per-rank results of ``case`` from :func:`run_gloo_cases`, asserting that every rank wrote one,
    that the ranks met in step in the barrier after it, and (with ``deadline_s``) that every rank
    returned or raised within ``deadline_s`` seconds."""
    got = results[case]
    world = len(got)
    assert None not in got, f"{case}: no result from rank(s) {[r for r in range(world) if got[r] is None]}; " \
        f"ranks still running at the deadline (killed): {results['_hung']}"
    assert [r["barrier"] for r in got] == ["ok"] * world, f"{case}: ranks out of step afterwards: {got}"
    if deadline_s is not None:
        assert all(r["seconds"] < deadline_s for r in got), f"{case}: {[r['seconds'] for r in got]} s"
    return got
