"""Review of the rank agreement merged in ``audit-ranks2`` (``agree_settings``, ``_summed``'s failure flag,
``deferred_interrupt``): false mismatches of ``mask_fn`` / ``pick``, the SIGINT handler's life, and the number of
collectives a measurement adds.

Found and fixed here (each test below failed before):

* a ``mask_fn`` defined in the script, on ranks started partly by the script itself and partly by
  ``multiprocessing``'s spawn (rank 0 in the parent): ``__main__.mask`` against ``__mp_main__.mask``, a false
  ``ValueError`` on every rank; a callable object with an attribute ``func`` (not a ``functools.partial``) was named
  by that attribute (two different classes with ``func = None``: both ``builtins.NoneType``, a false match);
* a single-process ``measure`` replaced and restored Python's SIGINT handler (no collective to protect);
* a Ctrl-C held back while an exception (another rank's failure, a refused sync) left the held block was lost: the
  exception was raised instead of ``KeyboardInterrupt`` (a caller that catches that error went on); so was one
  held during a sync whose own local work failed too;
* an accumulator's own ``sync()``: a Ctrl-C during its first collective (the status) raised at once, leaving the
  other ranks waiting in the sums' first collective until the process-group timeout;
* ``lens.gradient_spectra()`` / ``lens.activation_spectra()`` called by themselves (public, not through
  ``measure``) agreed on nothing: ``params=()`` on one rank left both ranks waiting until the timeout, another
  ``mask_fn`` mixed the rows silently.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import threading
import time

import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator, SpectralLens
from spectral_lens import _pools
from spectral_lens._agree import callable_name, mark_out_of_step, out_of_step
from spectral_lens._sync import deferred_interrupt

from support.models import TinyLM, lm_pool
from support.ranks import checked_case, run_gloo_cases

OOM = "injected: reshift out of memory"


def _sigint_here() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)  # the handler runs here at the latest


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler during the test (pytest's or a runner's may be another), restored after."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture
def peer(monkeypatch):
    """This process as rank 0 of 2 (gloo), the other rank contributing zeros; ``calls``: each all_reduce's
    tensor as sent, ``on_call``: an action run inside the n-th all_reduce (``{n: fn}``)."""
    import torch.distributed as dist

    state = {"calls": [], "on_call": {}, "settings": None}

    def all_reduce(t, op=None, group=None):
        state["calls"].append(t.clone())
        action = state["on_call"].get(len(state["calls"]))
        if action is not None:
            action()
        if state["settings"] is not None:  # the other rank's settings digest in its slot (agree_settings)
            text = "\n".join(f"{k}={v}" for k, v in sorted(state["settings"].items()))
            t[3] = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")
            t[1] = 1

    def all_gather_object(out, obj, group=None):
        out[0], out[1] = obj, state["settings"]

    for name, value in {"is_initialized": lambda: True, "get_rank": lambda group=None: 0,
                        "get_world_size": lambda group=None: 2, "get_backend": lambda group=None: "gloo",
                        "all_reduce": all_reduce, "all_gather_object": all_gather_object}.items():
        monkeypatch.setattr(dist, name, value)
    return state


def _acc() -> ActivationCovarianceAccumulator:
    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    return acc


# ---------------------------------------------------------------- mask_fn / pick names
def _mask(batch):
    return batch["attention_mask"]


def test_a_function_of_the_script_has_one_name_under_spawn_too():
    """The script's function in a spawned rank (``__mp_main__``) and in the rank that runs the script itself
    (``__main__``): the same name (before: ``__mp_main__._mask`` != ``__main__._mask``, a false mismatch)."""
    as_script = functools.wraps(_mask)(lambda b: _mask(b))
    as_spawned = functools.wraps(_mask)(lambda b: _mask(b))
    as_script.__module__, as_spawned.__module__ = "__main__", "__mp_main__"
    assert callable_name(as_script) == callable_name(as_spawned) == "__main__._mask"
    assert callable_name(functools.partial(as_spawned)) == "__main__._mask"


class _MaskA:
    func = None  # an attribute of its own named like functools.partial's

    def __call__(self, batch):
        return batch["attention_mask"]


class _MaskB(_MaskA):
    pass


def test_callable_objects_are_named_by_their_class_even_with_a_func_attribute():
    """Before: ``getattr(fn, "func", fn)`` named both by ``None`` (``builtins.NoneType``): a false match of two
    different mask_fns."""
    a, b = callable_name(_MaskA()), callable_name(_MaskB())
    assert a.endswith("._MaskA") and b.endswith("._MaskB"), (a, b)
    assert callable_name(functools.partial(_mask, pad=0)) == callable_name(_mask)  # a partial: its function


def test_what_the_names_do_not_tell_apart():
    """Documented (docs/guide-multi-gpu.md): two lambdas of one module, a closure's captured values and a partial's
    arguments are not compared; the same function, a bound method and a lambda in a function are named alike on
    every rank."""
    assert callable_name(lambda b: b) == callable_name(lambda b: None)
    assert callable_name(functools.partial(_mask, pad=0)) == callable_name(functools.partial(_mask, pad=1))
    assert callable_name(_MaskA().__call__).endswith("._MaskA.__call__")
    torch.manual_seed(0)
    model = TinyLM().double()
    default, explicit = (SpectralLens(model, lm_pool(n_batches=1), params=(), progress=False, **kw)._settings()
                         for kw in ({}, {"autocast_dtype": None, "mask_fn": _pools.attention_mask}))
    assert default == explicit  # a default given explicitly on one rank is no mismatch


# ---------------------------------------------------------------- the SIGINT handler
def test_a_single_process_measure_never_touches_the_sigint_handler(monkeypatch, python_sigint):
    """No process group: no collective to protect, no handler replaced (before: replaced and restored once)."""
    calls = []
    real = signal.signal
    monkeypatch.setattr(signal, "signal", lambda *a: calls.append(a) or real(*a))
    torch.manual_seed(0)
    SpectralLens(TinyLM().double(), lm_pool(n_batches=2), params=(), progress=False).measure(1, 1)
    assert calls == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_ctrl_c_is_not_lost_when_an_error_leaves_the_block(python_sigint):
    """Before: the ValueError was raised and the Ctrl-C forgotten."""
    with pytest.raises(KeyboardInterrupt) as got:
        with deferred_interrupt():
            _sigint_here()
            raise ValueError("another rank's failure")
    assert isinstance(got.value.__cause__, ValueError) and not out_of_step(got.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt) as got:  # a collective's failure: the interrupt is out of step too
        with deferred_interrupt():
            _sigint_here()
            raise mark_out_of_step(RuntimeError("a collective timed out"), "a test", failed=False)
    assert out_of_step(got.value)


def test_nested_blocks_hold_in_the_outer_one_and_restore_once(python_sigint):
    with deferred_interrupt() as outer:
        with deferred_interrupt() as inner:
            _sigint_here()
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # still held by the outer
        assert (outer, inner) == ([True], [])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_another_handler_or_thread_is_left_alone():
    """SIG_IGN and a handler of one's own are kept and called; outside the main thread no handler is set
    (``signal.signal`` would raise ValueError there)."""
    seen = []
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_interrupt() as held:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            _sigint_here()
        assert held == [] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        own = signal.signal(signal.SIGINT, lambda s, f: seen.append(s)) and signal.getsignal(signal.SIGINT)
        with deferred_interrupt() as held:
            _sigint_here()
        assert held == [] and seen == [signal.SIGINT] and signal.getsignal(signal.SIGINT) is own
        signal.signal(signal.SIGINT, signal.default_int_handler)
        out = []
        t = threading.Thread(target=lambda: out.append(_in_thread()))
        t.start()
        t.join()
        assert out == [[]]
    finally:
        signal.signal(signal.SIGINT, before)


def _in_thread():
    with deferred_interrupt() as held:
        return held


def test_a_ctrl_c_in_an_accumulators_status_collective_rides_in_its_last(peer, python_sigint):
    """A Ctrl-C during the sync's first collective (the status): this rank still makes the 4 of the sums, flags
    itself in the last, then raises KeyboardInterrupt, its state unchanged (before: raised after the status, the
    other ranks waiting in the sums' first collective until the timeout)."""
    acc = _acc()
    peer["on_call"][1] = _sigint_here
    with pytest.raises(KeyboardInterrupt):
        acc.sync()
    calls = peer["calls"]
    assert len(calls) == 5 and calls[-1].tolist()[-2:] == [1, -1], calls
    assert acc.n_rows == 7 and not acc._synced
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_and_a_failure_in_one_sync_raise_the_interrupt(peer, python_sigint, monkeypatch):
    """A Ctrl-C held during the sync and an out-of-memory in its re-shift: KeyboardInterrupt, the error its cause
    (before: the out-of-memory error alone, the Ctrl-C lost)."""
    import spectral_lens._sync as sync

    reshift = sync.reshift

    def failing(*args, **kwargs):
        _sigint_here()
        raise torch.OutOfMemoryError(OOM)

    monkeypatch.setattr(sync, "reshift", failing)
    acc = _acc()
    with pytest.raises(KeyboardInterrupt) as got:
        acc.sync()
    assert isinstance(got.value.__cause__, torch.OutOfMemoryError) and len(peer["calls"]) == 5
    monkeypatch.setattr(sync, "reshift", reshift)


# ---------------------------------------------------------------- the public passes, called by themselves
@pytest.mark.parametrize("method", ["gradient_spectra", "activation_spectra"])
def test_the_public_passes_called_alone_agree_on_the_settings(peer, monkeypatch, method):
    """The other rank (simulated) has no gradient protocol (``params=()``): ``gradient_spectra()`` or
    ``activation_spectra()`` called by itself raises the ValueError naming it after one all_reduce, before any
    pass (before: no agreement; the gradient protocol ran on this rank while the other skipped its collectives)."""
    torch.manual_seed(0)
    lens = SpectralLens(TinyLM().double(), lm_pool(n_batches=2), progress=False)
    peer["calls"].clear()  # (the lens's constructor made one: its agreement)
    passes = []
    monkeypatch.setattr(lens, "_gradient_pass", lambda: passes.append("gradient"))
    monkeypatch.setattr(lens, "_activation_pass", lambda *a: passes.append("activation"))
    peer["settings"] = {**lens._settings(), "params": "() (no gradient protocol)"}
    with pytest.raises(ValueError, match=r"params=<probed matrices> on global rank 0, params=\(\) \(no gradient "
                                         r"protocol\) on global rank 1"):
        getattr(lens, method)()
    assert passes == [] and len(peer["calls"]) == 1


# ---------------------------------------------------------------- collectives counted on 2 gloo ranks
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
                "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
                "scatter", "send", "recv", "isend", "irecv", "all_to_all", "all_to_all_single")


