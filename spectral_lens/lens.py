"""``SpectralLens``: the one object a training loop calls to measure spectra at a checkpoint.

Configured once with the model, the fixed held-out pool, the layers and the matrices to probe;
``measure(step, tokens)`` runs the activation protocol (covariance spectra of the chosen layers over
the whole pool) and the gradient protocol (per-sample gradient spectra of the chosen matrices), and
appends one measurement to a run record when a :class:`~spectral_lens.records.RunWriter` is given.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .accumulate import attach
from .capture import Target
from .gradients import PerSampleGradientProbe
from .gradients._batch import default_forward
from .spectrum import Spectrum

__all__ = ["SpectralLens", "Schedule", "LensMeasurement", "deepest_block", "all_blocks"]


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0]


def all_blocks(model: nn.Module) -> list[str]:
    """Dotted names of the model's layer stack: the ``ModuleList``/``Sequential`` of same-class,
    parameterized blocks, preferring homogeneous stacks, then ``ModuleList``, then length, then
    shallowness (``transformer.h``, ``model.layers``, ``blocks``). Pass ``layers=`` when this guesses wrong."""
    def score(item):
        name, blocks = item
        kinds = {type(b) for b in blocks}
        homogeneous = len(kinds) == 1 and any(True for _ in blocks[0].parameters())
        return (homogeneous, isinstance(blocks, nn.ModuleList), len(blocks), -name.count("."))

    lists = _block_lists(model)
    if not lists:
        raise ValueError(
            f"{type(model).__name__}: found no ModuleList/Sequential of blocks; pass layers= explicitly"
        )
    name, blocks = max(lists, key=score)
    return [f"{name}.{i}" if name else str(i) for i in range(len(blocks))]


def deepest_block(model: nn.Module) -> str:
    """The last block of the layer stack: the paper's default activation probe (App. E.3)."""
    return all_blocks(model)[-1]


@dataclass(frozen=True)
class Schedule:
    """When to measure, as a set of training steps.

    Build with :meth:`every`, :meth:`log_spaced` or :meth:`at_fractions`, combine with ``|``, and ask
    ``step in schedule``. A schedule is its explicit ``steps``, plus every ``period``-th step from
    ``start``, plus the steps of any schedule in ``parts``.
    """

    steps: frozenset[int] = field(default_factory=frozenset)
    period: int | None = None
    start: int = 0
    parts: tuple["Schedule", ...] = ()

    @classmethod
    def every(cls, k: int, start: int = 0) -> "Schedule":
        """Every ``k`` steps from ``start`` (inclusive)."""
        if k < 1:
            raise ValueError(f"Schedule.every: k must be >= 1, got {k}")
        return cls(period=k, start=start)

    @classmethod
    def log_spaced(cls, total_steps: int, n: int, first: int = 1) -> "Schedule":
        """About ``n`` steps spaced evenly in log between ``first`` and ``total_steps`` (inclusive)."""
        if total_steps < first or first < 1 or n < 1:
            raise ValueError(f"Schedule.log_spaced: need total_steps >= first >= 1 and n >= 1, got {total_steps}, {first}, {n}")
        if n == 1:
            return cls(frozenset({total_steps}))
        ratio = (total_steps / first) ** (1 / (n - 1))
        return cls(frozenset(min(total_steps, round(first * ratio**i)) for i in range(n)))

    @classmethod
    def at_fractions(cls, total_steps: int, fractions: Iterable[float] = (0.2,)) -> "Schedule":
        """The steps at fractions of training progress (the paper's early prediction uses 0.2)."""
        out = set()
        for f in fractions:
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"Schedule.at_fractions: fraction {f} outside [0, 1]")
            out.add(int(math.ceil(f * total_steps)))
        return cls(frozenset(out))

    def __contains__(self, step: int) -> bool:
        periodic = self.period is not None and step >= self.start and (step - self.start) % self.period == 0
        return step in self.steps or periodic or any(step in p for p in self.parts)

    def __or__(self, other: "Schedule") -> "Schedule":
        return Schedule(parts=(self, other))


