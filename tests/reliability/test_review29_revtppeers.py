"""Review 29 (revtppeers): an adversarial review of review 29's agreement of a tensor-parallel rank's failures with
its mesh peers outside the lens's ``group`` (``test_review29_tppeers.py``), on 2 gloo ranks, a 1-D mesh of both,
the lens's ``group`` each rank's own group.

Regression guards (they passed before this review): an interrupt in one rank's activation ``compute``, both ranks'
``compute`` failing with other causes, a 100 KB error text (quoted in at most ``CAUSE_BYTES`` bytes), failures
before the peers' check on both ranks at once (a bad argument on one, a pool's ``len`` on the other), an interrupt
in ``measure``'s argument check, an empty pool on one rank; and the lens measuring in step again after an agreed
failure of its ``compute`` and after a bad argument (the third measurement equals a fresh lens's).

Before the fixes (process-group timeout 20 s here; these cases come last, as a timeout leaves the group unusable):

* an error whose ``__str__`` raises (a user's exception class), raised by one rank's activation ``compute`` or by
  its pool's ``len``, or whose message UTF-8 cannot encode (a path's undecodable byte, a lone surrogate): the
  failed rank's error text (``_agree._causes``) raised before its ``all_reduce``, which its peer waited in until
  the timeout (now the text is the type and a note, ``_agree.error_text``, and the message escaped);
* an interrupt (or any error) while one rank computed the settings text it sends to its peers' check
  (``SpectralLens._peer_settings``, the probe's ``probe_settings``) came after the rank had marked the check as
  reached, so it was not carried into it: its peer waited in the check until the timeout (activation pass,
  gradient protocol, ``gradient_spectra()`` without a gradient protocol).
"""

from __future__ import annotations

import contextlib

import pytest
from reliability.test_review29_tppeers import BEFORE, SOLVE, _LenFails, _lens
from reliability.test_tensor_parallel import _pool, _values
from support.lens_faults import compute_raises
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import SpectralLens
from spectral_lens._agree import CAUSE_BYTES
from spectral_lens._warnings import NonFiniteError

WORLD = 2
PG_TIMEOUT_S = 20  # a collective left waiting fails after this (before the fixes: rank 0's error after 20 s)
DEADLINE_S = 15.0  # an agreed error comes at once
JOIN_S = 400.0
COMPUTE = "computing the activation spectra of a tensor-parallel rank"
UNREAD = "(its message could not be read: its __str__ raised)"


class Unprintable(OSError):
    """A user's error whose message cannot be read (its ``__str__`` raises)."""

    def __str__(self):
        raise AttributeError("no message")


@contextlib.contextmanager
def _readable():
    """An :class:`Unprintable` raised inside re-raised as an error whose text can be recorded."""
    try:
        yield
    except Unprintable:
        raise OSError("Unprintable raised here") from None


def _patched(target, name: str, rank: int, replacement):
    """``target.name`` replaced on ``rank`` 1 only; returns the undo."""
    saved = getattr(target, name)
    if rank == 1:
        setattr(target, name, replacement)
    return lambda: setattr(target, name, saved)


def _measure_with_failing_compute(rank: int, errors: dict, **kwargs) -> None:
    """A measurement in which rank ``r``'s activation ``compute`` raises ``errors[r]``."""
    lens = _lens(rank, **kwargs)
    with compute_raises(rank, errors):
        lens.measure(1, 1)


def _interrupt_in_compute_on_rank1(rank: int) -> None:
    _measure_with_failing_compute(rank, {1: KeyboardInterrupt()}, params="lm_head.weight")


def _compute_fails_on_both_with_other_causes(rank: int) -> None:
    _measure_with_failing_compute(rank, {0: OSError("out of memory on rank 0"), 1: NonFiniteError(SOLVE)},
                                  params="lm_head.weight")


def _huge_error_text_on_rank1(rank: int) -> None:
    _measure_with_failing_compute(rank, {1: OSError("x" * 100_000)})


def _again_after_failures(rank: int) -> dict:
    """A failure of rank 1's compute, then a bad argument on rank 1, then a measurement of both and a fresh lens's."""
    import spectral_lens.lens as lens_mod

    lens, out = _lens(rank, params="lm_head.weight"), {}

    def compute(*args, **kwargs):
        raise NonFiniteError(SOLVE)

    undo = _patched(lens_mod.ActivationCapture, "compute", rank, compute)
    try:
        lens.measure(1, 1)
    except NonFiniteError as exc:
        out["first"] = type(exc).__name__
    finally:
        undo()
    try:
        lens.measure(2, 1.5 if rank == 1 else 1)
    except (RuntimeError, TypeError) as exc:
        out["second"] = type(exc).__name__
    out["same"] = _values(lens.measure(3, 3)) == _values(_lens(rank, params="lm_head.weight").measure(3, 3))
    return out


