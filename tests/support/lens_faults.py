"""A lens whose second measurement fails as float32 products overflowing would (a finite loss, so the jobs keep
the run as stopped unmeasured): shared by the toy's and the speedrun's job tests."""

from __future__ import annotations

import contextlib


def overflow_on_second_measure(monkeypatch, layer: str = "blocks.0") -> list:
    """Patch ``SpectralLens.measure`` to raise ``NonFiniteError`` on its second call; returns the list of calls."""
    import spectral_lens as sl
    from spectral_lens import NonFiniteError

    real, calls = sl.SpectralLens.measure, []

    def overflowing(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise NonFiniteError(f"act:{layer}: the second moments overflowed to Inf ... float32 products")
        return real(self, *a, **kw)
    monkeypatch.setattr(sl.SpectralLens, "measure", overflowing)
    return calls


@contextlib.contextmanager
def compute_raises(rank: int, errors: dict):
    """``ActivationCapture.compute`` raising ``errors[rank]`` on this ``rank`` (unchanged on a rank not in
    ``errors``) inside the block; restored after it. For multi-rank cases: one rank's activation solve failing."""
    import spectral_lens.lens as lens_mod

    saved = lens_mod.ActivationCapture.compute

    def compute(*args, **kwargs):
        raise errors[rank]

    if rank in errors:
        lens_mod.ActivationCapture.compute = compute
    try:
        yield
    finally:
        lens_mod.ActivationCapture.compute = saved