@dataclass(frozen=True)
class LensMeasurement:
    """One checkpoint's spectra and scalars.

    Attributes:
        step, tokens: checkpoint position.
        spectra: ``{"act:<module>": Spectrum, "grad:<parameter>": Spectrum}``.
        scalars: ``noise_scale`` (B_simple in samples, from the first probed matrix),
            ``noise_scale:<parameter>`` for each, ``val_loss`` when given.
    """

    step: int
    tokens: int
    spectra: dict[str, Spectrum]
    scalars: dict[str, float]


class SpectralLens:
    """Measure activation and per-sample gradient spectra of a model over a fixed held-out pool.

    Args:
        model: the model being trained (measure the uncompiled module).
        pool: a re-iterable of batches (list, DataLoader): each batch as the model's forward takes it
            through ``forward_fn`` (default: ``model(batch[0])`` for ``(input_ids, targets)`` tuples,
            ``model(**batch)`` for dicts, ``model(batch)`` for tensors). Reuse the same pool at every
            checkpoint and across runs (the paper's protocol).
        layers: modules whose outputs are measured: ``None`` = the deepest block (paper default),
            ``"all"`` = every block (depth profile), or any target of :func:`spectral_lens.attach`.
        params: matrices for the per-sample gradient spectrum: ``None`` = the final block's attention
            output projection; a name/glob/list as :class:`PerSampleGradientProbe` takes; ``()`` = none.
        gradient_pool: batches for the gradient protocol (default: ``pool``).
        gradient_samples: cap on sequences M used for gradient spectra (paper: 512); ``None`` = all.
        precision, pick: passed to the activation accumulators.
        mask_fn: ``mask_fn(batch) -> bool mask`` of valid positions (padding), or ``None``.
        forward_fn: how to call the model on a batch for the activation pass.
        probe: a configured :class:`PerSampleGradientProbe` (custom ``loss_fn``, ``chunk_size``,
            ``autocast_dtype``, ...) to use instead of one built from ``params``.
        autocast_dtype: run the activation pass under ``torch.autocast`` with this dtype (e.g. bf16).
        writer: a :class:`~spectral_lens.records.RunWriter`; each measurement is appended to it.
        schedule: a :class:`Schedule` used by :meth:`maybe_measure`.
        progress: show a progress bar (needs ``tqdm``; silently none without it).
        group: ``torch.distributed`` process group. With one, each rank runs the activation pass on
            its share of the pool (batch ``i`` goes to rank ``i % world``) and statistics are synced;
            the gradient protocol runs on rank 0 over the whole gradient pool (cross-sample Gram
            entries need every sample's gradient) and its results are broadcast.

    Measuring leaves the model's train/eval mode, gradients, RNG streams and hooks as they were.
    """

    def __init__(
        self,
        model: nn.Module,
        pool: Iterable[Any],
        *,
        layers: Target | str | None = None,
        params: str | Sequence[str] | None = None,
        gradient_pool: Iterable[Any] | None = None,
        gradient_samples: int | None = None,
        precision: str = "exact",
        pick=None,
        mask_fn: Callable[[Any], torch.Tensor | None] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        probe: PerSampleGradientProbe | None = None,
        autocast_dtype: torch.dtype | None = None,
        writer=None,
        schedule: Schedule | None = None,
        progress: bool = False,
        group=None,
    ) -> None:
        self.model = model
        self.pool = pool
        if layers is None:
            layers = deepest_block(model)
        elif layers == "all":
            layers = all_blocks(model)
        self.layers = layers
        self.gradient_pool = pool if gradient_pool is None else gradient_pool
        self.gradient_samples = gradient_samples
        self.precision = precision
        self.pick = pick
        self.mask_fn = mask_fn
        self.forward_fn = forward_fn or default_forward
        self.autocast_dtype = autocast_dtype
        self.writer = writer
        self.schedule = schedule
        self.progress = progress
        self.group = group
        if probe is not None and params is not None:
            raise ValueError("SpectralLens: pass params= or a configured probe=, not both")
        if probe is not None and probe.model is not model:
            raise ValueError("SpectralLens: probe= was built for another model")
        no_grad = isinstance(params, (list, tuple)) and len(params) == 0
        self.probe = probe if probe is not None else (None if no_grad else PerSampleGradientProbe(model, params))
        self.history: list[LensMeasurement] = []

    # ------------------------------------------------------------------ helpers
    def _dist(self) -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.group), dist.get_world_size(self.group)
        return 0, 1

    def _iterate(self, batches: Iterable[Any], desc: str, shard: bool):
        rank, world = self._dist() if shard else (0, 1)
        it = (b for i, b in enumerate(batches) if i % world == rank)
        if self.progress:
            try:
                from tqdm.auto import tqdm

                total = len(batches) if hasattr(batches, "__len__") else None
                return tqdm(it, desc=desc, total=None if total is None else math.ceil((total - rank) / world), leave=False)
            except ImportError:
                pass
        return it

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @contextlib.contextmanager
    def _eval_mode(self):
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        dev = self._device()
        devices = [dev] if dev.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                yield
        finally:
            for m, training in modes:
                m.training = training

    # ---------------------------------------------------------------- protocols
    def activation_spectra(self) -> dict[str, Spectrum]:
        """Covariance spectra of every selected layer over the pool (synced across ranks)."""
        capture = attach(self.model, self.layers, pick=self.pick, precision=self.precision)
        dev = self._device()
        autocast = (
            torch.autocast(dev.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None else contextlib.nullcontext()
        )
        with capture, self._eval_mode(), torch.no_grad(), autocast:
            for batch in self._iterate(self.pool, "activations", shard=True):
                mask = self.mask_fn(batch) if self.mask_fn is not None else None
                with capture.mask(mask):
                    self.forward_fn(self.model, batch)
        for acc in capture.accumulators.values():
            acc.sync(self.group)
        return {f"act:{name}": spectrum for name, spectrum in capture.compute().items()}

    def gradient_spectra(self) -> tuple[dict[str, Spectrum], dict[str, float]]:
        """Per-sample gradient spectra of the probed matrices and their noise scales (rank 0 computes)."""
        if self.probe is None:
            return {}, {}
        rank, world = self._dist()
        result: list = [None]
        if rank == 0:
            from .gradients._batch import batch_size, slice_batch

            self.probe.reset()
            seen = 0
            for batch in self._iterate(self.gradient_pool, "gradients", shard=False):
                if self.gradient_samples is not None:
                    take = min(batch_size(batch), self.gradient_samples - seen)
                    if take <= 0:
                        break
                    batch = slice_batch(batch, 0, take)
                self.probe.update(batch)
                seen += batch_size(batch)
            spectra = self.probe.compute()
            noise = self.probe.noise_scale()
            if isinstance(spectra, Spectrum):
                spectra = {next(iter(self.probe.params)): spectra}
                noise = {next(iter(self.probe.params)): noise}
            scalars = {f"noise_scale:{n}": float(ns.b_simple) for n, ns in noise.items()}
            scalars["noise_scale"] = scalars[f"noise_scale:{next(iter(noise))}"]
            result = [({f"grad:{n}": s for n, s in spectra.items()}, scalars)]
        if world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(result, src=0, group=self.group)
        return result[0]

    # ----------------------------------------------------------------- interface
    def measure(self, step: int, tokens: int, *, val_loss: float | None = None, progress: float | None = None) -> LensMeasurement:
        """Run both protocols now; store and return the measurement (rank 0 writes the record)."""
        spectra = self.activation_spectra()
        grad_spectra, scalars = self.gradient_spectra()
        spectra.update(grad_spectra)
        for s in spectra.values():
            s.metadata.update(step=int(step), tokens=int(tokens))
        if val_loss is not None:
            scalars["val_loss"] = float(val_loss)
        m = LensMeasurement(int(step), int(tokens), spectra, scalars)
        self.history.append(m)
        if self.writer is not None and self._dist()[0] == 0:
            extra = {k: v for k, v in scalars.items() if k != "val_loss"}
            self.writer.log_measurement(step, tokens, spectra, val_loss=val_loss, progress=progress, scalars=extra)
        return m

    def maybe_measure(self, step: int, tokens: int, **kwargs) -> LensMeasurement | None:
        """``measure`` if ``step`` is in the schedule, else ``None``."""
        if self.schedule is None:
            raise ValueError("SpectralLens.maybe_measure needs schedule=...")
        return self.measure(step, tokens, **kwargs) if step in self.schedule else None

    def __repr__(self) -> str:
        params = None if self.probe is None else list(self.probe.params)
        return f"SpectralLens(layers={self.layers!r}, params={params}, precision={self.precision!r})"