def _bad_argument_on_rank1_pool_len_on_rank0(rank: int) -> None:
    lens = _lens(rank)
    lens.pool = _LenFails(_pool(2))
    lens.pool.broken = rank == 0
    lens.measure(1, 1.5 if rank == 1 else 1)


def _interrupt_in_argument_check_on_rank1(rank: int) -> None:
    def interrupted(self, step):
        raise KeyboardInterrupt

    undo = _patched(SpectralLens, "_warn_measured", rank, interrupted)
    try:
        _lens(rank).measure(1, 1)
    finally:
        undo()


def _empty_pool_on_rank1(rank: int) -> None:
    lens = _lens(rank)
    lens.pool = [] if rank == 1 else _pool(2)
    lens.measure(1, 1)


def _unprintable_compute_on_rank1(rank: int) -> None:
    with _readable():
        _measure_with_failing_compute(rank, {1: Unprintable()})


class _UnprintableLen(list):
    """A list of batches whose ``len`` raises an :class:`Unprintable` once ``broken`` is set."""

    broken = False

    def __len__(self):
        if self.broken:
            raise Unprintable()
        return super().__len__()


def _unprintable_pool_len_on_rank1(rank: int) -> None:
    lens = _lens(rank)
    lens.pool = _UnprintableLen(_pool(2))
    lens.pool.broken = rank == 1
    with _readable():
        lens.measure(1, 1)


class _SurrogateLen(list):
    """A list of batches whose ``len`` raises an error naming a path with an undecodable byte (``os.fsdecode``: a
    lone surrogate, which UTF-8 cannot encode) once ``broken`` is set."""

    broken = False

    def __len__(self):
        if self.broken:
            raise ValueError("cannot read the pool's index /data/\udcff.idx")
        return super().__len__()


def _surrogate_pool_len_on_rank1(rank: int) -> None:
    lens = _lens(rank)
    lens.pool = _SurrogateLen(_pool(2))
    lens.pool.broken = rank == 1
    lens.measure(1, 1)


def _interrupt_in_settings(rank: int, probe: bool, params="lm_head.weight") -> None:
    """Rank 1 interrupted while it computes the settings text for its peers' check (``probe``: the gradient
    protocol's, else the activation pass's; ``gradient_spectra()`` with ``probe`` or without a gradient
    protocol, else ``measure``)."""
    saved = SpectralLens._peer_settings

    def settings(self, probe: bool = False):
        if probe == wanted:
            raise KeyboardInterrupt
        return saved(self, probe)

    wanted, lens = probe, _lens(rank, params=params)
    undo = _patched(SpectralLens, "_peer_settings", rank, settings)
    try:
        lens.gradient_spectra() if probe or params == () else lens.measure(1, 1)
    finally:
        undo()


def _interrupt_in_activation_settings_on_rank1(rank: int) -> None:
    _interrupt_in_settings(rank, probe=False)


def _interrupt_in_gradient_settings_on_rank1(rank: int) -> None:
    _interrupt_in_settings(rank, probe=True)


def _interrupt_in_settings_without_gradient_protocol_on_rank1(rank: int) -> None:
    """``gradient_spectra()`` of a lens with ``params=()`` on both: the peers compare their settings there."""
    _interrupt_in_settings(rank, probe=False, params=())