def _counted(fn) -> int:
    """The collectives ``fn()`` calls through ``torch.distributed``'s functions, counted."""
    import torch.distributed as dist

    count = [0]
    saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def counting(real):
        def call(*args, **kwargs):
            count[0] += 1
            return real(*args, **kwargs)
        return call

    for name, real in saved.items():
        setattr(dist, name, counting(real))
    try:
        fn()
    finally:
        for name, real in saved.items():
            setattr(dist, name, real)
    return count[0]


def _lens(n_batches: int) -> SpectralLens:
    torch.manual_seed(0)
    return SpectralLens(TinyLM().double(), lm_pool(n_batches=n_batches), params=(), progress=False)


def _count_measure(rank):
    import spectral_lens.lens as lens_module

    four, eight = _lens(4), _lens(8)
    with_check = _counted(lambda: four.measure(1, 1))
    per_batch = _counted(lambda: eight.measure(1, 1)) - with_check
    real, lens_module.agree_settings = lens_module.agree_settings, lambda *a: None
    try:
        without = _counted(lambda: four.measure(1, 1))
    finally:
        lens_module.agree_settings = real
    return {"added": with_check - without, "per_batch": per_batch}


def _count_training_step(rank):
    lens = _lens(4)
    model = lens.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = lm_pool(n_batches=1)[0]

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()

    lens.measure(1, 1)
    return _counted(step)