CASES = {  # the cases the old code fails by the timeout last: a timeout leaves the process group unusable
    "interrupt_in_compute_on_rank1": _interrupt_in_compute_on_rank1,
    "compute_fails_on_both_with_other_causes": _compute_fails_on_both_with_other_causes,
    "huge_error_text_on_rank1": _huge_error_text_on_rank1,
    "again_after_failures": _again_after_failures,
    "bad_argument_on_rank1_pool_len_on_rank0": _bad_argument_on_rank1_pool_len_on_rank0,
    "interrupt_in_argument_check_on_rank1": _interrupt_in_argument_check_on_rank1,
    "empty_pool_on_rank1": _empty_pool_on_rank1,
    "unprintable_compute_on_rank1": _unprintable_compute_on_rank1,
    "unprintable_pool_len_on_rank1": _unprintable_pool_len_on_rank1,
    "interrupt_in_activation_settings_on_rank1": _interrupt_in_activation_settings_on_rank1,
    "interrupt_in_gradient_settings_on_rank1": _interrupt_in_gradient_settings_on_rank1,
    "interrupt_in_settings_without_gradient_protocol_on_rank1": _interrupt_in_settings_without_gradient_protocol_on_rank1,
    "surrogate_pool_len_on_rank1": _surrogate_pool_len_on_rank1,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("revtppeers"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


def _errors(results, case) -> list[str]:
    return [r["error"] or "" for r in checked_case(results, case, DEADLINE_S)]


def _names(error: str, kind: str, what: str, cause: str) -> bool:
    return error.startswith(f"{kind}: SpectralLens: {what} failed on global rank(s) [1] (global rank 1: {cause})")


@pytest.mark.slow
@pytest.mark.distributed
def test_failures_of_the_compute_are_agreed_whatever_they_are(results):
    r0, r1 = _errors(results, "interrupt_in_compute_on_rank1")
    assert r1 == "KeyboardInterrupt: " and _names(r0, "RuntimeError", COMPUTE, "KeyboardInterrupt: "), (r0, r1)
    r0, r1 = _errors(results, "compute_fails_on_both_with_other_causes")  # each its own
    assert r0 == "OSError: out of memory on rank 0" and r1.startswith(f"NonFiniteError: {SOLVE}"), (r0, r1)
    r0, r1 = _errors(results, "huge_error_text_on_rank1")
    quoted = "OSError: " + "x" * (CAUSE_BYTES - len("OSError: "))  # bounded
    assert r1 == "OSError: " + "x" * 100_000 and _names(r0, "RuntimeError", COMPUTE, quoted), r0[:700]


@pytest.mark.slow
@pytest.mark.distributed
def test_the_lens_measures_in_step_after_agreed_failures(results):
    got = [r["value"] for r in checked_case(results, "again_after_failures", None)]
    assert got == [{"first": "NonFiniteError", "second": "RuntimeError", "same": True},
                   {"first": "NonFiniteError", "second": "TypeError", "same": True}], got


@pytest.mark.slow
@pytest.mark.distributed
def test_failures_before_the_peers_check_are_agreed_on_both_ranks_at_once(results):
    r0, r1 = _errors(results, "bad_argument_on_rank1_pool_len_on_rank0")
    assert r0 == "OSError: the pool's index could not be read", r0
    assert r1.startswith("TypeError: SpectralLens.measure: step and tokens must be integers"), r1
    r0, r1 = _errors(results, "interrupt_in_argument_check_on_rank1")
    assert r1 == "KeyboardInterrupt: " and _names(r0, "RuntimeError", BEFORE, "KeyboardInterrupt: "), (r0, r1)
    r0, r1 = _errors(results, "empty_pool_on_rank1")
    assert [r.startswith("ValueError: SpectralLens: the tensor-parallel ranks [0, 1] would run different numbers of "
                         f"forwards (this rank: {n}, the others between 0 and 2)") for r, n in ((r0, 2), (r1, 0))] \
        == [True, True], (r0, r1)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case, what", [("unprintable_compute_on_rank1", COMPUTE),
                                        ("unprintable_pool_len_on_rank1", BEFORE)])
def test_an_error_whose_message_cannot_be_read_is_agreed_too(results, case, what):
    r0, r1 = _errors(results, case)
    assert r1 == "OSError: Unprintable raised here", r1
    assert _names(r0, "RuntimeError", what, f"Unprintable: {UNREAD}"), r0


@pytest.mark.slow
@pytest.mark.distributed
def test_an_error_text_utf8_cannot_encode_is_agreed_escaped(results):
    r0, r1 = _errors(results, "surrogate_pool_len_on_rank1")
    assert r1 == "ValueError: cannot read the pool's index /data/\udcff.idx", r1
    assert _names(r0, "RuntimeError", BEFORE, "ValueError: cannot read the pool's index /data/\\udcff.idx"), r0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", ["interrupt_in_activation_settings_on_rank1",
                                  "interrupt_in_gradient_settings_on_rank1",
                                  "interrupt_in_settings_without_gradient_protocol_on_rank1"])
def test_an_interrupt_while_the_settings_for_the_peers_check_are_computed_is_agreed(results, case):
    r0, r1 = _errors(results, case)
    assert r1 == "KeyboardInterrupt: " and _names(r0, "RuntimeError", BEFORE, "KeyboardInterrupt: "), (r0, r1)