def _count_sync(rank):
    acc = _acc()
    return _counted(acc.sync)


def _gradient_spectra_params_on_rank0_only(rank):
    torch.manual_seed(0)
    return SpectralLens(TinyLM().double(), lm_pool(n_batches=2), progress=False,
                        **({} if rank == 0 else {"params": ()})).gradient_spectra()


COUNT_CASES = {"measure": _count_measure, "training_step": _count_training_step, "sync": _count_sync,
               "gradient_spectra_params_on_rank0_only": _gradient_spectra_params_on_rank0_only}


@pytest.fixture(scope="module")
def counts(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("review20_ranks"), COUNT_CASES, 2, pg_timeout_s=30, join_s=300,
                          preload="spectral_lens")


@pytest.mark.slow  # one spawn of 2 ranks: ~20 s on the 2-core CPU
@pytest.mark.distributed
def test_the_agreement_adds_one_collective_per_measurement_and_none_elsewhere(counts):
    """One all_reduce added per ``measure`` (``agree_settings``), none per batch (a pool of 8 batches makes as many
    collectives as one of 4), none in a training step outside ``measure`` (the lens's hooks are detached), and an
    accumulator's sync still makes 5 (the status and the sums' 4)."""
    measured = [r["value"] for r in checked_case(counts, "measure", None)]
    assert measured == [{"added": 1, "per_batch": 0}] * 2, measured
    assert [r["value"] for r in checked_case(counts, "training_step", None)] == [0, 0]
    assert [r["value"] for r in checked_case(counts, "sync", None)] == [5, 5]


@pytest.mark.slow
@pytest.mark.distributed
def test_gradient_spectra_alone_with_params_on_one_rank_is_refused_on_every_rank_at_once(counts):
    """Before: rank 1 (``params=()``) returned at once and met rank 0's gradient agreement in the barrier after
    the case; both waited until the 30 s process-group timeout."""
    got = checked_case(counts, "gradient_spectra_params_on_rank0_only", 15.0)
    assert [r["error"].startswith("ValueError: SpectralLens: the ranks' lenses are configured differently (params=")
            for r in got] == [True, True], got
